"""Benchmarks through containerd: kata-py's shim beside runc's, same run.

  ctr run --rm   kata-py vs io.containerd.runc.v2 (and the bare-QEMU floor), and
                 kata-py with no spare VM, and with every shim daemon a fresh
                 interpreter (no fork server)
  exec           `ctr task exec ... true` round trip on a running container
  memory         PSS of QEMU, its file-sharing helper and the shim for one pod
"""

from __future__ import annotations

import functools
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from microvm.images import rootfs
from microvm.images.ociarchive import oci_archive

from .privatecontainerd import Containerd

IMAGE = "docker.io/library/kata-py-bench:latest"
KATA = "io.containerd.kata-py.v2"
# The same shim beside it: with no spare VM (KATA_PY_SPARE=off), and with
# its daemons spawned afresh (KATA_PY_FORKSERVER=off).
NO_SPARE = "io.containerd.kata-py-nospare.v2"
FRESH = "io.containerd.kata-py-fresh.v2"
RUNC = "io.containerd.runc.v2"


def shims(bin_dir: Path) -> Path:
    """`containerd-shim-kata-py-{nospare,fresh}-v2` in bin_dir: kata-py's
    shim with KATA_PY_SPARE=off, and with KATA_PY_FORKSERVER=off, for
    containerd's runtimes NO_SPARE and FRESH."""
    bin_dir.mkdir(exist_ok=True)
    real = Path(sys.executable).with_name("containerd-shim-kata-py-v2")
    for name, setting in (("nospare", "KATA_PY_SPARE=off"), ("fresh", "KATA_PY_FORKSERVER=off")):
        shim = bin_dir / f"containerd-shim-kata-py-{name}-v2"
        shim.write_text(f'#!/bin/sh\n{setting} exec {real} "$@"\n')
        shim.chmod(0o755)
    return bin_dir


def proc_kib(pid: int, file: str, field: str) -> int:
    """A "Field:  N kB" line of /proc/PID/FILE, in KiB (0 if absent)."""
    with open(f"/proc/{pid}/{file}") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def pss_kib(pid: int) -> int:
    return proc_kib(pid, "smaps_rollup", "Pss")


def comm(pid: int) -> str:
    """The process's name ("?" if it is gone)."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def tcg_cache_kib(pid: int) -> int:
    """The PSS of TCG's translation cache in a QEMU: its one anonymous
    mapping that is writable and executable (QEMU 7.2 maps code_gen_buffer
    so, unless split-wx is on).  None under KVM, which translates nothing."""
    total, in_cache = 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and not head[0].endswith(":"):  # a mapping's first line
                in_cache = head[1] == "rwxp" and len(head) == 5  # no file, no [name]
            elif in_cache and head[0] == "Pss:":
                total += int(head[1])
    return total


def pod_pids(shim_pid: int) -> list[int]:
    """The shim and everything below it (QEMU, virtiofsd and its child)."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        pid, ppid = map(int, line.split())
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [shim_pid]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(n: int, floor: Callable[[], float]) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="kata-py-bench-") as tmp:
        c = Containerd.create(Path(tmp), path=(shims(Path(tmp) / "bin"),))
        try:
            archive = oci_archive(rootfs.builtin("busybox"), Path(tmp) / "image.tar", IMAGE,
                                  ["sh"])
            c.ctr("image", "import", str(archive), check=True)
            return _measure(c, n, floor)
        finally:
            c.remove_all_tasks()
            c.stop()


def _measure(c: Containerd, n: int, floor: Callable[[], float]) -> dict[str, object]:
    cases = (("kata-py", KATA), ("kata-py-nospare", NO_SPARE), ("kata-py-fresh", FRESH),
             ("runc", RUNC))
    times: dict[str, list[float]] = {"floor": [], **{name: [] for name, _ in cases}}
    # Untimed: the first start of a place makes its fork server, the second
    # finds the first spare (then each run makes the next one's).
    for i in range(2):
        c.ctr("run", "--rm", "--runtime", KATA, IMAGE, f"b-warm-{i}", "true", check=True)
    for i in range(n):
        times["floor"].append(floor())
        for name, runtime in cases:
            run_argv = ["run", "--rm", "--runtime", runtime, IMAGE, f"b-{name}-{i}", "true"]
            times[name].append(_timed(functools.partial(c.ctr, *run_argv, check=True)))
    execs: dict[str, list[float]] = {"kata-py": [], "runc": []}
    memory: dict[str, int] = {}
    for name, runtime in (("kata-py", KATA), ("runc", RUNC)):
        cid = f"b-exec-{name}"
        c.ctr("run", "-d", "--runtime", runtime, IMAGE, cid, "sleep", "1000", check=True)
        for i in range(n):
            exec_argv = ["task", "exec", "--exec-id", f"e{i}", cid, "true"]
            execs[name].append(_timed(functools.partial(c.ctr, *exec_argv, check=True)))
        if name == "kata-py":
            shim = int(_connect_shim_pid(c, cid))
            pids = pod_pids(shim)
            memory = {"pss_kib_total": sum(pss_kib(p) for p in pids),
                      "pss_kib_shim": pss_kib(shim), "processes": len(pids)}
        c.ctr("task", "kill", "-s", "9", cid)
        time.sleep(0.5)
        c.ctr("task", "delete", cid)
        c.ctr("container", "rm", cid)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "ctr_run": {k: {"median": statistics.median(v), "min": min(v), "max": max(v)}
                    for k, v in times.items()},
        "ratios": {"kata/floor": med["kata-py"] / med["floor"],
                   "kata/runc": med["kata-py"] / med["runc"],
                   "nospare/floor": med["kata-py-nospare"] / med["floor"],
                   "fresh/floor": med["kata-py-fresh"] / med["floor"]},
        "exec": {k: statistics.median(v) for k, v in execs.items()},
        "memory": memory,
    }


def _connect_shim_pid(c: Containerd, cid: str) -> int:
    import asyncio

    from microvm.protocol import task_pb2
    from microvm.shim.client import TaskClient

    sock = (c.bundle(cid) / "address").read_text().removeprefix("unix://")

    async def connect() -> int:
        async with TaskClient.connect(sock, "default") as client:
            resp = await client.call("Connect", task_pb2.ConnectRequest(id=cid), timeout=10)
            return int(resp.shim_pid)

    return asyncio.run(connect())


def report(r: dict[str, object]) -> None:
    runs = r["ctr_run"]
    assert isinstance(runs, dict)
    print("through containerd (ctr run --rm ... true):")
    for name in ("floor", "kata-py", "kata-py-nospare", "kata-py-fresh", "runc"):
        st = runs[name]
        print(f"  {name:<16}{st['median']:>8.3f}s  (min {st['min']:.3f}s, max {st['max']:.3f}s)")
    ratios = r["ratios"]
    assert isinstance(ratios, dict)
    print(f"  ratio kata-py/floor {ratios['kata/floor']:.2f}   kata-py/runc "
          f"{ratios['kata/runc']:.1f}   kata-py-nospare (no spare VM)/floor "
          f"{ratios['nospare/floor']:.2f}   kata-py-fresh (no fork server)/floor "
          f"{ratios['fresh/floor']:.2f}")
    ex = r["exec"]
    assert isinstance(ex, dict)
    print(f"exec round trip (ctr task exec true): kata-py {ex['kata-py']:.3f}s, "
          f"runc {ex['runc']:.3f}s")
    mem = r["memory"]
    assert isinstance(mem, dict)
    print(f"memory per pod (PSS of the shim, QEMU and its file-sharing helper, "
          f"{mem['processes']} processes): "
          f"{mem['pss_kib_total'] / 1024:.1f} MiB (shim {mem['pss_kib_shim'] / 1024:.1f} MiB)")
