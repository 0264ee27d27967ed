"""QEMU microvm: the command line, and the Machine that owns the process.

Modelled on QEMU's own python/qemu/machine: QMP runs over a socketpair made
before launch (no path to race for), a launch failure carries the command
line and QEMU's output, and shutdown escalates from QMP quit to SIGKILL and
always reaps.  Every QMP exchange goes through qemu.qmp.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import socket
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, QMPClient
from qemu.qmp.events import Message

from microvm.errors import VMError
from microvm.protocol import SERIAL_PORT_NAME, SHARED_FS_TAG
from microvm.vm import helpers
from microvm.vm.qemuuser import Credentials

log = logging.getLogger(__name__)

# Guest kernel arguments for every boot: console on the 8250 UART, no wait on
# panic (QEMU's -no-reboot turns the reboot into an exit).
BASE_KERNEL_PARAMS = [
    "console=ttyS0", "panic=-1", "reboot=t", "quiet", "i8042.noaux", "i8042.nokbd",
    # Becomes the agent's environment: its interpreter then needs no random
    # numbers at start-up, which before the CRNG is seeded cost a second of
    # jitter-entropy collection under TCG.  The agent hashes only what the
    # host sends, so a fixed seed gives nothing away.
    "PYTHONHASHSEED=0",
]
# Under TCG only (kernels/BOOT-TIMING.md): trust the TSC, whose rate we give
# (PIT calibration fails under TCG and leaves a 4 ms jiffies clock); skip
# LAPIC timer calibration (~0.2 s) and the uniprocessor self-patching of lock
# prefixes (~0.1 s).
TCG_KERNEL_PARAMS = ["tsc=reliable", "no_timer_check", "nolapic_timer", "noreplace-smp"]


# Part of every VM template's key: a template saved on another board layout
# cannot be restored.
MACHINE = "microvm,acpi=off,x-option-roms=off,memory-backend=mem"
# The secure flavour: OVMF needs a PC with SMM (which guards its varstore
# from the guest: Secure Boot could be turned off from inside otherwise).
SECURE_MACHINE = "q35,smm=on,vmport=off,memory-backend=mem"


def host_tsc_khz(cpuinfo: str = "/proc/cpuinfo") -> int:
    """The host's TSC rate, which a TCG guest's TSC runs at; 0 if unknown."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return int(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError, IndexError):
        pass
    return 0


@dataclass
class Nic:
    """A virtio-net device on a tap we opened (one fd per queue)."""

    mac: str
    fds: list[int]
    mtu: int = 1500


@dataclass
class Firmware:
    """The secure flavour: OVMF with Secure Boot, a varstore of the VM's own
    and a vTPM (swtpm) on the other end of tpm_fd."""

    code: str                      # OVMF_CODE (read-only)
    vars_fds: tuple[int, int]      # the VM's copy of the varstore, read-only and read-write
    tpm_fd: int                    # QEMU's end of swtpm's control channel
    esp: str                       # the boot disk: the signed unified kernel image


@dataclass
class VMSpec:
    name: str
    kernel: str
    image: str                     # initramfs (.cpio) or ext4 image (.ext4)
    memory_mib: int = 512
    vcpus: int = 1
    accel: str = "tcg"
    kernel_params: list[str] = field(default_factory=list)
    transport: str = "serial"
    qmp_fd: int = -1
    serial_fd: int = -1            # our end of the agent's virtio-serial port
    vsock_cid: int = 0
    vsock_fd: int = -1             # /dev/vhost-vsock, opened by the owner
    virtiofs_fd: int = -1          # a socket connected to virtiofsd
    tsc_khz: int = 0               # host TSC rate, given to TCG guests
    tb_mib: int = 0                # TCG translation cache (0: QEMU's default)
    sandbox: bool = True           # QEMU's seccomp filter
    # The balloon's free-page reporting.  Never for a template or its
    # clones: QEMU 7.2 answers a report on a file-backed RAM block with
    # fallocate(PUNCH_HOLE) on the file, even a private mapping's, which
    # would zero the template every other clone reads from.
    free_page_reporting: bool = True
    nics: list[Nic] = field(default_factory=list)
    netns: str = ""                # the network namespace QEMU runs in ("": ours)
    # VM templates (microvm/vm/template.py): guest RAM from this file (a
    # /proc/self/fd path) instead of a memfd, shared with the file (the
    # template writes it) or copy-on-write (a clone reads it).
    memory_file: str = ""
    memory_shared: bool = True
    incoming: bool = False         # wait for migrate-incoming (a clone)
    ninep_fd: int = -1             # a socket to virtfs-proxy-helper (9p)
    firmware: Firmware | None = None

    @property
    def block_root(self) -> bool:
        return self.image.endswith((".ext4", ".img"))


def _opt(value: str) -> str:
    """A value inside a QEMU option list, where a comma must be doubled."""
    return value.replace(",", ",,")


def kernel_cmdline(spec: VMSpec) -> str:
    """The guest kernel's command line (the secure flavour's check needs it)."""
    params = [*BASE_KERNEL_PARAMS]
    if spec.accel != "kvm":
        params += TCG_KERNEL_PARAMS
        if spec.tsc_khz:
            params.append(f"tsc_early_khz={spec.tsc_khz}")
    params.append(f"kata_py.transport={spec.transport}")
    if spec.block_root:
        params += ["root=/dev/vda", "ro", "rootfstype=ext4", "init=/init"]
    else:
        params += ["rdinit=/init"]
    return " ".join(params + spec.kernel_params)


def command_line(qemu: str, spec: VMSpec) -> list[str]:
    """The full argv for one VM; pure, so it is unit-tested."""
    mem = f"{spec.memory_mib}M"
    fw = spec.firmware
    # microvm's devices sit on virtio-mmio; q35's (the secure flavour) on PCI.
    bus = "pci" if fw else "device"
    argv = [
        qemu, "-name", spec.name,
        # No ACPI (faster boot), no option ROMs; memory from a shareable memfd
        # because vhost-user (virtiofsd) maps guest memory.  The RTC stays (the
        # kernel reads the time from it once); the guest has no driver for it
        # (kernels/kata-py.config says why).
        "-M", SECURE_MACHINE if fw else MACHINE,
        "-object", (f"memory-backend-file,id=mem,size={mem},mem-path={_opt(spec.memory_file)},"
                    f"share={'on' if spec.memory_shared else 'off'}" if spec.memory_file
                    else f"memory-backend-memfd,id=mem,size={mem},share=on"),
        "-m", mem, "-smp", str(spec.vcpus),
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        # virtiofsd refuses legacy virtio-mmio devices.
        "-global", "virtio-mmio.force-legacy=false",
    ]
    if spec.accel == "kvm":
        argv += ["-accel", "kvm", "-cpu", "host"]
    else:
        # max: x86-64-v2 and up for the containers' programs, at no boot cost.
        tcg = "tcg" + (",thread=multi" if spec.vcpus > 1 else "") + (
            f",tb-size={spec.tb_mib}" if spec.tb_mib else "")
        argv += ["-accel", tcg, "-cpu", "max"]
    if spec.sandbox:
        argv += ["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,"
                             "resourcecontrol=deny"]
    if fw:
        # OVMF's flash: the code read-only, the varstore writable only from
        # SMM (secure=on), so the guest's kernel cannot rewrite PK or db.
        argv += ["-global", "driver=cfi.pflash01,property=secure,value=on",
                 "-global", "ICH9-LPC.disable_s3=1",
                 "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={_opt(fw.code)}",
                 # An fd set: QEMU dups the fds we opened (it may not open
                 # the file, in a root-only directory, itself), picking one
                 # by access mode; it opens the image both ways.
                 "-add-fd", f"fd={fw.vars_fds[0]},set=1", "-add-fd", f"fd={fw.vars_fds[1]},set=1",
                 "-drive", "if=pflash,format=raw,unit=1,file=/dev/fdset/1",
                 "-chardev", f"socket,id=tpm,fd={fw.tpm_fd}",
                 "-tpmdev", "emulator,id=tpm0,chardev=tpm", "-device", "tpm-crb,tpmdev=tpm0"]
    # Entropy from the host: seeds the guest CRNG early, for the agent and
    # for whatever the containers need (TLS, key generation).
    argv += ["-object", "rng-random,id=rng,filename=/dev/urandom",
             "-device", f"virtio-rng-{bus},rng=rng"]
    if spec.free_page_reporting:
        # The guest hands back the pages it frees (2 MiB blocks, after ~2 s):
        # the initramfs it unpacked, a container's freed heap.
        argv += ["-device", f"virtio-balloon-{bus},free-page-reporting=on"]
    if fw:
        # Kernel, initrd and command line are all in the signed image.
        argv += ["-drive", f"if=none,id=esp,format=raw,readonly=on,file={_opt(fw.esp)}",
                 "-device", "virtio-blk-pci,drive=esp,bootindex=0"]
    else:
        argv += ["-kernel", spec.kernel]
        if spec.block_root:
            argv += ["-drive", f"if=none,id=root,file={_opt(spec.image)},format=raw,"
                               "readonly=on", "-device", f"virtio-blk-{bus},drive=root"]
        else:
            argv += ["-initrd", spec.image]
        argv += ["-append", kernel_cmdline(spec)]
    # The console goes to QEMU's stdout, which the owner points at a log file.
    argv += ["-chardev", "stdio,id=console,signal=off", "-serial", "chardev:console"]
    if spec.qmp_fd >= 0:
        argv += ["-chardev", f"socket,id=qmp,fd={spec.qmp_fd}", "-mon", "chardev=qmp,mode=control"]
    if spec.transport == "vsock":
        argv += ["-device", f"vhost-vsock-{bus},guest-cid={spec.vsock_cid}"
                            + (f",vhostfd={spec.vsock_fd}" if spec.vsock_fd >= 0 else "")]
    else:
        argv += ["-device", f"virtio-serial-{bus},max_ports=2",
                 "-chardev", f"socket,id=agent,fd={spec.serial_fd}",
                 "-device", f"virtserialport,chardev=agent,name={SERIAL_PORT_NAME}"]
    for i, nic in enumerate(spec.nics):
        # The tap is already open (the parent opened it in the sandbox's
        # network namespace); vhost-net would need /dev/vhost-net.  A
        # template's NIC has no tap: a hub port with nothing on it.
        fds = ":".join(map(str, nic.fds))
        multi = len(nic.fds) > 1
        backend = (f"tap,id=net{i},{'fds' if multi else 'fd'}={fds},vhost=off"
                   if nic.fds else f"hubport,id=net{i},hubid={i}")
        argv += ["-netdev", backend,
                 "-device", f"virtio-net-{bus},netdev=net{i},mac={nic.mac},"
                            f"host_mtu={nic.mtu}" + (",mq=on" if multi else "")]
    if spec.virtiofs_fd >= 0:
        argv += ["-chardev", f"socket,id=vfs,fd={spec.virtiofs_fd}",
                 "-device", f"vhost-user-fs-{bus},chardev=vfs,tag={SHARED_FS_TAG},"
                            "queue-size=1024"]
    if spec.ninep_fd >= 0:
        # The proxy backend: a root helper does the file operations, QEMU
        # stays unprivileged (as virtiofsd does for virtio-fs); unlike
        # vhost-user-fs, virtio-9p can migrate while the guest has not
        # mounted it, so templates use it.
        argv += ["-fsdev", f"proxy,id=fs0,sock_fd={spec.ninep_fd}",
                 "-device", f"virtio-9p-{bus},fsdev=fs0,mount_tag={SHARED_FS_TAG}"]
    if spec.incoming:
        argv += ["-incoming", "defer"]
    return argv


class _Events(EventListener):
    """A listener that keeps no history: qemu.qmp's default one grows forever."""

    async def put(self, event: Message) -> None:
        if self.accept(event):
            await self._queue.put(event)


def tail(path: Path | None, lines: int = 15) -> str:
    if path is None:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class Machine:
    """One QEMU process and its QMP connection, owned by an async context."""

    def __init__(self, qemu: str, spec: VMSpec, console_log: Path, qemu_log: Path,
                 creds: Credentials | None = None) -> None:
        self.qemu = qemu
        self.spec = spec
        self.creds = creds
        self.console_log = console_log
        self.qemu_log = qemu_log
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp = QMPClient(spec.name)
        self.argv: list[str] = []
        self.events_seen: list[str] = []  # the last 32 QMP events, by name
        self._events = _Events()
        self._event_task: asyncio.Task[None] | None = None
        self._qmp_sock: socket.socket | None = None

    async def __aenter__(self) -> Machine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    async def launch(self, extra_fds: Sequence[int] = (),
                     spawned: Callable[[subprocess.Popen[bytes]], None] | None = None) -> None:
        """spawned: called as soon as QEMU runs, before the QMP handshake,
        for a helper QEMU waits on at start-up (swtpm) and that needs its pid."""
        ours, theirs = socket.socketpair()
        self._qmp_sock = ours
        self.spec.qmp_fd = theirs.fileno()
        self.argv = command_line(self.qemu, self.spec)
        console = os.open(self.console_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                          0o600)
        errlog = os.open(self.qemu_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                         0o600)
        netns_fd = None
        try:
            if self.spec.netns:
                netns_fd = os.open(self.spec.netns, os.O_RDONLY | os.O_CLOEXEC)
            self.proc = helpers.spawn(self.argv, pass_fds=[theirs.fileno(), *extra_fds],
                                      stdout=console, stderr=errlog, netns_fd=netns_fd,
                                      creds=self.creds)
        except (OSError, subprocess.SubprocessError) as e:
            raise VMError(f"cannot run {self.qemu}: {getattr(e, 'strerror', None) or e}") \
                from None
        finally:
            os.close(console)
            os.close(errlog)
            theirs.close()
            if netns_fd is not None:
                os.close(netns_fd)
        if spawned is not None:
            try:
                spawned(self.proc)
            except BaseException:
                await self.kill()
                raise
        # Swap the history-keeping default listener for ours (qemu.qmp
        # refuses to remove whatever listener is its `events`).
        default, self.qmp.events = self.qmp.events, self._events
        self.qmp.remove_listener(default)
        self.qmp.register_listener(self._events)
        try:
            await asyncio.wait_for(self.qmp.connect(ours), 30)
        except Exception as e:
            await self.kill()
            raise self.launch_error(f"QMP handshake failed: {e}") from None
        self._event_task = asyncio.create_task(self._watch_events())

    def launch_error(self, what: str) -> VMError:
        code = self.proc.poll() if self.proc else None
        if code is not None and code < 0:
            # Killed from outside, not a start-up QEMU refused: its command
            # line would say nothing.
            return VMError(f"QEMU died (signal {-code}) while starting")
        out = tail(self.qemu_log, 10).strip()
        msg = f"QEMU failed ({what}"
        msg += f", exit status {code})" if code is not None else ")"
        msg += f"\n  command: {shlex.join(self.argv)}"
        if out:
            msg += "\n  " + out.replace("\n", "\n  ")
        return VMError(msg)

    async def _watch_events(self) -> None:
        async for event in self._events:
            name = str(event["event"])
            log.debug("qmp event %s", name)
            self.events_seen.append(name)
            del self.events_seen[:-32]

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        return await self.qmp.execute(cmd, args)

    async def query_status(self) -> str:
        status = await self.execute("query-status")
        return str(status["status"])

    async def pause(self) -> None:
        await self.execute("stop")

    async def resume(self) -> None:
        await self.execute("cont")

    async def _migrate_until_done(self, what: str) -> None:
        while True:
            info = await self.execute("query-migrate")
            status = info.get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise VMError(f"{what} failed: {info.get('error-desc', status)}")
            await asyncio.sleep(0.005)

    async def save_state(self, fd: int) -> None:
        """Stop the guest and write its device state to fd; guest RAM is
        the shared memory file, left as it is (x-ignore-shared)."""
        await self.execute("stop")
        await self.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "x-ignore-shared", "state": True}]})
        self.qmp.send_fd_scm(fd)
        await self.execute("getfd", {"fdname": "state"})
        await self.execute("migrate", {"uri": "fd:state"})
        await self._migrate_until_done("saving the template")

    async def restore_state(self, qemu_fd: int) -> None:
        """A clone (spec.incoming): load the state from QEMU's fd qemu_fd
        (inherited), then run."""
        await self.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "x-ignore-shared", "state": True}]})
        await self.execute("migrate-incoming", {"uri": f"fd:{qemu_fd}"})
        await self._migrate_until_done("restoring the template")
        await self.execute("cont")  # the template was saved stopped

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def wait(self, timeout: float | None = None) -> int | None:
        assert self.proc is not None
        return await helpers.wait(self.proc, timeout)

    async def shutdown(self, timeout: float = 3.0) -> None:
        """Ask QEMU to quit, then kill it; always reap it and close QMP."""
        try:
            if self.running:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.execute("quit"), timeout)
                if self.proc is not None and await helpers.wait(self.proc, timeout) is None:
                    log.warning("QEMU did not quit; killing it")
        finally:
            await self.kill()

    async def kill(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await helpers.wait(self.proc, None)  # reaped without holding the loop
        if self._event_task is not None:
            self._event_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._event_task
            self._event_task = None
        with contextlib.suppress(Exception):
            await self.qmp.disconnect()
        if self._qmp_sock is not None:
            self._qmp_sock.close()
            self._qmp_sock = None
