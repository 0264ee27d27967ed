"""A container's processes as the shim keeps them: their ids and stdio as
containerd gave them, their life (lifecycle.py), and containerd's stdio
schemes (FIFOs, file:// logs, binary:// loggers)."""

from __future__ import annotations

import asyncio
import fcntl
import os
import subprocess
import sys
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from microvm.protocol import agent_pb2, ttrpc
from microvm.shim.events import timestamp
from microvm.shim.lifecycle import Lifecycle, Status

# What runc reports for a process that has not exited: Go's zero time.
ZERO_TIME_SECONDS = -62135596800


@dataclass
class Proc:
    """A container's init (exec_id "") or an exec, as containerd sees it."""

    cid: str
    exec_id: str
    stdin: str
    stdout: str
    stderr: str
    terminal: bool
    spec: agent_pb2.Process | None = None
    pid: int = 0
    exit_status: int = 0
    exited_at: float | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    pumps: list[asyncio.Task[None]] = field(default_factory=list)
    stdin_task: asyncio.Task[None] | None = None
    stdin_closed: asyncio.Event = field(default_factory=asyncio.Event)  # CloseIO said so
    # Waits for the exit and reports it; held here, as the loop holds a
    # task only weakly.
    watcher: asyncio.Task[None] | None = None
    fds: list[int] = field(default_factory=list)
    logger: subprocess.Popen[bytes] | None = None
    lc: Lifecycle = field(init=False)

    def __post_init__(self) -> None:
        self.lc = Lifecycle(self.exec_id or self.cid, init=not self.exec_id)

    @property
    def status(self) -> Status:
        return self.lc.status

    def exit_time(self) -> object:
        if self.exited_at is None:
            ts = timestamp(0)
            ts.seconds, ts.nanos = ZERO_TIME_SECONDS, 0
            return ts
        return timestamp(self.exited_at)


@dataclass
class Container:
    id: str
    bundle: str
    init: Proc
    rootfs_mounted: bool = False
    execs: dict[str, Proc] = field(default_factory=dict)
    # The spec's seccomp program: runc loads it for every exec too.
    seccomp: bytes = b""
    annotations: dict[str, str] = field(default_factory=dict)


_LOGGER_EXEC = """import os, sys
fds = [int(a) for a in sys.argv[1:4]]
for target, fd in zip((3, 4, 5), fds):
    os.dup2(fd, target)
    os.close(fd)
os.execv(sys.argv[4], sys.argv[4:])
"""


def start_logger(uri: str, cid: str, namespace: str) -> tuple[subprocess.Popen[bytes], int, int]:
    """containerd's binary:// logging: the logger reads stdout on fd 3 and
    stderr on fd 4, and closes fd 5 once it is ready.  Returns it and the
    write ends of its two pipes."""
    parsed = urllib.parse.urlsplit(uri)
    args = [parsed.path]
    for key, values in urllib.parse.parse_qs(parsed.query, keep_blank_values=True).items():
        args += [key, values[0]] if values and values[0] else [key]
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    ready_r, ready_w = os.pipe()
    # The child's ends go above 9, so moving them onto 3, 4, 5 cannot
    # overwrite one another.  A tiny exec wrapper moves them: no preexec_fn
    # (subprocess closes what it was not passed after that anyway), and
    # dash only redirects single-digit fds.
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (out_r, err_r, ready_w)]
    for fd in (out_r, err_r, ready_w):
        os.close(fd)
    out_r, err_r, ready_w = high
    env = {**os.environ, "CONTAINER_ID": cid, "CONTAINER_NAMESPACE": namespace}
    try:
        proc = subprocess.Popen([sys.executable, "-S", "-c", _LOGGER_EXEC, str(out_r),
                                 str(err_r), str(ready_w), *args], env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, pass_fds=(out_r, err_r, ready_w))
    except OSError as e:
        for fd in (out_r, out_w, err_r, err_w, ready_r, ready_w):
            os.close(fd)
        raise ttrpc.InvalidArgument(f"logging binary {parsed.path}: {e.strerror}") from None
    for fd in (out_r, err_r, ready_w):
        os.close(fd)
    try:
        os.read(ready_r, 1)  # EOF once the logger closed its end: ready
    finally:
        os.close(ready_r)
    return proc, out_w, err_w


def open_output(uri: str) -> int:
    """An fd to write a stream to: a FIFO, a file:// log, or /dev/null."""
    if not uri:
        return os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    if uri.startswith("file://"):
        path = Path(uri.removeprefix("file://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
    if "://" in uri and not uri.startswith("fifo://"):
        raise ttrpc.InvalidArgument(f"unknown STDIO scheme in {uri!r}")
    # O_RDWR: opening never blocks for a reader, and the reader sees EOF
    # when we close, not before.
    return os.open(uri.removeprefix("fifo://"), os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
