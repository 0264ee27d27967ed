"""Publishing task events to containerd: Events.Forward over $TTRPC_ADDRESS.

One queue and one sender keep the order the runtime v2 contract demands
(create -> start -> exit -> delete); an RPC never waits for its event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from google.protobuf import any_pb2, empty_pb2, timestamp_pb2
from google.protobuf.message import Message

from microvm.protocol import eventsapi_pb2, ttrpc

log = logging.getLogger(__name__)

SERVICE = "containerd.services.events.ttrpc.v1.Events"
RETRIES = 5


def timestamp(when: float | None = None) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int((time.time() if when is None else when) * 1e9))
    return ts


def pack(event: Message) -> any_pb2.Any:
    # containerd's typeurl: unregistered types use the bare full name.
    return any_pb2.Any(type_url=event.DESCRIPTOR.full_name, value=event.SerializeToString())


class Publisher:
    def __init__(self, address: str, namespace: str) -> None:
        self.address = address.removeprefix("unix://")
        self.namespace = namespace
        self._queue: asyncio.Queue[tuple[str, Message]] = asyncio.Queue()
        self._client: ttrpc.Client | None = None
        self._task: asyncio.Task[None] | None = None

    def publish(self, topic: str, event: Message) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run())
        self._queue.put_nowait((topic, event))

    async def _connect(self) -> ttrpc.Client:
        if self._client is None or self._client.closed:
            reader, writer = await asyncio.open_unix_connection(self.address)
            self._client = ttrpc.Client(
                reader, writer, {"containerd-namespace-ttrpc": self.namespace})
        return self._client

    async def _run(self) -> None:
        while True:
            topic, event = await self._queue.get()
            req = eventsapi_pb2.ForwardRequest(envelope=eventsapi_pb2.Envelope(
                timestamp=timestamp(), namespace=self.namespace, topic=topic,
                event=pack(event)))
            for attempt in range(RETRIES):
                try:
                    client = await self._connect()
                    await client.call(SERVICE, "Forward", req, empty_pb2.Empty, timeout=5)
                    break
                except (OSError, ConnectionError, ttrpc.RpcError) as e:
                    log.warning("publishing %s failed (%s), attempt %d", topic, e, attempt + 1)
                    self._client = None
                    await asyncio.sleep(0.1 * 2 ** attempt)
            self._queue.task_done()

    async def drain(self, timeout: float = 5.0) -> None:
        """Wait until every queued event went out (or the timeout passed)."""
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._client is not None:
            await self._client.aclose()
