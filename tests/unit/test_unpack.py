"""Layer unpacking: every entry type, whiteouts, and hostile layers refused."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from microvm.errors import KataError
from microvm.images.unpack import HostileLayer, unpack


def layer(*entries: tuple[str, str, object]) -> io.BytesIO:
    """A tar from (kind, name, arg) entries: file/dir/symlink/hardlink/chardev."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for kind, name, arg in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            data = b""
            if kind == "file":
                data = arg if isinstance(arg, bytes) else str(arg).encode()
                info.size = len(data)
                info.mode = 0o644
            elif kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, str(arg)
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, str(arg)
            elif kind == "chardev":
                info.type, info.devmajor, info.devminor, info.mode = tarfile.CHRTYPE, 1, 3, 0o666
            elif kind == "xattr":
                data = b"x"
                info.size = 1
                info.pax_headers = {"SCHILY.xattr.user.kata": str(arg)}
            elif kind == "owned":
                data = b"o"
                info.size, info.uid, info.gid, info.mode = 1, 1234, 5678, 0o4755
            t.addfile(info, io.BytesIO(data) if data or kind == "file" else None)
    buf.seek(0)
    return buf


def test_entry_types(tmp_path: Path) -> None:
    unpack(layer(("dir", "etc", None), ("file", "etc/hosts", "127.0.0.1 x\n"),
                 ("symlink", "etc/link", "hosts"), ("hardlink", "etc/hard", "etc/hosts"),
                 ("chardev", "dev-null", None), ("xattr", "attrs", "v1"),
                 ("owned", "setuid", None)), tmp_path)
    assert (tmp_path / "etc/hosts").read_text() == "127.0.0.1 x\n"
    assert os.readlink(tmp_path / "etc/link") == "hosts"
    assert (tmp_path / "etc/hard").stat().st_ino == (tmp_path / "etc/hosts").stat().st_ino
    st = os.stat(tmp_path / "dev-null", follow_symlinks=False)
    assert stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 1 and os.minor(st.st_rdev) == 3
    assert os.getxattr(tmp_path / "attrs", "user.kata") == b"v1"
    owned = (tmp_path / "setuid").stat()
    assert (owned.st_uid, owned.st_gid) == (1234, 5678)
    assert owned.st_mode & 0o7777 == 0o4755   # mode set after chown keeps setuid
    assert int((tmp_path / "etc/hosts").stat().st_mtime) == 1_700_000_000


def test_whiteouts_become_overlayfs_whiteouts(tmp_path: Path) -> None:
    unpack(layer(("dir", "gone", None), ("file", "gone/.wh..wh..opq", ""),
                 ("file", "etc/.wh.passwd", "")), tmp_path)
    assert os.getxattr(tmp_path / "gone", "trusted.overlay.opaque") == b"y"
    st = os.stat(tmp_path / "etc/passwd", follow_symlinks=False)
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert not (tmp_path / "gone/.wh..wh..opq").exists()


@pytest.mark.parametrize("entries", [
    [("file", "../escape", "x")],
    [("file", "a/../../escape", "x")],
    [("file", "/abs-escape", "x")],
    # A symlink planted first, then a write through it.
    [("symlink", "sneaky", "../"), ("file", "sneaky/escape", "x")],
    [("symlink", "sneaky", "/tmp"), ("file", "sneaky/escape", "x")],
    # A hard link to a file outside the layer.
    [("hardlink", "h", "../outside-target")],
    [("symlink", "d", "/etc"), ("hardlink", "h", "d/hostname")],
])
def test_hostile_layers_write_nothing_outside(tmp_path: Path,
                                              entries: list[tuple[str, str, object]]) -> None:
    dest = tmp_path / "layer"
    dest.mkdir()
    (tmp_path / "outside-target").write_text("secret")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(HostileLayer):
        unpack(layer(*entries), dest)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not Path("/tmp/escape").exists()
    assert not Path("/abs-escape").exists()


def test_truncated_layer_is_one_clear_error(tmp_path: Path) -> None:
    data = layer(("file", "big", b"x" * 100_000)).getvalue()[:20_000]
    with pytest.raises(KataError, match="broken layer"):
        unpack(io.BytesIO(data), tmp_path)


def test_later_entry_replaces_earlier(tmp_path: Path) -> None:
    unpack(layer(("file", "f", "one"), ("symlink", "f", "elsewhere")), tmp_path)
    assert os.readlink(tmp_path / "f") == "elsewhere"


def test_zstd_layers(tmp_path: Path) -> None:
    import shutil
    import subprocess

    from microvm.images.unpack import open_layer
    if shutil.which("zstd") is None:
        pytest.skip("zstd not installed (scripts/setup installs it)")
    blob = tmp_path / "layer.zst"
    plain = layer(("file", "etc/motd", "zstd works\n")).getvalue()
    blob.write_bytes(subprocess.run(["zstd", "-q", "-c"], input=plain, capture_output=True,
                                    check=True).stdout)
    dest = tmp_path / "out"
    dest.mkdir()
    with open_layer(blob) as f:
        unpack(f, dest)
    assert (dest / "etc/motd").read_text() == "zstd works\n"
    # A corrupt zstd stream is an error, not a silently short layer.
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(KataError), open_layer(blob) as f:
        unpack(f, bad)
