"""guest.agent.Agent._spawn: the set-up handshake with forked children.

Runs the agent's real fork, pid namespace and socket code on the host (as
root); the children stand in for container set-up, which needs the guest.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from guest import agent as agent_module
from guest import container
from guest.agent import Agent
from microvm.protocol import agent_pb2, ttrpc


def _spawn(child: object, pid_ns_of: int = 0) -> int:
    async def go() -> int:
        agent = Agent(0.0)
        proc = await agent._spawn("c", "", agent_pb2.Process(args=["true"]), child,
                                  pid_ns_of=pid_ns_of)
        await asyncio.wait_for(proc.exited, 10)
        return proc.pid

    return asyncio.run(go())


def _silent(sock: socket.socket, spec: object, stdio: object) -> int:
    return 0


def test_a_child_that_says_nothing_is_an_error() -> None:
    with pytest.raises(ttrpc.FailedPrecondition, match="without a word"):
        _spawn(_silent)


def _pid_namespace(pid: int | str) -> str:
    return os.readlink(f"/proc/{pid}/ns/pid")


def _reports_its_namespace(sock: socket.socket, spec: object, stdio: object) -> int:
    container.send(sock, {"ready": True})
    container.send(sock, {"pid": os.getpid(), "ns": _pid_namespace("self")})
    return 0


def _spawn_and_hear(pid_ns_of: int = 0) -> tuple[int, dict[str, object]]:
    async def go() -> tuple[int, dict[str, object]]:
        agent = Agent(0.0)
        proc = await agent._spawn("c", "", agent_pb2.Process(args=["true"]),
                                  _reports_its_namespace, pid_ns_of=pid_ns_of)
        assert proc.sock is not None
        msg, _ = await agent_module._recv(proc.sock)
        await asyncio.wait_for(proc.exited, 10)
        assert msg is not None
        return proc.pid, msg

    return asyncio.run(go())


def test_the_process_is_pid_1_of_a_new_pid_namespace_in_one_fork() -> None:
    """The child the agent forks is the container's process itself (the pid
    the agent tracks), pid 1 of its own pid namespace; the agent's children
    after it are in the agent's namespace again."""
    own = _pid_namespace("self")
    pid, msg = _spawn_and_hear()
    assert msg["pid"] == 1 and msg["ns"] != own, msg
    assert pid > 1
    assert os.readlink("/proc/self/ns/pid_for_children") == own
    after = subprocess.run(["readlink", "/proc/self/ns/pid"], capture_output=True, text=True)
    assert after.stdout.strip() == own


def test_an_exec_joins_the_pid_namespace_it_is_given() -> None:
    holder = subprocess.Popen(["unshare", "--pid", "--fork", "sleep", "30"])
    try:
        deadline = time.monotonic() + 5
        inner = None
        while inner is None and time.monotonic() < deadline:
            kids = Path(f"/proc/{holder.pid}/task/{holder.pid}/children").read_text().split()
            inner = int(kids[0]) if kids else None
            time.sleep(0.01)
        assert inner is not None
        _, msg = _spawn_and_hear(pid_ns_of=inner)
        assert msg["ns"] == _pid_namespace(inner) and msg["pid"] != 1, msg
    finally:
        holder.kill()
        holder.wait()
    assert os.readlink("/proc/self/ns/pid_for_children") == _pid_namespace("self")


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


def test_shutdown_answers_once_the_guest_has_synced(monkeypatch: pytest.MonkeyPatch) -> None:
    """The host tells QEMU to quit on the answer: every write the guest
    cached must have reached the host by then."""
    said: list[str] = []
    monkeypatch.setattr(os, "sync", lambda: said.append("sync"))
    monkeypatch.setattr(agent_module, "power_off", lambda: said.append("power off"))

    async def go() -> None:
        agent = Agent(0.0)
        await agent.Shutdown(agent_pb2.Empty(), None)  # type: ignore[arg-type]
        said.append("answered")
        await asyncio.sleep(agent_module.STOP_GRACE * 2)

    asyncio.run(go())
    assert said == ["sync", "answered", "power off"]
