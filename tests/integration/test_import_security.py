"""`microvm import` as a user runs it, against archives that point at host files.

No VM: each test has a store of its own (KATA_PY_LIB) under a directory
anyone may traverse, so only the store's permissions keep `nobody` out.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from microvm.images.ociarchive import docker_archive, oci_archive_from_layers
from tests.conftest import MICROVM

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.fixture
def lib() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="kp-import-", dir="/tmp"))
    base.chmod(0o755)
    yield base / "lib"
    shutil.rmtree(base)


def microvm(lib: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MICROVM, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "KATA_PY_LIB": str(lib)})


def tree(root: Path) -> set[str]:
    return {str(Path(d, n).relative_to(root)) for d, dirs, files in os.walk(root)
            for n in dirs + files}


def plain_layer(entries: list[tarfile.TarInfo], data: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for info in entries:
            t.addfile(info, io.BytesIO(data[info.name]) if info.name in data else None)
    return buf.getvalue()


def _file(name: str, data: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    return info


MOTD = plain_layer([_file("etc/motd", b"hi\n")], {"etc/motd": b"hi\n"})


def extract(archive: Path, dest: Path) -> Path:
    """Our own archives: regular files only."""
    with tarfile.open(archive) as t:
        for m in t:
            (dest / m.name).parent.mkdir(parents=True, exist_ok=True)
            (dest / m.name).write_bytes(t.extractfile(m).read())  # type: ignore[union-attr]
    return dest


def retar(layout: Path, out: Path) -> Path:
    with tarfile.open(out, "w") as t:
        for child in sorted(layout.iterdir()):
            t.add(child, arcname=child.name)  # symlinks stay symlinks
    return out


def layout(fmt: str, tmp: Path, layers: list[bytes]) -> tuple[Path, dict[str, str]]:
    """A docker save or OCI layout directory; and which file is which."""
    if fmt == "docker":
        src = docker_archive(tmp / "src.tar", "localhost/kp-sec:1", layers, {"Cmd": ["sh"]})
        return extract(src, tmp / "layout"), {
            "manifest": "manifest.json", "config": "config.json", "layer": "layer0/layer.tar"}
    import gzip
    import hashlib
    src = oci_archive_from_layers(tmp / "src.tar", "localhost/kp-sec:1",
                                  [(gzip.compress(x), "sha256:" + hashlib.sha256(x).hexdigest())
                                   for x in layers], {"Cmd": ["sh"]})
    root = extract(src, tmp / "layout")

    def blob(digest: str) -> str:
        return "blobs/sha256/" + digest[7:]

    manifest = blob(json.loads((root / "index.json").read_text())["manifests"][0]["digest"])
    doc = json.loads((root / manifest).read_text())
    return root, {"index": "index.json", "manifest": manifest,
                  "config": blob(doc["config"]["digest"]),
                  "layer": blob(doc["layers"][0]["digest"])}


@pytest.mark.parametrize("kind", ["dir", "tar"])
@pytest.mark.parametrize(("fmt", "role"), [
    ("docker", "manifest"), ("docker", "config"), ("docker", "layer"),
    ("oci", "index"), ("oci", "manifest"), ("oci", "config"), ("oci", "layer"),
])
def test_a_link_to_etc_shadow_is_one_error_and_leaves_nothing(
        lib: Path, tmp_path: Path, kind: str, fmt: str, role: str) -> None:
    root, roles = layout(fmt, tmp_path, [MOTD])
    (root / roles[role]).unlink()
    (root / roles[role]).symlink_to("/etc/shadow")
    src = root if kind == "dir" else retar(root, tmp_path / "image.tar")
    benign = docker_archive(tmp_path / "benign.tar", "localhost/kp-benign:1", [MOTD], {})
    assert microvm(lib, "import", str(benign)).returncode == 0
    before = tree(lib)
    r = microvm(lib, "import", str(src))
    assert r.returncode == 125
    assert r.stderr.splitlines() == [r.stderr.strip()], r.stderr       # one line
    assert r.stderr.startswith("microvm: error: ") and "symlink leads out" in r.stderr
    assert tree(lib) == before                  # no blob copy, no temporary directory
    shadow = Path("/etc/shadow").read_bytes()
    assert all(Path(d, n).read_bytes() != shadow
               for d, _, names in os.walk(lib) for n in names)


def test_setuid_files_and_devices_of_an_image_are_out_of_nobodys_reach(
        lib: Path, tmp_path: Path) -> None:
    suid = _file("bin/suid-id", b"")
    suid.mode, suid.size = 0o4755, os.stat("/usr/bin/id").st_size
    dev = tarfile.TarInfo("dev/kp-null")
    dev.type, dev.devmajor, dev.devminor, dev.mode = tarfile.CHRTYPE, 1, 3, 0o666
    blk = tarfile.TarInfo("dev/kp-blk")
    blk.type, blk.devmajor, blk.devminor, blk.mode = tarfile.BLKTYPE, 7, 0, 0o666
    layer = plain_layer([suid, dev, blk], {"bin/suid-id": Path("/usr/bin/id").read_bytes()})
    src = docker_archive(tmp_path / "suid.tar", "localhost/kp-suid:1", [layer], {})
    r = microvm(lib, "import", str(src))
    assert r.returncode == 0, r.stderr
    [layer_dir] = (lib / "images/layers").iterdir()
    assert (layer_dir / "bin/suid-id").stat().st_mode & stat.S_ISUID   # kept, for the guest
    ran = subprocess.run([*NOBODY, "sh", "-c", 'exec "$@"', "sh",
                          str(layer_dir / "bin/suid-id"), "-u"], capture_output=True, text=True)
    assert ran.returncode != 0 and ran.stdout != "0\n", "an image's setuid file ran as root"
    opened = subprocess.run([*NOBODY, "sh", "-c", 'exec 3<>"$1"', "sh",
                             str(layer_dir / "dev/kp-null")], capture_output=True)
    assert opened.returncode != 0, "nobody opened an image's device node"
    assert subprocess.run([*NOBODY, "test", "-b", str(layer_dir / "dev/kp-blk")]
                          ).returncode != 0


def test_an_older_open_store_is_closed_by_the_next_command(lib: Path) -> None:
    for d in ("images/blobs/sha256", "containers/web/upper", "rootfs/busybox", "guest"):
        (lib / d).mkdir(parents=True)
    for d, _, _ in os.walk(lib):
        os.chmod(d, 0o755)
    (lib / "guest/vmlinuz").write_bytes(b"kernel")
    (lib / "guest/vmlinuz").chmod(0o644)
    assert microvm(lib, "images").returncode == 0
    assert {d: stat.S_IMODE((lib / d).stat().st_mode)
            for d in (".", "images", "containers", "rootfs", "guest")} == {
        ".": 0o711, "images": 0o700, "containers": 0o700, "rootfs": 0o700, "guest": 0o755}
    assert subprocess.run([*NOBODY, "ls", str(lib / "containers")],
                          capture_output=True).returncode != 0
    # QEMU's uid still opens the guest kernel.
    assert subprocess.run([*NOBODY, "cat", str(lib / "guest/vmlinuz")],
                          capture_output=True).stdout == b"kernel"
