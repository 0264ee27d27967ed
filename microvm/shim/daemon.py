"""The shim daemon: containerd's Task API (and our Monitor service) on the
socket `start` bound, over one Sandbox, in a mount namespace of its own."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from pathlib import Path

import setproctitle

from microvm import linux, logs
from microvm.core import mountns, spare
from microvm.protocol import MONITOR_SERVICE, monitor_pb2, task_pb2, ttrpc
from microvm.shim.events import Publisher
from microvm.shim.manager import BINARY, Args
from microvm.shim.monitor import MonitorService
from microvm.shim.task_service import SERVICE, TaskService

log = logging.getLogger(__name__)


async def serve(args: Args) -> None:
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
    log.debug("serving %s", args.id)
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


def serve_main(args: Args) -> int:
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
    spare.run(serve(args))  # on a spare's loop, if this runner held one
    return 0
