"""Linux capabilities by name, and docker's rules for choosing them.

Shared by the host (the CLI's --cap-add/--cap-drop, OCI specs) and the
guest agent (capset), so it imports nothing.
"""

from __future__ import annotations

# linux/capability.h, as of Linux 6.1 (CAP_LAST_CAP = 40).
_ORDER = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID",
    "SETUID", "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST",
    "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO",
    "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
    "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE",
    "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM",
    "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE",
)
NUMBERS = {f"CAP_{name}": n for n, name in enumerate(_ORDER)}
ALL = tuple(NUMBERS)

# What docker (and containerd's default spec) gives a container.
DEFAULT = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
)


def normalize(name: str) -> str:
    """docker's spelling rules: any case, CAP_ optional; ValueError if unknown."""
    full = name.upper() if name.upper().startswith("CAP_") else f"CAP_{name.upper()}"
    if full not in NUMBERS:
        raise ValueError(f"unknown capability {name!r}")
    return full


def choose(privileged: bool = False, add: tuple[str, ...] = (),
           drop: tuple[str, ...] = ()) -> list[str]:
    """docker run's set: the default (or all with --privileged), then
    --cap-add, then --cap-drop, each taking ALL."""
    caps = set(ALL if privileged else DEFAULT)
    for name in add:
        caps |= set(ALL) if name.upper() == "ALL" else {normalize(name)}
    for name in drop:
        caps -= set(ALL) if name.upper() == "ALL" else {normalize(name)}
    return sorted(caps, key=NUMBERS.__getitem__)


def mask(names: list[str]) -> int:
    """The kernel's bit mask; ValueError on an unknown name."""
    bits = 0
    for name in names:
        if name not in NUMBERS:
            raise ValueError(f"unknown capability {name!r}")
        bits |= 1 << NUMBERS[name]
    return bits
