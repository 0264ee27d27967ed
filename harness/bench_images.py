"""Image benchmarks, side by side in the same run:

  pull     `microvm pull` of a ~100 MB multi-layer image from a loopback
           registry into an empty store (fetch, verify, unpack every layer),
           beside `skopeo copy` + `umoci unpack` of the same image
  save     `microvm save -o` of that image from the store, beside `skopeo
           copy` of it from an OCI layout into an OCI archive
  first    `microvm run --rm IMAGE echo`: time to the first byte of output
           with the image already stored, beside the built-in busybox and
           the bare-QEMU floor
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import statistics
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from microvm.images import rootfs
from microvm.images.ociarchive import layer_from_dir, oci_archive_from_layers

from . import localregistry

LAYERS, FILES, FILE_SIZE = 4, 100, 256 << 10     # 4 layers of 25 MiB over busybox


def _random_layer(i: int) -> tuple[bytes, str]:
    """Incompressible files, so the compressed size is the real size."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as t:
        for j in range(FILES):
            info = tarfile.TarInfo(f"data/{i}/f{j}")
            info.size, info.mode = FILE_SIZE, 0o644
            t.addfile(info, io.BytesIO(os.urandom(FILE_SIZE)))
    plain = raw.getvalue()
    return gzip.compress(plain, compresslevel=1, mtime=0), \
        "sha256:" + hashlib.sha256(plain).hexdigest()


def _timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE, env=env)
    return time.perf_counter() - t0


def first_byte(argv: list[str]) -> float:
    """Seconds from spawn to the first byte on stdout (then it runs to the end)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL)
    assert p.stdout is not None
    first = p.stdout.read(1)
    t = time.perf_counter() - t0
    p.stdout.read()
    if p.wait() != 0 or not first:
        raise RuntimeError(f"{argv}: exit {p.returncode}")
    return t


def _stats(v: list[float]) -> dict[str, float]:
    return {"median": statistics.median(v), "min": min(v), "max": max(v)}


def run(n: int, floor: Callable[[], float], microvm: str) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="kata-py-bench-img-") as tmp_s:
        tmp = Path(tmp_s)
        layers = [layer_from_dir(rootfs.builtin("busybox"))]
        layers += [_random_layer(i) for i in range(LAYERS)]
        size = sum(len(blob) for blob, _ in layers)
        archive = oci_archive_from_layers(tmp / "image.tar", "localhost/bench:1", layers,
                                          {"Cmd": ["echo", "hello"]})
        with localregistry.serve(tmp / "registry") as reg:
            ref = f"{reg}/kata-py-bench:1"
            localregistry.push(archive, ref)
            archive.unlink()
            pulls: dict[str, list[float]] = {"microvm pull": [], "skopeo copy + umoci unpack": []}
            for i in range(n):
                store = tmp / f"store{i}"
                pulls["microvm pull"].append(_timed(
                    [microvm, "pull", ref], env={**os.environ, "KATA_PY_LIB": str(store)}))
                shutil.rmtree(store)
                layout, bundle = tmp / f"oci{i}", tmp / f"bundle{i}"
                pulls["skopeo copy + umoci unpack"].append(
                    _timed(["skopeo", "copy", "-q", "--src-tls-verify=false",
                            f"docker://{ref}", f"oci:{layout}:bench"])
                    + _timed(["umoci", "unpack", "--image", f"{layout}:bench", str(bundle)]))
                shutil.rmtree(layout)
                shutil.rmtree(bundle)
            # Into the real store, for save and time to first byte.
            subprocess.run([microvm, "pull", ref], check=True, stdout=subprocess.DEVNULL)
            layout = tmp / "oci-src"
            _timed(["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{ref}",
                    f"oci:{layout}:bench"])
        saves: dict[str, list[float]] = {"microvm save": [], "skopeo copy to oci-archive": []}
        out = tmp / "saved.tar"
        for _ in range(n):
            saves["microvm save"].append(_timed([microvm, "save", "-o", str(out), ref]))
            out.unlink()
            saves["skopeo copy to oci-archive"].append(_timed(
                ["skopeo", "copy", "-q", f"oci:{layout}:bench", f"oci-archive:{out}:bench"]))
            out.unlink()
        firsts: dict[str, list[float]] = {"floor": [], "run IMAGE": [], "run busybox": []}
        try:
            for _ in range(n):
                firsts["floor"].append(floor())
                firsts["run IMAGE"].append(
                    first_byte([microvm, "run", "--rm", "--network", "none", ref]))
                firsts["run busybox"].append(first_byte(
                    [microvm, "run", "--rm", "--network", "none", "busybox", "echo", "hello"]))
        finally:
            subprocess.run([microvm, "rmi", ref], stdout=subprocess.DEVNULL, check=False)
    pull = {k: _stats(v) for k, v in pulls.items()}
    first = {k: _stats(v) for k, v in firsts.items()}
    save = {k: _stats(v) for k, v in saves.items()}
    return {
        "image_mb": size / 1e6, "layers": len(layers),
        "pull": pull,
        "pull_mb_s": {k: size / 1e6 / v["median"] for k, v in pull.items()},
        "save": save,
        "save_mb_s": {k: size / 1e6 / v["median"] for k, v in save.items()},
        "first_byte": first,
        "ratios": {"pull/skopeo+umoci": pull["microvm pull"]["median"]
                   / pull["skopeo copy + umoci unpack"]["median"],
                   "save/skopeo": save["microvm save"]["median"]
                   / save["skopeo copy to oci-archive"]["median"],
                   "run IMAGE/floor": first["run IMAGE"]["median"] / first["floor"]["median"],
                   "run IMAGE/run busybox": first["run IMAGE"]["median"]
                   / first["run busybox"]["median"]},
    }


def report(r: dict[str, object]) -> None:
    print(f"images: {r['image_mb']:.1f} MB in {r['layers']} layers, from a loopback registry")
    pull, rate, first, ratios = r["pull"], r["pull_mb_s"], r["first_byte"], r["ratios"]
    assert isinstance(pull, dict) and isinstance(rate, dict)
    assert isinstance(first, dict) and isinstance(ratios, dict)
    save, save_rate = r["save"], r["save_mb_s"]
    assert isinstance(save, dict) and isinstance(save_rate, dict)
    for table, rates in ((pull, rate), (save, save_rate)):
        for name, st in table.items():
            print(f"  {name:<28}{st['median']:>8.3f}s  {rates[name]:>6.1f} MB/s  "
                  f"(min {st['min']:.3f}s, max {st['max']:.3f}s)")
    print("  time to first byte of output, image stored:")
    for name, st in first.items():
        print(f"  {name:<28}{st['median']:>8.3f}s  (min {st['min']:.3f}s, max {st['max']:.3f}s)")
    print("  ratios: " + "   ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
