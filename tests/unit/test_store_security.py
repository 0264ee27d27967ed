"""The image store is root's alone, and an import reads nothing outside what it was given.

Runs as root (as kata-py does) against a store of its own (paths.LIB in a
temporary directory that everyone may traverse, so only the store's own
permissions stand between `nobody` and its contents).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from microvm import paths
from microvm.errors import KataError
from microvm.images import rootfs, store
from microvm.images.unpack import Outside, open_inside
from microvm.vm.qemuuser import DYNAMIC_UID_BASE

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
QEMU = ["setpriv", f"--reuid={DYNAMIC_UID_BASE + 4242}", f"--regid={DYNAMIC_UID_BASE + 4242}",
        "--clear-groups"]
SECRETS = ("/etc/shadow", "/etc/gshadow")


@pytest.fixture
def lib(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """paths.LIB under a directory anyone may traverse (pytest's tmp_path is
    0700, which would hide the store's own permissions)."""
    base = Path(tempfile.mkdtemp(prefix="kp-store-", dir="/tmp"))
    base.chmod(0o755)
    monkeypatch.setattr(paths, "LIB", base / "lib")
    yield base / "lib"
    shutil.rmtree(base)


def tree(root: Path) -> set[str]:
    """Every path below root (files, directories, links)."""
    return {str(Path(d, n).relative_to(root)) for d, dirs, files in os.walk(root)
            for n in dirs + files}


def layer_tar(entries: list[tarfile.TarInfo | tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for e in entries:
            if isinstance(e, tarfile.TarInfo):
                t.addfile(e)
                continue
            info = tarfile.TarInfo(e[0])
            info.size, info.mode = len(e[1]), 0o644
            t.addfile(info, io.BytesIO(e[1]))
    return buf.getvalue()


PLAIN = layer_tar([("etc/motd", b"hello\n")])


@dataclass
class Link:
    target: str


Files = dict[str, "bytes | Link"]


def _config(layers: list[bytes]) -> bytes:
    return json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["sh"]},
                       "rootfs": {"type": "layers", "diff_ids": [
                           "sha256:" + hashlib.sha256(x).hexdigest() for x in layers]}}).encode()


def docker_files(layers: list[bytes], tag: str = "localhost/kp-sec:1") -> tuple[Files, dict]:
    """What `docker save` writes (the legacy layout); and which file is which."""
    files: Files = {"config.json": _config(layers)}
    for i, data in enumerate(layers):
        files[f"layer{i}/layer.tar"] = data
    files["manifest.json"] = json.dumps([{
        "Config": "config.json", "RepoTags": [tag],
        "Layers": [f"layer{i}/layer.tar" for i in range(len(layers))]}]).encode()
    return files, {"manifest": "manifest.json", "config": "config.json",
                   "layer": "layer0/layer.tar"}


def oci_files(layers: list[bytes], names: tuple[str, ...] = ("localhost/kp-sec:1",)
              ) -> tuple[Files, dict]:
    """An OCI image layout with plain tar layers; and which file is which."""
    files: Files = {}

    def blob(data: bytes, media: str) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        files[f"blobs/sha256/{digest}"] = data
        return {"mediaType": media, "digest": f"sha256:{digest}", "size": len(data)}

    layer_descs = [blob(x, "application/vnd.oci.image.layer.v1.tar") for x in layers]
    config = blob(_config(layers), "application/vnd.oci.image.config.v1+json")
    manifest = blob(json.dumps({"schemaVersion": 2, "config": config, "layers": layer_descs,
                                "mediaType": "application/vnd.oci.image.manifest.v1+json"}
                               ).encode(), "application/vnd.oci.image.manifest.v1+json")
    index = {"schemaVersion": 2, "manifests": [
        {**manifest, "annotations": {"io.containerd.image.name": n}} for n in names]}
    files["index.json"] = json.dumps(index).encode()
    files["oci-layout"] = b'{"imageLayoutVersion": "1.0.0"}'

    def name(d: dict) -> str:
        return "blobs/sha256/" + d["digest"][7:]

    return files, {"index": "index.json", "manifest": name(manifest), "config": name(config),
                   "layer": name(layer_descs[0])}


def write_dir(root: Path, files: Files) -> Path:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Link):
            path.symlink_to(content.target)
        else:
            path.write_bytes(content)
    return root


def write_tar(path: Path, files: Files) -> Path:
    with tarfile.open(path, "w") as t:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            if isinstance(content, Link):
                info.type, info.linkname = tarfile.SYMTYPE, content.target
                t.addfile(info)
            else:
                info.size = len(content)
                t.addfile(info, io.BytesIO(content))
    return path


def archive(kind: str, where: Path, files: Files) -> Path:
    """kind: dir or tar."""
    return write_dir(where / "layout", files) if kind == "dir" else \
        write_tar(where / "image.tar", files)


def empty_store() -> Path:
    with store.locked():
        pass
    return paths.LIB


# -- imports never read outside what they are given --------------------------------


@pytest.mark.parametrize("kind", ["dir", "tar"])
@pytest.mark.parametrize(("fmt", "role"), [
    ("docker", "manifest"), ("docker", "config"), ("docker", "layer"),
    ("oci", "index"), ("oci", "manifest"), ("oci", "config"), ("oci", "layer"),
])
def test_symlink_to_a_host_file_is_refused_and_nothing_is_kept(
        lib: Path, tmp_path: Path, kind: str, fmt: str, role: str) -> None:
    files, roles = (docker_files if fmt == "docker" else oci_files)([PLAIN])
    files[roles[role]] = Link("/etc/shadow")
    src = archive(kind, tmp_path, files)
    before = tree(empty_store())
    with pytest.raises(KataError, match="symlink leads out"):
        store.import_archive(src)
    assert tree(lib) == before     # no blob copies, no temporary directories
    assert store.list_images() == []


@pytest.mark.parametrize("kind", ["dir", "tar"])
def test_the_finding_config_and_layer_to_shadow_files(lib: Path, tmp_path: Path,
                                                      kind: str) -> None:
    """The reported attack: config.json and the layer as links to /etc/shadow
    and /etc/gshadow; no copy of either may land in the store."""
    files, roles = docker_files([PLAIN])
    files[roles["config"]] = Link(SECRETS[0])
    files[roles["layer"]] = Link(SECRETS[1])
    src = archive(kind, tmp_path, files)
    empty_store()
    with pytest.raises(KataError) as e:
        store.import_archive(src)
    assert "\n" not in str(e.value)
    secrets = {Path(s).read_bytes() for s in SECRETS}
    for d, _, names in os.walk(lib):
        for n in names:
            assert Path(d, n).read_bytes() not in secrets, Path(d, n)


@pytest.mark.parametrize("target", ["../../../../../../etc/shadow", "..", "../layout-2/x"])
def test_relative_symlinks_out_are_refused(lib: Path, tmp_path: Path, target: str) -> None:
    files, roles = docker_files([PLAIN])
    files[roles["config"]] = Link(target)
    with pytest.raises(KataError, match="leads out"):
        store.import_archive(archive("dir", tmp_path, files))


def test_a_symlinked_directory_on_the_way_is_refused(lib: Path, tmp_path: Path) -> None:
    """blobs/ as a link to a directory outside, even one holding the right blobs."""
    files, _ = oci_files([PLAIN])
    outside = write_dir(tmp_path / "elsewhere", {k: v for k, v in files.items()
                                                 if k.startswith("blobs/")})
    layout = write_dir(tmp_path / "layout", {k: v for k, v in files.items()
                                             if not k.startswith("blobs/")})
    (layout / "blobs").symlink_to(outside / "blobs")
    before = tree(empty_store())
    with pytest.raises(KataError, match="leads out"):
        store.import_archive(layout)
    assert tree(lib) == before


@pytest.mark.parametrize("kind", ["dir", "tar"])
def test_symlinks_within_the_archive_are_followed(lib: Path, tmp_path: Path,
                                                  kind: str) -> None:
    """docker save links a layer two images share (`../<id>/layer.tar`)."""
    files, _ = docker_files([PLAIN, PLAIN])
    files["layer1/layer.tar"] = Link("../layer0/./layer.tar")
    [img] = store.import_archive(archive(kind, tmp_path, files))
    assert len(img.layers) == 2
    assert (img.layer_dirs()[1] / "etc/motd").read_bytes() == b"hello\n"


def test_a_symlink_loop_and_a_fifo_are_refused(lib: Path, tmp_path: Path) -> None:
    files, roles = docker_files([PLAIN])
    files[roles["config"]] = Link("loop")
    files["loop"] = Link("config.json")
    with pytest.raises(KataError, match="too many symlinks"):
        store.import_archive(archive("dir", tmp_path / "a", files))
    files, roles = docker_files([PLAIN])
    layout = write_dir(tmp_path / "b", {k: v for k, v in files.items() if k != "config.json"})
    os.mkfifo(layout / "config.json")   # would hang a plain open()
    with pytest.raises(KataError, match="not a regular file"):
        store.import_archive(layout)


def test_hostile_member_names_in_a_tar(lib: Path, tmp_path: Path) -> None:
    files, _ = docker_files([PLAIN])
    files["../escape"] = b"x"
    with pytest.raises(KataError, match="hostile path in archive"):
        store.import_archive(write_tar(tmp_path / "a.tar", files))
    # A member written through a symlink an earlier member planted.
    files, _ = docker_files([PLAIN])
    files = {"d": Link("/tmp"), "d/kp-planted": b"x", **files}
    with pytest.raises(KataError, match="non-directory"):
        store.import_archive(write_tar(tmp_path / "b.tar", files))
    assert not Path("/tmp/kp-planted").exists()


def test_open_inside(tmp_path: Path) -> None:
    (tmp_path / "root/a/b").mkdir(parents=True)
    (tmp_path / "root/a/b/f").write_text("in")
    (tmp_path / "secret").write_text("out")
    (tmp_path / "root/up").symlink_to("a/b/../b/f")
    (tmp_path / "root/a/out").symlink_to("../../secret")
    (tmp_path / "root/abs").symlink_to(tmp_path / "secret")
    fd = os.open(tmp_path / "root", os.O_RDONLY | os.O_DIRECTORY)
    try:
        def read(name: str) -> str:
            with open(open_inside(fd, name)) as f:
                return f.read()
        assert read("a/b/f") == read("up") == read("a/../a/b/f") == "in"
        for name in ("a/out", "abs", "/etc/passwd", "../secret", "a/../../secret"):
            with pytest.raises(Outside):
                read(name)
        with pytest.raises(FileNotFoundError):
            read("a/nope")
        with pytest.raises(KataError, match="not a regular file"):
            read("a/b")
    finally:
        os.close(fd)


def test_lookup_user_reads_no_host_file_through_a_link(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").symlink_to("/etc/shadow")
    with pytest.raises(KataError, match="unable to find user"):
        rootfs.lookup_user(tmp_path, "root")


# -- a failed import takes back what it added -------------------------------------


def test_a_failed_import_keeps_what_was_there(lib: Path, tmp_path: Path) -> None:
    first, _ = oci_files([PLAIN], ("localhost/kp-first:1",))
    [kept] = store.import_archive(write_tar(tmp_path / "first.tar", first))
    before = tree(lib)
    # Shares the first image's layer; its second layer is not a tar.
    files, _ = docker_files([PLAIN, b"not a tar" * 100])
    with pytest.raises(KataError, match="broken layer"):
        store.import_archive(write_tar(tmp_path / "bad.tar", files))
    assert tree(lib) == before
    assert store.get("localhost/kp-first:1") == kept


def test_all_images_of_an_archive_or_none(lib: Path, tmp_path: Path) -> None:
    """The first image of the index is fine, the second's layer is broken:
    neither is recorded."""
    good, _ = oci_files([PLAIN], ("localhost/kp-a:1",))
    bad, _ = oci_files([b"not a tar" * 100], ("localhost/kp-b:1",))
    index = json.loads(good["index.json"])  # type: ignore[arg-type]
    index["manifests"] += json.loads(bad["index.json"])["manifests"]  # type: ignore[arg-type]
    files = {**good, **bad, "index.json": json.dumps(index).encode()}
    before = tree(empty_store())
    with pytest.raises(KataError, match="broken layer"):
        store.import_archive(write_tar(tmp_path / "two.tar", files))
    assert tree(lib) == before
    assert store.get("localhost/kp-a:1") is None


@pytest.mark.parametrize(("doc", "content"), [
    ("index.json", b'{"manifests": {"not": "a list"}}'),
    ("index.json", b'[1, 2]'),
    ("manifest.json", b'{"Config": "x"}'),
    ("manifest.json", b'[{"Config": "config.json", "Layers": "layer0/layer.tar"}]'),
    ("manifest.json", b'[{"Config": 7}]'),
])
def test_malformed_documents_are_one_clear_error(lib: Path, tmp_path: Path, doc: str,
                                                 content: bytes) -> None:
    files, _ = (oci_files if doc == "index.json" else docker_files)([PLAIN])
    files[doc] = content
    with pytest.raises(KataError) as e:
        store.import_archive(write_tar(tmp_path / "m.tar", files))
    assert "\n" not in str(e.value)


# -- the store is root's alone ----------------------------------------------------


def _dev(name: str, kind: bytes, major: int, minor: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.devmajor, info.devminor, info.mode = kind, major, minor, 0o666
    return info


def _setuid_id() -> tarfile.TarInfo:
    info = tarfile.TarInfo("bin/suid-id")
    info.mode, info.uid, info.gid = 0o4755, 0, 0
    info.size = os.stat("/usr/bin/id").st_size
    return info


def setuid_and_devices_image(tmp_path: Path) -> store.Image:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t, \
            open("/usr/bin/id", "rb") as f:
        t.addfile(_setuid_id(), f)
        t.addfile(_dev("dev/kp-blk", tarfile.BLKTYPE, 7, 0))
        t.addfile(_dev("dev/kp-null", tarfile.CHRTYPE, 1, 3))
    files, _ = oci_files([buf.getvalue()])
    [img] = store.import_archive(write_tar(tmp_path / "suid.tar", files))
    return img


def test_nobody_cannot_reach_setuid_files_or_device_nodes(lib: Path, tmp_path: Path) -> None:
    layer = setuid_and_devices_image(tmp_path).layer_dirs()[0]
    suid, blk, null = layer / "bin/suid-id", layer / "dev/kp-blk", layer / "dev/kp-null"
    # They are there, as the image has them (the guest's business)...
    assert suid.stat().st_mode & stat.S_ISUID and stat.S_ISBLK(blk.stat().st_mode)
    # ...but no one else on the host can reach them.
    # exec'd by a shell as nobody: setpriv itself execs with root's capabilities.
    r = subprocess.run([*NOBODY, "sh", "-c", 'exec "$@"', "sh", str(suid), "-u"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and r.stdout != "0\n", "a setuid file of an image ran as root"
    assert subprocess.run([*NOBODY, "test", "-b", str(blk)]).returncode != 0
    opened = subprocess.run([*NOBODY, "sh", "-c", 'exec 3<>"$1"', "sh", str(null)],
                            capture_output=True)
    assert opened.returncode != 0, "nobody opened a device node of an image"
    for d in ("images", "images/blobs/sha256", "images/layers"):
        assert subprocess.run([*NOBODY, "ls", str(lib / d)], capture_output=True
                              ).returncode != 0, d


def old_store(lib: Path) -> None:
    """What an older kata-py left: everything 0755, a guest kernel to boot."""
    for d in ("images/layers/abc/bin", "images/blobs/sha256", "containers/web/upper",
              "rootfs/busybox/bin", "guest"):
        (lib / d).mkdir(parents=True, exist_ok=True)
    for d, _, _ in os.walk(lib):
        os.chmod(d, 0o755)
    (lib / "guest/vmlinuz").write_bytes(b"kernel")
    (lib / "guest/initrd.cpio").write_bytes(b"initrd")
    for f in ("vmlinuz", "initrd.cpio"):
        (lib / "guest" / f).chmod(0o644)


@pytest.mark.parametrize("use", [
    lambda: store.list_images(),
    lambda: store.get("busybox"),
    lambda: rootfs.builtin("busybox"),
])
def test_an_older_store_is_closed_on_next_use(lib: Path, use: object) -> None:
    old_store(lib)
    use()  # type: ignore[operator]
    assert stat.S_IMODE(lib.stat().st_mode) == 0o711
    for d in ("images", "containers", "rootfs"):
        assert stat.S_IMODE((lib / d).stat().st_mode) == 0o700, d
        assert subprocess.run([*NOBODY, "ls", str(lib / d)], capture_output=True
                              ).returncode != 0, d
    # QEMU's own uid still opens the guest kernel and image, and lists nothing.
    for f in ("vmlinuz", "initrd.cpio"):
        assert subprocess.run([*QEMU, "cat", str(lib / "guest" / f)], capture_output=True
                              ).returncode == 0, f
    assert subprocess.run([*QEMU, "ls", str(lib)], capture_output=True).returncode != 0
    assert subprocess.run([*QEMU, "test", "-e", str(lib / "images/layers")]).returncode != 0


def test_a_new_store_is_private_whatever_the_umask(lib: Path) -> None:
    old = os.umask(0)
    try:
        store.list_images()
    finally:
        os.umask(old)
    assert stat.S_IMODE(lib.stat().st_mode) == 0o711
    assert stat.S_IMODE((lib / "images").stat().st_mode) == 0o700
