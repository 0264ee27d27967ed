"""The debug console: a root shell in the guest itself, outside every
container (`microvm console`, kata-runtime exec's role).

Off unless the config says `debug_console: true`: then the VM boots with
DEBUG_CONSOLE_PARAM (the agent refuses without it) and its owner listens on
`console.sock` in the sandbox's own run directory.  That directory is on the
owner's private tmpfs: root reaches it through /proc/<owner>/root, and it
goes with the owner, even after a SIGKILL.  Containers never reach it: they
have no way to the agent (its port is the VM's, not theirs) nor to the
host's file system.  The shell is the guest image's static busybox.

A client sends one JSON line ({"rows", "cols", "term"}), then the
terminal's bytes; it gets the shell's, until the shell exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from microvm.errors import KataError
from microvm.net.portforward import splice

if TYPE_CHECKING:
    from microvm.core.sandbox import Sandbox

log = logging.getLogger(__name__)

SOCKET = "console.sock"
HEADER_LIMIT = 4096


class ConsoleServer:
    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.path = sandbox.dir / SOCKET
        self._ids = itertools.count(1)
        self._server: asyncio.base_events.Server | None = None
        self._sessions: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._session, path=str(self.path),
                                                       limit=HEADER_LIMIT)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._sessions):
            t.cancel()
        if self._sessions:
            await asyncio.wait(self._sessions, timeout=2)
        with contextlib.suppress(OSError):
            self.path.unlink()

    async def _session(self, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._sessions.add(task)
        cid = f"console-{next(self._ids)}"
        sb = self.sandbox
        try:
            try:
                header = json.loads(await reader.readline())
                rows, cols = int(header.get("rows", 0)), int(header.get("cols", 0))
                term = str(header.get("term", "xterm"))[:64]
            except (ValueError, TypeError, AttributeError, asyncio.LimitOverrunError):
                writer.write(b"kata-py: a console starts with one JSON line\r\n")
                return
            try:
                await sb.start_console(cid, rows, cols, term)
            except KataError as e:
                writer.write(f"kata-py: {e}\r\n".encode())
                return
            try:
                await splice(sb, cid, reader, writer, end_with_guest=True)
            finally:
                with contextlib.suppress(KataError, ConnectionError):
                    await sb.close_console(cid)
        except (KataError, ConnectionError, OSError) as e:
            log.debug("console %s: %s", cid, e)
        finally:
            with contextlib.suppress(ConnectionError, OSError):
                await writer.drain()
            writer.close()
            self._sessions.discard(task)


def reachable_path(owner_pid: int, path: str) -> Path:
    """The socket as root on the host reaches it: through the owner's root,
    that is its mount namespace, where its private tmpfs is."""
    return Path(f"/proc/{owner_pid}/root") / path.lstrip("/")
