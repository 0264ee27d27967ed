"""The guest's network: the same MACs, addresses, routes and MTU as the
host namespace's veths (microvm/net/tcfilter.py reads them there).

Interfaces are matched by MAC (QEMU gives each virtio-net device its veth's
MAC).  What the classic socket ioctls can say (the MAC, MTU and up; one
IPv4 and any IPv6 addresses per interface; routes without a preferred
source) is set with them, from the agent itself: a pod's usual network, in
0.06 s where spawning busybox's `ip` per step cost a clone 0.16 s under TCG
(docs/benchmarks.md).  Anything more goes, whole, to busybox's `ip` from the
guest image.  Importing pyroute2 would cost the guest about a second and a
half under TCG.  The loopback is one ioctl too.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct
from collections.abc import Awaitable, Callable

from microvm.protocol import agent_pb2

# linux/sockios.h, linux/if.h, linux/route.h, linux/rtnetlink.h
SIOCGIFFLAGS, SIOCSIFFLAGS = 0x8913, 0x8914
SIOCSIFADDR, SIOCSIFNETMASK, SIOCSIFMTU, SIOCSIFHWADDR = 0x8916, 0x891C, 0x8922, 0x8924
SIOCADDRT = 0x890B
IFF_UP = 0x1
ARPHRD_ETHER = 1
RTF_UP, RTF_GATEWAY = 0x1, 0x2
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK = 0, 253
# struct ifreq (40 bytes): the name, then a sockaddr, int or short.
IFREQ_ADDR4, IFREQ_INT, IFREQ_SHORT, IFREQ_HWADDR = "16sHH4s16x", "16si20x", "16sH22x", "16sH6s16x"
IN6_IFREQ = "=16sIi"                               # address, prefix length, ifindex
RTENTRY = "=Q16s16s16sHh4xQQh6xQQQH6x"             # struct rtentry, x86-64: 120 bytes
IN6_RTMSG = "=16s16s16sIHHI4xQIi"                  # struct in6_rtmsg: 80 bytes

Runner = Callable[[list[str]], Awaitable[tuple[int, str]]]


class NetworkError(Exception):
    pass


def loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifr = fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack(IFREQ_SHORT, b"lo", 0))
        flags = struct.unpack(IFREQ_SHORT, ifr)[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack(IFREQ_SHORT, b"lo", flags | IFF_UP))


def interfaces_by_mac(sys_net: str = "/sys/class/net") -> dict[str, str]:
    found = {}
    for name in os.listdir(sys_net):
        try:
            with open(f"{sys_net}/{name}/address") as f:
                found[f.read().strip().lower()] = name
        except OSError:
            continue
    return found


def _ifindex(name: str, sys_net: str = "/sys/class/net") -> int:
    try:
        with open(f"{sys_net}/{name}/ifindex") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 30


def adopt_macs(req: agent_pb2.NetworkConfig, names: dict[str, str],
               order: dict[str, int]) -> list[tuple[str, str]]:
    """A VM cloned from a template has the template's MACs: give the
    interfaces nobody asked for, in device order, the MACs nobody has.
    Updates names; returns the (interface, MAC) pairs to set."""
    wanted = [itf.mac.lower() for itf in req.interfaces]
    missing = [mac for mac in wanted if mac not in names]
    spare = sorted((n for mac, n in names.items() if mac not in wanted and n != "lo"
                    and mac != "00:00:00:00:00:00"), key=lambda n: order.get(n, 1 << 30))
    out = []
    for mac, name in zip(missing, spare, strict=False):
        out.append((name, mac))
        names[mac] = name
    return out


def _interface_name(names: dict[str, str], itf: agent_pb2.NetworkInterface) -> str:
    name = names.get(itf.mac.lower())
    if name is None:
        raise NetworkError(f"no guest interface has MAC {itf.mac} ({itf.name})")
    return name


def _route_device(names: dict[str, str], route: agent_pb2.NetworkRoute) -> str:
    name = names.get(route.device_mac.lower())
    if name is None:
        raise NetworkError(f"route {route.dest or 'default'}: no interface {route.device_mac}")
    return name


def commands(req: agent_pb2.NetworkConfig, names: dict[str, str]) -> list[list[str]]:
    """The `ip` invocations, in an order the kernel accepts: links up with
    their addresses, then routes without a gateway, then those through one."""
    ip = list(req.ip_command)
    out: list[list[str]] = []
    for itf in req.interfaces:
        name = _interface_name(names, itf)
        out.append([*ip, "link", "set", "dev", name, "mtu", str(itf.mtu), "up"])
        out += [[*ip, "addr", "add", a, "dev", name] for a in itf.addresses]
    for route in sorted(req.routes, key=lambda r: bool(r.gateway)):
        name = _route_device(names, route)
        argv = [*ip, *(["-6"] if route.ipv6 else []), "route", "add",
                route.dest or "default"]
        if route.gateway:
            argv += ["via", route.gateway]
        argv += ["dev", name]
        if route.source:
            argv += ["src", route.source]
        if route.metric:
            argv += ["metric", str(route.metric)]
        if route.scope == RT_SCOPE_LINK:
            argv += ["scope", "link"]
        out.append(argv)
    return out


def _no_dad(names: list[str]) -> None:
    """The addresses are the host's, already unique: usable at once, not
    after a second or more of duplicate address detection."""
    for name in ["all", "default", *names]:
        try:
            with open(f"/proc/sys/net/ipv6/conf/{name}/accept_dad", "w") as f:
                f.write("0")
        except OSError:
            pass


def by_ioctl(req: agent_pb2.NetworkConfig) -> bool:
    """Whether the ioctls can say all of req: at most one IPv4 address per
    interface (a second needs a label), and routes without a preferred
    source, in the scope the kernel gives them (link without a gateway)."""
    for itf in req.interfaces:
        if sum(":" not in a for a in itf.addresses) > 1:
            return False
    for r in req.routes:
        if r.source:
            return False
        if not r.ipv6 and r.scope != (RT_SCOPE_UNIVERSE if r.gateway else RT_SCOPE_LINK):
            return False
    return True


def _ioctl(sock: socket.socket, request: int, arg: bytes, what: str) -> bytes:
    try:
        return fcntl.ioctl(sock, request, arg)
    except OSError as e:
        raise NetworkError(f"{what}: {e.strerror}") from None


def _cidr(text: str, v6: bool) -> tuple[bytes, int]:
    """"10.88.0.2/24" (or "" for the default route) as the packed address and
    the prefix length (ipaddress would cost every cold boot its import)."""
    addr, _, plen = text.partition("/")
    packed = socket.inet_pton(socket.AF_INET6 if v6 else socket.AF_INET,
                              addr or ("::" if v6 else "0.0.0.0"))
    return packed, int(plen) if plen else (len(packed) * 8 if addr else 0)


def _sin(packed: bytes) -> bytes:
    return struct.pack("HH4s8x", socket.AF_INET, 0, packed)


def _netmask(plen: int) -> bytes:
    return struct.pack("!I", (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF)


def _interface(name: str, index: int, mtu: int, addresses: list[str], s4: socket.socket,
               s6: socket.socket) -> None:
    n = name.encode()
    _ioctl(s4, SIOCSIFMTU, struct.pack(IFREQ_INT, n, mtu), f"link set dev {name} mtu {mtu}")
    flags = struct.unpack(IFREQ_SHORT, _ioctl(s4, SIOCGIFFLAGS, struct.pack(IFREQ_SHORT, n, 0),
                                              f"link show {name}"))[1]
    _ioctl(s4, SIOCSIFFLAGS, struct.pack(IFREQ_SHORT, n, flags | IFF_UP),
           f"link set dev {name} up")
    for a in addresses:
        what = f"addr add {a} dev {name}"
        v6 = ":" in a
        packed, plen = _cidr(a, v6)
        if v6:
            _ioctl(s6, SIOCSIFADDR, struct.pack(IN6_IFREQ, packed, plen, index), what)
        else:
            _ioctl(s4, SIOCSIFADDR, struct.pack(IFREQ_ADDR4, n, socket.AF_INET, 0, packed), what)
            _ioctl(s4, SIOCSIFNETMASK, struct.pack(IFREQ_ADDR4, n, socket.AF_INET, 0,
                                                   _netmask(plen)), what)


def _route(r: agent_pb2.NetworkRoute, name: str, index: int, s4: socket.socket,
           s6: socket.socket) -> None:
    dest, plen = _cidr(r.dest, r.ipv6)
    gateway = _cidr(r.gateway, r.ipv6)[0]
    what = (f"{'-6 ' if r.ipv6 else ''}route add {r.dest or 'default'}"
            f"{f' via {r.gateway}' if r.gateway else ''} dev {name}")
    flags = RTF_UP | (RTF_GATEWAY if r.gateway else 0)
    if r.ipv6:
        _ioctl(s6, SIOCADDRT, struct.pack(IN6_RTMSG, dest, bytes(16), gateway, 0, plen, 0,
                                          r.metric, 0, flags, index), what)
        return
    dev = ctypes.create_string_buffer(name.encode())  # rt_dev points at it
    # The kernel takes rt_metric - 1 as the priority (route(8) adds the 1).
    _ioctl(s4, SIOCADDRT, struct.pack(
        RTENTRY, 0, _sin(dest), _sin(gateway), _sin(_netmask(plen)), flags, 0, 0, 0,
        r.metric + 1 if r.metric else 0, ctypes.addressof(dev), 0, 0, 0), what)


def apply_by_ioctl(req: agent_pb2.NetworkConfig, names: dict[str, str],
                   macs: list[tuple[str, str]], indexes: dict[str, int]) -> None:
    """The MACs, then links up with their addresses, then routes without a
    gateway, then those through one (the order `commands` keeps).  indexes:
    the interfaces' ifindex by name, as configure read them."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s4, \
            socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s6:
        for name, mac in macs:
            _ioctl(s4, SIOCSIFHWADDR, struct.pack(IFREQ_HWADDR, name.encode(), ARPHRD_ETHER,
                                                  bytes.fromhex(mac.replace(":", ""))),
                   f"link set dev {name} address {mac}")
        for itf in req.interfaces:
            name = _interface_name(names, itf)
            _interface(name, indexes[name], itf.mtu, list(itf.addresses), s4, s6)
        for route in sorted(req.routes, key=lambda r: bool(r.gateway)):
            name = _route_device(names, route)
            _route(route, name, indexes[name], s4, s6)


async def configure(req: agent_pb2.NetworkConfig, run: Runner) -> None:
    if not req.interfaces:
        return
    names = interfaces_by_mac()
    _no_dad(list(names.values()))
    indexes = {n: _ifindex(n) for n in names.values()}
    macs = adopt_macs(req, names, indexes)
    if by_ioctl(req):
        apply_by_ioctl(req, names, macs, indexes)
        return
    if not req.ip_command:
        raise NetworkError("no ip command given")
    ip = list(req.ip_command)
    renames = [[*ip, "link", "set", "dev", name, "address", mac] for name, mac in macs]
    for argv in renames + commands(req, names):
        code, output = await run(argv)
        if code != 0:
            raise NetworkError(f"{' '.join(argv[1:])}: {output.strip() or f'exit {code}'}")
