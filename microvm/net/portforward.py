"""kubelet's port-forward, for a pod whose listeners are in a VM.

containerd's CRI answers PortForward by dialling localhost:PORT inside the
pod's network namespace on the host (as for runc's pods).  There, only the
veth redirected to the tap lives; the listener is in the guest.  So the
sandbox's owner catches those connections: one NAT rule in the pod's
namespace redirects TCP to 127.0.0.1 to a listener of ours on 127.0.0.1,
which reads the port asked for (SO_ORIGINAL_DST) and carries the bytes to
the guest agent, which dials 127.0.0.1:PORT there (ConnectPort).  Nothing
in the guest's network changes, and no traffic leaves the pod's namespace.

The rule is the one thing that outlives a killed owner: the next sandbox in
the namespace replaces it, and a dead owner's claim (tcfilter.clean_stale)
removes it; the namespace's deletion takes it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import shlex
import socket
import struct
import subprocess
from typing import Protocol

from microvm.errors import KataError
from microvm.net import netlink

log = logging.getLogger(__name__)


class Guest(Protocol):
    """What a forward needs of its sandbox (the core's Sandbox): a connection
    to a guest port, named conn, whose bytes then flow as a process's
    stdin and stdout do, with container id "" and exec id conn."""

    async def connect_port(self, conn: str, port: int) -> None: ...
    async def close_port(self, conn: str) -> None: ...
    async def write_input(self, cid: str, data: bytes, exec_id: str = "") -> None: ...
    async def close_input(self, cid: str, exec_id: str = "") -> None: ...
    async def read_output(self, cid: str, stream: str, exec_id: str = "",
                          max_bytes: int = 1 << 20) -> bytes: ...

COMMENT = "kata-py port-forward"
CHUNK = 1 << 20  # per ReadStdout: the agent answers with what it has buffered (<= 256 KiB)
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h


def _iptables(path: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nsenter", f"--net={path}", "--", "iptables", "-w", "-t", "nat",
                           *args], capture_output=True, text=True)


def unredirect(path: str) -> int:
    """Remove our rules from path's namespace; how many there were."""
    listed = _iptables(path, "-S", "OUTPUT")
    ours = [line for line in listed.stdout.splitlines() if COMMENT in line]
    for line in ours:
        args = shlex.split(line)[2:]  # after "-A OUTPUT"
        _iptables(path, "-D", "OUTPUT", *args)
    return len(ours)


def redirect(path: str, port: int) -> None:
    """TCP to 127.0.0.1, any port, from path's namespace to 127.0.0.1:port."""
    unredirect(path)  # a killed owner's, which would shadow ours
    p = _iptables(path, "-A", "OUTPUT", "-o", "lo", "-p", "tcp", "-d", "127.0.0.1/32",
                  "-m", "comment", "--comment", COMMENT, "-j", "REDIRECT",
                  "--to-ports", str(port))
    if p.returncode != 0:
        raise KataError(f"port-forward rule in {path}: {p.stderr.strip()}")


def original_port(sock: socket.socket) -> int:
    """The port a redirected connection was made to."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    return int(struct.unpack_from("!H", raw, 2)[0])


def _listen() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
    except OSError:
        s.close()
        raise
    s.setblocking(False)
    return s


class PortForward:
    """The listener and rule of one sandbox's pod namespace."""

    def __init__(self, sandbox: Guest, path: str) -> None:
        self.sandbox, self.path = sandbox, path
        self.server: asyncio.AbstractServer | None = None
        self.sessions: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)
        self._ruled = False
        self._starting: asyncio.Future[None] | None = None

    def begin(self) -> None:
        """Start setting up, beside the VM's boot."""
        self._starting = asyncio.ensure_future(self._start())

    async def ready(self) -> None:
        if self._starting is not None:
            await asyncio.shield(self._starting)

    async def _start(self) -> None:
        try:
            sock = await asyncio.to_thread(netlink.in_namespace, _listen, self.path)
        except OSError as e:  # loopback down: nothing could dial localhost there either
            log.debug("no port-forward in %s: %s", self.path, e.strerror)
            return
        try:
            await asyncio.to_thread(redirect, self.path, sock.getsockname()[1])
        except BaseException:
            sock.close()
            raise
        self._ruled = True
        self.server = await asyncio.start_server(self._session, sock=sock)

    async def close(self) -> None:
        if self._starting is not None:  # whatever it got to is undone below
            await asyncio.wait({self._starting})
            if not self._starting.cancelled():
                self._starting.exception()  # retrieved: ready() raised it, if anyone asked
        if self.server is not None:
            self.server.close()
        for task in list(self.sessions):
            task.cancel()
        if self.sessions:
            await asyncio.wait(self.sessions, timeout=2)
        if self._ruled:
            self._ruled = False
            await asyncio.to_thread(unredirect, self.path)

    async def _session(self, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.sessions.add(task)
        conn = f"pf-{next(self._ids)}"
        sb = self.sandbox
        try:
            sock = writer.get_extra_info("socket")
            port = original_port(sock)
            try:
                await sb.connect_port(conn, port)
            except KataError as e:
                # As close to "connection refused" as an accepted connection
                # gets: a reset, which containerd reports on the stream.
                log.info("port-forward to port %d: %s", port, e)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return
            try:
                await splice(sb, conn, reader, writer)
            finally:
                with contextlib.suppress(KataError, ConnectionError):
                    await sb.close_port(conn)
        except (KataError, ConnectionError, OSError) as e:
            log.debug("port-forward %s: %s", conn, e)
        finally:
            writer.close()
            self.sessions.discard(task)


async def splice(guest: Guest, conn: str, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, end_with_guest: bool = False) -> None:
    """A client's stream to and from a guest stream (container_id "", exec_id
    conn), half-closes included, until both directions end or either fails
    (the client reset, the VM died); end_with_guest: or the guest's side ends
    (a console's shell exits: the client must not wait on its own input)."""
    async def up() -> None:
        while data := await reader.read(CHUNK):
            await guest.write_input("", data, conn)
        await guest.close_input("", conn)

    async def down() -> None:
        while data := await guest.read_output("", "stdout", conn, CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    tasks = {asyncio.create_task(up()), down_task := asyncio.create_task(down())}
    done: set[asyncio.Task[None]] = set()
    try:
        while tasks:
            done, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if any(t.exception() for t in done if not t.cancelled()) or \
                    (end_with_guest and down_task in done):
                break
    finally:
        for t in tasks:
            t.cancel()
        for r in await asyncio.gather(*tasks, *done, return_exceptions=True):
            if isinstance(r, Exception):
                log.debug("%s: %s", conn, r)
