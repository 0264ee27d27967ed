"""`microvm run` run by a child of the fork server (microvm/cli/entry.py,
microvm/forkserver.py): real VMs, the installed CLI as users run it.

Each test has a server of its own (a KATA_PY_FORKSERVER_IDLE value of its
own is part of the server's place), made by a first run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from microvm import forkserver
from tests.conftest import Microvm, assert_no_leaks, children, pid_of, spare_runner, wait_gone
from tests.conftest import alive as _alive

TITLE = forkserver.TITLE


@pytest.fixture
def env(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """The CLI's environment, with a server of this test's own, made and
    waited for; it is ended afterwards.  Spares on for the tests of them."""
    e = {**os.environ, "KATA_PY_FORKSERVER_IDLE": f"{70 + abs(hash(request.node.name)) % 900}.25"}
    if "spare" in request.node.name:
        e.pop("KATA_PY_SPARE", None)
    path = forkserver.socket_path(e)
    yield e
    if path.exists():
        try:
            pid = forkserver.status(path)["server"]
        except OSError:
            path.unlink()
        else:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)


def _warm(microvm: Microvm, env: dict[str, str]) -> int:
    """A first run (in-process) that makes the server; the server's pid."""
    r = microvm.run("run", "--rm", "busybox", "true", env=env)
    assert r.returncode == 0, r.stderr
    path = forkserver.socket_path(env)
    deadline = time.monotonic() + 30
    while True:
        try:
            return forkserver.status(path)["server"]
        except OSError:
            assert time.monotonic() < deadline, "no fork server was made by the first run"
            time.sleep(0.1)


def test_run_is_forked_by_the_server_with_our_stdio_status_and_cwd(
        microvm: Microvm, env: dict[str, str], tmp_path: Path) -> None:
    server = _warm(microvm, env)
    before = forkserver.status(forkserver.socket_path(env))["forked"]
    r = microvm.run("run", "--rm", "-i", "busybox", "sh", "-c", "cat; echo err >&2; exit 3",
                    input="from stdin\n", env=env)
    assert (r.returncode, r.stdout) == (3, "from stdin\n"), r.stderr
    assert r.error_lines == ["err"]
    after = forkserver.status(forkserver.socket_path(env))
    assert (after["server"], after["forked"]) == (server, before + 1), "not forked"
    # Bad input: one line and docker's code, from the runner as from the CLI.
    r = microvm.run("run", "--rm", "busybox", "no-such-command", env=env)
    assert r.returncode == 127
    assert r.error_lines == ["microvm: error: no-such-command: executable file not found "
                             "in $PATH"]


def test_signals_reach_the_container_through_the_runner(
        microvm: Microvm, env: dict[str, str]) -> None:
    _warm(microvm, env)
    p = microvm.popen("run", "--rm", "busybox", "sh", "-c",
                      "trap 'echo got USR1; exit 7' USR1; echo up; "
                      "while true; do sleep 0.1; done",
                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None
    assert p.stdout.readline() == b"up\n"
    p.send_signal(signal.SIGUSR1)
    out, _ = p.communicate(timeout=60)
    assert (p.returncode, out) == (7, b"got USR1\n")


def test_a_killed_cli_takes_its_runner_and_vm_along(
        microvm: Microvm, env: dict[str, str]) -> None:
    _warm(microvm, env)
    p = microvm.popen("run", "--rm", "busybox", "sleep", "600", env=env,
                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert p.stdout is not None
    qemu = pid_of("qemu-system-x86_64 -name kata-py-")
    runner = pid_of(f"^microvm --config {microvm.config} run --rm busybox sleep 600")
    assert runner != p.pid
    p.send_signal(signal.SIGKILL)
    p.wait()
    wait_gone(runner, qemu, why="the runner or its VM outlived the CLI")
    assert_no_leaks(network=False)


def test_off_runs_in_process_and_makes_no_server(microvm: Microvm, env: dict[str, str]) -> None:
    env["KATA_PY_FORKSERVER"] = "off"
    r = microvm.run("run", "--rm", "busybox", "true", env=env)
    assert r.returncode == 0, r.stderr
    assert not forkserver.socket_path(env).exists()


# --- the spare: a VM restored ahead for the next run (microvm/cli/spare.py) ---


@pytest.fixture
def with_spare(microvm: Microvm) -> Microvm:
    return microvm  # its config's spare is the default, true: the env fixture decides


def _spare(env: dict[str, str]) -> tuple[int, int]:
    """The waiting spare's runner and its QEMU, once it is ready."""
    runner = spare_runner("cli", forkserver.socket_path(env))
    qemu = [c for c in children(runner) if "qemu" in Path(f"/proc/{c}/comm").read_text()]
    return runner, qemu[0]


def test_the_next_run_takes_the_spare_vm(with_spare: Microvm, env: dict[str, str]) -> None:
    _warm(with_spare, env)  # in-process, makes the server
    r = with_spare.run("--debug", "run", "--rm", "busybox", "true", env=env)  # forked
    assert r.returncode == 0, r.stderr
    seen = set()
    for _ in range(2):
        runner, qemu = _spare(env)
        assert os.sched_getscheduler(qemu) == os.SCHED_IDLE, "a spare waits in the background"
        r = with_spare.run("--debug", "run", "--rm", "-i", "busybox", "sh", "-c",
                           "cat; head -c 16 /dev/urandom | od -An -tx1; exit 3",
                           input="from stdin\n", env=env)
        assert r.returncode == 3, r.stderr
        assert "the spare VM, ready" in r.stderr
        lines = r.stdout.splitlines()
        assert lines[0] == "from stdin"
        seen.add(lines[1])
        assert not _alive(runner) and not _alive(qemu), "the spare's VM outlived its run"
    assert len(seen) == 2, "two spares read the same random bytes"


def test_a_run_unlike_the_spare_gets_its_own_vm_and_the_spare_waits_on(
        with_spare: Microvm, env: dict[str, str]) -> None:
    _warm(with_spare, env)
    assert with_spare.run("--debug", "run", "--rm", "busybox", "true", env=env).returncode == 0
    runner, qemu = _spare(env)
    r = with_spare.run("run", "--rm", "busybox", "echo", "hi", env=env)  # no --debug
    assert (r.returncode, r.stdout) == (0, "hi\n"), r.stderr
    r = with_spare.run("run", "-d", "busybox", "sleep", "60", env=env)  # -d: a shim's VM
    assert r.returncode == 0, r.stderr
    assert with_spare.run("rm", "-f", r.stdout.strip(), env=env).returncode == 0
    assert _spare(env) == (runner, qemu), "the spare did not wait for a run it fits"
    r = with_spare.run("--debug", "run", "--rm", "busybox", "echo", "hi", env=env)
    assert (r.returncode, r.stdout) == (0, "hi\n"), r.stderr
    assert "the spare VM, ready" in r.stderr
    assert not _alive(runner) and not _alive(qemu)


def test_a_spare_not_taken_ends(with_spare: Microvm, env: dict[str, str]) -> None:
    env["KATA_PY_SPARE_WAIT"] = "2"
    _warm(with_spare, env)
    assert with_spare.run("run", "--rm", "busybox", "true", env=env).returncode == 0
    runner, qemu = _spare(env)
    deadline = time.monotonic() + 20
    while _alive(runner) or _alive(qemu) or \
            forkserver.status(forkserver.socket_path(env))["spares"].get("cli"):
        assert time.monotonic() < deadline, "the spare outlived its wait"
        time.sleep(0.1)
    assert_no_leaks(network=False)
    # The next run makes one again.
    assert with_spare.run("run", "--rm", "busybox", "true", env=env).returncode == 0
    _spare(env)


def test_a_killed_server_takes_its_spare_along(with_spare: Microvm, env: dict[str, str]) -> None:
    server = _warm(with_spare, env)
    assert with_spare.run("run", "--rm", "busybox", "true", env=env).returncode == 0
    runner, qemu = _spare(env)
    os.kill(server, signal.SIGKILL)
    wait_gone(runner, qemu, why="the spare outlived its server")
    assert_no_leaks(network=False)


def test_a_spare_whose_vm_died_is_not_taken(with_spare: Microvm, env: dict[str, str]) -> None:
    _warm(with_spare, env)
    assert with_spare.run("--debug", "run", "--rm", "busybox", "true", env=env).returncode == 0
    runner, qemu = _spare(env)
    os.kill(qemu, signal.SIGKILL)
    r = with_spare.run("--debug", "run", "--rm", "busybox", "echo", "fresh", env=env)
    assert (r.returncode, r.stdout) == (0, "fresh\n"), r.stderr
    assert "the spare VM is not used: it ended while waiting" in r.stderr
    assert not _alive(runner)
    _end_server(env)  # and the spare made after this run
    assert_no_leaks(network=False, timeout=15)


def _end_server(env: dict[str, str]) -> None:
    os.kill(forkserver.status(forkserver.socket_path(env))["server"], signal.SIGTERM)


def test_a_killed_cli_takes_the_spare_it_ran_on_along(
        with_spare: Microvm, env: dict[str, str]) -> None:
    _warm(with_spare, env)
    assert with_spare.run("run", "--rm", "busybox", "true", env=env).returncode == 0
    runner, qemu = _spare(env)
    p = with_spare.popen("run", "--rm", "busybox", "sh", "-c", "echo up; sleep 600", env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert p.stdout is not None
    assert p.stdout.readline() == b"up\n"
    assert b"-c echo up; sleep 600" in Path(f"/proc/{runner}/cmdline").read_bytes() \
        .replace(b"\0", b" "), "the run is not the spare's"
    p.send_signal(signal.SIGKILL)
    p.wait()
    wait_gone(runner, qemu, why="the spare's runner or VM outlived the CLI")
    _end_server(env)  # and the spare made after this run
    assert_no_leaks(network=False, timeout=15)


def test_system_df_shows_spares_and_prune_ends_them(
        with_spare: Microvm, env: dict[str, str]) -> None:
    _warm(with_spare, env)
    assert with_spare.run("run", "--rm", "busybox", "true", env=env).returncode == 0
    runner, qemu = _spare(env)
    df = {line.split()[0]: line.split()[1:]
          for line in with_spare.run("system", "df", env=env).stdout.splitlines()[1:]}
    assert int(df["Spare"][1]) >= 1 and float(df["Spare"][3].removesuffix("MB")) > 10, df
    r = with_spare.run("system", "prune", env=env)
    assert r.returncode == 0, r.stderr
    assert "spare VM" in r.stdout
    wait_gone(runner, qemu, why="prune left the spare")
    # Made again on need: the next run makes the next one.
    assert with_spare.run("run", "--rm", "busybox", "true", env=env).returncode == 0
    assert _spare(env)[0] != runner
