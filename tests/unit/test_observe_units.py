"""The pieces of `microvm stats` and `microvm monitor` that need no VM: the
latency histogram, docker's size words, CPU % from two looks, and the
exposition of a histogram (checked by prometheus_client's own parser)."""

from __future__ import annotations

import os

from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry

from microvm.cli import monitor, observe
from microvm.protocol import monitor_pb2
from microvm.vm.agent_client import BUCKETS, Latency


def test_latency_buckets_are_prometheus_le() -> None:
    lat = Latency()
    for s in (0.001, 0.0011, 0.3, 99.0):
        lat.observe(s)
    # le is inclusive: 0.001 falls in the first bucket, 0.0011 in the second.
    assert lat.counts[0] == 1 and lat.counts[1] == 1
    assert lat.counts[BUCKETS.index(0.5)] == 1 and lat.counts[-1] == 1
    assert abs(lat.sum - 99.3021) < 1e-9


def test_sizes_as_docker_words_them() -> None:
    assert observe.binary_size(512) == "512B"
    assert observe.binary_size(1536 * 1024) == "1.5MiB"
    assert observe.binary_size(256 << 20) == "256MiB"
    assert observe.decimal_size(1234) == "1.23kB"
    assert observe.decimal_size(648) == "648B"


def sample(cpu_usec: int, at: float) -> observe.Sample:
    info = monitor_pb2.SandboxInfo(sandbox_id="sb", namespace="microvm", guest_rx_bytes=1234,
                                   guest_tx_bytes=648)
    info.containers.add(id="c1", cpu_usec=cpu_usec, memory_bytes=64 << 20,
                        memory_limit_bytes=256 << 20, pids=3)
    return observe.Sample("unix:///x", info, [observe.Usage("QEMU", 1, pss_bytes=50 << 20)], at)


def test_a_stats_row() -> None:
    row = observe.stats_row("c1", sample(3_000_000, 12.0), sample(2_000_000, 10.0))
    # 1 s of CPU in 2 s: 50 % (of one CPU, as docker counts).
    assert row == ("c1", "50.00%", "64MiB / 256MiB", "25.00%", "1.23kB / 648B", "3", "50MiB")
    assert observe.stats_row("c1", sample(1, 1.0), None)[1] == "--"


def test_the_exposition_parses_with_prometheus_clients_parser() -> None:
    s = sample(2_500_000, 1.0)
    s.info.agent_rpc_seconds["CreateContainer"].CopyFrom(monitor_pb2.Histogram(
        bounds=BUCKETS, counts=[0, 1] + [0] * (len(BUCKETS) - 2) + [2], sum=9.5))

    class Fixed(Collector):
        def collect(self):  # type: ignore[no-untyped-def]
            return monitor.families([s])

    reg = CollectorRegistry()
    reg.register(Fixed())
    got = {(x.name, tuple(sorted(x.labels.items()))): x.value
           for f in text_string_to_metric_families(generate_latest(reg).decode())
           for x in f.samples}
    base = (("namespace", "microvm"), ("pod", ""), ("pod_namespace", ""), ("sandbox", "sb"))
    cpu = tuple(sorted(base + (("container", ""), ("container_id", "c1"), ("status", ""))))
    assert got[("kata_py_container_cpu_seconds_total", cpu)] == 2.5
    rpc = tuple(sorted(base + (("method", "CreateContainer"),)))
    assert got[("kata_py_agent_rpc_seconds_count", rpc)] == 3
    assert got[("kata_py_agent_rpc_seconds_bucket", tuple(sorted(rpc + (("le", "+Inf"),))))] == 3
    assert got[("kata_py_agent_rpc_seconds_bucket",
                tuple(sorted(rpc + (("le", "0.0025"),))))] == 1  # cumulative
    assert got[("kata_py_sandboxes", ())] == 1
    assert os.sysconf("SC_CLK_TCK") == observe.CLK_TCK
