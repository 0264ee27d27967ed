"""What runs in the agent's forked children: namespaces, root, credentials, exec.

These functions run between fork() and execve() in a single-threaded copy of
the agent; they never return to the event loop.  They report to the agent
over a SOCK_SEQPACKET socket: JSON messages, plus the pty master fd.  The
socket is close-on-exec, so a successful execve shows as EOF to the agent.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import resource
import signal
import socket
import stat
import struct
import termios
from collections.abc import Callable
from dataclasses import dataclass, field

from guest import cgroups
from microvm import capabilities, linux
from microvm.protocol import GUEST_SHARED_ROOT

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SHARED_ROOT = GUEST_SHARED_ROOT

# Reported to the agent so the host can give docker's 127 / 126.
ERR_NOT_FOUND = "notfound"
ERR_NOT_EXECUTABLE = "notexec"
ERR_OTHER = "other"


@dataclass
class ProcessSpec:
    args: list[str]
    env: list[str]
    cwd: str = "/"
    uid: int = 0
    gid: int = 0
    additional_gids: list[int] = field(default_factory=list)
    terminal: bool = False
    rows: int = 0
    cols: int = 0
    rlimits: list[tuple[str, int, int]] = field(default_factory=list)
    no_new_privileges: bool = False
    # Bit masks by set ("bounding", "effective", ...); None keeps them all.
    capabilities: dict[str, int] | None = None
    seccomp: bytes = b""     # a BPF program; b"": none


@dataclass
class Stdio:
    """Child ends of the pipes; None for fds that come from the pty or /dev/null."""

    stdin: int | None
    stdout: int | None
    stderr: int | None


class ChildError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def send(sock: socket.socket, msg: dict[str, object], fds: list[int] | None = None) -> None:
    data = json.dumps(msg).encode()
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.send(data)


def _reset_signals() -> None:
    """Undo what the agent's Python runtime and event loop did to signals.

    execve() keeps ignored dispositions and the blocked mask; Python ignores
    SIGPIPE and SIGXFSZ, which would leak into the container's processes.
    """
    signal.set_wakeup_fd(-1)
    for sig in range(1, signal.NSIG):
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        with contextlib.suppress(OSError, ValueError):
            signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _mkdir(path: str, mode: int = 0o755) -> None:
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, mode)


def _touch(path: str) -> None:
    if not os.path.lexists(path):
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))


def in_shared(rel: str) -> str | None:
    """The guest path of rel (from the host) in the shared directory; None if
    it would lie outside it."""
    path = os.path.normpath(os.path.join(SHARED_ROOT, rel))
    return path if path.startswith(SHARED_ROOT + "/") else None


@dataclass(frozen=True)
class MountSpec:
    destination: str       # in the container
    kind: str              # "bind" or "tmpfs"
    source: str = ""       # bind: a guest path under SHARED_ROOT
    readonly: bool = False
    data: str = ""         # tmpfs: its options


def secure_join(root: str, path: str) -> str:
    """root/path with every symlink resolved as the container would see it,
    so a link the image planted cannot send a mount outside its root."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    current, links = root, 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            current = os.path.dirname(current) if current != root else root
            continue
        nxt = os.path.join(current, part)
        if os.path.islink(nxt):
            links += 1
            if links > 40:
                raise ChildError(ERR_OTHER, f"mount {path}: too many symbolic links")
            target = os.readlink(nxt)
            if target.startswith("/"):
                current = root
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        current = nxt
    return current


def mount_volumes(root: str, mounts: list[MountSpec]) -> None:
    for m in mounts:
        target = secure_join(root, m.destination)
        try:
            if m.kind == "bind":
                if os.path.isdir(m.source):
                    os.makedirs(target, exist_ok=True)
                else:  # a file (a Secret's key, /etc/hosts) needs a file to cover
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    _touch(target)
                linux.mount(m.source, target, None, linux.MS_BIND | linux.MS_REC)
                if m.readonly:  # the host shares it read-only too; this says so early
                    linux.mount(None, target, None,
                                linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY)
            else:
                os.makedirs(target, exist_ok=True)
                flags = linux.MS_NOSUID | linux.MS_NODEV | (linux.MS_RDONLY if m.readonly else 0)
                linux.mount("tmpfs", target, "tmpfs", flags, m.data)
        except OSError as e:
            raise ChildError(ERR_OTHER, f"mount {m.destination}: {e.strerror}") from None


def mask_paths(masked: list[str], readonly: list[str]) -> None:
    """OCI maskedPaths and readonlyPaths, as runc applies them: inside the
    container's root, so a symlink cannot send them elsewhere."""
    for path in readonly:
        try:
            linux.mount(path, path, None, linux.MS_BIND | linux.MS_REC)
            linux.mount(None, path, None, linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY
                        | linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)
        except FileNotFoundError:
            continue
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise ChildError(ERR_OTHER, f"read-only path {path}: {e.strerror}") from None
    for path in masked:
        try:
            if os.path.isdir(path):
                linux.mount("tmpfs", path, "tmpfs", linux.MS_RDONLY, "size=0")
            else:
                linux.mount("/dev/null", path, None, linux.MS_BIND)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise ChildError(ERR_OTHER, f"masked path {path}: {e.strerror}") from None


def setup_rootfs(shared_path: str, readonly: bool, hostname: str,
                 mounts: list[MountSpec] | None = None, masked: list[str] | None = None,
                 readonly_paths: list[str] | None = None) -> None:
    """Make the container's root: called in a fresh mount/uts/ipc namespace."""
    # Nothing done here may propagate back into the guest's own namespace.
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_SLAVE)
    root = in_shared(shared_path)
    if root is None or not os.path.isdir(root):
        raise ChildError(ERR_OTHER, f"rootfs {shared_path!r} not found in the shared directory")
    # pivot_root needs the new root to be a mount point.
    linux.mount(root, root, None, linux.MS_BIND | linux.MS_REC)
    for d in ("proc", "sys", "dev"):
        if not os.path.isdir(os.path.join(root, d)):
            try:
                _mkdir(os.path.join(root, d))
            except OSError as e:
                raise ChildError(ERR_OTHER, f"rootfs lacks /{d} and it cannot be made "
                                 f"({e.strerror})") from None
    nosuid = linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC
    linux.mount("proc", f"{root}/proc", "proc", nosuid)
    linux.mount("sysfs", f"{root}/sys", "sysfs", nosuid | linux.MS_RDONLY)
    linux.mount("tmpfs", f"{root}/dev", "tmpfs", linux.MS_NOSUID, "mode=755,size=65536k")
    for dev in ("null", "zero", "full", "random", "urandom", "tty"):
        _touch(f"{root}/dev/{dev}")
        linux.mount(f"/dev/{dev}", f"{root}/dev/{dev}", None, linux.MS_BIND)
    _mkdir(f"{root}/dev/pts")
    linux.mount("devpts", f"{root}/dev/pts", "devpts", linux.MS_NOSUID | linux.MS_NOEXEC,
                "newinstance,ptmxmode=0666,mode=0620,gid=5")
    _mkdir(f"{root}/dev/shm", 0o1777)
    linux.mount("shm", f"{root}/dev/shm", "tmpfs", nosuid, "mode=1777,size=65536k")
    _mkdir(f"{root}/dev/mqueue")
    linux.mount("mqueue", f"{root}/dev/mqueue", "mqueue", nosuid)
    for name, target in (("ptmx", "pts/ptmx"), ("fd", "/proc/self/fd"),
                         ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{root}/dev/{name}")
    mount_volumes(root, mounts or [])
    if readonly:
        linux.mount(None, root, None,
                    linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY)
    if hostname:
        socket.sethostname(hostname)
    # runc's trick: pivot onto itself, then detach the old root stacked below.
    os.chdir(root)
    linux.pivot_root(".", ".")
    linux.umount(".", linux.MNT_DETACH)
    os.chdir("/")
    mask_paths(masked or [], readonly_paths or [])


def apply_sysctls(sysctls: dict[str, str], proc_sys: str = "/proc/sys") -> None:
    """OCI linux.sysctl, as runc writes it: namespaced settings (net.*,
    kernel.shm*, kernel.msg*...) land in this process's namespaces, the
    rest in the guest kernel, which is the pod's alone.  The host checked
    the names (no '/', no '..')."""
    for key, value in sysctls.items():
        path = os.path.join(proc_sys, *key.split("."))
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)  # never made: only set
            try:
                os.write(fd, value.encode())
            finally:
                os.close(fd)
        except FileNotFoundError:
            raise ChildError(ERR_OTHER, f"sysctl {key}: the guest kernel has no such "
                             "setting") from None
        except OSError as e:
            raise ChildError(ERR_OTHER, f"sysctl {key}={value}: {e.strerror}") from None


def _env_path(env: list[str]) -> str:
    for kv in env:
        if kv.startswith("PATH="):
            return kv[5:]
    return DEFAULT_PATH


def resolve_executable(argv0: str, env: list[str]) -> str:
    """Find the program as execvp would, with docker's error classes."""
    if not argv0:
        raise ChildError(ERR_NOT_FOUND, "no command given")
    candidates = [argv0] if "/" in argv0 else [
        os.path.join(d or ".", argv0) for d in _env_path(env).split(":")
    ]
    denied = None
    for path in candidates:
        try:
            st = os.stat(path)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            denied = f"{argv0}: is a directory"
            continue
        if not os.access(path, os.X_OK):
            denied = f"{argv0}: permission denied"
            continue
        return path
    if denied:
        raise ChildError(ERR_NOT_EXECUTABLE, denied)
    if "/" in argv0:
        raise ChildError(ERR_NOT_FOUND, f"{argv0}: no such file or directory")
    raise ChildError(ERR_NOT_FOUND, f"{argv0}: executable file not found in $PATH")


def run_console(pty_slave: int, shell: str, term: str) -> None:
    """Between fork and exec of the debug console: its own session with the
    pty as its terminal, busybox's applets on its PATH, then the shell.
    Never returns."""
    os.setsid()
    fcntl.ioctl(pty_slave, termios.TIOCSCTTY, 0)
    for fd in (0, 1, 2):
        os.dup2(pty_slave, fd)
    if pty_slave > 2:
        os.close(pty_slave)
    os.chdir("/")
    applets = "/run/kata-py/console-bin"
    env = {"PATH": f"{applets}:/usr/sbin:/usr/bin:/sbin:/bin", "TERM": term or "xterm",
           "HOME": "/", "PS1": "kata-py-guest# "}
    script = f"mkdir -p {applets}; {shell} --install -s {applets} 2>/dev/null; exec {shell} sh -i"
    os.execve(shell, ["sh", "-c", script], env)


def set_winsize(fd: int, rows: int, cols: int) -> None:
    if rows and cols:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _setup_stdio(spec: ProcessSpec, stdio: Stdio, sock: socket.socket) -> None:
    """fds 0-2 for the process; with a terminal, the master goes to the agent."""
    if spec.terminal:
        # Opened after pivot_root, so the pty belongs to the container's devpts.
        master, slave = os.openpty()
        set_winsize(master, spec.rows, spec.cols)
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
        send(sock, {"pty": True}, [master])
        os.close(master)
        fds = [slave, slave, slave]
    else:
        os.setsid()
        devnull = os.open("/dev/null", os.O_RDWR)
        fds = [stdio.stdin if stdio.stdin is not None else devnull,
               stdio.stdout if stdio.stdout is not None else devnull,
               stdio.stderr if stdio.stderr is not None else devnull]
    # dup2 may overwrite a source that sits on 0-2; move sources above 2 first.
    fds = [os.dup(fd) if fd <= 2 else fd for fd in fds]
    for target, fd in enumerate(fds):
        os.dup2(fd, target, inheritable=True)


def _setup_credentials(spec: ProcessSpec) -> None:
    """runc's order: rlimits, the bounding set, the user (keeping the
    capabilities across setuid), then the other sets and no_new_privs."""
    for name, hard, soft in spec.rlimits:
        res = getattr(resource, name, None)
        if res is None:
            raise ChildError(ERR_OTHER, f"unknown rlimit {name}")
        resource.setrlimit(res, (soft, hard))
    caps = spec.capabilities
    if caps is not None:
        for n in capabilities.NUMBERS.values():
            if not caps["bounding"] >> n & 1:
                linux.prctl(linux.PR_CAPBSET_DROP, n)  # needs CAP_SETPCAP: still ours
        linux.prctl(linux.PR_SET_KEEPCAPS, 1)
    if spec.seccomp and not spec.no_new_privileges:
        # Without no_new_privs, loading a filter takes CAP_SYS_ADMIN: now,
        # before it may be dropped (runc does the same).
        _load_seccomp(spec.seccomp)
    os.setgroups(spec.additional_gids)
    os.setgid(spec.gid)
    os.setuid(spec.uid)
    if caps is not None:
        linux.prctl(linux.PR_SET_KEEPCAPS, 0)
        linux.capset(caps["effective"], caps["permitted"], caps["inheritable"])
        linux.prctl(linux.PR_CAP_AMBIENT, linux.PR_CAP_AMBIENT_CLEAR_ALL)
        for n in capabilities.NUMBERS.values():
            if caps["ambient"] >> n & 1:
                linux.prctl2(linux.PR_CAP_AMBIENT, linux.PR_CAP_AMBIENT_RAISE, n)
    if spec.no_new_privileges:
        linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)


def _load_seccomp(program: bytes) -> None:
    try:
        linux.seccomp_filter(program)
    except OSError as e:
        raise ChildError(ERR_OTHER, f"cannot load the seccomp profile: {e.strerror}") from None


def prepare_process(spec: ProcessSpec, stdio: Stdio, sock: socket.socket) -> str:
    """Everything but the exec, inside the container's namespaces and root."""
    try:
        os.chdir(spec.cwd or "/")
    except FileNotFoundError:
        # docker creates a missing working directory.
        os.makedirs(spec.cwd, exist_ok=True)
        os.chdir(spec.cwd)
    path = resolve_executable(spec.args[0] if spec.args else "", spec.env)
    _setup_stdio(spec, stdio, sock)
    _setup_credentials(spec)
    if not os.access(path, os.X_OK):
        raise ChildError(ERR_NOT_EXECUTABLE, f"{spec.args[0]}: permission denied")
    return path


def exec_process(path: str, spec: ProcessSpec, sock: socket.socket) -> None:
    _reset_signals()
    if spec.seccomp and spec.no_new_privileges:
        # As late as can be: the filter then governs as little of our own
        # Python as possible (runc loads it right before execve too).
        _load_seccomp(spec.seccomp)
    try:
        os.execve(path, spec.args, dict(kv.split("=", 1) for kv in spec.env if "=" in kv))
    except OSError as e:
        kind = ERR_NOT_EXECUTABLE if e.errno in (errno.EACCES, errno.ENOEXEC) else ERR_NOT_FOUND
        raise ChildError(kind, f"{spec.args[0]}: {e.strerror}") from None


def _fail(sock: socket.socket, e: BaseException) -> int:
    if isinstance(e, ChildError):
        kind, msg = e.kind, str(e)
    else:
        kind, msg = ERR_OTHER, f"{type(e).__name__}: {e}"
    with contextlib.suppress(OSError):
        send(sock, {"error": msg, "kind": kind})
    return {ERR_NOT_FOUND: 127, ERR_NOT_EXECUTABLE: 126}.get(kind, 125)


def _run(sock: socket.socket, steps: Callable[[], None]) -> int:
    """The forked child's body: steps() returns only by exec; a failure is
    told to the agent, and the exit code is docker's."""
    try:
        steps()
    except BaseException as e:
        return _fail(sock, e)
    return 125


# The pid namespace is not among them: the agent forks the process into it
# (new, or joined), so that one fork makes it (agent.fork_in_pid_namespace).
NAMESPACE_FLAGS = {"ipc": linux.CLONE_NEWIPC, "uts": linux.CLONE_NEWUTS}
SHAREABLE_NAMESPACES = (*NAMESPACE_FLAGS, "pid")


def run_container_init(sock: socket.socket, spec: ProcessSpec, stdio: Stdio, cgroup: str,
                       shared_path: str, readonly: bool, hostname: str,
                       mounts: list[MountSpec], share_pid: int = 0,
                       shared: tuple[str, ...] = (), masked: list[str] | None = None,
                       readonly_paths: list[str] | None = None,
                       sysctls: dict[str, str] | None = None) -> int:
    """New namespaces and root; the container's pid 1 waits for StartContainer.

    shared: namespaces joined from process share_pid (a pod's pause) instead.
    """
    def steps() -> None:
        cgroups.join(cgroup)
        fds = [os.open(f"/proc/{share_pid}/ns/{ns}", os.O_RDONLY)
               for ns in shared if ns != "pid"]
        for fd in fds:
            linux.setns(fd)
            os.close(fd)
        new = linux.CLONE_NEWNS
        for ns, flag in NAMESPACE_FLAGS.items():
            if ns not in shared:
                new |= flag
        linux.unshare(new)
        # In the container's namespaces, before /proc/sys is masked read-only.
        apply_sysctls(sysctls or {})
        # The pod's hostname is the pause container's, set when it was made.
        setup_rootfs(shared_path, readonly, "" if "uts" in shared else hostname, mounts,
                     masked, readonly_paths)
        path = prepare_process(spec, stdio, sock)
        send(sock, {"ready": True})
        if sock.recv(16) != b"start":
            os._exit(125)
        exec_process(path, spec, sock)

    return _run(sock, steps)


def run_exec(sock: socket.socket, spec: ProcessSpec, stdio: Stdio, cgroup: str,
             init_pid: int) -> int:
    """Join a running container's cgroup and namespaces; exec at once."""
    def steps() -> None:
        # Before the mount namespace: the container does not see the cgroup fs.
        cgroups.join(cgroup)
        # The mount namespace last: after it, /proc/<pid> is the container's.
        fds = [os.open(f"/proc/{init_pid}/ns/{ns}", os.O_RDONLY) for ns in ("ipc", "uts", "mnt")]
        for fd in fds:
            linux.setns(fd)
            os.close(fd)
        path = prepare_process(spec, stdio, sock)
        send(sock, {"ready": True})
        exec_process(path, spec, sock)

    return _run(sock, steps)
