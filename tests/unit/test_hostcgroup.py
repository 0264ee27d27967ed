"""microvm.core.hostcgroup: the spec's cgroupsPath, in both drivers' forms."""

from __future__ import annotations

from pathlib import Path

import pytest

from microvm.core import hostcgroup
from microvm.errors import KataError


@pytest.mark.parametrize("spec, rel", [
    ("/kubepods/besteffort/pod123/abc", "kubepods/besteffort/pod123/abc"),
    ("/default/t1", "default/t1"),
    ("kubepods-besteffort-pod123.slice:cri-containerd:abc",
     "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod123.slice/"
     "cri-containerd-abc.scope"),
    ("system.slice:docker:x", "system.slice/docker-x.scope"),
])
def test_relative_path(spec: str, rel: str) -> None:
    assert hostcgroup.relative_path(spec) == rel


@pytest.mark.parametrize("bad", ["", "/", "/a/../b", "a//b"])
def test_bad_cgroups_paths(bad: str) -> None:
    with pytest.raises(KataError, match="invalid cgroupsPath"):
        hostcgroup.relative_path(bad)


def test_v1_hierarchies_and_cpuset_inheritance(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("cpuset", "memory", "unified"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "cgroup.procs").write_text("")
    (tmp_path / "cpuset" / "cpuset.cpus").write_text("0-1\n")
    (tmp_path / "cpuset" / "cpuset.mems").write_text("0\n")
    assert hostcgroup.hierarchies(tmp_path) == [tmp_path / "cpuset", tmp_path / "memory"]

    # A fake cgroup fs makes no knobs by itself: make cpuset's empty, as the
    # kernel does, when a directory appears.
    real_mkdir = Path.mkdir

    def mkdir(self: Path, *a: object, **kw: object) -> None:
        real_mkdir(self, *a, **kw)  # type: ignore[arg-type]
        if self.parts[-2:-1] != ("memory",) and "cpuset" in self.parts:
            (self / "cpuset.cpus").write_text("")
            (self / "cpuset.mems").write_text("")

    monkeypatch.setattr(Path, "mkdir", mkdir)
    created: list[Path] = []
    d = hostcgroup._prepare(tmp_path / "cpuset", "pods/p1", created)
    assert created == [tmp_path / "cpuset/pods", tmp_path / "cpuset/pods/p1"]
    assert (d / "cpuset.cpus").read_text() == "0-1\n" and (d / "cpuset.mems").read_text() == "0\n"
