"""containerd.task.v2.Task over the Sandbox core: one VM per pod.

The first container the shim creates boots the pod's VM; later ones (same
sandbox-id, so containerd's `start` found this shim) are created in it.
Semantics follow runc's shim where the contract leaves a choice (see
shared/reference/containerd-shim-v2.md section 6.2).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf import empty_pb2
from google.protobuf.message import Message

from microvm import config as config_mod
from microvm import linux, paths
from microvm.core import hostcgroup, metrics, mountns, oci, rootmount, spare
from microvm.core.sandbox import Sandbox
from microvm.core.stdio import pump_input, pump_output
from microvm.errors import KataError, to_rpc
from microvm.net import network
from microvm.net.network import NetworkSpec
from microvm.protocol import events_pb2, task_pb2, ttrpc
from microvm.shim import journal
from microvm.shim.events import Publisher, timestamp
from microvm.shim.lifecycle import Event, Status
from microvm.shim.options import runtime_options_config
from microvm.shim.process import Container, Proc, open_output, start_logger
from microvm.vm import accel, helpers

log = logging.getLogger(__name__)
T = TypeVar("T")

SERVICE = "containerd.task.v2.Task"
class TaskService:
    def __init__(self, namespace: str, publisher: Publisher | None,
                 on_empty: Callable[[], None]) -> None:
        self.namespace = namespace
        self.publisher = publisher
        self.on_empty = on_empty
        self.sandbox: Sandbox | None = None
        self.containers: dict[str, Container] = {}
        self._boot_lock = asyncio.Lock()
        self._cgroups: hostcgroup.Joined | None = None
        self._oom_task: asyncio.Task[None] | None = None
        self._stopping: set[asyncio.Task[None]] = set()  # loggers being stopped

    # -- helpers -------------------------------------------------------------

    def _publish(self, topic: str, event: Message) -> None:
        if self.publisher is not None:
            self.publisher.publish(topic, event)
        c = self.containers.get(getattr(event, "container_id", ""))
        journal.write(self.namespace, topic, event,
                      attributes=journal.attributes(c.annotations) if c else {})

    def _container(self, cid: str) -> Container:
        c = self.containers.get(cid)
        if c is None:
            raise ttrpc.NotFound(f"container {cid} not created")
        return c

    def _proc(self, cid: str, exec_id: str) -> Proc:
        c = self._container(cid)
        if not exec_id:
            return c.init
        p = c.execs.get(exec_id)
        if p is None:
            raise ttrpc.NotFound(f"process does not exist {exec_id}")
        return p

    def _vm_pid(self) -> int:
        m = self.sandbox.machine if self.sandbox else None
        return m.proc.pid if m is not None and m.proc is not None else 0

    async def _ensure_sandbox(self, options_config: str | None, net: NetworkSpec,
                              spec: oci.Spec) -> Sandbox:
        """The pod's VM, booted by its first container (CRI's pause container),
        with that container's network, size and host cgroup."""
        async with self._boot_lock:
            if self.sandbox is None:
                try:
                    cfg = config_mod.load(options_config)
                    config_mod.raise_firmware(cfg, spec.annotations)
                    cfg.vcpus, cfg.memory_mib = oci.pod_size(
                        spec.annotations, cfg.vcpus, cfg.memory_mib,
                        max_vcpus=os.cpu_count() or 1, max_memory_mib=config_mod.MAX_MEMORY_MIB)
                    choice = accel.choose(cfg.accel)
                    # A spare this runner held (microvm/core/spare.py): started
                    # outside the pod's cgroup, its processes join it now.
                    taken = await spare.take(cfg, choice, net)
                    if spec.cgroups_path and self._cgroups is None:
                        try:
                            self._cgroups = hostcgroup.join(
                                spec.cgroups_path,
                                list(taken.processes.values()) if taken else [])
                        except KataError:
                            if taken is not None:
                                await taken.stop()
                            raise
                    if taken is not None:
                        sb = taken
                    else:
                        sb = Sandbox(cfg, secrets.token_hex(8), mountns.enter(), choice,
                                     network=net)
                        await sb.start()
                except KataError as e:
                    raise to_rpc(e) from None
                self.sandbox = sb
                self._oom_task = asyncio.create_task(self._forward_ooms(sb))
            return self.sandbox

    async def _forward_ooms(self, sb: Sandbox) -> None:
        """Long-poll the agent for OOM kills; each becomes a TaskOOM event."""
        while True:
            try:
                cid = await sb.wait_oom()
            except Exception as e:  # the VM is gone or going
                log.debug("OOM watch ends: %s", e)
                return
            self._publish("/tasks/oom", events_pb2.TaskOOM(container_id=cid))

    async def _start_io(self, p: Proc) -> None:
        sb = self.sandbox
        assert sb is not None
        try:
            logger_err = None
            if p.stdout.startswith("binary://"):
                # Synchronous: no threads in the shim (its helpers fork), and a
                # logger says ready at once.
                p.logger, out, logger_err = start_logger(p.stdout, p.cid, self.namespace)
                p.fds.append(logger_err)
            else:
                out = open_output(p.stdout)
            p.fds.append(out)
            p.pumps.append(asyncio.create_task(pump_output(sb, p.cid, "stdout", out, p.exec_id)))
            if not p.terminal:
                if logger_err is not None:
                    err = logger_err
                elif p.stderr == p.stdout and p.stdout.startswith("file://"):
                    err = out
                else:
                    err = open_output(p.stderr)
                if err != out:
                    p.fds.append(err)
                p.pumps.append(asyncio.create_task(
                    pump_output(sb, p.cid, "stderr", err, p.exec_id)))
            if p.stdin:
                # Read-only, as runc: epoll reports nothing until a writer
                # comes, and HUP (our EOF) when the last one leaves.
                fd = os.open(p.stdin.removeprefix("fifo://"),
                             os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                p.fds.append(fd)
                p.stdin_task = asyncio.create_task(pump_input(sb, p.cid, fd, p.exec_id,
                                                              p.stdin_closed))
        except OSError as e:
            raise ttrpc.InvalidArgument(f"stdio: {e}") from None

    def _start_watch(self, p: Proc) -> None:
        # Held by the process: the loop keeps only a weak reference.
        p.watcher = asyncio.create_task(self._watch(p))

    async def _watch(self, p: Proc) -> None:
        """Wait for the process to exit, drain its output, then report it."""
        sb = self.sandbox
        assert sb is not None
        try:
            status = await sb.wait(p.cid, p.exec_id)
        except Exception as e:  # the VM died: the process is gone with it
            log.warning("%s/%s ended with the VM: %s", p.cid, p.exec_id, e)
            status = 255
            self._record_death(p.cid)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*p.pumps, return_exceptions=True), 5)
        self._close_io(p)
        p.exit_status, p.exited_at = status, time.time()
        p.lc.exited()
        if not p.exec_id:
            # runc reports the init's exit after its execs'.
            c = self.containers.get(p.cid)
            for ex in list(c.execs.values()) if c else []:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ex.exited.wait(), 5)
        self._publish("/tasks/exit", events_pb2.TaskExit(
            container_id=p.cid, id=p.exec_id or p.cid, pid=p.pid, exit_status=status,
            exited_at=timestamp(p.exited_at)))
        p.exited.set()

    def _close_io(self, p: Proc) -> None:
        for t in p.pumps:
            t.cancel()
        if p.stdin_task is not None:
            p.stdin_task.cancel()
        for fd in p.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        p.fds.clear()
        if p.logger is not None:
            # It saw EOF on both pipes; SIGTERM is containerd's "stop" too.
            # Waited for off the loop's back: a slow logger must not freeze
            # every other container of the pod.
            task = asyncio.create_task(helpers.stop(p.logger, "logger", grace=2))
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)
            p.logger = None

    def _mount_rootfs(self, bundle: Path, mounts: list[task_pb2.Mount]) -> None:
        target = bundle / "rootfs"
        target.mkdir(exist_ok=True)
        for m in mounts:
            try:
                rootmount.mount(rootmount.RootMount(m.type, m.source, tuple(m.options)), target)
            except OSError as e:
                raise ttrpc.InvalidArgument(f"rootfs mount {m.type} {m.source}: {e}") from None

    def _pod_namespaces(self, cid: str, spec: oci.Spec) -> dict[str, Any]:
        """A pod's app container joins the pause container's namespaces that
        its spec names (CRI: IPC and UTS always, pid with shareProcessNamespace)."""
        pause = spec.annotations.get(oci.SANDBOX_ID, "")
        if not spec.joined_namespaces or not pause or pause == cid:
            return {}
        if pause not in self.containers:
            raise ttrpc.FailedPrecondition(f"pod sandbox {pause} is not in this VM")
        return {"share_with": pause, "shared_namespaces": spec.joined_namespaces}

    # -- RPCs ----------------------------------------------------------------

    async def Create(self, req: task_pb2.CreateTaskRequest,
                     ctx: ttrpc.CallContext) -> task_pb2.CreateTaskResponse:
        if req.id in self.containers:
            raise ttrpc.AlreadyExists(f"container {req.id} already exists")
        if req.checkpoint:
            raise ttrpc.Unimplemented("checkpoint restore is not supported by kata-py")
        log.debug("create %s", req.id)
        bundle = Path(req.bundle)
        spec = oci.load_bundle(bundle)
        # Before the VM boots: what a VM cannot share with the node.
        if refusal := oci.host_namespace_refusal(spec):
            raise ttrpc.InvalidArgument(refusal)
        # Before the VM boots: it would reach sethostname() and /etc/hosts.
        if spec.hostname and (problem := network.hostname_problem(spec.hostname)):
            raise ttrpc.InvalidArgument(f"OCI spec: hostname: {problem}")
        config_path = None
        if req.options.value:
            config_path = runtime_options_config(req.options)
        # Our CLI's detached containers say what network they want; the
        # spec of containerd's names the namespace CNI prepared.
        try:
            cli_net = network.from_annotations(spec.annotations)
        except KataError as e:
            raise to_rpc(e, ttrpc.InvalidArgument) from None
        net = cli_net or (NetworkSpec("ns", spec.netns) if spec.netns else NetworkSpec())
        sb = await self._ensure_sandbox(config_path, net, spec)
        if req.rootfs:
            self._mount_rootfs(bundle, list(req.rootfs))
            rootfs = bundle / "rootfs"
        else:
            rootfs = (bundle / spec.root_path) if not os.path.isabs(spec.root_path) \
                else Path(spec.root_path)
        spec.process.terminal = req.terminal
        spec.process.stdin = bool(req.stdin)
        p = Proc(req.id, "", req.stdin, req.stdout, req.stderr, req.terminal, spec.process)
        c = Container(req.id, req.bundle, p, rootfs_mounted=bool(req.rootfs),
                      seccomp=spec.seccomp, annotations=dict(spec.annotations))
        self.containers[req.id] = c
        try:
            await sb.create_container(req.id, rootfs, spec.process, readonly=spec.root_readonly,
                                      hostname=spec.hostname, overlay=False,
                                      etc=cli_net is not None, volumes=spec.volumes,
                                      masked_paths=spec.masked_paths,
                                      sysctls=spec.sysctls,
                                      readonly_paths=spec.readonly_paths,
                                      devices=spec.devices,
                                      **self._pod_namespaces(req.id, spec))
            if spec.resources not in (b"", b"{}"):
                update = metrics.update_request(req.id, spec.resources)
                # ctr's default spec has device rules only: no round trip for nothing.
                if len(update.ListFields()) > 1:
                    await sb.update(update)
            await self._start_io(p)
            # Watched from now: a created container can be killed before it
            # starts (containerd's delete of one), and its Wait must return.
            self._start_watch(p)
        except BaseException as e:
            self.containers.pop(req.id, None)
            self._close_io(p)
            if c.rootfs_mounted:
                with contextlib.suppress(OSError):
                    linux.umount(str(bundle / "rootfs"), linux.MNT_DETACH)
            if isinstance(e, KataError):
                raise to_rpc(e) from None
            raise
        p.pid = self._vm_pid()
        log.debug("created %s", req.id)
        self._publish("/tasks/create", events_pb2.TaskCreate(
            container_id=req.id, bundle=req.bundle,
            rootfs=[events_pb2.Mount(type=m.type, source=m.source, target=m.target,
                                     options=list(m.options)) for m in req.rootfs],
            io=events_pb2.TaskIO(stdin=req.stdin, stdout=req.stdout, stderr=req.stderr,
                                 terminal=req.terminal), pid=p.pid))
        return task_pb2.CreateTaskResponse(pid=p.pid)

    async def Start(self, req: task_pb2.StartRequest,
                    ctx: ttrpc.CallContext) -> task_pb2.StartResponse:
        p = self._proc(req.id, req.exec_id)
        sb = self.sandbox
        assert sb is not None
        self._check(p, Event.START)
        try:
            if req.exec_id:
                self._check(self._container(req.id).init, Event.EXEC)
                assert p.spec is not None
                await sb.exec_process(req.id, req.exec_id, p.spec)
                p.pid = self._vm_pid()
                await self._start_io(p)
            else:
                await sb.start_container(req.id)
        except KataError as e:
            raise to_rpc(e) from None
        p.lc.advance(Event.START)
        if req.exec_id:
            self._publish("/tasks/exec-started", events_pb2.TaskExecStarted(
                container_id=req.id, exec_id=req.exec_id, pid=p.pid))
            self._start_watch(p)
        else:
            self._publish("/tasks/start", events_pb2.TaskStart(container_id=req.id, pid=p.pid))
        return task_pb2.StartResponse(pid=p.pid)

    async def State(self, req: task_pb2.StateRequest,
                    ctx: ttrpc.CallContext) -> task_pb2.StateResponse:
        c = self._container(req.id)
        p = self._proc(req.id, req.exec_id)
        return task_pb2.StateResponse(
            id=req.exec_id or req.id, bundle=c.bundle, pid=p.pid, status=p.status,  # type: ignore[arg-type]
            stdin=p.stdin, stdout=p.stdout, stderr=p.stderr, terminal=p.terminal,
            exit_status=p.exit_status, exited_at=p.exit_time())  # type: ignore[arg-type]

    async def Wait(self, req: task_pb2.WaitRequest,
                   ctx: ttrpc.CallContext) -> task_pb2.WaitResponse:
        p = self._proc(req.id, req.exec_id)
        await p.exited.wait()
        return task_pb2.WaitResponse(exit_status=p.exit_status,
                                     exited_at=p.exit_time())  # type: ignore[arg-type]

    async def Kill(self, req: task_pb2.KillRequest, ctx: ttrpc.CallContext) -> empty_pb2.Empty:
        p = self._proc(req.id, req.exec_id)
        # all: runc's kill --all, for a container's init (ignored for an exec, as runc does).
        event = Event.KILL_ALL if req.all and not req.exec_id else Event.KILL
        self._check(p, event)
        assert self.sandbox is not None
        try:
            await self.sandbox.signal(req.id, req.signal, req.exec_id,
                                      all=event is Event.KILL_ALL)
        except ttrpc.NotFound:
            raise ttrpc.NotFound("process already finished") from None
        except KataError as e:
            raise to_rpc(e) from None
        return empty_pb2.Empty()

    async def Exec(self, req: task_pb2.ExecProcessRequest,
                   ctx: ttrpc.CallContext) -> empty_pb2.Empty:
        c = self._container(req.id)
        if req.exec_id in c.execs:
            raise ttrpc.AlreadyExists(f"id {req.exec_id}: already exists")
        self._check(c.init, Event.EXEC)
        try:
            obj = json.loads(req.spec.value) if req.spec.value else None
        except ValueError:
            raise ttrpc.InvalidArgument("exec spec is not JSON") from None
        spec = oci.process(obj, "exec process.")
        spec.seccomp = c.seccomp
        if not spec.HasField("capabilities") and c.init.spec is not None and \
                c.init.spec.HasField("capabilities"):
            # An exec gets no more than its container (docker exec's rule).
            spec.capabilities.CopyFrom(c.init.spec.capabilities)
        spec.terminal = req.terminal
        spec.stdin = bool(req.stdin)
        c.execs[req.exec_id] = Proc(req.id, req.exec_id, req.stdin, req.stdout, req.stderr,
                                    req.terminal, spec)
        self._publish("/tasks/exec-added", events_pb2.TaskExecAdded(container_id=req.id,
                                                                    exec_id=req.exec_id))
        return empty_pb2.Empty()

    async def ResizePty(self, req: task_pb2.ResizePtyRequest,
                        ctx: ttrpc.CallContext) -> empty_pb2.Empty:
        p = self._proc(req.id, req.exec_id)
        assert self.sandbox is not None
        self._check(p, Event.RESIZE)
        if p.status in (Status.RUNNING, Status.PAUSED):
            try:
                await self.sandbox.resize(req.id, req.height, req.width, req.exec_id)
            except KataError as e:
                raise to_rpc(e) from None
        elif p.status is Status.CREATED and p.spec is not None:
            p.spec.rows, p.spec.cols = req.height, req.width
        return empty_pb2.Empty()

    async def CloseIO(self, req: task_pb2.CloseIORequest,
                      ctx: ttrpc.CallContext) -> empty_pb2.Empty:
        p = self._proc(req.id, req.exec_id)
        if req.stdin:
            # The client wrote all it will, but may hold the FIFO open: the
            # pump passes on what is buffered, then closes the process's
            # stdin (no deadline: a process that does not read holds it).
            p.stdin_closed.set()
        return empty_pb2.Empty()

    async def Delete(self, req: task_pb2.DeleteRequest,
                     ctx: ttrpc.CallContext) -> task_pb2.DeleteResponse:
        c = self._container(req.id)
        p = self._proc(req.id, req.exec_id)
        self._check(p, Event.DELETE)
        resp = task_pb2.DeleteResponse(pid=p.pid, exit_status=p.exit_status,
                                       exited_at=p.exit_time())  # type: ignore[arg-type]
        if req.exec_id:
            del c.execs[req.exec_id]
            p.lc.advance(Event.DELETE)
            return resp
        assert self.sandbox is not None
        self._close_io(p)
        with contextlib.suppress(Exception):
            await self.sandbox.remove_container(req.id)
        if c.rootfs_mounted:
            with contextlib.suppress(OSError):
                linux.umount(str(Path(c.bundle) / "rootfs"), linux.MNT_DETACH)
        p.lc.advance(Event.DELETE)
        self._publish("/tasks/delete", events_pb2.TaskDelete(
            container_id=req.id, pid=p.pid, exit_status=p.exit_status,
            exited_at=p.exit_time()))  # type: ignore[arg-type]
        del self.containers[req.id]
        return resp

    async def Pids(self, req: task_pb2.PidsRequest,
                   ctx: ttrpc.CallContext) -> task_pb2.PidsResponse:
        c = self._container(req.id)
        # The VM is what runs on the host: its pid stands for the task, as in Kata.
        pids = {c.init.pid, *(e.pid for e in c.execs.values() if e.pid)}
        return task_pb2.PidsResponse(processes=[task_pb2.ProcessInfo(pid=p) for p in pids if p])

    async def Connect(self, req: task_pb2.ConnectRequest,
                      ctx: ttrpc.CallContext) -> task_pb2.ConnectResponse:
        c = self.containers.get(req.id)
        return task_pb2.ConnectResponse(shim_pid=os.getpid(), task_pid=c.init.pid if c else 0)

    async def Shutdown(self, req: task_pb2.ShutdownRequest,
                       ctx: ttrpc.CallContext) -> empty_pb2.Empty:
        if not self.containers:
            self.on_empty()
        return empty_pb2.Empty()

    def _check(self, p: Proc, event: Event) -> None:
        """May event happen to p now?  If not, containerd gets runc's error,
        and why the VM is gone if it is."""
        try:
            p.lc.check(event)
        except ttrpc.RpcError as e:
            if death := self._death():
                e.args = (e.message + death,)
            raise

    def _record_death(self, cid: str) -> None:
        """The reason, beside the container's bundle, for a CLI whose
        process ended with the VM (containerd's events have no field)."""
        c = self.containers.get(cid)
        if c is not None and self.sandbox is not None and self.sandbox.death:
            with contextlib.suppress(OSError):
                (Path(c.bundle) / paths.BUNDLE_DEATH).write_text(self.sandbox.death + "\n")

    def _death(self) -> str:
        """': <why the VM is gone>' once it is, else ''."""
        sb = self.sandbox
        return f": {sb.death}" if sb is not None and sb.death else ""

    async def Pause(self, req: task_pb2.PauseRequest, ctx: ttrpc.CallContext) -> empty_pb2.Empty:
        p = self._container(req.id).init
        self._check(p, Event.PAUSE)
        assert self.sandbox is not None
        await self._agent_call(self.sandbox.pause(req.id))
        p.lc.advance(Event.PAUSE)
        self._publish("/tasks/paused", events_pb2.TaskPaused(container_id=req.id))
        return empty_pb2.Empty()

    async def Resume(self, req: task_pb2.ResumeRequest,
                     ctx: ttrpc.CallContext) -> empty_pb2.Empty:
        p = self._container(req.id).init
        self._check(p, Event.RESUME)
        assert self.sandbox is not None
        await self._agent_call(self.sandbox.resume(req.id))
        p.lc.advance(Event.RESUME)
        self._publish("/tasks/resumed", events_pb2.TaskResumed(container_id=req.id))
        return empty_pb2.Empty()

    async def Checkpoint(self, req: task_pb2.CheckpointTaskRequest,
                         ctx: ttrpc.CallContext) -> empty_pb2.Empty:
        raise ttrpc.Unimplemented("checkpoint is not supported by kata-py (VM sandboxes)")

    async def Update(self, req: task_pb2.UpdateTaskRequest,
                     ctx: ttrpc.CallContext) -> empty_pb2.Empty:
        self._check(self._container(req.id).init, Event.UPDATE)
        assert self.sandbox is not None
        await self._agent_call(self.sandbox.update(
            metrics.update_request(req.id, req.resources.value)))
        return empty_pb2.Empty()

    async def Stats(self, req: task_pb2.StatsRequest,
                    ctx: ttrpc.CallContext) -> task_pb2.StatsResponse:
        self._container(req.id)
        assert self.sandbox is not None
        stats = await self._agent_call(self.sandbox.stats(req.id))
        return task_pb2.StatsResponse(stats=metrics.to_metrics(stats))

    async def _agent_call(self, aw: Awaitable[T]) -> T:
        try:
            return await aw
        except KataError as e:
            raise to_rpc(e) from None

    async def aclose(self) -> None:
        if self._oom_task is not None:
            self._oom_task.cancel()
        for c in list(self.containers.values()):
            for p in [c.init, *c.execs.values()]:
                self._close_io(p)
        if self.sandbox is not None:
            await self.sandbox.stop()
            self.sandbox = None
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)
        if self._cgroups is not None:
            self._cgroups.leave()
            self._cgroups = None
