"""The kata-py agent: serves katapy.agent.v1.Agent inside the guest.

One asyncio loop, no threads: containers and their processes are forked
straight from this process (fork is only safe single-threaded).  The agent is
the guest's pid 1, so every orphan is reaped here, by one SIGCHLD handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field

from guest import adopt, cgroups, container, network
from microvm import capabilities, linux
from microvm.protocol import (
    AGENT_SERVICE,
    DEBUG_CONSOLE_PARAM,
    GUEST_BUSYBOX,
    PROTOCOL_VERSION,
    REASON_COMMAND_NOT_EXECUTABLE,
    REASON_COMMAND_NOT_FOUND,
    agent_pb2,
    ttrpc,
)

log = logging.getLogger("agent")

# Output buffered per stream before the agent stops reading the process's
# pipe, so a process that outruns the host blocks instead of filling memory.
OUTPUT_BUFFER = 256 * 1024
READ_CHUNK = 64 * 1024
STOP_GRACE = 0.05
# The end of a tool's output kept for its error message.
TOOL_OUTPUT_KEPT = 65536
OOM_POLL = 0.25


class OutputStream:
    """Output of one fd, buffered for ReadStdout/ReadStderr with back-pressure."""

    def __init__(self, fd: int | None) -> None:
        self._loop = asyncio.get_running_loop()
        self._fd = fd
        self._buf = bytearray()
        self._eof = fd is None
        self._changed = asyncio.Event()
        self._reading = False
        if fd is not None:
            os.set_blocking(fd, False)
            self._resume()

    def _resume(self) -> None:
        if self._fd is not None and not self._reading and not self._eof:
            self._loop.add_reader(self._fd, self._on_readable)
            self._reading = True

    def _pause(self) -> None:
        if self._reading and self._fd is not None:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def _on_readable(self) -> None:
        assert self._fd is not None
        try:
            data = os.read(self._fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as e:
            # EIO: every slave end of a pty is closed, the pty's EOF.
            if e.errno != errno.EIO:
                log.warning("reading output: %s", e)
            data = b""
        if data:
            self._buf += data
            if len(self._buf) >= OUTPUT_BUFFER:
                self._pause()
        else:
            self.close()
        self._changed.set()

    async def read(self, max_bytes: int) -> tuple[bytes, bool]:
        while not self._buf and not self._eof:
            self._changed.clear()
            await self._changed.wait()
        n = max(1, min(max_bytes or READ_CHUNK, len(self._buf)))
        data = bytes(self._buf[:n])
        del self._buf[:n]
        if len(self._buf) < OUTPUT_BUFFER:
            self._resume()
        return data, (not data and self._eof)

    def close(self) -> None:
        self._pause()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._eof = True
        self._changed.set()


class InputStream:
    """The process's stdin: the write end of a pipe, or a dup of the pty master."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd
        self._lock = asyncio.Lock()
        if fd is not None:
            os.set_blocking(fd, False)

    async def write(self, data: bytes) -> int:
        loop = asyncio.get_running_loop()
        async with self._lock:
            view = memoryview(data)
            while view:
                if self._fd is None:
                    raise ttrpc.FailedPrecondition("stdin is closed")
                try:
                    n = os.write(self._fd, view)
                    view = view[n:]
                except BlockingIOError:
                    fut = loop.create_future()
                    loop.add_writer(self._fd, fut.set_result, None)
                    try:
                        await fut
                    finally:
                        if self._fd is not None:
                            loop.remove_writer(self._fd)
                except BrokenPipeError:
                    self.close()
                    raise ttrpc.FailedPrecondition("process closed its stdin") from None
            return len(data)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass
class Process:
    container_id: str
    exec_id: str
    pid: int
    stdin: InputStream
    stdout: OutputStream
    stderr: OutputStream
    tty: int | None
    exited: asyncio.Future[tuple[int, float]]
    sock: socket.socket | None = None

    def close(self) -> None:
        self.stdin.close()
        if self.tty is not None:
            os.close(self.tty)
            self.tty = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None


@dataclass
class PortConnection:
    """A forwarded TCP connection (port-forward): its bytes flow through the
    stdin and stdout calls, as a process's do; its own fds, so a half-close
    of stdin is a shutdown of the socket."""

    sock: socket.socket
    stdin: InputStream
    stdout: OutputStream
    stderr: OutputStream
    tty: None = None

    @classmethod
    def of(cls, sock: socket.socket) -> PortConnection:
        return cls(sock, InputStream(os.dup(sock.fileno())), OutputStream(os.dup(sock.fileno())),
                   OutputStream(None))

    def half_close(self) -> None:
        self.stdin.close()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.stdin.close()
        self.stdout.close()
        self.sock.close()


@dataclass
class Container:
    id: str
    init: Process
    started: bool = False
    execs: dict[str, Process] = field(default_factory=dict)


def _spec(p: agent_pb2.Process) -> container.ProcessSpec:
    if not p.args:
        raise ttrpc.InvalidArgument("process.args is empty")
    return container.ProcessSpec(
        args=list(p.args), env=list(p.env), cwd=p.cwd or "/", uid=p.user.uid, gid=p.user.gid,
        additional_gids=list(p.user.additional_gids), terminal=p.terminal, rows=p.rows,
        cols=p.cols, rlimits=[(r.type, r.hard, r.soft) for r in p.rlimits],
        no_new_privileges=p.no_new_privileges, seccomp=p.seccomp,
        capabilities=_capabilities(p.capabilities) if p.HasField("capabilities") else None)


def _capabilities(caps: agent_pb2.Capabilities) -> dict[str, int]:
    try:
        return {name: capabilities.mask(list(getattr(caps, name)))
                for name in ("bounding", "effective", "inheritable", "permitted", "ambient")}
    except ValueError as e:
        raise ttrpc.InvalidArgument(str(e)) from None


def _mounts(mounts: list[agent_pb2.Mount]) -> list[container.MountSpec]:
    out = []
    for m in mounts:
        if not m.destination.startswith("/"):
            raise ttrpc.InvalidArgument(f"mount destination {m.destination!r} is not absolute")
        source = ""
        if m.type == "bind":
            source = container.in_shared(m.shared_path) or ""
            if not source or not os.path.exists(source):
                raise ttrpc.InvalidArgument(f"mount {m.destination}: {m.shared_path!r} "
                                            "is not in the shared directory")
        elif m.type != "tmpfs":
            raise ttrpc.InvalidArgument(f"mount {m.destination}: type {m.type!r} unsupported")
        out.append(container.MountSpec(m.destination, m.type, source, m.readonly,
                                       ",".join(m.options)))
    return out


def _absolute(paths: list[str]) -> list[str]:
    if not all(p.startswith("/") for p in paths):
        raise ttrpc.InvalidArgument("masked and read-only paths must be absolute")
    return list(paths)


def _check_id(kind: str, value: str) -> None:
    # Ids travel into paths and logs: keep them plain.
    if not value or len(value) > 128 or not all(c.isalnum() or c in "-_." for c in value):
        raise ttrpc.InvalidArgument(f"invalid {kind} {value!r}")


_OWN_PID_NS: int | None = None


def fork_in_pid_namespace(of: int) -> int:
    """os.fork(), the child being pid 1 of a new pid namespace (of 0) or a
    process in of's.  One fork, where child-then-grandchild cost a second
    copy of the agent (unshare and setns of a pid namespace apply to the
    caller's later children only); the agent's own pid namespace is its
    children's again once the child exists."""
    global _OWN_PID_NS
    if _OWN_PID_NS is None:
        _OWN_PID_NS = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    if of:
        fd = os.open(f"/proc/{of}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        try:
            linux.setns(fd, linux.CLONE_NEWPID)
        finally:
            os.close(fd)
    else:
        linux.unshare(linux.CLONE_NEWPID)
    try:
        pid = os.fork()
    except BaseException:
        linux.setns(_OWN_PID_NS, linux.CLONE_NEWPID)
        raise
    if pid:
        linux.setns(_OWN_PID_NS, linux.CLONE_NEWPID)
    return pid


async def _recv(sock: socket.socket) -> tuple[dict[str, object] | None, list[int]]:
    """One message from a child; (None, []) at EOF (the child exec'd or died)."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, 65536, 4)
        except BlockingIOError:
            fut = loop.create_future()
            loop.add_reader(sock.fileno(), fut.set_result, None)
            try:
                await fut
            finally:
                loop.remove_reader(sock.fileno())
            continue
        if not data:
            return None, fds
        return json.loads(data), fds


_ERRORS = {
    container.ERR_NOT_FOUND: (ttrpc.NotFound, REASON_COMMAND_NOT_FOUND),
    container.ERR_NOT_EXECUTABLE: (ttrpc.PermissionDenied, REASON_COMMAND_NOT_EXECUTABLE),
}


def _child_error(msg: dict[str, object]) -> ttrpc.RpcError:
    cls, reason = _ERRORS.get(str(msg.get("kind")), (ttrpc.FailedPrecondition, ""))
    return cls(str(msg.get("error")), reason=reason)


class Agent:
    def __init__(self, started_at: float) -> None:
        self.started_at = started_at
        self.ready_at = 0.0
        self._fixed: agent_pb2.GuestDetails | None = None
        self.containers: dict[str, Container] = {}
        self.ports: dict[str, PortConnection] = {}
        self.consoles: dict[str, Process] = {}
        self._by_pid: dict[int, Process] = {}
        # Exits seen before the pid was known to us (a child can die fast),
        # with when they were seen (monotonic): an entry older than a
        # process's fork is a recycled pid's, not its own.
        self._early_exits: dict[int, tuple[tuple[int, float], float]] = {}
        # Children whose exit only a waiter wants (tools, set-up children).
        self._tools: dict[int, asyncio.Future[tuple[int, float]]] = {}
        self._loop = asyncio.get_running_loop()
        self._loop.add_signal_handler(signal.SIGCHLD, self._reap)
        self._ooms: asyncio.Queue[str] = asyncio.Queue()
        self._oom_seen: dict[str, int] = {}
        self._oom_watch: asyncio.Task[None] | None = None

    # -- child processes -------------------------------------------------

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            result = (128 - code if code < 0 else code, time.time())
            tool = self._tools.pop(pid, None)
            if tool is not None:
                tool.set_result(result)
                continue
            proc = self._by_pid.pop(pid, None)
            if proc is None:
                self._early_exits[pid] = (result, time.monotonic())
                continue
            if not proc.exec_id and proc.container_id in self.containers:
                self._check_oom(proc.container_id)
            if not proc.exited.done():
                proc.exited.set_result(result)

    def _early_exit(self, pid: int, forked_after: float) -> tuple[int, float] | None:
        """pid's exit if _reap saw it before we knew the pid, and it was
        this process's (seen after forked_after, a monotonic time)."""
        early = self._early_exits.pop(pid, None)
        if early is None or early[1] < forked_after:
            return None
        return early[0]

    def _waiter(self, pid: int, forked_after: float) -> asyncio.Future[tuple[int, float]]:
        """A future for the exit of a child only we wait for (not a
        container's process)."""
        done: asyncio.Future[tuple[int, float]] = self._loop.create_future()
        early = self._early_exit(pid, forked_after)
        if early is not None:
            done.set_result(early)
        else:
            self._tools[pid] = done
        return done

    def _track(self, proc: Process, forked_after: float) -> None:
        early = self._early_exit(proc.pid, forked_after)
        if early is not None:
            proc.exited.set_result(early)
        else:
            self._by_pid[proc.pid] = proc

    async def _spawn(self, container_id: str, exec_id: str, p: agent_pb2.Process,
                     child: object, *args: object, pid_ns_of: int = 0) -> Process:
        """Fork a child running child(sock, spec, stdio, *args) in a new pid
        namespace (or pid_ns_of's); wait until it is ready."""
        spec = _spec(p)
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours: list[int] = []
        theirs: list[int] = []
        stdin_r = stdout_w = stderr_w = None
        if not spec.terminal:
            if p.stdin:
                stdin_r, stdin_w = os.pipe()
                ours.append(stdin_w)
                theirs.append(stdin_r)
            stdout_r, stdout_w = os.pipe()
            stderr_r, stderr_w = os.pipe()
            ours += [stdout_r, stderr_r]
            theirs += [stdout_w, stderr_w]
        stdio = container.Stdio(stdin_r, stdout_w, stderr_w)
        forked_at = time.monotonic()
        try:
            pid = fork_in_pid_namespace(pid_ns_of)
        except OSError as e:
            for fd in ours + theirs:
                os.close(fd)
            parent_sock.close()
            child_sock.close()
            raise ttrpc.FailedPrecondition(f"cannot make the process: {e}") from None
        if pid == 0:
            code = 125
            try:
                parent_sock.close()
                for fd in ours:
                    os.close(fd)
                code = child(child_sock, spec, stdio, *args)  # type: ignore[operator]
            finally:
                os._exit(code)
        child_sock.close()
        for fd in theirs:
            os.close(fd)
        parent_sock.setblocking(False)
        tty = None
        try:
            while True:
                msg, fds = await _recv(parent_sock)
                if fds:
                    tty = fds[0]
                    for extra in fds[1:]:
                        os.close(extra)
                if msg is None:
                    raise ttrpc.FailedPrecondition("process set-up ended without a word")
                if "error" in msg:
                    raise _child_error(msg)
                if msg.get("ready"):
                    break
        except BaseException:
            for fd in ours + ([tty] if tty is not None else []):
                os.close(fd)
            parent_sock.close()
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self._waiter(pid, forked_at)  # its exit is nobody's
            raise
        if tty is not None:
            stdin = InputStream(os.dup(tty) if p.stdin else None)
            stdout, stderr = OutputStream(tty), OutputStream(None)
        else:
            stdin = InputStream(ours[0] if p.stdin else None)
            stdout, stderr = OutputStream(ours[-2]), OutputStream(ours[-1])
        proc = Process(container_id, exec_id, pid, stdin, stdout, stderr,
                       os.dup(tty) if tty is not None else None,
                       self._loop.create_future(), parent_sock)
        self._track(proc, forked_at)
        return proc

    def _container(self, cid: str) -> Container:
        c = self.containers.get(cid)
        if c is None:
            raise ttrpc.NotFound(f"container {cid} not found")
        return c

    def _streams(self, ref: agent_pb2.ProcessRef) -> Process | PortConnection:
        """Whose stdin and stdout a stream call means: a process's, or a
        forwarded connection's (container_id "")."""
        if not ref.container_id:
            conn = self.ports.get(ref.exec_id)
            if conn is not None:
                return conn
        return self._process(ref)

    def _process(self, ref: agent_pb2.ProcessRef) -> Process:
        if not ref.container_id:  # the debug console's
            console = self.consoles.get(ref.exec_id)
            if console is None:
                raise ttrpc.NotFound(f"no console or port connection {ref.exec_id!r}")
            return console
        c = self._container(ref.container_id)
        if not ref.exec_id:
            return c.init
        proc = c.execs.get(ref.exec_id)
        if proc is None:
            raise ttrpc.NotFound(f"process {ref.exec_id} not found in {ref.container_id}")
        return proc

    # -- RPCs --------------------------------------------------------------

    async def GetGuestDetails(self, req: agent_pb2.GuestDetailsRequest,
                              ctx: ttrpc.CallContext) -> agent_pb2.GuestDetails:
        return self._details()

    def _details(self) -> agent_pb2.GuestDetails:
        if self._fixed is None:
            # Read once: a clone has its template's memory and boot id, and
            # reading them again cost each clone 14 ms under TCG.
            mem = 0
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemTotal:"):
                        mem = int(line.split()[1]) * 1024
                        break
            with open("/proc/sys/kernel/random/boot_id") as f:
                boot_id = f.read().strip()
            self._fixed = agent_pb2.GuestDetails(
                protocol_version=PROTOCOL_VERSION, kernel_release=os.uname().release,
                mem_total_bytes=mem, boot_id=boot_id)
        details = agent_pb2.GuestDetails()
        details.CopyFrom(self._fixed)
        details.agent_started, details.agent_ready = self.started_at, self.ready_at
        return details

    async def GuestStats(self, req: agent_pb2.Empty,
                         ctx: ttrpc.CallContext) -> agent_pb2.GuestStatsResponse:
        mem: dict[str, int] = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("MemTotal", "MemAvailable"):
                    mem[key] = int(rest.split()[0]) * 1024
        with open("/proc/loadavg") as f:
            load = [float(x) for x in f.read().split()[:3]]
        rx = tx = 0
        with open("/proc/net/dev") as f:
            for line in f.readlines()[2:]:
                name, _, counters = line.partition(":")
                if name.strip() != "lo":
                    fields = counters.split()
                    rx, tx = rx + int(fields[0]), tx + int(fields[8])
        return agent_pb2.GuestStatsResponse(
            mem_total_bytes=mem.get("MemTotal", 0),
            mem_available_bytes=mem.get("MemAvailable", 0), load1=load[0], load5=load[1],
            load15=load[2], containers=len(self.containers), rx_bytes=rx, tx_bytes=tx)

    async def GetMeasurements(self, req: agent_pb2.Empty,
                              ctx: ttrpc.CallContext) -> agent_pb2.Measurements:
        """The vTPM's sha256 PCRs and the firmware's event log, as the kernel
        exposes them; the host compares them with what it expects."""
        bank = "/sys/class/tpm/tpm0/pcr-sha256"
        if not os.path.isdir(bank):
            return agent_pb2.Measurements(error="this VM has no TPM")
        pcrs = {}
        for name in os.listdir(bank):
            if name.isdigit():
                with open(os.path.join(bank, name)) as f:
                    pcrs[int(name)] = bytes.fromhex(f.read().strip())
        security = "/sys/kernel/security"
        log_path = f"{security}/tpm0/binary_bios_measurements"
        if not os.path.exists(log_path) and os.path.isdir(security):
            with contextlib.suppress(OSError):
                linux.mount("securityfs", security, "securityfs",
                            linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)
        try:
            with open(log_path, "rb") as f:
                event_log = f.read(4 << 20)
        except OSError as e:
            return agent_pb2.Measurements(pcr_sha256=pcrs,
                                          error=f"no event log: {e.strerror}")
        return agent_pb2.Measurements(pcr_sha256=pcrs, event_log=event_log)

    async def CreateContainer(self, req: agent_pb2.CreateContainerRequest,
                              ctx: ttrpc.CallContext) -> agent_pb2.ProcessResponse:
        _check_id("container id", req.container_id)
        if req.container_id in self.containers:
            raise ttrpc.AlreadyExists(f"container {req.container_id} already exists")
        share_pid, shared = 0, tuple(req.shared_namespaces)
        if req.share_with:
            owner = self._container(req.share_with)
            if owner.init.exited.done():
                raise ttrpc.FailedPrecondition(f"container {owner.id} has exited: "
                                               "its namespaces are gone")
            unknown = set(shared) - set(container.SHAREABLE_NAMESPACES)
            if unknown:
                raise ttrpc.InvalidArgument(f"cannot share namespaces {sorted(unknown)}")
            share_pid = owner.init.pid
        elif shared:
            raise ttrpc.InvalidArgument("shared_namespaces without share_with")
        try:
            cgroup = cgroups.create(req.container_id, list(req.devices))
            proc = await self._spawn(req.container_id, "", req.process,
                                     container.run_container_init, cgroup,
                                     req.rootfs.shared_path, req.rootfs.readonly, req.hostname,
                                     _mounts(req.mounts), share_pid, shared,
                                     _absolute(req.masked_paths),
                                     _absolute(req.readonly_paths), dict(req.sysctls),
                                     pid_ns_of=share_pid if "pid" in shared else 0)
        except BaseException:
            await cgroups.remove(req.container_id)
            raise
        self.containers[req.container_id] = Container(req.container_id, proc)
        log.debug("created %s pid %d", req.container_id, proc.pid)
        return agent_pb2.ProcessResponse(pid=proc.pid)

    async def StartContainer(self, req: agent_pb2.ContainerRequest,
                             ctx: ttrpc.CallContext) -> agent_pb2.Empty:
        c = self._container(req.container_id)
        if c.started:
            raise ttrpc.FailedPrecondition(f"container {c.id} already started")
        sock = c.init.sock
        if sock is None or c.init.exited.done():
            raise ttrpc.FailedPrecondition(f"container {c.id} is not in created state")
        c.started = True
        sock.send(b"start")
        msg, _ = await _recv(sock)
        sock.close()
        c.init.sock = None
        if msg is not None and "error" in msg:
            raise _child_error(msg)
        return agent_pb2.Empty()

    async def ExecProcess(self, req: agent_pb2.ExecProcessRequest,
                          ctx: ttrpc.CallContext) -> agent_pb2.ProcessResponse:
        c = self._container(req.container_id)
        _check_id("exec id", req.exec_id)
        if req.exec_id in c.execs:
            raise ttrpc.AlreadyExists(f"exec {req.exec_id} already exists")
        if not c.started or c.init.exited.done():
            raise ttrpc.FailedPrecondition(f"container {c.id} is not running")
        proc = await self._spawn(c.id, req.exec_id, req.process, container.run_exec,
                                 cgroups.path(c.id), c.init.pid, pid_ns_of=c.init.pid)
        c.execs[req.exec_id] = proc
        # Exec has no separate start: wait for the execve to report.
        assert proc.sock is not None
        msg, _ = await _recv(proc.sock)
        proc.sock.close()
        proc.sock = None
        if msg is not None and "error" in msg:
            raise _child_error(msg)
        return agent_pb2.ProcessResponse(pid=proc.pid)

    async def SignalProcess(self, req: agent_pb2.SignalRequest,
                            ctx: ttrpc.CallContext) -> agent_pb2.Empty:
        proc = self._process(req.process)
        if req.all and not req.process.exec_id:
            try:
                cgroups.signal_all(req.process.container_id, req.signal)
            except (OverflowError, ValueError, OSError) as e:
                raise ttrpc.InvalidArgument(f"signal {req.signal}: {e}") from None
            return agent_pb2.Empty()
        if proc.exited.done():
            raise ttrpc.NotFound("process already finished")
        try:
            os.kill(proc.pid, req.signal)
        except ProcessLookupError:
            raise ttrpc.NotFound("process already finished") from None
        except (OverflowError, ValueError, OSError) as e:
            raise ttrpc.InvalidArgument(f"signal {req.signal}: {e}") from None
        return agent_pb2.Empty()

    async def WaitProcess(self, req: agent_pb2.ProcessRef,
                          ctx: ttrpc.CallContext) -> agent_pb2.WaitResponse:
        proc = self._process(req)
        status, when = await asyncio.shield(proc.exited)
        return agent_pb2.WaitResponse(exit_status=status, exited_at=when)

    async def WriteStdin(self, req: agent_pb2.WriteStreamRequest,
                         ctx: ttrpc.CallContext) -> agent_pb2.WriteStreamResponse:
        proc = self._streams(req.process)
        return agent_pb2.WriteStreamResponse(written=await proc.stdin.write(req.data))

    async def CloseStdin(self, req: agent_pb2.ProcessRef,
                         ctx: ttrpc.CallContext) -> agent_pb2.Empty:
        proc = self._streams(req)
        if isinstance(proc, PortConnection):
            proc.half_close()
            return agent_pb2.Empty()
        if proc.tty is not None and proc.stdin._fd is not None:
            # A pty has no half-close: send EOF (^D) as a terminal would.
            with contextlib.suppress(ttrpc.RpcError):
                await proc.stdin.write(b"\x04")
        proc.stdin.close()
        return agent_pb2.Empty()

    async def _read(self, req: agent_pb2.ReadStreamRequest, which: str
                    ) -> agent_pb2.ReadStreamResponse:
        stream = getattr(self._streams(req.process), which)
        data, eof = await stream.read(req.max_bytes)
        return agent_pb2.ReadStreamResponse(data=data, eof=eof)

    async def ReadStdout(self, req: agent_pb2.ReadStreamRequest,
                         ctx: ttrpc.CallContext) -> agent_pb2.ReadStreamResponse:
        return await self._read(req, "stdout")

    async def ReadStderr(self, req: agent_pb2.ReadStreamRequest,
                         ctx: ttrpc.CallContext) -> agent_pb2.ReadStreamResponse:
        return await self._read(req, "stderr")

    async def ResizeTty(self, req: agent_pb2.ResizeTtyRequest,
                        ctx: ttrpc.CallContext) -> agent_pb2.Empty:
        proc = self._process(req.process)
        if proc.tty is None:
            raise ttrpc.FailedPrecondition("process has no terminal")
        container.set_winsize(proc.tty, req.rows, req.cols)
        return agent_pb2.Empty()

    async def RemoveContainer(self, req: agent_pb2.ContainerRequest,
                              ctx: ttrpc.CallContext) -> agent_pb2.Empty:
        c = self._container(req.container_id)
        # Killing the pid namespace's init kills everything in it.
        for proc in [c.init, *c.execs.values()]:
            if not proc.exited.done():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
        for proc in [c.init, *c.execs.values()]:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(proc.exited), 5)
            proc.close()
        del self.containers[c.id]
        await cgroups.remove(c.id)
        return agent_pb2.Empty()

    async def PauseContainer(self, req: agent_pb2.ContainerRequest,
                             ctx: ttrpc.CallContext) -> agent_pb2.Empty:
        self._container(req.container_id)
        await cgroups.freeze(req.container_id, True)
        return agent_pb2.Empty()

    async def ResumeContainer(self, req: agent_pb2.ContainerRequest,
                              ctx: ttrpc.CallContext) -> agent_pb2.Empty:
        self._container(req.container_id)
        await cgroups.freeze(req.container_id, False)
        return agent_pb2.Empty()

    async def StatsContainer(self, req: agent_pb2.ContainerRequest,
                             ctx: ttrpc.CallContext) -> agent_pb2.CgroupStats:
        self._container(req.container_id)
        return cgroups.stats(req.container_id)

    async def UpdateContainer(self, req: agent_pb2.UpdateContainerRequest,
                              ctx: ttrpc.CallContext) -> agent_pb2.Empty:
        self._container(req.container_id)
        cgroups.update(req)
        return agent_pb2.Empty()

    async def WaitOOM(self, req: agent_pb2.Empty, ctx: ttrpc.CallContext) -> agent_pb2.OOMEvent:
        if self._oom_watch is None:
            self._oom_watch = asyncio.create_task(self._watch_oom())
        return agent_pb2.OOMEvent(container_id=await self._ooms.get())

    def _check_oom(self, cid: str) -> None:
        kills = cgroups.oom_kills(cid)
        if kills > self._oom_seen.get(cid, 0):
            self._ooms.put_nowait(cid)
        self._oom_seen[cid] = kills

    async def _watch_oom(self) -> None:
        """Poll each container's oom_kill count (cgroup files cannot be awaited);
        _reap also checks when a container's init exits, so a container that
        dies and is removed between two polls is not missed."""
        while True:
            for cid in list(self.containers):
                self._check_oom(cid)
            for cid in set(self._oom_seen) - set(self.containers):
                del self._oom_seen[cid]
            await asyncio.sleep(OOM_POLL)

    async def run_tool(self, argv: list[str]) -> tuple[int, str]:
        """Run one of the agent's own helpers (not a container's); its exit
        status and output.  _reap, the one waiter, hands the status over."""
        r, w = os.pipe()
        forked_at = time.monotonic()
        try:
            pid = os.posix_spawn(argv[0], argv, {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                                 file_actions=[(os.POSIX_SPAWN_DUP2, w, 1),
                                               (os.POSIX_SPAWN_DUP2, w, 2)])
        except OSError as e:
            os.close(r)
            return 127, f"{argv[0]}: {e.strerror}"
        finally:
            os.close(w)
        # Registered before the loop runs _reap again: no exit is missed.
        done = self._waiter(pid, forked_at)
        # Read while it runs: a tool that writes more than a pipe holds
        # would otherwise never exit.
        reader = asyncio.StreamReader()
        transport, _ = await self._loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(r, "rb", buffering=0))
        try:
            output = b""
            while chunk := await reader.read(65536):
                output = (output + chunk)[-TOOL_OUTPUT_KEPT:]
        finally:
            transport.close()
        code, _ = await done
        return code, output.decode(errors="replace")

    async def AdoptSandbox(self, req: agent_pb2.AdoptRequest,
                           ctx: ttrpc.CallContext) -> agent_pb2.GuestDetails:
        try:
            if req.entropy:
                adopt.reseed(req.entropy)
            if req.realtime:
                adopt.set_clock(req.realtime)
            if req.hostname:
                adopt.set_hostname(req.hostname)
            if req.mount_share:
                adopt.mount_share()
        except OSError as e:
            raise ttrpc.FailedPrecondition(f"adopting the VM: {e}") from None
        # One round trip less before the first container: the host checks
        # the protocol from this answer.
        return self._details()

    async def ConfigureNetwork(self, req: agent_pb2.NetworkConfig,
                               ctx: ttrpc.CallContext) -> agent_pb2.Empty:
        try:
            await network.configure(req, self.run_tool)
        except network.NetworkError as e:
            raise ttrpc.InvalidArgument(f"network: {e}") from None
        return agent_pb2.Empty()

    async def ConnectPort(self, req: agent_pb2.PortRequest,
                          ctx: ttrpc.CallContext) -> agent_pb2.Empty:
        if not req.id or req.id in self.ports:
            raise ttrpc.InvalidArgument(f"port connection id {req.id!r} is empty or taken")
        if not 1 <= req.port <= 65535:
            raise ttrpc.InvalidArgument(f"port {req.port}: expected 1-65535")
        # As containerd dials localhost for runc's pods: IPv4 first, then IPv6.
        errors = []
        for family, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await self._loop.sock_connect(sock, (addr, req.port))
            except OSError as e:
                sock.close()
                errors.append(f"{addr}: {e.strerror}")
                continue
            self.ports[req.id] = PortConnection.of(sock)
            return agent_pb2.Empty()
        raise ttrpc.Unavailable(f"port {req.port} in the pod: {'; '.join(errors)}")

    async def ClosePort(self, req: agent_pb2.ProcessRef,
                        ctx: ttrpc.CallContext) -> agent_pb2.Empty:
        conn = self.ports.pop(req.exec_id, None) or self.consoles.pop(req.exec_id, None)
        if isinstance(conn, Process):
            with contextlib.suppress(ProcessLookupError):
                os.kill(conn.pid, signal.SIGKILL)  # a console's shell goes with it
            conn.stdout.close()
        if conn is not None:
            conn.close()
        return agent_pb2.Empty()

    async def StartConsole(self, req: agent_pb2.ConsoleRequest,
                           ctx: ttrpc.CallContext) -> agent_pb2.ProcessResponse:
        with open("/proc/cmdline") as f:
            if DEBUG_CONSOLE_PARAM not in f.read().split():
                raise ttrpc.PermissionDenied("the debug console is off in this VM "
                                             "(debug_console: true in the config)")
        _check_id("console id", req.console_id)
        if req.console_id in self.consoles or req.console_id in self.ports:
            raise ttrpc.AlreadyExists(f"console {req.console_id} already exists")
        if req.shell != GUEST_BUSYBOX or not os.path.isfile(req.shell):
            raise ttrpc.FailedPrecondition(f"no shell at {req.shell!r}")
        master, slave = os.openpty()
        container.set_winsize(master, req.rows, req.cols)
        forked_at = time.monotonic()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(master)
                container.run_console(slave, req.shell, req.term)
            finally:
                os._exit(127)
        os.close(slave)
        os.set_blocking(master, False)
        proc = Process("", req.console_id, pid, InputStream(os.dup(master)),
                       OutputStream(master), OutputStream(None), os.dup(master),
                       self._loop.create_future())
        self._track(proc, forked_at)
        self.consoles[req.console_id] = proc
        log.info("debug console %s: pid %d", req.console_id, pid)
        return agent_pb2.ProcessResponse(pid=pid)

    async def Shutdown(self, req: agent_pb2.Empty, ctx: ttrpc.CallContext) -> agent_pb2.Empty:
        # Synced before the answer: the host may end QEMU on it, sooner than
        # the guest's own restart.  The restart follows, should it not.
        os.sync()
        self._loop.call_later(STOP_GRACE, power_off)
        return agent_pb2.Empty()


def power_off() -> None:
    os.sync()
    # QEMU runs with -no-reboot: a restart ends the VM at once, while a
    # power-off without ACPI would only halt the CPU.
    linux.reboot(linux.LINUX_REBOOT_CMD_RESTART)


async def serve(agent: Agent, reader: asyncio.StreamReader,
                writer: asyncio.StreamWriter) -> None:
    server = ttrpc.Server()
    server.register_service(AGENT_SERVICE, agent,
                            agent_pb2.DESCRIPTOR.services_by_name["Agent"], agent_pb2)
    agent.ready_at = time.clock_gettime(time.CLOCK_BOOTTIME)
    await server.serve(reader, writer)
