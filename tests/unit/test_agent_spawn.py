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
