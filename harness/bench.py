"""kata-py benchmarks, always side by side with a reference in the same run.

  python -m harness.bench [-n N] [--json FILE]

Absolute times on shared CI machines are noisy; the ratios between
alternating runs of the same session are what to compare.  Measured:

  floor   QEMU + the same kernel, an initramfs whose init reboots at once
  run     `microvm run --rm busybox -- true` (the whole CLI path)
  runc    `runc run` of the same busybox rootfs (no isolation reference)

and the breakdown of one sandbox's life, host- and guest-side.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from microvm import config, paths
from microvm.core import mountns
from microvm.images import rootfs
from microvm.protocol import agent_pb2
from microvm.vm import accel
from microvm.vm.qemu import BASE_KERNEL_PARAMS, MACHINE, TCG_KERNEL_PARAMS, host_tsc_khz

FLOOR_INIT = "#!/bin/busybox sh\n/bin/busybox reboot -f\n"


def floor_initramfs() -> Path:
    """A 1 MB busybox initramfs whose init reboots immediately (cached)."""
    out = paths.CACHE / "bench" / "floor.cpio"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "bin").mkdir()
        shutil.copy2(rootfs.BUSYBOX, root / "bin/busybox")
        (root / "init").write_text(FLOOR_INIT)
        (root / "init").chmod(0o755)
        listing = "\n".join([".", "bin", "bin/busybox", "init"]) + "\n"
        with open(f"{out}.tmp", "wb") as f:
            subprocess.run(["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"],
                           input=listing.encode(), stdout=f, cwd=root, check=True)
    os.rename(f"{out}.tmp", out)
    return out


def floor_argv(cfg: config.Config, acc: str) -> list[str]:
    """The same machine, kernel and kernel arguments as a sandbox, minus the
    devices and the agent: what any VM of ours costs at the least."""
    mem = f"{cfg.memory_mib}M"
    tcg_params = [*TCG_KERNEL_PARAMS, f"tsc_early_khz={host_tsc_khz()}"] if acc == "tcg" else []
    return [
        cfg.qemu, "-M", MACHINE,
        "-object", f"memory-backend-memfd,id=mem,size={mem},share=on", "-m", mem,
        "-smp", str(cfg.vcpus), "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-accel", acc, *(["-cpu", "max"] if acc == "tcg" else []),
        "-kernel", cfg.kernel, "-initrd", str(floor_initramfs()),
        "-append", " ".join([*BASE_KERNEL_PARAMS, *tcg_params, "rdinit=/init"]),
        "-serial", "null",
    ]


def runc_bundle(tmp: Path) -> Path:
    bundle = tmp / "runc-bundle"
    bundle.mkdir()
    subprocess.run(["runc", "spec"], cwd=bundle, check=True)
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"]["terminal"] = False
    spec["process"]["args"] = ["true"]
    spec["root"] = {"path": str(rootfs.builtin("busybox")), "readonly": True}
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


def timed(argv: list[str], **kw: object) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   **kw)  # type: ignore[call-overload]
    return time.perf_counter() - t0


async def breakdown(cfg: config.Config, choice: accel.Choice) -> dict[str, float]:
    """One sandbox's life, step by step (seconds)."""
    from microvm.core.sandbox import Sandbox

    run_dir = mountns.enter()
    t: dict[str, float] = {}
    t0 = time.monotonic()
    sb = Sandbox(cfg, f"bench{os.getpid()}", run_dir, choice)
    await sb.start()
    try:
        t["launch (host: helpers + QEMU up)"] = sb.timings.launched - t0
        t["boot (host: QEMU up -> agent ready)"] = sb.timings.ready - sb.timings.launched
        t["guest: kernel start -> /init runs"] = sb.timings.guest["agent_started"]
        t["guest: /init runs -> agent ready"] = (sb.timings.guest["agent_ready"]
                                                - sb.timings.guest["agent_started"])
        proc = agent_pb2.Process(args=["true"], env=["PATH=/bin"], cwd="/")
        t1 = time.monotonic()
        await sb.create_container("c", rootfs.builtin("busybox"), proc)
        t2 = time.monotonic()
        await sb.start_container("c")
        t3 = time.monotonic()
        await sb.wait("c")
        t4 = time.monotonic()
        await sb.remove_container("c")
        t["create"] = t2 - t1
        t["start"] = t3 - t2
        t["exit (start -> wait returns)"] = t4 - t3
    finally:
        t5 = time.monotonic()
        await sb.stop()
        t["shutdown"] = time.monotonic() - t5
    t["total"] = time.monotonic() - t0
    return t


def compare_images(cfg: config.Config, choice: accel.Choice, n: int
                   ) -> dict[str, dict[str, float]]:
    """The initramfs and the ext4 image side by side, alternating."""
    candidates = {"initramfs": paths.GUEST / "initrd.cpio",
                  "ext4 (virtio-blk)": paths.GUEST / "rootfs.ext4"}
    images = {k: v for k, v in candidates.items() if v.exists()}
    boots: dict[str, list[float]] = {k: [] for k in images}
    started: dict[str, list[float]] = {k: [] for k in images}
    for _ in range(n):
        for name, image in images.items():
            # Boots, not clones: the formats differ in how the guest boots.
            c = dataclasses.replace(cfg, guest_image=str(image), template=False)
            steps = asyncio.run(breakdown(c, choice))
            boots[name].append(steps["boot (host: QEMU up -> agent ready)"])
            started[name].append(steps["guest: kernel start -> /init runs"])
    return {name: {"size_mib": images[name].stat().st_size / 2**20,
                   "boot": statistics.median(boots[name]),
                   "agent_started": statistics.median(started[name])} for name in images}


def summary(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def main() -> None:
    ap = argparse.ArgumentParser(description="kata-py start-up benchmark")
    ap.add_argument("-n", type=int, default=5, help="repetitions of each (default 5)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--no-containerd", action="store_true",
                    help="skip the runs through containerd (kata-py shim vs runc)")
    ap.add_argument("--no-images", action="store_true",
                    help="skip pull throughput (vs skopeo + umoci) and run IMAGE")
    ap.add_argument("--no-network", action="store_true",
                    help="skip the network figures (tap vs runc's veth, bridge start-up)")
    ap.add_argument("--no-cri", action="store_true",
                    help="skip pod start-up through CRI (kata-py vs runc) and pod memory")
    ap.add_argument("--no-fs", action="store_true",
                    help="skip file sharing (a clone's virtio-9p vs a cold boot's virtio-fs)")
    ap.add_argument("--no-density", action="store_true",
                    help="skip memory per container with 20 detached containers up at once")
    ap.add_argument("--no-secure", action="store_true",
                    help="skip the secure flavour (OVMF, swtpm) beside the default one")
    ap.add_argument("--only", choices=["images", "network", "cri", "fs", "density", "tcg",
                                       "soak", "secure"],
                    help="run only this part (with its reference)")
    args = ap.parse_args()
    cfg = config.load()
    choice = accel.choose(cfg.accel)
    microvm = shutil.which("microvm") or str(Path(sys.executable).with_name("microvm"))
    floor_ = floor_argv(cfg, choice.accel)
    # The optional parts, each with its own reference; --only NAME runs one.
    parts: dict[str, tuple[str, bool, tuple[object, ...]]] = {
        "cri": ("bench_cri", not args.no_cri and bool(
            shutil.which("gcc") and shutil.which("containerd")), (args.n,)),
        "network": ("bench_network", not args.no_network and bool(shutil.which("runc")),
                    (args.n, microvm)),
        "images": ("bench_images", not args.no_images and all(
            map(shutil.which, ("docker-registry", "skopeo", "umoci"))),
            (args.n, lambda: timed(floor_), microvm)),
        "fs": ("bench_fs", not args.no_fs, (max(3, args.n // 2), microvm)),
        "density": ("bench_density", not args.no_density, (microvm,)),
        # Under KVM there is no translation cache to size.
        "tcg": ("bench_tcg", not args.no_density and choice.accel == "tcg", (microvm,)),
        "secure": ("bench_secure", not args.no_secure and Path(
            "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd").exists(),
            (max(3, args.n // 2), lambda: timed(floor_), microvm)),
        # 200 lifecycles through one shim: only when asked for (--only soak).
        "soak": ("bench_soak", args.only == "soak", ()),
    }
    extra: dict[str, object] = {}
    for name, (module, enabled, run_args) in parts.items():
        if not enabled or args.only not in (None, name):
            continue
        mod = importlib.import_module(f".{module}", __package__)
        extra[name] = mod.run(*run_args)
        if args.only == name:
            mod.report(extra[name])
            if args.json:
                Path(args.json).write_text(json.dumps({name: extra[name]}, indent=1))
            return
    cases: dict[str, Callable[[], float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        bundle = runc_bundle(Path(tmp))
        floor = floor_argv(cfg, choice.accel)
        cases["floor: bare QEMU boot"] = lambda: timed(floor)
        # No network, as the runc case: the bridge costs are measured apart.
        # It takes the spare VM made after its last run (microvm/cli/spare.py).
        cases["microvm run --rm busybox true"] = lambda: timed(
            [microvm, "run", "--rm", "--network", "none", "busybox", "--", "true"])
        # The same with no spare: a runner forked by the fork server restores
        # a clone of its own.
        no_spare = Path(tmp) / "no-spare.yaml"
        no_spare.write_text("spare: false\n")
        cases["microvm run --rm, no spare"] = lambda: timed(
            [microvm, "--config", str(no_spare), "run", "--rm", "--network", "none", "busybox",
             "--", "true"])
        # The same, the command's own process running it (no fork server).
        cases["microvm run --rm, no fork server"] = lambda: timed(
            [microvm, "run", "--rm", "--network", "none", "busybox", "--", "true"],
            env={**os.environ, "KATA_PY_FORKSERVER": "off"})
        # A cold boot of the guest's own kernel: what templates save.
        cases["microvm run --no-template"] = lambda: timed(
            [microvm, "run", "--rm", "--network", "none", "--no-template", "busybox", "--",
             "true"])
        # What docker's defaults cost (capabilities, masked paths, device
        # rules in the guest): --privileged skips them.  With no spare, as
        # the run it is set against.
        cases["microvm run --privileged"] = lambda: timed(
            [microvm, "--config", str(no_spare), "run", "--rm", "--network", "none",
             "--privileged", "busybox", "--", "true"])
        n = 0

        def runc() -> float:
            nonlocal n
            n += 1
            return timed(["runc", "run", f"kata-py-bench-{os.getpid()}-{n}"], cwd=bundle)

        cases["runc run busybox true"] = runc
        results: dict[str, list[float]] = {k: [] for k in cases}
        # Untimed: the first run of a place makes its fork server, for the
        # next; the second makes the first spare.
        for _ in range(2):
            timed([microvm, "run", "--rm", "--network", "none", "busybox", "--", "true"])
        for _ in range(args.n):  # alternating, so drift hits every case alike
            for name, fn in cases.items():
                results[name].append(fn())
    stats = {k: summary(v) for k, v in results.items()}
    floor_m = stats["floor: bare QEMU boot"]["median"]
    run_m = stats["microvm run --rm busybox true"]["median"]
    runc_m = stats["runc run busybox true"]["median"]
    through_containerd = None
    if not args.no_containerd and shutil.which("containerd"):
        from . import bench_containerd
        through_containerd = bench_containerd.run(args.n, lambda: timed(floor_))
    steps = asyncio.run(breakdown(cfg, choice))
    cold_steps = asyncio.run(breakdown(dataclasses.replace(cfg, template=False), choice))
    images = compare_images(cfg, choice, max(3, args.n // 2))
    print(f"accelerator: {choice.accel} ({choice.reason}); n={args.n}")
    print(f"{'':<34}{'median':>9}{'min':>9}{'max':>9}")
    for name, st in stats.items():
        print(f"{name:<34}{st['median']:>8.3f}s{st['min']:>8.3f}s{st['max']:>8.3f}s")
    priv_m = stats["microvm run --privileged"]["median"]
    cold_m = stats["microvm run --no-template"]["median"]
    no_spare_m = stats["microvm run --rm, no spare"]["median"]
    print(f"ratio run/floor: {run_m / floor_m:.2f}    ratio run/runc: {run_m / runc_m:.1f}"
          f"    ratio run, no spare/run --privileged: {no_spare_m / priv_m:.3f}")
    print(f"ratio cold run/floor: {cold_m / floor_m:.2f}    ratio run/cold run: "
          f"{run_m / cold_m:.2f}    ratio run, no spare/floor: {no_spare_m / floor_m:.2f}"
          f"    ratio run, no fork server/floor: "
          f"{stats['microvm run --rm, no fork server']['median'] / floor_m:.2f}")
    print(f"one sandbox, step by step:{'clone':>26}{'cold':>9}")
    for name, secs in steps.items():
        print(f"  {name:<40}{secs:>8.3f}s{cold_steps[name]:>8.3f}s")
    print("guest image formats (boot: QEMU up -> agent ready; medians):")
    for name, st in images.items():
        print(f"  {name:<14}{st['size_mib']:>7.1f} MiB  boot {st['boot']:>6.3f}s  "
              f"guest: kernel start -> /init runs {st['agent_started']:>6.3f}s")
    if through_containerd is not None:
        from . import bench_containerd
        bench_containerd.report(through_containerd)
    for name, result in extra.items():
        importlib.import_module(f".{parts[name][0]}", __package__).report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"accel": choice.accel, "n": args.n, "stats": stats,
             "ratios": {"run/floor": run_m / floor_m, "run/runc": run_m / runc_m,
                        "run, no spare/floor": no_spare_m / floor_m,
                        "run, no spare/run --privileged": no_spare_m / priv_m,
                        "cold run/floor": cold_m / floor_m, "run/cold run": run_m / cold_m},
             "breakdown": steps, "breakdown_cold": cold_steps, "images": images,
             "containerd": through_containerd,
             **extra},
            indent=1) + "\n")


if __name__ == "__main__":
    main()
