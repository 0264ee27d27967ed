"""One cgroup v2 per container in the guest: freezer, stats, limits.

/sys/fs/cgroup/kata-py/<container id>; the parent holds no processes, so it
may delegate controllers to its children.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from microvm.protocol import agent_pb2, ttrpc

log = logging.getLogger("agent")

ROOT = "/sys/fs/cgroup"
PARENT = f"{ROOT}/kata-py"
CONTROLLERS = ("cpuset", "cpu", "memory", "pids")


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


def path(cid: str) -> str:
    return f"{PARENT}/{cid}"


def create(cid: str) -> str:
    p = path(cid)
    os.makedirs(p, exist_ok=True)
    return p


def join(cgroup: str) -> None:
    """Move the caller (a child before it forks the process) into cgroup."""
    _write(f"{cgroup}/cgroup.procs", "0")


async def remove(cid: str) -> None:
    # The last processes may take a moment to leave after they are reaped.
    for _ in range(50):
        try:
            os.rmdir(path(cid))
            return
        except FileNotFoundError:
            return
        except OSError:
            await asyncio.sleep(0.02)
    log.warning("cgroup of %s not removed", cid)


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
