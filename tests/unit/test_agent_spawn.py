"""guest.agent.Agent._spawn: the set-up handshake with forked children.

Runs the agent's real fork and socket code on the host; the children stand in
for container set-up, which needs the guest's namespaces.
"""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from guest import container
from guest.agent import Agent
from microvm.protocol import agent_pb2, ttrpc


def _spawn(child: object) -> int:
    async def go() -> int:
        agent = Agent(0.0)
        proc = await agent._spawn("c", "", agent_pb2.Process(args=["true"]), child)
        await asyncio.wait_for(proc.exited, 10)
        return proc.pid

    return asyncio.run(go())


def _grandchild_first(sock: socket.socket, spec: object, stdio: object) -> int:
    # What a busy guest does: the grandchild's "ready" overtakes child A's "pid".
    container.send(sock, {"ready": True})
    container.send(sock, {"pid": os.getpid()})
    return 0


def _pid_first(sock: socket.socket, spec: object, stdio: object) -> int:
    container.send(sock, {"pid": os.getpid()})
    container.send(sock, {"ready": True})
    return 0


def _silent(sock: socket.socket, spec: object, stdio: object) -> int:
    return 0


@pytest.mark.parametrize("child", [_grandchild_first, _pid_first])
def test_pid_and_ready_in_either_order(child: object) -> None:
    assert _spawn(child) > 0


def test_a_child_that_says_nothing_is_an_error() -> None:
    with pytest.raises(ttrpc.FailedPrecondition, match="without a word"):
        _spawn(_silent)


def _forks_the_process(sock: socket.socket, spec: object, stdio: object) -> int:
    # As container.run_init: child A forks the container's process, which
    # reports, and exits itself at once.
    if os.fork() == 0:
        container.send(sock, {"pid": os.getpid()})
        container.send(sock, {"ready": True})
        os._exit(0)
    return 0


def test_no_exit_is_kept_for_ever(monkeypatch: pytest.MonkeyPatch) -> None:
    """Child A's exit was nobody's: one entry stayed in _early_exits per
    create or exec, and after pid wrap-around a new process with that pid
    would have been reported as exited at once."""
    children_a: list[int] = []
    fork = os.fork

    def recording_fork() -> int:
        pid = fork()
        if pid:
            children_a.append(pid)
        return pid

    monkeypatch.setattr(os, "fork", recording_fork)

    async def go() -> list[int]:
        agent = Agent(0.0)
        for _ in range(5):
            await agent._spawn("c", "", agent_pb2.Process(args=["true"]), _forks_the_process)
        await asyncio.sleep(0.2)  # child A has exited and been reaped
        agent._reap()
        # (The test process may reap others' orphans too: it is a subreaper.)
        return [pid for pid in agent._early_exits if pid in children_a[:5]]

    assert asyncio.run(go()) == []
    assert len(children_a) >= 5


def test_a_recycled_pid_is_not_reported_exited() -> None:
    async def go() -> bool:
        agent = Agent(0.0)
        agent._early_exits[4242] = ((0, 0.0), 1.0)  # an exit seen long ago
        return agent._early_exit(4242, forked_after=2.0) is None

    assert asyncio.run(go())


def test_a_tool_with_more_output_than_a_pipe_holds_finishes() -> None:
    async def go() -> tuple[int, str]:
        agent = Agent(0.0)
        return await asyncio.wait_for(agent.run_tool(
            ["/bin/sh", "-c", "head -c 200000 /dev/zero | tr '\\0' x; echo end"]), 20)

    code, out = asyncio.run(go())
    assert code == 0 and out.endswith("xend\n") and len(out) <= 65536
