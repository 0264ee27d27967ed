"""Drives the Sandbox core directly, for paths the CLI does not reach yet.

Run as a subprocess (it enters a private mount namespace, which the pytest
process should not):  python sandbox_driver.py CONFIG SCENARIO
Prints one JSON object with what it saw.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys

from microvm import config
from microvm.core import mountns
from microvm.core.sandbox import Sandbox
from microvm.errors import KataError
from microvm.images import rootfs
from microvm.protocol import GUEST_BUSYBOX, agent_pb2
from microvm.vm import accel

PATH = "PATH=/usr/sbin:/usr/bin:/sbin:/bin"


def proc(*args: str, stdin: bool = False) -> agent_pb2.Process:
    return agent_pb2.Process(args=list(args), env=[PATH], cwd="/", stdin=stdin)


async def drain(sb: Sandbox, cid: str, exec_id: str = "") -> str:
    out = b""
    while chunk := await sb.read_output(cid, "stdout", exec_id):
        out += chunk
    return out.decode()


async def scenario_signals(sb: Sandbox) -> dict[str, object]:
    """SIGKILL of the init gives 137; SIGINT of an exec'd process gives 130."""
    await sb.create_container("c1", rootfs.builtin("busybox"), proc("sleep", "1000"))
    await sb.start_container("c1")
    await sb.exec_process("c1", "e1", proc("sleep", "1000"))
    await sb.signal("c1", signal.SIGINT, "e1")
    exec_status = await sb.wait("c1", "e1")
    await sb.signal("c1", signal.SIGKILL)
    init_status = await sb.wait("c1")
    return {"exec_sigint": exec_status, "init_sigkill": init_status}


async def scenario_exec(sb: Sandbox) -> dict[str, object]:
    """An exec joins the container's namespaces; its output and status come back."""
    await sb.create_container("c1", rootfs.builtin("busybox"),
                              proc("sh", "-c", "echo $$ > /tmp/init.pid; sleep 1000"))
    await sb.start_container("c1")
    await asyncio.sleep(0.5)
    await sb.exec_process("c1", "e1", proc("sh", "-c", "cat /tmp/init.pid; hostname; exit 4"))
    out = await drain(sb, "c1", "e1")
    status = await sb.wait("c1", "e1")
    missing = ""
    try:
        await sb.exec_process("c1", "e2", proc("no-such-program"))
    except Exception as e:
        missing = type(e).__name__
    await sb.remove_container("c1")
    return {"out": out, "status": status, "missing": missing}


async def scenario_two(sb: Sandbox) -> dict[str, object]:
    """Two containers in one VM: one guest kernel, separate pid namespaces."""
    results = {}
    for cid in ("a", "b"):
        await sb.create_container(cid, rootfs.builtin("busybox"),
                                  proc("sh", "-c", "cat /proc/sys/kernel/random/boot_id; echo $$"))
        await sb.start_container(cid)
        results[cid] = (await drain(sb, cid)).split()
        await sb.wait(cid)
        await sb.remove_container(cid)
    return {"a": results["a"], "b": results["b"]}


async def scenario_qmp(sb: Sandbox) -> dict[str, object]:
    """QMP: status, stop/cont and the events they raise, on the running VM."""
    assert sb.machine is not None
    before = await sb.machine.query_status()
    seen = len(sb.machine.events_seen)  # a clone's restore ends with a RESUME of its own
    await sb.machine.pause()
    paused = await sb.machine.query_status()
    await sb.machine.resume()
    after = await sb.machine.query_status()
    # The agent still answers after a pause.
    await sb.create_container("c1", rootfs.builtin("busybox"), proc("true"))
    await sb.start_container("c1")
    status = await sb.wait("c1")
    await asyncio.sleep(0.2)
    return {"states": [before, paused, after], "events": sb.machine.events_seen[seen:],
            "status": status}


async def scenario_console_refused_by_the_guest(sb: Sandbox) -> dict[str, object]:
    """The host asks for a console the config does not allow, past the
    host's own check: the guest refuses it by its kernel command line."""
    try:
        await sb._call("StartConsole", agent_pb2.ConsoleRequest(console_id="c1",
                                                                shell=GUEST_BUSYBOX))
    except KataError as e:
        return {"refused": str(e), "status": e.status}
    return {"refused": ""}


async def main() -> None:
    cfg = config.load(sys.argv[1])
    scenario = globals()[f"scenario_{sys.argv[2]}"]
    run = mountns.enter()
    async with Sandbox(cfg, "driver", run, accel.choose(cfg.accel)) as sb:
        result = await scenario(sb)
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
