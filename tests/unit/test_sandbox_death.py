"""Why a sandbox ended, when its agent's channel closes before QEMU's
pidfd watcher has run.  A real process stands in for QEMU; no VM is needed."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

from microvm.config import Config
from microvm.core.sandbox import Sandbox
from microvm.vm import accel, helpers


class _Killed:
    """What the sandbox reads of its Machine: the process and its wait."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(["sleep", "30"])
        self.proc.kill()

    async def wait(self, timeout: float | None = None) -> int | None:
        return await helpers.wait(self.proc, timeout)


def test_a_killed_qemu_is_named_even_before_its_watcher_runs(tmp_path: Path) -> None:
    """CI once saw "the VM closed the agent's channel during boot" for a
    SIGKILLed QEMU: the channel's end came first, the watcher's callback
    had not run, and the reason was lost."""
    async def go() -> str:
        sb = Sandbox(Config(), "sb", tmp_path, accel.Choice("tcg", "test", False))
        sb.machine = _Killed()  # type: ignore[assignment]
        return await sb._gone()

    assert asyncio.run(go()) == "QEMU died (signal 9)"
