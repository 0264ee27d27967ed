"""The core: one sandbox = one VM, its helpers, its agent and its containers.

Both front ends (the CLI, the containerd shim) drive a Sandbox.  One
AsyncExitStack owns every helper and mount it creates, in reverse order of
creation, so an error at any step of start-up unwinds exactly what was done.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from google.protobuf.message import Message

from microvm import linux
from microvm.config import Config
from microvm.core import rootmount
from microvm.core.volumes import Volume
from microvm.errors import KataError, VMError, from_rpc
from microvm.net import ports
from microvm.net.network import NetworkSpec, etc_files, write_etc
from microvm.protocol import GUEST_BUSYBOX, PROTOCOL_VERSION, agent_pb2, ttrpc
from microvm.vm import accel as accel_mod
from microvm.vm import helpers, qemuuser
from microvm.vm.agent_client import AgentClient
from microvm.vm.ninep import ProxyHelper
from microvm.vm.qemu import Machine, Nic, VMSpec, host_tsc_khz, kernel_cmdline, tail
from microvm.vm.virtiofsd import Virtiofsd

if TYPE_CHECKING:  # pyroute2 costs ~75 ms to import: only networked sandboxes pay it
    from microvm.core.console import ConsoleServer
    from microvm.core.secureboot import SecureBoot
    from microvm.net import bridge, tcfilter
    from microvm.net.portforward import PortForward

log = logging.getLogger(__name__)

# How long a helper that left cleanly waits for QEMU to be named instead.
HELPER_GRACE = 1.0


def vhost_vsock_usable() -> bool:
    return os.access("/dev/vhost-vsock", os.R_OK | os.W_OK)


def choose_transport(requested: str) -> str:
    if requested == "auto":
        return "vsock" if vhost_vsock_usable() else "serial"
    if requested == "vsock" and not vhost_vsock_usable():
        raise KataError("transport vsock requested but /dev/vhost-vsock is not usable")
    return requested


@dataclass
class ContainerState:
    id: str
    rootfs_mount: Path
    pid: int = 0
    volume_mounts: list[Path] = field(default_factory=list)


@dataclass
class Timings:
    """Host-side milestones (monotonic seconds) and the guest's own."""

    start: float = 0.0
    launched: float = 0.0
    ready: float = 0.0
    guest: dict[str, float] = field(default_factory=dict)


class Sandbox:
    def __init__(self, config: Config, sandbox_id: str, run_dir: Path,
                 accel: accel_mod.Choice, network: NetworkSpec | None = None,
                 spare_taps: tcfilter.SpareTaps | None = None) -> None:
        """network: none (loopback only), bridge (the CLI's own network and
        published ports), or ns (a prepared namespace whose veths the guest
        takes over: tcfilter).  spare_taps: a spare's (microvm/core/spare.py)
        NICs, whose network comes later (join_network)."""
        self.config = config
        self.net_spec = network or NetworkSpec()
        self.network: tcfilter.Network | None = None
        self.spare_taps = spare_taps
        self.port_forward: PortForward | None = None
        self.bridge: bridge.Attachment | None = None
        self.proxy: ports.Proxy | None = None
        self.id = sandbox_id
        self.dir = run_dir / sandbox_id
        self.accel = accel
        self.transport = choose_transport(config.transport)
        self.shared = self.dir / "shared"
        self.log_dir = Path(config.log_dir) / sandbox_id if config.log_dir else self.dir
        self.machine: Machine | None = None
        self.agent: AgentClient | None = None
        self.details: agent_pb2.GuestDetails | None = None
        self.creds: qemuuser.Credentials | None = None
        self.containers: dict[str, ContainerState] = {}
        self.timings = Timings()
        self.boot = ""  # "clone" or "cold", once started
        self.secure: SecureBoot | None = None  # the secure flavour's firmware and vTPM
        self.console: ConsoleServer | None = None
        # The host processes that are this sandbox, by role ("QEMU", "virtiofsd", ...).
        self.processes: dict[str, int] = {}
        # Why the VM is gone, once a watcher saw QEMU or a helper end.
        self.death = ""
        self._stopping = False
        self._stack = contextlib.AsyncExitStack()

    @property
    def console_log(self) -> Path:
        return self.log_dir / "console.log"

    async def __aenter__(self) -> Sandbox:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- start-up --------------------------------------------------------

    async def start(self) -> None:
        """Boot the VM; a failure at any step unwinds what was done."""
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise

    async def _start(self) -> None:
        self.timings.start = time.monotonic()
        for path in (self.config.kernel, self.config.guest_image):
            if not os.path.isfile(path):
                raise KataError(f"{path} not found: build it with scripts/quickstart "
                                "(or set kernel/guest_image in the config)")
        self.dir.mkdir(mode=0o700)
        self._stack.callback(shutil.rmtree, self.dir, True)
        self.log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.shared.mkdir()
        # A mount point of its own, shared, so mounts added later (more
        # containers) propagate into virtiofsd's slave copy.
        linux.mount(str(self.shared), str(self.shared), None, linux.MS_BIND)
        self._stack.callback(_umount, self.shared)
        linux.mount(None, str(self.shared), None, linux.MS_SHARED)
        self.creds = qemuuser.resolve(self.config.qemu_user, self.accel.accel)

        spec = VMSpec(
            name=f"kata-py-{self.id[:12]}", kernel=self.config.kernel,
            image=self.config.guest_image, memory_mib=self.config.memory_mib,
            vcpus=self.config.vcpus, accel=self.accel.accel,
            kernel_params=self.config.guest_kernel_params(),
            transport=self.transport,
            tsc_khz=host_tsc_khz() if self.accel.accel == "tcg" else 0,
            tb_mib=self.config.tcg_tb_mib)
        if self.config.firmware == "secure":
            from microvm.core.secureboot import SecureBoot
            self.secure = SecureBoot(self.dir, self.log_dir, self.config.vcpus)
            self.secure.check_installed()  # before the network is made
        netns = await self._network_namespace()
        if self.spare_taps is not None:
            from microvm.vm.template import TEMPLATE_MAC
            self._stack.callback(self.spare_taps.close)  # if never joined
            # The template's MACs and MTU: the guest takes the pod's own later.
            for n, (_, fds) in enumerate(self.spare_taps.taps):
                spec.nics.append(Nic(TEMPLATE_MAC.format(n), list(fds)))
            spec.netns = self.spare_taps.path  # QEMU in a namespace of no use to it
        elif netns:
            await self._plumb(netns)
            assert self.network is not None
            for itf in self.network.interfaces:
                spec.nics.append(Nic(itf.mac, list(itf.tap_fds), itf.mtu))
            spec.netns = netns
        if netns and self.bridge is None:  # a pod's namespace: kubelet's port-forward
            self._forward_ports(netns)
        try:
            booted = await self._boot_from_template(spec)
            if not booted:
                await self._boot_cold(spec)
            self.boot = "clone" if booted else "cold"
        finally:
            if self.network is not None:
                self.network.close_fds()  # QEMU holds the taps now
            if self.spare_taps is not None:
                self.spare_taps.close_fds()
        assert self.agent is not None and self.details is not None
        await self._guest_network()
        if self.proxy is not None and self.bridge is not None:
            await self.proxy.start(self.bridge.ip)
        if self.config.debug_console:
            from microvm.core.console import ConsoleServer
            self.console = ConsoleServer(self)
            await self.console.start()
            self._stack.push_async_callback(self.console.close)
        self.timings.ready = time.monotonic()
        self.timings.guest = {"agent_started": self.details.agent_started,
                              "agent_ready": self.details.agent_ready}
        log.debug("sandbox %s ready in %.2fs", self.id, self.timings.ready - self.timings.start)

    async def _plumb(self, netns: str, spare: tcfilter.SpareTaps | None = None) -> None:
        from microvm.net import tcfilter
        # Undone after QEMU is gone (the exit stack runs in reverse).
        self.network = await asyncio.to_thread(tcfilter.plumb, netns, self.config.vcpus, spare)
        # Off the loop (netlink, thread joins): it serves other containers.
        self._stack.push_async_callback(asyncio.to_thread, tcfilter.teardown, self.network)

    def _forward_ports(self, netns: str) -> None:
        from microvm.net.portforward import PortForward
        self.port_forward = PortForward(self, netns)
        self._stack.push_async_callback(self.port_forward.close)
        self.port_forward.begin()  # while the VM boots

    async def join_network(self, net: NetworkSpec) -> None:
        """A spare's VM, started with taps of its own: a pod's namespace (ns)
        for them, as _start would have plumbed and configured it."""
        taps, self.spare_taps = self.spare_taps, None
        assert taps is not None and net.mode == "ns"
        self.net_spec = net
        try:
            netns = await self._network_namespace()
            if netns is None:
                raise KataError("the spare VM's NICs need a network namespace")
            await self._plumb(netns, taps)
        finally:
            taps.close()
        assert self.network is not None
        if any(itf.mtu > Nic.mtu for itf in self.network.interfaces):
            raise KataError("the pod's MTU is over the spare VM's NICs'")
        self._forward_ports(netns)
        await self._guest_network()

    async def _guest_network(self) -> None:
        """The guest's NICs configured as plumbing found the namespace's
        veths, and kubelet's port-forward (if any) ready."""
        if self.network is not None and self.network.interfaces:
            deadline = asyncio.get_running_loop().time() + self.config.boot_timeout
            t0 = time.monotonic()
            await self._race(self._configure_network(self.network), deadline)
            log.debug("guest network configured in %.3fs", time.monotonic() - t0)
        if self.port_forward is not None:
            await self.port_forward.ready()

    async def _launch(self, spec: VMSpec, stack: contextlib.AsyncExitStack,
                      passed: list[int],
                      spawned: Callable[[subprocess.Popen[bytes]], None] | None = None,
                      ) -> socket.socket | None:
        """QEMU with the fds in passed (closed here once QEMU has its
        copies) and the agent's channel; returns our end of the serial port."""
        extra_fds = [*passed, *(fd for nic in spec.nics for fd in nic.fds)]
        serial_ours = serial_theirs = None
        try:
            if self.transport == "serial":
                serial_ours, serial_theirs = socket.socketpair()
                spec.serial_fd = serial_theirs.fileno()
                extra_fds.append(serial_theirs.fileno())
            else:
                spec.vsock_cid = random.randint(3, 0xFFFFFFFE)
                try:
                    spec.vsock_fd = os.open("/dev/vhost-vsock", os.O_RDWR | os.O_CLOEXEC)
                except OSError as e:
                    raise VMError(f"cannot open /dev/vhost-vsock: {e.strerror} "
                                  "(modprobe vhost_vsock, or transport: serial)") from None
                passed.append(spec.vsock_fd)
                extra_fds.append(spec.vsock_fd)
            machine = Machine(self.config.qemu, spec, self.console_log,
                              self.log_dir / "qemu.log", self.creds)
            self.machine = machine
            stack.push_async_callback(machine.shutdown)
            try:
                await machine.launch(extra_fds, spawned)
            except VMError:
                await asyncio.sleep(0)  # a helper's watcher may know better
                if self.death:
                    raise VMError(self.death) from None
                raise
            assert machine.proc is not None
            self._watch_process(machine.proc, "QEMU", stack)
        except BaseException:
            if serial_ours is not None:
                serial_ours.close()
            raise
        finally:
            while passed:
                os.close(passed.pop())
            if serial_theirs is not None:
                serial_theirs.close()
        self.timings.launched = time.monotonic()
        return serial_ours

    def _watch_process(self, proc: subprocess.Popen[bytes], name: str,
                       stack: contextlib.AsyncExitStack) -> None:
        """QEMU's or a helper's end is this sandbox's: seen at once (a pidfd),
        it kills QEMU, so every call waiting on the agent fails with it."""
        def ended(waited: bool = False) -> None:
            qemu = self.machine.proc if self.machine is not None else None
            if name != "QEMU" and qemu is not None and qemu.poll() is not None:
                proc_, name_ = qemu, "QEMU"  # a helper ends when QEMU does
            elif name != "QEMU" and qemu is not None and proc.poll() == 0 and not waited:
                # A helper leaves cleanly when QEMU closes its socket, which
                # the kernel does before QEMU can be reaped (seen in CI): give
                # QEMU's own watcher a second to name the real cause.
                later = asyncio.get_running_loop().call_later(HELPER_GRACE, ended, True)
                stack.callback(later.cancel)
                return
            else:
                proc_, name_ = proc, name
            if name_ == "QEMU" and proc_.poll() == 0:
                self._died("the VM exited")
            else:
                self._died(f"{name_} {helpers.describe_exit(proc_)}")
        stack.callback(helpers.on_exit(proc, ended))
        self.processes[name] = proc.pid
        stack.callback(self.processes.pop, name, None)

    def _died(self, reason: str) -> None:
        if self._stopping or self.death:
            return
        # A panic is the guest kernel's doing: its own words say more.
        self.death = panic_message(self.console_log) or reason
        log.debug("sandbox %s: %s", self.id, self.death)
        if self.machine is not None and self.machine.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.machine.proc.kill()

    async def _gone(self) -> str:
        """Why the agent's channel closed: what the watchers saw, once QEMU
        has ended (it does within a second of its channel closing)."""
        await self._settle(1.0)
        return self.death or self._with_console("lost the connection to the agent")

    async def _settle(self, timeout: float) -> None:
        """Wait for QEMU's end, and have self.death say why it ended even
        when its pidfd's callback has not run yet (a race seen in CI)."""
        if self.death or self.machine is None or self.machine.proc is None:
            return
        await self.machine.wait(timeout)
        await asyncio.sleep(0)  # the watchers' callbacks run
        proc = self.machine.proc
        if not self.death and proc.poll() not in (None, 0):
            self._died(f"QEMU {helpers.describe_exit(proc)}")

    async def _connect(self, serial_ours: socket.socket | None, spec: VMSpec,
                       stack: contextlib.AsyncExitStack, first_stream: int = 1) -> None:
        deadline = asyncio.get_running_loop().time() + self.config.boot_timeout
        if serial_ours is not None:
            self.agent = await AgentClient.over_socket(serial_ours, first_stream)
        else:
            self.agent = await self._race(AgentClient.over_vsock(spec.vsock_cid, deadline),
                                          deadline)
        stack.push_async_callback(self.agent.aclose)

    async def _boot_cold(self, spec: VMSpec) -> None:
        """Boot the guest kernel and the agent, sharing over virtio-fs."""
        vfs = Virtiofsd(self.config.virtiofsd, self.shared, self.dir / "vfs.sock",
                        self.log_dir / "virtiofsd.log", self.config.log_level == "debug")
        vfs_qemu_end = vfs.start()
        self._stack.push_async_callback(vfs.stop)
        assert vfs.proc is not None
        self._watch_process(vfs.proc, "virtiofsd", self._stack)
        spec.virtiofs_fd = vfs_qemu_end.detach()
        passed = [spec.virtiofs_fd]
        spawned = None
        if self.secure is not None:
            secure = self.secure
            self._stack.push_async_callback(secure.stop)
            spec.firmware = secure.firmware(spec.image, kernel_cmdline(spec))
            passed += [*spec.firmware.vars_fds, spec.firmware.tpm_fd]
            creds = self.creds

            def spawned(qemu: subprocess.Popen[bytes]) -> None:
                secure.start_tpm(qemu, creds)
                assert secure.tpm.proc is not None
                self._watch_process(secure.tpm.proc, "swtpm", self._stack)
        serial = await self._launch(spec, self._stack, passed, spawned)
        watch = None
        if self.secure is not None:
            watch = asyncio.create_task(self._watch_firmware())
        try:
            await self._connect(serial, spec, self._stack)
            if self.secure is not None:
                await self._attest()  # the agent's first answer
        finally:
            if watch is not None:
                watch.cancel()
        await self._adopt(mount_share=False)

    async def _watch_firmware(self) -> None:
        """OVMF does not exit when Secure Boot refuses the image: it waits
        at its boot menu.  Its console says so; that ends the boot at once."""
        from microvm.core.secureboot import refusal
        while True:
            await asyncio.sleep(0.25)
            with contextlib.suppress(OSError):
                why = refusal(tail(self.console_log, 20))
                if why:
                    self._died(why)
                    return

    async def _attest(self) -> None:
        """The secure flavour: the vTPM's PCRs, read before anything else
        runs in the guest, against the host's values; a mismatch ends here."""
        assert self.agent is not None and self.secure is not None
        report = await self._race(self.agent.call("GetMeasurements", agent_pb2.Empty()),
                                  asyncio.get_running_loop().time() + self.config.boot_timeout)
        self.secure.check(report)

    async def _adopt(self, mount_share: bool) -> None:
        """Make the guest this sandbox's own before any container starts:
        fresh randomness, the host's clock and the VM's own host name (a
        clone's are the template's), and for a clone its share.  The answer
        is the guest's details, whose protocol must be ours."""
        from microvm.vm import template
        assert self.agent is not None
        deadline = asyncio.get_running_loop().time() + self.config.boot_timeout
        try:
            self.details = await self._race(self.agent.call("AdoptSandbox", agent_pb2.AdoptRequest(
                entropy=template.entropy(), realtime=time.time(), hostname=self.id[:12],
                mount_share=mount_share)), deadline)
        except ttrpc.RpcError:
            await self._check_protocol(None, deadline)  # an older agent's error says less
            raise
        await self._check_protocol(self.details, deadline)

    async def _check_protocol(self, details: agent_pb2.GuestDetails | None,
                              deadline: float) -> None:
        if details is None or not details.protocol_version:
            # Agents before protocol 12 answer AdoptSandbox with nothing.
            assert self.agent is not None
            details = await self._race(
                self.agent.call("GetGuestDetails", agent_pb2.GuestDetailsRequest()), deadline)
        if details.protocol_version != PROTOCOL_VERSION:
            raise VMError(f"guest agent speaks protocol {details.protocol_version}, "
                          f"this host {PROTOCOL_VERSION}: rebuild the guest image")

    async def _boot_from_template(self, spec: VMSpec) -> bool:
        """Restore a clone of this configuration's template (made now if
        there is none): False, with a debug line, where none can serve."""
        from microvm.vm import template
        nics = len(spec.nics)
        why = template.usable(self.config, self.transport, nics)
        tmpl = None
        if not why:
            k = template.key(self.config, self.accel.accel, nics, spec.tsc_khz)
            tmpl = template.find(k, self.config.memory_mib)
            if tmpl is None:
                tmpl = await template.build(self.config, self.accel.accel, k, nics, self.creds,
                                            self.log_dir)
                why = "" if tmpl else "no template (another start is making it, or it failed)"
        if tmpl is None:
            log.debug("sandbox %s boots cold: %s", self.id, why)
            return False
        stack = contextlib.AsyncExitStack()
        passed: list[int] = []  # QEMU's fds: _launch closes them, or the except below
        try:
            helper = ProxyHelper(self.shared, self.log_dir / "9p.log")
            qemu_end = helper.start()
            stack.push_async_callback(helper.stop)
            assert helper.proc is not None
            self._watch_process(helper.proc, "virtfs-proxy-helper", stack)
            passed.append(qemu_end.detach())
            passed.append(mem := os.open(tmpl.mem, os.O_RDONLY | os.O_CLOEXEC))
            passed.append(state := os.open(tmpl.state, os.O_RDONLY | os.O_CLOEXEC))
            clone = dataclasses.replace(
                spec, memory_file=f"/proc/self/fd/{mem}", memory_shared=False, incoming=True,
                ninep_fd=passed[0], kernel_params=[*spec.kernel_params, template.KERNEL_PARAM],
                free_page_reporting=template.FREE_PAGE_REPORTING)
            serial = await self._launch(clone, stack, passed)
            assert self.machine is not None
            await asyncio.wait_for(self.machine.restore_state(state), self.config.boot_timeout)
            log.debug("sandbox %s: clone restored", self.id)
            await self._connect(serial, clone, stack, tmpl.next_stream_id)
            await self._adopt(mount_share=True)
            log.debug("sandbox %s: clone adopted (entropy, clock, name, share)", self.id)
        except Exception as e:  # noqa: BLE001 - any failure: this start boots cold
            while passed:
                os.close(passed.pop())
            await stack.aclose()
            self.agent = None
            self.machine = None
            self.death = ""  # the clone's end, not this sandbox's
            tmpl.discard(f"its clone failed: {e}")
            log.debug("sandbox %s boots cold: the template did not restore", self.id)
            return False
        self._stack.push_async_callback(stack.aclose)
        return True

    async def _network_namespace(self) -> str | None:
        """The namespace to plumb, made first for bridge mode; published
        ports are bound before anything else, so a taken one fails fast."""
        spec = self.net_spec
        if spec.mode == "none":
            return None
        from microvm.net import bridge, tcfilter
        # What killed owners left (their plumbing claims) goes with the next
        # sandbox to touch the network, not only with a prune.
        await asyncio.to_thread(tcfilter.prune_claims)
        if spec.mode == "ns":
            return tcfilter.usable_netns(spec.path)
        listeners = ports.bind(list(spec.ports))
        self.proxy = ports.Proxy(list(spec.ports), listeners)
        self._stack.push_async_callback(self.proxy.close)
        cfg = bridge.BridgeConfig.of(self.config)
        self.bridge = await asyncio.to_thread(bridge.attach, cfg, self.id)
        self._stack.push_async_callback(asyncio.to_thread, self.bridge.close)  # iptables
        return self.bridge.netns_path

    async def start_console(self, console_id: str, rows: int, cols: int, term: str) -> None:
        """A root shell in the guest, outside every container; its bytes then
        flow as a port connection's (container "", exec console_id)."""
        if not self.config.debug_console:
            raise KataError("the debug console is off (debug_console: true in the config)")
        await self._call("StartConsole", agent_pb2.ConsoleRequest(
            console_id=console_id, shell=GUEST_BUSYBOX, rows=rows, cols=cols, term=term))

    async def close_console(self, console_id: str) -> None:
        await self._call("ClosePort", agent_pb2.ProcessRef(exec_id=console_id))

    async def _configure_network(self, net: tcfilter.Network) -> None:
        """The guest copies the namespace's veths, with the guest image's
        busybox ip."""
        by_name = {i.name: i.mac for i in net.interfaces}
        req = agent_pb2.NetworkConfig(
            interfaces=[agent_pb2.NetworkInterface(
                mac=i.mac, mtu=i.mtu, name=i.name, addresses=[a.cidr for a in i.addresses])
                for i in net.interfaces],
            routes=[agent_pb2.NetworkRoute(
                dest=r.dest, gateway=r.gateway, device_mac=by_name[r.device],
                source=r.source, scope=r.scope, ipv6=r.family == socket.AF_INET6,
                metric=r.metric) for r in net.routes],
            ip_command=[GUEST_BUSYBOX, "ip"])
        assert self.agent is not None
        try:
            await self.agent.call("ConfigureNetwork", req)
        except ttrpc.RpcError as e:
            raise KataError(f"guest network set-up failed: {e}") from None

    async def _race(self, aw, deadline: float):  # type: ignore[no-untyped-def]
        """Await aw unless the VM exits or the boot deadline passes first."""
        assert self.machine is not None
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(aw)
        exited = asyncio.ensure_future(self.machine.wait())
        try:
            done, _ = await asyncio.wait({task, exited}, timeout=max(0, deadline - loop.time()),
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
        if task in done and not isinstance(task.exception(), ConnectionError):
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        if task in done or exited in done:
            await self._settle(2)
        if self.death and not self.death.startswith("the VM exited"):
            raise VMError(self.death)  # a helper's or the kernel's: it says it all
        if task in done:
            why = "the VM closed the agent's channel during boot"
        elif exited in done:
            why = f"the VM exited during boot (QEMU status {self.machine.proc.poll()})"  # type: ignore[union-attr]
        else:
            why = f"the agent did not answer within {self.config.boot_timeout:g}s"
            await self.machine.kill()
        raise VMError(self._with_console(why))

    def _with_console(self, why: str) -> str:
        panic = panic_message(self.console_log)
        if panic:
            return panic
        lines = tail(self.console_log).strip()
        if not lines:
            lines = tail(self.log_dir / "qemu.log").strip()
        if lines:
            why += "; last console lines:\n  " + lines.replace("\n", "\n  ")
        return why

    # -- containers --------------------------------------------------------

    def _agent(self) -> AgentClient:
        if self.agent is None or self.agent.closed:
            raise VMError(self.death or self._with_console("the VM is gone"))
        return self.agent

    async def create_container(self, cid: str, rootfs: Path | list[Path],
                               process: agent_pb2.Process,
                               readonly: bool = False, hostname: str = "",
                               overlay: bool = True, etc: bool = False,
                               volumes: list[Volume] | tuple[Volume, ...] = (),
                               share_with: str = "", shared_namespaces: tuple[str, ...] = (),
                               masked_paths: list[str] | tuple[str, ...] = (),
                               readonly_paths: list[str] | tuple[str, ...] = (),
                               devices: list[agent_pb2.DeviceRule] | None = None,
                               sysctls: dict[str, str] | None = None) -> int:
        """Share rootfs into the VM and create the container's init there.

        share_with, shared_namespaces: join those namespaces of that container
        (a pod's pause) rather than make new ones.

        etc: write /etc/hostname, hosts (and resolv.conf on the bridge) into
        the container's writable layer, as docker does for its containers.

        overlay: the container writes to its own upper layer (the CLI's
        rootfs dirs are templates); False shares rootfs itself, writable (a
        containerd snapshot is already the container's own).
        """
        if cid in self.containers:
            raise KataError(f"container {cid} already exists")
        target = self.shared / cid / "rootfs"
        target.mkdir(parents=True)
        layers = rootfs if isinstance(rootfs, list) else [rootfs]
        # The container writes to its own upper layer, never to the rootfs
        # it was given; the upper layer lives in our tmpfs.
        upper, work = self.dir / "rw" / cid / "upper", self.dir / "rw" / cid / "work"
        if overlay and not readonly:
            upper.mkdir(parents=True)
            work.mkdir()
        m = rootmount.plan(layers, readonly, upper, work) if overlay \
            else rootmount.snapshot(layers[0])
        try:
            rootmount.mount(m, target)
        except OSError as e:
            raise KataError(f"cannot mount rootfs {m.source}: {e.strerror}") from None
        if etc and not readonly:
            try:
                write_etc(target, etc_files(hostname, self.bridge.ip if self.bridge else None))
            except OSError as e:
                _umount(target)
                raise KataError(f"cannot write the container's /etc: {e.strerror}") from None
        state = ContainerState(cid, target)
        self.containers[cid] = state
        try:
            mounts = self._share_volumes(state, volumes)
            req = agent_pb2.CreateContainerRequest(
                container_id=cid, rootfs=agent_pb2.Rootfs(shared_path=f"{cid}/rootfs",
                                                          readonly=readonly),
                hostname=hostname, process=process, mounts=mounts, share_with=share_with,
                shared_namespaces=list(shared_namespaces), masked_paths=list(masked_paths),
                readonly_paths=list(readonly_paths), devices=devices or [],
                sysctls=sysctls or {})
            state.pid = (await self._call("CreateContainer", req)).pid
        except BaseException:
            self._unmount_container(state)
            raise
        return state.pid

    async def _call(self, method: str, req: Message) -> Any:
        try:
            return await self._agent().call(method, req)
        except ttrpc.RpcError as e:
            # NotFound with no reason is a container or process the agent
            # does not know: callers take that one as it is.
            if isinstance(e, ttrpc.NotFound) and not e.reason:
                raise
            raise from_rpc(e) from None
        except ConnectionError:
            raise VMError(await self._gone()) from None

    async def start_container(self, cid: str) -> None:
        await self._call("StartContainer", agent_pb2.ContainerRequest(container_id=cid))

    async def exec_process(self, cid: str, exec_id: str, process: agent_pb2.Process) -> int:
        req = agent_pb2.ExecProcessRequest(container_id=cid, exec_id=exec_id, process=process)
        return int((await self._call("ExecProcess", req)).pid)

    async def signal(self, cid: str, sig: int, exec_id: str = "", all: bool = False) -> None:
        """all: every process in the container (runc's kill --all)."""
        ref = agent_pb2.ProcessRef(container_id=cid, exec_id=exec_id)
        await self._call("SignalProcess", agent_pb2.SignalRequest(process=ref, signal=sig,
                                                                  all=all))

    async def wait(self, cid: str, exec_id: str = "") -> int:
        ref = agent_pb2.ProcessRef(container_id=cid, exec_id=exec_id)
        return int((await self._call("WaitProcess", ref)).exit_status)

    async def read_output(self, cid: str, stream: str, exec_id: str = "",
                          max_bytes: int = 1 << 20) -> bytes:
        """Next output chunk; b"" at end of stream."""
        ref = agent_pb2.ProcessRef(container_id=cid, exec_id=exec_id)
        method = "ReadStdout" if stream == "stdout" else "ReadStderr"
        resp = await self._call(method, agent_pb2.ReadStreamRequest(process=ref,
                                                                    max_bytes=max_bytes))
        return bytes(resp.data)

    async def write_input(self, cid: str, data: bytes, exec_id: str = "") -> None:
        ref = agent_pb2.ProcessRef(container_id=cid, exec_id=exec_id)
        await self._call("WriteStdin", agent_pb2.WriteStreamRequest(process=ref, data=data))

    async def close_input(self, cid: str, exec_id: str = "") -> None:
        await self._call("CloseStdin", agent_pb2.ProcessRef(container_id=cid, exec_id=exec_id))

    async def connect_port(self, conn: str, port: int) -> None:
        """A connection to port in the guest, named conn; its bytes then flow
        through read_output/write_input/close_input with cid "" and exec_id conn."""
        await self._call("ConnectPort", agent_pb2.PortRequest(id=conn, port=port))

    async def close_port(self, conn: str) -> None:
        await self._call("ClosePort", agent_pb2.ProcessRef(exec_id=conn))

    async def resize(self, cid: str, rows: int, cols: int, exec_id: str = "") -> None:
        ref = agent_pb2.ProcessRef(container_id=cid, exec_id=exec_id)
        await self._call("ResizeTty", agent_pb2.ResizeTtyRequest(process=ref, rows=rows,
                                                                cols=cols))

    async def pause(self, cid: str) -> None:
        await self._call("PauseContainer", agent_pb2.ContainerRequest(container_id=cid))

    async def resume(self, cid: str) -> None:
        await self._call("ResumeContainer", agent_pb2.ContainerRequest(container_id=cid))

    async def guest_stats(self) -> agent_pb2.GuestStatsResponse:
        stats: agent_pb2.GuestStatsResponse = await self._call("GuestStats", agent_pb2.Empty())
        return stats

    async def stats(self, cid: str) -> agent_pb2.CgroupStats:
        stats: agent_pb2.CgroupStats = await self._call(
            "StatsContainer", agent_pb2.ContainerRequest(container_id=cid))
        return stats

    async def update(self, req: agent_pb2.UpdateContainerRequest) -> None:
        await self._call("UpdateContainer", req)

    async def wait_oom(self) -> str:
        """The next container the guest OOM-killed in (blocks)."""
        event: agent_pb2.OOMEvent = await self._call("WaitOOM", agent_pb2.Empty())
        return event.container_id

    async def remove_container(self, cid: str) -> None:
        state = self.containers.get(cid)
        if state is None:
            return
        try:
            await self._call("RemoveContainer", agent_pb2.ContainerRequest(container_id=cid))
        finally:
            # rm -r of an upper layer can take seconds: not on the loop.
            await asyncio.to_thread(self._unmount_container, state)

    def _share_volumes(self, state: ContainerState,
                       volumes: list[Volume] | tuple[Volume, ...]) -> list[agent_pb2.Mount]:
        """Bind each host path into shared/<cid>/volumes/<n>: read-only ones
        read-only here, on the host, whatever the guest does."""
        out = []
        for n, v in enumerate(volumes):
            if v.kind != "bind":
                out.append(agent_pb2.Mount(destination=v.destination, type=v.kind,
                                           readonly=v.readonly, options=list(v.options)))
                continue
            src = Path(v.source)
            if not src.is_absolute() or not src.exists():
                raise KataError(f"bind source {v.source} does not exist")
            dst = self.shared / state.id / "volumes" / str(n)
            dst.parent.mkdir(exist_ok=True)
            if src.is_dir():
                dst.mkdir()
            else:
                dst.touch(mode=0o600)
            try:
                # A slave of the host's mount (this namespace's / is rslave)
                # unless private: then cut before it is attached.
                linux.bind_tree(str(src), str(dst), v.readonly, v.propagation == "private")
                state.volume_mounts.append(dst)
            except OSError as e:
                raise KataError(f"cannot share {v.source}: {e.strerror}") from None
            out.append(agent_pb2.Mount(destination=v.destination, type="bind",
                                       shared_path=f"{state.id}/volumes/{n}",
                                       readonly=v.readonly))
        return out

    def _unmount_container(self, state: ContainerState) -> None:
        for mount in [*reversed(state.volume_mounts), state.rootfs_mount]:
            _umount(mount)
        # Never rm -r through a mount: it would reach the host's files.
        _rmtree_unmounted(self.shared / state.id)
        _rmtree_unmounted(self.dir / "rw" / state.id)
        self.containers.pop(state.id, None)

    # -- shutdown ------------------------------------------------------------

    async def stop(self) -> None:
        """Power the guest off, then tear down everything; never raises."""
        self._stopping = True  # from here on, ends are ours
        try:
            if self.agent is not None and not self.agent.closed and self.machine is not None \
                    and self.machine.running:
                with contextlib.suppress(Exception):
                    # Answered once the guest's file systems are synced to
                    # the host: nothing in the VM is left to keep, so QEMU
                    # is told to quit (below) without waiting for the
                    # guest's restart (0.05-0.08 s under TCG).
                    await self.agent.call("Shutdown", agent_pb2.Empty(),
                                          timeout=self.config.shutdown_timeout)
            for state in list(self.containers.values()):
                self._unmount_container(state)
        finally:
            try:
                await self._stack.aclose()  # every callback runs, even after one fails
            except Exception as e:
                log.warning("sandbox %s clean-up: %s", self.id, e, exc_info=log.isEnabledFor(
                    logging.DEBUG))


_PANIC = "Kernel panic - not syncing: "


def panic_message(console_log: Path) -> str:
    """'guest kernel panicked: <reason>' when the guest's console shows a
    panic (the VM then exits: panic=-1 and -no-reboot), else ""."""
    for line in tail(console_log, 200).splitlines():
        _, found, reason = line.partition(_PANIC)
        if found:
            return f"guest kernel panicked: {reason.strip()}"
    return ""


def _rmtree_unmounted(path: Path) -> None:
    """rm -r path, unless something is still mounted below it (then: keep it,
    and say so; the owner's mount namespace frees it at the end anyway)."""
    prefix = str(path).rstrip("/") + "/"
    with open("/proc/self/mounts") as f:
        busy = [line.split()[1] for line in f
                if (line.split()[1] + "/").startswith(prefix)]
    if busy:
        log.warning("not removing %s: still mounted: %s", path, ", ".join(busy))
        return
    shutil.rmtree(path, ignore_errors=True)


def _umount(path: Path) -> None:
    try:
        linux.umount(str(path), linux.MNT_DETACH)
    except OSError as e:
        log.debug("umount %s: %s", path, e)
