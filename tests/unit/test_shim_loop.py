"""The shim's event loop serves every container of a pod: nothing on it may
wait for a slow process.  Real processes, no VM (none is needed)."""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import time
from pathlib import Path

from microvm.config import Config
from microvm.core.sandbox import ContainerState, Sandbox
from microvm.core.stdio import pump_input
from microvm.protocol import agent_pb2, task_pb2
from microvm.shim.process import Container, Proc
from microvm.shim.task_service import TaskService
from microvm.vm import accel


def test_a_slow_logger_does_not_stop_the_loop() -> None:
    """A logger that takes its time over SIGTERM (here: ignores it) held the
    loop, and every other container's calls, for up to 2 s."""
    async def go() -> tuple[float, int | None]:
        svc = TaskService("ns", None, lambda: None)
        logger = subprocess.Popen(["sh", "-c", "trap '' TERM; echo ready; sleep 30"],
                                  stdout=subprocess.PIPE)
        assert logger.stdout is not None and logger.stdout.readline() == b"ready\n"
        p = Proc("c", "", "", "", "", False, logger=logger)
        t0 = time.monotonic()
        svc._close_io(p)
        blocked = time.monotonic() - t0
        await svc.aclose()  # waits for the logger to be stopped, off the loop
        return blocked, logger.poll()

    blocked, code = asyncio.run(go())
    assert blocked < 0.5, f"the loop was held for {blocked:.1f}s"
    assert code is not None  # and the logger did not outlive the shim


class _SlowGuest:
    """Stands in for the sandbox: a guest that takes a while over each chunk."""

    def __init__(self) -> None:
        self.got = bytearray()
        self.closed = False

    async def write_input(self, cid: str, data: bytes, exec_id: str = "") -> None:
        await asyncio.sleep(0.2)  # TCG, a busy guest
        self.got += data

    async def close_input(self, cid: str, exec_id: str = "") -> None:
        self.closed = True


def test_close_io_passes_on_all_of_stdin_then_closes_it(tmp_path: Path) -> None:
    """CloseIO while the client keeps the FIFO open (containerd's CRI can):
    everything already in the FIFO reaches the process before its EOF.  Was:
    the pump was cancelled 50 ms after CloseIO, whatever was left."""
    fifo = tmp_path / "stdin"
    os.mkfifo(fifo)
    data = bytes(range(256)) * 256  # 64 KiB: what a FIFO holds

    async def go() -> _SlowGuest:
        guest = _SlowGuest()
        svc = TaskService("ns", None, lambda: None)
        p = Proc("c", "", str(fifo), "", "", False)
        svc.containers["c"] = Container("c", "", p)
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        writer = os.open(fifo, os.O_WRONLY)  # held open, as the client's
        try:
            p.stdin_task = asyncio.create_task(
                pump_input(guest, "c", fd, "", p.stdin_closed))  # type: ignore[arg-type]
            await asyncio.sleep(0.1)  # no writer yet has written: no EOF either
            assert not guest.closed
            os.write(writer, data)
            await svc.CloseIO(task_pb2.CloseIORequest(id="c", stdin=True), None)  # type: ignore[arg-type]
            await asyncio.wait_for(p.stdin_task, 10)
        finally:
            os.close(writer)
            os.close(fd)
        return guest

    guest = asyncio.run(go())
    assert bytes(guest.got) == data and guest.closed


async def _stall_while(coro: object) -> float:
    """The longest the loop went without running a 10 ms ticker, while coro ran."""
    loop = asyncio.get_running_loop()
    worst, last, done = 0.0, loop.time(), False

    async def tick() -> None:
        nonlocal worst, last
        while not done:
            await asyncio.sleep(0.01)
            worst, last = max(worst, loop.time() - last), loop.time()

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.02)
    try:
        await coro  # type: ignore[misc]
    finally:
        done = True
        await ticker
    return worst


def test_removing_a_container_does_not_stop_the_loop(tmp_path: Path) -> None:
    """Unmounting a container and removing its upper layer (rm -r of what it
    wrote: seconds, for a big one) ran on the loop, freezing the pod's other
    containers."""
    async def go() -> float:
        sb = Sandbox(Config(), "sb", tmp_path, accel.Choice("tcg", "test", False))
        sb.containers["c"] = ContainerState("c", tmp_path / "rootfs")

        async def answered(method: str, req: object) -> agent_pb2.Empty:
            return agent_pb2.Empty()

        sb._call = answered  # type: ignore[method-assign]
        sb._unmount_container = lambda state: time.sleep(1)  # type: ignore[method-assign]
        return await _stall_while(sb.remove_container("c"))

    stall = asyncio.run(go())
    assert stall < 0.5, f"the loop was held for {stall:.1f}s"


def test_a_process_watcher_is_held_by_its_process() -> None:
    """The loop holds tasks only weakly: a watcher nobody referenced could be
    collected while it waited, and the exit never reported."""
    async def go() -> bool:
        svc = TaskService("ns", None, lambda: None)
        never: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        class Waiting:
            async def wait(self, cid: str, exec_id: str = "") -> int:
                return await never

        svc.sandbox = Waiting()  # type: ignore[assignment]
        p = Proc("c", "", "", "", "", False)
        svc._start_watch(p)
        await asyncio.sleep(0)
        gc.collect()
        alive = p.watcher is not None and not p.watcher.done()
        never.cancel()
        return alive

    assert asyncio.run(go())
