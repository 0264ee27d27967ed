"""The fork server's program (microvm/forkserver.py): what it imports once,
and what each kind of request runs in its child.  It is in the CLI layer
because it runs both front ends: the shim's daemon and `delete`, and
`microvm` itself.

  python -m microvm.cli.warm FD KIND   (FD: the listening socket its maker
                                       bound; KIND: what the maker asks for)
"""

from __future__ import annotations

import importlib
import sys

from microvm import forkserver


def warm(kind: str) -> None:
    """What the children import, at start and later: the network plumbing's
    pyroute2 parts (30 ms), templates, asyncio's thread pool; and the CLI,
    for a server a `microvm run` made.  Not for containerd's: with the CLI's
    modules imported too, a CRI pod took 0.75 s against 0.69 s (why, not
    found); a `microvm run` there imports them itself."""
    names = ["microvm.shim.daemon", "microvm.shim.cleanup", "microvm.net.tcfilter",
             "microvm.net.portforward", "microvm.net.bridge", "microvm.vm.template",
             "concurrent.futures.thread"]
    names += ["microvm.cli.spare", "microvm.core.spare"]  # the server's checks, the spares
    if kind == "cli":
        names[:0] = ["microvm.cli.commands", "microvm.cli.entry"]
    for name in names:
        importlib.import_module(name)


def accepts(kind: str, argv: list[str]) -> bool:
    """A daemon request has no action, a delete request is `delete`; the
    shim's `start` is never forked (it is what asks)."""
    if kind == "cli":
        return True
    from microvm.shim.manager import parse_args
    return parse_args(argv).action == ("" if kind == "daemon" else kind)


def run(kind: str, argv: list[str]) -> int:
    if kind == "cli":
        from microvm.cli import commands
        sys.argv = ["microvm", *argv]
        try:
            commands.main()
            return 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                return e.code or 0
            print(e.code, file=sys.stderr)
            return 1
    from microvm.shim import manager
    sys.argv = [manager.BINARY, *argv]
    return manager.act(manager.parse_args(argv))


if __name__ == "__main__":
    from microvm.cli import spare
    forkserver.serve(forkserver.Program(warm, accepts, run, spare.shape, spare.fits,
                                        spare.prepare))
