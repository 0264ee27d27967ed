"""The secure flavour beside the default one and the floor, in one run:

  start       `microvm run --rm --network none busybox true`: the default
              flavour (a clone), a cold boot (--no-template), the secure
              flavour (q35 + OVMF with Secure Boot, swtpm, the measured
              boot checked), and the floor (bare QEMU microvm boot),
              alternating, medians
  memory      PSS of one idle detached container of each flavour: the shim
              and everything below it (QEMU, the file-sharing helper, and
              for the secure one swtpm)
"""

from __future__ import annotations

import statistics
import subprocess
import time
from collections.abc import Callable

from .bench_density import pss_by_process, shims, timed_cli

FLAVOURS = {
    "default (a clone)": [],
    "default, cold boot": ["--no-template"],
    "secure (OVMF, swtpm, attested)": ["--firmware", "secure"],
}


def _pss(microvm: str, flags: list[str], name: str) -> dict[str, float]:
    subprocess.run([microvm, "run", "-d", "--name", name, *flags, "busybox", "sleep", "600"],
                   check=True, capture_output=True, timeout=300)
    try:
        time.sleep(5)  # start-up work done, as bench_density waits
        return pss_by_process(shims()[name])
    finally:
        subprocess.run([microvm, "rm", "-f", name], capture_output=True, timeout=120)


def run(n: int, floor: Callable[[], float], microvm: str) -> dict[str, object]:
    times: dict[str, list[float]] = {"floor: bare QEMU boot": [],
                                     **{k: [] for k in FLAVOURS}}
    for _ in range(n):
        times["floor: bare QEMU boot"].append(floor())
        for name, flags in FLAVOURS.items():
            times[name].append(timed_cli(microvm, "run", "--rm", "--network", "none", *flags,
                                         "busybox", "--", "true"))
    medians = {k: statistics.median(v) for k, v in times.items()}
    memory = {"default (a clone)": _pss(microvm, [], "bench-default"),
              "secure (OVMF, swtpm, attested)": _pss(microvm, ["--firmware", "secure"],
                                                     "bench-secure")}
    return {"start_median_s": medians, "pss_mib": memory}


def report(r: dict[str, object]) -> None:
    medians: dict[str, float] = r["start_median_s"]  # type: ignore[assignment]
    floor = medians["floor: bare QEMU boot"]
    print("the secure flavour (start-up medians, same run):")
    for name, secs in medians.items():
        print(f"  {name:<34}{secs:>8.3f}s  {secs / floor:>6.2f} x floor")
    memory: dict[str, dict[str, float]] = r["pss_mib"]  # type: ignore[assignment]
    for name, by in memory.items():
        parts = ", ".join(f"{k} {v:.1f}" for k, v in sorted(by.items(), key=lambda kv: -kv[1]))
        print(f"  PSS, one idle container, {name}: {sum(by.values()):.1f} MiB ({parts})")
