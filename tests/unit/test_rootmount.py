"""One plan for a container's root, for both front ends; and its mounts,
made for real in a private mount namespace (the host's is never touched)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from microvm.core import rootmount
from microvm.core.rootmount import RootMount

L1, L2 = Path("/l/1"), Path("/l/2")
UP, WORK = Path("/c/upper"), Path("/c/work")


def test_the_plans() -> None:
    assert rootmount.plan([L1], True, UP, WORK) == RootMount("bind", "/l/1", ("rbind", "ro"))
    # overlayfs lists the top layer first.
    assert rootmount.plan([L1, L2], True, UP, WORK) == \
        RootMount("overlay", "overlay", ("ro", "lowerdir=/l/2:/l/1"))
    assert rootmount.plan([L1, L2], False, UP, WORK) == RootMount(
        "overlay", "overlay", ("lowerdir=/l/2:/l/1", "upperdir=/c/upper", "workdir=/c/work"))
    assert rootmount.plan([L1], False, UP, WORK).type == "overlay"  # never the layer itself
    assert rootmount.snapshot(L1) == RootMount("bind", "/l/1", ("rbind",))


MOUNT_AND_PROBE = """
import json, os, sys
from pathlib import Path
from microvm.core import rootmount
tmp = Path(sys.argv[1])
out = {}
for name, readonly, layers in (("ro1", True, ["l1"]), ("ro2", True, ["l1", "l2"]),
                               ("rw", False, ["l1", "l2"])):
    target = tmp / name
    target.mkdir()
    m = rootmount.plan([tmp / l for l in layers], readonly, tmp / "upper", tmp / "work")
    rootmount.mount(m, target)
    try:
        (target / "new").write_text("x")
        wrote = True
    except OSError:
        wrote = False
    out[name] = {"wrote": wrote, "seen": sorted(os.listdir(target))}
print(json.dumps(out))
"""


@pytest.mark.skipif(not Path("/proc/self/ns/mnt").exists(), reason="needs mount namespaces")
def test_the_mounts_read_only_means_read_only(tmp_path: Path) -> None:
    for layer, f in (("l1", "a"), ("l2", "b")):
        (tmp_path / layer).mkdir()
        (tmp_path / layer / f).write_text(f)
    (tmp_path / "upper").mkdir()
    (tmp_path / "work").mkdir()
    p = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-c",
                        MOUNT_AND_PROBE, str(tmp_path)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert got["ro1"] == {"wrote": False, "seen": ["a"]}
    assert got["ro2"] == {"wrote": False, "seen": ["a", "b"]}
    assert got["rw"] == {"wrote": True, "seen": ["a", "b", "new"]}
    # The write went to the container's upper layer, not to a layer.
    assert (tmp_path / "upper" / "new").exists()
    assert sorted(p.name for p in (tmp_path / "l1").iterdir()) == ["a"]
