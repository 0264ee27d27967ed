"""What makes a VM restored from a template this sandbox's own.

Every clone starts as an exact copy of the template: the same CRNG state,
a clock stopped when the template was saved, the template's host name, and
no shared directory (virtio-9p cannot migrate once mounted).
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import time

from microvm import linux
from microvm.protocol import GUEST_SHARED_ROOT, SHARED_FS_TAG

# linux/random.h
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207


def reseed(entropy: bytes) -> None:
    """Credit the host's bytes to the pool and reseed the CRNG at once, so
    no two clones hand out the same random numbers (Kata does the same)."""
    fd = os.open("/dev/random", os.O_WRONLY | os.O_CLOEXEC)
    try:
        info = struct.pack("ii", len(entropy) * 8, len(entropy)) + entropy
        fcntl.ioctl(fd, RNDADDENTROPY, info)
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    finally:
        os.close(fd)


def set_clock(realtime: float) -> None:
    time.clock_settime(time.CLOCK_REALTIME, realtime)


def set_hostname(name: str) -> None:
    socket.sethostname(name)


def mount_share() -> None:
    """The sandbox's shared directory over virtio-9p (cache=mmap: programs
    and their libraries are mapped, as from any file system)."""
    os.makedirs(GUEST_SHARED_ROOT, exist_ok=True)
    # Set-id bits work in containers, as under runc (guest/init.py).
    linux.mount(SHARED_FS_TAG, GUEST_SHARED_ROOT, "9p", 0,
                "trans=virtio,version=9p2000.L,cache=mmap,msize=512000")
