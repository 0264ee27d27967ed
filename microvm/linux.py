"""Linux system calls Python 3.11's os module lacks, through libc.

Shared by the host (mount namespaces) and the guest agent
(container set-up), so it imports nothing heavy.
"""

from __future__ import annotations

import ctypes
import os

# By soname: ctypes.util.find_library would run ldconfig, slow under emulation.
_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]
_libc.syscall.restype = ctypes.c_long
_libc.linkat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                         ctypes.c_int]

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20

MNT_DETACH = 2
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

PR_SET_PDEATHSIG = 1
PR_SET_KEEPCAPS = 8
PR_SET_SECCOMP = 22
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4
SECCOMP_MODE_FILTER = 2
_SYS_CAPSET = 126
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38

_SYS_PIVOT_ROOT = 155  # x86_64
_SYS_REBOOT = 169
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442
_OPEN_TREE_CLONE = 1
_AT_RECURSIVE = 0x8000
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
LINUX_REBOOT_CMD_POWER_OFF = 0x4321FEDC
LINUX_REBOOT_CMD_RESTART = 0x01234567


def _check(ret: int, what: str) -> None:
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _b(s: str | None) -> bytes | None:
    return None if s is None else os.fsencode(s)


def mount(source: str | None, target: str, fstype: str | None = None, flags: int = 0,
          data: str | None = None) -> None:
    _check(_libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)),
           f"mount {source or fstype} on {target}")


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def bind_tree(source: str, target: str, readonly: bool = False, private: bool = False) -> None:
    """Bind source (and every mount below it) on target, with its flags and
    propagation set before the tree is attached.

    readonly: read-only, nosuid and nodev from the first instant.  A bind
    remounted read-only afterwards is not enough: the remount changes only
    this namespace's copy, while copies already propagated to a peer or slave
    (virtiofsd's own mount namespace) stay writable.
    private: cut from the source's propagation (mounts made under source on
    the host later do not appear).  Made private after attaching, the copies
    already propagated would pass to the source's master instead.

    So the tree is cloned detached, changed, and only then attached: every
    copy the kernel propagates is cloned from the finished mount (Linux 5.12).
    """
    # syscall() is variadic: pass every number as a long, as the kernel reads it.
    long = ctypes.c_long
    fd = _libc.syscall(long(_SYS_OPEN_TREE), long(_AT_FDCWD), _b(source),
                       long(_OPEN_TREE_CLONE | os.O_CLOEXEC | _AT_RECURSIVE))
    _check(fd, f"open_tree {source}")
    try:
        attr = _MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV
                          if readonly else 0, 0, MS_PRIVATE if private else 0, 0)
        if readonly or private:
            _check(_libc.syscall(long(_SYS_MOUNT_SETATTR), long(fd), b"",
                                 long(_AT_EMPTY_PATH | _AT_RECURSIVE), ctypes.byref(attr),
                                 long(ctypes.sizeof(attr))),
                   f"mount_setattr {source}")
        _check(_libc.syscall(long(_SYS_MOVE_MOUNT), long(fd), b"", long(_AT_FDCWD), _b(target),
                             long(_MOVE_MOUNT_F_EMPTY_PATH)), f"move_mount {source} to {target}")
    finally:
        os.close(fd)


def mount_api_usable() -> bool:
    """Whether bind_tree can work here (open_tree, mount_setattr: 5.12)."""
    ret = _libc.syscall(ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_long(-1), b"",
                        ctypes.c_long(0), None, ctypes.c_long(0))
    return not (ret < 0 and ctypes.get_errno() == 38)  # ENOSYS


def link_fd(fd: int, path: str) -> None:
    """Give an O_TMPFILE file a name (linkat with AT_EMPTY_PATH: root's right)."""
    _check(_libc.linkat(fd, b"", _AT_FDCWD, _b(path), _AT_EMPTY_PATH), f"link {path}")


def umount(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_b(target), flags), f"umount {target}")


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int = 0) -> None:
    _check(_libc.setns(fd, nstype), "setns")


def pivot_root(new_root: str, put_old: str) -> None:
    _check(_libc.syscall(_SYS_PIVOT_ROOT, _b(new_root), _b(put_old)), "pivot_root")


def prctl(option: int, arg2: int = 0) -> None:
    _check(_libc.prctl(option, arg2, 0, 0, 0), "prctl")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def capset(effective: int, permitted: int, inheritable: int) -> None:
    """The calling thread's three sets, as 64-bit masks (two 32-bit words)."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)(*[_CapData((effective >> s) & 0xFFFFFFFF, (permitted >> s) & 0xFFFFFFFF,
                                     (inheritable >> s) & 0xFFFFFFFF) for s in (0, 32)])
    _check(_libc.syscall(ctypes.c_long(_SYS_CAPSET), ctypes.byref(header), data), "capset")


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def seccomp_filter(program: bytes) -> None:
    """Install a classic BPF seccomp program (struct sock_filter[], 8 bytes
    each); the caller needs no_new_privs or CAP_SYS_ADMIN."""
    if not program or len(program) % 8 or len(program) // 8 > 0xFFFF:
        raise OSError(22, "seccomp: malformed BPF program")
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.addressof(buf))
    _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(prog), 0, 0),
           "seccomp")


def prctl2(option: int, arg2: int, arg3: int) -> None:
    _check(_libc.prctl(option, arg2, arg3, 0, 0), "prctl")


def reboot(cmd: int) -> None:
    # magic1, magic2 as reboot(2) wants them
    _check(_libc.syscall(_SYS_REBOOT, 0xFEE1DEAD, 672274793, cmd, None), "reboot")

