"""virtiofsd: one per VM, serving the sandbox's shared directory."""

from __future__ import annotations

import logging
import os
import resource
import socket
import subprocess
from pathlib import Path

from microvm.errors import VMError
from microvm.vm import helpers

log = logging.getLogger(__name__)


class Virtiofsd:
    def __init__(self, binary: str, source: Path, socket_path: Path, log_path: Path,
                 debug: bool = False) -> None:
        self.binary = binary
        self.source = source
        self.socket_path = socket_path
        self.log_path = log_path
        self.debug = debug
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self, fd: int) -> list[str]:
        # Raising RLIMIT_NOFILE past the hard limit needs CAP_SYS_RESOURCE,
        # which root may lack (containers, these CI machines): ask for no more.
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        limit = min(hard if hard != resource.RLIM_INFINITY else 1_000_000, 1_000_000)
        return [
            self.binary, f"--fd={fd}", "-o", f"source={self.source}", "-o", "cache=auto",
            "-o", "sandbox=namespace", "-o", "xattr", f"--rlimit-nofile={limit}",
            "-o", f"log_level={'debug' if self.debug else 'warn'}",
        ]

    def start(self) -> socket.socket:
        """Bind the socket ourselves, hand the listener to virtiofsd, and
        connect the one client there will ever be: QEMU's end, returned
        for the owner to pass on (QEMU opens nothing by path).  The backlog
        holds the connection until virtiofsd accepts it; the path goes at
        once, so nobody else can connect.
        """
        if not os.access(self.binary, os.X_OK):
            raise VMError(f"virtiofsd not found at {self.binary} (apt-get install qemu-system-x86)")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self.socket_path))
            listener.listen(1)
            client.connect(str(self.socket_path))
            self.socket_path.unlink()
            self.proc = helpers.spawn_logged(self.argv(listener.fileno()), self.log_path,
                                             [listener.fileno()])
        except OSError as e:
            client.close()
            self.socket_path.unlink(missing_ok=True)
            raise VMError(f"cannot start virtiofsd: {e}") from None
        finally:
            listener.close()
        return client

    async def stop(self) -> None:
        if self.proc is not None:
            await helpers.stop(self.proc, "virtiofsd")
