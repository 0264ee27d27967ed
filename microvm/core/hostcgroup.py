"""The pod's cgroup on the host: the shim joins it before the VM boots.

QEMU and virtiofsd are then counted, and limited, as the pod: containerd's
PodSandboxStats reads this cgroup, and a kubelet's pod overhead and limits
land on it (as Kata's sandbox_cgroup_only).  The path is the sandbox spec's
`linux.cgroupsPath`: cgroupfs style (`/kubepods/pod<uid>/<id>`) or
systemd style (`kubepods-pod<uid>.slice:cri-containerd:<id>`), made in the
unified hierarchy (cgroup v2) or in every v1 hierarchy mounted, as runc does.

The shim leaves it and removes it when it is done; `delete` removes what a
SIGKILLed shim left (by then QEMU died with it, so the cgroup is empty).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from microvm.errors import KataError

log = logging.getLogger(__name__)

ROOT = Path("/sys/fs/cgroup")
V2_CONTROLLERS = "+cpu +memory +pids +io"


def relative_path(cgroups_path: str) -> str:
    """The spec's cgroupsPath as a path below each hierarchy's root."""
    if ":" in cgroups_path:
        slice_, prefix, name = (cgroups_path.split(":") + ["", ""])[:3]
        parts: list[str] = []
        if slice_ and slice_ != "-.slice":
            # systemd: a-b-c.slice lives in a.slice/a-b.slice/a-b-c.slice
            words = slice_.removesuffix(".slice").split("-")
            parts = ["-".join(words[:i + 1]) + ".slice" for i in range(len(words))]
        parts.append(f"{prefix}-{name}.scope" if prefix else f"{name}.scope")
        rel = "/".join(parts)
    else:
        rel = cgroups_path.strip("/")
    if not rel or any(p in ("", ".", "..") for p in rel.split("/")):
        raise KataError(f"invalid cgroupsPath {cgroups_path!r}")
    return rel


def hierarchies(root: Path = ROOT) -> list[Path]:
    if (root / "cgroup.controllers").exists():
        return [root]  # cgroup v2
    found = []
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        # v1 hierarchies; "unified" is a v2 one kept beside them on hybrid hosts.
        if d.name != "unified" and not d.is_symlink() and (d / "cgroup.procs").exists():
            found.append(d)
    return found


def _prepare(hierarchy: Path, rel: str, created: list[Path]) -> Path:
    """Make hierarchy/rel; what v1's cpuset and v2's controllers need first."""
    d = hierarchy
    for part in rel.split("/"):
        parent, d = d, d / part
        if hierarchy == ROOT and (ROOT / "cgroup.controllers").exists():
            with contextlib.suppress(OSError):  # enables what it can
                (parent / "cgroup.subtree_control").write_text(V2_CONTROLLERS)
        if not d.exists():
            d.mkdir()
            created.append(d)
        for knob in ("cpuset.cpus", "cpuset.mems"):
            # v1 cpuset refuses tasks until both are set: inherit the parent's.
            if (d / knob).exists() and not (d / knob).read_text().strip():
                (d / knob).write_text((parent / knob).read_text())
    return d


@dataclass
class Joined:
    created: list[Path]          # deepest first
    back: dict[Path, Path]       # hierarchy -> where this process came from

    def leave(self) -> None:
        leave(self.created, self.back)


def join(cgroups_path: str, others: list[int] | tuple[int, ...] = ()) -> Joined:
    """Move this process (and so its future children) into the pod's cgroup,
    and others (children it has already).  Returns what to remove
    afterwards: the cgroups this made, deepest first (a parent that existed
    before, such as kubelet's pod cgroup, is not ours)."""
    rel = relative_path(cgroups_path)
    back = origins()
    created: list[Path] = []
    try:
        for h in hierarchies():
            d = _prepare(h, rel, created)
            for pid in (os.getpid(), *others):
                (d / "cgroup.procs").write_text(str(pid))
    except OSError as e:
        leave(created, back)
        raise KataError(f"cannot join cgroup {cgroups_path}: {e.strerror}") from None
    log.debug("joined %s", rel)
    return Joined(sorted(created, key=lambda p: len(p.parts), reverse=True), back)


def origins() -> dict[Path, Path]:
    """This process's cgroup in each hierarchy, from /proc/self/cgroup."""
    found: dict[Path, Path] = {}
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return found
    for h in hierarchies():
        for line in lines:
            _, controllers, path = line.split(":", 2)
            names = controllers.split(",")
            if (h == ROOT and controllers == "") or h.name in names \
                    or f"name={h.name}" in names:
                found[h] = h / path.lstrip("/")
                break
    return found


def leave(created: list[Path], back: dict[Path, Path]) -> None:
    """Back to where this process was, then remove the (now empty) cgroups made."""
    for d in back.values():
        with contextlib.suppress(OSError):
            (d / "cgroup.procs").write_text(str(os.getpid()))
    remove(created)


def remove(dirs: list[Path]) -> None:
    for d in dirs:
        try:
            d.rmdir()
        except FileNotFoundError:
            pass
        except OSError as e:
            log.debug("cgroup %s kept: %s", d, e.strerror)


def dirs_for(cgroups_path: str) -> list[Path]:
    """Where join would have put it (for delete, after a SIGKILL)."""
    try:
        rel = relative_path(cgroups_path)
    except KataError:
        return []
    return [h / rel for h in hierarchies()]
