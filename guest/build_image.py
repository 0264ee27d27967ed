"""Build the guest image: Debian's Python, the agent, nothing else.

  python -m guest.build_image [-q] [--print-path]

Steps: download Debian packages (apt-get download), extract them (dpkg-deb
-x) with the agent code and the host's protobuf runtime into a staging tree;
run the agent there (chroot) to learn every file it loads; copy just those
into the final tree, precompiled to sourceless .pyc; pack it twice, as an
initramfs (cpio, uncompressed: unpacking is cheaper under emulation than
decompressing) and as a read-only ext4 image for virtio-blk.

Results are cached under $KATA_PY_CACHE/guest/<key>/, keyed by the package
versions and the bytes of every input, and installed into
$KATA_PY_LIB/guest/.  Nothing is rebuilt when nothing changed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import google.protobuf

from microvm.protocol import GUEST_BUSYBOX

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("KATA_PY_CACHE", "/var/cache/kata-py"))
LIB = Path(os.environ.get("KATA_PY_LIB", "/var/lib/kata-py"))

PACKAGES = [
    "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib",
    "libc6", "zlib1g", "libexpat1", "libffi8",
    # protobuf's upb extension is C++; without it protobuf falls back to pure
    # Python, which imports far more and runs far slower under emulation.
    "libstdc++6", "libgcc-s1",
    # The guest's `ip` (network set-up) and the debug console's shell: in the
    # image, a clone reads it from RAM, not over its virtio-9p share.
    "busybox-static",
]
# The agent's own code, as the guest sees it under /opt/kata-py.
AGENT_FILES = [
    "microvm/__init__.py", "microvm/linux.py", "microvm/capabilities.py",
    "microvm/protocol/__init__.py",
    "microvm/protocol/ttrpc.py", "microvm/protocol/ttrpc_pb2.py",
    "microvm/protocol/agent_pb2.py", "guest/__init__.py", "guest/init.py",
    "guest/agent.py", "guest/adopt.py", "guest/container.py", "guest/cgroups.py",
    "guest/network.py",
]
TRACE = "guest/imagetrace.py"
PYTHON = "/usr/bin/python3.11"
# -S -s, not -I: the kernel passes PYTHONHASHSEED (see microvm/vm/qemu.py).
INIT = f"""#!{PYTHON} -Ss
import sys, time
started = time.clock_gettime(time.CLOCK_BOOTTIME)  # before the agent's imports
sys.path.insert(0, "/opt/kata-py")
from guest.init import main
main(started)
"""
# Empty mount points a read-only root must already have.
DIRS = ["proc", "sys", "dev", "run", "tmp", "etc"]


def run(*cmd: str, **kw: object) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw)  # type: ignore[call-overload, no-any-return]
    except subprocess.CalledProcessError as e:
        sys.exit(f"build-image: {' '.join(cmd)} failed:\n{e.stderr or e.stdout}")


def deb_filenames() -> list[str]:
    """The .deb files apt would download now: their names carry the versions."""
    out = run("apt-get", "download", "--print-uris", *PACKAGES).stdout
    names = [line.split()[1] for line in out.splitlines() if line.startswith("'")]
    if len(names) != len(PACKAGES):
        sys.exit("build-image: apt cannot find the guest's packages; run apt-get update")
    return sorted(names)


def cache_key(debs: list[str]) -> str:
    h = hashlib.sha256()
    for name in debs:
        h.update(name.encode() + b"\0")
    for rel in [*AGENT_FILES, TRACE, "guest/build_image.py"]:
        h.update(rel.encode() + b"\0" + (REPO / rel).read_bytes())
    h.update(google.protobuf.__version__.encode())
    return h.hexdigest()[:16]


def fetch_debs(debs: list[str]) -> list[Path]:
    store = CACHE / "debs"
    store.mkdir(parents=True, exist_ok=True)
    missing = [n for n in debs if not (store / n).exists()]
    if missing:
        with tempfile.TemporaryDirectory(dir=store) as tmp:
            run("apt-get", "download", *PACKAGES, cwd=tmp)
            for f in Path(tmp).iterdir():
                f.rename(store / f.name)
    return [store / n for n in debs]


def stage(debs: list[Path], root: Path) -> None:
    for deb in debs:
        run("dpkg-deb", "-x", str(deb), str(root))
    opt = root / "opt/kata-py"
    for rel in [*AGENT_FILES, TRACE]:
        (opt / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, opt / rel)
    site = Path(google.protobuf.__file__).parent.parent
    shutil.copytree(site, opt / "google", ignore=shutil.ignore_patterns("__pycache__"))
    for d in DIRS:
        (root / d).mkdir(exist_ok=True)


def trace(root: Path) -> list[str]:
    """Every file the agent loads, as paths inside root."""
    # A private mount namespace: /proc for the chroot vanishes with it.
    script = (f'mount -t proc proc "$1/proc" && exec chroot "$1" {PYTHON} -SI '
              f'/opt/kata-py/{TRACE}')
    out = run("unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
              str(root)).stdout
    return [f for f in json.loads(out) if not f.startswith(("/proc", "/dev"))]


def assemble(stage_root: Path, files: list[str], root: Path) -> None:
    for f in files:
        src = stage_root / f.lstrip("/")
        if f.endswith(".pyc"):
            continue
        dst = root / f.lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
    # The trace names real files; programs find libraries by their sonames,
    # symlinks in the packages (libz.so.1, the ELF interpreter in /lib64).
    kept = {os.path.realpath(stage_root / f.lstrip("/")) for f in files}
    for link in stage_root.rglob("*"):
        if link.is_symlink() and _resolve_in(stage_root, link) in kept:
            rel = link.relative_to(stage_root)
            if not (root / rel).exists():
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                os.symlink(os.readlink(link), root / rel)
    # Python's stdlib landmark for a sourceless tree is os.pyc beside lib-dynload.
    (root / "usr/lib/python3.11/lib-dynload").mkdir(parents=True, exist_ok=True)
    for d in DIRS:
        (root / d).mkdir(exist_ok=True)
    # Python reads /dev/urandom for its hash seed when getrandom() is not yet
    # ready, before init has mounted devtmpfs: the image carries the nodes.
    for name, minor in (("null", 3), ("urandom", 9)):
        os.mknod(root / "dev" / name, 0o666 | stat.S_IFCHR, os.makedev(1, minor))
    (root / "init").write_text(INIT)
    (root / "init").chmod(0o755)
    # Sourceless .pyc beside where the .py was: no stat of sources, no
    # __pycache__ lookups, and a smaller image.  Compiled by the guest's
    # own Python so the magic number is certainly right.
    tmp_py = [str(p.relative_to(root)) for p in root.rglob("*.py")]
    compile_script = (
        "import py_compile, sys\n"
        "for f in sys.argv[1:]:\n"
        "    py_compile.compile('/r/' + f, cfile='/r/' + f + 'c', dfile='/' + f, doraise=True,\n"
        "        invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)\n")
    script = (f'mkdir -p "$1/r" && mount --bind "$2" "$1/r" && '
              f'exec chroot "$1" {PYTHON} -SI -c "$3" "${{@:4}}"')
    run("unshare", "--mount", "--propagation", "private", "bash", "-c", script, "sh",
        str(stage_root), str(root), compile_script, *tmp_py)
    for name in tmp_py:
        (root / name).unlink()


def _resolve_in(root: Path, link: Path) -> str:
    """realpath of link with absolute targets taken inside root, not the host."""
    path = link
    for _ in range(16):
        if not path.is_symlink():
            break
        target = os.readlink(path)
        path = root / target.lstrip("/") if target.startswith("/") else path.parent / target
    return os.path.realpath(path)


def pack(root: Path, out: Path) -> None:
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    listing = "\n".join([".", *files]) + "\n"
    with open(out / "initrd.cpio", "wb") as f:
        subprocess.run(["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"], input=listing.encode(),
                       stdout=f, cwd=root, check=True)
    size_mb = max(16, int(sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
                          / 2**20 * 1.3) + 8)
    run("mkfs.ext4", "-q", "-F", "-L", "kata-py", "-O", "^has_journal", "-E",
        "root_owner=0:0", "-d", str(root), str(out / "rootfs.ext4"), f"{size_mb}M")


def build(key: str, debs: list[str], quiet: bool) -> Path:
    out = CACHE / "guest" / key
    if (out / "initrd.cpio").exists():
        return out
    t0 = time.monotonic()
    if not quiet:
        print("guest image: building", file=sys.stderr)
    paths = fetch_debs(debs)
    (CACHE / "guest").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE / "guest") as tmp:
        stage_root, root, result = Path(tmp, "stage"), Path(tmp, "root"), Path(tmp, "out")
        for d in (stage_root, root, result):
            d.mkdir()
        stage(paths, stage_root)
        files = [*trace(stage_root), GUEST_BUSYBOX]
        assemble(stage_root, files, root)
        pack(root, result)
        manifest = {"key": key, "debs": debs, "protobuf": google.protobuf.__version__,
                    "files": len(files)}
        (result / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        result.rename(out)
    if not quiet:
        size = (out / "initrd.cpio").stat().st_size / 2**20
        print(f"guest image: built in {time.monotonic() - t0:.0f}s, initramfs {size:.1f} MiB",
              file=sys.stderr)
    return out


def prune_cache(current: str, keep: int = 3) -> None:
    """Old builds go: all but the newest few (the current one among them, so
    checkouts of other revisions do not rebuild at every switch)."""
    entries = [d for d in (CACHE / "guest").iterdir()
               if len(d.name) == 16 and (d / "initrd.cpio").exists()]
    entries.sort(key=lambda d: (d.name == current, d.stat().st_mtime), reverse=True)
    for old in entries[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def install(out: Path) -> None:
    dest = LIB / "guest"
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("initrd.cpio", "rootfs.ext4", "manifest.json"):
        tmp = dest / f".{name}.tmp"
        shutil.copyfile(out / name, tmp)
        tmp.rename(dest / name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-q", "--quiet", action="store_true")
    ap.add_argument("--print-path", action="store_true", help="print the cache entry's path")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("build-image: must run as root (chroot, mounts)")
    debs = deb_filenames()
    key = cache_key(debs)
    cached = (CACHE / "guest" / key / "initrd.cpio").exists()
    out = build(key, debs, args.quiet)
    out.touch()  # the newest used, for prune_cache
    install(out)
    prune_cache(key)
    if args.print_path:
        print(out)
    elif cached and not args.quiet:
        print(f"guest image: cached ({key})", file=sys.stderr)


if __name__ == "__main__":
    main()
