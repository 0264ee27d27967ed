"""Root file systems given on the command line: a directory, or a built-in one.

`busybox` is built from Debian's busybox-static the first time it is used,
so `microvm run busybox ...` needs nothing else.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from microvm import paths
from microvm.errors import KataError
from microvm.images.unpack import open_inside

BUSYBOX = "/bin/busybox"
BUILTIN = {"busybox"}
# What docker's busybox image runs when no command is given.
DEFAULT_CMD = {"busybox": ["sh"]}

_PASSWD = """root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
nobody:x:65534:65534:nobody:/home:/bin/false
"""
_GROUP = """root:x:0:
daemon:x:1:
tty:x:5:
nogroup:x:65534:
"""


def resolve(name: str) -> Path:
    if name in BUILTIN:
        return builtin(name)
    path = Path(name)
    if not path.is_dir():
        raise KataError(f"rootfs {name}: no such directory (or built-in image: "
                        f"{', '.join(sorted(BUILTIN))})")
    return path.resolve()


def builtin(name: str) -> Path:
    root = paths.private("rootfs")
    dest = root / name
    if dest.is_dir():
        return dest
    if not os.access(BUSYBOX, os.X_OK):
        raise KataError(f"{BUSYBOX} not found: apt-get install busybox-static")
    # Built aside and renamed into place: a concurrent first use or a crash
    # never sees a half-made tree.
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}-"))
    try:
        _make_busybox(tmp)
        try:
            tmp.rename(dest)
        except OSError:
            if not dest.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _make_busybox(root: Path) -> None:
    root.chmod(0o755)
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp", "root",
              "home", "var", "run"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    shutil.copy2(BUSYBOX, root / "bin/busybox")
    applets = subprocess.run([BUSYBOX, "--list-full"], check=True, capture_output=True,
                             text=True).stdout.split()
    for applet in applets:
        link = root / applet
        if not link.exists():
            link.symlink_to("/bin/busybox")
    (root / "etc/passwd").write_text(_PASSWD)
    (root / "etc/group").write_text(_GROUP)
    (root / "etc/hostname").write_text("busybox\n")


def lookup_user(rootfs: Path | list[Path], spec: str) -> tuple[int, int, list[int]]:
    """docker's -u USER[:GROUP], names looked up in the container's files.

    rootfs: a directory, or an image's layers bottom first (the topmost
    layer that has the file wins, as in the overlay the container sees).
    """
    layers = list(reversed(rootfs)) if isinstance(rootfs, list) else [rootfs]
    user, _, group = spec.partition(":")
    passwd = next((t for t in (_table(r, "etc/passwd") for r in layers) if t), {})
    groups = next((t for t in (_table(r, "etc/group") for r in layers) if t), {})
    if user.isdigit():
        uid = int(user)
        entry = next((e for e in passwd.values() if e[2] == user), None)
    elif user in passwd:
        entry = passwd[user]
        uid = int(entry[2])
    else:
        raise KataError(f"unable to find user {user}: no matching entries in passwd file")
    gid = int(entry[3]) if entry and entry[3].isdigit() else 0
    if group:
        if group.isdigit():
            gid = int(group)
        elif group in groups:
            gid = int(groups[group][2])
        else:
            raise KataError(f"unable to find group {group}: no matching entries in group file")
    # As runc: supplementary groups only in the implicit form (no :GROUP).
    name = entry[0] if entry and not group else None
    extra = sorted({int(g[2]) for g in groups.values()
                    if name and len(g) > 3 and name in g[3].split(",") and g[2].isdigit()}
                   - {gid})
    return uid, gid, extra


def _table(root: Path, name: str) -> dict[str, list[str]]:
    # The rootfs is not ours: a symlink must not make us read the host's
    # files (one out of root is refused, race-free; see unpack.open_inside).
    try:
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fd = open_inside(root_fd, name)
        finally:
            os.close(root_fd)
        with open(fd, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except (OSError, KataError):
        return {}
    rows = [line.split(":") for line in lines if line and not line.startswith("#")]
    return {r[0]: r for r in rows if len(r) >= 4}
