"""containerd-shim-kata-py-v2 driven by Debian's real containerd (1.6) and ctr.

containerd runs with its own root, state and sockets under a temporary
directory, never the machine's; the test image is built here from
busybox-static and imported with `ctr image import` (no registry).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.message import Message

from harness import cristack
from harness.privatecontainerd import Containerd
from microvm import forkserver
from microvm.errors import KataError
from microvm.images.ociarchive import oci_archive
from microvm.net import portforward
from microvm.protocol import task_pb2, ttrpc
from microvm.shim.client import TaskClient
from tests.conftest import (
    helper_processes,
    network_leftovers,
    pid_of,
    pty_expect,
    pty_winsize,
    shim,
    shim_processes,
    shim_sockets,
    spare_runner,
    wait_gone,
)
from tests.netns import CNI_BIN, Pod, cni_pod, fetch, links, namespace, qdiscs, sh

pytestmark = [pytest.mark.vm, pytest.mark.skipif(shutil.which("containerd") is None,
                                                 reason="containerd not installed")]
IMAGE = "docker.io/library/kata-py-test:latest"
RUNTIME = "io.containerd.kata-py.v2"
TASK_API = "containerd.task.v2.Task"


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    c = Containerd.create(tmp_path_factory.mktemp("containerd"))
    archive = oci_archive(Path("/var/lib/kata-py/rootfs/busybox"), c.root / "image.tar", IMAGE,
                          ["sh"])
    c.ctr("image", "import", str(archive), check=True)
    yield c
    c.remove_all_tasks()
    c.stop()


@pytest.fixture
def ctd(containerd: Containerd) -> Iterator[Containerd]:
    """containerd, and after the test: no task, VM, shim or socket of ours left."""
    before = shim_sockets()
    yield containerd
    deadline = time.monotonic() + 15
    while True:
        left = [f"process: {p}" for p in helper_processes() + shim_processes()]
        left += [f"socket: {s}" for s in shim_sockets() - before]
        left += network_leftovers()
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not left, "left behind:\n" + "\n".join(left)


def force_remove(ctd: Containerd, cid: str) -> None:
    """Whatever state the task is in: kill it, delete it, remove the container."""
    ctd.ctr("task", "kill", "-s", "9", cid)
    deadline = time.monotonic() + 15
    while cid in ctd.ctr("task", "ls", "-q").stdout.split() and \
            ctd.ctr("task", "delete", cid).returncode != 0:
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    ctd.ctr("container", "rm", cid)


@contextlib.contextmanager
def events(ctd: Containerd) -> Iterator[list[str]]:
    """`ctr events` while the block runs; the lines, once it is done."""
    watch = subprocess.Popen(["ctr", "-a", ctd.address, "events"], stdout=subprocess.PIPE,
                             text=True, env=ctd.env)
    lines: list[str] = []
    try:
        time.sleep(0.5)
        yield lines
        time.sleep(1)
    finally:
        watch.terminate()
        out, _ = watch.communicate(timeout=10)
        lines += out.splitlines()


def run(ctd: Containerd, cid: str, *cmd: str, input: str | None = None,
        flags: tuple[str, ...] = ("--rm",)) -> subprocess.CompletedProcess[str]:
    return ctd.ctr("run", "--runtime", RUNTIME, *flags, IMAGE, cid, *cmd, input=input)


def test_ctr_run_prints_the_guest_kernel(ctd: Containerd) -> None:
    p = run(ctd, "t-uname", "uname", "-r")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().endswith("-kata-py")
    assert p.stdout.strip() != os.uname().release


def test_exit_status_and_streams(ctd: Containerd) -> None:
    p = run(ctd, "t-exit", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert p.returncode == 3
    assert p.stdout == "out\n"
    assert p.stderr == "err\n"


def test_stdin_reaches_eof(ctd: Containerd) -> None:
    p = run(ctd, "t-stdin", "sh", "-c", "cat; echo done", input="hello\n")
    assert p.returncode == 0, p.stderr
    assert p.stdout == "hello\ndone\n"


def test_all_of_stdin_arrives_before_its_eof(ctd: Containerd) -> None:
    """ctr sends CloseIO once it has written stdin into the FIFO: what is still
    buffered there reaches the process, then EOF (was: cancelled 50 ms after
    CloseIO, whatever was left)."""
    data = "".join(f"{i:07d}\n" for i in range(2 << 17))  # 2 MiB
    for i in range(3):
        p = run(ctd, f"t-stdin{i}", "wc", "-c", input=data)
        assert p.returncode == 0 and p.stdout.split() == [str(len(data))], (p.stdout, p.stderr)


def test_tty(ctd: Containerd) -> None:
    pid, fd = pty.fork()
    if pid == 0:
        os.execvpe("ctr", ["ctr", "-a", ctd.address, "run", "--runtime", RUNTIME, "--rm", "-t",
                           IMAGE, "t-tty", "sh", "-c", "tty; stty size"], ctd.env)
    pty_winsize(fd, 31, 97)
    out = pty_expect(fd, None)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out
    assert b"/dev/pts/" in out
    assert b"31 97" in out


def test_detached_exec_ps_kill_delete(ctd: Containerd) -> None:
    p = run(ctd, "t-det", "sleep", "1000", flags=("-d",))
    assert p.returncode == 0, p.stderr
    try:
        e = ctd.ctr("task", "exec", "--exec-id", "e1", "t-det", "sh", "-c",
                    "cat /proc/1/cmdline; echo; exit 5")
        assert e.returncode == 5
        assert e.stdout.startswith("sleep")
        ps = ctd.ctr("task", "ps", "t-det", check=True)
        assert len(ps.stdout.splitlines()) >= 2
        ctd.ctr("task", "kill", "-s", "SIGKILL", "t-det", check=True)
        _wait_status(ctd, "t-det", "STOPPED")
        d = ctd.ctr("task", "delete", "t-det")
        assert d.returncode == 0, d.stderr
        assert "137" in d.stderr
    finally:
        force_remove(ctd, "t-det")


def test_sigterm_ends_a_trapping_process(ctd: Containerd) -> None:
    p = run(ctd, "t-term", "sh", "-c", "trap 'exit 143' TERM; while :; do sleep 0.1; done",
            flags=("-d",))
    assert p.returncode == 0, p.stderr
    try:
        time.sleep(1)
        ctd.ctr("task", "kill", "-s", "SIGTERM", "t-term", check=True)
        _wait_status(ctd, "t-term", "STOPPED")
        assert "143" in ctd.ctr("task", "delete", "t-term").stderr
    finally:
        ctd.ctr("task", "delete", "t-term")
        ctd.ctr("container", "rm", "t-term")


def test_two_containers_of_a_pod_share_one_vm(ctd: Containerd) -> None:
    pod = ("--annotation", "io.kubernetes.cri.sandbox-id=pod-a")
    assert run(ctd, "pod-a", "sleep", "1000", flags=("-d", *pod)).returncode == 0
    try:
        first = ctd.ctr("task", "exec", "--exec-id", "b", "pod-a", "cat",
                        "/proc/sys/kernel/random/boot_id", check=True).stdout
        second = run(ctd, "pod-a-app", "cat", "/proc/sys/kernel/random/boot_id",
                     flags=("--rm", *pod))
        assert second.returncode == 0, second.stderr
        assert first == second.stdout
        # One VM for the pod: a single QEMU while the first container still runs.
        assert len([p for p in helper_processes() if "qemu-system" in p]) == 1
        # The second container's Delete, Shutdown and `delete` left the pod's shim
        # serving the first.
        again = ctd.ctr("task", "exec", "--exec-id", "c", "pod-a", "cat",
                        "/proc/sys/kernel/random/boot_id", check=True).stdout
        assert again == first
    finally:
        force_remove(ctd, "pod-a")


async def _task_call(sock: str, method: str, req: Message) -> Any:
    async with TaskClient.connect(sock, "default") as client:
        return await client.call(method, req, timeout=10)


def test_malformed_frames_get_errors_and_the_shim_keeps_serving(ctd: Containerd) -> None:
    assert run(ctd, "t-bad", "sleep", "1000", flags=("-d",)).returncode == 0
    try:
        sock = (ctd.bundle("t-bad") / "address").read_text().removeprefix("unix://")
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(sock)
            s.settimeout(10)
            # A garbage request, then a wrongly typed payload for Kill.
            s.sendall(struct.pack(">IIBB", 5, 1, 1, 0) + b"\xff\xff\xff\xff\xff")
            head = s.recv(10)
            length, sid, mtype, _ = struct.unpack(">IIBB", head)
            assert (sid, mtype) == (1, 2)
            from microvm.protocol import ttrpc_pb2
            resp = ttrpc_pb2.Response()
            resp.ParseFromString(s.recv(length))
            assert resp.status.code == ttrpc.INVALID_ARGUMENT
            req = ttrpc_pb2.Request(service=TASK_API, method="Kill", payload=b"\x0a\xff")
            data = req.SerializeToString()
            s.sendall(struct.pack(">IIBB", len(data), 3, 1, 0) + data)
            length, sid, _, _ = struct.unpack(">IIBB", s.recv(10))
            resp.ParseFromString(s.recv(length))
            assert sid == 3 and resp.status.code == ttrpc.INVALID_ARGUMENT
        got = asyncio.run(_task_call(sock, "Connect", task_pb2.ConnectRequest(id="t-bad")))
        assert got.task_pid > 0
        state = asyncio.run(_task_call(sock, "State", task_pb2.StateRequest(id="t-bad")))
        assert state.status == task_pb2.RUNNING
        with pytest.raises(KataError, match="checkpoint") as err:
            asyncio.run(_task_call(sock, "Checkpoint",
                                   task_pb2.CheckpointTaskRequest(id="t-bad")))
        assert err.value.status == ttrpc.UNIMPLEMENTED
        with pytest.raises(KataError) as err:
            asyncio.run(_task_call(sock, "State", task_pb2.StateRequest(id="nope")))
        assert err.value.status == ttrpc.NOT_FOUND
    finally:
        force_remove(ctd, "t-bad")


def test_sigkill_of_the_shim_then_delete_leaves_nothing(ctd: Containerd) -> None:
    assert run(ctd, "t-kill", "sleep", "1000", flags=("-d",)).returncode == 0
    sock = (ctd.bundle("t-kill") / "address").read_text().removeprefix("unix://")
    got = asyncio.run(_task_call(sock, "Connect", task_pb2.ConnectRequest(id="t-kill")))
    os.kill(got.shim_pid, signal.SIGKILL)
    # containerd sees the shim gone and runs our `delete`; the VM dies with
    # the shim: all of it within 5 s.
    deadline = time.monotonic() + 5
    while Path(sock).exists() or helper_processes():
        assert time.monotonic() < deadline, helper_processes()
        time.sleep(0.2)
    ctd.ctr("task", "delete", "t-kill")
    assert ctd.ctr("container", "rm", "t-kill").returncode == 0


def test_containerds_shims_are_forked_by_the_fork_server(ctd: Containerd) -> None:
    """containerd's `start` reaches the fork server of its place: the daemon
    shares the server's pages, and a SIGKILLed server is replaced by the
    next start (tests/unit/test_forkserver.py has the rest)."""
    servers = []
    for cid in ("t-fork1", "t-fork2"):
        before = _forked()
        assert run(ctd, cid, "sleep", "1000", flags=("-d",)).returncode == 0
        try:
            sock = (ctd.bundle(cid) / "address").read_text().removeprefix("unix://")
            got = asyncio.run(_task_call(sock, "Connect", task_pb2.ConnectRequest(id=cid)))
            rollup = Path(f"/proc/{got.shim_pid}/smaps_rollup").read_text()
            assert int(rollup.split("Shared_Dirty:")[1].split()[0]) > 4096, rollup
            # containerd's server: the one that forked one daemon more.
            after = _forked()
            grew = [(path, pid) for path, (pid, n) in after.items()
                    if n > before.get(path, (pid, 0))[1] or before.get(path, (0,))[0] != pid]
            assert len(grew) == 1, (before, after)
            servers.append(grew[0])
            if cid == "t-fork1":
                os.kill(grew[0][1], signal.SIGKILL)
        finally:
            force_remove(ctd, cid)
    (first_path, first_pid), (second_path, second_pid) = servers
    assert first_path == second_path and first_pid != second_pid


def _forked() -> dict[Path, tuple[int, int]]:
    """Each answering fork server: (its pid, daemons it forked)."""
    found = {}
    for path in forkserver.running():
        with contextlib.suppress(OSError):
            st = forkserver.status(path)
            found[path] = (st["server"], st["forked"])
    return found


def test_containerd_restart_keeps_the_task(ctd: Containerd) -> None:
    assert run(ctd, "t-restart", "sleep", "1000", flags=("-d",)).returncode == 0
    try:
        ctd.stop()
        ctd.start()
        ls = ctd.ctr("task", "ls", check=True).stdout
        assert "t-restart" in ls and "RUNNING" in ls
        e = ctd.ctr("task", "exec", "--exec-id", "r1", "t-restart", "echo", "still here")
        assert e.stdout == "still here\n"
        ctd.ctr("task", "kill", "-s", "9", "t-restart", check=True)
    finally:
        time.sleep(1)
        ctd.ctr("task", "delete", "t-restart")
        ctd.ctr("container", "rm", "t-restart")


def test_events_reach_containerd_in_order(ctd: Containerd) -> None:
    with events(ctd) as lines:
        assert run(ctd, "t-ev", "sleep", "1000", flags=("-d",)).returncode == 0
        ctd.ctr("task", "exec", "--exec-id", "x1", "t-ev", "true", check=True)
        ctd.ctr("task", "pause", "t-ev", check=True)
        ctd.ctr("task", "resume", "t-ev", check=True)
        ctd.ctr("task", "kill", "-s", "9", "t-ev", check=True)
        _wait_status(ctd, "t-ev", "STOPPED")
        ctd.ctr("task", "delete", "t-ev", check=True)
    ctd.ctr("container", "rm", "t-ev")
    topics = [line.split()[5] for line in lines if '"t-ev"' in line and "/tasks/" in line]
    assert topics == ["/tasks/create", "/tasks/start", "/tasks/exec-added",
                      "/tasks/exec-started", "/tasks/exit", "/tasks/paused", "/tasks/resumed",
                      "/tasks/exit", "/tasks/delete"]


def _wait_status(ctd: Containerd, cid: str, status: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        row = [line for line in ctd.ctr("task", "ls").stdout.splitlines()
               if line.split()[:1] == [cid]]
        if row and row[0].split()[-1] == status:
            return
        assert time.monotonic() < deadline, row
        time.sleep(0.2)


def test_pause_resume_metrics_update(ctd: Containerd) -> None:
    # Renamed into place: a reader never sees the file truncated, half-written.
    # The long sleep keeps two processes alive whenever pids.current is read.
    counter = ("sleep 1000 & i=0; while :; do i=$((i+1)); echo $i > /tmp/m; mv /tmp/m /tmp/n; "
               "sleep 0.1; done")
    assert run(ctd, "t-pause", "sh", "-c", counter, flags=("-d",)).returncode == 0
    try:
        time.sleep(1)
        ctd.ctr("task", "pause", "t-pause", check=True)
        _wait_status(ctd, "t-pause", "PAUSED")
        ctd.ctr("task", "resume", "t-pause", check=True)
        _wait_status(ctd, "t-pause", "RUNNING")
        # Frozen means frozen: the counter did not move while paused.
        n1 = ctd.ctr("task", "exec", "--exec-id", "n1", "t-pause", "cat", "/tmp/n",
                     check=True).stdout
        ctd.ctr("task", "pause", "t-pause", check=True)
        time.sleep(1.5)
        ctd.ctr("task", "resume", "t-pause", check=True)
        n2 = ctd.ctr("task", "exec", "--exec-id", "n2", "t-pause", "cat", "/tmp/n",
                     check=True).stdout
        assert int(n2) - int(n1) < 10   # ~15 ticks if it had kept running

        m = ctd.ctr("task", "metrics", "t-pause", check=True).stdout
        values = dict(line.split()[:2] for line in m.splitlines() if line.startswith(
            ("pids.", "cpu.", "memory.")))
        assert int(values["pids.current"]) >= 2      # sh and its long sleep
        assert int(values["cpu.usage_usec"]) > 0
        assert int(values["memory.usage"]) > 0

        # ctr 1.6 has no `task update`: the shim's Update, as CRI would call it.
        from google.protobuf import any_pb2

        from microvm.protocol import cgroups_pb2
        sock = (ctd.bundle("t-pause") / "address").read_text().removeprefix("unix://")
        res = any_pb2.Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/"
                                   "LinuxResources",
                          value=b'{"memory": {"limit": 104857600}, "pids": {"limit": 50}}')
        asyncio.run(_task_call(sock, "Update", task_pb2.UpdateTaskRequest(
            id="t-pause", resources=res)))
        stats = asyncio.run(_task_call(sock, "Stats", task_pb2.StatsRequest(id="t-pause")))
        assert stats.stats.type_url == "io.containerd.cgroups.v2.Metrics"
        metrics = cgroups_pb2.Metrics()
        metrics.ParseFromString(stats.stats.value)
        assert metrics.memory.usage_limit == 104857600
        assert metrics.pids.limit == 50
    finally:
        force_remove(ctd, "t-pause")


def test_oom_in_the_guest_is_reported(ctd: Containerd) -> None:
    """The spec's memory limit applies in the guest; its OOM kill becomes TaskOOM."""
    with events(ctd) as lines:
        p = run(ctd, "t-oom", "tail", "/dev/zero", flags=("--rm", "--memory-limit", "33554432"))
        assert p.returncode == 137, p.stderr
    topics = [line.split()[5] for line in lines if '"t-oom"' in line]
    assert "/tasks/oom" in topics
    assert topics.index("/tasks/oom") < topics.index("/tasks/exit")


LOGGER = """#!/bin/sh
# A containerd binary:// logger: stdout on fd 3, stderr on fd 4, ready = close fd 5.
# SIGTERM follows the pipes' close at once (as containerd does it): it means
# "finish up", so finish writing rather than die.
trap '' TERM
exec 5>&-
cat <&3 > "$2.out" &
cat <&4 > "$2.err" &
wait
echo "$CONTAINER_NAMESPACE/$CONTAINER_ID" > "$2.who"
"""


def test_binary_logger(ctd: Containerd, tmp_path: Path) -> None:
    logger = tmp_path / "logger.sh"
    logger.write_text(LOGGER)
    logger.chmod(0o755)
    base = tmp_path / "log"
    p = run(ctd, "t-log", "sh", "-c", "echo to-out; echo to-err >&2",
            flags=("--rm", "--log-uri", f"binary://{logger}?file={base}"))
    assert p.returncode == 0, p.stderr
    deadline = time.monotonic() + 10
    who = Path(f"{base}.who")
    while not (who.exists() and who.read_text().endswith("\n")):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert Path(f"{base}.out").read_text() == "to-out\n"
    assert Path(f"{base}.err").read_text() == "to-err\n"
    assert Path(f"{base}.who").read_text() == "default/t-log\n"


def test_runtime_options_name_the_config(ctd: Containerd, tmp_path: Path) -> None:
    good = tmp_path / "kata-py.yaml"
    good.write_text("memory_mib: 300\n")
    p = run(ctd, "t-cfg", "grep", "MemTotal", "/proc/meminfo",
            flags=("--rm", "--runtime-config-path", str(good)))
    assert p.returncode == 0, p.stderr
    assert 250_000 < int(p.stdout.split()[1]) < 300 * 1024
    bad = tmp_path / "bad.yaml"
    bad.write_text("memory_mb: 300\n")
    p = run(ctd, "t-cfg2", "true", flags=("--rm", "--runtime-config-path", str(bad)))
    assert p.returncode != 0
    assert f"{bad}: unknown key 'memory_mb'" in p.stderr
    ctd.ctr("container", "rm", "t-cfg2")


def test_output_faster_than_the_reader_is_not_lost(ctd: Containerd) -> None:
    p = subprocess.run(
        ["ctr", "-a", ctd.address, "run", "--runtime", RUNTIME, "--rm", IMAGE, "t-big", "sh",
         "-c", "dd if=/dev/zero bs=65536 count=128 2>/dev/null | od -v -An | head -c 5000000"],
        capture_output=True, timeout=180, env=ctd.env)
    assert p.returncode == 0, p.stderr
    assert len(p.stdout) == 5_000_000


@pytest.fixture
def pod(tmp_path: Path) -> Iterator[Pod]:
    """A pod namespace prepared by the CNI bridge plugin, in a node namespace
    of the test's own (no traffic on the machine's interfaces)."""
    if not (CNI_BIN / "bridge").exists():
        pytest.skip("containernetworking-plugins not installed")
    with namespace("kt-node") as node, cni_pod(node, tmp_path / "ipam") as p:
        yield p


def test_cni_pod_network_inside_the_guest(ctd: Containerd, pod: Pod) -> None:
    """The spec names the namespace CNI prepared: its address, route and MTU
    are the guest's, and the node reaches the guest there."""
    p = run(ctd, "t-net", "sh", "-c", "ip -o addr show eth0; ip route; "
            f"ping -c 1 -W 5 {pod.gateway} >/dev/null && echo gateway-ok",
            flags=("--rm", "--with-ns", f"network:{pod.netns}"))
    assert p.returncode == 0, p.stderr
    assert f"inet {pod.ip}/24" in p.stdout
    assert f"default via {pod.gateway} dev eth0" in p.stdout
    assert "gateway-ok" in p.stdout
    ns = Path(pod.netns).name
    assert "ingress" not in qdiscs(ns) and "tap0_kata" not in links(ns)


def test_sigkill_of_a_networked_shim_then_delete_cleans_the_namespace(
        ctd: Containerd, pod: Pod) -> None:
    ns = Path(pod.netns).name
    assert run(ctd, "t-netkill", "sleep", "1000",
               flags=("-d", "--with-ns", f"network:{pod.netns}")).returncode == 0
    assert "ingress" in qdiscs(ns)
    sock = (ctd.bundle("t-netkill") / "address").read_text().removeprefix("unix://")
    got = asyncio.run(_task_call(sock, "Connect", task_pb2.ConnectRequest(id="t-netkill")))
    # The task's pid (QEMU's), which CRI keeps as the sandbox pid, is in the pod's
    # network namespace: /proc/<pid>/ns/net names it for the pod's other containers.
    task_pid = got.task_pid
    assert os.stat(f"/proc/{task_pid}/ns/net").st_ino == os.stat(pod.netns).st_ino
    os.kill(got.shim_pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while Path(sock).exists() or helper_processes() or "ingress" in qdiscs(ns):
        assert time.monotonic() < deadline, (helper_processes(), qdiscs(ns))
        time.sleep(0.2)
    assert "tap0_kata" not in links(ns)
    ctd.ctr("task", "delete", "t-netkill")
    assert ctd.ctr("container", "rm", "t-netkill").returncode == 0
    # The dead shim's claim on the namespace went with containerd's delete.
    claims = Path("/run/kata-py/netclaims")
    assert not list(claims.iterdir()) if claims.exists() else True


def forward_rules(ns: str) -> list[str]:
    out = sh("iptables", "-t", "nat", "-S", "OUTPUT", ns=ns).stdout
    return [line for line in out.splitlines() if portforward.COMMENT in line]


def test_localhost_in_the_pod_namespace_reaches_the_guest(ctd: Containerd, pod: Pod) -> None:
    """kubectl port-forward's path, as containerd's CRI takes it: dial
    localhost:PORT inside the pod's network namespace on the host.  A small
    reply, a 10 MB one, and a closed port (refused at once, not hung)."""
    ns = Path(pod.netns).name
    assert run(ctd, "t-pf", "sh", "-c", cristack.HTTPD,
               flags=("-d", "--with-ns", f"network:{pod.netns}")).returncode == 0
    try:
        assert fetch(ns, "http://127.0.0.1:8080/small") == "hello\n"
        big = sh("sh", "-c", "curl -sS http://127.0.0.1:8080/big | wc -c", ns=ns)
        assert big.stdout.strip() == str(cristack.BIG), big.stderr
        t0 = time.monotonic()
        closed = sh("curl", "-sS", "--max-time", "10", "http://127.0.0.1:8081/", ns=ns,
                    check=False)
        assert closed.returncode != 0 and time.monotonic() - t0 < 5, closed
        assert len(forward_rules(ns)) == 1
    finally:
        force_remove(ctd, "t-pf")
    assert forward_rules(ns) == []


def test_a_killed_shims_forward_rule_goes_with_containerds_delete(
        ctd: Containerd, pod: Pod) -> None:
    ns = Path(pod.netns).name
    assert run(ctd, "t-pfkill", "sleep", "1000",
               flags=("-d", "--with-ns", f"network:{pod.netns}")).returncode == 0
    assert len(forward_rules(ns)) == 1
    os.kill(pid_of(shim("t-pfkill")), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while forward_rules(ns):
        assert time.monotonic() < deadline, forward_rules(ns)
        time.sleep(0.2)
    force_remove(ctd, "t-pfkill")


def test_spec_bind_mounts_reach_the_guest(ctd: Containerd, tmp_path: Path) -> None:
    """What CRI does for emptyDir, hostPath, ConfigMap and Secret volumes:
    bind mounts in the spec, read-only ones read-only."""
    (tmp_path / "rw").mkdir()
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "key").write_text("secret-value\n")
    p = run(ctd, "t-mounts", "sh", "-c",
            "cat /secrets/key; echo hi > /data/out; echo x > /secrets/key || echo ro-refused",
            flags=("--rm", "--mount", f"type=bind,src={tmp_path / 'rw'},dst=/data,options=rbind",
                   "--mount", f"type=bind,src={tmp_path / 'ro'},dst=/secrets,options=rbind:ro"))
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["secret-value", "ro-refused"]
    assert (tmp_path / "rw" / "out").read_text() == "hi\n"
    assert (tmp_path / "ro" / "key").read_text() == "secret-value\n"


def test_pod_resources_size_the_vm(ctd: Containerd) -> None:
    """containerd 1.7+'s CRI puts the pod's limits on the sandbox spec; 1.6's does
    not yet, so ctr sets the same annotations here."""
    p = run(ctd, "t-size", "sh", "-c", "nproc; grep MemTotal /proc/meminfo", flags=(
        "--rm", "--annotation", "io.kubernetes.cri.sandbox-cpu-quota=200000",
        "--annotation", "io.kubernetes.cri.sandbox-cpu-period=100000",
        "--annotation", f"io.kubernetes.cri.sandbox-memory={256 << 20}"))
    assert p.returncode == 0, p.stderr
    cpus, mem = p.stdout.splitlines()
    assert cpus == "2"
    assert int(mem.split()[1]) > 700 * 1024   # 512 MiB default + 256 MiB, less the kernel's


STATUS = "grep -E '^(CapEff|CapBnd|CapInh|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status"
DOCKER_CAPS = "00000000a80425fb"  # docker's and containerd's default set


def _status(out: str) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in out.splitlines() if ":\t" in line)


def test_default_spec_is_applied_as_runc_applies_it(ctd: Containerd) -> None:
    """containerd's default spec: docker's capabilities, no_new_privs, masked
    and read-only /proc paths; --seccomp adds its default profile."""
    p = run(ctd, "t-defaults", "sh", "-c",
            f"{STATUS}; wc -c < /proc/timer_list; echo x > /proc/sys/kernel/domainname "
            "|| echo sys-ro; mkdir /m && mount -t tmpfs t /m || echo no-mount; "
            # containerd's rules and runc's own: mknod is allowed, opening
            # a device no rule lists (the guest's serial console) is not.
            "mknod /ttyS0 c 4 64 && { echo x > /ttyS0 || echo dev-denied; }",
            flags=("--rm", "--seccomp"))
    assert p.returncode == 0, p.stderr
    status = _status(p.stdout)
    assert status == {"CapInh": "0000000000000000", "CapEff": DOCKER_CAPS,
                      "CapBnd": DOCKER_CAPS, "CapAmb": "0000000000000000",
                      "NoNewPrivs": "1", "Seccomp": "2"}, p.stdout
    assert p.stdout.split()[-4:] == ["0", "sys-ro", "no-mount", "dev-denied"], p.stdout
    assert "Operation not permitted" in p.stderr


def test_exec_gets_the_containers_capabilities(ctd: Containerd) -> None:
    cid = "t-exec-caps"
    p = run(ctd, cid, "sleep", "60", flags=("-d", "--seccomp"))
    assert p.returncode == 0, p.stderr
    try:
        e = ctd.ctr("task", "exec", "--exec-id", "e1", cid, "sh", "-c", STATUS)
        assert e.returncode == 0, e.stderr
        assert _status(e.stdout)["CapEff"] == DOCKER_CAPS
        assert _status(e.stdout)["Seccomp"] == "2"
    finally:
        force_remove(ctd, cid)


@pytest.mark.parametrize("template", [True, False], ids=["clone 9p", "cold virtio-fs"])
def test_privileged_container_cannot_write_a_read_only_share(ctd: Containerd, tmp_path: Path,
                                                             template: bool) -> None:
    """Every capability in the guest, the share remounted, or mounted again
    by hand: the host's read-only bind stays read-only (the host enforces
    it).  A clone's 9p share cannot be mounted twice; a cold boot's
    virtio-fs can."""
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "key").write_text("host\n")
    config = tmp_path / "kata-py.yaml"
    config.write_text(f"template: {str(template).lower()}\n")
    p = run(ctd, "t-priv-share", "sh", "-c",
            f"{STATUS}; mount -o remount,rw /secrets; echo pwned > /secrets/key || echo refused; "
            "mkdir /m && mount -t virtiofs kata-py-shared /m && "
            "for f in /m/*/volumes/*/key; do echo pwned > $f || echo refused-too; done",
            flags=("--rm", "--privileged", "--runtime-config-path", str(config), "--mount",
                   f"type=bind,src={tmp_path / 'ro'},dst=/secrets,options=rbind:ro"))
    # ctr's --privileged gives containerd's own set (this host's root lacks
    # CAP_SYS_RESOURCE); CAP_SYS_ADMIN is what mounting takes.
    assert int(_status(p.stdout)["CapEff"], 16) & 1 << 21, p.stdout
    assert "refused" in p.stdout.split(), p.stdout
    if not template:
        assert p.returncode == 0 and p.stdout.split()[-1] == "refused-too", p.stdout
    assert (tmp_path / "ro" / "key").read_text() == "host\n"


@pytest.mark.parametrize("victim", ["qemu-system-x86_64 -name kata-py-",
                                    "virtfs-proxy-helper -n -p /run/kata-py/vm/"])
def test_a_helper_killed_under_ctr_stops_the_task_at_once(ctd: Containerd, victim: str) -> None:
    """containerd hears TaskExit within a second or two, and a plain delete
    cleans everything (the fixture's check)."""
    assert run(ctd, "t-helper", "sleep", "1000", flags=("-d",)).returncode == 0
    try:
        pid = int(subprocess.run(["pgrep", "-o", "-f", victim], capture_output=True,
                                 text=True, check=True).stdout.split()[0])
        with events(ctd) as seen:
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 3
            while "STOPPED" not in ctd.ctr("task", "ls").stdout:
                assert time.monotonic() < deadline, ctd.ctr("task", "ls").stdout
                time.sleep(0.1)
        assert any("/tasks/exit" in line for line in seen), seen
    finally:
        force_remove(ctd, "t-helper")


# -- the fault matrix through ctr: each process killed at boot, during exec, during rm --

CTR_VICTIMS = {
    "qemu": "qemu-system-x86_64 -name kata-py-",
    "9p-helper": "virtfs-proxy-helper -n -p /run/kata-py/vm/",
    "virtiofsd": "virtiofsd --fd=",
}


def _victim(victim: str, cid: str) -> str:
    return shim(cid) if victim == "shim" else CTR_VICTIMS[victim]


# Each case has a container id of its own: after a shim's death containerd
# cleans up on its own, a moment later (it runs the shim's `delete`), and
# until then the id is taken though `ctr task ls` no longer shows it.


def _ctr(ctd: Containerd, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(["ctr", "-a", ctd.address, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ctd.env)


@pytest.mark.parametrize("victim", ["qemu", "virtiofsd", "shim"])
def test_a_kill_during_a_ctr_boot(ctd: Containerd, tmp_path: Path, victim: str) -> None:
    """A cold boot (template: false: long enough to hit): `ctr run` fails in
    one line naming the dead process, and delete leaves nothing."""
    cold = tmp_path / "cold.yaml"
    cold.write_text("template: false\n")
    cid = f"t-boot-{victim}"
    p = _ctr(ctd, "run", "--runtime", RUNTIME, "-d", "--runtime-config-path", str(cold),
             IMAGE, cid, "sleep", "300")
    try:
        pid_of(CTR_VICTIMS["qemu"])  # booting
        os.kill(pid_of(_victim(victim, cid)), signal.SIGKILL)
        _, err = p.communicate(timeout=30)
        assert p.returncode != 0, err
        said = {"qemu": "QEMU died (signal 9)", "virtiofsd": "virtiofsd died (signal 9)",
                "shim": "ttrpc: closed"}[victim]
        assert said in err, err
    finally:
        p.kill()
        force_remove(ctd, cid)


@pytest.mark.parametrize("victim", ["qemu", "9p-helper", "shim"])
def test_a_kill_during_a_ctr_exec(ctd: Containerd, victim: str) -> None:
    """The exec ends within a few seconds (not the 30 s call timeout), the task
    is stopped, and delete leaves nothing."""
    cid = f"t-exec-{victim}"
    assert run(ctd, cid, "sleep", "300", flags=("-d",)).returncode == 0
    try:
        e = _ctr(ctd, "task", "exec", "--exec-id", "e1", cid, "sh", "-c",
                 "echo in; sleep 300")
        assert e.stdout is not None and e.stdout.readline() == "in\n"
        os.kill(pid_of(_victim(victim, cid)), signal.SIGKILL)
        t0 = time.monotonic()
        _, err = e.communicate(timeout=30)
        assert time.monotonic() - t0 < 5 and e.returncode != 0, (e.returncode, err)
        deadline = time.monotonic() + 5
        while "RUNNING" in ctd.ctr("task", "ls").stdout:
            assert time.monotonic() < deadline, ctd.ctr("task", "ls").stdout
            time.sleep(0.1)
    finally:
        force_remove(ctd, cid)


@pytest.mark.parametrize("victim", ["qemu", "9p-helper", "shim"])
def test_a_kill_during_a_ctr_delete(ctd: Containerd, victim: str) -> None:
    """Whatever the forced delete got to, containerd's own clean-up or a second
    delete finishes the job (the fixture's check)."""
    cid = f"t-del-{victim}"
    assert run(ctd, cid, "sleep", "300", flags=("-d",)).returncode == 0
    target = pid_of(_victim(victim, cid))
    d = _ctr(ctd, "task", "delete", "-f", cid)
    time.sleep(0.1)  # inside the delete's calls
    with contextlib.suppress(ProcessLookupError):
        os.kill(target, signal.SIGKILL)
    d.communicate(timeout=30)
    force_remove(ctd, cid)
    assert cid not in ctd.ctr("container", "ls", "-q").stdout.split()


def test_a_guest_kernel_panic_under_ctr_stops_the_task_at_once(ctd: Containerd) -> None:
    """containerd hears TaskExit within seconds; exec says why; delete
    leaves nothing (the fixture's check)."""
    assert run(ctd, "t-panic", "sleep", "1000", flags=("-d", "--privileged")).returncode == 0
    try:
        with events(ctd) as seen:
            ctd.ctr("task", "exec", "--exec-id", "p1", "t-panic", "sh", "-c",
                    "echo c > /proc/sysrq-trigger")
            deadline = time.monotonic() + 5
            while "STOPPED" not in ctd.ctr("task", "ls").stdout:
                assert time.monotonic() < deadline, ctd.ctr("task", "ls").stdout
                time.sleep(0.1)
        assert any("/tasks/exit" in line for line in seen), seen
        e = ctd.ctr("task", "exec", "--exec-id", "p2", "t-panic", "true")
        assert e.returncode != 0
    finally:
        force_remove(ctd, "t-panic")


@pytest.mark.parametrize("runtime", [RUNTIME, "io.containerd.runc.v2"])
def test_kill_all_signals_every_process_of_the_container(ctd: Containerd, runtime: str) -> None:
    """`ctr task kill --all` (KillRequest.all, runc's kill --all) reaches an
    exec too; a plain kill reaches only the init, which here ignores TERM."""
    cid = f"t-killall-{'kata' if runtime == RUNTIME else 'runc'}"
    p = ctd.ctr("run", "--runtime", runtime, "-d", IMAGE, cid, "sh", "-c",
                "trap '' TERM; while :; do sleep 1; done")
    assert p.returncode == 0, p.stderr
    try:
        execs = [subprocess.Popen(
            ["ctr", "-a", ctd.address, "task", "exec", "--exec-id", f"e{i}", cid,
             "sh", "-c", f"touch /tmp/e{i}; exec sleep 1000"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (1, 2)]
        deadline = time.monotonic() + 30
        probe = 0
        while time.monotonic() < deadline:
            probe += 1
            if ctd.ctr("task", "exec", "--exec-id", f"probe{probe}", cid,
                       "ls", "/tmp/e1", "/tmp/e2").returncode == 0:
                break
        assert ctd.ctr("task", "kill", "-s", "TERM", cid).returncode == 0
        time.sleep(1)
        assert [e.poll() for e in execs] == [None, None], "a plain kill reached an exec"
        assert ctd.ctr("task", "kill", "--all", "-s", "TERM", cid).returncode == 0
        for e in execs:
            assert e.wait(timeout=15) == 128 + signal.SIGTERM
        # The init ignored it, as under runc.
        assert "RUNNING" in ctd.ctr("task", "ls").stdout.split(cid, 1)[1].splitlines()[0]
    finally:
        force_remove(ctd, cid)


def test_ctr_run_takes_the_spare_vm_and_a_pod_does_not(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A `start` whose container has no network of its own gets the daemon
    spare its server made after the last one (microvm/core/spare.py): the
    daemon serving it is the spare's runner, its VM restored before the
    run; each spare's guest has randomness of its own."""
    monkeypatch.delenv("KATA_PY_SPARE", raising=False)
    monkeypatch.setenv("KATA_PY_FORKSERVER_IDLE", "67.75")  # a server of this test's own
    c = Containerd.create(tmp_path / "containerd")
    path = forkserver.socket_path(c.env)
    archive = oci_archive(Path("/var/lib/kata-py/rootfs/busybox"), c.root / "image.tar", IMAGE,
                          ["sh"])
    c.ctr("image", "import", str(archive), check=True)
    try:
        assert run(c, "t-spare0", "true").returncode == 0  # makes the server, then a spare
        seen = set()
        for cid in ("t-spare1", "t-spare2"):
            runner = spare_runner("daemon", path)
            p = subprocess.Popen(
                ["ctr", "-a", c.address, "run", "--rm", "--runtime", RUNTIME, IMAGE, cid, "sh",
                 "-c", "head -c 16 /dev/urandom | od -An -tx1; sleep 1"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=c.env)
            deadline = time.monotonic() + 30
            while f" -id {cid} ".encode() not in Path(f"/proc/{runner}/cmdline").read_bytes():
                assert time.monotonic() < deadline, "the spare's runner is not the daemon"
                time.sleep(0.05)
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
            seen.add(out)
            wait_gone(runner, why="the spare's daemon outlived its task", timeout=15)
        assert len(seen) == 2, "two spares read the same random bytes"
    finally:
        c.remove_all_tasks()
        c.stop()
        with contextlib.suppress(OSError):
            os.kill(forkserver.status(path)["server"], signal.SIGTERM)
    deadline = time.monotonic() + 15
    while helper_processes() or shim_processes():
        assert time.monotonic() < deadline, helper_processes() + shim_processes()
        time.sleep(0.1)
