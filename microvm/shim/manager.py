"""containerd-shim-kata-py-v2: containerd's runtime v2 shim contract.

  <shim> -namespace NS -address ADDR -publish-binary BIN -id ID [-debug] start
  <shim> -namespace NS -address ADDR -publish-binary BIN -id ID -bundle B delete
  <shim> -namespace NS -address ADDR -id ID [-debug]          (serve; fd 3 = socket)

`start` prints only the socket address; every container of one pod (same
io.kubernetes.cri.sandbox-id) gets the same shim, which owns the pod's VM.
`delete` prints only a marshalled DeleteResponse.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import setproctitle

from microvm import linux, logs
from microvm.core import hostcgroup, mountns, oci
from microvm.protocol import task_pb2, ttrpc
from microvm.shim.client import TaskClient
from microvm.shim.events import Publisher, timestamp

log = logging.getLogger("shim")

BINARY = "containerd-shim-kata-py-v2"
SOCKET_DIR = Path("/run/containerd/s")
GROUP_ANNOTATIONS = ("io.containerd.kata-py.group", oci.SANDBOX_ID)
_BOOL_FLAGS = {"debug", "v", "version", "info"}


@dataclass
class Args:
    namespace: str = "default"
    address: str = "/run/containerd/containerd.sock"
    publish_binary: str = ""
    id: str = ""
    bundle: str = ""
    debug: bool = False
    socket: str = ""
    action: str = ""


def parse_args(argv: list[str]) -> Args:
    """Go flag-package style (-flag value, -flag=value); unknown flags ignored."""
    args = Args()
    i = 0
    while i < len(argv):
        word = argv[i]
        if word.startswith("-") and len(word) > 1:
            name, eq, value = word.lstrip("-").partition("=")
            key = name.replace("-", "_")
            if name in _BOOL_FLAGS:
                if name == "debug":
                    args.debug = value.lower() not in ("false", "0") if eq else True
            elif hasattr(args, key):
                if not eq:
                    i += 1
                    value = argv[i] if i < len(argv) else ""
                setattr(args, key, value)
        elif not args.action:
            args.action = word
        i += 1
    return args


def socket_path(args: Args, group: str) -> Path:
    digest = hashlib.sha256(os.path.join(args.address, args.namespace, group).encode())
    return SOCKET_DIR / digest.hexdigest()


def _alive(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False


def _write_address(bundle: Path, address: str) -> None:
    tmp = bundle / ".address.tmp"
    tmp.write_text(address)
    tmp.rename(bundle / "address")


def start(args: Args) -> int:
    bundle = Path.cwd()
    annotations = oci.read_annotations(bundle)
    group = next((annotations[k] for k in GROUP_ANNOTATIONS if annotations.get(k)), args.id)
    path = socket_path(args, group)
    address = f"unix://{path}"
    SOCKET_DIR.mkdir(parents=True, exist_ok=True, mode=0o711)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
    except OSError:
        if _alive(path):
            # The pod's shim already runs: this container joins its VM.
            listener.close()
            _write_address(bundle, address)
            print(address, end="")
            return 0
        path.unlink(missing_ok=True)
        listener.bind(str(path))
    os.chmod(path, 0o600)
    listener.listen(128)
    _write_address(bundle, address)
    argv = [sys.executable, "-m", "microvm.shim", "-namespace", args.namespace,
            "-address", args.address, "-id", args.id]
    if args.debug:
        argv.append("-debug")
    # The daemon gets the listener as fd 3, and must not hold containerd's
    # pipe (containerd reads it to EOF): its stdio is /dev/null.
    if listener.fileno() != 3:
        os.dup2(listener.fileno(), 3)
    subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, pass_fds=(3,), cwd=bundle, process_group=0)
    listener.close()
    print(address, end="")
    return 0


def delete(args: Args) -> int:
    """Clean up after a task whose shim may be gone; idempotent, quiet, fast."""
    bundle = Path(args.bundle) if args.bundle else Path.cwd()
    try:
        address = (bundle / "address").read_text().strip()
    except OSError:
        address = ""
    path = Path(address.removeprefix("unix://")) if address else None
    if path is not None and not _alive(path):
        path.unlink(missing_ok=True)
    # A shim that still serves this id is asked to let it go; one serving
    # only other containers of the pod is left alone.
    if path is not None and _alive(path):
        with contextlib.suppress(Exception):
            asyncio.run(asyncio.wait_for(_release(path, args), 4))
    rootfs = bundle / "rootfs"
    with contextlib.suppress(OSError):
        if os.path.ismount(rootfs):
            linux.umount(str(rootfs), linux.MNT_DETACH)
    # A SIGKILLed shim's VM took its taps along; the veths' redirects and the
    # pod's (now empty) host cgroup remain.
    netns, cgroups_path = oci.read_bundle_linux(bundle)
    if path is None or not _alive(path):
        from microvm.net import tcfilter
        if netns:
            with contextlib.suppress(Exception):
                if tcfilter.usable_netns(netns):
                    tcfilter.clean_stale(netns)
        with contextlib.suppress(Exception):
            tcfilter.prune_claims()  # the dead shim's claim, and any other gone owner's
        if cgroups_path:
            hostcgroup.remove(hostcgroup.dirs_for(cgroups_path))
    resp = task_pb2.DeleteResponse(pid=0, exit_status=128 + signal.SIGKILL,
                                   exited_at=timestamp())
    sys.stdout.buffer.write(resp.SerializeToString())
    sys.stdout.flush()
    return 0


async def _release(path: Path, args: Args) -> None:
    async with TaskClient.connect(str(path), args.namespace) as client:
        await client.release(args.id)


async def serve(args: Args) -> None:
    # Here, not at the top: `start` and `delete`, which containerd runs for
    # every container, need none of the sandbox core.
    from microvm.protocol import MONITOR_SERVICE, monitor_pb2
    from microvm.shim.monitor import MonitorService
    from microvm.shim.task_service import SERVICE, TaskService

    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    publisher = None
    if os.environ.get("TTRPC_ADDRESS"):
        publisher = Publisher(os.environ["TTRPC_ADDRESS"], args.namespace)
    service = TaskService(args.namespace, publisher, done.set)
    # Whoever reaches the socket (root) must not make the shim hold without bound.
    server = ttrpc.Server(ttrpc.Limits())
    server.register_service(SERVICE, service, task_pb2.DESCRIPTOR.services_by_name["Task"],
                            task_pb2)
    server.register_service(MONITOR_SERVICE, MonitorService(service),
                            monitor_pb2.DESCRIPTOR.services_by_name["Monitor"], monitor_pb2)
    listener = socket.socket(fileno=3) if not args.socket else None
    if listener is None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(args.socket)
        listener.listen(128)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    srv = await asyncio.start_unix_server(server.serve, sock=listener)
    try:
        await done.wait()
    finally:
        srv.close()
        await service.aclose()
        if publisher is not None:
            await publisher.drain()
            await publisher.aclose()
        await server.aclose()
        with contextlib.suppress(OSError):
            address = (Path.cwd() / "address").read_text().strip()
            Path(address.removeprefix("unix://")).unlink(missing_ok=True)


def process_title(args: Args) -> str:
    """What ps shows for the daemon: the binary's name, as runc's shim shows."""
    return f"{BINARY} -namespace {args.namespace} -id {args.id} -address {args.address}"


def _serve_main(args: Args) -> int:
    setproctitle.setproctitle(process_title(args))
    # Before any thread: a private mount namespace for the pod's mounts.
    mountns.enter()
    linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 1)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        # containerd copies what arrives on this FIFO into its own log.
        fd = os.open("log", os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK | os.O_CLOEXEC)
        os.set_blocking(fd, True)
        os.dup2(fd, 2)
        os.close(fd)
    logs.setup("kata-py shim", args.debug)
    asyncio.run(serve(args))
    return 0


def main() -> None:
    args = parse_args(sys.argv[1:])
    try:
        if args.action == "start":
            sys.exit(start(args))
        if args.action == "delete":
            sys.exit(delete(args))
        if args.action:
            print(f"{BINARY}: unknown action {args.action!r}", file=sys.stderr)
            sys.exit(2)
        sys.exit(_serve_main(args))
    except Exception as e:
        print(f"{BINARY}: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
