"""katapy.monitor.v1.Monitor, served on the shim's socket beside the Task
API: the sandbox described for `microvm stats` and `microvm monitor`.

Everything it reports is read when asked: the sandbox's host processes by
role, how it booted, the agent's call latencies, and from the guest its
memory, load and network counters and each container's cgroup figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable
from typing import TYPE_CHECKING, TypeVar

from microvm.errors import KataError
from microvm.protocol import monitor_pb2, ttrpc
from microvm.vm.agent_client import BUCKETS

if TYPE_CHECKING:
    from microvm.shim.process import Container
    from microvm.shim.task_service import TaskService

# CRI's annotations (containerd 1.6), as the exporter's labels.
LABELS = {
    "io.kubernetes.cri.sandbox-name": "pod",
    "io.kubernetes.cri.sandbox-namespace": "pod_namespace",
    "io.kubernetes.cri.container-name": "container",
    "io.kubernetes.cri.container-type": "container_type",
}
T = TypeVar("T")
STEP_TIMEOUT = 2.0  # per guest call: a busy or dying guest gives zeros, not a hang


class MonitorService:
    def __init__(self, tasks: TaskService) -> None:
        self.tasks = tasks

    async def Describe(self, req: monitor_pb2.DescribeRequest,
                       ctx: ttrpc.CallContext) -> monitor_pb2.SandboxInfo:
        tasks = self.tasks
        info = monitor_pb2.SandboxInfo(namespace=tasks.namespace)
        info.processes.add(role="shim", pid=os.getpid())
        sb = tasks.sandbox
        if sb is None:
            return info
        info.sandbox_id, info.boot = sb.id, sb.boot
        info.vm_memory_bytes = sb.config.memory_mib << 20
        info.firmware = sb.config.firmware
        if sb.secure is not None and sb.secure.attestation is not None:
            info.attestation.CopyFrom(sb.secure.attestation.to_proto())
        if sb.console is not None:
            info.console_socket = str(sb.console.path)
        if sb.timings.ready:
            info.boot_seconds = sb.timings.ready - sb.timings.start
        for role, pid in sorted(sb.processes.items()):
            info.processes.add(role=role, pid=pid)
        if sb.agent is not None:
            for method, lat in sorted(sb.agent.latency.items()):
                info.agent_rpc_seconds[method].CopyFrom(
                    monitor_pb2.Histogram(bounds=BUCKETS, counts=lat.counts, sum=lat.sum))
        containers = list(tasks.containers.values())
        guest, *stats = await asyncio.gather(
            _bounded(sb.guest_stats()), *(_bounded(sb.stats(c.id)) for c in containers))
        if guest is not None:
            info.guest_mem_total_bytes = guest.mem_total_bytes
            info.guest_mem_available_bytes = guest.mem_available_bytes
            info.guest_load1 = guest.load1
            info.guest_rx_bytes, info.guest_tx_bytes = guest.rx_bytes, guest.tx_bytes
            info.guest_containers = guest.containers
        for c, s in zip(containers, stats, strict=True):
            out = info.containers.add(id=c.id, status=c.init.status.name.lower(),
                                      labels=_labels(c))
            if s is not None:
                out.cpu_usec = s.cpu_stat.get("usage_usec", 0)
                out.memory_bytes = s.memory_current
                out.memory_limit_bytes = s.memory_max or info.vm_memory_bytes
                out.pids = s.pids_current
        return info


def _labels(c: Container) -> dict[str, str]:
    return {label: c.annotations[key] for key, label in LABELS.items() if key in c.annotations}


async def _bounded(aw: Awaitable[T]) -> T | None:
    """aw's result, or None if the guest cannot say (gone, busy, stopped)."""
    with contextlib.suppress(KataError, ttrpc.RpcError, ConnectionError, TimeoutError):
        return await asyncio.wait_for(aw, STEP_TIMEOUT)
    return None
