"""virtfs-proxy-helper: the root helper behind a VM's virtio-9p share.

QEMU's `-fsdev proxy` backend sends every file operation to this helper
over a socket, so QEMU itself stays unprivileged (as virtiofsd does for
virtio-fs).  Templated VMs share over 9p: QEMU 7.2 cannot migrate
vhost-user-fs, but a virtio-9p device the guest has not mounted migrates.

The helper runs in the owner's mount namespace and chroots into the
sandbox's shared directory, so the read-only binds there are read-only for
it too: nothing propagates, it sees the very mounts the owner made.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

from microvm.errors import VMError
from microvm.vm import helpers

BINARY = "/usr/lib/qemu/virtfs-proxy-helper"


class ProxyHelper:
    def __init__(self, source: Path, log_path: Path, binary: str = BINARY) -> None:
        self.source = source
        self.log_path = log_path
        self.binary = binary
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> socket.socket:
        """Start the helper on one end of a socketpair; return QEMU's end."""
        if not os.access(self.binary, os.X_OK):
            raise VMError(f"{self.binary} not found (apt-get install qemu-system-x86)")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.proc = helpers.spawn_logged(
                [self.binary, "-n", "-p", str(self.source), "-f", str(theirs.fileno())],
                self.log_path, [theirs.fileno()])
        except OSError as e:
            ours.close()
            raise VMError(f"cannot start {self.binary}: {e.strerror}") from None
        finally:
            theirs.close()
        return ours

    async def stop(self) -> None:
        if self.proc is not None:
            await helpers.stop(self.proc, "virtfs-proxy-helper")
