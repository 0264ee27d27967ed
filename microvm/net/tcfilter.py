"""Kata's "tcfilter" interworking: a tap beside every veth, joined by tc.

Given a network namespace that containerd, CNI or the CLI prepared, read
what each veth has (MAC, MTU, addresses, routes) for the guest to copy, then
for each veth open a tap in the same namespace and redirect all traffic
both ways with an ingress qdisc and a u32 match-everything filter with a
mirred egress redirect (matchall is missing on some kernels, these
machines' among them).  All netlink goes through pyroute2.

Ownership: the tap is opened here, not made persistent, so it exists only
while its fds are open: QEMU's copies, and ours until the VM has them.
When QEMU dies, even by SIGKILL, the tap and its own qdisc go with it.  The
ingress qdisc on the veth is the one thing left to remove: `teardown` does
it, and `plumb` replaces a stale one that a killed owner left behind.
A namespace that is not ours (`--network ns:PATH`) may see no later
sandbox: each plumbing leaves a claim file naming its owner (pid and start
time) and the namespace, removed by teardown, and `prune_claims` (system
prune, a shim's delete) undoes what owners that are gone left.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyroute2.iproute.linux import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ifinfmsg import IFT_MULTI_QUEUE, IFT_NO_PI, IFT_TAP, IFT_VNET_HDR
from pyroute2.netlink.rtnl.ifinfmsg.tuntap import TUNSETIFF

from microvm import owner, paths
from microvm.errors import KataError
from microvm.net import netlink

log = logging.getLogger(__name__)

ETH_P_ALL = 0x0003
INGRESS = 0xFFFF0000
RTPROT_KERNEL = 2          # routes the kernel made from an address: the guest makes its own
RT_SCOPE_LINK = 253
MAIN_TABLE = 254

@dataclass(frozen=True)
class Address:
    ip: str
    prefixlen: int
    family: int

    @property
    def cidr(self) -> str:
        return f"{self.ip}/{self.prefixlen}"


@dataclass(frozen=True)
class Route:
    dest: str                  # CIDR, or "" for the default route
    gateway: str = ""
    device: str = ""           # the host interface's name (the guest's is found by MAC)
    source: str = ""
    scope: int = 0
    family: int = socket.AF_INET
    metric: int = 0


@dataclass
class Interface:
    name: str
    index: int
    mac: str
    mtu: int
    addresses: list[Address] = field(default_factory=list)
    tap: str = ""
    tap_fds: list[int] = field(default_factory=list)


@dataclass
class Network:
    """What one namespace offers the guest, and the taps made for it."""

    path: str
    interfaces: list[Interface] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
    claim: str = ""            # our claim file, while plumbed

    def close_fds(self) -> None:
        """Ours only; QEMU keeps its own copies (and so the taps) alive."""
        for itf in self.interfaces:
            for fd in itf.tap_fds:
                os.close(fd)
            itf.tap_fds = []


def usable_netns(path: str) -> str | None:
    """The namespace to take over, or None for loopback only.

    Never our own (a spec with no network namespace, as `--net-host`, would
    name none, and the host's veths must never be redirected into a VM)."""
    if not path:
        return None
    try:
        theirs, ours = os.stat(path), os.stat("/proc/self/ns/net")
    except FileNotFoundError:
        raise KataError(f"network namespace {path} does not exist") from None
    except OSError as e:
        raise KataError(f"network namespace {path}: {e.strerror}") from None
    if (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino):
        log.warning("%s is the host's network namespace: the guest gets loopback only", path)
        return None
    return path


def clean_stale(path: str) -> bool:
    """After a killed owner (the shim's delete, prune): the veths' ingress
    qdiscs and the port-forward rule, if no tap of ours lives in the
    namespace any more.  Whether anything was removed."""

    def work(ipr: IPRoute) -> bool | None:
        names = [link.get("ifname") for link in ipr.get_links()]
        if any(n.startswith("tap") and n.endswith("_kata") for n in names):
            return None  # a sandbox still runs there
        removed = [_del_ingress(ipr, link["index"]) for link in ipr.get_links()
                   if _kind(link) == "veth"]
        return any(removed)

    try:
        removed = netlink.run(work, path)
    except (KataError, NetlinkError) as e:
        log.debug("clean-up in %s: %s", path, e)
        return False
    if removed is None:
        return False
    from microvm.net import portforward
    return portforward.unredirect(path) > 0 or removed


def _kind(link: Any) -> str | None:
    return link.get(("linkinfo", "kind"))  # type: ignore[no-any-return]


def discover(ipr: IPRoute, path: str) -> Network:
    """The veths of the namespace ipr speaks to, with addresses and routes."""
    net = Network(path)
    for link in ipr.get_links():
        if _kind(link) != "veth":
            continue
        net.interfaces.append(Interface(link.get("ifname"), link["index"],
                                        link.get("address"), link.get("mtu")))
    by_index = {i.index: i for i in net.interfaces}
    for a in ipr.get_addr():
        itf = by_index.get(a["index"])
        # IPv6 link-local addresses come from the MAC: the guest makes the same.
        if itf is None or (a["family"] == socket.AF_INET6 and a["scope"] == RT_SCOPE_LINK):
            continue
        itf.addresses.append(Address(a.get("address"), a["prefixlen"], a["family"]))
    for family in (socket.AF_INET, socket.AF_INET6):
        for r in ipr.get_routes(family=family, table=MAIN_TABLE):
            itf = by_index.get(r.get("oif"))
            if itf is None or r["proto"] == RTPROT_KERNEL or r["type"] != 1:  # unicast only
                continue
            dest = f"{r.get('dst')}/{r['dst_len']}" if r["dst_len"] else ""
            net.routes.append(Route(dest, r.get("gateway") or "", itf.name,
                                    r.get("prefsrc") or "", r["scope"], family,
                                    r.get("priority") or 0))
    return net


def _open_tap(name: str, queues: int) -> list[int]:
    """A tap in this thread's namespace, one fd per queue; not persistent."""
    flags = IFT_TAP | IFT_NO_PI | IFT_VNET_HDR | (IFT_MULTI_QUEUE if queues > 1 else 0)
    fds: list[int] = []
    try:
        for _ in range(queues):
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
            fds.append(fd)
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), flags))
    except OSError as e:
        for fd in fds:
            os.close(fd)
        raise KataError(f"cannot open tap {name}: {e.strerror}") from None
    return fds


def _redirect(ipr: IPRoute, src: int, dst: int) -> None:
    ipr.tc("add", "ingress", index=src)
    ipr.tc("add-filter", "u32", index=src, parent=INGRESS, protocol=ETH_P_ALL,
           target=0x1, keys=["0x0/0x0+0"],
           action={"kind": "mirred", "direction": "egress", "action": "redirect",
                   "ifindex": dst})


def _del_ingress(ipr: IPRoute, index: int) -> bool:
    """Whether there was one to remove."""
    try:
        ipr.tc("del", "ingress", index=index)
    except NetlinkError as e:
        # Gone already: no qdisc (EINVAL/ENOENT) or no device (ENODEV).
        if e.code not in (errno.EINVAL, errno.ENOENT, errno.ENODEV):
            raise
        return False
    return True


@dataclass
class SpareTaps:
    """Taps opened ahead of need, for a spare VM's QEMU (microvm/core/spare.py),
    in a network namespace of their own that only nsfd keeps (QEMU's fds
    keep the taps, not it): once nsfd is closed it goes, and any tap still
    in it.  plumb moves them to where they serve, then closes it."""

    nsfd: int
    taps: list[tuple[str, list[int]]]

    @property
    def path(self) -> str:
        return f"/proc/{os.getpid()}/fd/{self.nsfd}"

    def close_fds(self) -> None:
        """Ours of the taps' (QEMU has its own once it runs)."""
        for _, fds in self.taps:
            for fd in fds:
                os.close(fd)
        self.taps = [(name, []) for name, _ in self.taps]

    def close(self) -> None:
        self.close_fds()
        if self.nsfd >= 0:
            os.close(self.nsfd)
            self.nsfd = -1


def spare_taps(count: int, queues: int) -> SpareTaps:
    """count taps as plumb names them, in a fresh network namespace (made
    by a thread of its own, which ends: nothing else of ours is in it)."""
    from microvm import linux

    def work() -> SpareTaps:
        # A spare gets ready as SCHED_IDLE; this thread holds the kernel's
        # network locks a moment, which other pods' plumbing waits for: not
        # at a priority that anything else may starve.
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        try:
            linux.unshare(linux.CLONE_NEWNET)
        except OSError as e:
            raise KataError(f"cannot make a network namespace: {e.strerror}") from None
        taps: list[tuple[str, list[int]]] = []
        try:
            for n in range(count):
                taps.append((f"tap{n}_kata", _open_tap(f"tap{n}_kata", queues)))
            return SpareTaps(os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC),
                             taps)
        except BaseException:
            SpareTaps(-1, taps).close()
            raise

    return netlink.in_thread(work, "spare-taps")


def plumb(path: str, queues: int = 1, spare: SpareTaps | None = None) -> Network:
    """Discover the namespace and join a tap to every veth in it: a tap
    opened here, or one of spare's, moved here (as many as there are veths)."""
    if spare is not None:
        count = len(netlink.run(lambda ipr: discover(ipr, path), path).interfaces)
        if count != len(spare.taps):
            raise KataError(f"{path} has {count} interfaces, the spare VM {len(spare.taps)}")
        ns = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            netlink.run(lambda ipr: [ipr.link("set", index=ipr.link_lookup(ifname=name)[0],
                                              net_ns_fd=ns) for name, _ in spare.taps],
                        spare.path)
        except NetlinkError as e:
            raise KataError(f"cannot move the spare VM's taps to {path}: "
                            f"{os.strerror(e.code)}") from None
        finally:
            os.close(ns)

    def work(ipr: IPRoute) -> Network:
        net = discover(ipr, path)
        try:
            for n, itf in enumerate(net.interfaces):
                if spare is not None:
                    itf.tap = spare.taps[n][0]  # its fds: QEMU's since its launch
                else:
                    itf.tap = f"tap{n}_kata"
                    itf.tap_fds = _open_tap(itf.tap, queues)
                tap = ipr.link_lookup(ifname=itf.tap)[0]
                ipr.link("set", index=tap, mtu=itf.mtu, state="up")
                _del_ingress(ipr, itf.index)  # a killed owner's, redirecting to nothing
                _redirect(ipr, itf.index, tap)
                _redirect(ipr, tap, itf.index)
        except BaseException:
            _undo(ipr, net)
            raise
        log.debug("plumbed %s: %s", path, [(i.name, i.tap) for i in net.interfaces])
        return net

    try:
        net = netlink.run(work, path)
    except NetlinkError as e:
        raise KataError(f"network plumbing in {path} failed: {os.strerror(e.code)}") from None
    if spare is not None:
        spare.close()  # empty now
    if any(i.tap for i in net.interfaces):
        try:
            _claim(net)
        except OSError as e:
            teardown(net)
            raise KataError(f"cannot record the network plumbing: {e.strerror}") from None
    return net


def claims_dir() -> Path:
    return paths.RUN / "netclaims"


def _claim(net: Network) -> None:
    st = os.stat(net.path)
    pid, started = owner.me()
    d = claims_dir()
    d.mkdir(parents=True, exist_ok=True)
    f = d / f"{pid}-{started}-{st.st_ino}"
    tmp = f.with_name(f".{f.name}")  # not a claim until whole
    tmp.write_text(json.dumps({"path": net.path, "dev": st.st_dev, "ino": st.st_ino,
                               "pid": pid, "started": started}))
    tmp.rename(f)
    net.claim = str(f)


def prune_claims() -> list[str]:
    """Undo the plumbing of owners that are gone; the namespaces cleaned."""
    cleaned = []
    for f in sorted(claims_dir().glob("[0-9]*")) if claims_dir().exists() else []:
        try:
            c = json.loads(f.read_text())
        except (OSError, ValueError):
            f.unlink(missing_ok=True)  # torn by a crash: nothing to go on
            continue
        if owner.alive(c.get("pid"), c.get("started")):
            continue
        try:
            st = os.stat(c["path"])
        except (OSError, KeyError, TypeError):
            st = None  # the namespace went, and its links with it
        # The path may name another namespace by now: touch only the one claimed.
        if st is not None and (st.st_dev, st.st_ino) == (c.get("dev"), c.get("ino")):
            with contextlib.suppress(KataError):
                if usable_netns(c["path"]) and clean_stale(c["path"]):
                    cleaned.append(c["path"])
        f.unlink(missing_ok=True)
    return cleaned


def _undo(ipr: IPRoute, net: Network) -> None:
    for itf in net.interfaces:
        if itf.tap:
            _del_ingress(ipr, itf.index)
    net.close_fds()


def teardown(net: Network) -> None:
    """Remove exactly what plumb added that outlives the taps."""
    if not any(i.tap for i in net.interfaces):
        net.close_fds()
        return
    try:
        netlink.run(lambda ipr: _undo(ipr, net), net.path)
    except KataError:
        net.close_fds()  # the namespace is gone, and all in it
    if net.claim:
        Path(net.claim).unlink(missing_ok=True)
        net.claim = ""
