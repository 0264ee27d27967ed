"""Connecting our stdin/stdout/stderr (and terminal) to a container process.

Output is pulled from the agent (ReadStdout/ReadStderr): the agent stops
reading the process's pipe while its buffer is full, and we ask for more only
once the previous chunk was written, so a slow reader slows the process
down instead of filling memory anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import stat
import sys
import termios
import tty
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from microvm import forkserver
from microvm.core.sandbox import Sandbox

CHUNK = 64 * 1024
# Signals the CLI passes on to the container's process, as docker does
# (defined with the fork server's thin client, which passes them to its runner).
FORWARDED = forkserver.FORWARDED


async def _ready(fd: int, writable: bool, until: asyncio.Event | None = None) -> None:
    """Until fd can be read (or written) without blocking, or until is set."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    add, remove = (loop.add_writer, loop.remove_writer) if writable else \
        (loop.add_reader, loop.remove_reader)

    def fire() -> None:
        if not fut.done():
            fut.set_result(None)

    add(fd, fire)
    waiter = asyncio.ensure_future(until.wait()) if until is not None else None
    try:
        await (fut if waiter is None else
               asyncio.wait({fut, waiter}, return_when=asyncio.FIRST_COMPLETED))
    finally:
        remove(fd)
        if waiter is not None:
            waiter.cancel()


async def _write_all(fd: int, data: bytes) -> None:
    """Write to our stdout/stderr (or a FIFO) without blocking the loop."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
            view = view[n:]
        except BlockingIOError:
            await _ready(fd, writable=True)


async def read_chunks(fd: int, done: asyncio.Event | None = None) -> AsyncIterator[bytes]:
    """What fd yields until EOF, without blocking the loop (files never block).
    done: set by a writer that is finished but may keep its end open (CloseIO):
    from then on, until nothing more is buffered."""
    regular = stat.S_ISREG(os.fstat(fd).st_mode)
    if not regular:
        os.set_blocking(fd, False)
    while True:
        if not regular:
            # Waited for first: a FIFO no writer opened yet reads as EOF.
            await _ready(fd, writable=False, until=done)
            if done is not None and done.is_set() and not _pending(fd):
                return
        try:
            data = os.read(fd, CHUNK)
        except BlockingIOError:
            continue
        if not data:
            return
        yield data


def _pending(fd: int) -> bool:
    """Whether a read of fd would not block (data, or its end)."""
    poll = select.poll()
    poll.register(fd, select.POLLIN)
    return bool(poll.poll(0))


async def copy_fd(src: int, dst: int) -> None:
    """Copy src to dst until EOF on src (a FIFO's last writer gone, a file's end)."""
    async for data in read_chunks(src):
        await _write_all(dst, data)


async def pump_output(sb: Sandbox, cid: str, stream: str, fd: int, exec_id: str = "") -> None:
    while True:
        data = await sb.read_output(cid, stream, exec_id, CHUNK)
        if not data:
            return
        try:
            await _write_all(fd, data)
        except BrokenPipeError:
            # Our reader went away; keep draining so the process is not stuck.
            fd = os.open(os.devnull, os.O_WRONLY)


async def pump_input(sb: Sandbox, cid: str, fd: int, exec_id: str = "",
                     done: asyncio.Event | None = None) -> None:
    """fd to the process's stdin, then EOF (see read_chunks for done)."""
    try:
        async for data in read_chunks(fd, done):
            await sb.write_input(cid, data, exec_id)
    finally:
        with contextlib.suppress(Exception):
            await sb.close_input(cid, exec_id)


class Terminal:
    """Raw mode on our terminal for the container's pty, restored on exit."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._saved: list[Any] | None = None

    def size(self) -> tuple[int, int]:
        try:
            cols, rows = os.get_terminal_size(self.fd)
            return rows, cols
        except OSError:
            return 24, 80

    def __enter__(self) -> Terminal:
        if os.isatty(self.fd):
            self._saved = termios.tcgetattr(self.fd)
            tty.setraw(self.fd)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)


@contextlib.contextmanager
def forwarding(to_signal: Callable[[int], Awaitable[None]],
               to_resize: Callable[[int, int], Awaitable[None]] | None,
               tty_fd: int) -> Iterator[None]:
    """While inside: the signals docker forwards go to to_signal(sig), and
    (with to_resize) our terminal's size, at each SIGWINCH, to
    to_resize(rows, cols).  Failures are dropped: the process may be gone."""
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()  # held: the loop keeps tasks weakly

    def later(aw: Awaitable[None]) -> None:
        task = loop.create_task(_quietly(aw))
        pending.add(task)
        task.add_done_callback(pending.discard)

    def forward(sig: int) -> None:
        later(to_signal(sig))

    def resized(resize: Callable[[int, int], Awaitable[None]]) -> None:
        later(resize(*Terminal(tty_fd).size()))

    for sig in FORWARDED:
        loop.add_signal_handler(sig, forward, sig)
    if to_resize is not None:
        loop.add_signal_handler(signal.SIGWINCH, resized, to_resize)
    try:
        yield
    finally:
        for sig in (*FORWARDED, signal.SIGWINCH):
            loop.remove_signal_handler(sig)


async def attach(sb: Sandbox, cid: str, *, stdin: bool, terminal: bool,
                 exec_id: str = "") -> int:
    """Stream until the process exits and its output is drained; its exit status."""
    out_fd, err_fd = sys.stdout.fileno(), sys.stderr.fileno()
    for fd in (out_fd, err_fd):
        os.set_blocking(fd, False)
    tasks = [asyncio.create_task(pump_output(sb, cid, "stdout", out_fd, exec_id))]
    if not terminal:
        tasks.append(asyncio.create_task(pump_output(sb, cid, "stderr", err_fd, exec_id)))
    input_task = None
    if stdin:
        input_task = asyncio.create_task(pump_input(sb, cid, sys.stdin.fileno(), exec_id))

    async def resize(rows: int, cols: int) -> None:
        await sb.resize(cid, rows, cols, exec_id)

    async def signal_(sig: int) -> None:
        await sb.signal(cid, sig, exec_id)

    try:
        with forwarding(signal_, resize if terminal and os.isatty(out_fd) else None, out_fd):
            status = await sb.wait(cid, exec_id)
            await asyncio.gather(*tasks)
            return status
    finally:
        for t in [*tasks, *([input_task] if input_task else [])]:
            t.cancel()
        await asyncio.gather(*tasks, *([input_task] if input_task else []),
                             return_exceptions=True)
        for fd in (out_fd, err_fd):
            os.set_blocking(fd, True)


async def _quietly(aw: Awaitable[None]) -> None:
    with contextlib.suppress(Exception):
        await aw
