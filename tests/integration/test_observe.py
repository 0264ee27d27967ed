"""`microvm monitor` (Prometheus) and `microvm stats`, over real detached
containers: each figure is checked against what /proc on the host and the
guest itself report."""

from __future__ import annotations

import re
import socket
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Microvm
from tests.integration.test_detached import cli  # noqa: F401 - the fixture
from tests.metrics import exporter, one, scrape

pytestmark = pytest.mark.vm

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
