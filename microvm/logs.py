"""Logging for the CLI and the shim: ours at --debug, not the libraries'
own chatter (pyroute2 logs every netlink message at DEBUG, qemu.qmp every
QMP message, asyncio its selector), which would bury what kata-py does.

A filter on the handler, not logger levels: pyroute2 resets its logger's
level when it is imported, which is after set-up.
"""

from __future__ import annotations

import logging
import sys

# Library -> the lowest level of its records that reach the log.
_FLOOR = {"pyroute2": logging.WARNING, "asyncio": logging.WARNING, "qemu.qmp": logging.WARNING}


class _Quiet(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for name, floor in _FLOOR.items():
            if record.name == name or record.name.startswith(name + "."):
                return record.levelno >= floor
        return True


def setup(prefix: str, debug: bool) -> None:
    # At --debug, the time to the millisecond: where a start's time goes.
    stamp = "%(asctime)s.%(msecs)03d " if debug else ""
    logging.basicConfig(stream=sys.stderr, format=f"{stamp}{prefix} %(levelname)s: %(message)s",
                        datefmt="%H:%M:%S", level=logging.DEBUG if debug else logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_Quiet())
    if not debug:
        # qemu.qmp logs every lost connection at ERROR; our own errors say enough.
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
