"""Why a sandbox ended, when its agent's channel closes before QEMU's
pidfd watcher has run.  A real process stands in for QEMU; no VM is needed."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from pathlib import Path

from microvm.config import Config
from microvm.core.sandbox import HELPER_GRACE, Sandbox
from microvm.vm import accel, helpers


class Running:
    """What the sandbox reads of its Machine: the process and its wait
    (a real process stands in for QEMU)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(["sleep", "30"])

    async def wait(self, timeout: float | None = None) -> int | None:
        return await helpers.wait(self.proc, timeout)


class _Killed(Running):
    def __init__(self) -> None:
        super().__init__()
        self.proc.kill()


def test_a_killed_qemu_is_named_even_before_its_watcher_runs(tmp_path: Path) -> None:
    """CI once saw "the VM closed the agent's channel during boot" for a
    SIGKILLed QEMU: the channel's end came first, the watcher's callback
    had not run, and the reason was lost."""
    async def go() -> str:
        sb = Sandbox(Config(), "sb", tmp_path, accel.Choice("tcg", "test", False))
        sb.machine = _Killed()  # type: ignore[assignment]
        return await sb._gone()

    assert asyncio.run(go()) == "QEMU died (signal 9)"


async def _watch_a_clean_helper_exit(tmp_path: Path, kill_qemu_after: float | None) -> str:
    sb = Sandbox(Config(), "sb", tmp_path, accel.Choice("tcg", "test", False))
    qemu = Running()
    sb.machine = qemu  # type: ignore[assignment]
    helper = subprocess.Popen(["true"])
    async with contextlib.AsyncExitStack() as stack:
        sb._watch_process(helper, "virtiofsd", stack)
        sb._watch_process(qemu.proc, "QEMU", stack)
        if kill_qemu_after is not None:
            await asyncio.sleep(kill_qemu_after)
            qemu.proc.kill()
        # As the sandbox waits for QEMU's end (_gone): its pidfd's callback
        # may not have run by the time a poll has seen it reaped.
        await sb._settle(HELPER_GRACE + 2)
    helper.wait()
    return sb.death


def test_a_helper_that_left_because_qemu_died_names_qemu(tmp_path: Path) -> None:
    """CI once saw "virtiofsd exited (status 0)" for a SIGKILLed QEMU:
    virtiofsd saw its socket close before QEMU could be reaped."""
    assert asyncio.run(_watch_a_clean_helper_exit(tmp_path, 0.2)) == "QEMU died (signal 9)"


def test_a_helper_that_left_cleanly_on_its_own_is_named_and_ends_the_vm(tmp_path: Path) -> None:
    assert asyncio.run(_watch_a_clean_helper_exit(tmp_path, None)) == "virtiofsd exited (status 0)"
