"""swtpm: a VM's software TPM 2.0, for the secure flavour's measured boot.

One swtpm per VM, its state in the sandbox's run directory (removed with
it), so no two VMs share TPM state.  As mkosi does, the parent makes the
connection: one end of a socketpair is swtpm's control channel
(`clientfd`), the other QEMU's `-chardev socket,fd=`; QEMU then hands swtpm
its data channel over it.  No path exists to race for.

swtpm runs as its VM's QEMU user (the same trust domain: QEMU already
talks to it) with no new privileges.  Its state directory is reached
through an fd (/proc/self/fd/N), so the root-only directories above it
stay closed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
from pathlib import Path

from microvm.errors import VMError
from microvm.vm import helpers
from microvm.vm.qemuuser import DYNAMIC_UID_BASE, Credentials

BINARY = "swtpm"


def qemu_credentials(creds: Credentials | None, qemu_pid: int) -> Credentials | None:
    """The user a VM's QEMU runs as, once started: a dynamic uid is fixed by
    its pid (qemuuser.py)."""
    if creds is None or creds.uid >= 0:
        return creds
    uid = DYNAMIC_UID_BASE + qemu_pid
    return Credentials(uid, uid, ())


class Swtpm:
    def __init__(self, state_dir: Path, log_path: Path, binary: str = BINARY) -> None:
        self.state_dir = state_dir
        self.log_path = log_path
        self.binary = binary
        self.proc: subprocess.Popen[bytes] | None = None
        self._theirs: socket.socket | None = None

    def channel(self) -> socket.socket:
        """QEMU's end of the control channel; swtpm gets the other in start().
        QEMU may be started first: what it sends waits in the socket."""
        if shutil.which(self.binary) is None:
            raise VMError(f"{self.binary} not found (apt-get install swtpm swtpm-tools)")
        ours, self._theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        return ours

    def start(self, creds: Credentials | None) -> None:
        """swtpm as creds (root if None) on the channel's other end."""
        assert self._theirs is not None
        theirs, self._theirs = self._theirs, None
        uid = creds.uid if creds is not None else 0
        self.state_dir.mkdir(mode=0o700)
        os.chown(self.state_dir, uid, creds.gid if creds is not None else 0)
        state = os.open(self.state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self.proc = helpers.spawn_logged(
                [self.binary, "socket", "--tpm2",
                 "--tpmstate", f"dir=/proc/self/fd/{state},mode=0600",
                 "--ctrl", f"type=unixio,clientfd={theirs.fileno()}",
                 "--log", "level=1"],
                self.log_path, [theirs.fileno(), state], creds=creds)
        except OSError as e:
            raise VMError(f"cannot start {self.binary}: {e.strerror}") from None
        finally:
            theirs.close()
            os.close(state)

    async def stop(self) -> None:
        if self._theirs is not None:
            self._theirs.close()
            self._theirs = None
        if self.proc is not None:
            await helpers.stop(self.proc, "swtpm")
        with contextlib.suppress(OSError):
            shutil.rmtree(self.state_dir)
