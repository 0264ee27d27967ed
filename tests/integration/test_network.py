"""Networking on real VMs: a pod namespace prepared by the CNI bridge plugin,
taken over by the guest through Kata's tcfilter plumbing.

Every namespace here is made by the test (a "node" namespace stands in for
the machine), so no traffic touches the machine's own interfaces.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Microvm, assert_no_leaks, helper_processes
from tests.netns import CNI_BIN, Pod, cni_pod, fetch, links, qdiscs, sh

pytestmark = [pytest.mark.vm, pytest.mark.skipif(
    not (CNI_BIN / "bridge").exists(), reason="containernetworking-plugins not installed")]

# httpd with a CGI that answers the client's address; the interface first.
SERVE = ("mkdir -p /www/cgi-bin && "
         "printf '#!/bin/sh\\necho Content-Type: text/plain\\necho\\necho $REMOTE_ADDR\\n' "
         "> /www/cgi-bin/ip && chmod +x /www/cgi-bin/ip && "
         "ip -o link show eth0 && ip -o addr show eth0 && ip route && "
         "trap 'exit 0' TERM; httpd -f -p 8080 -h /www & echo serving; wait")


@pytest.fixture
def pod(node: str, tmp_path: Path) -> Iterator[Pod]:
    with cni_pod(node, tmp_path / "ipam") as p:
        yield p


def serve(microvm: Microvm, pod: Pod) -> tuple[subprocess.Popen[bytes], list[str]]:
    """The container serving; what it printed before it served."""
    p = microvm.popen("run", "--rm", "--network", f"ns:{pod.netns}", "busybox",
                      "sh", "-c", SERVE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None
    lines = []
    while (line := p.stdout.readline().decode()) and line.strip() != "serving":
        lines.append(line)
    assert line, f"no container output: {lines} {p.stderr.read() if p.stderr else ''!r}"
    return p, lines


def client(remote_addr: str) -> str:
    """httpd's REMOTE_ADDR: [v6], or v4 as [::ffff:v4] (it listens on both)."""
    return remote_addr.strip().strip("[]").removeprefix("::ffff:")


def test_cni_pod_reachable_with_its_own_address(microvm: Microvm, pod: Pod) -> None:
    p, printed = serve(microvm, pod)
    try:
        link, addrs, routes = printed[0], "".join(printed[1:3]), "".join(printed[3:])
        assert f"link/ether {pod.mac}" in link and "mtu 1400" in link
        assert f"inet {pod.ip}/24" in addrs and f"inet6 {pod.ip6}/64" in addrs
        assert f"default via {pod.gateway} dev eth0" in routes
        # TCP from the node side; the container sees the node's bridge address.
        assert client(fetch(pod.node, f"http://{pod.ip}:8080/cgi-bin/ip")) == pod.gateway
        # The node's bridge address must have passed duplicate address
        # detection, or the node answers from its link-local one (a clone
        # starts faster than DAD takes).
        deadline = time.monotonic() + 10
        while "tentative" in sh("ip", "-6", "addr", "show", ns=pod.node).stdout:
            assert time.monotonic() < deadline, "the node's IPv6 address stayed tentative"
            time.sleep(0.1)
        assert client(fetch(pod.node, f"http://[{pod.ip6}]:8080/cgi-bin/ip")).startswith(
            "fd00:88::")
        ping = sh("busybox", "ping", "-c", "2", "-W", "5", pod.ip, ns=pod.node, check=False)
        assert " 0% packet loss" in ping.stdout, ping.stdout + ping.stderr
        # While it runs: a tap beside eth0, both joined by ingress redirects.
        assert "tap0_kata" in links(Path(pod.netns).name)
        assert "ingress" in qdiscs(Path(pod.netns).name)
        # QEMU runs in the pod's namespace: its pid stands for the pod's
        # network, as CRI expects of a sandbox's pid.
        qemu = [int(line.split()[0]) for line in helper_processes() if "qemu-system" in line]
        assert len(qemu) == 1
        assert os.stat(f"/proc/{qemu[0]}/ns/net").st_ino == os.stat(pod.netns).st_ino
    finally:
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    ns = Path(pod.netns).name
    assert "ingress" not in qdiscs(ns) and "tap0_kata" not in links(ns)


@pytest.mark.parametrize("recovery", ["prune", "next run"])
def test_sigkill_leaves_no_tap_and_prune_or_the_next_run_recovers(
        microvm: Microvm, pod: Pod, recovery: str) -> None:
    """SIGKILL of the CLI takes QEMU along, and the tap with it (its last fd).
    The ingress redirect on the pod's veth, in a namespace that is not ours,
    is left with a claim naming its dead owner: `system prune` removes it,
    and a new sandbox in the namespace replaces it."""
    ns = Path(pod.netns).name
    p, _ = serve(microvm, pod)
    fetch(pod.node, f"http://{pod.ip}:8080/cgi-bin/ip")
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=30)
    assert_no_leaks(network=False)
    deadline = time.monotonic() + 10
    while "tap0_kata" in links(ns):
        assert time.monotonic() < deadline, sh("ps", "-ef").stdout
        time.sleep(0.1)
    assert "ingress" in qdiscs(ns)
    if recovery == "prune":
        pruned = microvm.run("system", "prune")
        assert f"deleted tc redirects in {pod.netns}" in pruned.stdout, pruned.stderr
        assert "ingress" not in qdiscs(ns)
        assert_no_leaks()
    r = microvm.run("run", "--rm", "--network", f"ns:{pod.netns}", "busybox",
                    "ping", "-c", "1", "-W", "5", pod.gateway)
    assert r.returncode == 0 and " 0% packet loss" in r.stdout, r.stdout + r.stderr
    assert "ingress" not in qdiscs(ns) and "tap0_kata" not in links(ns)
    if recovery == "next run":  # its claim is the live run's; the dead one's stays for prune
        assert "deleted tc redirects" not in microvm.run("system", "prune").stdout
        assert_no_leaks()


def test_what_the_ioctls_cannot_say_is_set_with_ip(microvm: Microvm, pod: Pod) -> None:
    """A second IPv4 address and a route with a preferred source: the guest
    sets the pod's network with busybox's ip instead of its ioctls, and it is
    the same as the pod namespace's."""
    ns = Path(pod.netns).name
    sh("ip", "addr", "add", "10.88.7.2/24", "dev", "eth0", ns=ns)
    sh("ip", "route", "add", "10.87.0.0/16", "via", pod.gateway, "src", pod.ip, ns=ns)
    r = microvm.run("run", "--rm", "--network", f"ns:{pod.netns}", "busybox", "sh", "-c",
                    f"ip -o addr show eth0; ip route; ping -c 1 -W 5 {pod.gateway} >/dev/null"
                    " && echo reached")
    assert r.returncode == 0, r.stderr
    assert f"inet {pod.ip}/24" in r.stdout and "inet 10.88.7.2/24" in r.stdout, r.stdout
    assert f"10.87.0.0/16 via {pod.gateway} dev eth0  src {pod.ip}" in r.stdout.replace(
        "eth0 src", "eth0  src"), r.stdout
    assert f"default via {pod.gateway} dev eth0" in r.stdout and "reached" in r.stdout


def test_no_network_means_loopback_only(microvm: Microvm) -> None:
    r = microvm.run("run", "--rm", "--network", "none", "busybox", "sh", "-c",
                    "ip -o link | cut -d: -f2; ping -c 1 -W 3 127.0.0.1 >/dev/null && echo lo-ok")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["lo", "lo-ok"]


def test_two_vcpus_get_a_multi_queue_tap(microvm: Microvm, pod: Pod) -> None:
    r = microvm.run("run", "--rm", "--cpus", "2", "--network", f"ns:{pod.netns}", "busybox",
                    "sh", "-c", "ls /sys/class/net/eth0/queues; "
                    f"ping -c 1 -W 5 {pod.gateway} >/dev/null && echo ok")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["rx-0", "rx-1", "tx-0", "tx-1", "ok"]


def test_debug_log_is_ours_not_the_libraries(microvm: Microvm, pod: Pod) -> None:
    """--debug shows the steps (plumbing, QEMU's command, the guest's network),
    not pyroute2's or qemu.qmp's per-message chatter; without it, nothing."""
    r = microvm.run("--debug", "run", "--rm", "--network", f"ns:{pod.netns}", "busybox", "true")
    assert r.returncode == 0, r.stderr
    lines = r.error_lines
    # The file-sharing helper: virtiofsd (cold boot) or virtfs-proxy-helper (a clone).
    for step in ("starting /usr/lib/qemu/virt", f"plumbed {pod.netns}",
                 "starting qemu-system", "guest network configured in", "ready in"):
        assert any(step in line for line in lines), (step, r.stderr)
    assert not [line for line in lines if "SOCK_DGRAM" in line or "await data" in line
                or "Runstate" in line], r.stderr
    assert len(lines) < 20, r.stderr
    quiet = microvm.run("run", "--rm", "--network", f"ns:{pod.netns}", "busybox", "true")
    assert quiet.returncode == 0 and quiet.error_lines == [], quiet.stderr
