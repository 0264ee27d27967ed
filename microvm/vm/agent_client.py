"""The host's side of the agent API: one ttrpc client per VM."""

from __future__ import annotations

import asyncio
import bisect
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import Message

from microvm.protocol import AGENT_SERVICE, VSOCK_PORT, agent_pb2, ttrpc

_METHODS = agent_pb2.DESCRIPTOR.services_by_name["Agent"].methods_by_name
# Calls that wait by design (for an exit, output, an OOM): their time is the
# workload's, not the agent's, so they are left out of the latency figures.
LONG_POLLS = frozenset({"WaitProcess", "ReadStdout", "ReadStderr", "WaitOOM"})
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass
class Latency:
    """One method's call times, as a Prometheus histogram (not cumulative:
    counts[i] for times <= BUCKETS[i], the last for the rest)."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    sum: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds


class AgentClient:
    def __init__(self, client: ttrpc.Client) -> None:
        self._client = client
        self.latency: dict[str, Latency] = {}

    @classmethod
    async def over_socket(cls, sock: socket.socket, first_stream: int = 1) -> AgentClient:
        """first_stream: a clone's agent remembers its template's last stream."""
        reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 23)
        return cls(ttrpc.Client(reader, writer, first_stream=first_stream))

    @classmethod
    async def over_vsock(cls, cid: int, deadline: float) -> AgentClient:
        """Connect once the agent listens; retried until the deadline (loop time)."""
        loop = asyncio.get_running_loop()
        while True:
            sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, (cid, VSOCK_PORT))
                return await cls.over_socket(sock)
            except OSError:
                sock.close()
                if loop.time() >= deadline:
                    raise
                await asyncio.sleep(0.02)

    async def call(self, method: str, request: Message, timeout: float | None = None) -> Any:
        out = getattr(agent_pb2, _METHODS[method].output_type.name)
        t0 = time.monotonic()
        try:
            return await self._client.call(AGENT_SERVICE, method, request, out, timeout)
        finally:
            if method not in LONG_POLLS:
                self.latency.setdefault(method, Latency()).observe(time.monotonic() - t0)

    @property
    def closed(self) -> bool:
        return self._client.closed

    async def aclose(self) -> None:
        await self._client.aclose()

    @property
    def next_stream(self) -> int:
        return self._client.next_stream
