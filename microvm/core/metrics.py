"""Between containerd's shapes and the guest's cgroup v2 files.

stats -> io.containerd.cgroups.v2.Metrics (what ctr and CRI read), and
OCI LinuxResources (ctr task update, CRI UpdateContainerResources) ->
cgroup v2 values, converted as runc converts them.
"""

from __future__ import annotations

import json
from typing import Any

from google.protobuf import any_pb2

from microvm.protocol import agent_pb2, cgroups_pb2, ttrpc

METRICS_TYPE = "io.containerd.cgroups.v2.Metrics"
_MEMORY_STAT_FIELDS = [f.name for f in cgroups_pb2.MemoryStat.DESCRIPTOR.fields
                       if f.name not in ("usage", "usage_limit", "swap_usage", "swap_limit")]


def to_metrics(s: agent_pb2.CgroupStats) -> any_pb2.Any:
    cpu = s.cpu_stat
    memory = cgroups_pb2.MemoryStat(
        usage=s.memory_current, usage_limit=s.memory_max, swap_usage=s.swap_current,
        swap_limit=s.swap_max,
        **{k: s.memory_stat[k] for k in _MEMORY_STAT_FIELDS if k in s.memory_stat})
    m = cgroups_pb2.Metrics(
        pids=cgroups_pb2.PidsStat(current=s.pids_current, limit=s.pids_max),
        cpu=cgroups_pb2.CPUStat(**{k: cpu[k] for k in (
            "usage_usec", "user_usec", "system_usec", "nr_periods", "nr_throttled",
            "throttled_usec") if k in cpu}),
        memory=memory,
        memory_events=cgroups_pb2.MemoryEvents(**{k: s.memory_events[k] for k in (
            "low", "high", "max", "oom", "oom_kill") if k in s.memory_events}))
    return any_pb2.Any(type_url=METRICS_TYPE, value=m.SerializeToString())


def _int(obj: dict[str, Any], key: str) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ttrpc.InvalidArgument(f"LinuxResources: {key} must be an integer")
    return value


def update_request(cid: str, resources: bytes) -> agent_pb2.UpdateContainerRequest:
    """An OCI LinuxResources JSON document as cgroup v2 writes."""
    try:
        doc = json.loads(resources) if resources else {}
    except ValueError:
        raise ttrpc.InvalidArgument("LinuxResources is not JSON") from None
    if not isinstance(doc, dict):
        raise ttrpc.InvalidArgument("LinuxResources must be an object")
    req = agent_pb2.UpdateContainerRequest(container_id=cid)
    cpu = doc.get("cpu") or {}
    memory = doc.get("memory") or {}
    pids = doc.get("pids") or {}
    if not all(isinstance(x, dict) for x in (cpu, memory, pids)):
        raise ttrpc.InvalidArgument("LinuxResources: cpu, memory and pids must be objects")
    quota, period = _int(cpu, "quota"), _int(cpu, "period")
    if quota is not None or period is not None:
        q = "max" if quota is None or quota < 0 else str(quota)
        req.cpu_max = f"{q} {period or 100000}"
    shares = _int(cpu, "shares")
    if shares:
        # runc's ConvertCPUSharesToCgroupV2Value: [2, 262144] onto [1, 10000].
        req.cpu_weight = 1 + ((shares - 2) * 9999) // 262142
    if isinstance(cpu.get("cpus"), str) and cpu["cpus"]:
        req.cpuset_cpus = cpu["cpus"]
    limit = _int(memory, "limit")
    if limit is not None:
        req.memory_max = "max" if limit < 0 else str(limit)
    plimit = _int(pids, "limit")
    if plimit is not None:
        req.pids_max = "max" if plimit <= 0 else str(plimit)
    return req
