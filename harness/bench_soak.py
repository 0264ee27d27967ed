"""Soak: many container lifecycles through one shim, which must not grow.

One kata-py pod through CRI; CYCLES times: CreateContainer, StartContainer,
ExecSync, StopContainer, RemoveContainer.  The shim's RSS and open fds are
read at the first and the last cycle (they must not grow), and what is left
once the pod is gone (must be nothing).  Not part of the default bench run:
`scripts/bench --only soak`.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

from microvm.net import netlink
from microvm.shim.manager import BINARY

from . import cristack
from .bench_containerd import proc_kib

CYCLES = 200


def _shim(pod_name: str) -> int:
    for pid in cristack.pod_pids(pod_name):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().startswith(BINARY.encode()):
                    return pid
        except OSError:
            continue
    return 0


def _sample(pid: int) -> dict[str, int]:
    return {"rss_kib": proc_kib(pid, "status", "VmRSS"),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def _leftovers() -> list[str]:
    """Ours anywhere on the machine once the pod is gone."""
    out = subprocess.run(["ps", "-eo", "args="], capture_output=True, text=True).stdout
    found = [f"process: {line[:80]}" for line in out.splitlines()
             if ("kata-py" in line and ("qemu-system" in line or "virtiofsd" in line
                                        or "virtfs-proxy" in line)) or line.startswith(BINARY)]
    run = Path("/run/kata-py/vm")
    found += [f"run file: {p}" for p in run.iterdir()] if run.exists() else []
    return found


def run(cycles: int = CYCLES) -> dict[str, object]:
    samples: dict[str, dict[str, int]] = {}
    with tempfile.TemporaryDirectory(prefix="kata-py-bench-soak-") as tmp, \
            netlink.named_netns("kb-node") as node, cristack.stack(Path(tmp), node) as cri:
        pod = cri.run_pod("soak")
        t0 = time.perf_counter()
        try:
            shim = _shim("soak")
            for i in range(1, cycles + 1):
                cid = cri.container(pod, f"c{i}", "sleep", "3600")
                r = cri.exec(cid, "true")
                if r.exit_code != 0:
                    raise RuntimeError(f"cycle {i}: exec exit {r.exit_code}")
                cri.rt.StopContainer(cri.pb.StopContainerRequest(container_id=cid, timeout=0),
                                     timeout=60)
                cri.rt.RemoveContainer(cri.pb.RemoveContainerRequest(container_id=cid),
                                       timeout=60)
                if i in (1, cycles):
                    samples[str(i)] = _sample(shim)
        finally:
            seconds = time.perf_counter() - t0
            cri.remove_pod(pod)
    time.sleep(1)
    return {"cycles": cycles, "seconds": seconds, "shim": samples, "leftovers": _leftovers()}


def report(r: dict[str, object]) -> None:
    s: dict[str, dict[str, int]] = r["shim"]  # type: ignore[assignment]
    first, last = s.get("1", {}), s.get(str(r["cycles"]), {})
    print(f"soak: {r['cycles']} create/start/exec/stop/remove cycles in one pod through CRI "
          f"({r['seconds']:.0f}s):")
    print(f"  shim RSS {first.get('rss_kib', 0) / 1024:.1f} MiB at cycle 1, "
          f"{last.get('rss_kib', 0) / 1024:.1f} MiB at cycle {r['cycles']}; "
          f"open fds {first.get('fds')} and {last.get('fds')}")
    left: list[str] = r["leftovers"]  # type: ignore[assignment]
    print(f"  left behind: {len(left)}" + "".join(f"\n    {x}" for x in left))
