"""A sandbox started before it is asked for: the fork server's spare.

Under TCG a clone's restore, its agent's first answers and the adoption
(entropy, clock, name, share) are half of a short container's life, and a
clone's first container pays for translating the guest's code for making
containers (0.17 s to create, against 0.06 s for its second).  A spare
runner of the fork server (microvm/forkserver.py) does all that ahead, as
SCHED_IDLE: hold() starts a sandbox with no network and runs one container
(`true`, of the rootfs given) in it.  The front end that then runs in the
same process, `microvm run` or the shim daemon, runs on the spare's event
loop (run()) and takes the sandbox (take()) if its configuration is the
spare's; a spare not taken is stopped.

While it waits the spare is a sandbox like any other: a clone, its own
entropy and name, in its runner's mount namespace.  Its runner dies with
the server until it is taken (PR_SET_PDEATHSIG), and its helpers with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from microvm.config import Config
    from microvm.core.sandbox import Sandbox
    from microvm.net.network import NetworkSpec
    from microvm.vm.accel import Choice

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class _Held:
    runner: asyncio.Runner
    sandbox: Sandbox
    config: Config
    accel: str
    ready: float  # time.monotonic()


_held: _Held | None = None
_stopping: set[asyncio.Task[None]] = set()


def usable(cfg: Config) -> bool:
    """Whether a sandbox of cfg may be held ahead: a clone's (secure
    sandboxes boot cold, each through its own firmware)."""
    return cfg.spare and cfg.template and cfg.firmware == "default"


def hold(cfg: Config, run_dir: Path, warm_rootfs: list[Path], nics: int = 0) -> None:
    """Start a sandbox of cfg, run one container in it, and keep it for
    take(): with no network, or with nics NICs on taps of its own that a
    pod's namespace gets when it is taken."""
    global _held
    from microvm.core.sandbox import Sandbox
    from microvm.net import tcfilter
    from microvm.net.network import NetworkSpec
    from microvm.vm import accel

    choice = accel.choose(cfg.accel)
    taps = tcfilter.spare_taps(nics, cfg.vcpus) if nics else None
    sb = Sandbox(cfg, secrets.token_hex(8), run_dir, choice, network=NetworkSpec(),
                 spare_taps=taps)
    runner = asyncio.Runner()
    try:
        runner.run(sb.start())
        runner.run(_warm(sb, warm_rootfs))
    except BaseException:
        runner.run(sb.stop())
        runner.close()
        raise
    _held = _Held(runner, sb, cfg, choice.accel, time.monotonic())


async def _warm(sb: Sandbox, rootfs: list[Path]) -> None:
    """One container run to its end (`true`), as a run would make it."""
    from microvm.core import oci
    from microvm.core.stdio import attach
    from microvm.protocol import agent_pb2

    privileges = oci.Privileges(False, (), ())
    cid = f"warm-{secrets.token_hex(4)}"
    await sb.create_container(
        cid, rootfs,
        agent_pb2.Process(args=["true"], cwd="/", user=agent_pb2.User(),
                          capabilities=privileges.capabilities()),
        hostname="warm", etc=True, masked_paths=privileges.masked_paths,
        readonly_paths=privileges.readonly_paths, devices=privileges.devices)
    try:
        await sb.start_container(cid)
        await attach(sb, cid, stdin=False, terminal=False)
    finally:
        await sb.remove_container(cid)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, on the spare's loop where one is held (its VM's tasks
    live there); a spare left untaken is stopped before the loop ends."""
    if _held is None:
        return asyncio.run(coro)
    runner = _held.runner
    try:
        return runner.run(_then_stop_untaken(coro))
    finally:
        runner.close()


async def _then_stop_untaken(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return await coro
    finally:
        _release("nothing took it")
        if _stopping:
            await asyncio.gather(*_stopping, return_exceptions=True)


@contextlib.asynccontextmanager
async def sandbox(cfg: Config, choice: Choice, net: NetworkSpec,
                  make: Callable[[], Sandbox]) -> AsyncIterator[Sandbox]:
    """The spare's started sandbox if it fits, else make()'s, started."""
    held = await take(cfg, choice, net)
    if held is None:
        async with make() as sb:
            yield sb
        return
    try:
        yield held
    finally:
        await held.stop()


async def take(cfg: Config, choice: Choice, net: NetworkSpec) -> Sandbox | None:
    """The held sandbox, started (and its network joined), if it is what
    cfg, choice and net would start; None otherwise (and a held one is then
    stopped meanwhile)."""
    global _held
    held = _held
    if held is None:
        return None
    sb = held.sandbox
    alive = not sb.death and sb.machine is not None and sb.machine.proc is not None \
        and sb.machine.proc.poll() is None
    nics = sb.spare_taps is not None
    if not alive:
        _release(f"it ended while waiting ({sb.death or 'QEMU gone'})")
    elif cfg != held.config or choice.accel != held.accel:
        _release("this sandbox's configuration is not the spare's")
    elif net.ports or net.mode != ("ns" if nics else "none"):
        _release(f"this sandbox's network is {net.mode}")
    else:
        _held = None
        if nics:
            try:
                await sb.join_network(net)
            except Exception as e:  # noqa: BLE001 - any failure: a VM of its own
                log.debug("the spare VM is not used: %s", e)
                await sb.stop()
                return None
        log.debug("sandbox %s: the spare VM, ready %.1fs before", sb.id,
                  time.monotonic() - held.ready)
        return sb
    return None


def _release(why: str) -> None:
    """Stop the spare in the background (the caller goes on meanwhile)."""
    global _held
    held, _held = _held, None
    if held is None:
        return
    log.debug("the spare VM is not used: %s", why)
    task = asyncio.get_running_loop().create_task(held.sandbox.stop())
    _stopping.add(task)
    task.add_done_callback(_stopping.discard)
