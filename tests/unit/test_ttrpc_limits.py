"""A ttrpc server with Limits (the shim's) against peers that flood it:
connections held open with partial frames, frames that never finish,
requests that never end.  What it holds stays bounded, extra connections
are closed, a legitimate client is served once the flood is over, and the
flood is one log line.

In-process servers check the accounting; a real shim process checks its
memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import TypeVar

import pytest

from microvm.errors import KataError
from microvm.protocol import agent_pb2, ttrpc
from microvm.protocol.ttrpc import HEADER, MAX_MESSAGE, TYPE_REQUEST, Client, Limits, Server
from microvm.shim.client import TaskClient

SVC = "test.Svc"
T = TypeVar("T")


def run(coro: Awaitable[T], timeout: float = 30.0) -> T:
    async def main() -> T:
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(main())


class Svc:
    def __init__(self) -> None:
        self.release = asyncio.Event()

    def server(self, limits: Limits | None) -> Server:
        s = Server(limits)
        s.register(SVC, "Echo", agent_pb2.WriteStreamRequest, self.echo)
        s.register(SVC, "Block", agent_pb2.ProcessRef, self.block)
        return s

    async def echo(self, req: agent_pb2.WriteStreamRequest,
                   ctx: ttrpc.CallContext) -> agent_pb2.ReadStreamResponse:
        return agent_pb2.ReadStreamResponse(data=req.data)

    async def block(self, req: agent_pb2.ProcessRef,
                    ctx: ttrpc.CallContext) -> agent_pb2.Empty:
        await self.release.wait()
        return agent_pb2.Empty()


@contextlib.asynccontextmanager
async def listening(server: Server, path: Path) -> AsyncIterator[str]:
    srv = await asyncio.start_unix_server(server.serve, path=str(path))
    try:
        yield str(path)
    finally:
        srv.close()
        await server.aclose()


async def echo(path: str, data: bytes = b"hello") -> bytes:
    reader, writer = await asyncio.open_unix_connection(path)
    client = Client(reader, writer)
    try:
        out = await client.call(SVC, "Echo", agent_pb2.WriteStreamRequest(data=data),
                                agent_pb2.ReadStreamResponse, timeout=5)
        return bytes(out.data)
    finally:
        await client.aclose()


async def closed_by_server(reader: asyncio.StreamReader, timeout: float = 5) -> bool:
    """True when the server closed the connection within timeout."""
    try:
        return await asyncio.wait_for(reader.read(1), timeout) == b""
    except ConnectionError:
        return True
    except TimeoutError:
        return False


async def settle(cond: object, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == ttrpc.log.name and r.levelno >= logging.WARNING]


def test_flood_of_partial_frames_is_bounded(tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    """40 connections each announcing a maximum-size frame and sending 1 MiB
    of it: 32 are kept, 8 closed; three frames' worth is charged (the rest
    are skipped unheld); the flood is one warning; afterwards a client is served."""
    limits = Limits()
    server = Svc().server(limits)
    peak = 0

    async def body() -> None:
        nonlocal peak
        async with listening(server, tmp_path / "s.sock") as path:
            async def watch() -> None:
                nonlocal peak
                while True:
                    peak = max(peak, server.buffered)
                    await asyncio.sleep(0.001)
            watcher = asyncio.create_task(watch())
            flood = []
            for i in range(40):
                r, w = await asyncio.open_unix_connection(path)
                w.write(HEADER.pack(MAX_MESSAGE, 2 * i + 1, TYPE_REQUEST, 0) + b"\0" * (1 << 20))
                flood.append((r, w))
            await settle(lambda: server.connections == limits.max_connections)
            closed = await asyncio.gather(*(closed_by_server(r, 0.5) for r, _ in flood))
            assert closed.count(True) == 40 - limits.max_connections
            charged = limits.max_buffered // (MAX_MESSAGE + limits.request_overhead)
            await settle(lambda: server.buffered == charged * (MAX_MESSAGE
                                                               + limits.request_overhead))
            # While the flood holds every slot, nobody else gets in.
            with pytest.raises((ConnectionError, ttrpc.RpcError)):
                await echo(path)
            for _, w in flood:
                w.close()
            await settle(lambda: server.connections == 0 and server.buffered == 0)
            assert await echo(path) == b"hello"
            watcher.cancel()
    with caplog.at_level(logging.WARNING, logger=ttrpc.log.name):
        run(body())
    assert peak <= limits.max_buffered
    flood_lines = warnings(caplog)
    assert len(flood_lines) == 1, flood_lines
    assert "refusing connections beyond 32" in flood_lines[0]


def test_frame_deadline_drops_a_stalled_frame(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    server = Svc().server(Limits(frame_timeout=0.3))

    async def body() -> None:
        async with listening(server, tmp_path / "s.sock") as path:
            stalled = []
            for _ in range(3):
                r, w = await asyncio.open_unix_connection(path)
                w.write(HEADER.pack(1000, 1, TYPE_REQUEST, 0) + b"\0" * 10)
                stalled.append((r, w))
            r, w = await asyncio.open_unix_connection(path)
            w.write(HEADER.pack(10, 1, TYPE_REQUEST, 0)[:4])  # half a header
            stalled.append((r, w))
            await settle(lambda: server.buffered > 0)
            for r, _ in stalled:
                assert await closed_by_server(r, 5)
            assert server.buffered == 0 and server.connections == 0
            # An idle connection between frames is not a stalled frame.
            reader, writer = await asyncio.open_unix_connection(path)
            client = Client(reader, writer)
            await asyncio.sleep(0.5)
            out = await client.call(SVC, "Echo", agent_pb2.WriteStreamRequest(data=b"x"),
                                    agent_pb2.ReadStreamResponse, timeout=5)
            assert out.data == b"x"
            await client.aclose()
            for _, w in stalled:
                w.close()
    with caplog.at_level(logging.WARNING, logger=ttrpc.log.name):
        run(body())
    lines = warnings(caplog)
    assert len(lines) == 1 and "took over 0.3s to arrive" in lines[0], lines


def test_over_budget_request_is_refused_and_the_connection_serves_on(tmp_path: Path) -> None:
    limits = Limits(max_buffered=100_000)
    server = Svc().server(limits)

    async def body() -> None:
        async with listening(server, tmp_path / "s.sock") as path:
            hog_r, hog_w = await asyncio.open_unix_connection(path)
            hog_w.write(HEADER.pack(90_000, 1, TYPE_REQUEST, 0) + b"\0" * 100)
            await settle(lambda: server.buffered == 90_000 + limits.request_overhead)
            reader, writer = await asyncio.open_unix_connection(path)
            client = Client(reader, writer)
            with pytest.raises(ttrpc.ResourceExhausted, match="server busy"):
                await client.call(SVC, "Echo", agent_pb2.WriteStreamRequest(data=b"y" * 10_000),
                                  agent_pb2.ReadStreamResponse, timeout=5)
            out = await client.call(SVC, "Echo", agent_pb2.WriteStreamRequest(data=b"small"),
                                    agent_pb2.ReadStreamResponse, timeout=5)
            assert out.data == b"small"
            hog_w.close()
            await settle(lambda: server.buffered == 0)
            out = await client.call(SVC, "Echo", agent_pb2.WriteStreamRequest(data=b"y" * 10_000),
                                    agent_pb2.ReadStreamResponse, timeout=5)
            assert len(out.data) == 10_000
            await client.aclose()
    run(body())


def test_requests_in_flight_are_charged_until_answered(tmp_path: Path) -> None:
    """Thousands of tiny calls that never end cannot pile up unseen."""
    limits = Limits(max_buffered=20 * 4096)
    svc = Svc()
    server = svc.server(limits)

    async def body() -> None:
        async with listening(server, tmp_path / "s.sock") as path:
            reader, writer = await asyncio.open_unix_connection(path)
            client = Client(reader, writer)
            calls = [asyncio.create_task(client.call(SVC, "Block", agent_pb2.ProcessRef(),
                                                     agent_pb2.Empty, timeout=10))
                     for _ in range(30)]
            await settle(lambda: sum(c.done() for c in calls) >= 11)
            refused = [c for c in calls if c.done()]
            assert all(isinstance(c.exception(), ttrpc.ResourceExhausted) for c in refused)
            assert server.buffered <= limits.max_buffered
            svc.release.set()
            await asyncio.gather(*calls, return_exceptions=True)
            await settle(lambda: server.buffered == 0)
            await client.aclose()
    run(body())


def test_no_limits_keeps_the_old_behaviour(tmp_path: Path) -> None:
    """The agent's server (one trusted peer) takes no Limits."""
    server = Svc().server(None)

    async def body() -> None:
        async with listening(server, tmp_path / "s.sock") as path:
            held = [await asyncio.open_unix_connection(path) for _ in range(40)]
            await settle(lambda: server.connections == 40)
            assert await echo(path) == b"hello"
            for _, w in held:
                w.close()
    run(body())


# --- a real shim process -----------------------------------------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(os.geteuid() != 0, reason="the shim enters a mount namespace: root")
def test_real_shim_survives_a_flood_of_partial_frames(tmp_path: Path) -> None:
    sock = tmp_path / "shim.sock"
    (tmp_path / "log").touch()
    env = {k: v for k, v in os.environ.items() if k != "TTRPC_ADDRESS"}
    shim = subprocess.Popen(
        [sys.executable, "-m", "microvm.shim", "-namespace", "kt-limits", "-address",
         str(tmp_path / "no-containerd.sock"), "-id", "kt-limits", "-socket", str(sock)],
        cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)

    async def state(path: str) -> None:
        async with TaskClient.connect(path, "kt-limits") as client:
            with pytest.raises(KataError) as err:
                await client.state("nope", timeout=5)
            assert err.value.status == ttrpc.NOT_FOUND

    async def body() -> tuple[int, int]:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert shim.poll() is None, "the shim exited"
            assert time.monotonic() < deadline, "the shim did not listen"
            await asyncio.sleep(0.05)
        await state(str(sock))
        before = rss_kib(shim.pid)
        flood = []
        for _ in range(40):
            try:
                r, w = await asyncio.open_unix_connection(str(sock))
            except OSError:
                continue
            w.write(HEADER.pack(MAX_MESSAGE, 1, TYPE_REQUEST, 0) + b"\0" * (MAX_MESSAGE - 1))
            flood.append((r, w))
        for _, w in flood:
            with contextlib.suppress(ConnectionError, TimeoutError):
                await asyncio.wait_for(w.drain(), 10)
        await asyncio.sleep(0.5)
        during = rss_kib(shim.pid)
        for _, w in flood:
            w.close()
        await asyncio.sleep(0.3)
        await state(str(sock))  # served once the flood is over
        return before, during

    try:
        before, during = run(body(), timeout=60)
    finally:
        shim.send_signal(signal.SIGTERM)
        try:
            shim.wait(10)
        except subprocess.TimeoutExpired:
            shim.kill()
            shim.wait()
    # 40 x 4 MiB held would be 160 MiB (the shim grew by 164 MB before the
    # limits); the budget is 16 MiB.
    assert during - before < 32 * 1024, f"RSS {before} KiB -> {during} KiB"
    lines = [line for line in (tmp_path / "log").read_text().splitlines() if "ttrpc" in line]
    assert len(lines) == 1, lines
