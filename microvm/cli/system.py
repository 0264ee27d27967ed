"""`microvm system df` and `microvm system prune`: what kata-py keeps on disk,
and the spare VMs it keeps in memory."""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from microvm import forkserver
from microvm.cli import detached
from microvm.images import store
from microvm.vm import firmware, template

RUNNING = ("running", "paused", "created", "creating")


def du(path: Path) -> int:
    """Bytes used below path (hard links counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


@dataclass
class Usage:
    kind: str
    total: int
    active: int
    size: int
    reclaimable: int


def spares() -> dict[int, int]:
    """Every fork server's waiting spares: supervisor pid -> PSS in bytes of
    it, its runner and the runner's VM (microvm/core/spare.py)."""
    found = {}
    for path in forkserver.running():
        with contextlib.suppress(OSError, ValueError, AttributeError):
            for pid in forkserver.status(path, timeout=2)["spares"].values():
                found[pid] = sum(_pss(p) for p in _tree(pid))
    return found


def _tree(pid: int) -> list[int]:
    found = [pid]
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                for child in Path(f"/proc/{pid}/task/{tid}/children").read_text().split():
                    found += _tree(int(child))
    return found


def _pss(pid: int) -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        return int(text.split("\nPss:")[1].split()[0]) * 1024
    return 0


async def _containers() -> list[tuple[detached.Meta, str]]:
    return [(c.meta, c.status) for c in await detached.list_all()]


async def df() -> list[Usage]:
    containers = await _containers()
    used = {m.image for m, _ in containers if m.image}
    all_images = store.list_images()
    layer_size = {d: du(d) for img in all_images for d in img.layer_dirs()}
    in_use = {d for img in all_images if img.ref in used for d in img.layer_dirs()}
    sizes = {m.name: du(detached.root() / m.name) for m, _ in containers}
    return [
        Usage("Images", len(all_images), sum(img.ref in used for img in all_images),
              sum(layer_size.values()),
              sum(s for d, s in layer_size.items() if d not in in_use)),
        Usage("Containers", len(containers), sum(s in RUNNING for _, s in containers),
              sum(sizes.values()),
              sum(sizes[m.name] for m, s in containers if s not in RUNNING)),
        # RAM files on tmpfs: running clones map them, yet removing one only
        # makes the next start build it again.
        Usage("Templates", len(templates := template.list_templates()), 0,
              sum(size for _, size in templates), sum(size for _, size in templates)),
        # The secure flavour's signed images, by content: made again on need.
        Usage("Secure disks", len(disks := firmware.list_disks()), 0,
              sum(size for _, size in disks), sum(size for _, size in disks)),
        # Memory, not disk: VMs restored ahead of need, made again on need.
        Usage("Spare VMs", len(held := spares()), 0, sum(held.values()), sum(held.values())),
    ]


async def prune(all_images: bool) -> tuple[list[str], int]:
    """Remove stopped containers, leftovers of interrupted writes, and with
    all_images every image no container uses; what went, and bytes freed."""
    removed: list[str] = []
    before = du(store.store_root()) + du(detached.root())
    containers = await _containers()
    for meta, status in containers:
        if status not in RUNNING:
            await detached.remove(meta.name, force=False)
            removed.append(f"container {meta.name}")
    used = {m.image for m, s in containers if s in RUNNING and m.image}
    removed += [f"image {ref}" for ref in store.prune(keep=used, images=all_images)]
    freed = before - du(store.store_root()) - du(detached.root())
    kept = sum(size for _, size in template.list_templates())
    removed += template.prune()
    freed += kept - sum(size for _, size in template.list_templates())
    freed += sum(size for _, size in firmware.list_disks())
    removed += firmware.prune_disks()
    # Its end takes its runner and VM along (PR_SET_PDEATHSIG); its server
    # makes another on the next request it would serve.
    for pid, size in spares().items():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            removed.append(f"spare VM {pid}")
            freed += size
    return removed, max(freed, 0)
