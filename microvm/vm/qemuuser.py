"""Whom QEMU runs as: never root unless the config says so.

QEMU is the part of kata-py a guest talks to directly (its devices), so it
gets the least: every fd it needs (taps, sockets, QMP, /dev/vhost-vsock) is
opened by the owner and passed in, and it then runs as

  dynamic  a uid of its own, DYNAMIC_UID_BASE + its pid, with the same gid.
           The pid makes it unique among live VMs with no bookkeeping, so
           one VM's QEMU cannot signal or ptrace another's; it owns no file.
  NAME     an existing user (or a number): its uid and primary gid.
  root     as before; for debugging only.

With KVM it also gets /dev/kvm's group, to open the device.  The switch
happens before exec (helpers.wrapper), so QEMU starts with no capabilities
at all (QEMU's own -runas would drop them only after initialisation).
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass

from microvm.errors import ConfigError

DYNAMIC_UID_BASE = 0x7F000000  # above systemd's container ranges; + a pid (< 2^22)


@dataclass(frozen=True)
class Credentials:
    uid: int                  # -1: dynamic
    gid: int                  # -1: the uid's number
    groups: tuple[int, ...] = ()


def _kvm_group(dev: str = "/dev/kvm") -> tuple[int, ...]:
    """The group that may open /dev/kvm; never root's (that would hand QEMU
    every root-group file)."""
    try:
        st = os.stat(dev)
    except OSError:
        return ()  # QEMU then says what it cannot open
    if st.st_mode & 0o006 == 0o006:
        return ()  # open to everyone
    if st.st_gid != 0 and st.st_mode & 0o060 == 0o060:
        return (st.st_gid,)
    raise ConfigError(f"{dev} (mode {st.st_mode & 0o777:o}, group {st.st_gid}) cannot be "
                      "opened by an unprivileged QEMU: give it a kvm group with rw "
                      "(udev does on most distributions), or set qemu_user: root")


def resolve(setting: str, accel: str) -> Credentials | None:
    """The config's qemu_user; None for root."""
    if setting == "root":
        return None
    groups: tuple[int, ...] = ()
    if accel == "kvm":
        groups = _kvm_group()
    if setting == "dynamic":
        return Credentials(-1, -1, groups)
    try:
        pw = pwd.getpwuid(int(setting)) if setting.isdigit() else pwd.getpwnam(setting)
    except (KeyError, OverflowError):
        raise ConfigError(f"qemu_user {setting!r}: no such user (use dynamic, root or "
                          "an existing user)") from None
    if pw.pw_uid == 0:
        return None
    return Credentials(pw.pw_uid, pw.pw_gid, groups)
