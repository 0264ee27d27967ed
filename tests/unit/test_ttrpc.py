"""ttrpc framing and RPC over a real socketpair, with a real Server and Client.

Malformed traffic is written raw (HEADER.pack + ttrpc_pb2 messages) so every
bad-peer case the module promises to survive is exercised byte for byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import pytest
from google.protobuf.message import DecodeError

from microvm.protocol import AGENT_SERVICE, agent_pb2, ttrpc, ttrpc_pb2
from microvm.protocol.ttrpc import (
    HEADER,
    MAX_MESSAGE,
    TYPE_DATA,
    TYPE_REQUEST,
    TYPE_RESPONSE,
    CallContext,
    Client,
    ProtocolError,
    Server,
    encode_frame,
    read_frame,
)

SVC = "test.Svc"
T = TypeVar("T")


def run(coro: Awaitable[T], timeout: float = 10.0) -> T:
    """Run one test body on a fresh loop; a hang fails instead of blocking the suite."""
    async def main() -> T:
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(main())


class Svc:
    """A tiny service on the generated agent messages; records what it saw."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, CallContext]] = []
        self.release = asyncio.Event()
        self.blocked_started = asyncio.Event()

    def server(self) -> Server:
        s = Server()
        s.register(SVC, "Echo", agent_pb2.WriteStreamRequest, self.echo)
        s.register(SVC, "Count", agent_pb2.WriteStreamRequest, self.count)
        s.register(SVC, "NotFound", agent_pb2.ProcessRef, self.not_found)
        s.register(SVC, "Crash", agent_pb2.ProcessRef, self.crash)
        s.register(SVC, "Block", agent_pb2.ProcessRef, self.block)
        s.register(SVC, "Release", agent_pb2.ProcessRef, self.release_it)
        s.register(SVC, "Huge", agent_pb2.ProcessRef, self.huge)
        return s

    async def echo(self, req: agent_pb2.WriteStreamRequest,
                   ctx: CallContext) -> agent_pb2.ReadStreamResponse:
        self.calls.append(("Echo", req, ctx))
        return agent_pb2.ReadStreamResponse(data=req.data)

    async def count(self, req: agent_pb2.WriteStreamRequest,
                    ctx: CallContext) -> agent_pb2.WriteStreamResponse:
        self.calls.append(("Count", req, ctx))
        return agent_pb2.WriteStreamResponse(written=len(req.data))

    async def not_found(self, req: agent_pb2.ProcessRef, ctx: CallContext) -> agent_pb2.Empty:
        raise ttrpc.NotFound(f"container {req.container_id} not found")

    async def crash(self, req: agent_pb2.ProcessRef, ctx: CallContext) -> agent_pb2.Empty:
        raise RuntimeError("handler bug")

    async def block(self, req: agent_pb2.ProcessRef, ctx: CallContext) -> agent_pb2.Empty:
        self.calls.append(("Block", req, ctx))
        self.blocked_started.set()
        await self.release.wait()
        return agent_pb2.Empty()

    async def release_it(self, req: agent_pb2.ProcessRef, ctx: CallContext) -> agent_pb2.Empty:
        self.release.set()
        return agent_pb2.Empty()

    async def huge(self, req: agent_pb2.ProcessRef,
                   ctx: CallContext) -> agent_pb2.ReadStreamResponse:
        return agent_pb2.ReadStreamResponse(data=b"x" * (MAX_MESSAGE + 1))


@contextlib.asynccontextmanager
async def serving(server: Server) -> AsyncIterator[tuple[asyncio.StreamReader,
                                                        asyncio.StreamWriter]]:
    """server.serve() on one end of a socketpair; yields the other end's streams."""
    a, b = socket.socketpair()
    sr, sw = await asyncio.open_connection(sock=a)
    task = asyncio.create_task(server.serve(sr, sw))
    cr, cw = await asyncio.open_connection(sock=b)
    try:
        yield cr, cw
    finally:
        cw.close()
        await server.aclose()
        await asyncio.wait_for(task, 5)


@contextlib.asynccontextmanager
async def raw_pair() -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter,
                                            asyncio.StreamReader, asyncio.StreamWriter]]:
    """Two connected stream pairs: (client reader, writer, peer reader, writer)."""
    a, b = socket.socketpair()
    cr, cw = await asyncio.open_connection(sock=a)
    pr, pw = await asyncio.open_connection(sock=b)
    try:
        yield cr, cw, pr, pw
    finally:
        cw.close()
        pw.close()


def request(method: str, payload: bytes = b"", service: str = SVC, **kw: Any) -> bytes:
    return ttrpc_pb2.Request(service=service, method=method, payload=payload,
                             **kw).SerializeToString()


async def send_raw(writer: asyncio.StreamWriter, stream_id: int, type_: int,
                   data: bytes, flags: int = 0) -> None:
    writer.write(HEADER.pack(len(data), stream_id, type_, flags) + data)
    await writer.drain()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, ttrpc_pb2.Response]:
    frame = await asyncio.wait_for(read_frame(reader), 5)
    assert frame is not None, "server closed the connection"
    assert frame.type == TYPE_RESPONSE
    resp = ttrpc_pb2.Response()
    resp.ParseFromString(frame.data)
    return frame.stream_id, resp


async def echo_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  stream_id: int, data: bytes = b"still alive") -> None:
    """A valid Echo on stream_id is answered OK with its data."""
    payload = agent_pb2.WriteStreamRequest(data=data).SerializeToString()
    await send_raw(writer, stream_id, TYPE_REQUEST, request("Echo", payload))
    sid, resp = await read_response(reader)
    assert sid == stream_id
    assert resp.status.code == ttrpc.OK, resp.status.message
    out = agent_pb2.ReadStreamResponse()
    out.ParseFromString(resp.payload)
    assert out.data == data


def stream_reader(data: bytes, eof: bool = True) -> asyncio.StreamReader:
    r = asyncio.StreamReader()
    r.feed_data(data)
    if eof:
        r.feed_eof()
    return r


# --- framing -----------------------------------------------------------------


def test_header_layout() -> None:
    assert HEADER.size == 10
    frame = encode_frame(0x01020304, TYPE_RESPONSE, b"abc", flags=0x7F)
    assert frame == (b"\x00\x00\x00\x03"       # length, big endian u32
                     b"\x01\x02\x03\x04"       # stream id, big endian u32
                     b"\x02"                   # type
                     b"\x7f"                   # flags
                     b"abc")


def test_encode_frame_default_flags_zero() -> None:
    frame = encode_frame(1, TYPE_REQUEST, b"")
    assert frame == b"\x00\x00\x00\x00\x00\x00\x00\x01\x01\x00"


def test_encode_frame_limit() -> None:
    assert len(encode_frame(1, TYPE_REQUEST, b"\0" * MAX_MESSAGE)) == MAX_MESSAGE + 10
    with pytest.raises(ttrpc.ResourceExhausted) as e:
        encode_frame(1, TYPE_REQUEST, b"\0" * (MAX_MESSAGE + 1))
    assert e.value.code == ttrpc.RESOURCE_EXHAUSTED
    assert MAX_MESSAGE == 4 * 1024 * 1024


def test_read_frame_round_trip() -> None:
    async def body() -> None:
        frames = [(1, TYPE_REQUEST, b"hello", 0), (3, TYPE_RESPONSE, b"", 5),
                  (0xFFFFFFFF, TYPE_DATA, bytes(range(256)) * 10, 0xFF)]
        r = stream_reader(b"".join(encode_frame(s, t, d, flags=f) for s, t, d, f in frames))
        for s, t, d, f in frames:
            got = await read_frame(r)
            assert got == ttrpc.Frame(s, t, f, d)
        assert await read_frame(r) is None
    run(body())


def test_read_frame_clean_eof_is_none() -> None:
    async def body() -> None:
        assert await read_frame(stream_reader(b"")) is None
    run(body())


@pytest.mark.parametrize("n", [1, 5, 9])
def test_read_frame_truncated_header(n: int) -> None:
    async def body() -> None:
        r = stream_reader(encode_frame(1, TYPE_REQUEST, b"payload")[:n])
        with pytest.raises(ProtocolError, match="header"):
            await read_frame(r)
    run(body())


def test_read_frame_truncated_body() -> None:
    async def body() -> None:
        r = stream_reader(HEADER.pack(10, 1, TYPE_REQUEST, 0) + b"1234")
        with pytest.raises(ProtocolError, match="4 of 10"):
            await read_frame(r)
    run(body())


def test_read_frame_header_only_is_truncated_body() -> None:
    async def body() -> None:
        with pytest.raises(ProtocolError):
            await read_frame(stream_reader(HEADER.pack(1, 1, TYPE_REQUEST, 0)))
    run(body())


def test_read_frame_oversized_is_discarded() -> None:
    async def body() -> None:
        big = HEADER.pack(MAX_MESSAGE + 1, 7, TYPE_REQUEST, 0) + b"\xaa" * (MAX_MESSAGE + 1)
        r = stream_reader(big + encode_frame(9, TYPE_REQUEST, b"next"))
        with pytest.raises(ttrpc.FrameTooLarge) as e:
            await read_frame(r)
        assert e.value.stream_id == 7
        assert str(MAX_MESSAGE + 1) in str(e.value)
        # The oversized data was consumed: the next frame reads cleanly.
        assert await read_frame(r) == ttrpc.Frame(9, TYPE_REQUEST, 0, b"next")
        assert await read_frame(r) is None
    run(body())


def test_read_frame_truncated_oversized() -> None:
    async def body() -> None:
        r = stream_reader(HEADER.pack(MAX_MESSAGE + 1, 7, TYPE_REQUEST, 0) + b"\0" * 1000)
        with pytest.raises(ProtocolError, match="oversized"):
            await read_frame(r)
    run(body())


def _status(code: int, message: str) -> ttrpc_pb2.Status:
    return ttrpc_pb2.Status(code=code, message=message)


def test_error_from_status_maps_codes() -> None:
    assert isinstance(ttrpc.error_from_status(_status(5, "m")), ttrpc.NotFound)
    assert isinstance(ttrpc.error_from_status(_status(8, "m")), ttrpc.ResourceExhausted)
    assert isinstance(ttrpc.error_from_status(_status(12, "m")), ttrpc.Unimplemented)
    err = ttrpc.error_from_status(_status(13, "boom"))
    assert type(err) is ttrpc.RpcError
    assert err.code == 13
    assert err.message == "boom"
    assert err.reason == ""


def test_a_reason_travels_as_error_info_in_the_status_details() -> None:
    sent = ttrpc.NotFound("x: executable file not found in $PATH", reason="COMMAND_NOT_FOUND")
    wire = ttrpc_pb2.Status.FromString(sent.status().SerializeToString())
    # google.rpc.Status with one google.rpc.ErrorInfo, as gRPC's rich errors.
    assert [d.type_url for d in wire.details] == ["type.googleapis.com/google.rpc.ErrorInfo"]
    got = ttrpc.error_from_status(wire)
    assert (type(got), got.code, got.message, got.reason) == \
        (ttrpc.NotFound, 5, sent.message, "COMMAND_NOT_FOUND")
    # A malformed detail is ignored, not fatal: the code still arrives.
    wire.details[0].value = b"\xff\xff"
    assert ttrpc.error_from_status(wire).reason == ""


# --- server against raw frames ---------------------------------------------------


def test_server_echo_raw() -> None:
    async def body() -> None:
        async with serving(Svc().server()) as (r, w):
            await echo_ok(r, w, 1, b"hi")
            await echo_ok(r, w, 3, b"")
    run(body())


def test_server_oversized_frame_then_keeps_serving() -> None:
    async def body() -> None:
        svc = Svc()
        async with serving(svc.server()) as (r, w):
            w.write(HEADER.pack(MAX_MESSAGE + 1, 1, TYPE_REQUEST, 0))
            w.write(b"\0" * (MAX_MESSAGE + 1))
            await w.drain()
            sid, resp = await read_response(r)
            assert sid == 1
            assert resp.status.code == ttrpc.RESOURCE_EXHAUSTED == 8
            assert "exceeds maximum message size" in resp.status.message
            assert svc.calls == []
            await echo_ok(r, w, 3)
    run(body())


@pytest.mark.parametrize("garbage", [b"\xff", b"\x0a\x05ab", b"\xff\xff\xff\xff\xff\xff"])
def test_server_garbage_request_payload(garbage: bytes) -> None:
    async def body() -> None:
        svc = Svc()
        async with serving(svc.server()) as (r, w):
            # Make sure the bytes really are not a ttrpc Request.
            with pytest.raises(DecodeError):
                ttrpc_pb2.Request().ParseFromString(garbage)
            await send_raw(w, 1, TYPE_REQUEST, garbage)
            sid, resp = await read_response(r)
            assert sid == 1
            assert resp.status.code == ttrpc.INVALID_ARGUMENT == 3
            assert "malformed ttrpc request" in resp.status.message
            assert svc.calls == []
            await echo_ok(r, w, 3)
    run(body())


def test_server_malformed_inner_payload() -> None:
    async def body() -> None:
        svc = Svc()
        async with serving(svc.server()) as (r, w):
            await send_raw(w, 1, TYPE_REQUEST, request("Echo", b"\xff\xff"))
            sid, resp = await read_response(r)
            assert sid == 1
            assert resp.status.code == 3
            assert "katapy.agent.v1.WriteStreamRequest" in resp.status.message
            assert svc.calls == []
            await echo_ok(r, w, 3)
    run(body())


def test_server_unknown_service_and_method() -> None:
    async def body() -> None:
        async with serving(Svc().server()) as (r, w):
            await send_raw(w, 1, TYPE_REQUEST, request("Echo", service="nope.Svc"))
            sid, resp = await read_response(r)
            assert (sid, resp.status.code) == (1, 12)
            assert resp.status.message == "service nope.Svc"
            await send_raw(w, 3, TYPE_REQUEST, request("Nope"))
            sid, resp = await read_response(r)
            assert (sid, resp.status.code) == (3, 12)
            assert resp.status.message == "method Nope"
            await echo_ok(r, w, 5)
    run(body())


def test_server_even_stream_id_rejected() -> None:
    async def body() -> None:
        svc = Svc()
        async with serving(svc.server()) as (r, w):
            payload = agent_pb2.WriteStreamRequest(data=b"x").SerializeToString()
            await send_raw(w, 2, TYPE_REQUEST, request("Echo", payload))
            sid, resp = await read_response(r)
            assert sid == 2
            assert resp.status.code == ttrpc.INVALID_ARGUMENT
            assert "odd" in resp.status.message
            assert svc.calls == []
            await echo_ok(r, w, 1)
    run(body())


def test_server_non_increasing_stream_ids_rejected() -> None:
    async def body() -> None:
        svc = Svc()
        async with serving(svc.server()) as (r, w):
            await echo_ok(r, w, 5)
            payload = agent_pb2.WriteStreamRequest(data=b"x").SerializeToString()
            for stale in (5, 3, 1):
                await send_raw(w, stale, TYPE_REQUEST, request("Echo", payload))
                sid, resp = await read_response(r)
                assert sid == stale
                assert resp.status.code == ttrpc.INVALID_ARGUMENT
                assert "increasing" in resp.status.message
            assert len(svc.calls) == 1
            await echo_ok(r, w, 7)
    run(body())


def test_server_ignores_non_request_frames() -> None:
    async def body() -> None:
        svc = Svc()
        async with serving(svc.server()) as (r, w):
            await send_raw(w, 1, TYPE_DATA, b"stray data")
            await send_raw(w, 1, TYPE_RESPONSE, b"stray response")
            # Not answered, and stream 1 is still unused: the next answer is for it.
            await echo_ok(r, w, 1)
    run(body())


def test_server_not_found_raw_code() -> None:
    async def body() -> None:
        async with serving(Svc().server()) as (r, w):
            payload = agent_pb2.ProcessRef(container_id="c1").SerializeToString()
            await send_raw(w, 1, TYPE_REQUEST, request("NotFound", payload))
            sid, resp = await read_response(r)
            assert (sid, resp.status.code) == (1, ttrpc.NOT_FOUND)
            assert resp.status.message == "container c1 not found"
    run(body())


def test_server_deadline_from_timeout_nano() -> None:
    async def body() -> None:
        async with serving(Svc().server()) as (r, w):
            await send_raw(w, 1, TYPE_REQUEST, request("Block", timeout_nano=50_000_000))
            sid, resp = await read_response(r)
            assert (sid, resp.status.code) == (1, ttrpc.DEADLINE_EXCEEDED)
            assert "Block" in resp.status.message
            await echo_ok(r, w, 3)
    run(body())


def test_server_request_timeout_sets_deadline() -> None:
    async def body() -> None:
        svc = Svc()
        async with serving(svc.server()) as (r, w):
            loop = asyncio.get_running_loop()
            before = loop.time()
            payload = agent_pb2.WriteStreamRequest(data=b"x").SerializeToString()
            await send_raw(w, 1, TYPE_REQUEST,
                           request("Echo", payload, timeout_nano=30 * 10**9))
            await read_response(r)
            after = loop.time()
            await echo_ok(r, w, 3)
            (_, _, ctx1), (_, _, ctx2) = svc.calls
            assert ctx1.deadline is not None
            assert before + 30 <= ctx1.deadline <= after + 30
            assert ctx2.deadline is None
    run(body())


def test_server_metadata_lowercased_raw() -> None:
    async def body() -> None:
        svc = Svc()
        async with serving(svc.server()) as (r, w):
            md = [ttrpc_pb2.KeyValue(key="X-Trace", value="a"),
                  ttrpc_pb2.KeyValue(key="x-trace", value="b"),
                  ttrpc_pb2.KeyValue(key="Other", value="c")]
            await send_raw(w, 1, TYPE_REQUEST, request("Echo", metadata=md))
            await read_response(r)
            (_, _, ctx), = svc.calls
            assert ctx.metadata == {"x-trace": ["a", "b"], "other": ["c"]}
            assert (ctx.service, ctx.method) == (SVC, "Echo")
    run(body())


def test_server_oversized_response_gets_resource_exhausted() -> None:
    async def body() -> None:
        async with serving(Svc().server()) as (r, w):
            await send_raw(w, 1, TYPE_REQUEST, request("Huge"))
            sid, resp = await read_response(r)
            assert (sid, resp.status.code) == (1, ttrpc.RESOURCE_EXHAUSTED)
            await echo_ok(r, w, 3)
    run(body())


def test_server_truncated_frame_drops_connection() -> None:
    async def body() -> None:
        async with serving(Svc().server()) as (r, w):
            w.write(HEADER.pack(100, 1, TYPE_REQUEST, 0) + b"short")
            await w.drain()
            w.write_eof()
            # The server closes its end: EOF, no response.
            assert await asyncio.wait_for(read_frame(r), 5) is None
    run(body())


# --- Client against the Server ------------------------------------------------------


def test_client_call_round_trip() -> None:
    async def body() -> None:
        svc = Svc()
        async with serving(svc.server()) as (r, w):
            client = Client(r, w)
            out = await client.call(SVC, "Echo", agent_pb2.WriteStreamRequest(data=b"abc"),
                                    agent_pb2.ReadStreamResponse)
            assert isinstance(out, agent_pb2.ReadStreamResponse)
            assert out.data == b"abc"
            out = await client.call(SVC, "Count", agent_pb2.WriteStreamRequest(data=b"abcd"),
                                    agent_pb2.WriteStreamResponse)
            assert out.written == 4
            assert not client.closed
            await client.aclose()
            assert client.closed
    run(body())


def test_client_not_found() -> None:
    async def body() -> None:
        async with serving(Svc().server()) as (r, w):
            client = Client(r, w)
            with pytest.raises(ttrpc.NotFound) as e:
                await client.call(SVC, "NotFound", agent_pb2.ProcessRef(container_id="c9"),
                                  agent_pb2.Empty)
            assert e.value.code == 5
            assert e.value.message == "container c9 not found"
            await client.aclose()
    run(body())


def test_client_unimplemented() -> None:
    async def body() -> None:
        async with serving(Svc().server()) as (r, w):
            client = Client(r, w)
            with pytest.raises(ttrpc.Unimplemented, match="method Missing"):
                await client.call(SVC, "Missing", agent_pb2.Empty(), agent_pb2.Empty)
            with pytest.raises(ttrpc.Unimplemented, match="service other.Svc"):
                await client.call("other.Svc", "Echo", agent_pb2.Empty(), agent_pb2.Empty)
            await client.aclose()
    run(body())


def test_handler_exception_is_internal_and_server_survives() -> None:
    async def body() -> None:
        async with serving(Svc().server()) as (r, w):
            client = Client(r, w)
            with pytest.raises(ttrpc.RpcError) as e:
                await client.call(SVC, "Crash", agent_pb2.ProcessRef(), agent_pb2.Empty)
            assert e.value.code == ttrpc.INTERNAL == 13
            assert "handler bug" in e.value.message
            out = await client.call(SVC, "Echo", agent_pb2.WriteStreamRequest(data=b"ok"),
                                    agent_pb2.ReadStreamResponse)
            assert out.data == b"ok"
            await client.aclose()
    run(body())


def test_concurrent_calls_not_serialized() -> None:
    async def body() -> None:
        svc = Svc()
        async with serving(svc.server()) as (r, w):
            client = Client(r, w)
            first = asyncio.create_task(
                client.call(SVC, "Block", agent_pb2.ProcessRef(), agent_pb2.Empty))
            await asyncio.wait_for(svc.blocked_started.wait(), 5)
            # Block is still waiting; Release must be served meanwhile.
            await asyncio.wait_for(
                client.call(SVC, "Release", agent_pb2.ProcessRef(), agent_pb2.Empty), 5)
            await asyncio.wait_for(first, 5)
            await client.aclose()
    run(body())


def test_client_response_too_large_for_server() -> None:
    async def body() -> None:
        async with serving(Svc().server()) as (r, w):
            client = Client(r, w)
            with pytest.raises(ttrpc.ResourceExhausted):
                await client.call(SVC, "Huge", agent_pb2.ProcessRef(),
                                  agent_pb2.ReadStreamResponse)
            await client.aclose()
    run(body())


def test_client_refuses_oversized_request() -> None:
    async def body() -> None:
        svc = Svc()
        async with serving(svc.server()) as (r, w):
            client = Client(r, w)
            big = agent_pb2.WriteStreamRequest(data=b"x" * (MAX_MESSAGE + 1))
            with pytest.raises(ttrpc.ResourceExhausted):
                await client.call(SVC, "Count", big, agent_pb2.WriteStreamResponse)
            # Nothing reached the server, and the connection still works.
            out = await client.call(SVC, "Count", agent_pb2.WriteStreamRequest(data=b"12"),
                                    agent_pb2.WriteStreamResponse)
            assert out.written == 2
            assert [c[0] for c in svc.calls] == ["Count"]
            await client.aclose()
    run(body())


def test_client_metadata_reaches_handler_lowercased() -> None:
    async def body() -> None:
        svc = Svc()
        async with serving(svc.server()) as (r, w):
            client = Client(r, w, metadata={"X-Request-ID": "42", "Containerd-Namespace": "k8s"})
            await client.call(SVC, "Echo", agent_pb2.WriteStreamRequest(), agent_pb2.Empty)
            (_, _, ctx), = svc.calls
            assert ctx.metadata == {"x-request-id": ["42"], "containerd-namespace": ["k8s"]}
            await client.aclose()
    run(body())


def test_client_timeout_sets_server_deadline() -> None:
    async def body() -> None:
        svc = Svc()
        async with serving(svc.server()) as (r, w):
            client = Client(r, w)
            loop = asyncio.get_running_loop()
            before = loop.time()
            await client.call(SVC, "Echo", agent_pb2.WriteStreamRequest(), agent_pb2.Empty,
                              timeout=20)
            after = loop.time()
            await client.call(SVC, "Echo", agent_pb2.WriteStreamRequest(), agent_pb2.Empty)
            (_, _, with_timeout), (_, _, without) = svc.calls
            assert with_timeout.deadline is not None
            assert before + 20 - 0.01 <= with_timeout.deadline <= after + 20
            assert without.deadline is None
            await client.aclose()
    run(body())


def test_register_service_from_descriptor() -> None:
    class Impl:
        async def WriteStdin(self, req: agent_pb2.WriteStreamRequest,
                             ctx: CallContext) -> agent_pb2.WriteStreamResponse:
            return agent_pb2.WriteStreamResponse(written=len(req.data))

    async def body() -> None:
        server = Server()
        server.register_service(AGENT_SERVICE, Impl(),
                                agent_pb2.DESCRIPTOR.services_by_name["Agent"], agent_pb2)
        async with serving(server) as (r, w):
            client = Client(r, w)
            out = await client.call(AGENT_SERVICE, "WriteStdin",
                                    agent_pb2.WriteStreamRequest(data=b"abc"),
                                    agent_pb2.WriteStreamResponse)
            assert out.written == 3
            with pytest.raises(ttrpc.Unimplemented, match="method Shutdown"):
                await client.call(AGENT_SERVICE, "Shutdown", agent_pb2.Empty(), agent_pb2.Empty)
            await client.aclose()
    run(body())


# --- Client against a raw peer --------------------------------------------------------


def test_client_uses_odd_increasing_stream_ids() -> None:
    async def body() -> None:
        async with raw_pair() as (cr, cw, pr, pw):
            client = Client(cr, cw)
            for expected in (1, 3, 5):
                call = asyncio.create_task(
                    client.call(SVC, "Echo", agent_pb2.WriteStreamRequest(data=b"q"),
                                agent_pb2.ReadStreamResponse))
                frame = await asyncio.wait_for(read_frame(pr), 5)
                assert frame is not None
                assert (frame.stream_id, frame.type, frame.flags) == (expected, TYPE_REQUEST, 0)
                req = ttrpc_pb2.Request()
                req.ParseFromString(frame.data)
                assert (req.service, req.method, req.timeout_nano) == (SVC, "Echo", 0)
                resp = ttrpc_pb2.Response(
                    status=ttrpc_pb2.Status(code=0),
                    payload=agent_pb2.ReadStreamResponse(data=b"r").SerializeToString())
                await send_raw(pw, expected, TYPE_RESPONSE, resp.SerializeToString())
                assert (await asyncio.wait_for(call, 5)).data == b"r"
            await client.aclose()
    run(body())


def test_client_call_timeout_raises_deadline_exceeded() -> None:
    async def body() -> None:
        async with raw_pair() as (cr, cw, pr, pw):
            client = Client(cr, cw)
            loop = asyncio.get_running_loop()
            start = loop.time()
            with pytest.raises(ttrpc.DeadlineExceeded, match="Echo"):
                await client.call(SVC, "Echo", agent_pb2.WriteStreamRequest(),
                                  agent_pb2.ReadStreamResponse, timeout=0.2)
            assert 0.15 <= loop.time() - start < 3
            frame = await asyncio.wait_for(read_frame(pr), 5)
            assert frame is not None and frame.stream_id == 1
            req = ttrpc_pb2.Request()
            req.ParseFromString(frame.data)
            assert req.timeout_nano == 200_000_000
            # A late answer to the timed-out call is dropped; the next call works.
            ok = ttrpc_pb2.Response(status=ttrpc_pb2.Status(code=0)).SerializeToString()
            await send_raw(pw, 1, TYPE_RESPONSE, ok)
            call = asyncio.create_task(client.call(SVC, "Echo", agent_pb2.WriteStreamRequest(),
                                                   agent_pb2.ReadStreamResponse, timeout=5))
            frame = await asyncio.wait_for(read_frame(pr), 5)
            assert frame is not None and frame.stream_id == 3
            await send_raw(pw, 3, TYPE_RESPONSE, ok)
            await asyncio.wait_for(call, 5)
            assert not client.closed
            await client.aclose()
    run(body())


def test_pending_calls_fail_when_server_closes() -> None:
    async def body() -> None:
        async with raw_pair() as (cr, cw, pr, pw):
            client = Client(cr, cw)
            calls = [asyncio.create_task(client.call(SVC, "Echo", agent_pb2.WriteStreamRequest(),
                                                     agent_pb2.ReadStreamResponse))
                     for _ in range(3)]
            for _ in calls:
                assert await asyncio.wait_for(read_frame(pr), 5) is not None
            pw.close()
            results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)
            assert all(isinstance(r, ConnectionError) for r in results), results
            assert client.closed
            with pytest.raises(ConnectionError):
                await client.call(SVC, "Echo", agent_pb2.WriteStreamRequest(),
                                  agent_pb2.ReadStreamResponse)
            await client.aclose()
    run(body())


async def pending_echo(cr: asyncio.StreamReader, cw: asyncio.StreamWriter,
                       pr: asyncio.StreamReader) -> tuple[Client, asyncio.Task[Any]]:
    """A client with one Echo call sent (the raw peer has read its request)."""
    client = Client(cr, cw)
    call = asyncio.create_task(client.call(SVC, "Echo", agent_pb2.WriteStreamRequest(),
                                           agent_pb2.ReadStreamResponse))
    assert await asyncio.wait_for(read_frame(pr), 5) is not None
    return client, call


def test_pending_call_fails_when_server_breaks_framing() -> None:
    async def body() -> None:
        async with raw_pair() as (cr, cw, pr, pw):
            client, call = await pending_echo(cr, cw, pr)
            pw.write(HEADER.pack(50, 1, TYPE_RESPONSE, 0) + b"trunc")
            pw.close()
            with pytest.raises(ConnectionError, match="connection lost"):
                await asyncio.wait_for(call, 5)
            await client.aclose()
    run(body())


def test_client_malformed_response_fails_only_that_call() -> None:
    async def body() -> None:
        async with raw_pair() as (cr, cw, pr, pw):
            client, call = await pending_echo(cr, cw, pr)
            await send_raw(pw, 1, TYPE_RESPONSE, b"\xff\xff")
            with pytest.raises(ProtocolError, match="malformed ttrpc response"):
                await asyncio.wait_for(call, 5)
            assert not client.closed
            await client.aclose()
    run(body())


def test_client_oversized_response_frame() -> None:
    async def body() -> None:
        async with raw_pair() as (cr, cw, pr, pw):
            client, call = await pending_echo(cr, cw, pr)
            pw.write(HEADER.pack(MAX_MESSAGE + 1, 1, TYPE_RESPONSE, 0))
            pw.write(b"\0" * (MAX_MESSAGE + 1))
            await pw.drain()
            with pytest.raises(ttrpc.ResourceExhausted):
                await asyncio.wait_for(call, 5)
            # The oversized data was skipped: the connection is still usable.
            call = asyncio.create_task(client.call(SVC, "Echo", agent_pb2.WriteStreamRequest(),
                                                   agent_pb2.ReadStreamResponse))
            frame = await asyncio.wait_for(read_frame(pr), 5)
            assert frame is not None and frame.stream_id == 3
            ok = ttrpc_pb2.Response(status=ttrpc_pb2.Status(code=0)).SerializeToString()
            await send_raw(pw, 3, TYPE_RESPONSE, ok)
            await asyncio.wait_for(call, 5)
            await client.aclose()
    run(body())


def test_client_aclose_fails_pending_calls() -> None:
    async def body() -> None:
        async with raw_pair() as (cr, cw, pr, pw):
            client, call = await pending_echo(cr, cw, pr)
            await client.aclose()
            with pytest.raises(ConnectionError, match="closed"):
                await asyncio.wait_for(call, 5)
    run(body())
