"""The process state machine, alone and inside the Task service.

The service runs against a fake sandbox (no VM is needed to test the
rules): it records what reaches the guest, and a process "exits" when the
test says so.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import pytest
from google.protobuf import any_pb2

from microvm.protocol import agent_pb2, task_pb2, ttrpc
from microvm.shim.lifecycle import Event, Lifecycle, Status
from microvm.shim.process import Container, Proc
from microvm.shim.task_service import TaskService

S, E = Status, Event

# --- the table ------------------------------------------------------------------

ALLOWED_INIT = {
    S.CREATED: {E.START, E.KILL, E.KILL_ALL, E.RESIZE, E.UPDATE, E.EXIT, E.DELETE},
    S.RUNNING: {E.PAUSE, E.KILL, E.KILL_ALL, E.EXEC, E.UPDATE, E.RESIZE, E.EXIT},
    S.PAUSED: {E.RESUME, E.KILL, E.KILL_ALL, E.UPDATE, E.RESIZE, E.EXIT},
    S.STOPPED: {E.KILL_ALL, E.RESIZE, E.DELETE},
    S.DELETED: set(),
}


def at(status: Status, init: bool = True) -> Lifecycle:
    lc = Lifecycle("c1", init)
    lc.status = status
    return lc


@pytest.mark.parametrize("status,event", list(itertools.product(S, E)))
def test_every_state_and_event_of_an_init(status: Status, event: Event) -> None:
    lc = at(status)
    if event in ALLOWED_INIT[status]:
        lc.check(event)
    else:
        with pytest.raises(ttrpc.RpcError):
            lc.check(event)


def test_the_refusals_are_runcs_codes() -> None:
    def code(status: Status, event: Event, init: bool = True) -> int:
        with pytest.raises(ttrpc.RpcError) as err:
            at(status, init).check(event)
        return err.value.code

    assert code(S.STOPPED, E.KILL) == ttrpc.NOT_FOUND  # "process already finished"
    assert code(S.RUNNING, E.START) == ttrpc.FAILED_PRECONDITION
    assert code(S.RUNNING, E.DELETE) == ttrpc.FAILED_PRECONDITION
    assert code(S.PAUSED, E.DELETE) == ttrpc.FAILED_PRECONDITION
    assert code(S.PAUSED, E.EXEC) == ttrpc.FAILED_PRECONDITION
    assert code(S.DELETED, E.START) == ttrpc.NOT_FOUND
    # An exec not started has nothing to signal; only an init pauses.
    assert code(S.CREATED, E.KILL, init=False) == ttrpc.FAILED_PRECONDITION
    assert code(S.RUNNING, E.PAUSE, init=False) == ttrpc.INVALID_ARGUMENT


def test_the_walk_of_a_life() -> None:
    lc = Lifecycle("c1", init=True)
    for event, then in [(E.START, S.RUNNING), (E.PAUSE, S.PAUSED), (E.RESUME, S.RUNNING),
                        (E.KILL, S.RUNNING), (E.EXIT, S.STOPPED), (E.DELETE, S.DELETED)]:
        lc.advance(event)
        assert lc.status is then


def test_an_exit_during_an_act_stands() -> None:
    lc = Lifecycle("c1", init=True)
    lc.check(E.START)
    lc.exited()  # the process ended while Start was under way
    lc.advance(E.START)
    assert lc.status is S.STOPPED
    lc.advance(E.DELETE)
    lc.exited()  # a late exit does not bring a deleted process back
    assert lc.status is S.DELETED


# --- the service over a fake sandbox -------------------------------------------


class FakeSandbox:
    """Records every call that would reach the guest."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.exits: dict[tuple[str, str], asyncio.Future[int]] = {}
        self.death = ""
        self.machine = None

    def exit(self, cid: str, exec_id: str = "", status: int = 0) -> None:
        self._exit(cid, exec_id).set_result(status)

    def _exit(self, cid: str, exec_id: str) -> asyncio.Future[int]:
        return self.exits.setdefault((cid, exec_id), asyncio.get_running_loop().create_future())

    async def wait(self, cid: str, exec_id: str = "") -> int:
        return await self._exit(cid, exec_id)

    async def read_output(self, cid: str, stream: str, exec_id: str = "",
                          max_bytes: int = 0) -> bytes:
        await self._exit(cid, exec_id)
        return b""

    def __getattr__(self, name: str) -> Any:
        async def record(*args: Any, **kwargs: Any) -> None:
            self.calls.append((name, *args, *(f"{k}={v}" for k, v in kwargs.items())))
        return record


async def service() -> tuple[TaskService, FakeSandbox]:
    svc = TaskService("ns", None, lambda: None)
    sb = FakeSandbox()
    svc.sandbox = sb  # type: ignore[assignment]
    init = Proc("c1", "", "", "", "", False, agent_pb2.Process(args=["sleep", "1"]))
    svc.containers["c1"] = Container("c1", "/nonexistent", init)
    svc._start_watch(init)
    return svc, sb


EXEC_SPEC = any_pb2.Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/Process",
                        value=json.dumps({"args": ["true"], "cwd": "/"}).encode())


def rpc(svc: TaskService, method: str, **fields: Any) -> Any:
    if method == "Exec":
        fields.setdefault("spec", EXEC_SPEC)
    request_type = {"Start": task_pb2.StartRequest, "Kill": task_pb2.KillRequest,
                    "Pause": task_pb2.PauseRequest, "Resume": task_pb2.ResumeRequest,
                    "Delete": task_pb2.DeleteRequest, "State": task_pb2.StateRequest,
                    "Exec": task_pb2.ExecProcessRequest, "Update": task_pb2.UpdateTaskRequest,
                    "ResizePty": task_pb2.ResizePtyRequest}[method]
    return getattr(svc, method)(request_type(**fields), None)


def test_kill_all_reaches_the_guest_as_all_and_only_for_the_init() -> None:
    """KillRequest.all was never read: runc's kill --all became a kill of
    the init alone."""
    async def go() -> list[tuple[Any, ...]]:
        svc, sb = await service()
        await rpc(svc, "Start", id="c1")
        await rpc(svc, "Kill", id="c1", signal=15, all=True)
        await rpc(svc, "Kill", id="c1", signal=10)
        await rpc(svc, "Exec", id="c1", exec_id="e1")
        await rpc(svc, "Start", id="c1", exec_id="e1")
        await rpc(svc, "Kill", id="c1", exec_id="e1", signal=9, all=True)
        # Once the init has exited, all still reaches what it left behind.
        sb.exit("c1", "e1")
        sb.exit("c1")
        await asyncio.wait_for(svc.containers["c1"].init.exited.wait(), 10)
        await rpc(svc, "Kill", id="c1", signal=9, all=True)
        with pytest.raises(ttrpc.NotFound, match="already finished"):
            await rpc(svc, "Kill", id="c1", signal=9)
        await svc.aclose()
        return [c for c in sb.calls if c[0] == "signal"]

    assert asyncio.run(go()) == [
        ("signal", "c1", 15, "", "all=True"),
        ("signal", "c1", 10, "", "all=False"),
        ("signal", "c1", 9, "e1", "all=False"),
        ("signal", "c1", 9, "", "all=True"),
    ]


def test_every_rpc_asks_the_machine_first() -> None:
    """Refused calls never reach the guest; allowed ones move the state."""
    async def go() -> None:
        svc, sb = await service()
        init = svc.containers["c1"].init
        with pytest.raises(ttrpc.FailedPrecondition):
            await rpc(svc, "Pause", id="c1")           # created
        with pytest.raises(ttrpc.FailedPrecondition):
            await rpc(svc, "Exec", id="c1", exec_id="e1")  # not running yet
        await rpc(svc, "Start", id="c1")
        assert init.status is S.RUNNING
        with pytest.raises(ttrpc.FailedPrecondition, match="already started"):
            await rpc(svc, "Start", id="c1")
        with pytest.raises(ttrpc.FailedPrecondition, match="cannot delete a running"):
            await rpc(svc, "Delete", id="c1")
        await rpc(svc, "Pause", id="c1")
        assert (await rpc(svc, "State", id="c1")).status == task_pb2.PAUSED
        with pytest.raises(ttrpc.FailedPrecondition, match="paused"):
            await rpc(svc, "Exec", id="c1", exec_id="e1")
        with pytest.raises(ttrpc.FailedPrecondition):
            await rpc(svc, "Pause", id="c1")
        await rpc(svc, "Resume", id="c1")
        with pytest.raises(ttrpc.FailedPrecondition):
            await rpc(svc, "Resume", id="c1")
        # An exec: created, then resized (kept for its start), then started.
        await rpc(svc, "Exec", id="c1", exec_id="e1", terminal=True)
        await rpc(svc, "ResizePty", id="c1", exec_id="e1", width=100, height=40)
        ex = svc.containers["c1"].execs["e1"]
        assert ex.spec is not None and (ex.spec.rows, ex.spec.cols) == (40, 100)
        await rpc(svc, "Start", id="c1", exec_id="e1")
        sb.exit("c1", "e1", 3)
        await asyncio.wait_for(ex.exited.wait(), 10)
        assert (await rpc(svc, "State", id="c1", exec_id="e1")).status == task_pb2.STOPPED
        await rpc(svc, "Delete", id="c1", exec_id="e1")
        assert ex.status is S.DELETED
        sb.exit("c1", "", 0)
        await asyncio.wait_for(init.exited.wait(), 10)
        with pytest.raises(ttrpc.FailedPrecondition, match="stopped"):
            await rpc(svc, "Update", id="c1")
        await rpc(svc, "Delete", id="c1")
        assert init.status is S.DELETED and "c1" not in svc.containers
        names = [c[0] for c in sb.calls]
        assert names == ["start_container", "pause", "resume", "exec_process",
                         "remove_container"]
        await svc.aclose()

    asyncio.run(go())


def test_a_dead_vm_says_why_in_the_refusal() -> None:
    async def go() -> None:
        svc, sb = await service()
        await rpc(svc, "Start", id="c1")
        sb.death = "QEMU died (signal 9)"
        sb.exit("c1", "", 255)
        await asyncio.wait_for(svc.containers["c1"].init.exited.wait(), 10)
        with pytest.raises(ttrpc.FailedPrecondition, match=r"stopped: QEMU died \(signal 9\)"):
            await rpc(svc, "Exec", id="c1", exec_id="e1")
        await svc.aclose()

    asyncio.run(go())
