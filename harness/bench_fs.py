"""File-sharing benchmark: a clone's virtio-9p beside a cold boot's virtio-fs.

Clones share the container root and volumes over virtio-9p (virtio-fs cannot
migrate on QEMU 7.2); cold boots keep virtio-fs.  In one container of each,
alternating, timed inside the guest on a volume the host prepared:

  untar       unpack FILES small files (tar on the volume, into the volume)
  find        walk the unpacked tree (stat of every entry)
  read        read a BIG_MIB MiB file written by the host, sequentially

The guest's /proc/uptime is the clock (10 ms: every figure here is longer).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tarfile
import tempfile
from pathlib import Path

FILES = 2000
BIG_MIB = 64
CASES = ("untar", "find", "read")
SCRIPT = """
t() { read u _ < /proc/uptime; echo "$u"; }
a=$(t); tar xf /data/src.tar -C /data/out; b=$(t)
find /data/out >/dev/null; c=$(t)
cat /data/big >/dev/null; d=$(t)
echo "$a $b $c $d"
"""


def _prepare(root: Path) -> None:
    src = root / "src"
    for i in range(FILES):
        d = src / f"d{i % 50:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(os.urandom(1024))
    with tarfile.open(root / "src.tar", "w") as tar:
        tar.add(src, arcname="src")
    shutil.rmtree(src)
    with open(root / "big", "wb") as f:
        for _ in range(BIG_MIB):
            f.write(os.urandom(1 << 20))


def _once(microvm: str, vol: Path, *flags: str) -> dict[str, float]:
    shutil.rmtree(vol / "out", ignore_errors=True)
    (vol / "out").mkdir()
    r = subprocess.run([microvm, "run", "--rm", "--network", "none", *flags,
                        "-v", f"{vol}:/data", "busybox", "sh", "-c", SCRIPT],
                       capture_output=True, text=True, check=True)
    a, b, c, d = map(float, r.stdout.split()[-4:])
    return {"untar": b - a, "find": c - b, "read": d - c}


def run(n: int, microvm: str) -> dict[str, object]:
    kinds = {"9p (clone)": (), "virtio-fs (cold)": ("--no-template",)}
    samples: dict[str, dict[str, list[float]]] = {k: {c: [] for c in CASES} for k in kinds}
    with tempfile.TemporaryDirectory(prefix="kata-py-bench-fs-") as tmp:
        vol = Path(tmp)
        _prepare(vol)
        for _ in range(n):  # alternating, so drift hits both alike
            for kind, flags in kinds.items():
                for case, secs in _once(microvm, vol, *flags).items():
                    samples[kind][case].append(secs)
    medians = {k: {c: statistics.median(v) for c, v in cases.items()}
               for k, cases in samples.items()}
    return {"files": FILES, "big_mib": BIG_MIB, "medians": medians, "samples": samples}


def report(r: dict[str, object]) -> None:
    medians: dict[str, dict[str, float]] = r["medians"]  # type: ignore[assignment]
    ninep, vfs = medians["9p (clone)"], medians["virtio-fs (cold)"]
    print(f"file sharing, inside the guest ({r['files']} files, {r['big_mib']} MiB read):")
    print(f"  {'':<8}{'9p (clone)':>12}{'virtio-fs':>12}{'9p/virtio-fs':>14}")
    for case in CASES:
        ratio = ninep[case] / vfs[case] if vfs[case] else float("nan")
        print(f"  {case:<8}{ninep[case]:>11.2f}s{vfs[case]:>11.2f}s{ratio:>14.2f}")
