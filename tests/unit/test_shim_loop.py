"""The shim's event loop serves every container of a pod: nothing on it may
wait for a slow process.  Real processes, no VM (none is needed)."""

from __future__ import annotations

import asyncio
import subprocess
import time

from microvm.task_service import Proc, TaskService


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
