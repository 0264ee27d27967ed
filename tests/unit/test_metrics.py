"""OCI LinuxResources into cgroup v2 values, and stats into containerd's Metrics."""

from __future__ import annotations

import pytest

from microvm.core.metrics import METRICS_TYPE, to_metrics, update_request
from microvm.protocol import agent_pb2, cgroups_pb2, ttrpc


def test_cpu_quota_period_shares_and_cpus() -> None:
    r = update_request("c", b'{"cpu": {"quota": 50000, "period": 100000, "shares": 1024,'
                            b' "cpus": "0"}}')
    assert r.cpu_max == "50000 100000"
    assert r.cpu_weight == 39   # runc: 1 + ((1024 - 2) * 9999) / 262142
    assert r.cpuset_cpus == "0"
    assert not r.HasField("memory_max")


def test_unlimited_values_become_max() -> None:
    r = update_request("c", b'{"cpu": {"quota": -1}, "memory": {"limit": -1},'
                            b' "pids": {"limit": 0}}')
    assert (r.cpu_max, r.memory_max, r.pids_max) == ("max 100000", "max", "max")


@pytest.mark.parametrize("doc", [b"not json", b"[1]", b'{"memory": {"limit": "lots"}}',
                                 b'{"cpu": 5}', b'{"pids": {"limit": true}}'])
def test_bad_resources_are_invalid_argument(doc: bytes) -> None:
    with pytest.raises(ttrpc.InvalidArgument):
        update_request("c", doc)


def test_stats_become_cgroup_v2_metrics() -> None:
    s = agent_pb2.CgroupStats(
        cpu_stat={"usage_usec": 7, "user_usec": 3, "system_usec": 4, "unknown": 9},
        memory_stat={"anon": 100, "file": 200, "pgfault": 5, "not_a_field": 1},
        memory_events={"oom_kill": 2}, memory_current=4096, memory_max=8192,
        pids_current=3, pids_max=50)
    a = to_metrics(s)
    assert a.type_url == METRICS_TYPE
    m = cgroups_pb2.Metrics()
    m.ParseFromString(a.value)
    assert (m.cpu.usage_usec, m.cpu.user_usec, m.cpu.system_usec) == (7, 3, 4)
    assert (m.memory.anon, m.memory.file, m.memory.pgfault) == (100, 200, 5)
    assert (m.memory.usage, m.memory.usage_limit) == (4096, 8192)
    assert (m.pids.current, m.pids.limit) == (3, 50)
    assert m.memory_events.oom_kill == 2
