"""The host refuses a guest agent of another protocol in one line, whether
it answers AdoptSandbox with its details (12 on) or with nothing (before).
The agent is a stand-in (no VM): its answers are what old images send."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from microvm.config import Config
from microvm.core.sandbox import Sandbox
from microvm.errors import VMError
from microvm.protocol import PROTOCOL_VERSION, agent_pb2, ttrpc
from microvm.vm import accel
from tests.unit.test_sandbox_death import Running


class _Agent:
    def __init__(self, adopt: Any, details: int) -> None:
        self.adopt, self.details, self.calls = adopt, details, []  # type: ignore[var-annotated]

    async def call(self, method: str, request: object) -> object:
        self.calls.append(method)
        if method == "GetGuestDetails":
            return agent_pb2.GuestDetails(protocol_version=self.details)
        if isinstance(self.adopt, Exception):
            raise self.adopt
        return self.adopt


def _adopt(tmp_path: Path, agent: _Agent) -> str:
    async def go() -> str:
        sb = Sandbox(Config(), "sb", tmp_path, accel.Choice("tcg", "test", False))
        machine = Running()
        sb.machine = machine  # type: ignore[assignment]
        sb.agent = agent  # type: ignore[assignment]
        try:
            await sb._adopt(mount_share=False)
            return "adopted"
        except (VMError, ttrpc.RpcError) as e:
            return str(e)
        finally:
            machine.proc.kill()
            machine.proc.wait()

    return asyncio.run(go())


def test_the_adopt_answer_carries_the_details(tmp_path: Path) -> None:
    agent = _Agent(agent_pb2.GuestDetails(protocol_version=PROTOCOL_VERSION), PROTOCOL_VERSION)
    assert _adopt(tmp_path, agent) == "adopted"
    assert agent.calls == ["AdoptSandbox"]  # no second round trip


@pytest.mark.parametrize("adopt", [agent_pb2.GuestDetails(), agent_pb2.GuestDetails(
    protocol_version=PROTOCOL_VERSION + 1)], ids=["empty (before 12)", "newer"])
def test_another_protocol_is_refused_by_number(tmp_path: Path, adopt: object) -> None:
    theirs = adopt.protocol_version or PROTOCOL_VERSION - 1  # type: ignore[attr-defined]
    said = _adopt(tmp_path, _Agent(adopt, theirs))
    assert said == (f"guest agent speaks protocol {theirs}, this host {PROTOCOL_VERSION}: "
                    "rebuild the guest image")


def test_an_agent_without_adopt_is_refused_by_number(tmp_path: Path) -> None:
    said = _adopt(tmp_path, _Agent(ttrpc.Unimplemented("unknown method AdoptSandbox"), 5))
    assert said.startswith("guest agent speaks protocol 5,")


def test_a_failed_adopt_of_a_current_agent_keeps_its_own_error(tmp_path: Path) -> None:
    err = ttrpc.FailedPrecondition("adopting the VM: mount failed")
    said = _adopt(tmp_path, _Agent(err, PROTOCOL_VERSION))
    assert "mount failed" in said


def test_the_agent_reads_its_fixed_details_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A clone answers with its template's memory and boot id without
    reading /proc again; the times are each call's own."""
    import builtins

    from guest.agent import Agent

    async def go() -> tuple[agent_pb2.GuestDetails, agent_pb2.GuestDetails]:
        agent = Agent(1.5)
        first = agent._details()

        def no_reading(*a: object, **kw: object) -> object:
            raise AssertionError(f"read {a[0]!r} again")

        monkeypatch.setattr(builtins, "open", no_reading)
        agent.ready_at = 2.5
        return first, agent._details()

    first, second = asyncio.run(go())
    assert first.mem_total_bytes > 0 and second.boot_id == first.boot_id
    assert second.protocol_version == PROTOCOL_VERSION
    assert (first.agent_ready, second.agent_started, second.agent_ready) == (0.0, 1.5, 2.5)
