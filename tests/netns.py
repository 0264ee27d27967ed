"""Network namespaces for the tests, made here and removed here.

A "node" namespace stands in for the machine, so no test traffic ever
touches the machine's own interfaces; pods in it are prepared by the real
CNI bridge plugin with host-local IPAM, exactly as containerd would have
them prepared (bridge with the gateway address, veth, eth0 in the pod).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CNI_BIN = Path("/usr/lib/cni")
NETNS_DIR = Path("/var/run/netns")


def sh(*argv: str, ns: str | None = None, check: bool = True,
       timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """argv, in namespace ns (by name) if given: probes only (ip netns exec)."""
    prefix = ["ip", "netns", "exec", ns] if ns else []
    return subprocess.run([*prefix, *argv], capture_output=True, text=True, check=check,
                          timeout=timeout)


@contextlib.contextmanager
def namespace(prefix: str) -> Iterator[str]:
    name = f"{prefix}-{secrets.token_hex(3)}"
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "link", "set", "lo", "up", ns=name)
        yield name
    finally:
        sh("ip", "netns", "del", name, check=False)


@dataclass
class Pod:
    node: str          # the node namespace's name
    netns: str         # the pod namespace's path
    ip: str
    ip6: str
    gateway: str
    mac: str
    mtu: int


def _cni(command: str, node: str, pod_path: str, cid: str, conf: dict[str, object]
         ) -> dict[str, object]:
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": pod_path,
           "CNI_IFNAME": "eth0", "CNI_PATH": str(CNI_BIN), "PATH": os.environ["PATH"]}
    p = subprocess.run(["nsenter", f"--net={NETNS_DIR / node}", str(CNI_BIN / "bridge")],
                       input=json.dumps(conf), env=env, capture_output=True, text=True,
                       timeout=30)
    assert p.returncode == 0, f"CNI {command}: {p.stdout}{p.stderr}"
    return json.loads(p.stdout) if p.stdout.strip() else {}


@contextlib.contextmanager
def cni_pod(node: str, data_dir: Path, mtu: int = 1400) -> Iterator[Pod]:
    """A pod namespace on the node's bridge, through CNI ADD; DEL afterwards."""
    conf = {"cniVersion": "0.4.0", "name": "kata-py-test", "type": "bridge",
            "bridge": "kt0", "isGateway": True, "ipMasq": False, "mtu": mtu,
            "ipam": {"type": "host-local", "dataDir": str(data_dir),
                     "ranges": [[{"subnet": "10.88.0.0/24"}], [{"subnet": "fd00:88::/64"}]],
                     "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]}}
    with namespace("kt-pod") as pod:
        path = str(NETNS_DIR / pod)
        cid = secrets.token_hex(8)
        result = _cni("ADD", node, path, cid, conf)
        try:
            ips = [str(i["address"]).split("/")[0] for i in result["ips"]]  # type: ignore[attr-defined]
            v4 = next(ip for ip in ips if ":" not in ip)
            v6 = next(ip for ip in ips if ":" in ip)
            gw = next(str(i["gateway"]) for i in result["ips"]  # type: ignore[attr-defined]
                      if ":" not in str(i["gateway"]))
            mac = sh("cat", "/sys/class/net/eth0/address", ns=pod).stdout.strip()
            yield Pod(node, path, v4, v6, gw, mac, mtu)
        finally:
            _cni("DEL", node, path, cid, conf)


def fetch(ns: str, url: str, timeout: float = 30) -> str:
    """curl from inside ns, until the server answers."""
    deadline = time.monotonic() + timeout
    while True:
        r = sh("curl", "-sS", "-g", "--max-time", "3", url, ns=ns, check=False)
        if r.returncode == 0:
            return r.stdout
        assert time.monotonic() < deadline, f"{url}: {r.stderr}"
        time.sleep(0.2)


def qdiscs(ns: str, dev: str = "eth0") -> str:
    return sh("tc", "qdisc", "show", "dev", dev, ns=ns).stdout


def links(ns: str) -> list[str]:
    return [line.split(":")[1].strip().split("@")[0]
            for line in sh("ip", "-o", "link", "show", ns=ns).stdout.splitlines()]
