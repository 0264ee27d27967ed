"""ttrpc on asyncio: the one framing and RPC layer for the agent and the shim.

Wire format (containerd/ttrpc PROTOCOL.md): a 10-byte header -- data length
(uint32 BE), stream id (uint32 BE), message type (uint8), flags (uint8) --
then the data.  Requests travel on odd, increasing stream ids; each gets one
Response on the same id.  Unary calls only: the Task API and the agent API
use no streams.

Both peers are untrusted: every malformed frame gives a clean error, an
oversized frame is discarded and answered with RESOURCE_EXHAUSTED, and a
server keeps serving the connection after a bad request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError, Message

from . import ttrpc_pb2

log = logging.getLogger(__name__)

HEADER = struct.Struct(">IIBB")
MAX_MESSAGE = 4 << 20

TYPE_REQUEST = 1
TYPE_RESPONSE = 2
TYPE_DATA = 3

# google.rpc.Code values used here.
OK = 0
CANCELLED = 1
UNKNOWN = 2
INVALID_ARGUMENT = 3
DEADLINE_EXCEEDED = 4
NOT_FOUND = 5
ALREADY_EXISTS = 6
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
FAILED_PRECONDITION = 9
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14


class ProtocolError(Exception):
    """The peer broke the framing; the connection cannot continue."""


class RpcError(Exception):
    """A call answered with a non-OK google.rpc.Status."""

    code = UNKNOWN

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class InvalidArgument(RpcError):
    code = INVALID_ARGUMENT


class DeadlineExceeded(RpcError):
    code = DEADLINE_EXCEEDED


class NotFound(RpcError):
    code = NOT_FOUND


class AlreadyExists(RpcError):
    code = ALREADY_EXISTS


class PermissionDenied(RpcError):
    code = PERMISSION_DENIED


class ResourceExhausted(RpcError):
    code = RESOURCE_EXHAUSTED


class FailedPrecondition(RpcError):
    code = FAILED_PRECONDITION


class Unimplemented(RpcError):
    code = UNIMPLEMENTED


class Unavailable(RpcError):
    code = UNAVAILABLE


_BY_CODE: dict[int, type[RpcError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Unimplemented,
        Unavailable,
    )
}


def error_from_status(code: int, message: str) -> RpcError:
    cls = _BY_CODE.get(code)
    return cls(message) if cls else RpcError(message, code)


@dataclass(frozen=True)
class Frame:
    stream_id: int
    type: int
    flags: int
    data: bytes


class FrameTooLarge(Exception):
    def __init__(self, stream_id: int, length: int) -> None:
        super().__init__(
            f"message length {length} exceeds maximum message size of {MAX_MESSAGE}"
        )
        self.stream_id = stream_id


def encode_frame(stream_id: int, type_: int, data: bytes, flags: int = 0) -> bytes:
    if len(data) > MAX_MESSAGE:
        raise ResourceExhausted(
            f"message length {len(data)} exceeds maximum message size of {MAX_MESSAGE}"
        )
    return HEADER.pack(len(data), stream_id, type_, flags) + data


async def read_frame(reader: asyncio.StreamReader) -> Frame | None:
    """The next frame, or None on a clean EOF between frames.

    Raises ProtocolError on EOF inside a frame and FrameTooLarge (after
    discarding the data) when the length is over the limit.
    """
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise ProtocolError(
            f"connection closed inside a frame header ({len(e.partial)} bytes)") from None
    length, stream_id, type_, flags = HEADER.unpack(header)
    if length > MAX_MESSAGE:
        remaining = length
        while remaining:
            chunk = await reader.read(min(remaining, 1 << 16))
            if not chunk:
                raise ProtocolError("connection closed inside an oversized frame")
            remaining -= len(chunk)
        raise FrameTooLarge(stream_id, length)
    try:
        data = await reader.readexactly(length)
    except asyncio.IncompleteReadError as e:
        raise ProtocolError(
            f"connection closed inside a frame: got {len(e.partial)} of {length} bytes"
        ) from None
    return Frame(stream_id, type_, flags, data)


class _Connection:
    """One writer lock per connection: frames from concurrent calls never interleave."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._lock = asyncio.Lock()

    async def send(self, stream_id: int, type_: int, data: bytes) -> None:
        frame = encode_frame(stream_id, type_, data)
        async with self._lock:
            self.writer.write(frame)
            await self.writer.drain()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


Handler = Callable[[Any, "CallContext"], Awaitable[Message]]


@dataclass
class CallContext:
    service: str
    method: str
    metadata: dict[str, list[str]]
    deadline: float | None  # loop time


@dataclass
class Method:
    request_type: type[Message]
    handler: Handler


class Server:
    """Serves registered services; every request runs concurrently."""

    def __init__(self) -> None:
        self._methods: dict[tuple[str, str], Method] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def register(self, service: str, method: str, request_type: type[Message],
                 handler: Handler) -> None:
        self._methods[(service, method)] = Method(request_type, handler)

    def register_service(self, service: str, impl: object,
                         descriptor: Any, module: Any) -> None:
        """Register every RPC of a protobuf service descriptor found on impl."""
        for m in descriptor.methods:
            fn = getattr(impl, m.name, None)
            if fn is None:
                continue
            self.register(service, m.name, getattr(module, m.input_type.name), fn)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one connection until it closes."""
        conn = _Connection(reader, writer)
        last_id = 0
        try:
            while True:
                try:
                    frame = await read_frame(reader)
                except FrameTooLarge as e:
                    log.warning("ttrpc: %s", e)
                    await self._reply_error(conn, e.stream_id, RESOURCE_EXHAUSTED, str(e))
                    continue
                if frame is None:
                    return
                if frame.type != TYPE_REQUEST:
                    log.debug("ttrpc: ignoring frame of type %d", frame.type)
                    continue
                if frame.stream_id % 2 == 0 or frame.stream_id <= last_id:
                    await self._reply_error(
                        conn, frame.stream_id, INVALID_ARGUMENT,
                        "StreamID must be odd and increasing for client initiated streams")
                    continue
                last_id = frame.stream_id
                task = asyncio.create_task(self._dispatch(conn, frame))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except (ProtocolError, ConnectionError) as e:
            log.warning("ttrpc: dropping connection: %s", e)
        finally:
            conn.close()

    async def _reply_error(self, conn: _Connection, stream_id: int, code: int,
                           message: str) -> None:
        resp = ttrpc_pb2.Response(status=ttrpc_pb2.Status(code=code, message=message))
        with contextlib.suppress(ConnectionError, RuntimeError):
            await conn.send(stream_id, TYPE_RESPONSE, resp.SerializeToString())

    async def _dispatch(self, conn: _Connection, frame: Frame) -> None:
        try:
            payload = await self._call(frame.data)
            resp = ttrpc_pb2.Response(status=ttrpc_pb2.Status(code=OK), payload=payload)
        except RpcError as e:
            resp = ttrpc_pb2.Response(status=ttrpc_pb2.Status(code=e.code, message=e.message))
        except asyncio.CancelledError:
            return
        except Exception as e:  # a handler bug must not take the server down
            log.exception("ttrpc: handler failed")
            resp = ttrpc_pb2.Response(status=ttrpc_pb2.Status(code=INTERNAL, message=str(e)))
        try:
            await conn.send(frame.stream_id, TYPE_RESPONSE, resp.SerializeToString())
        except ResourceExhausted as e:
            await self._reply_error(conn, frame.stream_id, RESOURCE_EXHAUSTED, e.message)
        except (ConnectionError, RuntimeError):
            pass

    async def _call(self, data: bytes) -> bytes:
        req = ttrpc_pb2.Request()
        try:
            req.ParseFromString(data)
        except DecodeError as e:
            raise InvalidArgument(f"malformed ttrpc request: {e}") from None
        method = self._methods.get((req.service, req.method))
        if method is None:
            if not any(s == req.service for s, _ in self._methods):
                raise Unimplemented(f"service {req.service}")
            raise Unimplemented(f"method {req.method}")
        msg = method.request_type()
        try:
            msg.ParseFromString(req.payload)
        except DecodeError as e:
            raise InvalidArgument(f"malformed {msg.DESCRIPTOR.full_name}: {e}") from None
        metadata: dict[str, list[str]] = {}
        for kv in req.metadata:
            metadata.setdefault(kv.key.lower(), []).append(kv.value)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + req.timeout_nano / 1e9 if req.timeout_nano > 0 else None
        ctx = CallContext(req.service, req.method, metadata, deadline)
        coro = method.handler(msg, ctx)
        if deadline is None:
            result = await coro
        else:
            try:
                result = await asyncio.wait_for(coro, max(deadline - loop.time(), 0))
            except TimeoutError:
                raise DeadlineExceeded(f"{req.method}: deadline exceeded") from None
        return result.SerializeToString()

    async def aclose(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class Client:
    """A ttrpc client on one connection; calls may run concurrently."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 metadata: dict[str, str] | None = None) -> None:
        self._conn = _Connection(reader, writer)
        self._next_id = 1
        self._pending: dict[int, asyncio.Future[ttrpc_pb2.Response]] = {}
        self._metadata = [ttrpc_pb2.KeyValue(key=k, value=v) for k, v in (metadata or {}).items()]
        self._closed: BaseException | None = None
        self._reader_task = asyncio.create_task(self._read_loop())

    async def _read_loop(self) -> None:
        err: BaseException = ConnectionError("ttrpc connection closed")
        try:
            while True:
                try:
                    frame = await read_frame(self._conn.reader)
                except FrameTooLarge as e:
                    fut = self._pending.pop(e.stream_id, None)
                    if fut and not fut.done():
                        fut.set_exception(ResourceExhausted(str(e)))
                    continue
                if frame is None:
                    break
                if frame.type != TYPE_RESPONSE:
                    continue
                fut = self._pending.pop(frame.stream_id, None)
                if fut is None or fut.done():
                    continue
                resp = ttrpc_pb2.Response()
                try:
                    resp.ParseFromString(frame.data)
                except DecodeError as e:
                    fut.set_exception(ProtocolError(f"malformed ttrpc response: {e}"))
                    continue
                fut.set_result(resp)
        except (ProtocolError, ConnectionError, OSError) as e:
            err = ConnectionError(f"ttrpc connection lost: {e}")
        except asyncio.CancelledError:
            err = ConnectionError("ttrpc client closed")
        finally:
            self._closed = err
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(err)
            self._pending.clear()

    @property
    def closed(self) -> bool:
        return self._closed is not None

    async def call(self, service: str, method: str, request: Message,
                   response_type: type[Message], timeout: float | None = None) -> Any:
        if self._closed is not None:
            raise ConnectionError(str(self._closed))
        stream_id = self._next_id
        self._next_id += 2
        req = ttrpc_pb2.Request(
            service=service, method=method, payload=request.SerializeToString(),
            timeout_nano=int(timeout * 1e9) if timeout else 0, metadata=self._metadata)
        fut: asyncio.Future[ttrpc_pb2.Response] = asyncio.get_running_loop().create_future()
        self._pending[stream_id] = fut
        try:
            await self._conn.send(stream_id, TYPE_REQUEST, req.SerializeToString())
            if timeout:
                try:
                    resp = await asyncio.wait_for(asyncio.shield(fut), timeout)
                except TimeoutError:
                    raise DeadlineExceeded(f"{method}: no answer within {timeout:g}s") from None
            else:
                resp = await fut
        finally:
            self._pending.pop(stream_id, None)
        if resp.HasField("status") and resp.status.code != OK:
            raise error_from_status(resp.status.code, resp.status.message)
        out = response_type()
        try:
            out.ParseFromString(resp.payload)
        except DecodeError as e:
            raise ProtocolError(f"malformed {out.DESCRIPTOR.full_name}: {e}") from None
        return out

    async def aclose(self) -> None:
        self._reader_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader_task
        self._conn.close()
