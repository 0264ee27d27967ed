"""What every running kata-py sandbox costs and does, for `microvm stats` and
`microvm monitor`.

Sandboxes are found as containerd finds its shims: by their sockets under
/run/containerd/s (the CLI's detached containers have shims too).  A socket
is asked only once its peer is known to be one of our shim daemons (its
process title), so runc's shims beside them are never spoken to.  Each shim
answers katapy.monitor.v1.Monitor.Describe; host figures (RSS, PSS, CPU
time) are read here from /proc for the processes it names.  Sandboxes of
the foreground `microvm run` serve no socket and are not seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from microvm.errors import KataError
from microvm.protocol import monitor_pb2
from microvm.shim.client import TaskClient
from microvm.shim.manager import BINARY, SOCKET_DIR

CLK_TCK = os.sysconf("SC_CLK_TCK")
ASK_TIMEOUT = 5.0  # per shim: a stuck one costs a scrape this much, no more


@dataclass
class Usage:
    """One host process of a sandbox."""

    role: str
    pid: int
    rss_bytes: int = 0
    pss_bytes: int = 0
    cpu_seconds: float = 0.0


@dataclass
class Sample:
    address: str
    info: monitor_pb2.SandboxInfo
    processes: list[Usage] = field(default_factory=list)
    at: float = 0.0  # monotonic, when asked

    @property
    def pss_bytes(self) -> int:
        return sum(p.pss_bytes for p in self.processes)

    def labels(self) -> dict[str, str]:
        """The sandbox's: its id, containerd namespace and, for a CRI pod, the
        pod's name and namespace (from any of its containers)."""
        out = {"sandbox": self.info.sandbox_id, "namespace": self.info.namespace,
               "pod": "", "pod_namespace": ""}
        for c in self.info.containers:
            for key in ("pod", "pod_namespace"):
                out[key] = out[key] or c.labels.get(key, "")
        return out


def usage(role: str, pid: int) -> Usage:
    """RSS and PSS (smaps_rollup) and CPU time (stat) of pid; zeros if it is gone."""
    u = Usage(role, pid)
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss"):
                setattr(u, f"{key.lower()}_bytes", int(rest.split()[0]) * 1024)
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        u.cpu_seconds = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime
    return u


def shim_sockets(root: Path = SOCKET_DIR) -> list[Path]:
    with contextlib.suppress(OSError):
        return sorted(p for p in root.iterdir() if p.is_socket())
    return []


def _ours(sock: socket.socket) -> bool:
    """Whether the peer is one of our shim daemons (not runc's, not a stranger)."""
    pid, _, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                    struct.calcsize("3i")))
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(BINARY.encode() + b" ")
    except OSError:
        return False


async def ask(address: str) -> Sample | None:
    """One shim's sandbox; None if nothing of ours answers there."""
    path = address.removeprefix("unix://")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, path)
        if not _ours(sock):
            sock.close()
            return None
        async with TaskClient.connect(path, "", sock=sock) as client:
            info = await client.describe(timeout=ASK_TIMEOUT)
    except (OSError, KataError):
        sock.close()
        return None
    at = time.monotonic()
    return Sample(address, info, [usage(p.role, p.pid) for p in info.processes], at)


async def scan(addresses: list[str] | None = None) -> list[Sample]:
    """Every sandbox of ours that answers (or those at addresses), in parallel."""
    if addresses is None:
        addresses = [str(p) for p in shim_sockets()]
    found = await asyncio.gather(*(ask(a) for a in addresses))
    return [s for s in found if s is not None and s.info.sandbox_id]


# --- `microvm stats` ------------------------------------------------------------

STATS_HEADER = ("NAME", "CPU %", "MEM USAGE / LIMIT", "MEM %", "NET I/O", "PIDS", "HOST PSS")


def _size(n: float, step: int, units: tuple[str, ...], digits: int) -> str:
    for unit in units:
        if n < step or unit == units[-1]:
            return f"{n:.{digits}g}{unit}" if unit != "B" else f"{int(n)}B"
        n /= step
    raise AssertionError


def binary_size(n: float) -> str:
    """docker's memory figures: 1.5MiB."""
    return _size(n, 1024, ("B", "KiB", "MiB", "GiB"), 4)


def decimal_size(n: float) -> str:
    """docker's network figures: 1.2kB."""
    return _size(n, 1000, ("B", "kB", "MB", "GB"), 3)


def stats_row(name: str, now: Sample, before: Sample | None) -> tuple[str, ...]:
    """One container's line; CPU % from the change since before (a share of
    one CPU, as docker counts: 200 % is two CPUs busy)."""
    c = next((c for c in now.info.containers if c.id == name), None)
    if c is None:
        return (name, "--", "--", "--", "--", "--", binary_size(now.pss_bytes))
    cpu = "--"
    prev = next((p for p in before.info.containers if p.id == name), None) if before else None
    if before is not None and prev is not None and now.at > before.at:
        cpu = f"{(c.cpu_usec - prev.cpu_usec) / 1e6 / (now.at - before.at) * 100:.2f}%"
    mem_pct = c.memory_bytes / c.memory_limit_bytes * 100 if c.memory_limit_bytes else 0.0
    info = now.info
    return (name, cpu, f"{binary_size(c.memory_bytes)} / {binary_size(c.memory_limit_bytes)}",
            f"{mem_pct:.2f}%",
            f"{decimal_size(info.guest_rx_bytes)} / {decimal_size(info.guest_tx_bytes)}",
            str(c.pids), binary_size(now.pss_bytes))


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("   ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


# --- `microvm console` -------------------------------------------------------------

async def console(sample: Sample) -> None:
    """Our terminal on the sandbox's debug console until its shell exits."""
    from microvm.core.console import reachable_path
    from microvm.core.stdio import Terminal, read_chunks
    if not sample.info.console_socket:
        raise KataError("the debug console is off in this sandbox (start it with "
                        "debug_console: true in the config)")
    shim = next(p.pid for p in sample.info.processes if p.role == "shim")
    path = reachable_path(shim, sample.info.console_socket)
    try:
        reader, writer = await asyncio.open_unix_connection(str(path))
    except OSError as e:
        raise KataError(f"cannot reach the console: {e.strerror}") from None
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    term = Terminal(stdout)
    rows, cols = term.size() if os.isatty(stdout) else (0, 0)
    writer.write(json.dumps({"rows": rows, "cols": cols,
                             "term": os.environ.get("TERM", "xterm")}).encode() + b"\n")

    async def up() -> None:
        async for data in read_chunks(stdin):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    feeding = asyncio.create_task(up())
    try:
        with Terminal(stdin) if os.isatty(stdin) else contextlib.nullcontext():
            while data := await reader.read(65536):
                os.write(stdout, data)
    finally:
        feeding.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
            await feeding
        writer.close()


def find_sandbox(prefix: str, samples: list[Sample]) -> Sample:
    found = [s for s in samples if s.info.sandbox_id.startswith(prefix)] if prefix else []
    if len(found) != 1:
        raise KataError(f"no sandbox {prefix!r}" if not found else
                        f"{prefix!r} names more than one sandbox: give more of its ID")
    return found[0]
