"""microvm.logs: at --debug, kata-py's records and not the libraries' chatter."""

from __future__ import annotations

import logging

import pytest

from microvm.logs import _Quiet


@pytest.mark.parametrize(("name", "level", "shown"), [
    ("microvm.core.sandbox", logging.DEBUG, True),
    ("shim", logging.DEBUG, True),
    ("pyroute2.netlink.core", logging.DEBUG, False),
    ("pyroute2", logging.INFO, False),
    ("pyroute2.netlink.core", logging.WARNING, True),
    ("asyncio", logging.DEBUG, False),
    ("qemu.qmp.protocol", logging.INFO, False),
    ("qemu.qmp.protocol", logging.ERROR, True),
    ("pyroute2x", logging.DEBUG, True),   # a prefix of a name is not its package
])
def test_library_chatter_is_dropped(name: str, level: int, shown: bool) -> None:
    record = logging.LogRecord(name, level, __file__, 1, "m", None, None)
    assert _Quiet().filter(record) is shown
