"""What a container mounts besides its root: docker's `-v`, and the bind
and tmpfs mounts of an OCI spec (CRI's /etc/hosts, emptyDir, hostPath,
ConfigMap and Secret volumes).  The sandbox shares bind sources into the VM;
proc, sysfs, /dev and the like the guest makes itself."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from microvm.errors import KataError

# Made by the guest for every container; a spec's own entries for them are
# runc's business, not ours.
GUEST_MADE = {"/proc", "/sys", "/dev", "/dev/pts", "/dev/mqueue", "/sys/fs/cgroup"}
# -v may not cover these or anything under them: a bind over /proc/sys or
# /sys/fs/cgroup would hand the container the kernel's knobs to a host file.
# (A spec's binds under /dev, such as Kubernetes' /dev/termination-log, stay.)
RESERVED = ("/proc", "/sys", "/dev")
# A spec may mount inside /proc only where runc lets it (checkProcMount):
# lxcfs-style files, never /proc/sys or /proc/sysrq-trigger.
PROC_ALLOWED = {"/proc/cpuinfo", "/proc/diskstats", "/proc/meminfo", "/proc/stat",
                "/proc/swaps", "/proc/uptime", "/proc/loadavg", "/proc/slabinfo",
                "/proc/net/dev", "/proc/sys/kernel/ns_last_pid"}


# OCI's propagation options, as kata-py applies them to the whole bound tree
# (a VM's mounts cannot flow back to the host: shared acts as slave).
PROPAGATION = {"private": "private", "rprivate": "private", "slave": "slave",
               "rslave": "slave", "shared": "shared", "rshared": "shared"}


@dataclass(frozen=True)
class Volume:
    destination: str
    source: str = ""           # bind: the host path
    kind: str = "bind"         # or "tmpfs"
    readonly: bool = False
    options: tuple[str, ...] = ()
    # bind: whether mounts made under source on the host later appear in
    # the container: "private" (no), "slave" or "shared" (yes).
    propagation: str = "private"


def parse_volume(spec: str) -> Volume:
    """-v HOST:CONTAINER[:OPTIONS], OPTIONS as docker's: ro or rw, and a
    propagation (rprivate, the default; rslave, rshared...), comma-separated.
    The host directory is made if missing, as docker does."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not all(parts[:2]):
        raise KataError(f"invalid -v {spec!r}: expected /HOST/PATH:/CONTAINER/PATH[:ro|rw]")
    source, dest = parts[0], parts[1]
    options = parts[2].split(",") if len(parts) == 3 else []
    if not source.startswith("/"):
        raise KataError(f"-v {spec!r}: named volumes are not supported; give an absolute "
                        "host path")
    if not dest.startswith("/") or dest == "/":
        raise KataError(f"-v {spec!r}: the container path must be absolute (and not /)")
    # normpath keeps a leading "//"; the container's kernel would not.
    dest = os.path.normpath("/" + dest.lstrip("/"))
    if dest == "/":
        raise KataError(f"-v {spec!r}: the container path must be absolute (and not /)")
    if any(dest == r or dest.startswith(r + "/") for r in RESERVED):
        raise KataError(f"-v {spec!r}: invalid mount destination: it can't be {dest} "
                        "(/proc, /sys and /dev are the kernel's)")
    unknown = [o for o in options if o not in ("ro", "rw", *PROPAGATION)]
    if unknown or len(options) != len(set(options)):
        raise KataError(f"-v {spec!r}: unknown option {(unknown or options)[0]!r} "
                        f"(ro or rw, and one of {', '.join(PROPAGATION)})")
    propagation = [PROPAGATION[o] for o in options if o in PROPAGATION]
    if not os.path.exists(source):
        os.makedirs(source, exist_ok=True)
    return Volume(dest, os.path.realpath(source), "bind", "ro" in options,
                  propagation=propagation[-1] if propagation else "private")


def from_oci(mounts: list[Any]) -> list[Volume]:
    """The spec's mounts that the VM must be given (raises ValueError with the
    field's name on a malformed entry)."""
    out = []
    for i, m in enumerate(mounts):
        where = f"mounts[{i}]"
        if not isinstance(m, dict):
            raise ValueError(f"{where} is not an object")
        dest, kind = m.get("destination"), m.get("type") or ""
        options = m.get("options") or []
        if not isinstance(dest, str) or not dest.startswith("/"):
            raise ValueError(f"{where}.destination must be an absolute path")
        if not isinstance(kind, str) or not isinstance(options, list) or \
                not all(isinstance(o, str) for o in options):
            raise ValueError(f"{where}: type must be a string and options a list of strings")
        dest = os.path.normpath("/" + dest.lstrip("/"))
        if dest in GUEST_MADE:
            continue
        if dest.startswith("/proc/") and dest not in PROC_ALLOWED:
            raise ValueError(f"{where}.destination {dest} cannot be mounted: it is inside "
                             "/proc")
        readonly = "ro" in options
        if kind == "bind" or "bind" in options or "rbind" in options:
            source = m.get("source")
            if not isinstance(source, str) or not source.startswith("/"):
                raise ValueError(f"{where}.source must be an absolute path")
            # None given: runc leaves the bind as the container's root
            # propagation made it, rslave unless the spec says otherwise.
            propagation = [PROPAGATION[o] for o in options if o in PROPAGATION]
            out.append(Volume(dest, source, "bind", readonly,
                              propagation=propagation[-1] if propagation else "slave"))
        elif kind == "tmpfs":
            data = tuple(o for o in options if "=" in o)  # size=, mode=: the rest are flags
            out.append(Volume(dest, "", "tmpfs", readonly, data))
    return out
