"""The CLI's detached containers: the shim containerd runs, driven as containerd does.

`microvm run -d` writes a bundle, runs `containerd-shim-kata-py-v2 ... start`
in it and calls Create and Start over ttrpc; the shim then owns the VM and
outlives the CLI.  The other verbs find the shim through the bundle's
`address` file.  One daemon implementation, two clients.

State: /var/lib/kata-py/containers/<name>/ holds the bundle (config.json),
the container's upper layer, container.log (its stdout and stderr), log
(the shim's own messages) and meta.json.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import any_pb2, json_format

from microvm import paths
from microvm.config import FIRMWARE_ANNOTATION
from microvm.core import oci, rootmount
from microvm.core.volumes import Volume
from microvm.errors import KataError, VMError
from microvm.net.network import NetworkSpec, to_annotations
from microvm.protocol import agent_pb2, task_pb2, ttrpc
from microvm.shim.client import TaskClient

log = logging.getLogger(__name__)

NAMESPACE = "microvm"
STATES = {task_pb2.UNKNOWN: "unknown", task_pb2.CREATED: "created",
          task_pb2.RUNNING: "running", task_pb2.STOPPED: "exited", task_pb2.PAUSED: "paused",
          task_pb2.PAUSING: "pausing"}
_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}")
# docker's rule for a new name (at least two characters); 64 at most, as above.
_NEW_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{1,63}")


def root() -> Path:
    # Root's alone, as the image store: upper layers and logs live here.
    return paths.private("containers")


@dataclass
class Meta:
    name: str
    rootfs: str
    command: list[str]
    created: float
    read_only: bool = False
    tty: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    image: str = ""             # the image reference, when run from one
    ports: list[str] = field(default_factory=list)   # published, as docker ps shows them
    id: str = ""                # 64 hex digits, as docker's; derived for older records
    image_arg: str = ""         # the image (or rootfs) as the user named it, for ps

    def __post_init__(self) -> None:
        if not self.id:
            self.id = hashlib.sha256(f"{self.name}\0{self.created}".encode()).hexdigest()


@dataclass
class Listed:
    """A container as ps shows it."""

    meta: Meta
    status: str            # creating, created, running, paused, exited, gone
    exit_status: int = 0
    exited_at: float = 0.0  # seconds since the epoch, once exited


def _dir(name: str) -> Path:
    # fullmatch: a trailing newline must not pass as the end of the name.
    if not _NAME.fullmatch(name):
        raise KataError(f"invalid container name {_shown(name)}")
    return root() / name


def resolve(name: str) -> str:
    """The container's name, from its name or (docker's habit) a unique
    prefix of its ID; name itself if neither matches (the verb then says
    there is no such container)."""
    if _dir(name).exists() or not re.fullmatch(r"[0-9a-f]{1,64}", name) \
            or not root().exists():
        return name
    found = [m.parent.name for m in root().glob("*/meta.json") if read_meta(m).id.startswith(name)]
    if len(found) > 1:
        raise KataError(f"{name} names more than one container: give more of the ID")
    return found[0] if found else name


def read_meta(path: Path) -> Meta:
    return Meta(**json.loads(path.read_text()))


def check_name(name: str) -> None:
    """A name given to `run -d --name`: docker's rule, so '' is refused, not
    replaced by a generated one."""
    if not _NEW_NAME.fullmatch(name):
        raise KataError(f"invalid container name {_shown(name)}: only "
                        "[a-zA-Z0-9][a-zA-Z0-9_.-]+ (2 to 64 characters) are allowed")


def _shown(name: str) -> str:
    return repr(name if len(name) <= 64 else name[:64] + "...")


SHIM_START_TIMEOUT = 30.0
# How long rm gives a shim to end its container and VM before it kills it
# (rm must be done within 5 s, whatever the shim or its VM do).
SHIM_POLITE = 3.0
# The shim binary's `delete` (what containerd runs after a shim's end): a
# fork server's child, or in-process if that server does not answer.
SHIM_DELETE = 10.0


def address(name: str) -> str:
    """The socket of the shim serving container name ("" if it has none)."""
    d = _dir(name)
    if not d.exists():
        raise KataError(f"no such container: {name}")
    try:
        return _address(d)
    except OSError:
        return ""


def _address(d: Path) -> str:
    """The path of the shim's socket, from the bundle (OSError if it has none)."""
    return (d / "address").read_text().strip().removeprefix("unix://")


def _shim_binary() -> str:
    here = Path(sys.executable).with_name("containerd-shim-kata-py-v2")
    return str(here) if here.exists() else "containerd-shim-kata-py-v2"


@contextlib.asynccontextmanager
async def _client(name: str) -> AsyncIterator[TaskClient]:
    d = _dir(name)
    if not d.exists():
        raise KataError(f"no such container: {name}")
    async with contextlib.AsyncExitStack() as stack:
        try:
            client = await stack.enter_async_context(TaskClient.connect(_address(d), NAMESPACE))
        except OSError:
            raise KataError(f"container {name} is not running (its shim is gone)") from None
        yield client


def _spec(process: agent_pb2.Process, hostname: str, read_only: bool,
          annotations: dict[str, str], volumes: list[Volume] | None = None,
          privileges: oci.Privileges | None = None) -> dict[str, Any]:
    privileges = privileges or oci.Privileges()
    caps = ({"capabilities": json_format.MessageToDict(process.capabilities)}
            if process.HasField("capabilities") else {})
    return {
        "annotations": annotations,
        "mounts": [{"destination": v.destination, "type": "bind", "source": v.source,
                    "options": ["rbind", "ro" if v.readonly else "rw", f"r{v.propagation}"]}
                   for v in volumes or []],
        "ociVersion": "1.0.2",
        "process": {"terminal": process.terminal,
                    **({"consoleSize": {"height": process.rows, "width": process.cols}}
                       if process.terminal and process.rows else {}),
                    "args": list(process.args),
                    "env": list(process.env), "cwd": process.cwd or "/",
                    "user": {"uid": process.user.uid, "gid": process.user.gid,
                             "additionalGids": list(process.user.additional_gids)},
                    **caps},
        "root": {"path": "rootfs", "readonly": read_only},
        "hostname": hostname,
        "linux": {"resources": {"devices": [oci.device_json(d) for d in privileges.devices]},
                  "maskedPaths": list(privileges.masked_paths),
                  "readonlyPaths": list(privileges.readonly_paths)},
    }


async def run_detached(name: str | None, rootfs: Path | list[Path], process: agent_pb2.Process,
                       hostname: str, read_only: bool, config_path: str | None,
                       image: str = "", network: NetworkSpec | None = None,
                       volumes: list[Volume] | None = None,
                       privileges: oci.Privileges | None = None, image_arg: str = "",
                       firmware: str | None = None) -> str:
    if name is None:
        name = secrets.token_hex(6)
    else:
        check_name(name)
    d = _dir(name)
    try:
        d.mkdir(parents=True, mode=0o700)
    except FileExistsError:
        raise KataError(f"the container name {name!r} is already in use") from None
    try:
        (d / "rootfs").mkdir()
        (d / "upper").mkdir()
        (d / "work").mkdir()
        # The shim makes the network (it owns the namespace, and the ports).
        meta_id = secrets.token_hex(32)
        # For the events journal (shim/journal.py): docker's event attributes.
        annotations = {**to_annotations(network or NetworkSpec()),
                       "io.containerd.kata-py.id": meta_id,
                       "io.containerd.kata-py.image": image_arg}
        if firmware == "secure":
            annotations[FIRMWARE_ANNOTATION] = firmware
        (d / "config.json").write_text(json.dumps(_spec(process, hostname, read_only,
                                                        annotations, volumes, privileges)))
        # Where the shim writes its own diagnostics (containerd passes a FIFO here).
        (d / "log").touch(mode=0o600)
        lowers = rootfs if isinstance(rootfs, list) else [rootfs]  # bottom first
        meta = Meta(name, str(lowers[-1]), list(process.args), time.time(), read_only,
                    process.terminal, image=image,
                    ports=[str(p) for p in (network.ports if network else ())],
                    id=meta_id, image_arg=image_arg)
        (d / "meta.json").write_text(json.dumps(asdict(meta)))
        start = subprocess.run(
            [_shim_binary(), "-namespace", NAMESPACE, "-address", str(paths.RUN / "microvm"),
             "-id", name, "start"], cwd=d, capture_output=True, text=True,
            timeout=SHIM_START_TIMEOUT)
        if start.returncode != 0:
            raise KataError(f"shim start failed: {start.stdout.strip() or start.stderr.strip()}")
        root = rootmount.plan(lowers, read_only, d / "upper", d / "work")
        mount = task_pb2.Mount(type=root.type, source=root.source, options=list(root.options))
        log = f"file://{d / 'container.log'}"
        options = None
        if config_path:
            opts = task_pb2.RuntimeOptions(config_path=config_path)
            options = any_pb2.Any(type_url="runtimeoptions.v1.Options",
                                  value=opts.SerializeToString())
        async with _client(name) as client:
            await client.create(task_pb2.CreateTaskRequest(
                id=name, bundle=str(d), rootfs=[mount], terminal=process.terminal,
                stdout=log, stderr=log, options=options))
            await client.start(name)
    except BaseException:
        with contextlib.suppress(Exception):
            await remove(name, force=True)
        raise
    return name


async def state(name: str) -> tuple[str, int, int]:
    """(status, pid, exit status); status "gone" when the shim is not there,
    "creating" while it is but its VM and task are still being made."""
    status, pid, code, _ = await _state(name)
    return status, pid, code


async def _state(name: str) -> tuple[str, int, int, float]:
    """state(), and when it exited (seconds since the epoch; 0 if it has not)."""
    d = _dir(name)
    if not (d / "address").exists():
        # run -d writes the bundle first, then starts the shim, which
        # writes its address: until then the container is being made
        # (unless that run -d died long ago).
        with contextlib.suppress(OSError):
            if time.time() - (d / "meta.json").stat().st_mtime < SHIM_START_TIMEOUT:
                return "creating", 0, 0, 0.0
        return "gone", 0, 0, 0.0
    try:
        async with _client(name) as client:
            try:
                s = await client.state(name, timeout=2)
            except KataError as e:
                # NotFound: the shim runs, its Create has not come yet.
                return ("creating" if e.status == ttrpc.NOT_FOUND else "gone"), 0, 0, 0.0
            exited = s.exited_at.seconds + s.exited_at.nanos / 1e9 \
                if s.status == task_pb2.STOPPED else 0.0
            return STATES.get(s.status, "unknown"), s.pid, s.exit_status, exited
    except KataError:
        return "gone", 0, 0, 0.0


async def list_all() -> list[Listed]:
    """Every container, oldest first (ps shows the newest first)."""
    metas = [read_meta(d) for d in root().glob("*/meta.json")] if root().exists() else []
    states = await asyncio.gather(*(_state(m.name) for m in metas))
    return sorted((Listed(m, status, code, exited) for m, (status, _, code, exited)
                   in zip(metas, states, strict=True)), key=lambda x: x.meta.created)


async def kill(name: str, sig: int) -> None:
    async with _client(name) as client:
        await client.kill(name, sig, all=True)


async def stop(name: str, timeout: float) -> None:
    async with _client(name) as client:
        s = await client.state(name)
        if s.status != task_pb2.RUNNING:
            return
        with contextlib.suppress(KataError):
            await client.kill(name, signal.SIGTERM)
        try:
            await client.wait(name, timeout=timeout)
        except KataError:
            with contextlib.suppress(KataError):
                await client.kill(name, signal.SIGKILL, all=True)
            await client.wait(name, timeout=30)


async def remove(name: str, force: bool) -> None:
    d = _dir(name)
    if not d.exists():
        raise KataError(f"no such container: {name}")
    status, _, _ = await state(name)
    if status in ("running", "paused", "creating") and not force:
        raise KataError(f"container {name} is {status}: stop it first or use rm -f")
    shim = _shim_pid(d)
    if status == "gone" and shim:
        await _kill_and_wait(shim)  # it holds its socket but does not answer
    elif status != "gone":
        try:
            await asyncio.wait_for(_remove_politely(name, status, d), SHIM_POLITE)
        except (TimeoutError, KataError):
            # A stuck shim, or a shim stuck on its VM: never a reason to keep
            # either.  Its helpers die with it (PR_SET_PDEATHSIG).
            if shim:
                log.debug("container %s: its shim (pid %d) did not finish; killing it",
                          name, shim)
                await _kill_and_wait(shim)
    # As containerd does after every task: the shim's own clean-up action
    # (the network plumbing and cgroup a killed shim left).
    try:
        subprocess.run([_shim_binary(), "-namespace", NAMESPACE, "-id", name, "-bundle",
                        str(d), "delete"], cwd=d, capture_output=True, timeout=SHIM_DELETE)
    except subprocess.TimeoutExpired:
        # Its record stays, so that a later rm finds what is left to undo.
        raise KataError(f"container {name}: the shim's delete did not end in "
                        f"{SHIM_DELETE:g} s; try again") from None
    shutil.rmtree(d, ignore_errors=True)


async def _remove_politely(name: str, status: str, d: Path) -> None:
    async with _client(name) as client:
        await client.release(name, running=status in ("running", "paused", "created",
                                                     "creating"))
    if not await _shim_gone(d, SHIM_POLITE):  # it answered: it ends by itself
        raise KataError("the shim did not finish")


def _shim_pid(d: Path) -> int:
    """The shim's pid, from its socket's peer credentials (a stopped shim's
    kernel still accepts the connection); 0 if there is none."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
        s.settimeout(1)
        s.connect(_address(d))
        pid, _, _ = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                     struct.calcsize("3i")))
        return int(pid)
    return 0


async def _kill_and_wait(pid: int, timeout: float = 2.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = asyncio.get_running_loop().time() + timeout
    while os.path.exists(f"/proc/{pid}") and asyncio.get_running_loop().time() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[-1].split()[0] == "Z":
                break  # dead; its parent (init) reaps it
        await asyncio.sleep(0.02)


async def _shim_gone(d: Path, timeout: float) -> bool:
    """Until the shim has powered its VM off and removed its socket (the
    last thing it does): rm returns only once nothing of it runs."""
    try:
        sock = Path(_address(d))
    except OSError:
        return True
    deadline = asyncio.get_running_loop().time() + timeout
    while sock.exists():
        if asyncio.get_running_loop().time() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def exec_process(name: str, process: agent_pb2.Process, interactive: bool) -> int:
    from microvm.core.stdio import Terminal, copy_fd, forwarding

    exec_id = "exec-" + secrets.token_hex(4)
    with tempfile.TemporaryDirectory(prefix="microvm-exec-") as tmp:
        fifos = {s: Path(tmp) / s for s in ("stdin", "stdout", "stderr")}
        for f in fifos.values():
            os.mkfifo(f, 0o600)
        # Ours open first, so the shim's opens never wait for a peer.
        out_fd = os.open(fifos["stdout"], os.O_RDONLY | os.O_NONBLOCK)
        err_fd = os.open(fifos["stderr"], os.O_RDONLY | os.O_NONBLOCK)
        in_fd = os.open(fifos["stdin"], os.O_RDWR | os.O_NONBLOCK) if interactive else -1
        spec = _spec(process, "", False, {})["process"]
        async with _client(name) as client:
            await client.exec(task_pb2.ExecProcessRequest(
                id=name, exec_id=exec_id, terminal=process.terminal,
                stdin=str(fifos["stdin"]) if interactive else "", stdout=str(fifos["stdout"]),
                stderr="" if process.terminal else str(fifos["stderr"]),
                spec=any_pb2.Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/"
                                 "Process", value=json.dumps(spec).encode())))
            with Terminal(sys.stdin.fileno()) if process.terminal and interactive \
                    else contextlib.nullcontext():
                await client.start(name, exec_id)
                pumps = [asyncio.create_task(copy_fd(out_fd, sys.stdout.fileno()))]
                if not process.terminal:
                    pumps.append(asyncio.create_task(copy_fd(err_fd, sys.stderr.fileno())))
                feeder = None
                if interactive:
                    feeder = asyncio.create_task(_feed_stdin(in_fd))

                async def resize(rows: int, cols: int) -> None:
                    await client.resize_pty(name, exec_id, cols, rows)

                async def signal_(sig: int) -> None:
                    await client.kill(name, sig, exec_id)

                try:
                    with forwarding(signal_, resize if process.terminal else None,
                                    sys.stdout.fileno()):
                        w = await client.wait(name, exec_id)
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(asyncio.gather(*pumps), 5)
                finally:
                    for t in [*pumps, *([feeder] if feeder else [])]:
                        t.cancel()
                with contextlib.suppress(KataError):
                    await client.delete(name, exec_id)
        # in_fd is the feeder's: it closes it (that close is the EOF).
        for fd in (out_fd, err_fd):
            os.close(fd)
        if feeder is None and in_fd >= 0:
            os.close(in_fd)
        death = _death(name)
        if death:  # the process ended with its VM: say why, as run does
            raise VMError(death)
        return int(w.exit_status)


def _death(name: str) -> str:
    """Why the container's VM is gone, as its shim wrote it ("" if it is not)."""
    try:
        return (_dir(name) / paths.BUNDLE_DEATH).read_text().strip()[:500]
    except OSError:
        return ""


async def _feed_stdin(fifo_fd: int) -> None:
    from microvm.core.stdio import copy_fd
    try:
        await copy_fd(sys.stdin.fileno(), fifo_fd)
    finally:
        # Our O_RDWR end is the FIFO's only writer: closing it is the EOF.
        with contextlib.suppress(OSError):
            os.close(fifo_fd)


async def logs(name: str, follow: bool) -> None:
    path = _dir(name) / "container.log"
    if not _dir(name).exists():
        raise KataError(f"no such container: {name}")
    offset = 0
    while True:
        with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
            offset += len(data)
            if data:
                sys.stdout.buffer.write(data)
                sys.stdout.flush()
        if not follow:
            return
        status, _, _ = await state(name)
        if status not in ("running", "paused", "created", "creating"):
            # One last read for what came before the exit.
            follow = False
            continue
        await asyncio.sleep(0.2)


async def inspect(name: str) -> dict[str, Any]:
    d = _dir(name)
    if not (d / "meta.json").exists():
        raise KataError(f"no such container: {name}")
    meta = asdict(read_meta(d / "meta.json"))
    status, pid, code = await state(name)
    out = {**meta, "state": {"status": status, "pid": pid, "exit_code": code},
           "bundle": str(d), "log_path": str(d / "container.log"), "shim_log": str(d / "log"),
           "config": json.loads((d / "config.json").read_text())}
    if status in ("running", "paused", "created"):
        with contextlib.suppress(KataError):
            out["firmware"], out["attestation"] = await attestation(name)
    return out


async def attestation(name: str) -> tuple[str, dict[str, Any] | None]:
    """The sandbox's firmware flavour, and for the secure one the check of
    its measured boot, as its shim made it before the container started."""
    async with _client(name) as client:
        info = await client.describe()
    if info.firmware != "secure":
        return info.firmware or "default", None
    a = info.attestation
    return info.firmware, {
        "passed": a.passed, "detail": a.detail,
        "pcrs": [{"index": p.index, "what": p.what, "expected": p.expected,
                  "measured": p.measured} for p in a.pcrs]}
