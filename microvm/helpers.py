"""Starting and stopping helper processes (QEMU, virtiofsd) so none outlives us.

Each helper:
  - gets its fds from the parent (pass_fds), so nothing races at start-up;
  - runs in its own session, so a terminal's ^C reaches only the CLI;
  - has PR_SET_PDEATHSIG=SIGKILL, so even a SIGKILLed owner takes it along;
  - may run as another user (QEMU: see qemuuser.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import Callable, Sequence

from . import linux
from .qemuuser import Credentials

log = logging.getLogger(__name__)


def _child_setup(netns_fd: int | None, creds: Credentials | None) -> None:
    # setns needs root: before the switch of user.
    if netns_fd is not None:
        linux.setns(netns_fd, linux.CLONE_NEWNET)
    if creds is not None:
        creds.apply()
    # After the switch: a change of uid clears the parent-death signal.
    linux.set_pdeathsig(signal.SIGKILL)
    # The parent may have died before the prctl: then die now.
    if os.getppid() == 1:
        os.kill(os.getpid(), signal.SIGKILL)


def spawn(argv: Sequence[str], *, pass_fds: Sequence[int] = (), stdout: int | None = None,
          stderr: int | None = None, netns_fd: int | None = None,
          creds: Credentials | None = None) -> subprocess.Popen[bytes]:
    """netns_fd: the network namespace the helper runs in (QEMU in its pod's:
    its pid then stands for the pod's namespaces, and it has no other network).
    creds: the user it runs as (root if None)."""
    log.debug("starting %s", " ".join(argv))
    return subprocess.Popen(
        list(argv), stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
        pass_fds=tuple(pass_fds), start_new_session=True,
        preexec_fn=lambda: _child_setup(netns_fd, creds))


def spawn_logged(argv: Sequence[str], log_path: os.PathLike[str] | str,
                 pass_fds: Sequence[int] = ()) -> subprocess.Popen[bytes]:
    """spawn() with stdout and stderr appended to log_path (0600)."""
    out = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        return spawn(argv, pass_fds=pass_fds, stdout=out, stderr=out)
    finally:
        os.close(out)


def on_exit(proc: subprocess.Popen[bytes], callback: Callable[[], None]) -> Callable[[], None]:
    """Run callback in the loop as soon as proc exits (a pidfd, no polling);
    returns what cancels that."""
    loop = asyncio.get_running_loop()
    try:
        fd = os.pidfd_open(proc.pid)
    except ProcessLookupError:  # already reaped
        loop.call_soon(callback)
        return lambda: None
    open_ = [True]

    def cancel() -> None:
        if open_[0]:
            open_[0] = False
            loop.remove_reader(fd)
            os.close(fd)

    def exited() -> None:
        cancel()
        callback()

    loop.add_reader(fd, exited)
    return cancel


def describe_exit(proc: subprocess.Popen[bytes]) -> str:
    """'died (signal 9)' or 'exited (status 1)', for a process that ended."""
    code = proc.poll()
    if code is None:
        return "is running"
    return f"died (signal {-code})" if code < 0 else f"exited (status {code})"


async def wait(proc: subprocess.Popen[bytes], timeout: float | None) -> int | None:
    """The exit code, or None if the process still runs after timeout seconds."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    delay = 0.005
    while True:
        code = proc.poll()
        if code is not None:
            return code
        if deadline is not None and loop.time() >= deadline:
            return None
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)


async def stop(proc: subprocess.Popen[bytes], name: str, grace: float = 2.0) -> None:
    """SIGTERM, then SIGKILL; returns only once the process is gone (reaped)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    if await wait(proc, grace) is None:
        log.warning("%s (pid %d) ignored SIGTERM; killing it", name, proc.pid)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await wait(proc, None)  # reaped without holding the loop

