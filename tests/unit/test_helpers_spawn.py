"""microvm.vm.helpers.spawn: a helper starts as the user asked, in the network
namespace asked, with no new privileges, and dies with its owner, all
without a preexec_fn (Python code between fork and exec is unsafe once the
owner has threads, and the shim has: its to_thread work)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from microvm.vm import helpers
from microvm.vm.qemuuser import DYNAMIC_UID_BASE, Credentials


def _status(text: str) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def test_user_namespace_and_privileges(tmp_path: Path) -> None:
    holder = subprocess.Popen(["unshare", "--net", "sleep", "60"])
    try:
        time.sleep(0.2)
        netns = f"/proc/{holder.pid}/ns/net"
        fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        out = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            proc = helpers.spawn(
                ["/bin/sh", "-c", "cat /proc/self/status; readlink /proc/self/ns/net"],
                stdout=out, netns_fd=fd, creds=Credentials(-1, -1, (5, 7)))
        finally:
            os.close(fd)
            os.close(out)
        assert proc.wait(10) == 0
        text = (tmp_path / "out").read_text()
        status = _status(text)
        uid = DYNAMIC_UID_BASE + proc.pid  # the wrapper's pid is the helper's
        assert status["Uid"].split() == [str(uid)] * 4
        assert status["Gid"].split() == [str(uid)] * 4
        assert status["Groups"].split() == ["5", "7"]
        assert status["NoNewPrivs"] == "1"
        assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0
        assert text.splitlines()[-1] == os.readlink(netns)
    finally:
        holder.kill()
        holder.wait()


def test_root_helpers_keep_root_and_the_owners_network(tmp_path: Path) -> None:
    out = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        proc = helpers.spawn(["/bin/sh", "-c", "id -u; readlink /proc/self/ns/net"], stdout=out)
    finally:
        os.close(out)
    assert proc.wait(10) == 0
    assert (tmp_path / "out").read_text().split() == ["0", os.readlink("/proc/self/ns/net")]


_OWNER = """
import os, signal, subprocess, sys, threading, time
from microvm.vm import helpers
from microvm.vm.qemuuser import Credentials
def busy():
    while True:
        time.sleep(0)
# Threads busy in the owner, as in the shim.
for _ in range(4):
    threading.Thread(target=busy, daemon=True).start()
creds = Credentials(-1, -1, ()) if sys.argv[1] == "dyn" else None
p = helpers.spawn(["sleep", "77.7"], stdout=subprocess.DEVNULL, creds=creds)
print(p.pid, flush=True)
time.sleep(1)  # past the wrapper's checks
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("user", ["dyn", "root"])
def test_a_helper_dies_with_its_owner(user: str) -> None:
    owner = subprocess.run([sys.executable, "-c", _OWNER, user], capture_output=True,
                           text=True, timeout=30)
    assert owner.returncode == -9, owner.stderr
    pid = int(owner.stdout)
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}").exists() and \
            "77.7" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
        assert time.monotonic() < deadline, f"sleep (pid {pid}) outlived its owner"
        time.sleep(0.05)


def test_no_python_runs_between_fork_and_exec(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}
    real = subprocess.Popen

    def spy(*args: object, **kwargs: object) -> subprocess.Popen[bytes]:
        seen.update(kwargs)
        return real(*args, **kwargs)  # type: ignore[call-overload, no-any-return]

    monkeypatch.setattr(subprocess, "Popen", spy)
    busy = threading.Event()
    t = threading.Thread(target=busy.wait)
    t.start()
    try:
        assert helpers.spawn(["true"]).wait(10) == 0
    finally:
        busy.set()
        t.join()
    assert seen.get("preexec_fn") is None


def test_a_missing_program_is_an_os_error() -> None:
    with pytest.raises(FileNotFoundError, match="/no/such/qemu"):
        helpers.spawn(["/no/such/qemu"])
