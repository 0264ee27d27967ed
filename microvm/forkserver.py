"""The fork server: one warm interpreter that forks the shim daemons.

containerd runs `containerd-shim-kata-py-v2 start` for every pod, and the
daemon `start` left behind was a fresh interpreter that imported asyncio,
protobuf, pyroute2 and the sandbox core before it could answer containerd's
first call: a tenth of a second of every pod's start, and memory every
daemon held a private copy of.  The fork server has imported all of that
once.  `start` hands it the daemon's listening socket, the bundle directory
and its environment; the server forks the daemon, which shares the
server's pages copy-on-write with every other daemon forked from it.
containerd's `delete`, which it runs after every shim's end and waits for,
is done by a child of the server too, when one runs (none is made for it).

A daemon forked here must be what `start` would have spawned itself, so a
server serves only the place it was made for: the same namespaces, cgroup,
credentials, capabilities, limits, umask, OOM score, interpreter, and
KATA_PY_* and PYTHON* settings (read at import), checked again for every
request.  It ends after IDLE
seconds without a request, on SIGTERM, and when kata-py's code or its
installed packages changed under it (it answers `stale`); the next `start`
makes a new one.  Whatever goes wrong here, `start` spawns the daemon
itself, and `delete` runs in its own process, as before.

Nothing heavy is imported at the top: `start` imports this module.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Where `start` binds the daemons' sockets (manager.SOCKET_DIR).
SOCKET_DIR = Path("/run/containerd/s")
PREFIX = "kata-py-forkserver-"
TITLE = "containerd-shim-kata-py-v2 forkserver"
SPARE_TITLE = "kata-py spare"  # a spare's runner; "(ready)" once it is
# A server with nothing to fork for this long ends (KATA_PY_FORKSERVER_IDLE
# overrides it, for tests: a value of its own is also a server of its own).
IDLE = 300.0
# How often a server in a named network namespace looks whether the name
# is still there (it ends when it is not: it would keep the namespace alive).
NETNS_CHECK = 2.0
# A request is an argv and an environment; containerd's are a few KiB.
MAX_REQUEST = 1 << 20
# A spare VM not taken by then ends (its memory is not free: about 70 MiB
# under TCG); KATA_PY_SPARE_WAIT overrides it, for tests.
SPARE_WAIT = 60.0
# `start` gives up on the server after this long and spawns the daemon itself
# (a server being made imports everything first: about 0.3 s here, under load more).
TIMEOUT = 20.0
# `delete` asks only a server that runs, which answers in milliseconds; its
# callers (containerd, `microvm rm`) wait about 10 s for all of it.
DELETE_ANSWER = 3.0
_NAMESPACES = ("cgroup", "ipc", "mnt", "net", "pid", "user", "uts")
_STATUS = ("Umask", "Uid", "Gid", "Groups", "NoNewPrivs", "Seccomp", "CapInh", "CapPrm",
           "CapEff", "CapBnd", "CapAmb", "Cpus_allowed_list", "Mems_allowed_list")


# The server's program: what it imports, and what a request runs.  It lives
# in the CLI layer (it runs both front ends); this module sits below them.
PROGRAM = "microvm.cli.warm"


@dataclass(frozen=True)
class Program:
    warm: Callable[[str], None]               # import what the children of the kind
                                              # that made it will use
    accepts: Callable[[str, list[str]], bool]  # may a request of this kind run argv
    run: Callable[[str, list[str]], int]       # in the child, all in place: its status
    # Spares (the "cli" and "daemon" kinds).  In the server, with the
    # request's cwd (an fd): what to make a spare for after this request
    # (None: none), and whether one made for that may serve this request.
    shape: Callable[[str, list[str], int], list[str] | None] | None = None
    fits: Callable[[str, list[str], int, list[str]], bool] | None = None
    # In the spare's runner: get ready for it; False: nothing to hold.
    prepare: Callable[[str, list[str]], bool] | None = None


@dataclass
class _Spare:
    pid: int               # its supervisor's
    sock: socket.socket    # our end of the socket its request goes down
    kind: str
    shape: list[str]       # what it gets ready for
    ready: bool = False    # it said so (b"ready" on sock)


class Unavailable(Exception):
    """The server did not do it: `start` spawns the daemon itself, `delete`
    runs in-process."""


def place(pid: int | str = "self", env: dict[str, str] | None = None) -> bytes:
    """What a process passes on to a child it spawns, beyond argv, cwd and
    environment: a daemon forked by the server must have the same."""
    import resource

    proc = Path("/proc") / str(pid)
    parts = [os.readlink(proc / "ns" / ns) for ns in _NAMESPACES]
    parts.append((proc / "cgroup").read_text())
    parts.append((proc / "oom_score_adj").read_text().strip())
    parts += [line for line in (proc / "status").read_text().splitlines()
              if line.split(":", 1)[0] in _STATUS]
    number = os.getpid() if pid == "self" else int(pid)
    parts += [f"{name}={resource.prlimit(number, getattr(resource, name))}"
              for name in sorted(n for n in dir(resource) if n.startswith("RLIMIT_"))]
    parts.append(os.readlink(proc / "exe"))
    settings = os.environ if env is None else env
    # Read at start-up: kata-py's paths, Python's own, the locale (stdio's encoding).
    parts += sorted(f"{k}={v}" for k, v in settings.items()
                    if k.startswith(("KATA_PY_", "PYTHON")) or k in ("LANG", "LC_ALL", "LC_CTYPE"))
    return "\0".join(parts).encode()


def socket_path(env: dict[str, str] | None = None) -> Path:
    """This place's server, and this installation's: two venvs of one
    interpreter have the same place but not the same code."""
    here = place(env=env) + f"\0{sys.prefix}\0{__file__}".encode()
    digest = hashlib.sha256(here).hexdigest()
    return SOCKET_DIR / f"{PREFIX}{digest[:16]}"


# --- the client: `start` ----------------------------------------------------


def fork_daemon(argv: list[str], cwd: Path, listener: int, timeout: float = TIMEOUT) -> int:
    """The pid of a shim daemon the server forked (the server is made if
    there is none).  The daemon runs `containerd-shim-kata-py-v2 *argv` in
    cwd with this process's environment and `listener` as its fd 3.
    Unavailable if no server could, or if KATA_PY_FORKSERVER=off."""
    s, reply = _first_answer("daemon", argv, cwd, [listener], timeout, launch="wait")
    s.close()
    return reply["pid"]


def run_delete(argv: list[str], cwd: Path, timeout: float = DELETE_ANSWER) -> int:
    """`containerd-shim-kata-py-v2 *argv` (the delete action) run by a child
    of this place's server, with this process's stdio; its exit status.
    containerd runs `delete` after every shim's end and waits for it: a fresh
    interpreter took 0.12 s to import what the server has.  Unavailable if
    no server runs here (none is made for it: that costs more than delete)."""
    s, _ = _first_answer("delete", argv, cwd, [0, 1, 2], timeout, launch="never")
    s.settimeout(TIMEOUT)  # answered: what remains is delete's own work
    with s:
        # Its end.  None (it died) is not worth a retry: the caller deletes
        # in-process, and delete is idempotent.
        try:
            end = json.loads(s.recv(4096) or b"{}")
        except (OSError, ValueError):
            end = {}
    if not isinstance(end.get("exit"), int):
        raise Unavailable("it ended without a status")
    return int(end["exit"])


def run_cli(argv: list[str], timeout: float = TIMEOUT) -> tuple[str, int]:
    """`microvm *argv` run by a child of this place's server (the runner),
    with this process's stdio, cwd and environment: ("exit", status) or
    ("signal", number) as it ended.  The signals docker's CLI forwards, and
    SIGWINCH, are passed on to it; if this process dies, so does it.
    Unavailable if no server runs here (one is made for the next run, and
    this one runs in-process), and only then: once the runner exists, it
    is the run."""
    for fd in (0, 1, 2):  # closed stdio would be taken by the fds we open
        try:
            os.fstat(fd)
        except OSError:
            raise Unavailable(f"fd {fd} is closed") from None
    s, first = _first_answer("cli", argv, Path.cwd(), [0, 1, 2], timeout, launch="background")
    with s:
        runner = first["pid"]

        def forward(sig: int, _frame: object) -> None:
            with contextlib.suppress(OSError):
                os.kill(runner, sig)

        for sig in (*FORWARDED, signal.SIGWINCH):
            signal.signal(sig, forward)
        s.settimeout(None)
        try:
            data = s.recv(4096)
            end = json.loads(data)
            return ("signal", int(end["signal"])) if "signal" in end \
                else ("exit", int(end["exit"]))
        except (OSError, ValueError, KeyError, TypeError):
            print("microvm: error: the fork server's runner ended without a status",
                  file=sys.stderr)
            return ("exit", 125)


# The signals docker's CLI forwards to its container; `microvm run` too
# (microvm/core/stdio.py), and the thin client to its runner.
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
             signal.SIGUSR2)


def _first_answer(kind: str, argv: list[str], cwd: Path, fds: list[int], timeout: float,
                  launch: str) -> tuple[socket.socket, dict[str, int]]:
    """The connection, after the server's first answer ({"pid": child}).
    Where no server runs, launch says what to do: "wait" makes one and asks
    it (again if it was stale or went idle meanwhile), "background" makes one
    for next time, "never" makes none."""
    if os.environ.get("KATA_PY_FORKSERVER") == "off":
        raise Unavailable("KATA_PY_FORKSERVER=off")
    request = json.dumps({"kind": kind, "argv": argv, "env": dict(os.environ)}).encode()
    try:
        dirfd = os.open(cwd, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise Unavailable(f"{cwd}: {e.strerror}") from None
    try:
        path = socket_path()
        for _ in range(3):
            try:
                s = _dial(path, timeout)
            except (FileNotFoundError, ConnectionRefusedError):
                if launch == "background":
                    with contextlib.suppress(OSError):
                        _launch(path, kind)
                if launch != "wait":
                    raise Unavailable("no fork server runs here") from None
                try:
                    _launch(path, kind)
                    s = _dial(path, timeout)
                except OSError as e:
                    raise Unavailable(str(e) or type(e).__name__) from None
            except OSError as e:
                raise Unavailable(str(e) or type(e).__name__) from None
            try:
                socket.send_fds(s, [request], [dirfd, *fds])
                data = s.recv(4096)
            except (ConnectionResetError, BrokenPipeError):
                data = b""  # it went idle as we came
            except TimeoutError:
                s.close()
                # Stopped or stuck: it would hold every later request as
                # long.  It goes (its spares with it), so the next request
                # makes a new one; this one is done without it.
                ended = _end_server(path)
                raise Unavailable(f"the fork server did not answer in {timeout:g} s"
                                  + (f"; ended it (pid {ended[0]})" if ended else "")) from None
            except OSError as e:
                s.close()
                raise Unavailable(str(e) or type(e).__name__) from None
            try:
                reply = json.loads(data) if data else {}
            except ValueError:
                reply = {"error": f"a bad answer: {data[:80]!r}"}
            if isinstance(reply.get("pid"), int):
                return s, reply
            s.close()
            if launch != "wait" or not (reply.get("stale") or not data):
                raise Unavailable(str(reply.get("error", "stale" if reply.get("stale") else
                                                    "the fork server went away")))
        raise Unavailable("the fork server went away each time")
    finally:
        os.close(dirfd)


def _end_server(path: Path) -> list[int]:
    """SIGKILL the server listening at path (this netns's /proc/net/unix
    names the socket; the process holding it, titled as servers are, is
    it): the pids ended.  The listener's peer credentials would name the
    `start` that bound it, not the server."""
    inodes = set()
    with contextlib.suppress(OSError), open("/proc/net/unix") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == str(path):
                inodes.add(f"socket:[{fields[6]}]")
    ended = []
    for pid in filter(str.isdigit, os.listdir("/proc") if inodes else ()):
        with contextlib.suppress(OSError):
            fd_dir = f"/proc/{pid}/fd"
            if not any(os.readlink(f"{fd_dir}/{fd}") in inodes for fd in os.listdir(fd_dir)):
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if not f.read().startswith(TITLE.encode()):
                    continue
            if int(pid) != os.getpid() and os.stat(fd_dir).st_uid == os.getuid():
                os.kill(int(pid), signal.SIGKILL)
                ended.append(int(pid))
    return ended


def _dial(path: Path, timeout: float) -> socket.socket:
    """A connection to the server at path; OSError if none answers there."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
    except OSError:
        s.close()
        raise
    return s


def _launch(path: Path, kind: str) -> None:
    """Make the server for this place, unless another `start` just did: the
    socket is bound and listening before the server runs, so its first
    requests wait in the backlog while it imports."""
    SOCKET_DIR.mkdir(parents=True, exist_ok=True, mode=0o711)
    lock = os.open(SOCKET_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
            try:
                probe.connect(str(path))
                return  # made meanwhile
            except OSError:
                pass
        path.unlink(missing_ok=True)  # a killed server's
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as srv:
            srv.bind(str(path))
            os.chmod(path, 0o600)
            srv.listen(64)
            subprocess.Popen([sys.executable, "-m", PROGRAM, str(srv.fileno()), kind],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, pass_fds=(srv.fileno(),), cwd="/",
                             start_new_session=True)
    finally:
        os.close(lock)


def _in_named_netns(named: Path = Path("/run/netns")) -> bool:
    ours = os.stat("/proc/self/ns/net")
    with contextlib.suppress(OSError):
        for entry in os.scandir(named):
            with contextlib.suppress(OSError):
                st = entry.stat()
                if (st.st_dev, st.st_ino) == (ours.st_dev, ours.st_ino):
                    return True
    return False


# --- the server ---------------------------------------------------------------


def fingerprint(files: list[str] | None = None) -> list[tuple[str, int, int]]:
    """What, changed on disk, makes this server's imports stale: kata-py's
    own modules (an editable install's files change in place), the packages
    directory (pip replaces a package's dist-info) and the interpreter.
    files: those of an earlier fingerprint, looked at again (a module the
    server imports later, as its program's checks may, is read as it is
    then, so it is not stale)."""
    import microvm

    if files is None:
        ours = str(Path(microvm.__file__).parent)
        found_files = {m.__file__ for m in list(sys.modules.values())
                       if (getattr(m, "__file__", None) or "").startswith(ours)}
        found_files.add(sys.executable)
        found_files.update(p for p in sys.path if p.endswith("-packages"))
        files = sorted(f for f in found_files if f)
    found = []
    for f in files:
        try:
            st = os.stat(f)
            found.append((f, st.st_mtime_ns, st.st_ino))
        except OSError:
            found.append((f, 0, 0))
    return found


class Server:
    def __init__(self, listener: socket.socket, program: Program) -> None:
        self.listener = listener
        self.program = program
        self.path = Path(listener.getsockname())
        self.ino = os.stat(self.path).st_ino
        self.here = place()
        self.code = fingerprint()
        self.forked = 0
        self.pid = os.getpid()
        self.supervisors: set[int] = set()
        self.spares: dict[str, _Spare] = {}  # by kind: waiting for the next request
        self.spares_failed: set[str] = set()  # kinds whose last one ended in error: no more

    def serve(self, idle: float) -> None:
        # In a named network namespace (a test's node, a CNI pod's), the
        # server must not keep it alive once its name is gone: it looks
        # every few seconds.
        named = _in_named_netns()
        last = time.monotonic()
        self.listener.settimeout(min(idle, NETNS_CHECK) if named else idle)
        try:
            while True:
                try:
                    conn, _ = self.listener.accept()
                except TimeoutError:
                    if time.monotonic() - last >= idle or (named and not _in_named_netns()):
                        return
                    continue
                last = time.monotonic()
                with conn:
                    if not self.handle(conn):
                        return
        finally:
            self.close()

    def close(self) -> None:
        # Unlink first: a `start` that finds no socket makes a new server,
        # one that connected just now is refused and retries.
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self.ino:
                self.path.unlink()
        self.listener.close()

    def handle(self, conn: socket.socket) -> bool:
        """Fork one daemon, or one delete; False once this server must end."""
        fds: list[int] = []
        try:
            conn.settimeout(5)
            pid, uid, _ = struct.unpack("3i", conn.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
            data, fds, _, _ = socket.recv_fds(conn, MAX_REQUEST, 4)
            if data == b"status":  # who serves here (tests, and `ps` by socket)
                spares = {k: v.pid for k, v in self.spares.items()}
                conn.send(json.dumps({"server": os.getpid(), "forked": self.forked,
                                      "spares": spares}).encode())
                return True
            request = json.loads(data)
            kind, argv, env = request["kind"], request["argv"], request["env"]
            if (uid != os.getuid() or kind not in _FDS or len(fds) != _FDS[kind]
                    or not isinstance(argv, list) or not all(isinstance(a, str) for a in argv)
                    or not isinstance(env, dict)
                    or not all(isinstance(v, str) for v in env.values())):
                raise ValueError("a malformed request")
            if not self.program.accepts(kind, argv):
                raise ValueError(f"a {kind} request for another action")
            if fingerprint([f for f, _, _ in self.code]) != self.code:
                conn.send(b'{"stale": true}')
                return False
            if place(pid, env) != self.here:
                raise ValueError("a request from another place (namespaces, cgroup, limits)")
            if not self._hand_over(conn, kind, argv, env, fds):
                self._fork(conn, kind, argv, env, fds)
            self.forked += 1
            shape = self._spare_shape(kind, argv, fds[0])
        except (OSError, ValueError, KeyError, TypeError) as e:
            with contextlib.suppress(OSError):
                conn.send(json.dumps({"error": f"fork server: {e}"}).encode())
            return True
        finally:
            for fd in fds:
                os.close(fd)
        if shape is not None:
            self._make_spare(kind, shape)
        return True

    def _fork(self, conn: socket.socket, kind: str, argv: list[str], env: dict[str, str],
              fds: list[int]) -> None:
        if kind == "cli":
            supervisor = os.fork()
            if supervisor == 0:
                self._supervise(conn, argv, env, fds)
            self.supervisors.add(supervisor)
            return
        # Twice, so the child is nobody's here: as a process `start`
        # spawned, it is reparented once the middle process has gone.
        middle = os.fork()
        if middle == 0:
            status = 1
            try:
                child = os.fork()
                if child == 0:
                    self._become(conn, kind, argv, env, fds)
                conn.send(json.dumps({"pid": child}).encode())
                status = 0
            finally:
                os._exit(status)
        _, status = os.waitpid(middle, 0)
        if status != 0:
            raise OSError(f"could not fork the {kind}")

    def _supervise(self, conn: socket.socket, argv: list[str], env: dict[str, str],
                   fds: list[int]) -> None:
        """Between the CLI and its runner: the runner's end goes back to the
        CLI (its status, or the signal that killed it), and the CLI's end
        (the connection closes) is the runner's: SIGKILL, as a killed CLI's
        own process would have had."""
        status = 1
        try:
            self._as_supervisor()
            runner = os.fork()
            if runner == 0:
                self._become(conn, "cli", argv, env, fds)
            for fd in fds:
                os.close(fd)
            _watch_runner(conn, runner)
            status = 0
        finally:
            os._exit(status)

    def _as_supervisor(self, role: str = "cli") -> None:
        import setproctitle

        setproctitle.setproctitle(f"{TITLE} ({role})")
        for sig in (signal.SIGTERM, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        self.listener.close()
        for spare in self.spares.values():
            spare.sock.close()

    # -- the spare: a runner that got ready before it was asked ----------------
    #
    # The server keeps one of each kind: a supervisor-to-be, and under it a
    # runner that has done what the program's prepare does (restored a VM)
    # for a request like the one served before it was made, and waits.  The
    # next request it fits goes to it in place of a fork; others are forked
    # as ever while it waits on, for SPARE_WAIT at most: then it ends and
    # the next request makes one like itself.  Until it is taken, both die
    # with their parent (PR_SET_PDEATHSIG), and the runner's VM with it (its
    # helpers die with it), so a server's end, even by SIGKILL, takes its
    # spare along.  The runner gets ready as SCHED_IDLE, its VM's threads
    # too: a spare must not slow what is being served; only a ready one is
    # given a request (one still getting ready would make it wait, and do
    # more than a fresh fork), and its threads get the normal policy back.

    def _spare_shape(self, kind: str, argv: list[str], cwd: int) -> list[str] | None:
        if self.program.shape is None or kind not in _SPARE_KINDS \
                or os.environ.get("KATA_PY_SPARE") == "off":
            return None
        try:
            return self.program.shape(kind, argv, cwd)
        except Exception:  # noqa: BLE001 - the request's to judge, not the server's
            return None

    def _hand_over(self, conn: socket.socket, kind: str, argv: list[str],
                   env: dict[str, str], fds: list[int]) -> bool:
        """The request to the spare, if one waits and fits it: False if none
        took it."""
        spare = self.spares.get(kind)
        if spare is None:
            return False
        if not spare.ready:
            with contextlib.suppress(BlockingIOError, InterruptedError, OSError):
                spare.ready = spare.sock.recv(16, socket.MSG_DONTWAIT) == b"ready"
            if not spare.ready:
                return False
        assert self.program.fits is not None
        try:
            fits = self.program.fits(kind, argv, fds[0], spare.shape)
        except Exception:  # noqa: BLE001 - the request's to judge, not the server's
            fits = False
        if not fits:
            return False
        del self.spares[kind]
        with spare.sock:
            try:
                socket.send_fds(spare.sock, [json.dumps({"argv": argv, "env": env}).encode()],
                                [conn.fileno(), *fds])
            except OSError:
                return False  # it ended meanwhile (reaped on SIGCHLD)
        self.supervisors.add(spare.pid)
        return True

    def _make_spare(self, kind: str, shape: list[str]) -> None:
        if kind in self.spares or kind in self.spares_failed:
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            ours.close()
            _die_with_parent(self.pid)
            self._wait_as_spare(theirs, kind, shape)
        theirs.close()
        self.spares[kind] = _Spare(pid, ours, kind, shape)

    def _wait_as_spare(self, sock: socket.socket, kind: str, shape: list[str]) -> None:
        """The spare's supervisor: it waits for the request and hands it to
        its runner (or, if that died meanwhile, forks one as the server
        would).  A CLI runner it then watches as _supervise does; a daemon
        it leaves, as the middle process of a double fork.  Its status, if
        the runner ends first, is the runner's: 0 when prepare had nothing
        to hold or no request came."""
        import select

        status = 1
        try:
            self._as_supervisor("spare")
            import setproctitle

            # Nothing of the server's: the request just served (its stdio,
            # its connection, which serve() closes once we are forked).
            os.dup2(sock.fileno(), 3)
            sock.close()
            os.closerange(4, os.sysconf("SC_OPEN_MAX"))
            sock = socket.socket(fileno=3)
            jobs, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            me = os.getpid()
            runner = os.fork()
            if runner == 0:
                jobs.close()
                sock.close()
                _die_with_parent(me)
                self._hold(theirs, kind, shape)
            theirs.close()
            pidfd = os.pidfd_open(runner)
            poller = select.poll()
            poller.register(sock, select.POLLIN | select.POLLHUP)
            poller.register(pidfd, select.POLLIN)
            poller.register(jobs, select.POLLIN)
            while True:
                ready = {fd for fd, _ in poller.poll()}
                if pidfd in ready:
                    _, st = os.waitpid(runner, 0)
                    status = os.waitstatus_to_exitcode(st)
                    return
                if jobs.fileno() in ready:  # the runner is ready: the server is told
                    poller.unregister(jobs)
                    if jobs.recv(16) == b"ready":
                        sock.send(b"ready")
                        setproctitle.setproctitle(f"{TITLE} (spare, ready)")
                    continue
                break
            data, fds, _, _ = socket.recv_fds(sock, MAX_REQUEST, 5)
            if len(fds) != 1 + _FDS[kind]:
                return  # the server went away
            _die_with_parent(0, 0)  # the request is its client's now, not the server's
            conn = socket.socket(fileno=fds[0])
            rest = fds[1:]
            try:
                _unidle(runner)
                socket.send_fds(jobs, [data], rest)
                jobs.settimeout(TIMEOUT)
                if jobs.recv(16) != b"taken":  # it no longer dies with us
                    raise OSError("the spare did not take it")
            except OSError:  # it died meanwhile
                with contextlib.suppress(OSError, ChildProcessError):
                    os.kill(runner, signal.SIGKILL)
                    os.waitpid(runner, 0)
                request = json.loads(data)
                runner = os.fork()
                if runner == 0:
                    self._become(conn, kind, request["argv"], request["env"], rest)
            for fd in rest:
                os.close(fd)
            if kind == "daemon":
                conn.send(json.dumps({"pid": runner}).encode())
            else:
                _watch_runner(conn, runner)
            status = 0
        finally:
            os._exit(status)

    def _hold(self, sock: socket.socket, kind: str, shape: list[str]) -> None:
        """The spare's runner: prepare, wait, then run what comes in place."""
        code = 1
        try:
            import setproctitle

            setproctitle.setproctitle(SPARE_TITLE)
            os.dup2(sock.fileno(), 3)
            sock.close()
            os.closerange(4, os.sysconf("SC_OPEN_MAX"))
            sock = socket.socket(fileno=3)
            for sig in (signal.SIGTERM, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            assert self.program.prepare is not None
            if not self.program.prepare(kind, shape):
                code = 0
                return
            setproctitle.setproctitle(f"{SPARE_TITLE} (ready)")
            sock.send(b"ready")
            sock.settimeout(float(os.environ.get("KATA_PY_SPARE_WAIT", SPARE_WAIT)))
            try:
                data, fds, _, _ = socket.recv_fds(sock, MAX_REQUEST, 4)
            except TimeoutError:
                code = 0
                return
            if len(fds) != _FDS[kind]:
                code = 0
                return
            _die_with_parent(0, 0)
            sock.send(b"taken")
            sock.close()
            request = json.loads(data)
            self._become(None, kind, request["argv"], request["env"], fds)
        finally:
            os._exit(code)

    def reap(self) -> None:
        for kind, spare in list(self.spares.items()):
            with contextlib.suppress(ChildProcessError):
                pid, st = os.waitpid(spare.pid, os.WNOHANG)
                if pid:  # it ended before a request came (prune's SIGTERM is no failure)
                    if os.waitstatus_to_exitcode(st) > 0:
                        self.spares_failed.add(kind)
                    spare.sock.close()
                    del self.spares[kind]
        for pid in list(self.supervisors):
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == 0:
                    continue
            self.supervisors.discard(pid)

    def _become(self, conn: socket.socket | None, kind: str, argv: list[str],
                env: dict[str, str], fds: list[int]) -> None:
        """The child: the daemon (the listener as fd 3, stdio /dev/null, a
        process group of its own), delete (the requester's stdio, its exit
        status sent back on the connection, as fd 3) or the CLI's runner
        (the requester's stdio; its supervisor sends the status).  A spare's
        runner (no conn) keeps the fds it opened: they are its VM."""
        code = 1
        try:
            import setproctitle

            setproctitle.setproctitle(" ".join(["microvm", *argv]) if kind == "cli"
                                      else f"{TITLE} ({kind})")
            self.listener.close()
            cwd, *rest = fds
            os.fchdir(cwd)
            if kind == "daemon":
                if conn is not None:
                    conn.close()
                os.setpgid(0, 0)
                os.dup2(rest[0], 3)
                if conn is None:
                    for fd in fds:
                        if fd != 3:
                            os.close(fd)
            else:
                for target, fd in enumerate(rest):
                    os.dup2(fd, target)
                if conn is None:
                    for fd in fds:
                        os.close(fd)
                elif kind == "cli":
                    conn.close()  # the supervisor's
                else:
                    fd = conn.detach()  # it may be fd 3 already
                    if fd != 3:
                        os.dup2(fd, 3)
                        os.close(fd)
            if conn is not None:
                os.closerange(3 if kind == "cli" else 4, os.sysconf("SC_OPEN_MAX"))
            # The server's own handlers; the rest (SIGPIPE ignored, SIGINT
            # as KeyboardInterrupt) is any Python's, as a spawned one's.
            for sig in (signal.SIGTERM, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            os.environ.clear()
            os.environ.update(env)
            if kind == "cli":
                _reopen_stdio()
            code = self.program.run(kind, argv)
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            if kind == "delete":
                with contextlib.suppress(OSError):
                    os.write(3, json.dumps({"exit": code}).encode())
            os._exit(code)


def _watch_runner(conn: socket.socket, runner: int) -> None:
    """The supervisor's watch: the runner's end is sent to the CLI; the
    CLI's end (its connection closes) is the runner's."""
    import select

    conn.settimeout(None)
    conn.send(json.dumps({"pid": runner}).encode())
    pidfd = os.pidfd_open(runner)
    poller = select.poll()
    poller.register(conn, select.POLLIN | select.POLLHUP)
    poller.register(pidfd, select.POLLIN)
    while True:
        ready = {fd for fd, _ in poller.poll()}
        if pidfd in ready:
            _, st = os.waitpid(runner, 0)
            end = {"signal": os.WTERMSIG(st)} if os.WIFSIGNALED(st) \
                else {"exit": os.WEXITSTATUS(st)}
            with contextlib.suppress(OSError):
                conn.send(json.dumps(end).encode())
            return
        if conn.fileno() in ready:
            os.kill(runner, signal.SIGKILL)
            os.waitpid(runner, 0)
            return


def _die_with_parent(parent: int, sig: int = signal.SIGKILL) -> None:
    """PR_SET_PDEATHSIG (0: no more); a parent gone already is ours too."""
    from microvm import linux
    linux.prctl(linux.PR_SET_PDEATHSIG, sig)
    if sig and os.getppid() != parent:
        os._exit(1)


def _unidle(pid: int) -> None:
    """The normal policy back for every thread of pid and of its descendants
    (QEMU's vCPU threads took the spare's SCHED_IDLE when they were made)."""
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                os.sched_setscheduler(int(tid), os.SCHED_OTHER, os.sched_param(0))
            with contextlib.suppress(OSError):
                for child in Path(f"/proc/{pid}/task/{tid}/children").read_text().split():
                    _unidle(int(child))


def _reopen_stdio() -> None:
    """The server's sys.std* were made for /dev/null: these buffer as
    Python's own would for the fds the runner has now (a terminal's stdout
    by line)."""
    enc = sys.stdout.encoding
    sys.stdin = open(0, encoding=enc, closefd=False)  # noqa: SIM115
    sys.stdout = open(  # noqa: SIM115
        1, "w", buffering=1 if os.isatty(1) else -1, encoding=enc, closefd=False)
    sys.stderr = open(  # noqa: SIM115
        2, "w", buffering=1, encoding=enc, errors="backslashreplace", closefd=False)


# What each kind of request passes: the bundle (or working) directory
# first, then the daemon's listener, or delete's or the CLI's stdio.
_FDS = {"daemon": 2, "delete": 4, "cli": 4}
_SPARE_KINDS = ("daemon", "cli")


def serve(program: Program) -> None:
    """The server's main: its listener is the fd named by its argument."""
    import gc

    import setproctitle

    setproctitle.setproctitle(TITLE)
    listener = socket.socket(fileno=int(sys.argv[1]))
    server = Server(listener, program)
    idle = float(os.environ.get("KATA_PY_FORKSERVER_IDLE", IDLE))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGCHLD, lambda *_: server.reap())
    program.warm(sys.argv[2] if len(sys.argv) > 2 else "daemon")
    server.code = fingerprint()
    # What is imported stays: out of the collector's sight, the daemons'
    # collections do not write to (and so copy) the pages they share.
    gc.collect()
    gc.freeze()
    server.serve(idle)


def status(path: Path, timeout: float = 5) -> dict[str, Any]:
    """{"server": pid, "forked": children so far, "spares": {kind: the
    waiting spare's supervisor}} from the server at path."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.send(b"status")
        reply: dict[str, Any] = json.loads(s.recv(4096))
        return reply


def running(directory: Path = SOCKET_DIR) -> list[Path]:
    """The fork servers' sockets (live or a killed server's)."""
    with contextlib.suppress(FileNotFoundError):
        return sorted(p for p in directory.iterdir() if p.name.startswith(PREFIX))
    return []

