"""A container's root on the host: which mount, and mounting it.

One plan for both front ends.  The CLI's foreground run mounts it itself;
its detached run hands it to the shim as containerd's Mount, and the shim
mounts that (as it mounts a containerd snapshot) with the same code.

From image layers, bottom first:
  read-only, one layer   a read-only bind of it (the layer is shared by
                         every container of the image: never writable here)
  read-only, several     an overlay of the layers alone (overlayfs mounts
                         that read-only)
  writable               an overlay with the container's own upper layer
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from microvm import linux
from microvm.core import oci


@dataclass(frozen=True)
class RootMount:
    """containerd's Mount: type, source and fstab-style options."""

    type: str
    source: str
    options: tuple[str, ...]


def plan(layers: Sequence[Path], readonly: bool, upper: Path, work: Path) -> RootMount:
    if readonly and len(layers) == 1:
        return RootMount("bind", str(layers[0]), ("rbind", "ro"))
    lowerdir = "lowerdir=" + ":".join(str(p) for p in reversed(layers))  # top first
    if readonly:
        return RootMount("overlay", "overlay", ("ro", lowerdir))
    return RootMount("overlay", "overlay", (lowerdir, f"upperdir={upper}", f"workdir={work}"))


def snapshot(path: Path) -> RootMount:
    """A containerd snapshot, which is the container's own: bound as it is,
    writable even for a read-only root.  As runc does, the guest makes the
    mount points it lacks (/proc, /dev...; CRI's pause image has none) and
    only then turns the root read-only."""
    return RootMount("bind", str(path), ("rbind",))


def mount(m: RootMount, target: Path) -> None:
    """Mount m on target (OSError if it cannot be)."""
    flags, data = oci.mount_options(list(m.options))
    if flags & linux.MS_BIND and flags & linux.MS_RDONLY:
        # mount(2) ignores MS_RDONLY on a new bind, and a remount afterwards
        # would leave already-propagated copies writable: the guest must
        # never write what the host lends it read-only.
        linux.bind_tree(m.source, str(target), readonly=True)
        return
    linux.mount(m.source, str(target), m.type or None, flags, data or None)
