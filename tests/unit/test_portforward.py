"""microvm.net.portforward's rule and listener, in a network namespace of the
test's own (real iptables, real sockets; no VM)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from microvm.net import netlink, portforward
from tests.netns import namespace, sh


@pytest.fixture
def ns() -> Iterator[str]:
    with namespace("kt-pf") as name:
        yield f"/var/run/netns/{name}"


def _rules(path: str) -> list[str]:
    out = sh("nsenter", f"--net={path}", "iptables", "-t", "nat", "-S", "OUTPUT").stdout
    return [line for line in out.splitlines() if portforward.COMMENT in line]


def test_one_rule_whoever_set_it_last(ns: str) -> None:
    portforward.redirect(ns, 40001)
    portforward.redirect(ns, 40002)  # a killed owner's rule would shadow ours
    assert len(_rules(ns)) == 1 and "--to-ports 40002" in _rules(ns)[0]
    assert portforward.unredirect(ns) == 1
    assert _rules(ns) == [] and portforward.unredirect(ns) == 0


def test_any_loopback_port_reaches_the_listener_with_its_port(ns: str) -> None:
    def work() -> tuple[int, int]:
        listener = portforward._listen()
        listener.setblocking(True)
        try:
            portforward.redirect(ns, listener.getsockname()[1])
            client = socket.create_connection(("127.0.0.1", 9999), timeout=5)
            conn, _ = listener.accept()
            with client, conn:
                return portforward.original_port(conn), listener.getsockname()[1]
        finally:
            listener.close()

    port, listening = netlink.in_namespace(work, ns)
    assert port == 9999 and listening != 9999
    portforward.unredirect(ns)
