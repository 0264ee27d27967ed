"""`microvm monitor`: every running sandbox as Prometheus metrics (kata-monitor's role).

Each scrape asks every shim afresh (observe.scan); nothing is cached between
scrapes, so what /metrics says is what the sandboxes say now.  The format
is prometheus_client's own.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from microvm.cli import observe
from microvm.errors import KataError

log = logging.getLogger(__name__)

SANDBOX = ["sandbox", "namespace", "pod", "pod_namespace"]
PREFIX = "kata_py_"


class SandboxCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        t0 = time.monotonic()
        samples = asyncio.run(observe.scan())
        yield from families(samples)
        took = GaugeMetricFamily(PREFIX + "scrape_duration_seconds",
                                 "How long asking every sandbox took.")
        took.add_metric([], time.monotonic() - t0)
        yield took


def families(samples: list[observe.Sample]) -> Iterator[Metric]:
    def gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
        return GaugeMetricFamily(PREFIX + name, doc, labels=SANDBOX + labels)

    def counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
        return CounterMetricFamily(PREFIX + name, doc, labels=SANDBOX + labels)

    count = GaugeMetricFamily(PREFIX + "sandboxes", "Running sandboxes that answered.")
    count.add_metric([], len(samples))
    rss = gauge("process_resident_memory_bytes", "RSS of a host process of the sandbox.",
                ["role"])
    pss = gauge("process_proportional_memory_bytes",
                "PSS of a host process of the sandbox (shared pages divided among users).",
                ["role"])
    cpu = counter("process_cpu_seconds", "CPU time of a host process of the sandbox.",
                  ["role"])
    boot = gauge("sandbox_boot_seconds", "From the sandbox's start to its agent's answer.",
                 ["boot"])
    vm_mem = gauge("sandbox_memory_bytes", "The VM's memory size.", [])
    attested = gauge("sandbox_attested",
                     "The secure flavour: 1 if the measured boot matched (a sandbox whose "
                     "boot did not match never runs); absent for the default flavour.", [])
    g_total = gauge("guest_memory_total_bytes", "The guest's MemTotal.", [])
    g_avail = gauge("guest_memory_available_bytes", "The guest's MemAvailable.", [])
    g_load = gauge("guest_load1", "The guest's 1-minute load average.", [])
    g_rx = counter("guest_network_receive_bytes", "Bytes the guest received (not lo).", [])
    g_tx = counter("guest_network_transmit_bytes", "Bytes the guest sent (not lo).", [])
    g_ctr = gauge("guest_containers", "Containers the guest agent holds.", [])
    c_labels = ["container_id", "container", "status"]
    c_cpu = counter("container_cpu_seconds", "CPU time of the container's guest cgroup.",
                    c_labels)
    c_mem = gauge("container_memory_bytes", "memory.current of the container's guest cgroup.",
                  c_labels)
    c_lim = gauge("container_memory_limit_bytes",
                  "memory.max of the container's guest cgroup, or the VM's memory.", c_labels)
    c_pids = gauge("container_pids", "pids.current of the container's guest cgroup.", c_labels)
    rpc = HistogramMetricFamily(PREFIX + "agent_rpc_seconds",
                                "Agent calls from the shim, by method (long polls left out).",
                                labels=SANDBOX + ["method"])
    for s in samples:
        base = [s.labels()[k] for k in SANDBOX]
        info = s.info
        for p in s.processes:
            rss.add_metric(base + [p.role], p.rss_bytes)
            pss.add_metric(base + [p.role], p.pss_bytes)
            cpu.add_metric(base + [p.role], p.cpu_seconds)
        boot.add_metric(base + [info.boot], info.boot_seconds)
        vm_mem.add_metric(base, info.vm_memory_bytes)
        if info.firmware == "secure":
            attested.add_metric(base, 1.0 if info.attestation.passed else 0.0)
        g_total.add_metric(base, info.guest_mem_total_bytes)
        g_avail.add_metric(base, info.guest_mem_available_bytes)
        g_load.add_metric(base, info.guest_load1)
        g_rx.add_metric(base, info.guest_rx_bytes)
        g_tx.add_metric(base, info.guest_tx_bytes)
        g_ctr.add_metric(base, info.guest_containers)
        for c in info.containers:
            labels = base + [c.id, c.labels.get("container", ""), c.status]
            c_cpu.add_metric(labels, c.cpu_usec / 1e6)
            c_mem.add_metric(labels, c.memory_bytes)
            c_lim.add_metric(labels, c.memory_limit_bytes)
            c_pids.add_metric(labels, c.pids)
        for method, h in sorted(info.agent_rpc_seconds.items()):
            buckets, total = [], 0
            for bound, n in zip([*h.bounds, float("inf")], h.counts, strict=True):
                total += n
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), total))
            rpc.add_metric(base + [method], buckets, h.sum)
    yield from (count, rss, pss, cpu, boot, vm_mem, attested, g_total, g_avail, g_load, g_rx, g_tx,
                g_ctr, c_cpu, c_mem, c_lim, c_pids, rpc)


def registry() -> CollectorRegistry:
    reg = CollectorRegistry()
    reg.register(SandboxCollector())
    ProcessCollector(namespace="kata_py_monitor", registry=reg)  # the exporter's own cost
    return reg


def serve(listen: str) -> None:
    """Serve /metrics on listen (HOST:PORT or :PORT) until SIGTERM or SIGINT."""
    host, _, port = listen.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise KataError(f"--listen {listen!r}: expected HOST:PORT or :PORT")
    host = host.strip("[]") or "0.0.0.0"
    try:
        server, thread = start_http_server(int(port), addr=host, registry=registry())
    except OSError as e:
        raise KataError(f"--listen {listen}: {e.strerror}") from None
    log.info("serving metrics on http://%s:%s/metrics", host, port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.shutdown()
    thread.join(5)
