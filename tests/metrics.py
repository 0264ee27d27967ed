"""Scraping `microvm monitor` in tests: the exporter on a free port, its
output parsed by prometheus_client's own parser."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator

from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def exporter(microvm: list[str]) -> Iterator[str]:
    """`microvm monitor` on a free loopback port (microvm: the command to
    run, options included); yields its /metrics URL."""
    port = free_port()
    proc = subprocess.Popen([*microvm, "monitor", "--listen", f"127.0.0.1:{port}"],
                            stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url, timeout=10).close()
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "the exporter did not listen"
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        assert proc.wait(10) == 0  # SIGTERM is a clean stop


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample, by sample name (histograms' _bucket, _sum, _count too)."""
    with urllib.request.urlopen(url, timeout=30) as resp:
        text = resp.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def one(samples: dict[str, list[tuple[dict[str, str], float]]], name: str,
        **labels: str) -> float:
    found = [v for lab, v in samples.get(name, [])
             if all(lab.get(k) == v2 for k, v2 in labels.items())]
    assert len(found) == 1, (name, labels, samples.get(name))
    return found[0]
