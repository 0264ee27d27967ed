"""Starting and stopping helper processes (QEMU, virtiofsd) so none outlives us.

Each helper:
  - gets its fds from the parent (pass_fds), so nothing races at start-up;
  - runs in its own session, so a terminal's ^C reaches only the CLI;
  - has PR_SET_PDEATHSIG=SIGKILL, so even a SIGKILLed owner takes it along;
  - has no_new_privs: no setuid binary or file capability raises it;
  - may run as another user (QEMU: see qemuuser.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Sequence

from microvm.vm.qemuuser import DYNAMIC_UID_BASE, Credentials

log = logging.getLogger(__name__)


# Set-up between fork and exec is done by util-linux, not by a preexec_fn
# (unsafe once the owner has threads, and the shim has).  sh works out the
# dynamic uid from its own pid, which every exec keeps; nsenter joins the
# pod's network namespace while still root; setpriv drops to the user and
# only then sets the parent-death signal (a change of uid clears it).  A
# last sh makes sure the owner did not die before that: then it exits.
_WRAPPER = r"""
owner=$1 base=$2 uid=$3 gid=$4 groups=$5 net=$6; shift 6
[ "$uid" = dynamic ] && uid=$(( base + $$ ))
[ "$gid" = same ] && gid=$uid
ids=
[ "$uid" = root ] || ids="--reuid=$uid --regid=$gid --${groups:+groups=}${groups:-clear-groups}"
exec ${net:+nsenter --net=$net --} setpriv $ids --no-new-privs --pdeathsig KILL -- \
  sh -c '[ "$PPID" = "$0" ] || exit 137; exec "$@"' "$owner" "$@"
"""


def wrapper(argv: Sequence[str], netns_fd: int | None,
            creds: Credentials | None) -> list[str]:
    """argv run as creds (root if None) in netns_fd's network namespace,
    dying with its owner (this process)."""
    if creds is None:
        uid, gid, groups = "root", "", ""
    else:
        uid = "dynamic" if creds.uid < 0 else str(creds.uid)
        gid = "same" if creds.gid < 0 else str(creds.gid)
        groups = ",".join(map(str, creds.groups))
    net = "" if netns_fd is None else f"/proc/self/fd/{netns_fd}"
    return ["/bin/sh", "-c", _WRAPPER, "sh", str(os.getpid()), str(DYNAMIC_UID_BASE),
            uid, gid, groups, net, *argv]


def spawn(argv: Sequence[str], *, pass_fds: Sequence[int] = (), stdout: int | None = None,
          stderr: int | None = None, netns_fd: int | None = None,
          creds: Credentials | None = None) -> subprocess.Popen[bytes]:
    """netns_fd: the network namespace the helper runs in (QEMU in its pod's:
    its pid then stands for the pod's namespaces, and it has no other network).
    creds: the user it runs as (root if None)."""
    log.debug("starting %s", " ".join(argv))
    if shutil.which(argv[0]) is None:  # said here: the wrapper would only exit 127
        code = errno.EACCES if os.path.exists(argv[0]) else errno.ENOENT
        raise OSError(code, os.strerror(code), argv[0])
    fds = (*pass_fds, *(() if netns_fd is None else (netns_fd,)))
    return subprocess.Popen(
        wrapper(argv, netns_fd, creds), stdin=subprocess.DEVNULL, stdout=stdout,
        stderr=stderr, pass_fds=fds, start_new_session=True)


def spawn_logged(argv: Sequence[str], log_path: os.PathLike[str] | str,
                 pass_fds: Sequence[int] = (),
                 creds: Credentials | None = None) -> subprocess.Popen[bytes]:
    """spawn() with stdout and stderr appended to log_path (0600)."""
    out = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        return spawn(argv, pass_fds=pass_fds, stdout=out, stderr=out, creds=creds)
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

