"""Network benchmark, side by side in the same run:

  throughput  node -> container, one TCP connection carrying 32 MB, kata-py
              (the tap, tc redirect, virtio-net) beside a runc container on a
              plain veth
  latency     round trip of one byte on an established TCP connection
  start-up    `microvm run --rm busybox true` with --network bridge beside
              --network none

Everything happens in network namespaces the bench makes itself: a "node"
namespace stands in for the host, and each pod namespace is joined to it by
a veth pair, as CNI's ptp plugin would.  No traffic leaves them.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pyroute2.iproute.linux import IPRoute

from microvm.images import rootfs
from microvm.net import netlink

MB = 32
# The servers, the same in both runtimes: a sink for throughput, cat for echo.
SERVERS = ("nc -ll -p 5001 -e sh -c 'cat >/dev/null' & nc -ll -p 5002 -e cat & wait")

CLIENT = r"""
import json, socket, sys, time
ip, mode, amount = sys.argv[1], sys.argv[2], int(sys.argv[3])
def connect(port):
    deadline = time.monotonic() + 120
    while True:
        try:
            return socket.create_connection((ip, port), timeout=60)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
if mode == "wait":
    connect(5002).close()
    print("{}")
elif mode == "throughput":
    s = connect(5001)
    chunk = b"x" * (1 << 20)
    t0 = time.perf_counter()
    for _ in range(amount):
        s.sendall(chunk)
    s.shutdown(socket.SHUT_WR)
    s.recv(1)                      # the sink closes once it has read it all
    print(json.dumps({"seconds": time.perf_counter() - t0}))
else:
    s = connect(5002)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(b"w"); s.recv(1)     # warm the path (and the guest's code cache)
    rtts = []
    for _ in range(amount):
        t0 = time.perf_counter()
        s.sendall(b"p")
        s.recv(1)
        rtts.append(time.perf_counter() - t0)
    rtts.sort()
    print(json.dumps({"rtt": rtts[len(rtts) // 2]}))
"""


def _path(name: str) -> str:
    return f"/var/run/netns/{name}"


def _link_pod(node: str, pod: str, subnet: int) -> str:
    """A veth from node to pod: 10.77.S.1 on the node, 10.77.S.2 in the pod."""
    host_if = f"vb{subnet}"

    def outside(ipr: IPRoute) -> None:
        fd = os.open(_path(pod), os.O_RDONLY)
        try:
            ipr.link("add", ifname=host_if, kind="veth", peer={"ifname": "eth0", "net_ns_fd": fd})
        finally:
            os.close(fd)
        idx = ipr.link_lookup(ifname=host_if)[0]
        ipr.addr("add", index=idx, address=f"10.77.{subnet}.1", prefixlen=24)
        ipr.link("set", index=idx, state="up")
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=lo, state="up")

    def inside(ipr: IPRoute) -> None:
        idx = ipr.link_lookup(ifname="eth0")[0]
        ipr.addr("add", index=idx, address=f"10.77.{subnet}.2", prefixlen=24)
        ipr.link("set", index=idx, state="up")
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        ipr.route("add", dst="0.0.0.0/0", gateway=f"10.77.{subnet}.1", oif=idx)

    netlink.run(outside, _path(node))
    netlink.run(inside, _path(pod))
    return f"10.77.{subnet}.2"


def _client(node: str, ip: str, mode: str, amount: int) -> dict[str, float]:
    out = subprocess.run(["nsenter", f"--net={_path(node)}", sys.executable, "-S", "-c", CLIENT,
                          ip, mode, str(amount)],
                         capture_output=True, text=True, check=True, timeout=600).stdout
    return json.loads(out)  # type: ignore[no-any-return]


def _runc_bundle(tmp: Path, pod: str) -> Path:
    bundle = tmp / "runc-net"
    bundle.mkdir()
    subprocess.run(["runc", "spec"], cwd=bundle, check=True)
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"]["terminal"] = False
    spec["process"]["args"] = ["sh", "-c", SERVERS]
    spec["root"] = {"path": str(rootfs.builtin("busybox")), "readonly": True}
    spec["linux"]["namespaces"] = [
        ns for ns in spec["linux"]["namespaces"] if ns["type"] != "network"
    ] + [{"type": "network", "path": _path(pod)}]
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


def _stats(v: list[float]) -> dict[str, float]:
    return {"median": statistics.median(v), "min": min(v), "max": max(v)}


def run(n: int, microvm: str) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="kata-py-bench-net-") as tmp_s, \
            netlink.named_netns("kb-node") as node, netlink.named_netns("kb-kata") as kata_pod, \
            netlink.named_netns("kb-runc") as runc_pod:
        tmp = Path(tmp_s)
        ips = {"kata-py": _link_pod(node, kata_pod, 1), "runc": _link_pod(node, runc_pod, 2)}
        cid = f"kata-py-bench-net-{os.getpid()}"
        servers = [
            subprocess.Popen([microvm, "run", "--rm", "--network", f"ns:{_path(kata_pod)}",
                              "busybox", "sh", "-c", SERVERS],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
            subprocess.Popen(["runc", "run", cid], cwd=_runc_bundle(tmp, runc_pod),
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)]
        try:
            for ip in ips.values():
                _client(node, ip, "wait", 0)
            mbps: dict[str, list[float]] = {k: [] for k in ips}
            rtt: dict[str, list[float]] = {k: [] for k in ips}
            for _ in range(n):
                for name, ip in ips.items():
                    secs = _client(node, ip, "throughput", MB)["seconds"]
                    mbps[name].append(MB * 1.048576 / secs)
                    rtt[name].append(_client(node, ip, "latency", 200)["rtt"] * 1e6)
        finally:
            servers[0].kill()  # the CLI; its VM goes with it
            subprocess.run(["runc", "kill", cid, "KILL"], capture_output=True)
            for p in servers:
                p.wait(timeout=30)
            subprocess.run(["runc", "delete", "-f", cid], capture_output=True)
        startup = _startup(n, microvm, node)
    tp = {k: _stats(v) for k, v in mbps.items()}
    lat = {k: _stats(v) for k, v in rtt.items()}
    return {"mb_per_connection": MB, "throughput_mb_s": tp, "rtt_us": lat,
            "startup": startup,
            "ratios": {"throughput kata/runc": tp["kata-py"]["median"] / tp["runc"]["median"],
                       "rtt kata/runc": lat["kata-py"]["median"] / lat["runc"]["median"],
                       "start bridge/none": startup["bridge"]["median"]
                       / startup["none"]["median"]}}


def _startup(n: int, microvm: str, node: str) -> dict[str, dict[str, float]]:
    """The bridge's cost at start-up: the CLI runs in the node namespace, so
    its bridge and NAT rule live (and die) there."""
    times: dict[str, list[float]] = {"none": [], "bridge": []}
    def run_in(mode: str) -> list[str]:
        return ["nsenter", f"--net={_path(node)}", microvm, "run", "--rm", "--network", mode,
                "busybox", "true"]

    for _ in range(n):
        for mode in times:
            t0 = time.perf_counter()
            subprocess.run(run_in(mode), check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            times[mode].append(time.perf_counter() - t0)
    return {k: _stats(v) for k, v in times.items()}


def report(r: dict[str, object]) -> None:
    tp, lat, st, ratios = r["throughput_mb_s"], r["rtt_us"], r["startup"], r["ratios"]
    assert isinstance(tp, dict) and isinstance(lat, dict) and isinstance(st, dict)
    assert isinstance(ratios, dict)
    print(f"network (node namespace -> container; {r['mb_per_connection']} MB per connection):")
    for name in ("kata-py", "runc"):
        print(f"  {name:<9}throughput {tp[name]['median']:>8.1f} MB/s   "
              f"round trip {lat[name]['median']:>8.0f} us")
    for mode in ("none", "bridge"):
        print(f"  run --rm --network {mode:<7}{st[mode]['median']:>8.3f}s")
    print("  ratios: " + "   ".join(f"{k} {v:.2f}" for k, v in ratios.items()))


