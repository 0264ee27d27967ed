"""Shared fixtures: the CLI as a user runs it, and a leak check after every VM test.

VM tests boot real QEMU microVMs (TCG here).  Each gets its own log
directory; it is kept under test-artifacts/ when the test fails (console,
QEMU and virtiofsd logs) and removed when it passes.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from microvm.shim.manager import BINARY

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"
VENV_BIN = Path(sys.executable).parent
MICROVM = str(VENV_BIN / "microvm")
RUN_DIR = Path("/run/kata-py/vm")
HELPERS = ("qemu-system", "virtiofsd", "virtfs-proxy-helper")
# A secure VM's vTPM (microvm/vm/swtpm.py): its state reached through an fd.
SWTPM = "swtpm socket --tpm2 --tpmstate dir=/proc/self/fd/"

# No spare VMs (microvm/core/spare.py) for the CLIs and containerds tests
# start: one would be one more QEMU, in the background, for tests that look
# for *the* QEMU.  The spare's own tests (test_cli_runner, test_containerd)
# start theirs without it.
os.environ.setdefault("KATA_PY_SPARE", "off")


def pytest_configure(config: pytest.Config) -> None:
    # Helpers of a SIGKILLed CLI are re-parented to us, not to a pid 1 that
    # may reap late, so the leak check sees them gone as soon as they are.
    import ctypes
    PR_SET_CHILD_SUBREAPER = 36
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def reap_orphans() -> None:
    """Reap dead helpers re-parented to us; never a child a Popen waits for."""
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        state, ppid = stat[stat.rindex(")") + 2:].split()[:2]
        if int(ppid) == me and state == "Z" and comm.startswith(("qemu", "virtiofsd")):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(int(entry), os.WNOHANG)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    report = yield
    if report.when == "call":
        item.stash.setdefault(_FAILED, False)
        if report.failed:
            item.stash[_FAILED] = True
    return report


_FAILED = pytest.StashKey[bool]()


def pid_of(pattern: str, timeout: float = 60) -> int:
    """The oldest process whose command line matches pattern (pgrep -f),
    waiting up to timeout seconds for one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = subprocess.run(["pgrep", "-o", "-f", pattern], capture_output=True, text=True)
        if r.returncode == 0:
            return int(r.stdout.split()[0])
        time.sleep(0.02)
    raise AssertionError(f"no process matches {pattern!r}")


def wait_gone(*pids: int, why: str = "", timeout: float = 10) -> None:
    """Until none of pids runs; why: what it means if one still does."""
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids):
        assert time.monotonic() < deadline, why or f"pids {pids} still run"
        time.sleep(0.02)


def alive(pid: int) -> bool:
    """pid runs (a zombie does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def helper_processes() -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid=,stat=,args="], capture_output=True, text=True).stdout
    # Ours only: QEMU runs as -name kata-py-*, virtiofsd serves /run/kata-py/...
    return [line for line in out.splitlines()
            if (any(h in line for h in HELPERS) and "kata-py" in line or SWTPM in line)
            and "Z" not in line.split(None, 2)[1]]


# A serving shim daemon, by its title (containerd-shim-kata-py-v2 -namespace NS
# -id ID -address A), or in its first instants, before the title is set, as
# `python -m microvm.shim`.  Not the short-lived `... containerd-shim-kata-py-v2
# ... start` that containerd runs, whose command line begins with python.
SHIM_DAEMON = re.compile(rf"^\d+ +\S+ +({BINARY} -namespace |\S*python\S* -m microvm\.shim )")


SHIM_SOCKETS = Path("/run/containerd/s")


def shim_sockets() -> set[str]:
    """The daemons' sockets; not a fork server's, which outlives them (the
    session's end checks that each goes)."""
    from microvm import forkserver
    names = os.listdir(SHIM_SOCKETS) if SHIM_SOCKETS.exists() else []
    return {n for n in names if not n.startswith(forkserver.PREFIX)}


def spare_runner(kind: str, path: Path | None = None, timeout: float = 60) -> int:
    """The runner of the spare of kind ("cli", "daemon") that the fork server
    at path keeps (any server's if None), once its server knows it is ready
    (its supervisor says so in its title after telling the server)."""
    from microvm import forkserver
    deadline = time.monotonic() + timeout
    while True:
        for server in [path] if path else forkserver.running():
            with contextlib.suppress(OSError, ValueError):
                supervisor = forkserver.status(server)["spares"].get(kind, 0)
                (runner,) = Path(f"/proc/{supervisor}/task/{supervisor}/children") \
                    .read_text().split()
                title = Path(f"/proc/{supervisor}/cmdline").read_bytes().rstrip(b"\0")
                if title.endswith(b"(spare, ready)"):
                    return int(runner)
        assert time.monotonic() < deadline, f"no {kind} spare got ready"
        time.sleep(0.1)


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def shim(id_: str) -> str:
    """A pgrep -f pattern for the shim daemon serving id_ (once titled)."""
    return f"^{BINARY} -namespace .* -id {id_} "


def shim_processes() -> list[str]:
    """Every live shim daemon, as `pid stat args` lines."""
    out = subprocess.run(["ps", "-eo", "pid=,stat=,args="], capture_output=True, text=True).stdout
    return [line.strip() for line in out.splitlines()
            if SHIM_DAEMON.match(line.strip()) and "Z" not in line.split(None, 2)[1]]


def _ours(mountinfo_line: str) -> bool:
    fields = mountinfo_line.split()
    return fields[4].startswith(str(RUN_DIR)) or "kata-py-shared" in mountinfo_line \
        or " - virtiofs " in mountinfo_line


def kata_mounts(proc: Path = Path("/proc")) -> list[str]:
    """Our mounts in every mount namespace of every process, not only this
    one's: each owner keeps /run/kata-py/vm on a tmpfs of its own namespace,
    so a surviving owner's mounts are visible only through its own pid."""
    seen: set[str] = set()
    found = []
    for pid in filter(str.isdigit, os.listdir(proc)):
        try:
            ns = os.readlink(proc / pid / "ns" / "mnt")
            if ns in seen:
                continue
            seen.add(ns)
            lines = (proc / pid / "mountinfo").read_text().splitlines()
            comm = (proc / pid / "comm").read_text().strip()
        except OSError:  # gone meanwhile
            continue
        found += [f"{line.split()[4]} (namespace of {comm}[{pid}])" for line in lines
                  if _ours(line)]
    return found


def network_leftovers() -> list[str]:
    """Ours in the machine's own namespace: taps, the bridge, its veths,
    lease tables (test namespaces: at the session's end)."""
    ours = re.compile(r"^(tap\d+_kata|microvm0|mv[0-9a-f]{8})$")
    found = [f"link: {n}" for n in os.listdir("/sys/class/net") if ours.match(n)]
    leases = Path("/run/kata-py/network")
    if leases.exists():
        found += [f"lease table: {d}" for d in leases.iterdir()]
    claims = Path("/run/kata-py/netclaims")
    if claims.exists():
        found += [f"tc plumbing claim: {f.read_text()}" for f in claims.iterdir()]
    return found


def leaks(network: bool = True) -> list[str]:
    reap_orphans()
    found = [f"process: {p}" for p in helper_processes()]
    found += [f"mount: {m.strip()}" for m in kata_mounts()]
    if RUN_DIR.exists():
        found += [f"run file: {p}" for p in RUN_DIR.iterdir()]
    return found + (network_leftovers() if network else [])


def assert_no_leaks(timeout: float = 5.0, network: bool = True) -> None:
    """network=False: right after a SIGKILL, before `system prune` has taken
    the stale lease (and the bridge) that a killed CLI leaves by design."""
    deadline = time.monotonic() + timeout
    while (found := leaks(network)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not found, "left behind:\n" + "\n".join(found)


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        """stderr without the one TCG-fallback warning."""
        return [line for line in self.stderr.splitlines() if "using TCG emulation" not in line]


class Microvm:
    """Runs the installed `microvm` CLI with a per-test config and log dir."""

    def __init__(self, log_dir: Path, config: Path, prefix: tuple[str, ...] = ()) -> None:
        self.log_dir = log_dir
        self.config = config
        self.prefix = prefix

    def in_netns(self, name: str) -> Microvm:
        """The same CLI run inside a test's network namespace (nsenter, not
        `ip netns exec`, which hides /sys/fs/cgroup)."""
        return Microvm(self.log_dir, self.config, ("nsenter", f"--net=/var/run/netns/{name}"))

    def argv(self, *args: str) -> list[str]:
        return [*self.prefix, MICROVM, "--config", str(self.config), *args]

    def run(self, *args: str, input: bytes | str | None = None, timeout: float = 120,
            env: dict[str, str] | None = None) -> Result:
        binary = isinstance(input, bytes)
        p = subprocess.run(self.argv(*args), input=input, capture_output=True, timeout=timeout,
                           text=not binary, env=env)
        out = p.stdout.decode(errors="replace") if binary else p.stdout
        err = p.stderr.decode(errors="replace") if binary else p.stderr
        return Result(p.returncode, out, err)

    def popen(self, *args: str, **kw: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.argv(*args), **kw)  # type: ignore[call-overload, no-any-return]


def write_config(path: Path, log_dir: Path, **extra: object) -> Path:
    """network: none, so no test makes a bridge on the machine's own namespace;
    the bridge tests run the CLI inside namespaces of their own."""
    import yaml
    path.write_text(yaml.safe_dump({"log_dir": str(log_dir), "network": "none", **extra}))
    return path


@pytest.fixture
def node() -> Iterator[str]:
    """A network namespace standing in for the machine: tests' traffic and
    the CLI's bridge stay inside it."""
    from tests.netns import namespace
    with namespace("kt-node") as name:
        yield name


@pytest.fixture(scope="session", autouse=True)
def templates_of_odd_configs_removed() -> Iterator[None]:
    """Tests boot odd configurations (debug, 300 MiB...), each with a VM
    template of its own; the session removes those it made, keeping the
    default ones setup made."""
    from microvm.vm import template
    before = {k for k, _ in template.list_templates()}
    yield
    for k in {k for k, _ in template.list_templates()} - before:
        with template.build_lock(k) as mine:
            if mine:
                shutil.rmtree(template.root() / k, ignore_errors=True)
                (template.root() / f"{k}.lock").unlink(missing_ok=True)


@pytest.fixture(scope="session", autouse=True)
def fork_servers_end_at_sigterm() -> Iterator[None]:
    """The shims' fork servers outlive every test (they end when idle): at
    the session's end each must answer, end at SIGTERM and take its socket."""
    from microvm import forkserver
    yield
    left = []
    for path in forkserver.running():
        try:
            pid = forkserver.status(path)["server"]
        except OSError:
            left.append(f"{path} (nobody answers)")
            path.unlink()
            continue
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG) == (0, 0):  # re-parented to us, the subreaper
                    time.sleep(0.05)
                    continue
            break
        if path.exists():
            left.append(f"{path} (its server {pid} kept it at SIGTERM)")
    assert not left, "fork server sockets left behind:\n" + "\n".join(left)


@pytest.fixture(scope="session", autouse=True)
def no_test_namespaces_left() -> Iterator[None]:
    """The namespaces tests make are theirs to remove."""
    yield
    netns = Path("/var/run/netns")
    left = [n for n in os.listdir(netns) if n.startswith(("kt-", "kb-"))] \
        if netns.exists() else []
    assert not left, f"network namespaces left behind: {left}"


@pytest.fixture
def artifacts(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A log dir kept under test-artifacts/<test> if the test fails."""
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    yield log_dir
    if request.node.stash.get(_FAILED, False):
        dest = ARTIFACTS / request.node.nodeid.replace("/", "_").replace("::", "-")
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(log_dir, dest)


@pytest.fixture
def microvm(artifacts: Path, tmp_path: Path) -> Iterator[Microvm]:
    """The CLI, and after the test: nothing it started may survive."""
    cfg = write_config(tmp_path / "config.yaml", artifacts)
    yield Microvm(artifacts, cfg)
    assert_no_leaks()


def pty_winsize(fd: int, rows: int, cols: int) -> None:
    import fcntl
    import struct
    import termios
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def pty_expect(fd: int, needle: bytes | None, timeout: float = 60) -> bytes:
    """Read a pty until needle appears (None: until EOF); what was read."""
    import select
    buf = b""
    deadline = time.monotonic() + timeout
    while needle is None or needle not in buf:
        left = deadline - time.monotonic()
        assert left > 0, f"did not see {needle!r} in {buf[-500:]!r}"
        if select.select([fd], [], [], left)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the other side is closed
                break
            if not chunk:
                break
            buf += chunk
    return buf
