"""`microvm system df` and `microvm system prune`: what kata-py keeps on disk."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

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
    return removed, max(freed, 0)
