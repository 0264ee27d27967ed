"""One cgroup v2 per container in the guest: freezer, stats, limits.

/sys/fs/cgroup/kata-py/<container id>; the parent holds no processes, so it
may delegate controllers to its children.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

from microvm import linux
from microvm.protocol import agent_pb2, ttrpc

log = logging.getLogger("agent")

ROOT = "/sys/fs/cgroup"
PARENT = f"{ROOT}/kata-py"
CONTROLLERS = ("cpuset", "cpu", "memory", "pids")
# cgroup v2 controls devices only through BPF programs; the v1 devices
# controller, on a hierarchy of its own beside v2, takes runc's rules as text.
DEVICES = "/run/kata-py/devices"
DEVICES_PARENT = f"{DEVICES}/kata-py"


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def setup() -> None:
    """Enable the controllers down to kata-py/ (at boot)."""
    os.makedirs(PARENT, exist_ok=True)
    for level in (ROOT, PARENT):
        for c in CONTROLLERS:
            try:
                _write(f"{level}/cgroup.subtree_control", f"+{c}")
            except OSError as e:
                log.warning("cgroup controller %s at %s: %s", c, level, e)
    try:
        os.makedirs(DEVICES, exist_ok=True)
        linux.mount("cgroup", DEVICES, "cgroup",
                    linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC, "devices")
        os.makedirs(DEVICES_PARENT, exist_ok=True)
    except OSError as e:
        log.warning("devices cgroup: %s", e)


def _device_rule(rule: agent_pb2.DeviceRule) -> str:
    # The host checked the spec; the kernel refuses anything else (EINVAL).
    major = "*" if rule.major < 0 else str(rule.major)
    minor = "*" if rule.minor < 0 else str(rule.minor)
    return f"{rule.type} {major}:{minor} {rule.access}"


def path(cid: str) -> str:
    return f"{PARENT}/{cid}"


def create(cid: str, devices: list[agent_pb2.DeviceRule] | None = None) -> str:
    """The container's cgroup; with device rules, its devices cgroup too."""
    p = path(cid)
    os.makedirs(p, exist_ok=True)
    if devices:
        d = f"{DEVICES_PARENT}/{cid}"
        try:
            os.makedirs(d, exist_ok=True)
            # In order, as runc's v1 manager writes them: the first rule is
            # usually "deny all", then the exceptions.
            for rule in devices:
                _write(f"{d}/devices.{'allow' if rule.allow else 'deny'}", _device_rule(rule))
        except OSError as e:
            raise ttrpc.InvalidArgument(f"device rules: {e.strerror}") from None
    return p


def join(cgroup: str) -> None:
    """Move the caller (a child before it forks the process) into cgroup,
    and into its devices cgroup where it has one."""
    _write(f"{cgroup}/cgroup.procs", "0")
    devices = f"{DEVICES_PARENT}/{os.path.basename(cgroup)}"
    if os.path.isdir(devices):
        _write(f"{devices}/cgroup.procs", "0")


async def remove(cid: str) -> None:
    # The last processes may take a moment to leave after they are reaped.
    for p in (path(cid), f"{DEVICES_PARENT}/{cid}"):
        for _ in range(50):
            try:
                os.rmdir(p)
                break
            except FileNotFoundError:
                break
            except OSError:
                await asyncio.sleep(0.02)
        else:
            log.warning("cgroup %s not removed", p)


def signal_all(cid: str, sig: int) -> None:
    """runc's kill --all: sig to every process in the container's cgroup and
    those below it.  SIGKILL through cgroup.kill, which no fork escapes."""
    top = path(cid)
    if sig == signal.SIGKILL:
        with contextlib.suppress(FileNotFoundError):
            _write(f"{top}/cgroup.kill", "1")
        return
    for d, _, _ in os.walk(top):
        with contextlib.suppress(FileNotFoundError):
            for pid in _read(f"{d}/cgroup.procs").split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), sig)


async def freeze(cid: str, frozen: bool) -> None:
    p = path(cid)
    _write(f"{p}/cgroup.freeze", "1" if frozen else "0")
    want = f"frozen {int(frozen)}"
    for _ in range(250):
        if want in _read(f"{p}/cgroup.events").splitlines():
            return
        await asyncio.sleep(0.02)
    raise ttrpc.FailedPrecondition(f"container {cid} did not {'freeze' if frozen else 'thaw'}")


def _keyed(p: str) -> dict[str, int]:
    out = {}
    with contextlib.suppress(OSError):
        for line in _read(p).splitlines():
            key, _, value = line.partition(" ")
            if value.strip().isdigit():
                out[key] = int(value)
    return out


def _number(p: str) -> int:
    """A single-value file; 0 for "max" or a missing file."""
    try:
        value = _read(p).strip()
    except OSError:
        return 0
    return int(value) if value.isdigit() else 0


def stats(cid: str) -> agent_pb2.CgroupStats:
    p = path(cid)
    return agent_pb2.CgroupStats(
        cpu_stat=_keyed(f"{p}/cpu.stat"), memory_stat=_keyed(f"{p}/memory.stat"),
        memory_events=_keyed(f"{p}/memory.events"),
        memory_current=_number(f"{p}/memory.current"), memory_max=_number(f"{p}/memory.max"),
        swap_current=_number(f"{p}/memory.swap.current"),
        swap_max=_number(f"{p}/memory.swap.max"),
        pids_current=_number(f"{p}/pids.current"), pids_max=_number(f"{p}/pids.max"))


def update(req: agent_pb2.UpdateContainerRequest) -> None:
    p = path(req.container_id)
    files = [("cpu_max", "cpu.max"), ("memory_max", "memory.max"), ("pids_max", "pids.max"),
             ("cpuset_cpus", "cpuset.cpus")]
    try:
        if req.HasField("cpu_weight"):
            _write(f"{p}/cpu.weight", str(req.cpu_weight))
        for field, name in files:
            if req.HasField(field):  # type: ignore[arg-type]
                _write(f"{p}/{name}", getattr(req, field))
    except OSError as e:
        raise ttrpc.InvalidArgument(f"cgroup update: {e.strerror}") from None


def oom_kills(cid: str) -> int:
    return _keyed(f"{path(cid)}/memory.events").get("oom_kill", 0)
