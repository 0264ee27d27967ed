"""Kubernetes' path, timed through the same CRI client for both runtimes:

  pod start   RunPodSandbox -> CreateContainer -> StartContainer, kata-py
              (handler kata-py) beside runc (containerd's default handler),
              one pod at a time, and five pods at once (wall time for all)
  memory      PSS of one kata-py pod's host processes (its cgroup: the shim,
              QEMU, virtiofsd): what RuntimeClass overhead.podFixed is set from
  port-forward  a 10 MiB HTTP GET through CRI PortForward and containerd's
              stream server (kubectl port-forward's path), MiB/s

containerd, CNI and the pods stay in a network namespace the bench makes.
"""

from __future__ import annotations

import concurrent.futures
import os
import statistics
import tempfile
import time
from pathlib import Path

from microvm.cli.observe import usage
from microvm.net import netlink

from . import cristack
from .bench_containerd import comm, pss_kib

HANDLERS = {"kata-py": cristack.HANDLER, "runc": "runc"}


def _start(cri: cristack.Cri, name: str, handler: str) -> tuple[str, float]:
    t0 = time.perf_counter()
    pod = cri.run_pod(name, handler=handler)
    cri.container(pod, "c", "sleep", "3600")
    return pod, time.perf_counter() - t0


def _busy() -> tuple[float, float]:
    """The machine's CPU-seconds so far: busy (all but idle and iowait), and
    QEMU's (every live qemu-system process's, spares' too)."""
    tick = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        cpu = [int(x) for x in f.readline().split()[1:]]
    busy = (sum(cpu) - cpu[3] - cpu[4]) / tick
    qemu = sum(usage("qemu", int(pid)).cpu_seconds
               for pid in filter(str.isdigit, os.listdir("/proc"))
               if comm(int(pid)).startswith("qemu-system"))
    return busy, qemu


def _stats(v: list[float]) -> dict[str, float]:
    return {"median": statistics.median(v), "min": min(v), "max": max(v)}


def run(n: int) -> dict[str, object]:
    serial: dict[str, list[float]] = {k: [] for k in HANDLERS}
    parallel: dict[str, list[float]] = {k: [] for k in HANDLERS}
    memory_kib: list[int] = []
    # Five kata-py pods at once: the cores' use, and QEMU's CPU-seconds per
    # pod, over the same wall time (under TCG it is what bounds the figure).
    load: dict[str, list[float]] = {"cores busy": [], "QEMU CPU-s per pod": []}
    with tempfile.TemporaryDirectory(prefix="kata-py-bench-cri-") as tmp, \
            netlink.named_netns("kb-node") as node, cristack.stack(Path(tmp), node) as cri:
        for i in range(n):  # alternating, so drift hits both alike
            for name, handler in HANDLERS.items():
                pod, secs = _start(cri, f"s{name[:4]}{i}", handler)
                serial[name].append(secs)
                if name == "kata-py":
                    memory_kib.append(sum(pss_kib(p) for p in cristack.pod_pids(f"skata{i}")))
                cri.remove_pod(pod)
        for i in range(max(1, n // 2)):
            for name, handler in HANDLERS.items():
                busy0, qemu0 = _busy()
                t0 = time.perf_counter()
                names = [f"p{name[:4]}{i}x{k}" for k in range(5)]
                with concurrent.futures.ThreadPoolExecutor(5) as pool:
                    pods = [pod for pod, _ in pool.map(
                        lambda pod_name, h=handler: _start(cri, pod_name, h), names)]
                wall = time.perf_counter() - t0
                parallel[name].append(wall)
                if name == "kata-py":
                    busy1, qemu1 = _busy()
                    load["cores busy"].append((busy1 - busy0) / wall)
                    load["QEMU CPU-s per pod"].append((qemu1 - qemu0) / 5)
                with concurrent.futures.ThreadPoolExecutor(5) as pool:
                    list(pool.map(cri.remove_pod, pods))
        forward = {name: _forward(cri, name, handler, n) for name, handler in HANDLERS.items()}
    s = {k: _stats(v) for k, v in serial.items()}
    p = {k: _stats(v) for k, v in parallel.items()}
    f = {k: _stats(v) for k, v in forward.items()}
    return {"serial": s, "parallel5": p, "pss_mib": statistics.median(memory_kib) / 1024,
            "parallel5_load": {k: statistics.median(v) for k, v in load.items()},
            "forward_mib_s": f,
            "ratios": {"serial kata/runc": s["kata-py"]["median"] / s["runc"]["median"],
                       "5 parallel kata/runc": p["kata-py"]["median"] / p["runc"]["median"],
                       "port-forward kata/runc": f["kata-py"]["median"]
                       / f["runc"]["median"]}}


def _forward(cri: cristack.Cri, name: str, handler: str, n: int) -> list[float]:
    """MiB/s of n 10 MiB GETs through port-forward."""
    pod = cri.run_pod(f"f{name[:4]}", handler=handler)
    try:
        cri.container(pod, "web", "sh", "-c", cristack.HTTPD)
        cri.http_get(pod, "/small", wait=30)
        rates = []
        for _ in range(n):
            t0 = time.perf_counter()
            got = len(cri.http_get(pod, "/big"))
            assert got == cristack.BIG, got
            rates.append(got / (time.perf_counter() - t0) / 2**20)
        return rates
    finally:
        cri.remove_pod(pod)


def report(r: dict[str, object]) -> None:
    s, p, ratios = r["serial"], r["parallel5"], r["ratios"]
    assert isinstance(s, dict) and isinstance(p, dict) and isinstance(ratios, dict)
    print("CRI (RunPodSandbox -> container started), same client, both runtimes:")
    for name in HANDLERS:
        print(f"  {name:<8} one pod {s[name]['median']:>7.3f}s   five at once "
              f"{p[name]['median']:>7.3f}s")
    load = r["parallel5_load"]
    assert isinstance(load, dict)
    print(f"  five kata-py pods at once: {load['cores busy']:.2f} of {os.cpu_count()} cores "
          f"busy, QEMU {load['QEMU CPU-s per pod']:.2f} CPU-s per pod")
    print(f"  memory per kata-py pod (PSS of shim + QEMU + virtiofsd): {r['pss_mib']:.1f} MiB")
    f = r["forward_mib_s"]
    assert isinstance(f, dict)
    print("  port-forward, 10 MiB GET: " + "   ".join(
        f"{name} {f[name]['median']:.1f} MiB/s" for name in HANDLERS))
    print("  ratios: " + "   ".join(f"{k} {v:.1f}" for k, v in ratios.items()))
