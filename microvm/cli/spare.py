"""The spare: a VM restored before `microvm run` asks for one.

Under TCG a clone's restore, its agent's first answers and the adoption
(entropy, clock, name, share) are about half of a `microvm run --rm`.  The
fork server of the CLI's place (microvm/forkserver.py) keeps one runner
that has done all that ahead, at nice 19, for a run like the last one it
served: the same config file, --debug and VM flags, --network none.  It
has also run one container of the built-in image, so the guest code that
makes containers is translated already.  A next run with the same VM
configuration goes to that runner and takes the VM: only its container is
left to make.  Any other request gets a runner of its own while the spare
waits on, a minute at most (forkserver.SPARE_WAIT).

While it waits, the spare is a sandbox like any other (a clone, its own
entropy and name, in its own mount namespace); its runner dies with the
server (PR_SET_PDEATHSIG), and its helpers with it.  `spare: false` in the
config file turns it off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
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


def prepare(argv: list[str]) -> bool:
    """In the spare's runner: start the VM a run like argv (`microvm ...
    run ...`) would; False if such a run would not take one."""
    global _held
    cfg = _config_of(argv)
    if cfg is None or not cfg.spare or not cfg.template or cfg.firmware != "default":
        return False
    from microvm.core import mountns
    from microvm.core.sandbox import Sandbox
    from microvm.net.network import NetworkSpec
    from microvm.vm import accel

    run_dir = mountns.enter()
    choice = accel.choose(cfg.accel)
    sb = Sandbox(cfg, secrets.token_hex(8), run_dir, choice, network=NetworkSpec())
    runner = asyncio.Runner()
    try:
        runner.run(sb.start())
        runner.run(_warm(sb))
    except BaseException:
        runner.run(sb.stop())
        runner.close()
        raise
    _held = _Held(runner, sb, cfg, choice.accel, time.monotonic())
    return True


async def _warm(sb: Sandbox) -> None:
    """One container of the built-in image, run to its end (`true`) as a
    run would: under TCG a clone has translated none of the guest's code
    for making a container (namespaces, mounts, fork and exec), which made
    a clone's first container take 0.17 s to create against 0.06 s for its
    second.  The spare pays that ahead."""
    from microvm.core import oci
    from microvm.core.stdio import attach
    from microvm.images import store
    from microvm.protocol import agent_pb2

    privileges = oci.Privileges(False, (), ())
    cid = f"warm-{secrets.token_hex(4)}"
    await sb.create_container(
        cid, store.ensure_builtin().layer_dirs(),
        agent_pb2.Process(args=["true"], cwd="/", user=agent_pb2.User(),
                          capabilities=privileges.capabilities()),
        hostname="warm", etc=True, masked_paths=privileges.masked_paths,
        readonly_paths=privileges.readonly_paths, devices=privileges.devices)
    try:
        await sb.start_container(cid)
        await attach(sb, cid, stdin=False, terminal=False)
    finally:
        await sb.remove_container(cid)


def fits(argv: list[str], spare_argv: list[str]) -> bool:
    """In the server: whether a spare made for a run like spare_argv may run
    argv, the same foreground run's VM.  Only such runs may go to the
    spare's runner, which is in a mount namespace of its own already (a
    shim that `run -d` started there would be in it too)."""
    level = logging.getLogger().level  # Context.config() sets it: not the server's
    try:
        cfg = _config_of(argv)
        return cfg is not None and cfg == _config_of(spare_argv)
    finally:
        logging.getLogger().setLevel(level)


def _config_of(argv: list[str]) -> Config | None:
    """The VM configuration of the run argv is, if it is a foreground run
    with no network; None otherwise (or if it is not a valid run)."""
    import click

    from microvm.cli import commands
    from microvm.errors import KataError
    from microvm.net.network import parse_mode

    try:
        ctx = commands.cli.make_context("microvm", list(argv), resilient_parsing=True)
        name, cmd, rest = commands.cli.resolve_command(ctx, [*ctx.protected_args, *ctx.args])
        if name != "run" or cmd is None:
            return None
        p = cmd.make_context(name, rest, parent=ctx).params
        obj = commands.Context(ctx.params["config_path"], ctx.params["debug"])
        cfg = commands.run_config(obj, p["cpus"], p["memory"], p["kernel"], p["accel"],
                                  p["no_template"], p["firmware"])
        if p["detach"] or parse_mode(p["network"] or cfg.network, p["publish"]).mode != "none":
            return None
    except (click.ClickException, KataError):
        return None
    return cfg


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
        _release("this command did not start a VM")
        if _stopping:
            await asyncio.gather(*_stopping, return_exceptions=True)


@contextlib.asynccontextmanager
async def sandbox(cfg: Config, choice: Choice, net: NetworkSpec,
                  make: Callable[[], Sandbox]) -> AsyncIterator[Sandbox]:
    """The spare's started sandbox if it fits this run, else make()'s."""
    held = _take(cfg, choice, net)
    if held is None:
        async with make() as sb:
            yield sb
        return
    try:
        yield held
    finally:
        await held.stop()


def _take(cfg: Config, choice: Choice, net: NetworkSpec) -> Sandbox | None:
    global _held
    held = _held
    if held is None:
        return None
    sb = held.sandbox
    alive = not sb.death and sb.machine is not None and sb.machine.proc is not None \
        and sb.machine.proc.poll() is None
    if not alive:
        _release(f"it ended while waiting ({sb.death or 'QEMU gone'})")
    elif cfg != held.config or choice.accel != held.accel:
        _release("this run's configuration is not the spare's")
    elif net.mode != "none" or net.ports:
        _release(f"this run's network is {net.mode}")
    else:
        _held = None
        log.debug("sandbox %s: the spare VM, ready %.1fs before this run", sb.id,
                  time.monotonic() - held.ready)
        return sb
    return None


def _release(why: str) -> None:
    """Stop the spare in the background (the run goes on meanwhile)."""
    global _held
    held, _held = _held, None
    if held is None:
        return
    log.debug("the spare VM is not used: %s", why)
    task = asyncio.get_running_loop().create_task(held.sandbox.stop())
    _stopping.add(task)
    task.add_done_callback(_stopping.discard)
