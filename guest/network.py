"""The guest's network: the same MACs, addresses, routes and MTU as the
host namespace's veths (microvm/net/tcfilter.py reads them there).

Interfaces are matched by MAC (QEMU gives each virtio-net device its veth's
MAC) and set up with busybox's `ip`, which the host shares read-only into
sandboxes that have a network: importing pyroute2 would cost the guest about
a second and a half under TCG, and a busybox in the guest image would slow
every boot, networked or not.  The loopback needs no tool: one ioctl.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
from collections.abc import Awaitable, Callable

from microvm.protocol import agent_pb2

SIOCGIFFLAGS, SIOCSIFFLAGS = 0x8913, 0x8914
IFF_UP = 0x1
RT_SCOPE_LINK = 253

Runner = Callable[[list[str]], Awaitable[tuple[int, str]]]


class NetworkError(Exception):
    pass


def loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifr = fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sH14x", b"lo", 0))
        flags = struct.unpack("16sH14x", ifr)[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


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
               order: dict[str, int]) -> list[list[str]]:
    """A VM cloned from a template has the template's MACs: give the
    interfaces nobody asked for, in device order, the MACs nobody has.
    Updates names; returns the `ip link set ... address` invocations."""
    wanted = [itf.mac.lower() for itf in req.interfaces]
    missing = [mac for mac in wanted if mac not in names]
    spare = sorted((n for mac, n in names.items() if mac not in wanted and n != "lo"
                    and mac != "00:00:00:00:00:00"), key=lambda n: order.get(n, 1 << 30))
    out = []
    for mac, name in zip(missing, spare, strict=False):
        out.append([*req.ip_command, "link", "set", "dev", name, "address", mac])
        names[mac] = name
    return out


def commands(req: agent_pb2.NetworkConfig, names: dict[str, str]) -> list[list[str]]:
    """The `ip` invocations, in an order the kernel accepts: links up with
    their addresses, then routes without a gateway, then those through one."""
    ip = list(req.ip_command)
    out: list[list[str]] = []
    for itf in req.interfaces:
        name = names.get(itf.mac.lower())
        if name is None:
            raise NetworkError(f"no guest interface has MAC {itf.mac} ({itf.name})")
        out.append([*ip, "link", "set", "dev", name, "mtu", str(itf.mtu), "up"])
        out += [[*ip, "addr", "add", a, "dev", name] for a in itf.addresses]
    for route in sorted(req.routes, key=lambda r: bool(r.gateway)):
        name = names.get(route.device_mac.lower())
        if name is None:
            raise NetworkError(f"route {route.dest or 'default'}: no interface "
                               f"{route.device_mac}")
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


async def configure(req: agent_pb2.NetworkConfig, run: Runner) -> None:
    if not req.interfaces:
        return
    if not req.ip_command:
        raise NetworkError("no ip command given")
    names = interfaces_by_mac()
    _no_dad(list(names.values()))
    renames = adopt_macs(req, names, {n: _ifindex(n) for n in names.values()})
    for argv in renames + commands(req, names):
        code, output = await run(argv)
        if code != 0:
            raise NetworkError(f"{' '.join(argv[1:])}: {output.strip() or f'exit {code}'}")
