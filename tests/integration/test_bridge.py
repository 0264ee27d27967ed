"""The CLI's bridge network and published ports, on real VMs.

The CLI runs inside a "node" namespace each test makes, so its bridge, NAT
rule and published ports live there, and no traffic touches the machine's
own interfaces or addresses.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.localregistry import free_port
from tests.conftest import Microvm, assert_no_leaks, write_config
from tests.netns import fetch, links, sh

pytestmark = pytest.mark.vm

WEB = ("mkdir -p /www && echo hello-web > /www/index.html && "
       "trap 'exit 0' TERM; httpd -f -p 80 -h /www & echo serving; wait")


@pytest.fixture
def cli(microvm: Microvm, node: str, tmp_path: Path) -> Iterator[Microvm]:
    """The CLI in the node namespace, bridge by default as a user's; afterwards
    no veth, bridge or lease."""
    m = Microvm(microvm.log_dir, write_config(tmp_path / "bridge.yaml", microvm.log_dir,
                                              network="bridge")).in_netns(node)
    yield m
    for name in m.run("ps", "-a", "--format", "{{.Names}}").stdout.split():
        if name.startswith("kt-"):
            m.run("rm", "-f", name)
    deadline = time.monotonic() + 10
    while [n for n in links(node) if n != "lo"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [n for n in links(node) if n != "lo"] == []
    assert "in use" not in m.run("network", "ls").stdout


def test_detached_web_server_on_a_published_port(cli: Microvm, node: str) -> None:
    """The issue's own example: run -d -p HOST:80 ... httpd, then curl it."""
    port = free_port()
    r = cli.run("run", "-d", "-p", f"127.0.0.1:{port}:80", "--name", "kt-web", "busybox",
                "sh", "-c", "mkdir -p /www && echo hello-web > /www/index.html && "
                "exec httpd -f -p 80 -h /www")
    assert r.returncode == 0, r.stderr
    assert fetch(node, f"http://127.0.0.1:{port}/") == "hello-web\n"
    ls = cli.run("network", "ls").stdout
    assert "microvm0 up" in ls and "10.89.0.2" in ls and "in use" in ls
    nat = sh("iptables", "-t", "nat", "-S", "POSTROUTING", ns=node).stdout
    assert "-s 10.89.0.0/16 ! -o microvm0" in nat and "MASQUERADE" in nat
    assert cli.run("rm", "-f", "kt-web").returncode == 0
    # Everything went with the last container: veth, bridge, NAT rule, port.
    deadline = time.monotonic() + 10
    while "microvm0" in links(node):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert "MASQUERADE" not in sh("iptables", "-t", "nat", "-S", "POSTROUTING", ns=node).stdout
    probe = sh("curl", "-sS", "--max-time", "3", f"http://127.0.0.1:{port}/", ns=node,
               check=False)
    assert probe.returncode != 0


def test_two_containers_on_the_bridge_and_etc_files(cli: Microvm, node: str) -> None:
    r = cli.run("run", "-d", "--name", "kt-a", "--hostname", "alpha", "busybox", "sh", "-c",
                "mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 80 -h /www")
    assert r.returncode == 0, r.stderr
    ip = next(line.split()[0] for line in cli.run("network", "ls").stdout.splitlines()
              if line.startswith("10.89."))
    b = cli.run("run", "--rm", "--hostname", "beta", "busybox", "sh", "-c",
                f"cat /etc/hostname; grep beta /etc/hosts; "
                f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 10 {ip} 80 | tail -1")
    assert b.returncode == 0, b.stderr
    lines = b.stdout.splitlines()
    assert lines[0] == "beta"
    assert lines[1].endswith("\tbeta") and lines[1].startswith("10.89.0.")
    assert lines[-1] == "alpha"


def test_icc_false_isolates_containers_from_each_other(microvm: Microvm, node: str,
                                                       tmp_path: Path) -> None:
    """docker's --icc=false (bridge_icc: false): a container cannot reach
    another on the bridge; the gateway side (published ports) still can.
    With the default, the test above reaches the other container."""
    m = Microvm(microvm.log_dir, write_config(tmp_path / "icc.yaml", microvm.log_dir,
                                              network="bridge", bridge_icc=False)).in_netns(node)
    port = free_port()
    try:
        r = m.run("run", "-d", "--name", "kt-iso", "-p", f"127.0.0.1:{port}:80", "busybox",
                  "sh", "-c", "mkdir -p /www && echo isolated > /www/index.html && "
                  "exec httpd -f -p 80 -h /www")
        assert r.returncode == 0, r.stderr
        assert fetch(node, f"http://127.0.0.1:{port}/") == "isolated\n"
        ip = next(line.split()[0] for line in m.run("network", "ls").stdout.splitlines()
                  if line.startswith("10.89."))
        b = m.run("run", "--rm", "busybox", "sh", "-c",
                  f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {ip} 80 || echo unreachable")
        assert b.returncode == 0, b.stderr
        assert b.stdout.split()[-1:] == ["unreachable"], b.stdout
        # Routed through the gateway instead, the packets die in FORWARD
        # (isolated ports alone let them through one way).
        forward = sh("iptables", "-S", "FORWARD", ns=node).stdout
        assert "-i microvm0 -o microvm0" in forward and "DROP" in forward
        before = _ip_in_receives(m, "kt-iso")
        r = m.run("run", "--rm", "--privileged", "busybox", "sh", "-c",
                  f"ip route add {ip}/32 via 10.89.0.1 && "
                  f"for i in 1 2 3 4 5 6 7 8; do nc -w 1 {ip} 80 </dev/null; done; true")
        assert r.returncode == 0, r.stderr
        assert _ip_in_receives(m, "kt-iso") - before < 4
    finally:
        m.run("rm", "-f", "kt-iso")
    deadline = time.monotonic() + 10
    while [n for n in links(node) if n != "lo"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [n for n in links(node) if n != "lo"] == []
    assert "microvm0" not in sh("iptables", "-S", "FORWARD", ns=node).stdout


def _ip_in_receives(m: Microvm, name: str) -> int:
    """IP packets the container's guest has received (/proc/net/snmp)."""
    out = m.run("exec", name, "cat", "/proc/net/snmp").stdout.splitlines()
    head, values = [line.split() for line in out if line.startswith("Ip:")][:2]
    return int(values[head.index("InReceives")])


UDP_ECHO = r"""
#include <netinet/in.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) < 0) return 1;
    write(1, "ready\n", 6);
    for (;;) {
        char buf[2048];
        struct sockaddr_in peer;
        socklen_t len = sizeof peer;
        ssize_t n = recvfrom(s, buf, sizeof buf, 0, (struct sockaddr *)&peer, &len);
        if (n < 0) return 1;
        sendto(s, buf, n, 0, (struct sockaddr *)&peer, len);
    }
}
"""


@pytest.fixture(scope="module")
def udp_rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """busybox plus a static UDP echo server (Debian's busybox nc has no -u)."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    d = tmp_path_factory.mktemp("udp")
    root = d / "rootfs"
    shutil.copytree("/var/lib/kata-py/rootfs/busybox", root, symlinks=True)
    (d / "udpecho.c").write_text(UDP_ECHO)
    subprocess.run(["gcc", "-static", "-O2", "-o", str(root / "udpecho"), str(d / "udpecho.c")],
                   check=True, capture_output=True)
    return root


def test_published_udp_port_answers(cli: Microvm, node: str, udp_rootfs: Path) -> None:
    port = free_port()
    p = cli.popen("run", "--rm", "-p", f"127.0.0.1:{port}:5000/udp", str(udp_rootfs),
                  "/udpecho", "5000", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert p.stdout is not None and p.stdout.readline() == b"ready\n"
        probe = ("import socket\n"
                 "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.settimeout(1)\n"
                 "for _ in range(30):\n"
                 f"    s.sendto(b'hello-udp',('127.0.0.1',{port}))\n"
                 "    try: print(s.recv(100).decode()); break\n"
                 "    except socket.timeout: pass\n")
        r = sh("python3", "-c", probe, ns=node, timeout=60)
        assert r.stdout == "hello-udp\n"
    finally:
        # udpecho is pid 1 without handlers: only SIGKILL ends it, and the
        # CLI with it; the bridge it leaves is prune's (tested below).
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=30)
    assert_no_leaks(network=False)
    assert "deleted bridge microvm0" in cli.run("system", "prune").stdout


def test_port_already_taken_is_one_line_and_nothing_is_left(cli: Microvm, node: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        taken = s.getsockname()[1]
        holder = subprocess.Popen(["ip", "netns", "exec", node, "python3", "-c",
                                   f"import socket,time; s=socket.socket(); "
                                   f"s.bind(('127.0.0.1',{taken})); s.listen(); "
                                   f"print('ok', flush=True); time.sleep(60)"],
                                  stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"ok\n"
        r = cli.run("run", "--rm", "-p", f"127.0.0.1:{taken}:80", "busybox", "true")
        assert r.returncode == 125
        assert r.error_lines == [
            f"microvm: error: port 127.0.0.1:{taken}/tcp is already in use"]
        d = cli.run("run", "-d", "--name", "kt-taken", "-p", f"127.0.0.1:{taken}:80",
                    "busybox", "sleep", "60")
        assert d.returncode == 125 and "already in use" in d.error_lines[-1], d.stderr
        assert "kt-taken" not in cli.run("ps", "-a").stdout
    finally:
        holder.kill()
        holder.wait()
    assert "microvm0" not in links(node)


def test_sigkill_of_the_cli_frees_the_namespace_and_prune_the_rest(
        cli: Microvm, node: str) -> None:
    port = free_port()
    p = cli.popen("run", "--rm", "-p", f"127.0.0.1:{port}:80", "busybox", "sh", "-c", WEB,
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stdout.readline() == b"serving\n"
    assert fetch(node, f"http://127.0.0.1:{port}/") == "hello-web\n"
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=30)
    assert_no_leaks(network=False)
    # The kernel freed the namespace: the veth is gone, the port is free.
    deadline = time.monotonic() + 10
    while [n for n in links(node) if n.startswith("mv")]:
        assert time.monotonic() < deadline, links(node)
        time.sleep(0.1)
    assert "stale" in cli.run("network", "ls").stdout
    pruned = cli.run("system", "prune")
    assert "deleted lease 10.89.0.2" in pruned.stdout and "deleted bridge microvm0" in \
        pruned.stdout, pruned.stdout + pruned.stderr
    assert "microvm0" not in links(node)
    assert "MASQUERADE" not in sh("iptables", "-t", "nat", "-S", "POSTROUTING", ns=node).stdout
    leases = Path("/run/kata-py/network")
    assert not any(leases.iterdir()) if leases.exists() else True


def test_networked_runs_are_clones_each_with_its_own_address(cli: Microvm) -> None:
    """A network card is part of the clone's device set: with one, runs
    still start from the template (the same boot_id), and each clone gets
    its own MAC and address after it resumes."""
    probe = ("cat /proc/sys/kernel/random/boot_id; "
             "cat /sys/class/net/eth0/address; ip -4 -o addr show eth0")
    runs = []
    for _ in range(3):
        r = cli.run("run", "--rm", "busybox", "sh", "-c", probe)
        assert r.returncode == 0, r.stderr
        runs.append(r.stdout.split("\n"))
    # The first may have made the template; the others are its clones.
    assert runs[1][0] == runs[2][0], "networked runs booted cold"
    assert runs[1][1] != runs[2][1]
    for _boot_id, mac, addr, *_ in runs:
        assert mac != "02:6b:70:00:00:00" and " 10.89." in addr, (mac, addr)


def test_the_next_run_reclaims_what_a_killed_cli_left(cli: Microvm, node: str) -> None:
    """No prune needed: the next command that uses the bridge takes the
    dead owner's lease, and when it ends, the bridge and NAT rule go too."""
    p = cli.popen("run", "--rm", "busybox", "sh", "-c", WEB,
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stdout.readline() == b"serving\n"
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=30)
    assert_no_leaks(network=False)
    assert "stale" in cli.run("network", "ls").stdout
    r = cli.run("run", "--rm", "busybox", "true")
    assert r.returncode == 0, r.stderr
    ls = cli.run("network", "ls").stdout
    assert "ADDRESS" not in ls, ls  # no lease, stale or live
    assert "microvm0" not in links(node)
    assert "MASQUERADE" not in sh("iptables", "-t", "nat", "-S", "POSTROUTING", ns=node).stdout
