"""guest.network.commands: the busybox ip invocations that copy the host
namespace's interfaces and routes into the guest."""

from __future__ import annotations

import pytest

from guest.network import NetworkError, commands
from microvm.protocol import agent_pb2

IP = ["/bin/busybox", "ip"]
MAC = "AA:BB:CC:00:00:01"


def config(**kw: object) -> agent_pb2.NetworkConfig:
    base = {"interfaces": [agent_pb2.NetworkInterface(
        mac=MAC, mtu=1400, name="eth0", addresses=["10.88.0.2/24", "fd00:88::2/64"])],
        "ip_command": IP}
    base.update(kw)
    return agent_pb2.NetworkConfig(**base)  # type: ignore[arg-type]


def test_links_addresses_then_routes_gatewayless_first() -> None:
    routes = [agent_pb2.NetworkRoute(gateway="10.88.0.1", device_mac=MAC),
              agent_pb2.NetworkRoute(dest="fd00:99::/64", gateway="fd00:88::1",
                                     device_mac=MAC, ipv6=True, metric=1024),
              agent_pb2.NetworkRoute(dest="10.88.1.0/24", device_mac=MAC, scope=253,
                                     source="10.88.0.2")]
    got = [argv[2:] for argv in commands(config(routes=routes), {MAC.lower(): "eth1"})]
    assert got == [
        ["link", "set", "dev", "eth1", "mtu", "1400", "up"],
        ["addr", "add", "10.88.0.2/24", "dev", "eth1"],
        ["addr", "add", "fd00:88::2/64", "dev", "eth1"],
        ["route", "add", "10.88.1.0/24", "dev", "eth1", "src", "10.88.0.2", "scope", "link"],
        ["route", "add", "default", "via", "10.88.0.1", "dev", "eth1"],
        ["-6", "route", "add", "fd00:99::/64", "via", "fd00:88::1", "dev", "eth1",
         "metric", "1024"],
    ]
    assert all(argv[:2] == IP for argv in commands(config(routes=routes), {MAC.lower(): "e"}))


def test_unknown_mac_is_an_error() -> None:
    with pytest.raises(NetworkError, match="no guest interface has MAC"):
        commands(config(), {"02:00:00:00:00:09": "eth0"})
    bad_route = [agent_pb2.NetworkRoute(gateway="10.0.0.1", device_mac="02:00:00:00:00:09")]
    with pytest.raises(NetworkError, match="route default: no interface"):
        commands(config(routes=bad_route), {MAC.lower(): "eth0"})
