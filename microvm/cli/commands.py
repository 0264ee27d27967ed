"""The `microvm` command: docker-style verbs over the sandbox core."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click

from microvm import __version__
from microvm import config as config_mod
from microvm.cli.install import DEFAULT_CONFIG as DEFAULT_CONTAINERD_CONFIG
from microvm.cli.install import install_containerd
from microvm.core import mountns, oci, spare
from microvm.core.volumes import Volume, parse_volume
from microvm.errors import KataError
from microvm.images import rootfs, store
from microvm.net.network import NetworkSpec, check_hostname, parse_mode
from microvm.protocol import agent_pb2
from microvm.vm import accel as accel_mod

log = logging.getLogger("microvm")


class Context:
    def __init__(self, config_path: str | None, debug: bool) -> None:
        self.config_path = config_path
        self.debug = debug

    def config(self) -> config_mod.Config:
        cfg = config_mod.load(self.config_path)
        if self.debug:
            cfg.log_level = "debug"
        logging.getLogger().setLevel(cfg.log_level.upper())
        return cfg


def setup_logging(debug: bool) -> None:
    from microvm import logs
    logs.setup("microvm:", debug)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", metavar="PATH",
              help="Configuration file (default /etc/kata-py/config.yaml).")
@click.option("--debug", is_flag=True, help="Log what kata-py does, and the guest agent's log.")
@click.version_option(__version__, prog_name="microvm")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, debug: bool) -> None:
    """kata-py: run each container in its own QEMU microVM."""
    setup_logging(debug)
    ctx.obj = Context(config_path, debug)


def _env(values: tuple[str, ...], image_env: list[str] | None = None) -> list[str]:
    """The image's environment, with -e on top (a later KEY wins)."""
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    for kv in [*(image_env or []), *values]:
        if "=" in kv:
            key, value = kv.split("=", 1)
            env[key] = value
        elif kv in os.environ:  # docker: -e NAME takes the value from our environment
            env[kv] = os.environ[kv]
    return [f"{k}={v}" for k, v in env.items()]


# (uid_t)-1 means "leave unchanged" to setresuid() and chown(): not an id.
MAX_ID = 2**32 - 2


def _is_id(value: str) -> bool:
    """A uid or gid in range (ASCII digits only: int() takes others too)."""
    return value.isascii() and value.isdigit() and len(value) <= 10 and int(value) <= MAX_ID


def _check_user(flag: str, spec: str) -> None:
    """-u USER[:GROUP]: the numeric parts must be ids; names are looked up later."""
    if any(part.isdigit() and not _is_id(part) for part in spec.split(":", 1)):
        shown = spec if len(spec) <= 40 else spec[:40] + "..."
        raise KataError(f"{flag} {shown}: uid and gid must be numbers from 0 to {MAX_ID}")


def _lookup_user(root: Path | list[Path], flag: str, spec: str) -> tuple[int, int, list[int]]:
    _check_user(flag, spec)
    try:
        uid, gid, extra = rootfs.lookup_user(root, spec)
    except ValueError:  # our numbers are checked: the image's files hold a bad one
        raise KataError(f"{flag} {spec}: the image's /etc/passwd or /etc/group has an "
                        "invalid id") from None
    if not all(_is_id(str(n)) for n in (uid, gid, *extra)):
        raise KataError(f"{flag} {spec}: the image's /etc/passwd or /etc/group gives an id "
                        f"outside 0 to {MAX_ID}")
    return uid, gid, extra


def run_config(obj: Context, cpus: int | None, memory: int | None, kernel: str | None,
               accel: str | None, no_template: bool, firmware: str | None) -> config_mod.Config:
    """The configuration a run's VM gets: the file's, and the run's flags."""
    cfg = obj.config()
    if cpus is not None:
        cfg.vcpus = cpus
    if memory is not None:
        cfg.memory_mib = memory
    if kernel is not None:
        cfg.kernel = kernel
    if accel is not None:
        cfg.accel = accel
    if no_template:
        cfg.template = False
    if firmware is not None:
        cfg.firmware = firmware
    if cfg.firmware == "secure" and kernel is not None:
        # The secure flavour boots only the kernel this install signed.
        raise KataError("--kernel does not apply to the secure flavour: it boots "
                        "vmlinuz-secure.signed (kernels/build --flavour secure)")
    cfg.source = "command line"
    cfg.validate()
    return cfg


def _check_run_flags(hostname: str, name: str | None, detach: bool) -> None:
    """Refused before anything starts."""
    if hostname:
        check_hostname(hostname)
    if name is not None:
        if not detach:
            raise KataError("--name goes with -d")
        from microvm.cli.detached import check_name
        check_name(name)


@cli.command(context_settings={"allow_interspersed_args": False})
@click.option("--rm", is_flag=True, help="Remove the container when it exits (always, for now).")
@click.option("-i", "--interactive", is_flag=True, help="Keep stdin open and pass it on.")
@click.option("-t", "--tty", is_flag=True, help="Give the process a terminal.")
@click.option("-e", "--env", multiple=True, metavar="KEY=VALUE",
              help="Set an environment variable.")
@click.option("-w", "--workdir", default=None, metavar="DIR", help="Working directory.")
@click.option("-u", "--user", default=None, metavar="UID[:GID]", help="User (name or id).")
@click.option("--entrypoint", default=None, metavar="CMD",
              help="Overwrite the image's entrypoint.")
@click.option("--hostname", default="", metavar="NAME", help="Container host name.")
@click.option("--pull", "pull_policy", type=click.Choice(["missing", "always", "never"]),
              default="missing", show_default=True, help="Pull the image before running.")
@click.option("--cpus", type=int, help="vCPUs of the VM.")
@click.option("--memory", type=int, metavar="MiB", help="Memory of the VM, MiB.")
@click.option("--kernel", metavar="PATH", help="Guest kernel (bzImage).")
@click.option("--accel", type=click.Choice(config_mod.ACCELS), help="Accelerator.")
@click.option("--read-only", is_flag=True, help="Mount the root file system read-only.")
@click.option("--no-template", is_flag=True,
              help="Boot the VM's own kernel rather than clone a booted template.")
@click.option("--firmware", type=click.Choice(config_mod.FIRMWARES), default=None,
              help="secure: boot through OVMF with Secure Boot and a vTPM, and check the "
                   "measured boot before the container starts (docs/secure-boot.md).")
@click.option("--privileged", is_flag=True,
              help="Every capability, every device, no masked paths (inside the VM only).")
@click.option("--cap-add", multiple=True, metavar="CAP", help="Add a capability (or ALL).")
@click.option("--cap-drop", multiple=True, metavar="CAP", help="Drop a capability (or ALL).")
@click.option("-d", "--detach", is_flag=True,
              help="Run in the background (through the shim); print the name.")
@click.option("--name", metavar="NAME", help="Name of a detached container.")
@click.option("--network", "--net", "network", default=None, metavar="MODE",
              help="bridge (the default: microvm0, NAT), none (loopback only), or ns:PATH "
                   "(take over a prepared network namespace's interfaces).")
@click.option("-p", "--publish", multiple=True, metavar="[IP:]HOST:CONTAINER[/PROTO]",
              help="Publish a container's port on the host (bridge network).")
@click.option("-v", "--volume", "volume", multiple=True, metavar="/HOST:/CONTAINER[:ro][,rslave]",
              help="Bind a host path into the container (read-only with :ro).")
@click.argument("rootfs_name", metavar="ROOTFS")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def run(obj: Context, rm: bool, interactive: bool, tty: bool, env: tuple[str, ...],
        workdir: str | None, user: str | None, entrypoint: str | None, hostname: str,
        pull_policy: str, cpus: int | None, memory: int | None, kernel: str | None,
        accel: str | None, read_only: bool, no_template: bool, firmware: str | None,
        privileged: bool,
        cap_add: tuple[str, ...], cap_drop: tuple[str, ...], detach: bool, name: str | None,
        network: str | None, publish: tuple[str, ...], volume: tuple[str, ...],
        rootfs_name: str, command: tuple[str, ...]) -> None:
    """Run COMMAND in a new container, in its own VM.

    ROOTFS is a directory, `busybox` (built in), or an image from `microvm images`.
    """
    cfg = run_config(obj, cpus, memory, kernel, accel, no_template, firmware)
    _check_run_flags(hostname, name, detach)
    privileges = oci.Privileges(privileged, cap_add, cap_drop)
    try:
        capabilities = privileges.capabilities()
    except ValueError as e:
        raise KataError(f"invalid --cap-add/--cap-drop: {e}") from None
    net = parse_mode(network or cfg.network, publish)
    volumes = [parse_volume(v) for v in volume]
    # `run IMAGE -- CMD...`: the separator is ours, not the command's.
    command = command[1:] if command[:1] == ("--",) else command
    root: Path | list[Path]
    image_config: dict[str, Any] = {}
    image_ref = ""
    if Path(rootfs_name).is_dir():
        root = rootfs.resolve(rootfs_name)
        args = list(command) or rootfs.DEFAULT_CMD.get(rootfs_name, [])
        if entrypoint is not None:
            args = [entrypoint, *command]
    else:
        if rootfs_name.startswith(("/", ".")):
            raise KataError(f"rootfs {rootfs_name}: no such directory")
        img = None if pull_policy == "always" else store.get(rootfs_name)
        if img is None and store.parse_reference(rootfs_name).name == store.BUILTIN_IMAGE:
            img = store.ensure_builtin()  # offline, from busybox-static
        if img is None and pull_policy != "never":
            from microvm.images import registry
            img = registry.pull(rootfs_name)
        if img is None:
            raise KataError(f"no such image: {store.parse_reference(rootfs_name).name} "
                            "(microvm pull or microvm import FILE)")
        root = img.layer_dirs()
        image_ref = img.ref
        image_config = img.config.get("config") or {}
        args = store.command_line(image_config, list(command), entrypoint)
    if not args:
        raise KataError("no command specified")
    # Like docker, root too gets its groups from the image's /etc/group.
    uid, gid, extra = _lookup_user(root, "-u" if user else "the image's User",
                                   user or image_config.get("User") or "0")
    workdir = workdir or image_config.get("WorkingDir") or "/"
    terminal = tty and True
    rows, cols = (0, 0)
    if terminal:
        from microvm.core.stdio import Terminal
        rows, cols = Terminal(sys.stdout.fileno()).size()
    process = agent_pb2.Process(
        args=args, env=_env(env, image_config.get("Env") or []) + (
            ["TERM=xterm"] if terminal else []), cwd=workdir,
        user=agent_pb2.User(uid=uid, gid=gid, additional_gids=extra), terminal=terminal,
        rows=rows, cols=cols, stdin=interactive, capabilities=capabilities)
    if detach:
        from microvm.cli import detached
        if cpus is not None or memory is not None or kernel is not None or accel is not None \
                or no_template:
            raise KataError("--cpus, --memory, --kernel, --accel and --no-template are not yet "
                            "supported with -d (set them in the config file)")
        process.stdin = False
        click.echo(spare.run(detached.run_detached(
            name, root, process, hostname or secrets.token_hex(6), read_only,
            obj.config_path, image_ref, net, volumes, privileges, image_arg=rootfs_name,
            firmware=firmware)))
        return
    run_dir = mountns.enter()
    status = spare.run(_run(cfg, run_dir, root, process, read_only,
                            hostname or secrets.token_hex(6), interactive, terminal, net,
                            volumes, privileges))
    sys.exit(status)


async def _run(cfg: config_mod.Config, run_dir: Path, root: Path | list[Path],
               process: agent_pb2.Process,
               read_only: bool, hostname: str, interactive: bool, terminal: bool,
               net: NetworkSpec, volumes: list[Volume], privileges: oci.Privileges) -> int:
    from microvm.core.sandbox import Sandbox
    from microvm.core.stdio import Terminal, attach

    choice = accel_mod.choose(cfg.accel)
    if choice.fallback:
        log.warning("using TCG emulation (slow): %s", choice.reason)
    async with spare.sandbox(cfg, choice, net, lambda: Sandbox(
            cfg, secrets.token_hex(8), run_dir, choice, network=net)) as sb:
        cid = sb.id
        await sb.create_container(cid, root, process, readonly=read_only, hostname=hostname,
                                  etc=True, volumes=volumes,
                                  masked_paths=privileges.masked_paths,
                                  readonly_paths=privileges.readonly_paths,
                                  devices=privileges.devices)
        with Terminal(sys.stdin.fileno()) if terminal and interactive else _nothing():
            await sb.start_container(cid)
            return await attach(sb, cid, stdin=interactive, terminal=terminal)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@cli.command("import")
@click.argument("archive", type=click.Path(path_type=Path))
def import_cmd(archive: Path) -> None:
    """Add images from a docker save archive or an OCI image layout (dir or tar)."""
    for img in store.import_archive(archive):
        click.echo(f"imported {img.ref} ({img.id})")


@cli.command("save")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Write to this file, not to standard output.")
@click.argument("refs", nargs=-1, required=True, metavar="IMAGE...")
def save_cmd(output: Path | None, refs: tuple[str, ...]) -> None:
    """Write images as a tar: an OCI image layout that `docker load` also reads."""
    from microvm.images import save
    save.save(list(refs), output, sys.stdout.buffer, sys.stdout.isatty())


@cli.command("pull")
@click.option("--insecure-registry", "insecure", multiple=True, metavar="HOST[:PORT]",
              help="Allow plain HTTP to this registry (loopback ones always may).")
@click.argument("ref")
def pull_cmd(insecure: tuple[str, ...], ref: str) -> None:
    """Pull an image from a registry (OCI distribution API v2)."""
    from microvm.images import registry
    img = registry.pull(ref, insecure)
    click.echo(f"pulled {img.ref} ({img.id})")


@cli.command("login")
@click.option("-u", "--username", required=True)
@click.option("-p", "--password", default=None, help="Prefer --password-stdin.")
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin.")
@click.option("--insecure-registry", "insecure", multiple=True, metavar="HOST[:PORT]",
              help="Allow plain HTTP to this registry (loopback ones always may).")
@click.argument("registry_host", metavar="REGISTRY")
def login_cmd(username: str, password: str | None, password_stdin: bool,
              insecure: tuple[str, ...], registry_host: str) -> None:
    """Check credentials against a registry, then store them (0600, under /var/lib/kata-py)."""
    from microvm.images import registry
    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    if password is None:
        password = click.prompt("Password", hide_input=True)
    registry.login(registry_host, username, password, insecure)
    click.echo("Login Succeeded")


@cli.command("logout")
@click.argument("registry_host", metavar="REGISTRY")
def logout_cmd(registry_host: str) -> None:
    """Forget the stored credentials for a registry."""
    from microvm.images import registry
    if registry.logout(registry_host):
        click.echo(f"Removing login credentials for {registry_host}")
    else:
        click.echo(f"Not logged in to {registry_host}")


@cli.command("images")
def images_cmd() -> None:
    """List stored images."""
    click.echo(f"{'REPOSITORY':<40}{'TAG':<12}{'IMAGE ID':<14}{'CREATED':<22}SIZE")
    for img in store.list_images():
        ref = store.parse_reference(img.ref)
        tag = "<none>" if ref.digest else ref.tag  # pulled by digest
        click.echo(f"{ref.registry + '/' + ref.repository:<40}{tag:<12}{img.id:<14}"
                   f"{store.created_ago(img.created):<22}{img.size / 1e6:.1f}MB")


@cli.command("rmi")
@click.argument("refs", nargs=-1, required=True)
def rmi_cmd(refs: tuple[str, ...]) -> None:
    """Remove images by reference or ID (and the layers no other image uses)."""
    for ref in refs:
        for img in store.remove(ref):
            click.echo(f"untagged: {img.ref}")


@cli.group("image")
def image_group() -> None:
    """Manage images."""


@image_group.command("inspect")
@click.argument("ref")
def image_inspect(ref: str) -> None:
    """An image's record and configuration, as JSON."""
    import json
    img = store.get(ref)
    if img is None:
        raise KataError(f"no such image: {ref}")
    click.echo(json.dumps({"ref": img.ref, "id": img.manifest, "size": img.size,
                           "layers": img.layers, "config": img.config}, indent=2))


@cli.command("stats")
@click.option("--no-stream", is_flag=True, help="One table, then exit.")
@click.argument("names", nargs=-1, metavar="[NAME...]")
def stats_cmd(no_stream: bool, names: tuple[str, ...]) -> None:
    """Live figures of detached containers (all running ones by default)."""
    from microvm.cli import detached, observe
    if not names:
        names = tuple(c.meta.name for c in asyncio.run(detached.list_all())
                      if c.status in ("running", "paused"))
    names = tuple(detached.resolve(n) for n in names)
    addresses = {n: detached.address(n) for n in names}
    tty = sys.stdout.isatty()
    before: dict[str, observe.Sample] = {}
    first = True
    while True:
        found = asyncio.run(observe.scan(list(addresses.values())))
        by_address = {s.address: s for s in found}
        if first:  # CPU % needs a second look
            time.sleep(1.0)
            before = {n: by_address[a] for n, a in addresses.items() if a in by_address}
            found = asyncio.run(observe.scan(list(addresses.values())))
            by_address = {s.address: s for s in found}
            first = False
        rows: list[tuple[str, ...]] = [observe.STATS_HEADER]
        for n, a in addresses.items():
            if a in by_address:
                rows.append(observe.stats_row(n, by_address[a], before.get(n)))
        if tty and not no_stream:
            click.echo("\033[2J\033[H", nl=False)
        click.echo(observe.table(rows))
        if no_stream:
            return
        before = {n: by_address[a] for n, a in addresses.items() if a in by_address}
        time.sleep(1.0)


@cli.command("events")
@click.option("--since", default=None, metavar="TIME",
              help="Also what happened since TIME (10m, 1h, epoch seconds, RFC 3339).")
@click.option("--until", default=None, metavar="TIME", help="Stop at TIME.")
@click.option("--format", "template", default=None, metavar="'{{json .}}'",
              help="'{{json .}}': one JSON object per event, as docker's.")
@click.option("--namespace", default="microvm", show_default=True,
              help="The containerd namespace (k8s.io: containerd's CRI pods).")
def events_cmd(since: str | None, until: str | None, template: str | None,
               namespace: str) -> None:
    """Container lifecycle events, as they happen."""
    from microvm.cli import events
    if template not in (None, "{{json .}}", "{{ json . }}"):
        raise KataError("--format: only '{{json .}}' is understood")
    now = time.time()
    start = events.when(since, now) if since else now
    end = events.when(until, now) if until else None
    try:
        for e in events.follow(namespace, start, end):
            click.echo(events.emit(e, template is not None))
    except KeyboardInterrupt:
        pass


@cli.command("console")
@click.option("--sandbox", "sandbox_id", default=None, metavar="ID",
              help="A shim's sandbox (a CRI pod's VM) by its ID or a prefix of it.")
@click.argument("name", required=False)
def console_cmd(sandbox_id: str | None, name: str | None) -> None:
    """A root shell in the guest, outside every container (debug_console: true)."""
    from microvm.cli import detached, observe
    if (name is None) == (sandbox_id is None):
        raise KataError("give a container NAME or --sandbox ID")
    if name is not None:
        address = detached.address(detached.resolve(name))
        sample = asyncio.run(observe.ask(address)) if address else None
        if sample is None:
            raise KataError(f"container {name} is not running")
    else:
        sample = observe.find_sandbox(sandbox_id or "", asyncio.run(observe.scan()))
    asyncio.run(observe.console(sample))


@cli.command("monitor")
@click.option("--listen", default="127.0.0.1:8090", show_default=True, metavar="HOST:PORT",
              help="Where to serve /metrics.")
def monitor_cmd(listen: str) -> None:
    """Serve every running sandbox's figures as Prometheus metrics."""
    from microvm.cli import monitor
    monitor.serve(listen)


@cli.command("ps")
@click.option("-a", "--all", "show_all", is_flag=True, help="Also exited containers.")
@click.option("-q", "--quiet", is_flag=True, help="Only the IDs.")
@click.option("--format", "template", default=None, metavar="TEMPLATE",
              help="Go-template-like fields, e.g. 'table {{.Names}}\\t{{.Status}}'.")
def ps_cmd(show_all: bool, quiet: bool, template: str | None) -> None:
    """List detached containers, newest first."""
    from microvm.cli import detached, listing
    now = time.time()
    rows = [listing.fields(c, now) for c in reversed(asyncio.run(detached.list_all()))
            if show_all or c.status in ("running", "paused", "created", "creating")]
    template = "{{.ID}}" if quiet else template or listing.DEFAULT
    for line in listing.render(template, rows):
        click.echo(line.rstrip())


@cli.command("exec", context_settings={"allow_interspersed_args": False})
@click.option("-i", "--interactive", is_flag=True, help="Pass stdin on.")
@click.option("-t", "--tty", is_flag=True, help="Give the process a terminal.")
@click.option("-e", "--env", multiple=True, metavar="KEY=VALUE")
@click.option("-w", "--workdir", default="/", metavar="DIR")
@click.option("-u", "--user", default="0", metavar="UID[:GID]")
@click.argument("name")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_cmd(interactive: bool, tty: bool, env: tuple[str, ...], workdir: str, user: str,
             name: str, command: tuple[str, ...]) -> None:
    """Run COMMAND in a running detached container."""
    from microvm.cli import detached
    from microvm.core.stdio import Terminal
    uid, _, gid = user.partition(":")
    if not uid.isdigit() or (gid and not gid.isdigit()):
        raise KataError("exec -u takes numeric UID[:GID]")
    _check_user("-u", user)
    rows, cols = Terminal(sys.stdout.fileno()).size() if tty else (0, 0)
    process = agent_pb2.Process(
        args=list(command[1:] if command[:1] == ("--",) else command),
        env=_env(env) + (["TERM=xterm"] if tty else []), cwd=workdir,
        user=agent_pb2.User(uid=int(uid), gid=int(gid or 0)), terminal=tty, rows=rows,
        cols=cols, stdin=interactive)
    sys.exit(asyncio.run(detached.exec_process(detached.resolve(name), process, interactive)))


@cli.command("kill")
@click.option("-s", "--signal", "sig", default="KILL", metavar="SIGNAL", show_default=True)
@click.argument("names", nargs=-1, required=True)
def kill_cmd(sig: str, names: tuple[str, ...]) -> None:
    """Send a signal to detached containers."""
    from microvm.cli import detached
    number = _signal_number(sig)
    for n in names:
        asyncio.run(detached.kill(detached.resolve(n), number))
        click.echo(n)


def _signal_number(sig: str) -> int:
    if sig.isdigit():
        return int(sig)
    name = sig.upper() if sig.upper().startswith("SIG") else f"SIG{sig.upper()}"
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise KataError(f"invalid signal: {sig}") from None


@cli.command("stop")
@click.option("-t", "--time", "timeout", default=10, show_default=True,
              help="Seconds to wait after SIGTERM before SIGKILL.")
@click.argument("names", nargs=-1, required=True)
def stop_cmd(timeout: int, names: tuple[str, ...]) -> None:
    """Stop detached containers: SIGTERM, then SIGKILL."""
    from microvm.cli import detached
    for n in names:
        asyncio.run(detached.stop(detached.resolve(n), timeout))
        click.echo(n)


@cli.command("rm")
@click.option("-f", "--force", is_flag=True, help="Kill a running container first.")
@click.argument("names", nargs=-1, required=True)
def rm_cmd(force: bool, names: tuple[str, ...]) -> None:
    """Remove detached containers (their VM, shim and state)."""
    from microvm.cli import detached
    for n in names:
        asyncio.run(detached.remove(detached.resolve(n), force))
        click.echo(n)


@cli.command("logs")
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the container stops.")
@click.argument("name")
def logs_cmd(follow: bool, name: str) -> None:
    """Print a detached container's output."""
    from microvm.cli import detached
    asyncio.run(detached.logs(detached.resolve(name), follow))


@cli.command("inspect")
@click.argument("name")
def inspect_cmd(name: str) -> None:
    """A detached container's state and configuration, as JSON."""
    import json

    from microvm.cli import detached
    click.echo(json.dumps(asyncio.run(detached.inspect(detached.resolve(name))), indent=2))


@cli.command("attest")
@click.argument("name")
def attest_cmd(name: str) -> None:
    """Check a secure container's measured boot: each PCR the host expects
    against what its vTPM measured.  Exits 1 on a mismatch."""
    from microvm.cli import detached
    flavour, result = asyncio.run(detached.attestation(detached.resolve(name)))
    if result is None:
        raise KataError(f"{name} runs the {flavour} flavour: nothing is measured "
                        "(run it with --firmware secure)")
    for p in result["pcrs"]:
        ok = "ok      " if p["expected"] == p["measured"] else "MISMATCH"
        click.echo(f"PCR {p['index']:<2} {ok} {p['what']}: {p['measured']}")
        if p["expected"] != p["measured"]:
            click.echo(f"{'':12}expected {p['expected']}")
    if not result["passed"]:
        click.echo(f"attestation failed: {result['detail']}", err=True)
        sys.exit(1)
    click.echo("attestation passed")


@cli.group("system")
def system_group() -> None:
    """What kata-py keeps on disk."""


@system_group.command("df")
def system_df() -> None:
    """Disk used by images, detached containers and VM templates; memory by spare VMs."""
    from microvm.cli import system
    click.echo(f"{'TYPE':<14}{'TOTAL':>6}{'ACTIVE':>8}{'SIZE':>12}{'RECLAIMABLE':>14}")
    for u in asyncio.run(system.df()):
        click.echo(f"{u.kind:<14}{u.total:>6}{u.active:>8}{u.size / 1e6:>10.1f}MB"
                   f"{u.reclaimable / 1e6:>12.1f}MB")


@system_group.command("prune")
@click.option("-a", "--all", "all_images", is_flag=True,
              help="Also remove every image no running container uses.")
@click.pass_obj
def system_prune(obj: Context, all_images: bool) -> None:
    """Remove stopped containers, unused layers, interrupted downloads, spare
    VMs, and network leases, redirects and a bridge that killed containers left."""
    from microvm.cli import system
    from microvm.net import bridge, tcfilter
    removed, freed = asyncio.run(system.prune(all_images))
    for ip in bridge.prune_leases():
        removed.append(f"lease {ip}")
    for path in tcfilter.prune_claims():
        removed.append(f"tc redirects in {path}")
    cfg = obj.config()
    if bridge.remove_bridge_if_unused(bridge.BridgeConfig.of(cfg)):
        removed.append(f"bridge {cfg.bridge_name}")
    for what in removed:
        click.echo(f"deleted {what}")
    click.echo(f"Total reclaimed space: {freed / 1e6:.1f}MB")


@cli.group("network")
def network_group() -> None:
    """The CLI's bridge network."""


@network_group.command("ls")
@click.pass_obj
def network_ls(obj: Context) -> None:
    """The bridge, its subnet, and the addresses leased to sandboxes."""
    from microvm.net import bridge, netlink
    cfg = obj.config()
    up = bool(netlink.run(lambda ipr: ipr.link_lookup(ifname=cfg.bridge_name)))
    gateway = bridge.BridgeConfig.of(cfg).gateway
    click.echo(f"{'NETWORK':<12}{'DRIVER':<9}{'SUBNET':<18}{'GATEWAY':<16}STATE")
    click.echo(f"{'bridge':<12}{'bridge':<9}{cfg.bridge_subnet:<18}{gateway:<16}"
               f"{cfg.bridge_name + (' up' if up else ' (made on first use)')}")
    click.echo(f"{'none':<12}{'null':<9}")
    leases = bridge.list_leases()
    if leases:
        click.echo(f"\n{'ADDRESS':<18}{'SANDBOX':<20}{'OWNER PID':<11}STATE")
        for ip, lease in sorted(leases.items(), key=lambda kv: tuple(map(int, kv[0].split(".")))):
            state = "in use" if lease["alive"] else "stale (owner gone: microvm system prune)"
            click.echo(f"{ip:<18}{str(lease.get('owner')):<20}{str(lease.get('pid')):<11}{state}")


@cli.command()
@click.option("--fix", is_flag=True,
              help="Make what kata-py can make itself: the secure flavour's keys, "
                   "varstore and signed kernel.")
@click.pass_obj
def check(obj: Context, fix: bool) -> None:
    """Tell what a VM needs here, what is missing, and how to fix it."""
    from microvm.cli.check import run_checks

    sys.exit(run_checks(obj.config(), fix))


@cli.group()
def install() -> None:
    """Register kata-py with a container manager."""


@install.command("containerd")
@click.option("--config", "path", default=str(DEFAULT_CONTAINERD_CONFIG), show_default=True,
              metavar="PATH", help="containerd's config.toml.")
@click.option("--dry-run", is_flag=True, help="Print the change instead of making it.")
def install_containerd_cmd(path: str, dry_run: bool) -> None:
    """Add the kata-py runtime (handler kata-py) to containerd's CRI config."""
    click.echo(install_containerd(Path(path), dry_run=dry_run))


@cli.group()
def uninstall() -> None:
    """Undo `microvm install`."""


@uninstall.command("containerd")
@click.option("--config", "path", default=str(DEFAULT_CONTAINERD_CONFIG), show_default=True,
              metavar="PATH", help="containerd's config.toml.")
@click.option("--dry-run", is_flag=True, help="Print the change instead of making it.")
def uninstall_containerd_cmd(path: str, dry_run: bool) -> None:
    """Remove what `microvm install containerd` added, and nothing else."""
    from microvm.cli.install import uninstall_containerd
    click.echo(uninstall_containerd(Path(path), dry_run=dry_run))


def main() -> None:
    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as e:
        # docker exits 125 on its own usage errors.
        click.echo(f"microvm: {e.format_message()}", err=True)
        sys.exit(125)
    except KataError as e:
        click.echo(f"microvm: error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:
        # A bug of ours: one line, the traceback only when asked for.
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            log.exception("internal error")
        click.echo(f"microvm: error: internal error: {type(e).__name__}: {e}", err=True)
        sys.exit(125)
