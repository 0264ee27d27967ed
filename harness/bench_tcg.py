"""TCG's translation cache (config tcg_tb_mib, QEMU's -accel tcg,tb-size=).

QEMU reserves 1 GiB for translated code per VM by default and fills it as
the guest runs new code; a smaller cache bounds that memory but makes QEMU
flush and translate again.  One idle container per size: its PSS after a
few execs and a small workload, and the exec round trip.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import tempfile
import time

import yaml

from .bench_density import SETTLE, pss_by_process, shims, timed_cli

TB_SIZES = (0, 16, 32, 64, 128)


def run(microvm: str, sizes: tuple[int, ...] = TB_SIZES, execs: int = 5) -> dict[str, object]:
    """TCG's translation cache (tcg_tb_mib): one idle container per size,
    its PSS after a few execs and a small workload, and the exec time."""
    out: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="kata-py-bench-tb-") as tmp:
        for size in sizes:
            cfg = os.path.join(tmp, f"tb{size}.yaml")
            with open(cfg, "w") as f:
                yaml.safe_dump({"tcg_tb_mib": size, "network": "none", "accel": "tcg"}, f)
            name = f"kb-tb{os.getpid()}-{size}"
            base = ["--config", cfg]
            try:
                timed_cli(microvm, *base, "run", "-d", "--name", name, "busybox", "sleep", "3600")
                times = [timed_cli(microvm, *base, "exec", name, "true") for _ in range(execs)]
                # Some code of its own for the cache to hold: tar, gzip, find.
                work = timed_cli(microvm, *base, "exec", name, "sh", "-c",
                            "tar c /bin /etc 2>/dev/null | gzip | wc -c; find / -xdev | wc -l")
                time.sleep(SETTLE)
                shim = shims().get(name)
                pss = pss_by_process(shim) if shim else {}
            finally:
                subprocess.run([microvm, *base, "rm", "-f", name], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, check=False)
            out[str(size)] = {"exec_median": statistics.median(times), "workload": work,
                              "pss_mib": sum(pss.values()),
                              "qemu_pss_mib": pss.get("qemu-system-x86", 0.0)}
    return out


def report(r: dict[str, object]) -> None:
    print("TCG translation cache (tcg_tb_mib; 0 = QEMU's default), one idle container:")
    for size, v in r.items():
        print(f"  {size:>4} MiB  PSS {v['pss_mib']:>6.1f} MiB (QEMU {v['qemu_pss_mib']:.1f})  "  # type: ignore[index]
              f"exec {v['exec_median']:.3f}s  workload {v['workload']:.2f}s")  # type: ignore[index]
