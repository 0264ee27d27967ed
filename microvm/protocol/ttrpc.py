"""ttrpc on asyncio: the one framing and RPC layer for the agent and the shim.

Wire format (containerd/ttrpc PROTOCOL.md): a 10-byte header -- data length
(uint32 BE), stream id (uint32 BE), message type (uint8), flags (uint8) --
then the data.  Requests travel on odd, increasing stream ids; each gets one
Response on the same id.  Unary calls only: the Task API and the agent API
use no streams.

Both peers are untrusted: every malformed frame gives a clean error, an
oversized frame is discarded and answered with RESOURCE_EXHAUSTED, and a
server keeps serving the connection after a bad request.  A server given
Limits (the shim's) also bounds what its peers can make it hold: open
connections, bytes of requests being read or handled, and the time a frame
may take to arrive; it warns of a flood once a minute, not per frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf import any_pb2
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

ERROR_INFO_TYPE = "type.googleapis.com/google.rpc.ErrorInfo"
ERROR_DOMAIN = "kata-py"


class ProtocolError(Exception):
    """The peer broke the framing; the connection cannot continue."""


class RpcError(Exception):
    """A call answered with a non-OK google.rpc.Status.  reason, when set,
    travels as a google.rpc.ErrorInfo in the status details."""

    code = UNKNOWN

    def __init__(self, message: str, code: int | None = None, reason: str = "") -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.reason = reason

    def status(self) -> ttrpc_pb2.Status:
        details = []
        if self.reason:
            info = ttrpc_pb2.ErrorInfo(reason=self.reason, domain=ERROR_DOMAIN)
            details.append(any_pb2.Any(type_url=ERROR_INFO_TYPE, value=info.SerializeToString()))
        return ttrpc_pb2.Status(code=self.code, message=self.message, details=details)

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


def error_from_status(status: ttrpc_pb2.Status) -> RpcError:
    reason = ""
    for detail in status.details:
        if detail.type_url == ERROR_INFO_TYPE:
            info = ttrpc_pb2.ErrorInfo()
            with contextlib.suppress(DecodeError):
                info.ParseFromString(detail.value)
                reason = info.reason
    cls = _BY_CODE.get(status.code)
    if cls is None:
        return RpcError(status.message, status.code, reason)
    return cls(status.message, reason=reason)


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
        await _discard(reader, length, "an oversized")
        raise FrameTooLarge(stream_id, length)
    try:
        data = await reader.readexactly(length)
    except asyncio.IncompleteReadError as e:
        raise ProtocolError(
            f"connection closed inside a frame: got {len(e.partial)} of {length} bytes"
        ) from None
    return Frame(stream_id, type_, flags, data)


@dataclass(frozen=True)
class Limits:
    """What a server's peers may make it hold."""

    # containerd keeps one or two connections to a shim; our CLI one per verb.
    max_connections: int = 32
    # Bytes of requests being read or handled, over all connections: partial
    # frames count from their header (the length they announce), complete
    # ones until answered.  Enough for three maximum-size frames at once.
    max_buffered: int = 16 << 20
    # What a request in flight costs beyond its bytes (its task, parsed
    # messages): thousands of tiny pending calls must not add up unseen.
    request_overhead: int = 4096
    # Seconds a frame may take to arrive once its first byte has: a peer
    # that stops mid-frame must not keep its share of the budget.
    frame_timeout: float = 30.0


class _OverBudget(Exception):
    def __init__(self, stream_id: int, length: int) -> None:
        super().__init__(f"server busy: a request of {length} bytes does not fit in what "
                         "it holds for its peers now; try again")
        self.stream_id = stream_id


class _Throttle:
    """One warning per interval: a flood is logged once, then counted."""

    def __init__(self, interval: float = 60.0) -> None:
        self.interval = interval
        self._next = 0.0
        self._quiet = 0

    def warn(self, message: str) -> None:
        now = time.monotonic()
        if now < self._next:
            self._quiet += 1
            return
        more = f" ({self._quiet} more since the last warning)" if self._quiet else ""
        log.warning("ttrpc: %s%s; further trouble with peers is logged at most once every "
                    "%gs", message, more, self.interval)
        self._next = now + self.interval
        self._quiet = 0


async def _discard(reader: asyncio.StreamReader, length: int, which: str = "a refused") -> None:
    """Skip a frame's data without holding it."""
    remaining = length
    while remaining:
        chunk = await reader.read(min(remaining, 1 << 16))
        if not chunk:
            raise ProtocolError(f"connection closed inside {which} frame")
        remaining -= len(chunk)


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
    """Serves registered services; every request runs concurrently.

    limits: None for a peer we trust (the agent's only peer is the host);
    a server that anyone else may reach passes Limits().
    """

    def __init__(self, limits: Limits | None = None) -> None:
        self._methods: dict[tuple[str, str], Method] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.limits = limits
        self.connections = 0
        self.buffered = 0  # bytes charged against limits.max_buffered
        self._throttle = _Throttle()

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
        if self.limits and self.connections >= self.limits.max_connections:
            self._throttle.warn(f"refusing connections beyond {self.limits.max_connections} "
                                "open ones")
            conn.close()
            return
        self.connections += 1
        last_id = 0
        try:
            while True:
                try:
                    got = await self._read_frame(reader)
                except (FrameTooLarge, _OverBudget) as e:
                    self._throttle.warn(str(e))
                    await self._reply_error(conn, e.stream_id, RESOURCE_EXHAUSTED, str(e))
                    continue
                if got is None:
                    return
                frame, cost = got
                if frame.type != TYPE_REQUEST:
                    self._release(cost)
                    log.debug("ttrpc: ignoring frame of type %d", frame.type)
                    continue
                if frame.stream_id % 2 == 0 or frame.stream_id <= last_id:
                    self._release(cost)
                    await self._reply_error(
                        conn, frame.stream_id, INVALID_ARGUMENT,
                        "StreamID must be odd and increasing for client initiated streams")
                    continue
                last_id = frame.stream_id
                task = asyncio.create_task(self._dispatch(conn, frame))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                if cost:  # the request's bytes are held until it is answered
                    task.add_done_callback(self._releaser(cost))
        except (ProtocolError, ConnectionError) as e:
            self._throttle.warn(f"dropping connection: {e}")
        except TimeoutError:
            assert self.limits is not None
            self._throttle.warn(f"dropping connection: a frame took over "
                                f"{self.limits.frame_timeout:g}s to arrive")
        finally:
            self.connections -= 1
            conn.close()

    async def _read_frame(self, reader: asyncio.StreamReader) -> tuple[Frame, int] | None:
        """read_frame, held to the limits: the frame and what it was charged."""
        if self.limits is None:
            frame = await read_frame(reader)
            return None if frame is None else (frame, 0)
        first = await reader.read(1)  # idle between frames: no deadline
        if not first:
            return None
        async with asyncio.timeout(self.limits.frame_timeout):
            try:
                header = first + await reader.readexactly(HEADER.size - 1)
            except asyncio.IncompleteReadError as e:
                raise ProtocolError(f"connection closed inside a frame header "
                                    f"({len(e.partial) + 1} bytes)") from None
            length, stream_id, type_, flags = HEADER.unpack(header)
            # Refused from the header alone: its data is skipped, never held.
            if length > MAX_MESSAGE:
                await _discard(reader, length)
                raise FrameTooLarge(stream_id, length)
            cost = length + self.limits.request_overhead
            if self.buffered + cost > self.limits.max_buffered:
                await _discard(reader, length)
                raise _OverBudget(stream_id, length)
            self.buffered += cost
            try:
                data = await reader.readexactly(length)
            except BaseException as e:
                self._release(cost)
                if isinstance(e, asyncio.IncompleteReadError):
                    raise ProtocolError(f"connection closed inside a frame: got "
                                        f"{len(e.partial)} of {length} bytes") from None
                raise
        return Frame(stream_id, type_, flags, data), cost

    def _release(self, cost: int) -> None:
        self.buffered -= cost

    def _releaser(self, cost: int) -> Callable[[asyncio.Task[None]], None]:
        return lambda _task: self._release(cost)

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
            resp = ttrpc_pb2.Response(status=e.status())
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
                 metadata: dict[str, str] | None = None, first_stream: int = 1) -> None:
        self._conn = _Connection(reader, writer)
        self._next_id = first_stream | 1  # client streams are odd
        self._pending: dict[int, asyncio.Future[ttrpc_pb2.Response]] = {}
        self._metadata = [ttrpc_pb2.KeyValue(key=k, value=v) for k, v in (metadata or {}).items()]
        self._closed: BaseException | None = None
        self._reader_task = asyncio.create_task(self._read_loop())

    @property
    def next_stream(self) -> int:
        return self._next_id

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
            raise error_from_status(resp.status)
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
