"""VM templates: a guest booted once, saved, and restored for every sandbox.

A template is a VM whose kernel has booted and whose agent is listening,
stopped and saved: its RAM is a file on tmpfs (QEMU's memory-backend-file,
share=on), its device state a small migration stream (x-ignore-shared
leaves the RAM where it is).  A clone maps the same file copy-on-write
(share=off) and loads the state with `-incoming defer`: no kernel boot, no
Python start-up, and the pages it never writes stay shared page cache.

Templates are keyed by everything that must match between a template and
its clones (QEMU, kernel, guest image, accelerator, vCPUs, memory, the
device set), kept under RUN/templates (tmpfs, root's alone), made on first
need under a lock (who finds it taken boots cold), and made again when any
input changes.  A template that is missing, truncated or does not restore
is removed; that start boots cold.

The clone's devices are the template's, since microvm has no hotplug: the
agent's virtio-serial port, virtio-rng, the balloon, virtio-9p for the
shared directory (vhost-user-fs cannot migrate; 9p can while unmounted),
and as many virtio-net devices as the sandbox has interfaces (the template's
sit on a QEMU hub port; a clone's on its taps).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from microvm import paths
from microvm.protocol import PROTOCOL_VERSION

if TYPE_CHECKING:
    from microvm.config import Config
    from microvm.vm.qemuuser import Credentials

log = logging.getLogger(__name__)

# The guest kernel's own switch: no virtio-fs, and 9p mounted only later.
KERNEL_PARAM = "kata_py.share=9p"
# Templates and clones have no balloon: its free-page reports would make a
# clone's QEMU punch holes in the RAM file all clones map (VMSpec).
FREE_PAGE_REPORTING = False
# Template NICs' MACs; a clone's guest takes its own (guest/network.py).
TEMPLATE_MAC = "02:6b:70:00:00:{:02x}"


def root() -> Path:
    """RUN/templates: tmpfs (RAM files must not hit a disk), root's alone."""
    d = paths.RUN / "templates"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    d.chmod(0o700)
    return d


def _file_id(path: str) -> str:
    st = os.stat(path)
    # Replaced files (setup renames new builds into place) get new inodes.
    return f"{os.path.realpath(path)}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def _inputs(cfg: Config) -> list[str]:
    return [shutil.which(cfg.qemu) or cfg.qemu, cfg.kernel, cfg.guest_image]


def _stale(inputs: dict[str, str]) -> bool:
    """Whether a file a template was made from has been replaced since."""
    for path, made_from in inputs.items():
        try:
            if _file_id(path) != made_from:
                return True
        except OSError:
            return True
    return False


def sweep() -> list[str]:
    """Remove the templates whose QEMU, kernel or image was replaced: no
    start can use them again (a running clone keeps its mapping)."""
    removed = []
    for d in sorted(root().iterdir()):
        try:
            inputs = json.loads((d / "meta.json").read_text()).get("inputs", {})
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(inputs, dict) and _stale(inputs):
            with build_lock(d.name) as mine:
                if mine:
                    shutil.rmtree(d, ignore_errors=True)
                    (root() / f"{d.name}.lock").unlink(missing_ok=True)
                    removed.append(d.name)
    return removed


def key(cfg: Config, accel: str, nics: int, tsc_khz: int) -> str:
    """What a template and its clones must share, as one short digest."""
    from microvm.vm.qemu import MACHINE
    parts = [f"protocol {PROTOCOL_VERSION}", MACHINE, *map(_file_id, _inputs(cfg)),
             accel, str(cfg.vcpus), str(cfg.memory_mib),
             f"nics {nics}", cfg.transport, cfg.guest_kernel_params(), str(tsc_khz),
             f"free-page reporting {FREE_PAGE_REPORTING}"]
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:20]


def usable(cfg: Config, transport: str, nics: int) -> str:
    """Why a sandbox cannot be a clone here ("" if it can)."""
    if not cfg.template:
        return "template: false"
    if cfg.firmware == "secure":
        # Each VM's boot is measured into a vTPM of its own; a clone would
        # carry its template's PCRs, not a boot of its own (docs/secure-boot.md).
        return "the secure flavour (each VM measures its own boot)"
    if transport != "serial":
        return "the vsock transport (vhost-vsock cannot migrate)"
    if nics and cfg.vcpus > 1:
        return "multi-queue taps (more than one vCPU with a network)"
    if not os.access(PROXY_HELPER, os.X_OK):
        return f"{PROXY_HELPER} missing (apt-get install qemu-system-x86)"
    return ""


PROXY_HELPER = "/usr/lib/qemu/virtfs-proxy-helper"


@dataclass(frozen=True)
class Template:
    dir: Path
    next_stream_id: int     # the agent's ttrpc stream ids go on from there

    @property
    def mem(self) -> Path:
        return self.dir / "mem"

    @property
    def state(self) -> Path:
        return self.dir / "state"

    def discard(self, why: str) -> None:
        log.debug("template %s discarded: %s", self.dir.name, why)
        shutil.rmtree(self.dir, ignore_errors=True)


def find(k: str, memory_mib: int) -> Template | None:
    """The template for key k if it is whole; a broken one is removed."""
    d = root() / k
    try:
        meta = json.loads((d / "meta.json").read_text())
        ok = (meta.get("key") == k and (d / "state").stat().st_size > 0
              and (d / "mem").stat().st_size == memory_mib << 20
              and isinstance(meta.get("next_stream_id"), int))
    except (OSError, ValueError, AttributeError):
        ok = False
        meta = {}
    if ok:
        return Template(d, meta["next_stream_id"])
    if d.exists():
        Template(d, 0).discard("incomplete or stale")
    return None


@contextlib.contextmanager
def build_lock(k: str) -> Iterator[bool]:
    """Yields True to the one process that may build template k now."""
    fd = os.open(root() / f"{k}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def staging(k: str) -> Path:
    """A fresh build directory (a killed build's is removed first)."""
    d = root() / f".build-{k}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(mode=0o700)
    return d


def memory_file(path: Path, memory_mib: int) -> int:
    """The template's RAM file, opened; QEMU reopens it through
    /proc/self/fd (its uid is not root's: the file is 0666, in a directory
    only root may enter, so only fds the owner passes reach it)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o666)
    os.ftruncate(fd, memory_mib << 20)
    return fd


def commit(build: Path, k: str, next_stream_id: int, cfg: Config) -> None:
    """Put a built template in place, and sweep away those made from files
    that have been replaced since (each setup that installs a new kernel or
    image would otherwise leave one more RAM file on tmpfs)."""
    (build / "meta.json").write_text(json.dumps(
        {"key": k, "next_stream_id": next_stream_id, "created": time.time(),
         "inputs": {path: _file_id(path) for path in _inputs(cfg)}}))
    dest = root() / k
    shutil.rmtree(dest, ignore_errors=True)
    build.rename(dest)
    for gone in sweep():
        log.debug("template %s removed: made from files since replaced", gone)


def entropy() -> bytes:
    """Seed for a clone's CRNG (Kata sends 512 bytes too)."""
    return os.urandom(512)


def list_templates() -> list[tuple[str, int]]:
    """(key, bytes of RAM the file holds) for `system df`."""
    d = paths.RUN / "templates"
    if not d.is_dir():
        return []
    out = []
    for t in sorted(d.iterdir()):
        if t.is_dir() and not t.name.startswith("."):
            size = sum(f.stat().st_blocks * 512 for f in t.iterdir() if f.is_file())
            out.append((t.name, size))
    return out


def prune() -> list[str]:
    """Remove every template (and a killed build's leftovers), unless one is
    being built right now."""
    d = paths.RUN / "templates"
    if not d.is_dir():
        return []
    removed = []
    for t in sorted(d.iterdir()):
        k = t.name.removeprefix(".build-").removesuffix(".lock")
        with build_lock(k) as mine:
            if not mine:
                continue
            if t.is_dir():
                shutil.rmtree(t, ignore_errors=True)
                if not t.name.startswith("."):
                    removed.append(f"template {t.name}")
            else:
                t.unlink(missing_ok=True)
    return removed


def check(cfg: Config, transport: str) -> tuple[bool | None, str]:
    """For `microvm check`."""
    why = usable(cfg, transport, 0)
    if why:
        return None, f"cold boots only: {why}"
    return True, f"sandboxes start as clones of a booted VM ({len(list_templates())} kept)"


async def build(cfg: Config, accel: str, k: str, nics: int, creds: Credentials | None,
                log_dir: Path) -> Template | None:
    """Boot template k, wait for its agent, save it.  None if another
    process is building it now (the caller boots cold meanwhile)."""
    from microvm.protocol import agent_pb2
    from microvm.vm.agent_client import AgentClient
    from microvm.vm.ninep import ProxyHelper
    from microvm.vm.qemu import Machine, Nic, VMSpec, host_tsc_khz

    with build_lock(k) as mine:
        if not mine:
            return None
        found = find(k, cfg.memory_mib)  # made while we waited for the lock
        if found is not None:
            return found
        t0 = time.monotonic()
        build_dir = staging(k)
        (build_dir / "empty").mkdir()
        mem = memory_file(build_dir / "mem", cfg.memory_mib)
        helper = ProxyHelper(build_dir / "empty", log_dir / "template-9p.log")
        serial_ours, serial_theirs = socket.socketpair()
        machine = None
        ninep = None
        try:
            ninep = helper.start()
            spec = VMSpec(
                name=f"kata-py-template-{k[:8]}", kernel=cfg.kernel, image=cfg.guest_image,
                memory_mib=cfg.memory_mib, vcpus=cfg.vcpus, accel=accel,
                kernel_params=[*cfg.guest_kernel_params(), KERNEL_PARAM],
                transport="serial", serial_fd=serial_theirs.fileno(),
                tsc_khz=host_tsc_khz() if accel == "tcg" else 0, tb_mib=cfg.tcg_tb_mib,
                memory_file=f"/proc/self/fd/{mem}", memory_shared=True,
                ninep_fd=ninep.fileno(), free_page_reporting=FREE_PAGE_REPORTING,
                nics=[Nic(TEMPLATE_MAC.format(i), []) for i in range(nics)])
            machine = Machine(cfg.qemu, spec, log_dir / "template-console.log",
                              log_dir / "template-qemu.log", creds)
            await machine.launch([mem, ninep.fileno(), serial_theirs.fileno()])
            serial_theirs.close()
            agent = await AgentClient.over_socket(serial_ours)
            try:
                await asyncio.wait_for(agent.call(
                    "GetGuestDetails", agent_pb2.GuestDetailsRequest()), cfg.boot_timeout)
                state = os.open(build_dir / "state", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC,
                                0o600)
                try:
                    await machine.save_state(state)
                finally:
                    os.close(state)
                next_stream = agent.next_stream
            finally:
                await agent.aclose()
        except Exception as e:  # noqa: BLE001 - a failed build only costs a cold boot
            log.debug("template %s not made: %s", k, e)
            shutil.rmtree(build_dir, ignore_errors=True)
            return None
        finally:
            os.close(mem)
            if ninep is not None:
                ninep.close()
            serial_theirs.close()
            serial_ours.close()
            if machine is not None:
                await machine.shutdown()
            await helper.stop()
        shutil.rmtree(build_dir / "empty", ignore_errors=True)
        commit(build_dir, k, next_stream, cfg)
        log.debug("template %s made in %.2fs", k, time.monotonic() - t0)
        return find(k, cfg.memory_mib)



def warm() -> list[str]:
    """Make the default configuration's templates (no network, and one
    interface), so that no user's first start pays for it: scripts/setup."""
    import tempfile

    from microvm import config
    from microvm.vm import accel as accel_mod
    from microvm.vm import qemuuser
    from microvm.vm.qemu import host_tsc_khz

    cfg = config.load()
    choice = accel_mod.choose(cfg.accel)
    transport = "vsock" if cfg.transport == "vsock" else "serial"
    made = []
    with tempfile.TemporaryDirectory(prefix="kata-py-warm-") as logs:
        for nics in (0, 1):
            if usable(cfg, transport, nics):
                continue
            tsc = host_tsc_khz() if choice.accel == "tcg" else 0
            k = key(cfg, choice.accel, nics, tsc)
            if find(k, cfg.memory_mib) is None:
                creds = qemuuser.resolve(cfg.qemu_user, choice.accel)
                if asyncio.run(build(cfg, choice.accel, k, nics, creds, Path(logs))) is None:
                    # Starts still work, cold; a run with --debug says why.
                    print(f"warning: VM template {k} could not be made", file=sys.stderr)
                    continue
            made.append(k)
    return made
