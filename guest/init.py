"""The guest's pid 1: mount the basics, open the host channel, run the agent.

The kernel command line carries our settings:
  kata_py.transport=serial|vsock   how the host reaches the agent
  kata_py.debug=1                  agent log on the console
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import sys
import time
import traceback

from guest import agent, cgroups, container, network
from microvm import linux
from microvm.protocol import SERIAL_PORT_NAME, SHARED_FS_TAG, VSOCK_PORT

log = logging.getLogger("agent")


def cmdline() -> dict[str, str]:
    with open("/proc/cmdline") as f:
        words = f.read().split()
    return dict(w.split("=", 1) for w in words if w.startswith("kata_py.") and "=" in w)


def mount_basics() -> None:
    nosuid = linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC
    linux.mount("proc", "/proc", "proc", nosuid)
    linux.mount("sysfs", "/sys", "sysfs", nosuid)
    try:
        linux.mount("devtmpfs", "/dev", "devtmpfs", linux.MS_NOSUID, "mode=0755")
    except OSError as e:
        # On a block-device root the kernel mounted it already (DEVTMPFS_MOUNT).
        if e.errno != errno.EBUSY:
            raise
    os.makedirs("/dev/pts", exist_ok=True)
    linux.mount("devpts", "/dev/pts", "devpts", linux.MS_NOSUID | linux.MS_NOEXEC,
                "ptmxmode=0666,mode=0620,gid=5")
    linux.mount("tmpfs", "/run", "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=0755")
    linux.mount("tmpfs", "/tmp", "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=1777")
    os.makedirs("/sys/fs/cgroup", exist_ok=True)
    # favordynmods: moving a process into a container's cgroup then takes no
    # RCU grace period (12-20 ms each create and exec under TCG); fork and
    # exit pay a little for it, which one guest's few processes do not feel.
    linux.mount("cgroup2", "/sys/fs/cgroup", "cgroup2", nosuid, "favordynmods")


def make_root_pivotable() -> None:
    """Move / onto a bind mount of itself, as switch_root does.

    pivot_root(2) refuses when the caller's root is the initramfs rootfs
    (it has no parent mount), and a mount stacked on / is not entered by
    chdir("/").  So: bind the rootfs (with proc, sys, dev under it) onto a
    directory, move that mount onto /, and chroot into it.  Containers
    forked afterwards have an ordinary mount as root and can pivot away.
    A block-device root needs none of this.
    """
    with open("/proc/self/mounts") as f:
        root_types = [line.split()[2] for line in f if line.split()[1] == "/"]
    if root_types[-1:] != ["rootfs"]:
        return
    os.mkdir("/.root")
    linux.mount("/", "/.root", None, linux.MS_BIND | linux.MS_REC)
    os.chdir("/.root")
    linux.mount(".", "/", None, linux.MS_MOVE)
    os.chroot(".")
    os.chdir("/")


def mount_shared(settings: dict[str, str]) -> None:
    os.makedirs(container.SHARED_ROOT, exist_ok=True)
    if settings.get("kata_py.share") == "9p":
        return  # a template: its clones mount it (AdoptSandbox); it must not
    try:
        # Set-id bits work in containers, as under runc: the guest is the
        # boundary, and the host's copies are out of other users' reach.
        linux.mount(SHARED_FS_TAG, container.SHARED_ROOT, "virtiofs", 0)
    except OSError as e:
        # A VM without a shared directory (the boot floor) still serves.
        log.warning("no shared directory: %s", e)


def find_serial_port() -> str:
    base = "/sys/class/virtio-ports"
    for port in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        with open(f"{base}/{port}/name") as f:
            if f.read().strip() == SERIAL_PORT_NAME:
                return f"/dev/{port}"
    raise RuntimeError(f"virtio-serial port {SERIAL_PORT_NAME} not found")


async def open_serial(loop: asyncio.AbstractEventLoop
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    fd = os.open(find_serial_port(), os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    reader = asyncio.StreamReader(limit=1 << 22)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                 os.fdopen(fd, "rb", buffering=0))
    transport, protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, os.fdopen(os.dup(fd), "wb", buffering=0))
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    return reader, writer


async def main_async(started: float, settings: dict[str, str]) -> None:
    loop = asyncio.get_running_loop()
    ag = agent.Agent(started)
    transport = settings.get("kata_py.transport", "serial")
    if transport == "vsock":
        srv = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        srv.bind((socket.VMADDR_CID_ANY, VSOCK_PORT))
        srv.listen(4)
        srv.setblocking(False)
        # The host may reconnect (a restarted shim); serve one at a time.
        while True:
            conn, _ = await loop.sock_accept(srv)
            reader, writer = await asyncio.open_connection(sock=conn, limit=1 << 22)
            await agent.serve(ag, reader, writer)
    reader, writer = await open_serial(loop)
    await agent.serve(ag, reader, writer)
    log.warning("host channel closed")


def main(started: float | None = None) -> None:
    """started: when /init's interpreter began (CLOCK_BOOTTIME), for the host's timings."""
    if started is None:
        started = time.clock_gettime(time.CLOCK_BOOTTIME)
    try:
        mount_basics()
        settings = cmdline()
        logging.basicConfig(
            stream=sys.stderr, format="kata-py-agent: %(levelname)s %(message)s",
            level=logging.DEBUG if settings.get("kata_py.debug") == "1" else logging.WARNING)
        make_root_pivotable()
        mount_shared(settings)
        network.loopback_up()  # every container has localhost, networked or not
        cgroups.setup()
        asyncio.run(main_async(started, settings))
    except BaseException:
        traceback.print_exc()
    # pid 1 must never exit: end the VM instead.
    agent.power_off()
