"""The CLI's own networks (`--network bridge`): what CNI's bridge plugin does
for containerd, done by the process that owns the sandbox.

- A host bridge, `microvm0` by default, with the subnet's first address as
  the containers' gateway, NAT to the outside (iptables MASQUERADE) and IPv4
  forwarding; it is removed when its last container goes.
- Per container: a network namespace held only by an fd of its owner (the
  CLI in the foreground, the shim for `-d`), with a veth to the bridge and
  an address from the allocator.  When the owner dies, even by SIGKILL, the
  kernel frees the namespace and the veth pair with it (QEMU's tap too).
- The allocator's leases (under /run, so a reboot forgets them) name the
  owner's pid and start time; a lease whose owner is gone is reclaimed by
  the next allocation or by `microvm system prune`.

The sandbox then plumbs the namespace like any CNI-prepared one (tcfilter).
All netlink goes through pyroute2.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pyroute2.iproute.linux import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from microvm import linux, owner, paths
from microvm.config import Config
from microvm.errors import KataError
from microvm.net import netlink

log = logging.getLogger(__name__)

NAT_COMMENT = "kata-py"


@dataclass(frozen=True)
class BridgeConfig:
    name: str = "microvm0"
    subnet: str = "10.89.0.0/16"
    mtu: int = 1500
    icc: bool = True

    @classmethod
    def of(cls, config: Config) -> BridgeConfig:
        return cls(config.bridge_name, config.bridge_subnet, icc=config.bridge_icc)

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.subnet)

    @property
    def gateway(self) -> str:
        return str(self.network.network_address + 1)


# -- leases ----------------------------------------------------------------------


def _alive(lease: dict[str, object]) -> bool:
    return owner.alive(lease.get("pid"), lease.get("started"))


def leases_dir() -> Path:
    """One allocator per network namespace the bridge lives in (tests run
    the CLI in namespaces of their own, each with its own bridge)."""
    return paths.RUN / "network" / str(os.stat("/proc/self/ns/net").st_ino)


@dataclass
class _Table:
    leases: dict[str, dict[str, object]]
    forget: bool = False        # remove the directory instead of writing it back


@contextlib.contextmanager
def _leases(create: bool = False) -> Iterator[_Table]:
    """The lease table, locked, written back when the block ends.  Only an
    allocation makes the directory; the others find an empty table."""
    d = leases_dir()
    while True:
        if not create and not d.exists():
            yield _Table({})
            return
        d.mkdir(parents=True, exist_ok=True)
        lock = open(d / "lock", "a")  # noqa: SIM115 - closed below
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.fstat(lock.fileno()).st_nlink:
            break
        lock.close()  # the last bridge user removed the directory meanwhile
    with lock:
        path = d / "leases.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        table = _Table(data if isinstance(data, dict) else {})
        yield table
        if table.forget:
            shutil.rmtree(d, ignore_errors=True)
            return
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(table.leases, indent=1))
        tmp.rename(path)


def allocate(cfg: BridgeConfig, owner_name: str, pid: int | None = None) -> str:
    pid = pid or os.getpid()
    with _leases(create=True) as t:
        for ip, lease in list(t.leases.items()):
            if not _alive(lease):
                del t.leases[ip]
        for host in cfg.network.hosts():
            ip = str(host)
            if ip != cfg.gateway and ip not in t.leases:
                t.leases[ip] = {"owner": owner_name, "pid": pid,
                                 "started": owner.start_time(pid)}
                return ip
    raise KataError(f"network {cfg.name}: no free address in {cfg.subnet}")


def release(ip: str) -> None:
    with _leases() as t:
        t.leases.pop(ip, None)


def list_leases() -> dict[str, dict[str, object]]:
    with _leases() as t:
        return {ip: {**lease, "alive": _alive(lease)} for ip, lease in t.leases.items()}


def prune_leases() -> list[str]:
    """Leases whose owners are gone (remove_bridge_if_unused does the bridge)."""
    with _leases() as t:
        gone = [ip for ip, lease in t.leases.items() if not _alive(lease)]
        for ip in gone:
            del t.leases[ip]
    return gone


# -- namespaces and links -----------------------------------------------------------


def new_netns() -> int:
    """A new network namespace, held by the fd returned (and nothing else)."""

    def work() -> int:  # unshare moves only this thread, which then ends
        linux.unshare(linux.CLONE_NEWNET)
        return os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)

    try:
        return netlink.in_thread(work, "new-netns")
    except OSError as e:
        raise KataError(f"cannot create a network namespace: {e.strerror or e}") from None


def _nat(cfg: BridgeConfig, add: bool) -> None:
    """MASQUERADE for the subnet's traffic that leaves through another link;
    with icc off, no routing from the bridge back onto it either (isolated
    ports alone leave that way open: a container routing another's address
    via the gateway).  Removal takes both, whatever the config says now."""
    if shutil.which("iptables") is None:
        if add:
            log.warning("iptables not found: containers get no NAT to the outside")
        return
    comment = ["-m", "comment", "--comment", NAT_COMMENT]
    rules = [("nat", ["POSTROUTING", "-s", cfg.subnet, "!", "-o", cfg.name,
                      "-j", "MASQUERADE", *comment])]
    if not add or not cfg.icc:
        rules.append(("filter", ["FORWARD", "-i", cfg.name, "-o", cfg.name, "-j", "DROP",
                                 *comment]))
    for table, rule in rules:
        present = subprocess.run(["iptables", "-w", "-t", table, "-C", *rule],
                                 capture_output=True).returncode == 0
        if add != present:
            p = subprocess.run(["iptables", "-w", "-t", table, "-I" if table == "filter"
                                else "-A", *rule] if add else
                               ["iptables", "-w", "-t", table, "-D", *rule],
                               capture_output=True, text=True)
            if p.returncode != 0:
                log.warning("iptables: %s", p.stderr.strip())


def ensure_bridge(ipr: IPRoute, cfg: BridgeConfig) -> int:
    found = ipr.link_lookup(ifname=cfg.name)
    if found:
        return int(found[0])
    try:
        ipr.link("add", ifname=cfg.name, kind="bridge")
    except NetlinkError as e:
        if e.code != errno.EEXIST:  # another CLI made it just now
            raise
    index = int(ipr.link_lookup(ifname=cfg.name)[0])
    with contextlib.suppress(NetlinkError):  # EEXIST: the racer added it
        ipr.addr("add", index=index, address=cfg.gateway,
                 prefixlen=cfg.network.prefixlen)
    ipr.link("set", index=index, mtu=cfg.mtu, state="up")
    try:
        with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
            f.write("1")
    except OSError as e:
        log.warning("cannot enable IPv4 forwarding: %s", e.strerror)
    _nat(cfg, True)
    return index


def remove_bridge_if_unused(cfg: BridgeConfig) -> bool:
    """The bridge and its NAT rule, once no live lease is left."""
    with _leases() as t:
        if any(_alive(lease) for lease in t.leases.values()):
            return False

        def remove(ipr: IPRoute) -> bool:
            found = ipr.link_lookup(ifname=cfg.name)
            # Links still enslaved belong to someone we do not know of.
            if not found or any(link.get("master") == found[0] for link in ipr.get_links()):
                return False
            _nat(cfg, False)  # first: once the bridge is gone, so is everything
            with contextlib.suppress(NetlinkError):
                ipr.link("del", index=found[0])
            return True

        if not netlink.run(remove):
            return False
        t.forget = not t.leases  # nothing to remember: the directory goes
        return True


@dataclass
class Attachment:
    """One container's place on the bridge."""

    cfg: BridgeConfig
    netns_fd: int
    ip: str
    host_veth: str

    @property
    def netns_path(self) -> str:
        # Any thread of this process may open it; pyroute2 setns takes a path.
        return f"/proc/{os.getpid()}/fd/{self.netns_fd}"

    def close(self) -> None:
        """Free the namespace and the lease.  The veth is deleted first: the
        kernel frees a namespace asynchronously, and the bridge can only go
        once nothing is enslaved to it."""
        if self.netns_fd >= 0:
            with contextlib.suppress(NetlinkError):
                netlink.run(lambda ipr: ipr.link("del", ifname=self.host_veth))
            os.close(self.netns_fd)
            self.netns_fd = -1
            release(self.ip)
            with contextlib.suppress(KataError, NetlinkError, OSError):
                remove_bridge_if_unused(self.cfg)


def attach(cfg: BridgeConfig, owner_name: str) -> Attachment:
    """A namespace on the bridge: eth0 with an address and a default route."""
    ip = allocate(cfg, owner_name)
    fd = -1
    try:
        fd = new_netns()
        host_veth = f"mv{int(ipaddress.IPv4Address(ip)):08x}"  # unique per lease, < IFNAMSIZ
        def outside(ipr: IPRoute) -> None:
            bridge = ensure_bridge(ipr, cfg)
            with contextlib.suppress(NetlinkError):  # a killed owner's, whose ns lives on
                ipr.link("del", ifname=host_veth)
            ipr.link("add", ifname=host_veth, kind="veth",
                     peer={"ifname": "eth0", "net_ns_fd": fd})
            index = ipr.link_lookup(ifname=host_veth)[0]
            ipr.link("set", index=index, master=bridge, mtu=cfg.mtu, state="up")
            if not cfg.icc:
                # An isolated port forwards only to ports that are not: the
                # bridge itself (the gateway, NAT), never another container.
                ipr.brport("set", index=index, isolated=1)

        netlink.run(outside)
        att = Attachment(cfg, fd, ip, host_veth)

        def inside(ipr: IPRoute) -> None:
            lo = ipr.link_lookup(ifname="lo")[0]
            eth0 = ipr.link_lookup(ifname="eth0")[0]
            ipr.link("set", index=lo, state="up")
            ipr.link("set", index=eth0, mtu=cfg.mtu, state="up")
            ipr.addr("add", index=eth0, address=ip, prefixlen=cfg.network.prefixlen)
            ipr.route("add", dst="0.0.0.0/0", gateway=cfg.gateway, oif=eth0)

        netlink.run(inside, att.netns_path)
        log.debug("%s: %s on %s", owner_name, ip, cfg.name)
        return att
    except BaseException as e:
        if fd >= 0:
            os.close(fd)
        release(ip)
        if isinstance(e, NetlinkError):
            raise KataError(f"network {cfg.name}: {os.strerror(e.code)}") from None
        raise
