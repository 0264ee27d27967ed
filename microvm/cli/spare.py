"""What spare the fork server keeps (microvm/core/spare.py holds it), and
which requests it fits: the fork server's program's part (microvm/cli/warm.py).

  cli     after a `microvm run`, one for a run like it: the same config
          file, --debug and VM flags; foreground, --network none.  The
          next run whose VM configuration (the whole Config) is the spare's
          goes to it.
  daemon  after a shim `start` of a container with no network of its own
          (`ctr run`), or of a CRI pod (its sandbox container, in the
          namespace CNI made), one with the default config file's
          configuration and, for a pod, one NIC on a tap of its own.  The
          next `start` of the same kind goes to it, and its first Create
          takes the VM if the configuration that Create asks for (runtime
          options, pod size) is the spare's; a pod's tap then moves to the
          pod's namespace, and the guest gets the pod's network.

Nothing else reaches a spare's runner, which is in a mount namespace of its
own already (a shim that `run -d` started there would be in it too).
Other requests are forked as ever while the spare waits, a minute at most.
The whole is off with `spare: false` in the config file, or
KATA_PY_SPARE=off in the environment of the server's place.
"""

from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from microvm.config import Config


def shape(kind: str, argv: list[str], cwd: int) -> list[str] | None:
    """In the server, for the request it just served: what a spare made
    for the next one like it is made for (None: no spare)."""
    if kind == "cli":
        return argv
    if kind == "daemon":
        return _bundle_shape(cwd)
    return None


def fits(kind: str, argv: list[str], cwd: int, made_for: list[str]) -> bool:
    """In the server: whether a spare made for made_for may serve this."""
    if kind == "daemon":
        return _bundle_shape(cwd) == made_for
    level = logging.getLogger().level  # Context.config() sets it: not the server's
    try:
        cfg = _config_of(argv)
        return cfg is not None and cfg == _config_of(made_for)
    finally:
        logging.getLogger().setLevel(level)


def prepare(kind: str, made_for: list[str]) -> bool:
    """In the spare's runner: hold the sandbox such a request would start;
    False if it would start none."""
    from microvm import config as config_mod
    from microvm.core import mountns, spare
    from microvm.errors import KataError
    from microvm.images import store

    if kind == "cli":
        cfg = _config_of(made_for)
    else:
        try:
            cfg = config_mod.load(None)
        except KataError:
            cfg = None
    if cfg is None or not spare.usable(cfg):
        return False
    spare.hold(cfg, mountns.enter(), store.ensure_builtin().layer_dirs(),
               nics=1 if made_for == ["pod"] else 0)
    return True


def _bundle_shape(cwd: int) -> list[str] | None:
    """What spare a shim's bundle (cwd) would take: ["none"], a container
    with no network of its own; ["pod"], a CRI pod's sandbox container in
    the namespace CNI made (one NIC is assumed: the usual CNI's); None: no
    spare (the CLI's bridge, a CRI container joining its pod, anything odd)."""
    from microvm.net import network

    try:
        fd = os.open("config.json", os.O_RDONLY | os.O_CLOEXEC, dir_fd=cwd)
        with open(fd, "rb") as f:
            spec = json.loads(f.read(1 << 20))
        annotations = spec.get("annotations") or {}
        namespaces = (spec.get("linux") or {}).get("namespaces") or []
        netns = any(ns.get("type") == "network" and ns.get("path") for ns in namespaces)
        if any(k.startswith("io.kubernetes.") for k in annotations):
            sandbox = annotations.get("io.kubernetes.cri.container-type") == "sandbox"
            return ["pod"] if sandbox and netns else None
        cli = network.from_annotations(annotations)
        if cli is not None:
            return ["none"] if cli.mode == "none" and not cli.ports else None
        return None if netns else ["none"]
    except Exception:  # noqa: BLE001 - an odd bundle is the daemon's to refuse
        return None


def _config_of(argv: list[str]) -> Config | None:
    """The VM configuration of the run argv is, if it is a foreground run
    with no network; None otherwise (or if it is not a valid run)."""
    import click

    from microvm.cli import commands, entry
    from microvm.errors import KataError
    from microvm.net.network import parse_mode

    group, name, rest = entry.split(argv)
    if name != "run":
        return None
    try:
        ctx = commands.cli.make_context("microvm", group, resilient_parsing=True)
        p = commands.run.make_context(name, rest, parent=ctx).params
        obj = commands.Context(ctx.params["config_path"], ctx.params["debug"])
        cfg = commands.run_config(obj, p["cpus"], p["memory"], p["kernel"], p["accel"],
                                  p["no_template"], p["firmware"])
        if p["detach"] or parse_mode(p["network"] or cfg.network, p["publish"]).mode != "none":
            return None
    except (click.ClickException, KataError):
        return None
    return cfg
