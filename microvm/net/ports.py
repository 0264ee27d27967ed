"""Published ports (`-p [IP:]HOST:CONTAINER[/tcp|/udp]`): a userland proxy,
as docker-proxy is, in the process that owns the sandbox.

The listening sockets are bound before the VM boots, so a port already
taken is one clear error and nothing was started.  A proxy needs no
netfilter rule and works for the host's loopback addresses, where DNAT
would need route_localnet.  It lives and dies with its owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import ipaddress
import logging
import socket
import time
from dataclasses import dataclass

from microvm.errors import KataError

log = logging.getLogger(__name__)

UDP_IDLE = 60.0        # seconds before a quiet UDP flow's socket is closed


@dataclass(frozen=True)
class PortSpec:
    host_ip: str
    host_port: int
    container_port: int
    proto: str = "tcp"

    @property
    def host(self) -> str:
        return f"[{self.host_ip}]" if ":" in self.host_ip else self.host_ip

    def __str__(self) -> str:
        """As docker ps shows it."""
        return f"{self.host}:{self.host_port}->{self.container_port}/{self.proto}"

    @property
    def flag(self) -> str:
        """As -p takes it (parse() reads it back)."""
        return f"{self.host}:{self.host_port}:{self.container_port}/{self.proto}"


def _port(text: str, spec: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise KataError(f"invalid port {text!r} in -p {spec!r}: expected 1-65535")
    return int(text)


def parse(spec: str) -> PortSpec:
    """docker's forms: HOST:CONTAINER, IP:HOST:CONTAINER, [IPv6]:HOST:CONTAINER,
    each with an optional /tcp or /udp."""
    rest, _, proto = spec.partition("/")
    proto = proto or "tcp"
    if proto not in ("tcp", "udp"):
        raise KataError(f"invalid protocol {proto!r} in -p {spec!r}: expected tcp or udp")
    host_ip = "0.0.0.0"
    if rest.startswith("["):
        end = rest.find("]:")
        if end < 0:
            raise KataError(f"invalid -p {spec!r}: expected [IPv6]:HOST:CONTAINER")
        host_ip, rest = rest[1:end], rest[end + 2:]
    parts = rest.split(":")
    if len(parts) == 3 and not rest.startswith("["):
        host_ip, parts = parts[0], parts[1:]
    if len(parts) != 2:
        raise KataError(f"invalid -p {spec!r}: expected [IP:]HOST:CONTAINER[/tcp|/udp]")
    try:
        ipaddress.ip_address(host_ip)
    except ValueError:
        raise KataError(f"invalid host address {host_ip!r} in -p {spec!r}") from None
    return PortSpec(host_ip, _port(parts[0], spec), _port(parts[1], spec), proto)


def bind(specs: list[PortSpec]) -> list[socket.socket]:
    """Every listener, or none (a taken port closes the ones already bound)."""
    socks: list[socket.socket] = []
    try:
        for p in specs:
            family = socket.AF_INET6 if ":" in p.host_ip else socket.AF_INET
            kind = socket.SOCK_STREAM if p.proto == "tcp" else socket.SOCK_DGRAM
            s = socket.socket(family, kind)
            socks.append(s)
            if kind == socket.SOCK_STREAM:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((p.host_ip, p.host_port))
            except OSError as e:
                why = "is already in use" if e.errno == errno.EADDRINUSE else \
                    f"cannot be bound ({e.strerror})"
                raise KataError(f"port {p.host_ip}:{p.host_port}/{p.proto} {why}") from None
            if kind == socket.SOCK_STREAM:
                s.listen(128)
            s.setblocking(False)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


class Proxy:
    """Forwards each published port to the container's address."""

    def __init__(self, specs: list[PortSpec], socks: list[socket.socket]) -> None:
        self.specs, self.socks = specs, socks
        self.tasks: list[asyncio.Task[None]] = []
        self.servers: list[asyncio.AbstractServer] = []
        self.transports: list[asyncio.BaseTransport] = []

    async def start(self, target_ip: str) -> None:
        loop = asyncio.get_running_loop()
        for spec, sock in zip(self.specs, self.socks, strict=True):
            if spec.proto == "tcp":
                async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter,
                                 port: int = spec.container_port) -> None:
                    await _tcp_session(r, w, target_ip, port)
                self.servers.append(await asyncio.start_server(handle, sock=sock))
            else:
                front = _UdpFront(target_ip, spec.container_port)
                transport, _ = await loop.create_datagram_endpoint(
                    functools.partial(_same, front), sock=sock)
                self.transports.append(transport)

    async def close(self) -> None:
        for server in self.servers:
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)
        for t in self.transports:
            t.close()
        for s in self.socks:
            s.close()


def _same(front: _UdpFront) -> _UdpFront:
    return front


async def _pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
        if w.can_write_eof():
            w.write_eof()  # half-close, as the client did
    except (ConnectionError, OSError):
        w.close()


async def _tcp_session(r: asyncio.StreamReader, w: asyncio.StreamWriter,
                       ip: str, port: int) -> None:
    try:
        ur, uw = await asyncio.wait_for(asyncio.open_connection(ip, port), 10)
    except (OSError, TimeoutError) as e:
        log.debug("proxy to %s:%d: %s", ip, port, e)
        w.close()
        return
    try:
        await asyncio.gather(_pipe(r, uw), _pipe(ur, w))
    finally:
        uw.close()
        w.close()


class _UdpFront(asyncio.DatagramProtocol):
    """One upstream socket per client, so replies find their way back."""

    def __init__(self, ip: str, port: int) -> None:
        self.target = (ip, port)
        self.flows: dict[tuple[str, int], tuple[asyncio.DatagramTransport, float]] = {}
        self.pending: dict[tuple[str, int], list[bytes]] = {}
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if addr in self.pending:  # its upstream socket is being opened
            self.pending[addr].append(data)
            return
        flow = self.flows.get(addr)
        if flow is None:
            self.pending[addr] = [data]
            asyncio.ensure_future(self._open(addr))
            return
        flow[0].sendto(data)
        self.flows[addr] = (flow[0], time.monotonic())

    async def _open(self, addr: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        front = self

        class Back(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, _: tuple[str, int]) -> None:
                if front.transport is not None:
                    front.transport.sendto(data, addr)

        try:
            back, _ = await loop.create_datagram_endpoint(Back, remote_addr=self.target)
        except OSError as e:
            log.debug("udp proxy to %s: %s", self.target, e)
            self.pending.pop(addr, None)
            return
        self.flows[addr] = (back, time.monotonic())
        for data in self.pending.pop(addr, []):
            back.sendto(data)
        self._expire()

    def _expire(self) -> None:
        now = time.monotonic()
        for addr, (t, last) in list(self.flows.items()):
            if now - last > UDP_IDLE:
                t.close()
                del self.flows[addr]

    def connection_lost(self, exc: Exception | None) -> None:
        for t, _ in self.flows.values():
            t.close()
        self.flows.clear()
