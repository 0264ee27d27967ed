"""The shim's fork server (microvm/forkserver.py), with real processes:
`start` as containerd runs it, the daemons it leaves, and the server.  No VM.

Each test has a server of its own: a KATA_PY_FORKSERVER_IDLE value of its
own is part of the server's place, so its socket is not the one containerd's
starts use in the other tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from microvm import forkserver
from microvm.protocol import task_pb2
from microvm.shim.client import TaskClient
from tests.conftest import alive as _alive
from tests.conftest import pid_of, shim, wait_gone
from tests.netns import namespace

SHIM = str(Path(sys.executable).with_name("containerd-shim-kata-py-v2"))
MODULE = Path(forkserver.__file__)


def server_pid(path: Path) -> int:
    return forkserver.status(path)["server"]


class Starts:
    """`containerd-shim-kata-py-v2 start` in bundles of its own, and what it left."""

    def __init__(self, tmp: Path, idle: str) -> None:
        self.tmp = tmp
        self.env = {**os.environ, "KATA_PY_FORKSERVER_IDLE": idle}
        self.path = forkserver.socket_path(self.env)
        self.daemons: list[int] = []

    def __call__(self, id_: str, env: dict[str, str] | None = None,
                 prefix: tuple[str, ...] = ()) -> int:
        bundle = self.tmp / id_
        bundle.mkdir()
        (bundle / "config.json").write_text("{}")
        p = subprocess.run([*prefix, SHIM, "-namespace", "forkserver-test", "-address",
                            "/nonexistent.sock", "-id", id_, "start"], cwd=bundle,
                           env=env or self.env, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        assert p.stdout.startswith("unix:///run/containerd/s/"), p.stdout
        pid = pid_of(shim(id_), timeout=10)
        self.daemons.append(pid)
        return pid

    def close(self) -> None:
        for pid in self.daemons:
            os.kill(pid, signal.SIGTERM)
        for pid in self.daemons:
            wait_gone(pid, timeout=5)
        if self.path.exists():
            try:
                pid = server_pid(self.path)
            except OSError:
                self.path.unlink()
            else:
                os.kill(pid, signal.SIGTERM)
                wait_gone(pid, timeout=5)
        assert not self.path.exists(), "a server left its socket behind at SIGTERM"


@pytest.fixture
def starts(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Starts]:
    s = Starts(tmp_path, f"{60 + abs(hash(request.node.name)) % 1000}.5")
    try:
        yield s
    finally:
        s.close()


def _smaps(pid: int) -> dict[str, int]:
    lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]
    return {k.rstrip(":"): int(v) for k, v, *_ in (line.split() for line in lines)}


async def _connect_pid(address: str) -> int:
    async with TaskClient.connect(address, "forkserver-test") as client:
        reply = await client.call("Connect", task_pb2.ConnectRequest(id="x"))
        return int(reply.shim_pid)


def test_the_daemon_is_forked_by_the_warm_server_and_is_what_start_would_have_spawned(
        starts: Starts, tmp_path: Path) -> None:
    import asyncio

    first = starts("fs-a")
    server = server_pid(starts.path)
    t0 = time.monotonic()
    second = starts("fs-b")
    warm = time.monotonic() - t0
    assert server_pid(starts.path) == server, "one server forks every daemon"
    for pid, id_ in ((first, "fs-a"), (second, "fs-b")):
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        assert int(stat[1]) != server, "the daemon is reparented, as one start spawned"
        assert int(stat[2]) == pid, "its own process group"
        assert os.readlink(f"/proc/{pid}/cwd") == str(tmp_path / id_)
        assert sorted(os.listdir(f"/proc/{pid}/fd"))[:4] == ["0", "1", "2", "3"]
        assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
        address = (tmp_path / id_ / "address").read_text()
        assert asyncio.run(_connect_pid(address.removeprefix("unix://"))) == pid
        # A fresh interpreter shares no written pages: a forked one shares
        # the server's imports.
        assert _smaps(pid)["Shared_Dirty"] > 4096, _smaps(pid)
    assert warm < 2.0, f"a start through the warm server took {warm:.2f} s"


def test_a_request_from_another_place_is_refused(starts: Starts) -> None:
    starts("fs-c")
    server = server_pid(starts.path)
    script = (
        "import json, os, socket, sys\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
        f"s.connect({str(starts.path)!r})\n"
        "fd = os.open('/', os.O_RDONLY)\n"
        "env = {k: v for k, v in os.environ.items()}\n"
        "req = {'kind': 'daemon', 'argv': ['-id', 'x'], 'env': env}\n"
        "socket.send_fds(s, [json.dumps(req).encode()], [fd, fd])\n"
        "print(s.recv(4096).decode())\n")
    with namespace("kt-fsrv") as name:
        into = ("nsenter", f"--net=/run/netns/{name}")
        out = subprocess.run([*into, sys.executable, "-c", script], env=starts.env,
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert "another place" in json.loads(out.stdout)["error"]
        # A start there gets its daemon all the same, from a server of that
        # place, which ends once the namespace's name is gone (it would
        # keep the namespace alive).
        before = set(forkserver.running())
        other = starts("fs-d", prefix=into)
        assert os.readlink(f"/proc/{other}/ns/net") != os.readlink("/proc/self/ns/net")
        theirs = set(forkserver.running()) - before
        assert len(theirs) == 1
        their_server = server_pid(theirs.pop())
        assert server_pid(starts.path) == server
        os.kill(other, signal.SIGTERM)
        wait_gone(other, timeout=5)
        starts.daemons.remove(other)
    wait_gone(their_server, timeout=forkserver.NETNS_CHECK * 3)
    assert set(forkserver.running()) == before, "its socket is left"


@pytest.mark.parametrize("request_bytes, fds", [
    (b"not json", 2), (b'{"kind": "daemon", "argv": "x", "env": {}}', 2),
    (b'{"kind": "daemon", "argv": [], "env": {}}', 1),
    (b'{"kind": "daemon", "argv": [1], "env": {}}', 2),
    (b'{"kind": "daemon", "env": {}}', 2), (b'{"argv": [], "env": {}}', 2),
    (b'{"kind": "start", "argv": ["start"], "env": {}}', 2),
    (b'{"kind": "daemon", "argv": ["delete"], "env": {}}', 2),
    (b'{"kind": "delete", "argv": ["-id", "x"], "env": {}}', 4)])
def test_a_malformed_request_gets_one_line_and_the_server_serves_on(
        starts: Starts, request_bytes: bytes, fds: int) -> None:
    starts("fs-e")
    server = server_pid(starts.path)
    fd = os.open("/", os.O_RDONLY)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.connect(str(starts.path))
            socket.send_fds(s, [request_bytes], [fd] * fds)
            reply = json.loads(s.recv(4096))
    finally:
        os.close(fd)
    assert reply["error"].startswith("fork server: "), reply
    assert "\n" not in reply["error"]
    starts("fs-f")
    assert server_pid(starts.path) == server


def test_changed_code_makes_the_server_stale_and_a_new_one_serves(starts: Starts) -> None:
    starts("fs-g")
    old = server_pid(starts.path)
    st = MODULE.stat()
    os.utime(MODULE, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    try:
        starts("fs-h")
    finally:
        os.utime(MODULE, ns=(st.st_atime_ns, st.st_mtime_ns))
    wait_gone(old, timeout=5)
    assert server_pid(starts.path) != old


def test_an_idle_server_ends_and_removes_its_socket_and_its_daemons_live_on(
        tmp_path: Path) -> None:
    s = Starts(tmp_path, "0.5")
    try:
        daemon = s("fs-i")
        server = server_pid(s.path)
        wait_gone(server, timeout=5)
        assert not s.path.exists()
        assert _alive(daemon)
    finally:
        s.close()


def test_a_killed_server_is_replaced_by_the_next_start(starts: Starts) -> None:
    starts("fs-j")
    old = server_pid(starts.path)
    os.kill(old, signal.SIGKILL)
    wait_gone(old, timeout=5)
    assert starts.path.exists()  # a dead server's socket: nobody answers
    starts("fs-k")
    assert server_pid(starts.path) != old


def test_a_server_that_cannot_run_never_breaks_a_start(tmp_path: Path) -> None:
    """A bad idle value kills the server as it starts (only the server reads
    it): `start` spawns the daemon itself, as a fresh interpreter."""
    s = Starts(tmp_path, "not-a-number")
    try:
        daemon = s("fs-l")
        assert _smaps(daemon)["Shared_Dirty"] < 1024, "not forked from a server"
        assert not forkserver.running() or s.path not in forkserver.running() or \
            not _server_answers(s.path)
    finally:
        s.close()


def _server_answers(path: Path) -> bool:
    try:
        server_pid(path)
        return True
    except OSError:
        return False


def test_off_spawns_each_daemon_afresh_and_makes_no_server(tmp_path: Path) -> None:
    s = Starts(tmp_path, "61.25")
    s.env["KATA_PY_FORKSERVER"] = "off"
    s.path = forkserver.socket_path(s.env)
    try:
        daemon = s("fs-m")
        assert _smaps(daemon)["Shared_Dirty"] < 1024, "not forked from a server"
        assert not s.path.exists()
    finally:
        s.close()


def _delete(s: Starts, id_: str) -> subprocess.CompletedProcess[bytes]:
    bundle = s.tmp / id_
    p = subprocess.run([SHIM, "-namespace", "forkserver-test", "-address", "/nonexistent.sock",
                        "-id", id_, "-bundle", str(bundle), "delete"], cwd=bundle, env=s.env,
                       capture_output=True, timeout=30)
    assert p.returncode == 0, p.stderr
    resp = task_pb2.DeleteResponse()
    resp.ParseFromString(p.stdout)
    assert resp.exit_status == 137 and resp.exited_at.seconds > 0
    assert resp.SerializeToString() == p.stdout, "not one DeleteResponse alone"
    return p


def test_delete_is_run_by_a_child_of_the_server_when_one_runs_here(starts: Starts) -> None:
    """containerd runs `delete` after every shim's end and waits for it."""
    daemon = starts("fs-n")
    os.kill(daemon, signal.SIGKILL)  # as if killed: delete has a dead shim's socket to remove
    wait_gone(daemon, timeout=5)
    starts.daemons.remove(daemon)
    address = (starts.tmp / "fs-n" / "address").read_text().removeprefix("unix://")
    assert Path(address).exists()
    before = forkserver.status(starts.path)
    _delete(starts, "fs-n")
    after = forkserver.status(starts.path)
    assert after["server"] == before["server"]
    assert after["forked"] == before["forked"] + 1, "not run by the server"
    assert not Path(address).exists(), "the dead shim's socket is left"


def test_delete_runs_in_process_where_no_server_runs_and_makes_none(starts: Starts) -> None:
    bundle = starts.tmp / "fs-o"
    bundle.mkdir()
    assert not starts.path.exists()
    _delete(starts, "fs-o")
    assert not starts.path.exists()


def test_a_stopped_server_is_ended_by_the_next_request_which_is_done_without_it(
        starts: Starts) -> None:
    """A server that does not answer (stopped here; stuck alike) would hold
    every later request: delete gives up on it after DELETE_ANSWER, ends
    it, and deletes in-process; the next start makes a new server."""
    daemon = starts("fs-p")
    os.kill(daemon, signal.SIGKILL)
    wait_gone(daemon, timeout=5)
    starts.daemons.remove(daemon)
    old = server_pid(starts.path)
    os.kill(old, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        _delete(starts, "fs-p")
        took = time.monotonic() - t0
        wait_gone(old, timeout=5)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(old, signal.SIGKILL)
    assert forkserver.DELETE_ANSWER <= took < forkserver.DELETE_ANSWER + 5, took
    address = (starts.tmp / "fs-p" / "address").read_text().removeprefix("unix://")
    assert not Path(address).exists(), "the in-process delete did not run"
    starts("fs-q")
    assert server_pid(starts.path) != old
