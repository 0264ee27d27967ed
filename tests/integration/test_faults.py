"""Fault injection on real VMs: a helper SIGKILLed while its container runs
is noticed at once, named in one line, and nothing of the sandbox is left.

The leak check after each test (the `microvm` fixture) looks at processes,
mounts in every mount namespace and the run directory.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import Microvm, helper_processes, pid_of, reap_orphans, shim, write_config

pytestmark = pytest.mark.vm

# The helper each kind of start has: a clone shares over 9p, a cold boot
# over virtio-fs.
VICTIMS = [
    pytest.param((), "qemu-system-x86_64 -name kata-py-", "QEMU died (signal 9)", id="qemu"),
    pytest.param((), "virtfs-proxy-helper -n -p /run/kata-py/vm/",
                 "virtfs-proxy-helper died (signal 9)", id="9p-helper"),
    pytest.param(("--no-template",), "virtiofsd --fd=", "virtiofsd ", id="virtiofsd"),
]


def _running(m: Microvm, name: str) -> None:
    deadline = time.monotonic() + 60
    while "running" not in m.run("ps", "-a", "--format", "{{.State}}").stdout:
        assert time.monotonic() < deadline, f"{name} never ran"
        time.sleep(0.1)


@pytest.mark.parametrize(("flags", "victim", "said"), VICTIMS)
def test_a_helper_killed_under_a_foreground_run(microvm: Microvm, flags: tuple[str, ...],
                                                victim: str, said: str) -> None:
    p = microvm.popen("run", "--rm", *flags, "busybox", "sh", "-c", "echo up; sleep 120",
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None
    assert p.stdout.readline() == b"up\n"
    os.kill(pid_of(victim), signal.SIGKILL)
    t0 = time.monotonic()
    _, err = p.communicate(timeout=30)
    took = time.monotonic() - t0
    lines = [line for line in err.decode().splitlines() if "TCG" not in line]
    assert p.returncode == 125, err
    assert len(lines) == 1 and said in lines[0], lines
    assert "console" not in lines[0] and "genirq" not in lines[0]
    assert took < 2, f"noticed after {took:.1f}s"


@pytest.mark.parametrize(("flags", "victim", "said"), VICTIMS)
def test_a_helper_killed_under_a_detached_container(microvm: Microvm, flags: tuple[str, ...],
                                                    victim: str, said: str,
                                                    tmp_path: Path) -> None:
    if flags:  # detached mode takes --no-template from the config
        microvm = Microvm(microvm.log_dir, write_config(tmp_path / "cold.yaml",
                                                        microvm.log_dir, template=False))
    r = microvm.run("run", "-d", "--name", "kt-fault", "busybox", "sleep", "300")
    assert r.returncode == 0, r.stderr
    try:
        _running(microvm, "kt-fault")
        os.kill(pid_of(victim), signal.SIGKILL)
        deadline = time.monotonic() + 2
        while "Exited (255)" not in (ps := microvm.run("ps", "-a").stdout):
            assert time.monotonic() < deadline, f"still: {ps}"
            time.sleep(0.1)
        e = microvm.run("exec", "kt-fault", "true")
        assert e.returncode != 0 and said in e.stderr, e.stderr
    finally:
        t0 = time.monotonic()
        rm = microvm.run("rm", "-f", "kt-fault")
        assert rm.returncode == 0, rm.stderr
        assert time.monotonic() - t0 < 5


def test_rm_returns_once_nothing_of_the_container_runs(microvm: Microvm) -> None:
    """The shim lived on 1.3 s after `rm -f` returned, powering its VM off."""
    r = microvm.run("run", "-d", "--name", "kt-gone", "busybox", "sleep", "300")
    assert r.returncode == 0, r.stderr
    assert microvm.run("rm", "-f", "kt-gone").returncode == 0
    reap_orphans()
    assert helper_processes() == []
    shims = subprocess.run(["pgrep", "-f", shim("kt-gone")], capture_output=True)
    assert shims.returncode == 1, shims.stdout


def test_ps_never_says_gone_while_a_container_is_made(microvm: Microvm) -> None:
    p = microvm.popen("run", "-d", "--name", "kt-making", "busybox", "sleep", "300",
                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen = []
    try:
        while p.poll() is None:
            for line in microvm.run("ps", "-a", "--format", "{{.Names}} {{.State}}"
                                     ).stdout.splitlines():
                if line.startswith("kt-making "):
                    seen.append(line.split()[1])
        assert p.returncode == 0, p.stderr.read() if p.stderr else ""
        assert "dead" not in seen, seen
    finally:
        microvm.run("rm", "-f", "kt-making")


@pytest.mark.parametrize(("victim", "said"), [
    ("qemu-system-x86_64 -name kata-py-", "QEMU died (signal 9)"),
    (shim("kt-exec"), "the container's shim is gone"),
])
def test_death_during_exec_is_one_line(microvm: Microvm, victim: str, said: str) -> None:
    """Was: exit 255 and no word (QEMU), or 'internal error: ConnectionError'
    (the shim)."""
    assert microvm.run("run", "-d", "--name", "kt-exec", "busybox", "sleep", "300").returncode == 0
    try:
        p = microvm.popen("exec", "kt-exec", "sh", "-c", "echo up; sleep 120",
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert p.stdout is not None and p.stdout.readline() == b"up\n"
        os.kill(pid_of(victim), signal.SIGKILL)
        _, err = p.communicate(timeout=30)
        lines = err.decode().splitlines()
        assert p.returncode == 125 and len(lines) == 1 and said in lines[0], lines
    finally:
        assert microvm.run("rm", "-f", "kt-exec").returncode == 0


def test_a_foreground_guest_panic_is_one_line(microvm: Microvm) -> None:
    r = microvm.run("run", "--rm", "--privileged", "busybox", "sh", "-c",
                    "echo c > /proc/sysrq-trigger; sleep 30")
    lines = [line for line in r.stderr.splitlines() if "TCG" not in line]
    assert r.returncode == 125 and len(lines) == 1, lines
    assert "guest kernel panicked: sysrq triggered crash" in lines[0], lines


def test_a_detached_guest_panic_is_told(microvm: Microvm) -> None:
    """Was: exec gave exit 255 and no message."""
    r = microvm.run("run", "-d", "--privileged", "--name", "kt-panic", "busybox", "sleep", "300")
    assert r.returncode == 0, r.stderr
    try:
        microvm.run("exec", "kt-panic", "sh", "-c", "echo c > /proc/sysrq-trigger")
        deadline = time.monotonic() + 10
        while "exited" not in microvm.run("ps", "-a", "--format", "{{.State}}").stdout:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        e = microvm.run("exec", "kt-panic", "true")
        assert e.returncode != 0 and "guest kernel panicked: sysrq triggered crash" in e.stderr, \
            e.stderr
    finally:
        assert microvm.run("rm", "-f", "kt-panic").returncode == 0


@pytest.mark.parametrize("stuck", ["qemu-system-x86_64 -name kata-py-",
                                   shim("kt-stuck")])
def test_rm_f_of_a_stuck_vm_or_shim_takes_under_5s(microvm: Microvm, stuck: str) -> None:
    """SIGSTOP stands for a hung VM (an agent that never answers) or a hung
    shim.  Was: 54 s and 9 s, and the shim and QEMU were left running."""
    assert microvm.run("run", "-d", "--name", "kt-stuck", "busybox", "sleep", "300").returncode == 0
    os.kill(pid_of(stuck), signal.SIGSTOP)
    t0 = time.monotonic()
    r = microvm.run("rm", "-f", "kt-stuck")
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    assert took < 5, f"rm -f took {took:.1f}s"
    assert "kt-stuck" not in microvm.run("ps", "-a").stdout


# -- the matrix: each process killed at boot, and during rm ------------------------

COLD_VICTIMS = {  # a cold boot (virtio-fs), whose boot lasts long enough to hit
    "qemu": ("qemu-system-x86_64 -name kata-py-", "QEMU died (signal 9)"),
    "virtiofsd": ("virtiofsd --fd=", "virtiofsd "),
}


def _cold(microvm: Microvm, tmp_path: Path) -> Microvm:
    return Microvm(microvm.log_dir, write_config(tmp_path / "cold.yaml", microvm.log_dir,
                                                 template=False))


@pytest.mark.parametrize("victim", [*COLD_VICTIMS, "cli"])
def test_a_kill_during_a_foreground_boot(microvm: Microvm, tmp_path: Path, victim: str) -> None:
    m = _cold(microvm, tmp_path)
    p = m.popen("run", "--rm", "busybox", "true", stdout=subprocess.PIPE,
                stderr=subprocess.PIPE)
    pid_of("qemu-system-x86_64 -name kata-py-")  # booting
    if victim == "cli":
        p.kill()
        p.communicate(timeout=30)
        return  # the fixture: nothing of it left
    pattern, said = COLD_VICTIMS[victim]
    os.kill(pid_of(pattern), signal.SIGKILL)
    _, err = p.communicate(timeout=30)
    lines = [line for line in err.decode().splitlines() if "TCG" not in line]
    assert p.returncode == 125 and len(lines) == 1 and said in lines[0], lines


@pytest.mark.parametrize("victim", [*COLD_VICTIMS, "shim", "cli"])
def test_a_kill_during_a_detached_boot(microvm: Microvm, tmp_path: Path, victim: str) -> None:
    m = _cold(microvm, tmp_path)
    p = m.popen("run", "-d", "--name", "kt-dboot", "busybox", "sleep", "300",
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        pid_of("qemu-system-x86_64 -name kata-py-")
        if victim == "cli":
            p.kill()
        else:
            pattern = COLD_VICTIMS[victim][0] if victim in COLD_VICTIMS \
                else shim("kt-dboot")
            os.kill(pid_of(pattern), signal.SIGKILL)
        _, err = p.communicate(timeout=30)
        if victim != "cli":
            lines = [line for line in err.decode().splitlines() if "TCG" not in line]
            assert p.returncode == 125 and len(lines) == 1, lines
    finally:
        # A killed CLI leaves its container to rm (as docker's would).
        m.run("rm", "-f", "kt-dboot")
    assert "kt-dboot" not in m.run("ps", "-a").stdout


@pytest.mark.parametrize("victim", ["qemu", "9p-helper", "shim", "cli"])
def test_a_kill_during_rm(microvm: Microvm, victim: str) -> None:
    assert microvm.run("run", "-d", "--name", "kt-drm", "busybox", "sleep", "300").returncode == 0
    patterns = {"qemu": "qemu-system-x86_64 -name kata-py-",
                "9p-helper": "virtfs-proxy-helper -n -p /run/kata-py/vm/",
                "shim": shim("kt-drm")}
    target = pid_of(patterns[victim]) if victim != "cli" else 0
    rm = microvm.popen("rm", "-f", "kt-drm", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(0.2)  # inside rm's calls
    if victim == "cli":
        rm.kill()
    else:
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, signal.SIGKILL)
    rm.communicate(timeout=30)
    # Whatever rm got to, a second one finishes the job.
    microvm.run("rm", "-f", "kt-drm")
    assert "kt-drm" not in microvm.run("ps", "-a").stdout
