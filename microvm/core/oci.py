"""OCI runtime specs (from containerd's bundles) into the agent's schema.

Specs come from outside: every field is type-checked, and a bad one is an
InvalidArgument that names it, never a traceback.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from microvm import capabilities, linux
from microvm.core import seccomp
from microvm.core.volumes import Volume, from_oci
from microvm.protocol import CRI_SANDBOX_ID, agent_pb2, ttrpc

# containerd's parseMountOptions: these words are flags, the rest is data.
_FLAGS = {
    "bind": (False, linux.MS_BIND), "rbind": (False, linux.MS_BIND | linux.MS_REC),
    "ro": (False, linux.MS_RDONLY), "rw": (True, linux.MS_RDONLY),
    "nosuid": (False, linux.MS_NOSUID), "suid": (True, linux.MS_NOSUID),
    "nodev": (False, linux.MS_NODEV), "dev": (True, linux.MS_NODEV),
    "noexec": (False, linux.MS_NOEXEC), "exec": (True, linux.MS_NOEXEC),
    "sync": (False, 0x10), "async": (True, 0x10), "dirsync": (False, 0x80),
    "remount": (False, linux.MS_REMOUNT), "mand": (False, 0x40), "nomand": (True, 0x40),
    "noatime": (False, 0x400), "atime": (True, 0x400), "nodiratime": (False, 0x800),
    "diratime": (True, 0x800), "relatime": (False, 1 << 21), "norelatime": (True, 1 << 21),
    "strictatime": (False, 1 << 24), "nostrictatime": (True, 1 << 24), "defaults": (False, 0),
}


def mount_options(options: list[str]) -> tuple[int, str]:
    flags = 0
    data = []
    for opt in options:
        if opt in _FLAGS:
            clear, bit = _FLAGS[opt]
            flags = flags & ~bit if clear else flags | bit
        else:
            data.append(opt)
    return flags, ",".join(data)


@dataclass
class Spec:
    process: agent_pb2.Process
    hostname: str = ""
    root_path: str = "rootfs"
    root_readonly: bool = False
    annotations: dict[str, str] = field(default_factory=dict)
    # linux.resources, as JSON: applied like an Update right after create.
    resources: bytes = b""
    # linux.namespaces' network path: the namespace CNI prepared, whose veths
    # the guest takes over.  "" when the spec asks for a new (empty) one or
    # for none (the host's, which a VM can never share).
    netns: str = ""
    # linux.namespaces of these types ("ipc", "uts", "pid") name an existing
    # one to join: in a pod, the pause container's.
    joined_namespaces: tuple[str, ...] = ()
    # Every linux.namespaces type listed (new or joined): one missing is
    # shared with the host (a CRI pod's hostNetwork, hostIPC, hostPID).
    namespace_types: frozenset[str] = frozenset()
    # linux.sysctl, checked (sysctls()).
    sysctls: dict[str, str] = field(default_factory=dict)
    # The mounts the VM must be given (binds, tmpfs); proc, /dev etc. it makes.
    volumes: list[Volume] = field(default_factory=list)
    # linux.cgroupsPath: for the pod's first container, the host cgroup the
    # shim (and so QEMU and virtiofsd) joins.
    cgroups_path: str = ""
    # linux.maskedPaths, linux.readonlyPaths: applied in the guest, as runc does.
    masked_paths: list[str] = field(default_factory=list)
    readonly_paths: list[str] = field(default_factory=list)
    # linux.seccomp as BPF: the container's processes and every exec load it.
    seccomp: bytes = b""
    # linux.resources.devices: the guest's devices cgroup for the container.
    devices: list[agent_pb2.DeviceRule] = field(default_factory=list)


def _get(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str,
         default: Any = None) -> Any:
    value = obj.get(key, default)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ttrpc.InvalidArgument(f"OCI spec: {where}{key} has the wrong type")
    return value


def _strings(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ttrpc.InvalidArgument(f"OCI spec: {what} must be a list of strings")
    return list(value)


def _id(value: Any, what: str) -> int:
    # (uid_t)-1 means "unchanged" to the kernel: never an id.
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 2**32 - 2:
        raise ttrpc.InvalidArgument(f"OCI spec: {what} must be ids from 0 to {2**32 - 2}")
    return value


def process(obj: Any, where: str = "process.") -> agent_pb2.Process:
    if not isinstance(obj, dict):
        raise ttrpc.InvalidArgument(f"OCI spec: {where.rstrip('.')} must be an object")
    args = _strings(obj.get("args") or [], f"{where}args")
    if not args:
        raise ttrpc.InvalidArgument(f"OCI spec: {where}args is empty")
    user = _get(obj, "user", dict, where, {})
    size = _get(obj, "consoleSize", dict, where, {})
    rlimits = []
    for r in _get(obj, "rlimits", list, where, []):
        if not isinstance(r, dict):
            raise ttrpc.InvalidArgument(f"OCI spec: {where}rlimits entries must be objects")
        rlimits.append(agent_pb2.Rlimit(type=_get(r, "type", str, "rlimit "),
                                        hard=_get(r, "hard", int, "rlimit ", 0),
                                        soft=_get(r, "soft", int, "rlimit ", 0)))
    proc = agent_pb2.Process(
        args=args, env=_strings(obj.get("env") or [], f"{where}env"),
        cwd=_get(obj, "cwd", str, where, "/"),
        user=agent_pb2.User(uid=_id(_get(user, "uid", int, "user.", 0), "user.uid"),
                            gid=_id(_get(user, "gid", int, "user.", 0), "user.gid"),
                            additional_gids=[_id(g, "user.additionalGids") for g in _get(
                                user, "additionalGids", list, "user.", [])]),
        terminal=_get(obj, "terminal", bool, where, False),
        rows=_get(size, "height", int, "consoleSize.", 0),
        cols=_get(size, "width", int, "consoleSize.", 0),
        rlimits=rlimits, no_new_privileges=_get(obj, "noNewPrivileges", bool, where, False))
    caps = _get(obj, "capabilities", dict, where, None)
    if caps is not None:
        sets = {}
        for name in ("bounding", "effective", "inheritable", "permitted", "ambient"):
            # runc ignores names its kernel does not know (a newer spec).
            sets[name] = [c for c in _strings(caps.get(name) or [],
                                              f"{where}capabilities.{name}")
                          if c in capabilities.NUMBERS]
        proc.capabilities.CopyFrom(agent_pb2.Capabilities(**sets))
    return proc


def seccomp_program(linux_: dict[str, Any]) -> bytes:
    """linux.seccomp compiled to BPF; b"" when the spec has none."""
    profile = linux_.get("seccomp")
    if profile is None:
        return b""
    try:
        return seccomp.compile_profile(profile)
    except seccomp.ProfileError as e:
        raise ttrpc.InvalidArgument(f"OCI spec: {e}") from None


def load_bundle(bundle: Path) -> Spec:
    try:
        data = json.loads((bundle / "config.json").read_text())
    except OSError as e:
        raise ttrpc.InvalidArgument(f"bundle {bundle}: config.json: {e.strerror}") from None
    except ValueError as e:
        raise ttrpc.InvalidArgument(f"bundle {bundle}: config.json is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise ttrpc.InvalidArgument("OCI spec: not an object")
    root = _get(data, "root", dict, "", {})
    annotations = _get(data, "annotations", dict, "", {})
    linux_ = _get(data, "linux", dict, "", {})
    try:
        volumes = from_oci(_get(data, "mounts", list, "", []))
    except ValueError as e:
        raise ttrpc.InvalidArgument(f"OCI spec: {e}") from None
    namespaces = _get(linux_, "namespaces", list, "linux.", [])
    program = seccomp_program(linux_)
    proc = process(data.get("process"))
    proc.seccomp = program
    return Spec(
        volumes=volumes, cgroups_path=_get(linux_, "cgroupsPath", str, "linux.", ""),
        netns=network_namespace(namespaces), joined_namespaces=joined_namespaces(namespaces),
        namespace_types=frozenset(_namespace_paths(namespaces)),
        sysctls=sysctls(_get(linux_, "sysctl", dict, "linux.", {})),
        process=proc, hostname=_get(data, "hostname", str, "", ""),
        root_path=_get(root, "path", str, "root.", "rootfs"),
        root_readonly=_get(root, "readonly", bool, "root.", False),
        annotations={str(k): str(v) for k, v in annotations.items()},
        resources=json.dumps(_get(linux_, "resources", dict, "linux.", {})).encode(),
        masked_paths=_paths(linux_, "maskedPaths"), readonly_paths=_paths(linux_, "readonlyPaths"),
        seccomp=program,
        devices=device_rules(_get(_get(linux_, "resources", dict, "linux.", {}), "devices", list,
                                  "linux.resources.", [])))


def device_rules(entries: list[Any]) -> list[agent_pb2.DeviceRule]:
    out = []
    for i, d in enumerate(entries):
        where = f"linux.resources.devices[{i}]."
        if not isinstance(d, dict):
            raise ttrpc.InvalidArgument(f"OCI spec: {where.rstrip('.')} must be an object")
        rule = agent_pb2.DeviceRule(
            allow=_get(d, "allow", bool, where, False), type=_get(d, "type", str, where, "a"),
            major=_get(d, "major", int, where, -1), minor=_get(d, "minor", int, where, -1),
            access=_get(d, "access", str, where, "rwm"))
        if rule.type not in ("a", "c", "b") or not rule.access or \
                not set(rule.access) <= set("rwm"):
            raise ttrpc.InvalidArgument(f"OCI spec: {where}type must be a, c or b and access "
                                        "letters of rwm")
        out.append(rule)
    return out + _rules(RUNC_ALLOWED_DEVICES) if out else []


def _paths(linux_: dict[str, Any], key: str) -> list[str]:
    paths = _strings(_get(linux_, key, list, "linux.", []), f"linux.{key}")
    if not all(p.startswith("/") for p in paths):
        raise ttrpc.InvalidArgument(f"OCI spec: linux.{key} must be absolute paths")
    return paths


def _namespace_paths(namespaces: list[Any]) -> dict[str, str]:
    """linux.namespaces as type -> path ("" for a new one)."""
    out = {}
    for i, ns in enumerate(namespaces):
        if not isinstance(ns, dict):
            raise ttrpc.InvalidArgument(f"OCI spec: linux.namespaces[{i}] is not an object")
        kind = _get(ns, "type", str, f"linux.namespaces[{i}].", "")
        out[kind] = str(_get(ns, "path", str, f"linux.namespaces[{i}].", ""))
    return out


def network_namespace(namespaces: list[Any]) -> str:
    return _namespace_paths(namespaces).get("network", "")


def joined_namespaces(namespaces: list[Any]) -> tuple[str, ...]:
    """The guest-side namespaces the spec joins.  Their host paths name the
    pause task, whose pid here is QEMU's: in the guest they mean the pod's
    first container."""
    paths = _namespace_paths(namespaces)
    return tuple(kind for kind in ("ipc", "uts", "pid") if paths.get(kind))


def read_bundle_linux(bundle: Path) -> tuple[str, str]:
    """The network namespace and cgroupsPath only (for clean-up), tolerant of a bad spec."""
    try:
        linux_ = json.loads((bundle / "config.json").read_text())["linux"]
    except (OSError, ValueError, KeyError, TypeError):
        return "", ""
    netns = ""
    with contextlib.suppress(ValueError, KeyError, TypeError, ttrpc.RpcError):
        netns = network_namespace(linux_["namespaces"])
    cgroups = linux_.get("cgroupsPath") if isinstance(linux_, dict) else ""
    return netns, cgroups if isinstance(cgroups, str) else ""


# CRI's name for the pod: the pause container's id, on every container of it.
SANDBOX_ID = CRI_SANDBOX_ID

# Pod-level resources that containerd's CRI (1.7+) puts on the sandbox spec.
SANDBOX_CPU_QUOTA = "io.kubernetes.cri.sandbox-cpu-quota"
SANDBOX_CPU_PERIOD = "io.kubernetes.cri.sandbox-cpu-period"
SANDBOX_MEMORY = "io.kubernetes.cri.sandbox-memory"


def pod_size(annotations: dict[str, str], vcpus: int, memory_mib: int,
             max_vcpus: int, max_memory_mib: int) -> tuple[int, int]:
    """The pod VM's vCPUs and MiB: the configured ones are the floor; a pod's
    CPU limit adds up to whole vCPUs, its memory limit comes on top of the
    guest's own (agent, kernel), as Kata sizes it.  Never above the maxima."""
    def number(key: str) -> int:
        value = annotations.get(key, "")
        try:
            return max(int(value), 0) if value else 0
        except ValueError:
            raise ttrpc.InvalidArgument(f"annotation {key}: not a number: {value!r}") from None

    quota, period, memory = number(SANDBOX_CPU_QUOTA), number(SANDBOX_CPU_PERIOD), \
        number(SANDBOX_MEMORY)
    if quota and period:
        vcpus = max(vcpus, -(-quota // period))
    if memory:
        memory_mib += -(-memory // (1 << 20))
    return min(vcpus, max_vcpus), min(memory_mib, max_memory_mib)


# What docker masks and makes read-only in a container that is not
# --privileged (containerd's default spec has the same lists).
DEFAULT_MASKED_PATHS = (
    "/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
    "/sys/firmware", "/sys/devices/virtual/powercap",
)
DEFAULT_READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                          "/proc/sysrq-trigger")


@dataclass(frozen=True)
class Privileges:
    """docker run's --privileged, --cap-add and --cap-drop, as the OCI
    fields both front ends hand on."""

    privileged: bool = False
    cap_add: tuple[str, ...] = ()
    cap_drop: tuple[str, ...] = ()

    def capabilities(self) -> agent_pb2.Capabilities:
        """Raises ValueError on an unknown name.  Inheritable and ambient stay
        empty, as docker has them since CVE-2022-24769."""
        caps = capabilities.choose(self.privileged, self.cap_add, self.cap_drop)
        return agent_pb2.Capabilities(bounding=caps, effective=caps, permitted=caps)

    @property
    def masked_paths(self) -> tuple[str, ...]:
        return () if self.privileged else DEFAULT_MASKED_PATHS

    @property
    def readonly_paths(self) -> tuple[str, ...]:
        return () if self.privileged else DEFAULT_READONLY_PATHS

    @property
    def devices(self) -> list[agent_pb2.DeviceRule]:
        return _rules(((True, "a", -1, -1, "rwm"),) if self.privileged else DEFAULT_DEVICES)


def device_json(rule: agent_pb2.DeviceRule) -> dict[str, Any]:
    """A rule as an OCI spec has it (linux.resources.devices)."""
    out: dict[str, Any] = {"allow": rule.allow, "type": rule.type, "access": rule.access}
    out.update({k: v for k, v in (("major", rule.major), ("minor", rule.minor)) if v >= 0})
    return out


# What runc allows after a spec's own device rules, whatever they say:
# mknod of anything, and the nodes every container's /dev has.
RUNC_ALLOWED_DEVICES = (
    (True, "c", -1, -1, "m"), (True, "b", -1, -1, "m"),
    (True, "c", 1, 3, "rwm"), (True, "c", 1, 5, "rwm"), (True, "c", 1, 7, "rwm"),
    (True, "c", 1, 8, "rwm"), (True, "c", 1, 9, "rwm"), (True, "c", 5, 0, "rwm"),
    (True, "c", 5, 2, "rwm"), (True, "c", 136, -1, "rwm"), (True, "c", 10, 200, "rwm"),
)
# docker's default: no device but those.
DEFAULT_DEVICES = ((False, "a", -1, -1, "rwm"), *RUNC_ALLOWED_DEVICES)


def _rules(rows: tuple[tuple[bool, str, int, int, str], ...]) -> list[agent_pb2.DeviceRule]:
    return [agent_pb2.DeviceRule(allow=allow, type=t, major=major, minor=minor, access=access)
            for allow, t, major, minor, access in rows]


# What a VM cannot share with the node, by the namespace a CRI pod's sandbox
# leaves out of its spec to share the node's.
HOST_NAMESPACES = {
    "network": "hostNetwork: the pod's VM has a network of its own; its listeners "
               "cannot be on the node's",
    "ipc": "hostIPC: the pod's VM has its own kernel, whose IPC cannot be the node's",
}
CRI_CONTAINER_TYPE = "io.kubernetes.cri.container-type"


def host_namespace_refusal(spec: Spec) -> str:
    """Why kata-py refuses this pod sandbox ("" if it does not): one line
    naming the pod field, as Kata refuses hostNetwork."""
    if spec.annotations.get(CRI_CONTAINER_TYPE) != "sandbox":
        return ""
    for kind, why in HOST_NAMESPACES.items():
        if kind not in spec.namespace_types:
            return f"kata-py cannot run a pod with {why} (use another RuntimeClass for it)"
    return ""


_SYSCTL = re.compile(r"[a-z0-9_]+(\.[a-zA-Z0-9_-]+)+")


def sysctls(raw: dict[Any, Any]) -> dict[str, str]:
    """linux.sysctl as names and values the guest may write under
    /proc/sys: a name is dotted words (no '/', no '..'), a value one line."""
    out = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not _SYSCTL.fullmatch(key) or len(key) > 256:
            raise ttrpc.InvalidArgument("OCI spec: linux.sysctl: a name is not a sysctl "
                                        "(dotted words, as net.ipv4.ip_forward)")
        if not isinstance(value, str) or "\n" in value or len(value) > 4096:
            raise ttrpc.InvalidArgument(f"OCI spec: linux.sysctl: {key}: the value must be "
                                        "one line of text")
        out[key] = value
    return out
