"""`microvm run -d` and friends: the CLI driving the shim, as containerd would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import (
    Microvm,
    helper_processes,
    shim_processes,
    shim_sockets,
    write_config,
)

pytestmark = pytest.mark.vm
STATE = Path("/var/lib/kata-py/containers")


@pytest.fixture
def cli(microvm: Microvm) -> Iterator[Microvm]:
    """The CLI; after the test no detached container, shim or shim socket is left."""
    sockets = shim_sockets()
    before = set(os.listdir(STATE)) if STATE.exists() else set()
    yield microvm
    for name in (set(os.listdir(STATE)) if STATE.exists() else set()) - before:
        microvm.run("rm", "-f", name)
    deadline = time.monotonic() + 15
    while True:
        left = [f"shim: {s}" for s in shim_processes()]
        left += [f"socket: {s}" for s in shim_sockets() - sockets]
        left += [f"state: {s}" for s in (set(os.listdir(STATE)) - before
                                          if STATE.exists() else set())]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not left, "left behind:\n" + "\n".join(left)


def wait_for(fn, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not fn():
        assert time.monotonic() < deadline
        time.sleep(0.2)


def status(cli: Microvm, name: str) -> str:
    """As `ps -a` words it: "running", "exited (CODE)", "gone"; "" if unknown."""
    r = cli.run("inspect", name)
    if r.returncode != 0:
        return ""
    st = json.loads(r.stdout)["state"]
    shown = f"exited ({st['exit_code']})" if st["status"] == "exited" else st["status"]
    # ps shows the same, in docker's words.
    ps = cli.run("ps", "-a", "--format", "{{.Names}}\t{{.State}}\t{{.Status}}").stdout
    row = next(line.split("\t") for line in ps.splitlines() if line.startswith(name + "\t"))
    assert row[1] == {"gone": "dead"}.get(st["status"], st["status"]), row
    if st["status"] == "exited":
        assert row[2].startswith(f"Exited ({st['exit_code']})"), row
    return str(shown)


def test_lifecycle(cli: Microvm) -> None:
    r = cli.run("run", "-d", "--name", "kp-life", "busybox", "--", "sh", "-c",
                "trap 'echo bye; exit 143' TERM; echo started; "
                "while :; do sleep 0.2; done")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "kp-life\n"
    # The CLI is gone; the container is not.
    assert status(cli, "kp-life").startswith("running")
    wait_for(lambda: "started" in cli.run("logs", "kp-life").stdout)

    e = cli.run("exec", "kp-life", "sh", "-c", "echo $((6*7)); exit 4")
    assert (e.returncode, e.stdout) == (4, "42\n")
    e = cli.run("exec", "-i", "kp-life", "sh", "-c", "tr a-z A-Z", input="quiet\n")
    assert (e.returncode, e.stdout) == (0, "QUIET\n")
    missing = cli.run("exec", "kp-life", "no-such-program")
    assert missing.returncode == 127

    # rm refuses a running container without -f.
    no = cli.run("rm", "kp-life")
    assert no.returncode == 125 and "stop it first" in no.error_lines[-1]

    # SIGTERM reaches the process's handler: exit 143, as docker stop would.
    assert cli.run("stop", "-t", "20", "kp-life").returncode == 0
    assert status(cli, "kp-life") == "exited (143)"
    assert "bye" in cli.run("logs", "kp-life").stdout
    assert cli.run("rm", "kp-life").returncode == 0
    assert not (STATE / "kp-life").exists()
    assert not helper_processes()


def test_kill_and_force_remove(cli: Microvm) -> None:
    assert cli.run("run", "-d", "--name", "kp-kill", "busybox", "sleep", "1000").returncode == 0
    assert cli.run("kill", "-s", "KILL", "kp-kill").returncode == 0
    wait_for(lambda: status(cli, "kp-kill") == "exited (137)")
    assert cli.run("run", "-d", "--name", "kp-force", "busybox", "sleep", "1000").returncode == 0
    assert cli.run("rm", "-f", "kp-force").returncode == 0
    assert status(cli, "kp-force") == ""


def test_name_in_use_and_unknown_container(cli: Microvm) -> None:
    assert cli.run("run", "-d", "--name", "kp-dup", "busybox", "sleep", "1000").returncode == 0
    dup = cli.run("run", "-d", "--name", "kp-dup", "busybox", "true")
    assert dup.returncode == 125
    assert dup.error_lines == ["microvm: error: the container name 'kp-dup' is already in use"]
    gone = cli.run("exec", "kp-nope", "true")
    assert gone.returncode == 125
    assert gone.error_lines == ["microvm: error: no such container: kp-nope"]
    bad = cli.run("kill", "-s", "NOSUCH", "kp-dup")
    assert bad.returncode == 125 and bad.error_lines == ["microvm: error: invalid signal: NOSUCH"]


def test_shim_killed_then_rm_cleans_up(cli: Microvm) -> None:
    assert cli.run("run", "-d", "--name", "kp-crash", "busybox", "sleep", "1000").returncode == 0
    pid = int(shim_processes()[0].split()[0])
    os.kill(pid, signal.SIGKILL)
    # The VM goes with its shim (PR_SET_PDEATHSIG); the state says so.
    wait_for(lambda: not helper_processes(), 15)
    assert status(cli, "kp-crash") == "gone"
    assert cli.run("rm", "kp-crash").returncode == 0


def test_exec_with_a_terminal(cli: Microvm) -> None:
    import pty

    from tests.conftest import pty_expect, pty_winsize
    assert cli.run("run", "-d", "--name", "kp-tty", "busybox", "sleep", "1000").returncode == 0
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(cli.argv()[0], cli.argv("exec", "-it", "kp-tty", "sh"))
    try:
        pty_winsize(fd, 22, 77)
        pty_expect(fd, b"# ")
        os.write(fd, b"tty; stty size\n")
        out = pty_expect(fd, b"22 77")
        assert b"/dev/pts/" in out
        pty_winsize(fd, 30, 90)   # SIGWINCH -> ResizePty
        time.sleep(0.5)
        os.write(fd, b"stty size\n")
        pty_expect(fd, b"30 90")
        os.write(fd, b"exit 3\n")
        pty_expect(fd, None)
    finally:
        _, st = os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(st) == 3


def test_detached_volume(cli: Microvm, tmp_path: Path) -> None:
    data = tmp_path / "data"
    r = cli.run("run", "-d", "--name", "kp-vol", "-v", f"{data}:/data", "busybox", "sh", "-c",
                "echo from-detached > /data/out; sleep 300")
    assert r.returncode == 0, r.stderr
    # The file appears (O_CREAT) before echo's write reaches it.
    out = data / "out"
    wait_for(lambda: out.exists() and out.read_text() == "from-detached\n")
    assert cli.run("rm", "-f", "kp-vol").returncode == 0


@pytest.mark.parametrize("template", [True, False], ids=["9p", "virtio-fs"])
def test_volume_propagation_as_docker_takes_it(cli: Microvm, tmp_path: Path,
                                               template: bool) -> None:
    """-v ...:rslave shows a mount the host makes under the volume after the
    start (through 9p's helper, or virtiofsd's own namespace); docker's
    default, rprivate, does not.  The host dir is a shared mount, as on a
    systemd host."""
    base = tmp_path / "vols"
    for name in ("p", "s"):
        (base / name / "sub").mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(base), str(base)], check=True)
    subprocess.run(["mount", "--make-rshared", str(base)], check=True)
    if not template:
        cli = Microvm(cli.log_dir, write_config(tmp_path / "cold.yaml", cli.log_dir,
                                                template=False))
    try:
        r = cli.run("run", "-d", "--name", "kt-prop", "-v", f"{base}/p:/p",
                    "-v", f"{base}/s:/s:ro,rslave", "busybox", "sleep", "300")
        assert r.returncode == 0, r.stderr
        for name in ("p", "s"):
            subprocess.run(["mount", "-t", "tmpfs", "host-made", str(base / name / "sub")],
                           check=True)
            (base / name / "sub" / "marker").write_text("here\n")
        e = cli.run("exec", "kt-prop", "sh", "-c",
                    "for v in p s; do cat /$v/sub/marker 2>/dev/null || echo none; done")
        assert e.stdout.split() == ["none", "here"], e.stderr
    finally:
        cli.run("rm", "-f", "kt-prop")
        subprocess.run(["umount", "-R", str(base)], check=False)
