"""docker's privilege flags on real VMs: what a container may do inside its
guest (capabilities, masked and read-only /proc, device rules), in the
foreground and through the shim.  What it may reach outside the guest is
tests/integration/test_isolation.py's business."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import Microvm

pytestmark = pytest.mark.vm

PROBE = ("grep -E '^(CapEff|CapBnd):' /proc/self/status; "
         "wc -c < /proc/timer_list; "
         "echo x > /proc/sys/kernel/domainname 2>/dev/null || echo sys-ro; "
         # docker's device rules: mknod is allowed, opening a device it did
         # not list is not.
         "mknod /ttyS0 c 4 64 && "
         "{ echo x > /ttyS0 2>/dev/null && echo dev-open || echo dev-denied; }")
DOCKER_CAPS = "00000000a80425fb"
ALL_CAPS = "000001ffffffffff"


def _probe(out: str) -> list[str]:
    return [line.split(":\t")[-1] for line in out.splitlines()]


def test_default_run_is_unprivileged_as_under_docker(microvm: Microvm) -> None:
    r = microvm.run("run", "--rm", "busybox", "--", "sh", "-c", PROBE)
    assert r.returncode == 0, r.stderr
    # /proc/timer_list masked (empty), /proc/sys read-only, the console's node unusable.
    assert _probe(r.stdout) == [DOCKER_CAPS, DOCKER_CAPS, "0", "sys-ro", "dev-denied"]


def test_privileged_and_cap_flags(microvm: Microvm) -> None:
    r = microvm.run("run", "--rm", "--privileged", "busybox", "--", "sh", "-c", PROBE)
    assert r.returncode == 0, r.stderr
    caps, bounding, timer_list, *rest = _probe(r.stdout)
    assert caps == bounding == ALL_CAPS and int(timer_list) > 0
    assert rest == ["dev-open"]  # /proc/sys writes reach only the guest's kernel
    r = microvm.run("run", "--rm", "--cap-add", "NET_ADMIN", "--cap-drop", "chown",
                    "--cap-drop", "CAP_KILL", "busybox", "--", "sh", "-c",
                    "grep CapEff /proc/self/status; chown 1 /tmp || echo no-chown")
    want = (int(DOCKER_CAPS, 16) | 1 << 12) & ~(1 << 0) & ~(1 << 5)
    assert int(r.stdout.split()[1], 16) == want, r.stdout
    assert "no-chown" in r.stdout


def test_unknown_capability_is_one_line_before_any_vm(microvm: Microvm) -> None:
    r = microvm.run("run", "--rm", "--cap-add", "CAP_NOPE", "busybox", "true")
    assert r.returncode == 125
    assert r.error_lines == ["microvm: error: invalid --cap-add/--cap-drop: "
                             "unknown capability 'CAP_NOPE'"]


def test_detached_container_and_its_execs_keep_their_privileges(microvm: Microvm) -> None:
    """Through the shim: the spec carries the set, and an exec gets no more."""
    for name, flags, caps in (("kp-caps", (), DOCKER_CAPS),
                              ("kp-priv", ("--privileged",), ALL_CAPS)):
        r = microvm.run("run", "-d", "--name", name, *flags, "busybox", "sleep", "300")
        assert r.returncode == 0, r.stderr
        try:
            e = microvm.run("exec", name, "sh", "-c", PROBE)
            assert e.returncode == 0, e.stderr
            assert _probe(e.stdout)[:2] == [caps, caps]
        finally:
            assert microvm.run("rm", "-f", name).returncode == 0


@pytest.mark.parametrize("start", ["clone", "cold"])
def test_setuid_root_files_work_in_the_container(microvm: Microvm, tmp_path: Path,
                                                 start: str) -> None:
    """As under runc, a set-uid-root file raises a user's privileges inside
    the container (the guest mounted the share nosuid).  Observed through
    busybox's ping, which needs CAP_NET_RAW that only euid 0 has here
    (ping_group_range is empty): a copy that is set-uid root works for uid
    1000, the plain one does not."""
    vol = tmp_path / "v"
    vol.mkdir()
    shutil.copy2("/bin/busybox", vol / "busybox-suid")
    os.chown(vol / "busybox-suid", 0, 0)
    os.chmod(vol / "busybox-suid", 0o4755)
    flags = ["--no-template"] if start == "cold" else []
    ping = "ping -c 1 -W 2 127.0.0.1 >/dev/null 2>&1 && echo reached || echo refused"
    r = microvm.run("run", "--rm", *flags, "-u", "1000", "-v", f"{vol}:/v", "busybox", "sh",
                    "-c", f"/v/busybox-suid {ping}; busybox {ping}")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["reached", "refused"], r.stdout
