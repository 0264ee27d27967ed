"""The shim's `delete` action: what containerd runs after a task, even when
its shim is gone (SIGKILLed): release the task if a shim still serves it,
then remove what a dead shim left (rootfs mount, the veths' redirects and
port-forward rule, the pod's host cgroup).  Idempotent, quiet, fast."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

from microvm import linux
from microvm.core import hostcgroup, oci
from microvm.protocol import task_pb2
from microvm.shim.client import TaskClient
from microvm.shim.events import timestamp
from microvm.shim.manager import Args, alive


def delete(args: Args) -> int:
    """Clean up after a task whose shim may be gone; idempotent, quiet, fast."""
    bundle = Path(args.bundle) if args.bundle else Path.cwd()
    try:
        address = (bundle / "address").read_text().strip()
    except OSError:
        address = ""
    path = Path(address.removeprefix("unix://")) if address else None
    if path is not None and not alive(path):
        path.unlink(missing_ok=True)
    # A shim that still serves this id is asked to let it go; one serving
    # only other containers of the pod is left alone.
    if path is not None and alive(path):
        with contextlib.suppress(Exception):
            asyncio.run(asyncio.wait_for(_release(path, args), 4))
    rootfs = bundle / "rootfs"
    with contextlib.suppress(OSError):
        if os.path.ismount(rootfs):
            linux.umount(str(rootfs), linux.MNT_DETACH)
    # A SIGKILLed shim's VM took its taps along; the veths' redirects and the
    # pod's (now empty) host cgroup remain.
    netns, cgroups_path = oci.read_bundle_linux(bundle)
    if path is None or not alive(path):
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
