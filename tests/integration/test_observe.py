"""`microvm monitor` (Prometheus), `microvm stats`, `ps` and `events`, over real detached
containers: each figure is checked against what /proc on the host and the
guest itself report."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import Microvm, write_config
from tests.integration.test_detached import cli  # noqa: F401 - the fixture
from tests.metrics import exporter, one, scrape

pytestmark = pytest.mark.vm
DRIVER = Path(__file__).with_name("sandbox_driver.py")

# sh and two sleeps: three pids in the container's cgroup.
WORKLOAD = ("sh", "-c", "sleep 1000 & sleep 1000 & wait")


def size(text: str) -> float:
    """docker's 1.5MiB, back to bytes."""
    m = re.fullmatch(r"([\d.]+)(B|KiB|MiB|GiB)", text)
    assert m, text
    return float(m[1]) * {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[m[2]]


def qemu_pid(sandbox: str) -> int:
    out = subprocess.run(["pgrep", "-f", f"qemu-system-x86_64 -name kata-py-{sandbox[:12]}"],
                         capture_output=True, text=True).stdout.split()
    assert len(out) == 1, out
    return int(out[0])


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_the_exporter_reports_each_sandbox_as_proc_and_the_guest_see_it(
        cli: Microvm) -> None:  # noqa: F811
    for name in ("kt-obs1", "kt-obs2"):
        r = cli.run("run", "-d", "--name", name, "busybox", *WORKLOAD)
        assert r.returncode == 0, r.stderr
    meminfo = cli.run("exec", "kt-obs1", "cat", "/proc/meminfo").stdout
    mem_total = int(re.search(r"MemTotal:\s+(\d+) kB", meminfo)[1]) * 1024  # type: ignore[index]
    with exporter(cli.argv()) as url:
        m = scrape(url)
        assert one(m, "kata_py_sandboxes") == 2
        for name in ("kt-obs1", "kt-obs2"):
            cid_labels = [lab for lab, _ in m["kata_py_container_pids"]
                          if lab["container_id"] == name]
            assert len(cid_labels) == 1, m["kata_py_container_pids"]
            lab = cid_labels[0]
            sb = lab["sandbox"]
            assert lab["namespace"] == "microvm" and lab["status"] == "running"
            assert one(m, "kata_py_container_pids", container_id=name) == 3
            assert one(m, "kata_py_guest_containers", sandbox=sb) == 1
            assert one(m, "kata_py_guest_memory_total_bytes", sandbox=sb) == mem_total
            assert 0 < one(m, "kata_py_container_memory_bytes", container_id=name) < mem_total
            assert one(m, "kata_py_sandbox_boot_seconds", sandbox=sb, boot="clone") > 0
            roles = {lab["role"] for lab, _ in m["kata_py_process_resident_memory_bytes"]
                     if lab["sandbox"] == sb}
            assert roles == {"shim", "QEMU", "virtfs-proxy-helper"}
            # QEMU's RSS as /proc says it (both read within a moment; an idle guest).
            got = one(m, "kata_py_process_resident_memory_bytes", sandbox=sb, role="QEMU")
            assert abs(got - rss_bytes(qemu_pid(sb))) < 0.1 * got
            assert one(m, "kata_py_process_cpu_seconds_total", sandbox=sb, role="QEMU") > 0
            # The agent's calls, by method: one CreateContainer, counted in a bucket.
            assert one(m, "kata_py_agent_rpc_seconds_count", sandbox=sb,
                       method="CreateContainer") == 1
            assert one(m, "kata_py_agent_rpc_seconds_bucket", sandbox=sb,
                       method="CreateContainer", le="+Inf") == 1
        assert one(m, "kata_py_monitor_process_resident_memory_bytes") > 0  # its own cost

        # `stats --no-stream` gives the exporter's numbers.
        out = cli.run("stats", "--no-stream", "kt-obs1")
        assert out.returncode == 0, out.stderr
        header, row = out.stdout.splitlines()
        assert header.split()[:3] == ["NAME", "CPU", "%"]
        cols = re.split(r"\s{3,}", row.strip())
        assert cols[0] == "kt-obs1" and cols[5] == "3", cols
        usage, limit = (size(x) for x in cols[2].split(" / "))
        m = scrape(url)
        exported = one(m, "kata_py_container_memory_bytes", container_id="kt-obs1")
        assert abs(usage - exported) < 0.2 * exported
        assert limit == one(m, "kata_py_container_memory_limit_bytes", container_id="kt-obs1")

        for name in ("kt-obs1", "kt-obs2"):
            assert cli.run("rm", "-f", name).returncode == 0
        assert one(scrape(url), "kata_py_sandboxes") == 0


def test_a_taken_port_is_one_line_and_125(cli: Microvm) -> None:  # noqa: F811
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = cli.run("monitor", "--listen", f"127.0.0.1:{port}")
    assert r.returncode == 125
    assert r.stderr.strip().count("\n") == 0 and "Address already in use" in r.stderr
    r = cli.run("monitor", "--listen", "nonsense")
    assert r.returncode == 125 and "HOST:PORT" in r.stderr


def test_stats_of_a_container_that_is_not_there(cli: Microvm) -> None:  # noqa: F811
    r = cli.run("stats", "--no-stream", "kt-nosuch")
    assert r.returncode == 125
    assert r.stderr.strip() == "microvm: error: no such container: kt-nosuch"


def wait_state(cli: Microvm, name: str, state: str,  # noqa: F811
               timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while f"{name} {state}" not in cli.run("ps", "-a", "--format",
                                           "{{.Names}} {{.State}}").stdout.splitlines():
        assert time.monotonic() < deadline, cli.run("ps", "-a").stdout
        time.sleep(0.2)


def test_ps_as_docker_shows_it(cli: Microvm) -> None:  # noqa: F811
    assert cli.run("run", "-d", "--name", "kt-ps1", "busybox", "sleep", "300").returncode == 0
    assert cli.run("run", "-d", "--name", "kt-ps2", "busybox", "sh", "-c",
                   "exit 3").returncode == 0
    wait_state(cli, "kt-ps2", "exited")
    ps = cli.run("ps").stdout.splitlines()
    assert re.split(r"\s{2,}", ps[0]) == ["CONTAINER ID", "IMAGE", "COMMAND", "CREATED",
                                         "STATUS", "PORTS", "NAMES"]
    row = next(line for line in ps[1:] if line.endswith(" kt-ps1"))
    cid, image, command = re.split(r"\s{2,}", row)[:3]
    assert re.fullmatch(r"[0-9a-f]{12}", cid) and image == "busybox"
    assert command == '"sleep 300"' and " Up " in row
    assert not any("kt-ps2" in line for line in ps)  # exited: only with -a
    everything = cli.run("ps", "-a", "--format", "{{.Names}}|{{.Status}}").stdout.splitlines()
    assert everything[0] == "kt-ps2|Exited (3) Less than a second ago" or \
        re.fullmatch(r"kt-ps2\|Exited \(3\) .* ago", everything[0]), everything  # newest first
    # -q gives IDs, and an ID (or a prefix of it) names the container.
    ids = cli.run("ps", "-q").stdout.split()
    assert cid in ids
    assert cli.run("exec", cid[:6], "true").returncode == 0
    assert cli.run("rm", "-f", cid).returncode == 0
    assert "kt-ps1" not in cli.run("ps", "-a").stdout
    bad = cli.run("ps", "--format", "{{.Nope}}")
    assert bad.returncode == 125 and "no field Nope" in bad.stderr


def test_events_as_docker_prints_them(cli: Microvm) -> None:  # noqa: F811
    follower = subprocess.Popen(cli.argv("events"), stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1)  # it reads from its start on
        t0 = time.time()
        assert cli.run("run", "-d", "--name", "kt-ev", "busybox", "sleep", "300").returncode == 0
        assert cli.run("exec", "kt-ev", "sh", "-c", "exit 4").returncode == 4
        assert cli.run("kill", "kt-ev").returncode == 0
        wait_state(cli, "kt-ev", "exited")
        assert cli.run("rm", "kt-ev").returncode == 0
        t1 = time.time()
        out = cli.run("events", "--since", str(t0), "--until", str(t1 + 1),
                      "--format", "{{json .}}")
        assert out.returncode == 0, out.stderr
        events = [json.loads(line) for line in out.stdout.splitlines()]
        mine = [(e["Action"], e["Actor"]["Attributes"].get("exitCode"))
                for e in events if e["Actor"]["Attributes"]["name"] == "kt-ev"]
        assert mine == [("create", None), ("start", None), ("exec_create", None),
                        ("exec_start", None), ("exec_die", "4"), ("die", "137"),
                        ("destroy", None)], mine
        assert {e["from"] for e in events} == {"busybox"}
        ident = events[0]["id"]
        assert len(ident) == 64 and all(e["id"] == ident for e in events)
        # The follower printed the same, as lines, as they came.
        time.sleep(1)  # its next look at the journal
        follower.terminate()
        lines = follower.communicate(timeout=10)[0].splitlines()
        actions = [line.split()[2] for line in lines]
        assert actions == [a for a, _ in mine], lines
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}[+-]\d\d:\d\d container create "
                        r"[0-9a-f]{64} \(image=busybox, name=kt-ev\)$", lines[0]), lines[0]
    finally:
        follower.terminate()
        follower.wait(10)


CONSOLE_SCRIPT = ("echo pid1=$(tr '\\0' ' ' < /proc/1/cmdline); ps -o args | grep -c '^sleep 300';"
                  " ls /run/kata-py/shared; exit\n")


def test_the_debug_console_is_a_root_shell_outside_every_container(
        cli: Microvm, tmp_path: Path) -> None:  # noqa: F811
    on = Microvm(cli.log_dir, write_config(tmp_path / "console.yaml", cli.log_dir,
                                           debug_console=True))
    assert on.run("run", "-d", "--name", "kt-con", "busybox", "sleep", "300").returncode == 0
    r = on.run("console", "kt-con", input=CONSOLE_SCRIPT, timeout=60)
    assert r.returncode == 0, r.stderr
    # The guest's own init is its pid 1 (a container's would be `sleep 300`),
    # the container's process shows among the guest's, and so does the share.
    assert "pid1=/usr/bin/python3.11 -Ss /init" in r.stdout, r.stdout
    assert re.search(r"^1\r?$", r.stdout, re.M), r.stdout
    assert "kt-con" in r.stdout.split("ls /run/kata-py/shared", 1)[1], r.stdout
    # The same sandbox by its ID, as for a shim-owned pod.
    with exporter(on.argv()) as url:
        sandbox = next(lab["sandbox"] for lab, _ in scrape(url)["kata_py_container_pids"]
                       if lab["container_id"] == "kt-con")
    r = on.run("console", "--sandbox", sandbox[:8], input="echo by-id; exit\n", timeout=60)
    assert r.returncode == 0 and "\nby-id" in r.stdout.replace("\r", ""), r.stdout
    # From inside the container: no agent port, no shared root, no host socket.
    inside = on.run("exec", "kt-con", "sh", "-c",
                    "ls /dev/vport* /dev/hvc* 2>/dev/null; ls /run/kata-py 2>&1; "
                    "ls /sys/class/virtio-ports 2>/dev/null | wc -l")
    assert "vport" not in inside.stdout and "hvc" not in inside.stdout
    assert "No such file or directory" in inside.stdout, inside.stdout


def test_the_console_is_refused_unless_the_config_allows_it(cli: Microvm) -> None:  # noqa: F811
    assert cli.run("run", "-d", "--name", "kt-nocon", "busybox", "sleep", "300").returncode == 0
    r = cli.run("console", "kt-nocon", input="exit\n")
    assert r.returncode == 125
    assert r.stderr.strip() == "microvm: error: the debug console is off in this sandbox " \
        "(start it with debug_console: true in the config)"
    # And the guest refuses it by itself, whatever the host asks.
    got = subprocess.run([sys.executable, str(DRIVER), str(cli.config),
                          "console_refused_by_the_guest"], capture_output=True, text=True,
                         timeout=120)
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout) == {
        "refused": "the debug console is off in this VM (debug_console: true in the config)",
        "status": 7}  # PermissionDenied
