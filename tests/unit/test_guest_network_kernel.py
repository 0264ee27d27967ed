"""guest.network's two ways of setting up an interface, on a real kernel:
the ioctls the agent uses for a pod's usual network, and busybox's `ip`
for the rest, each in a network namespace this test makes (a veth pair
stands in for the guest's virtio-net card).  Both must leave the same
links, addresses and routes, which `ip` then reads back."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from guest import network
from microvm.protocol import agent_pb2
from tests.netns import namespace, sh

REPO = Path(__file__).resolve().parents[2]
MAC = "02:aa:bb:cc:dd:01"

pytestmark = pytest.mark.skipif(shutil.which("busybox") is None, reason="busybox not installed")

# Run inside the namespace: set v0 up as the agent would, by way.
SCRIPT = """
import asyncio, json, subprocess, sys
from guest import network
from microvm.protocol import agent_pb2
req = agent_pb2.NetworkConfig.FromString(bytes.fromhex(sys.argv[2]))
# v1 is the veth's other end, not the guest's: the guest has one card, v0.
names = {mac: n for mac, n in network.interfaces_by_mac().items() if n != "v1"}
network._no_dad(list(names.values()))
indexes = {n: network._ifindex(n) for n in names.values()}
macs = network.adopt_macs(req, names, indexes)
if sys.argv[1] == "ioctl":
    network.apply_by_ioctl(req, names, macs, indexes)
else:
    ip = list(req.ip_command)
    for name, mac in macs:
        subprocess.run([*ip, "link", "set", "dev", name, "address", mac], check=True)
    for argv in network.commands(req, names):
        subprocess.run(argv, check=True)
"""


def _request(**kw: object) -> agent_pb2.NetworkConfig:
    itf = agent_pb2.NetworkInterface(mac=MAC, mtu=1400, name="eth0",
                                     addresses=["10.77.0.2/24", "fd00:77::2/64"])
    routes = [agent_pb2.NetworkRoute(gateway="10.77.0.1", device_mac=MAC),
              agent_pb2.NetworkRoute(dest="10.78.0.0/16", device_mac=MAC, scope=253, metric=5),
              agent_pb2.NetworkRoute(dest="10.79.0.0/16", gateway="10.77.0.9", device_mac=MAC,
                                     metric=100),
              agent_pb2.NetworkRoute(gateway="fd00:77::1", device_mac=MAC, ipv6=True,
                                     metric=1024),
              agent_pb2.NetworkRoute(dest="fd00:99::/64", device_mac=MAC, ipv6=True)]
    base: dict[str, object] = {"interfaces": [itf], "routes": routes,
                               "ip_command": ["busybox", "ip"]}
    base.update(kw)
    return agent_pb2.NetworkConfig(**base)  # type: ignore[arg-type]


def _configured(way: str, req: agent_pb2.NetworkConfig) -> dict[str, object]:
    with namespace("kt-gnet") as ns:
        sh("ip", "link", "add", "v0", "address", "02:6b:70:00:00:00", "type", "veth",
           "peer", "name", "v1", ns=ns)
        sh("ip", "link", "set", "v1", "up", ns=ns)
        r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", SCRIPT, way,
                            req.SerializeToString().hex()], capture_output=True, text=True,
                           cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/sbin:/usr/bin"})
        assert r.returncode == 0, r.stderr
        link = json.loads(sh("ip", "-j", "link", "show", "v0", ns=ns).stdout)[0]
        addrs = json.loads(sh("ip", "-j", "addr", "show", "v0", ns=ns).stdout)[0]
        routes = {fam: sorted(
            " ".join(f"{k}={v}" for k, v in sorted(r.items()) if k not in ("flags",))
            for r in json.loads(sh("ip", "-j", fam, "route", "show", "dev", "v0", ns=ns).stdout)
            if r.get("protocol") != "kernel")
            for fam in ("-4", "-6")}
        return {"mac": link["address"], "mtu": link["mtu"], "up": "UP" in link["flags"],
                "addresses": sorted(f"{a['local']}/{a['prefixlen']}" for a in addrs["addr_info"]
                                    if a.get("scope") == "global"),
                "routes": routes}


def test_the_ioctls_leave_what_ip_leaves() -> None:
    req = _request()
    assert network.by_ioctl(req)
    by_ioctl, by_ip = _configured("ioctl", req), _configured("ip", req)
    assert by_ioctl == by_ip
    assert by_ioctl["mac"] == MAC and by_ioctl["mtu"] == 1400 and by_ioctl["up"]
    assert by_ioctl["addresses"] == ["10.77.0.2/24", "fd00:77::2/64"]
    assert any("dst=default gateway=10.77.0.1" in r for r in by_ioctl["routes"]["-4"])  # type: ignore[index]
    assert any("metric=100" in r for r in by_ioctl["routes"]["-4"])  # type: ignore[index]


def test_what_the_ioctls_cannot_say_goes_to_ip() -> None:
    two = _request()
    two.interfaces[0].addresses.append("10.77.1.2/24")
    assert not network.by_ioctl(two)
    src = _request()
    src.routes[1].source = "10.77.0.2"
    assert not network.by_ioctl(src)
    host_scope = _request()
    host_scope.routes[1].scope = 254
    assert not network.by_ioctl(host_scope)
    assert _configured("ip", two)["addresses"] == ["10.77.0.2/24", "10.77.1.2/24",
                                                   "fd00:77::2/64"]


def test_a_refused_step_is_one_line_naming_it() -> None:
    bad = _request(routes=[agent_pb2.NetworkRoute(gateway="10.99.0.1", device_mac=MAC)])
    with pytest.raises(AssertionError, match="route add default via 10.99.0.1 dev v0: "
                                             "Network is unreachable"):
        _configured("ioctl", bad)


def test_struct_sizes_are_the_kernels() -> None:
    import struct
    assert struct.calcsize(network.RTENTRY) == 120      # struct rtentry, x86-64
    assert struct.calcsize(network.IN6_RTMSG) == 80     # struct in6_rtmsg
    assert struct.calcsize(network.IN6_IFREQ) == 24     # struct in6_ifreq
    for f in (network.IFREQ_ADDR4, network.IFREQ_INT, network.IFREQ_SHORT, network.IFREQ_HWADDR):
        assert struct.calcsize(f) == 40                 # struct ifreq
