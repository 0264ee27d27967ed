"""The typed Task client against a real ttrpc server on a unix socket: errors
keep their status code, 127 and 126 come from the status's reason (never
from the words of the message), response types come from the service, and
release() is containerd's teardown, bounded."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import empty_pb2

from microvm.errors import (
    CommandNotExecutable,
    CommandNotFound,
    KataError,
    from_rpc,
    to_rpc,
)
from microvm.protocol import REASON_COMMAND_NOT_FOUND, task_pb2, ttrpc
from microvm.shim.client import SERVICE, ShimGone, TaskClient


class FakeShim:
    """Answers each Task RPC with what `answers` holds (a message, or an
    exception to raise), and records the calls."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.calls: list[str] = []

    def __getattr__(self, method: str) -> Callable[..., Any]:
        if method not in task_pb2.DESCRIPTOR.services_by_name["Task"].methods_by_name:
            raise AttributeError(method)

        async def handler(req: Any, ctx: ttrpc.CallContext) -> Any:
            self.calls.append(method)
            answer = self.answers.get(method, empty_pb2.Empty())
            if isinstance(answer, BaseException):
                raise answer
            if isinstance(answer, float):
                await asyncio.sleep(answer)
                return empty_pb2.Empty()
            return answer
        return handler


@asynccontextmanager
async def shim(tmp_path: Path, answers: dict[str, Any]) -> AsyncIterator[tuple[FakeShim, str]]:
    fake = FakeShim(answers)
    server = ttrpc.Server()
    server.register_service(SERVICE, fake, task_pb2.DESCRIPTOR.services_by_name["Task"],
                            task_pb2)
    path = str(tmp_path / "shim.sock")
    srv = await asyncio.start_unix_server(server.serve, path=path)
    try:
        yield fake, f"unix://{path}"
    finally:
        srv.close()
        await server.aclose()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_command_not_found_is_127_by_its_reason(tmp_path: Path) -> None:
    async def body() -> None:
        answers = {"Start": ttrpc.NotFound("nosuch: no such thing",
                                           reason=REASON_COMMAND_NOT_FOUND)}
        async with shim(tmp_path, answers) as (_, address), \
                TaskClient.connect(address, "kt") as client:
            with pytest.raises(CommandNotFound) as err:
                await client.start("c1", "e1")
            assert (err.value.exit_code, err.value.status) == (127, ttrpc.NOT_FOUND)
    run(body())


def test_the_words_alone_make_no_127_or_126(tmp_path: Path) -> None:
    """What the CLI used to match on: the same text with no reason is 125."""
    async def body() -> None:
        for words in ("x: executable file not found in $PATH", "x: permission denied"):
            answers = {"Start": ttrpc.FailedPrecondition(words)}
            async with shim(tmp_path, answers) as (_, address), \
                    TaskClient.connect(address, "kt") as client:
                with pytest.raises(KataError) as err:
                    await client.start("c1", "e1")
                assert type(err.value) is KataError
                assert (err.value.exit_code, err.value.status) == (125, ttrpc.FAILED_PRECONDITION)
    run(body())


def test_the_shims_mapping_round_trips_to_the_cli() -> None:
    for cls, code in ((CommandNotFound, ttrpc.NOT_FOUND),
                      (CommandNotExecutable, ttrpc.PERMISSION_DENIED)):
        wire = ttrpc.error_from_status(to_rpc(cls("m")).status())
        assert wire.code == code
        back = from_rpc(wire)
        assert type(back) is cls and back.status == code
    plain = to_rpc(KataError("m"), ttrpc.InvalidArgument)
    assert (plain.code, plain.reason) == (ttrpc.INVALID_ARGUMENT, "")


def test_each_rpc_parses_its_own_response_type(tmp_path: Path) -> None:
    async def body() -> None:
        answers = {"State": task_pb2.StateResponse(id="c1", pid=42, status=task_pb2.RUNNING),
                   "Wait": task_pb2.WaitResponse(exit_status=3)}
        async with shim(tmp_path, answers) as (fake, address), \
                TaskClient.connect(address, "kt") as client:
            s = await client.state("c1")
            assert (s.pid, s.status) == (42, task_pb2.RUNNING)
            assert (await client.wait("c1")).exit_status == 3
            await client.kill("c1", 9)  # an Empty: parsed as a StateResponse before
            await client.resize_pty("c1", "e1", 80, 24)
            await client.close_io("c1")
            assert fake.calls == ["State", "Wait", "Kill", "ResizePty", "CloseIO"]
    run(body())


def test_a_shim_that_goes_away_mid_call_is_shim_gone(tmp_path: Path) -> None:
    async def body() -> None:
        async with shim(tmp_path, {"Wait": 30.0}) as (_, address), \
                TaskClient.connect(address, "kt") as client:
            waiting = asyncio.create_task(client.wait("c1"))
            await asyncio.sleep(0.2)
            client._client._conn.close()  # the connection breaks, as a SIGKILL leaves it
            with pytest.raises(ShimGone, match="shim is gone"):
                await waiting
    run(body())


def test_release_is_containerds_teardown_and_each_step_is_bounded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("microvm.shim.client.RELEASE_STEP_TIMEOUT", 0.3)

    async def body() -> None:
        # A Wait that never ends and a Delete that fails do not stop the rest.
        answers = {"Wait": 30.0, "Delete": ttrpc.FailedPrecondition("busy")}
        async with shim(tmp_path, answers) as (fake, address), \
                TaskClient.connect(address, "kt") as client:
            t0 = time.monotonic()
            await client.release("c1")
            assert time.monotonic() - t0 < 2
            assert fake.calls == ["Kill", "Wait", "Delete", "Shutdown"]
            fake.calls.clear()
            await client.release("c1", running=False)
            assert fake.calls == ["Delete", "Shutdown"]
    run(body())


def test_nothing_listening_is_an_os_error(tmp_path: Path) -> None:
    async def body() -> None:
        with pytest.raises(OSError):
            async with TaskClient.connect(str(tmp_path / "none.sock"), "kt"):
                pass
    run(body())
