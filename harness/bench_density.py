"""Density: many idle containers at once, and what each costs in memory.

  microvm run -d busybox sleep   COUNT containers started one after another
                                 (clones), each then answering `exec`
  PSS per container              the shim and everything below it (QEMU,
                                 the file-sharing helper), by process, and a
                                 share of the shims' fork server and of the
                                 spare VM it keeps
  cold                           one `--no-template` container beside them,
                                 the same way

PSS splits pages shared between clones (the template's RAM file, QEMU's
text) among them, so it is the figure that adds up to the machine's use.
"""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request
from collections import defaultdict

from microvm import forkserver
from microvm.shim.manager import BINARY

from .bench_containerd import comm, pod_pids, proc_kib, pss_kib, tcg_cache_kib

COUNT = 20
SETTLE = 5.0  # seconds idle before measuring: the guests' start-up work done


def shims() -> dict[str, int]:
    """Running detached shims by container name (their -id argument)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        # The serving shim's title: `containerd-shim-kata-py-v2 ... -id ID ...`.
        argv = " ".join(argv).split()
        if argv[:1] == [BINARY] and "-id" in argv:
            found[argv[argv.index("-id") + 1]] = int(pid)
    return found


def tcg_cache_mib(shim: int) -> float:
    """Of one container's PSS, its QEMU's translation cache (TCG's alone)."""
    total = 0
    for pid in pod_pids(shim):
        if comm(pid).startswith("qemu-system"):
            with contextlib.suppress(OSError):
                total += tcg_cache_kib(pid)
    return total / 1024


def pss_by_process(shim: int) -> dict[str, float]:
    """MiB by process name for one container's tree."""
    by: dict[str, float] = defaultdict(float)
    for pid in pod_pids(shim):
        with contextlib.suppress(OSError):  # gone meanwhile
            by[comm(pid)] += pss_kib(pid) / 1024
    return dict(by)


def forkserver_pss_mib() -> tuple[float, float]:
    """The PSS of the fork server the CLI's shims came from (the CLI runs
    where this does, so its server is this place's), and of the spares it
    keeps waiting (microvm/core/spare.py: their supervisors, runners and
    VMs), which are there for the containers' sake too."""
    try:
        st = forkserver.status(forkserver.socket_path())
    except OSError:
        return 0.0, 0.0
    spares = 0.0
    for supervisor in st["spares"].values():
        for pid in pod_pids(supervisor):
            with contextlib.suppress(OSError):
                spares += pss_kib(pid) / 1024
    return pss_kib(st["server"]) / 1024, spares


def timed_cli(microvm: str, *argv: str) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([microvm, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       text=True)
    if r.returncode:
        raise RuntimeError(f"microvm {' '.join(argv)}: exit {r.returncode}: {r.stderr.strip()}")
    return time.perf_counter() - t0


SCRAPE_AT = (1, 10, 20)  # sandboxes up when the exporter's scrape is timed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_exporter(microvm: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen([microvm, "monitor", "--listen", f"127.0.0.1:{port}"],
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/metrics"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url, timeout=10).close()
            return proc, url
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("microvm monitor did not serve") from None
            time.sleep(0.1)


def timed_scrape(url: str, repeat: int = 3) -> float:
    """Median time of a whole /metrics scrape."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        with urllib.request.urlopen(url, timeout=60) as resp:
            resp.read()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(microvm: str, count: int = COUNT) -> dict[str, object]:
    prefix = f"kb-dens{os.getpid()}-"
    names = [f"{prefix}{i}" for i in range(count)]
    cold = f"{prefix}cold"
    started: list[str] = []
    exporter, url = start_exporter(microvm)
    scrapes: dict[int, float] = {}
    try:
        t0 = time.perf_counter()
        starts = []
        for n in names:
            starts.append(timed_cli(microvm, "run", "-d", "--network", "none", "--name", n,
                               "busybox", "sleep", "3600"))
            started.append(n)
            if len(started) in SCRAPE_AT:
                scrapes[len(started)] = timed_scrape(url)
        all_started = time.perf_counter() - t0
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as cfg:
            # Detached mode takes --no-template from the config.
            cfg.write("template: false\n")
            cfg.flush()
            timed_cli(microvm, "--config", cfg.name, "run", "-d", "--network", "none",
                      "--name", cold, "busybox", "sleep", "3600")
        started.append(cold)
        execs = [timed_cli(microvm, "exec", n, "true") for n in started]
        time.sleep(SETTLE)
        running = shims()
        per = [pss_by_process(running[n]) for n in names if n in running]
        caches = [tcg_cache_mib(running[n]) for n in names if n in running]
        cold_pss = pss_by_process(running[cold]) if cold in running else {}
        # The shims' fork server holds the pages its daemons share: its PSS
        # is theirs, split evenly.
        server, spares = forkserver_pss_mib()
        for p in [*per, cold_pss]:
            if p:
                p["fork server"] = server / max(1, len(per) + bool(cold_pss))
                p["spare"] = spares / max(1, len(per) + bool(cold_pss))
        exporter_rss_mib = proc_kib(exporter.pid, "status", "VmRSS") / 1024
    finally:
        exporter.terminate()
        exporter.wait(10)
        for n in started:
            subprocess.run([microvm, "rm", "-f", n], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, check=False)
    totals = [sum(p.values()) for p in per]
    parts = sorted({k for p in per for k in p})
    return {
        "count": count, "answered_exec": len(execs), "measured": len(per),
        "start_all_seconds": all_started, "start_median": statistics.median(starts),
        "exec_median": statistics.median(execs[:count]),
        "pss_mib_median": statistics.median(totals) if totals else 0.0,
        "pss_mib_by_process": {k: statistics.median(p.get(k, 0.0) for p in per)
                               for k in parts},
        # What KVM would not have: the rest is the figure to set beside Kata's.
        "tcg_cache_mib_median": statistics.median(caches) if caches else 0.0,
        "pss_mib_without_tcg_cache": statistics.median(
            t - c for t, c in zip(totals, caches, strict=True)) if caches else 0.0,
        "cold_pss_mib": sum(cold_pss.values()), "cold_pss_mib_by_process": cold_pss,
        "scrape_seconds": scrapes, "exporter_rss_mib": exporter_rss_mib,
    }


def report(r: dict[str, object]) -> None:
    by = ", ".join(f"{k} {v:.1f}" for k, v in r["pss_mib_by_process"].items())  # type: ignore[attr-defined]
    cold = ", ".join(f"{k} {v:.1f}" for k, v in r["cold_pss_mib_by_process"].items())  # type: ignore[attr-defined]
    print(f"{r['count']} detached containers at once (clones; started in "
          f"{r['start_all_seconds']:.1f}s, median start {r['start_median']:.3f}s, "
          f"median exec {r['exec_median']:.3f}s):")
    print(f"  PSS per container {r['pss_mib_median']:.1f} MiB ({by})")
    print(f"    of QEMU's, TCG's translation cache {r['tcg_cache_mib_median']:.1f} MiB; "
          f"without it {r['pss_mib_without_tcg_cache']:.1f} MiB")
    print(f"  one cold container beside them {r['cold_pss_mib']:.1f} MiB ({cold})")
    scrapes = ", ".join(f"{n} sandboxes {s:.3f}s"
                        for n, s in r["scrape_seconds"].items())  # type: ignore[attr-defined]
    print(f"  microvm monitor: one /metrics scrape with {scrapes}; "
          f"its RSS {r['exporter_rss_mib']:.1f} MiB")

