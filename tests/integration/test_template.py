"""VM templates on real VMs: sandboxes start as clones of a booted guest,
each made its own (randomness, clock, network), and a broken or missing
template only ever costs a cold boot."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from microvm.vm import template
from tests.conftest import Microvm, assert_no_leaks, write_config

pytestmark = pytest.mark.vm

PROBE = ("cat /proc/sys/kernel/random/boot_id; head -c 16 /dev/urandom | od -An -tx1 | "
         "tr -d ' \\n'; echo; date +%s; hostname")


def _probe(m: Microvm, *flags: str) -> list[str]:
    r = m.run("run", "--rm", *flags, "busybox", "sh", "-c", PROBE)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def _templates() -> list[str]:
    return [k for k, _ in template.list_templates()]


def test_runs_are_clones_each_made_its_own(microvm: Microvm) -> None:
    first = _probe(microvm)  # makes the template if there is none
    assert _templates(), "no template was made"
    a, b = _probe(microvm), _probe(microvm)
    # Clones share the template's boot (its boot_id: docs/security.md)...
    assert a[0] == b[0] == first[0]
    # ...but not its random numbers, its clock or its host name.
    assert a[1] != b[1]
    for clone in (a, b):
        assert abs(int(clone[2]) - time.time()) < 5
    assert a[3] != b[3]
    # A cold boot is a boot of its own.
    cold = _probe(microvm, "--no-template")
    assert cold[0] != a[0]
    # A cold boot reads the RTC once, and the agent sets its clock too.
    assert abs(int(cold[2]) - time.time()) < 5


def test_files_written_in_a_clone_reach_the_host_and_read_only_holds(
        microvm: Microvm, tmp_path: Path) -> None:
    """The share is 9p in a clone: volumes and the read-only rule hold."""
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    (ro / "f").write_text("host\n")
    _probe(microvm)  # the template
    r = microvm.run("run", "--rm", "--privileged", "-v", f"{rw}:/rw", "-v", f"{ro}:/ro:ro",
                    "busybox", "sh", "-c",
                    "echo hi > /rw/out; mount -o remount,rw /ro; echo x > /ro/f || echo refused; "
                    "mkdir /m && mount -t 9p -o trans=virtio,version=9p2000.L kata-py-shared /m "
                    "&& for f in /m/*/volumes/1/f; do echo x > $f; done || echo refused-too")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["refused", "refused-too"], r.stdout
    assert (rw / "out").read_text() == "hi\n" and (ro / "f").read_text() == "host\n"


def test_a_clone_cannot_change_the_template_its_neighbours_run_on(microvm: Microvm) -> None:
    """Every clone maps the template's RAM file, and QEMU 7.2 opens it
    read-write.  A clone's guest that freed memory made its QEMU punch the
    freed blocks out of that file (free-page reporting: fallocate on the
    file, then madvise), zeroing pages its neighbours still read from it and
    every later clone starts from.  After a clone frees 64 MiB and waits out
    the guest's reporting delay, the file must be as it was."""
    _probe(microvm)  # the template

    def files() -> dict[str, tuple[int, int]]:
        return {k: ((st := (template.root() / k / "mem").stat()).st_mtime_ns, st.st_blocks)
                for k in _templates()}

    before = files()
    assert before
    r = microvm.run("run", "--rm", "busybox", "sh", "-c",
                    "dd if=/dev/zero of=/dev/shm/x bs=1M count=64 2>/dev/null && rm /dev/shm/x"
                    " && sleep 4 && echo freed")
    assert r.returncode == 0 and r.stdout.split() == ["freed"], r.stderr
    assert files() == before


def test_a_broken_template_costs_a_cold_boot_and_is_made_again(microvm: Microvm) -> None:
    assert microvm.run("system", "prune").returncode == 0
    _probe(microvm)
    [k] = _templates()
    state = template.root() / k / "state"
    state.write_bytes(state.read_bytes()[:100])  # truncated: loads, then fails
    r = microvm.run("run", "--rm", "busybox", "echo", "still-runs")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "still-runs\n"
    assert _templates() == []  # the clone failed: that start booted cold, the template went
    _probe(microvm)  # made again
    assert (template.root() / k / "state").stat().st_size > 100


def test_sigkill_while_the_template_is_made_leaves_nothing_used(microvm: Microvm) -> None:
    assert microvm.run("system", "prune").returncode == 0
    assert _templates() == []
    p = microvm.popen("run", "--rm", "busybox", "true", stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list(template.root().glob(".build-*/mem")):
        assert time.monotonic() < deadline and p.poll() is None
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert_no_leaks()
    assert _templates() == []  # nothing half-made counts as a template
    assert _probe(microvm)  # the next start builds it and runs
    assert _templates()
    r = microvm.run("system", "prune")
    assert r.returncode == 0 and "deleted template" in r.stdout
    assert _templates() == [] and not list(template.root().iterdir())


def test_ten_clones_start_at_once(microvm: Microvm) -> None:
    """Ten detached containers started together: all clones of one
    template (one boot_id), each with its own random numbers."""
    first = _probe(microvm)
    names = [f"kt-clone{i}" for i in range(10)]
    try:
        starts = [microvm.popen("run", "-d", "--name", n, "busybox", "sleep", "300",
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                  for n in names]
        for p in starts:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err.decode()
        seen = set()
        for n in names:
            e = microvm.run("exec", n, "sh", "-c", "cat /proc/sys/kernel/random/boot_id; "
                            "head -c 8 /dev/urandom | od -An -tx1")
            assert e.returncode == 0, e.stderr
            boot_id, rand = e.stdout.split("\n", 1)
            assert boot_id == first[0], f"{n} booted cold"
            seen.add(rand)
        assert len(seen) == len(names)
    finally:
        for n in names:
            microvm.run("rm", "-f", n)


def test_config_can_turn_templates_off(microvm: Microvm, tmp_path: Path,
                                       artifacts: Path) -> None:
    m = Microvm(artifacts, write_config(tmp_path / "off.yaml", artifacts, template=False))
    assert microvm.run("system", "prune").returncode == 0
    assert _probe(m)
    assert _templates() == []
    check = m.run("check")
    assert "templates" in check.stdout and "template: false" in check.stdout


def test_system_df_shows_templates(microvm: Microvm) -> None:
    _probe(microvm)
    df = microvm.run("system", "df")
    row = next(line for line in df.stdout.splitlines() if line.startswith("Templates"))
    assert int(row.split()[1]) >= 1
