"""Unpacking image layers into a directory, safely.

Layers come from registries and archives: untrusted.  Every entry is created
relative to a directory fd, walking each path component with O_NOFOLLOW, so
no `..`, absolute path or symlink (planted by an earlier entry or layer) can
make a write land outside the layer's directory.  Hostile entries abort the
unpack with one clear error; the caller removes the half-made directory.

OCI whiteouts: `.wh.NAME` removes NAME from the layers below (kept here as
overlayfs's whiteout, a 0/0 character device), `.wh..wh..opq` marks its
directory opaque (overlayfs's trusted.overlay.opaque=y).  The layer
directories are then stacked by overlayfs as its lower layers.

Owners, set-id bits and device nodes are kept as the image has them, as
containerd and runc keep them: inside the VM they are the guest's business.
On the host they sit in a store only root may enter (paths.private).
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import io
import os
import stat
import subprocess
import tarfile
from pathlib import Path
from typing import IO, Any

from microvm.errors import KataError

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
MAX_LINKS = 40  # symlinks on one path, as the kernel allows


class HostileLayer(KataError):
    pass


class Outside(KataError):
    """A name, or a symlink on its way, leads out of the directory it is read in."""


def open_dir(root_fd: int, parts: list[str], create: bool) -> int:
    """An fd for root/parts..., never following a symlink; makes dirs if asked."""
    fd = os.dup(root_fd)
    try:
        for part in parts:
            try:
                nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(part, 0o755, dir_fd=fd)
                nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as e:
                # ELOOP/ENOTDIR: a symlink or a file where a directory must be.
                raise HostileLayer(f"path goes through a non-directory: {part!r} "
                                   f"({e.strerror})") from None
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


def _split(name: str) -> list[str]:
    """A member name as path components; refuses absolute paths and `..`."""
    if name.startswith("/"):
        raise HostileLayer(f"absolute path in layer: {name!r}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise HostileLayer(f"path escapes the layer: {name!r}")
    if not parts:
        return []
    return parts


def remove(dir_fd: int, name: str) -> None:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
        try:
            for child in os.listdir(fd):
                remove(fd, child)
        finally:
            os.close(fd)
        os.rmdir(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


def open_inside(root_fd: int, name: str) -> int:
    """An fd to read the regular file root/name, never reaching out of root.

    Each component is opened relative to its parent's fd with O_NOFOLLOW.  A
    symlink on the way is resolved here, against the directories walked so
    far: `..` pops our own stack of fds, never the file system's `..`, and an
    absolute target or one that climbs above root is refused.  So nothing
    renamed or planted meanwhile can take the walk out of root.
    """
    if name.startswith("/"):
        raise Outside(f"{name}: an absolute path")
    stack = [os.dup(root_fd)]
    todo = name.split("/")[::-1]  # a stack as well: a symlink's target goes on top
    links: list[str] = []         # those followed, for the error
    try:
        while todo:
            part = todo.pop()
            if part in ("", "."):
                continue
            if part == "..":
                if len(stack) == 1:
                    via = f" (symlink {links[-1]})" if links else ""
                    raise Outside(f"{name}: leads out of the directory{via}")
                os.close(stack.pop())
                continue
            last = all(p in ("", ".") for p in todo)
            try:
                # O_NONBLOCK: a FIFO planted as the file must not hang the open.
                fd = os.open(part, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (
                    os.O_NONBLOCK | os.O_NOCTTY if last else os.O_DIRECTORY), dir_fd=stack[-1])
            except OSError as e:
                target = _symlink(e, part, stack[-1])
                links.append(f"{part} -> {target}")
                if target.startswith("/"):
                    raise Outside(f"{name}: a symlink leads out ({links[-1]})") from None
                if len(links) > MAX_LINKS:
                    raise Outside(f"{name}: too many symlinks") from None
                todo.extend(reversed(target.split("/")))
                continue
            if last:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    os.close(fd)
                    raise KataError(f"{name}: not a regular file")
                return fd
            stack.append(fd)
        raise KataError(f"{name!r}: names no file")
    finally:
        for fd in stack:
            os.close(fd)


def _symlink(error: OSError, name: str, dir_fd: int) -> str:
    """The target of the symlink that made an O_NOFOLLOW open fail; else that error."""
    if error.errno in (errno.ELOOP, errno.ENOTDIR):
        with contextlib.suppress(OSError):
            return os.readlink(name, dir_fd=dir_fd)
    raise error


def open_layer(path: Path) -> IO[bytes]:
    """A layer blob as a plain tar stream: gzip, zstd or uncompressed, by its magic."""
    f = open(path, "rb")  # noqa: SIM115 - returned open, the caller closes it
    magic = f.read(4)
    f.seek(0)
    if magic[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=f)  # type: ignore[return-value]
    if magic == b"\x28\xb5\x2f\xfd":
        f.close()
        return _Zstd(path)  # type: ignore[return-value]
    return f


class _Zstd(io.RawIOBase):
    """A zstd layer through Debian's zstd (Python 3.11 has no zstd module)."""

    def __init__(self, path: Path) -> None:
        try:
            self.proc = subprocess.Popen(["zstd", "-dcq", "--", str(path)],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE)
        except FileNotFoundError:
            raise KataError("zstd-compressed layer: install zstd (apt-get install zstd)") \
                from None
        assert self.proc.stdout is not None
        self.out = self.proc.stdout

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self.out.read(len(b))
        b[:len(data)] = data
        if not data and self.proc.wait() != 0:
            assert self.proc.stderr is not None
            why = self.proc.stderr.read().decode(errors="replace").strip().splitlines()
            raise KataError(f"broken zstd layer: {why[-1] if why else 'zstd failed'}")
        return len(data)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.out.close()
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        super().close()


def unpack(layer: IO[bytes], dest: Path) -> None:
    """Extract one layer's tar stream into the (new, empty) directory dest."""
    root_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        with tarfile.open(fileobj=layer, mode="r|*") as tar:
            for member in tar:
                _extract(tar, member, root_fd)
    except (tarfile.TarError, EOFError, OSError, gzip.BadGzipFile) as e:
        if isinstance(e, KataError):
            raise
        raise KataError(f"broken layer: {e}") from None
    finally:
        os.close(root_fd)


def _extract(tar: tarfile.TarFile, m: tarfile.TarInfo, root_fd: int) -> None:
    parts = _split(m.name)
    if not parts:
        return
    *parents, base = parts
    dir_fd = open_dir(root_fd, parents, create=True)
    try:
        if base == OPAQUE:
            os.setxattr(f"/proc/self/fd/{dir_fd}", "trusted.overlay.opaque", b"y")
            return
        if base.startswith(WHITEOUT):
            target = base[len(WHITEOUT):]
            remove(dir_fd, target)
            os.mknod(target, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=dir_fd)
            return
        if m.isdir():
            with contextlib.suppress(FileExistsError):
                os.mkdir(base, 0o700, dir_fd=dir_fd)
            fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
            try:
                _attrs(fd, m)
            finally:
                os.close(fd)
            return
        remove(dir_fd, base)  # a later entry replaces an earlier one
        if m.isreg():
            fd = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600,
                         dir_fd=dir_fd)
            try:
                src = tar.extractfile(m)
                assert src is not None
                while chunk := src.read(1 << 20):
                    os.write(fd, chunk)
                _attrs(fd, m)
            finally:
                os.close(fd)
        elif m.issym():
            os.symlink(m.linkname, base, dir_fd=dir_fd)
            os.chown(base, m.uid, m.gid, dir_fd=dir_fd, follow_symlinks=False)
        elif m.islnk():
            *lparents, lbase = _split(m.linkname) or [""]
            if not lbase:
                raise HostileLayer(f"hard link to nothing: {m.name!r}")
            src_dir = open_dir(root_fd, lparents, create=False)
            try:
                # The target must be inside the layer, and not a symlink out.
                os.link(lbase, base, src_dir_fd=src_dir, dst_dir_fd=dir_fd,
                        follow_symlinks=False)
            except FileNotFoundError:
                raise HostileLayer(f"hard link {m.name!r} to a file outside the layer: "
                                   f"{m.linkname!r}") from None
            finally:
                os.close(src_dir)
        elif m.ischr() or m.isblk() or m.isfifo():
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK if m.isblk() else stat.S_IFIFO
            os.mknod(base, kind | (m.mode & 0o7777), os.makedev(m.devmajor, m.devminor),
                     dir_fd=dir_fd)
            os.chown(base, m.uid, m.gid, dir_fd=dir_fd, follow_symlinks=False)
            os.chmod(base, m.mode & 0o7777, dir_fd=dir_fd)
        else:
            raise HostileLayer(f"unsupported entry type in layer: {m.name!r}")
    finally:
        os.close(dir_fd)


def _attrs(fd: int, m: tarfile.TarInfo) -> None:
    """Owner, mode (after chown, which clears set-id bits), xattrs, mtime."""
    os.fchown(fd, m.uid, m.gid)
    os.fchmod(fd, m.mode & 0o7777)
    for key, value in (m.pax_headers or {}).items():
        if key.startswith("SCHILY.xattr."):
            name = key[len("SCHILY.xattr."):]
            with contextlib.suppress(OSError):
                os.setxattr(fd, name, value.encode("utf-8", "surrogateescape"))
    os.utime(fd, (m.mtime, m.mtime))
