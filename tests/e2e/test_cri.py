"""Kubernetes' path: a CRI client (as kubelet) -> containerd's CRI plugin ->
RuntimeClass handler kata-py -> our shim -> one microVM per pod.

Debian's containerd runs with its own root and sockets, inside a node
namespace the test makes, with the CNI bridge plugin (host-local IPAM) and
kata-py registered by `microvm install containerd`.  The sandbox image is a
static pause program built here; no registry is involved.  Pod traffic stays
inside the node namespace.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from harness import cristack
from harness.cristack import CGROUP_PARENT, Cri
from microvm.core import hostcgroup, oci
from microvm.shim.manager import BINARY
from tests.conftest import (
    MICROVM,
    children,
    helper_processes,
    network_leftovers,
    shim_processes,
    spare_runner,
)
from tests.metrics import exporter, one, scrape
from tests.netns import CNI_BIN, fetch, links, namespace

pytestmark = [pytest.mark.vm, pytest.mark.skipif(
    shutil.which("containerd") is None or not (CNI_BIN / "bridge").exists()
    or shutil.which("gcc") is None,
    reason="needs containerd, containernetworking-plugins and gcc")]

@pytest.fixture(scope="module")
def cri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cri]:
    with namespace("kt-node") as node, \
            cristack.stack(tmp_path_factory.mktemp("cri"), node) as c:
        yield c


@pytest.fixture(autouse=True)
def _pods_removed(cri: Cri) -> Iterator[None]:
    """A failed test's pods are removed before the next test checks for leaks."""
    yield
    for pod in cri.pods():
        cri.remove_pod(pod)


def _nothing_left(cri: Cri) -> None:
    deadline = time.monotonic() + 20
    while True:
        left = helper_processes() + network_leftovers()
        left += [f"netns: {n}" for n in os.listdir("/var/run/netns") if n.startswith("cni-")]
        left += [f"pod veth: {n}" for n in links(cri.node) if n.startswith("veth")]
        left += [f"cgroup: {d}" for h in hostcgroup.hierarchies()
                 for d in (h / CGROUP_PARENT).glob("pod-*/*") if d.is_dir()]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not left, left


def test_pod_of_two_containers_in_one_vm(cri: Cri) -> None:
    pod = cri.run_pod("web")
    try:
        # Braces: `a && b & c` backgrounds all of `a && b`, so httpd could
        # start before /www exists (seen once a clone's start got faster).
        web = cri.container(pod, "web", "sh", "-c",
                            "mkdir -p /www && echo pod-web > /www/index.html && "
                            "{ nc -ll -p 7000 -e echo from-web & exec httpd -f -p 8080 -h /www; }")
        side = cri.container(pod, "side", "sleep", "3600")
        # One VM: both see the same guest boot id and kernel, not the node's.
        boots = {cri.exec(c, "cat", "/proc/sys/kernel/random/boot_id").stdout for c in
                 (web, side)}
        assert len(boots) == 1
        uname = cri.exec(side, "uname", "-r")
        assert uname.exit_code == 0 and uname.stdout.decode().strip().endswith("-kata-py")
        assert uname.stdout.decode().strip() != os.uname().release
        # kubectl exec ... dmesg: the guest kernel's own log, from its boot.
        dmesg = cri.exec(side, "dmesg").stdout.decode()
        assert "Linux version 6.1" in dmesg and "-kata-py" in dmesg.splitlines()[0]
        # They share the pod's network: localhost reaches the other container.
        hi = cri.exec(side, "sh", "-c", "for i in 1 2 3 4 5; do nc 127.0.0.1 7000 && break; "
                      "sleep 1; done")
        assert hi.stdout == b"from-web\n", hi.stderr
        # The pod's IP, from CNI, answers from the node's side of the bridge.
        ip = cri.pod_ip(pod)
        assert ip.startswith("10.88.0.")
        assert fetch(cri.node, f"http://{ip}:8080/") == "pod-web\n"
        # A failing command and ExecSync's timeout.
        assert cri.exec(side, "sh", "-c", "exit 3").exit_code == 3
        with pytest.raises(grpc.RpcError) as timed_out:
            cri.exec(side, "sleep", "30", timeout=2)
        assert timed_out.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # Stats, as kubelet reads them.
        stats = cri.rt.ContainerStats(cri.pb.ContainerStatsRequest(container_id=side)).stats
        assert stats.memory.working_set_bytes.value > 0
        # StopContainer with a grace period: sleep as pid 1 ignores SIGTERM,
        # so SIGKILL comes after the grace period.
        t0 = time.monotonic()
        cri.rt.StopContainer(cri.pb.StopContainerRequest(container_id=side, timeout=2),
                             timeout=60)
        assert time.monotonic() - t0 >= 2
        st = cri.rt.ContainerStatus(cri.pb.ContainerStatusRequest(container_id=side)).status
        assert st.state == cri.pb.CONTAINER_EXITED and st.exit_code == 137
        log = (cri.logs / "web" / "web.log")
        assert log.exists()
    finally:
        cri.remove_pod(pod)
    _nothing_left(cri)


def _namespaces(cri: Cri, cid: str) -> dict[str, str]:
    r = cri.exec(cid, "sh", "-c", "for n in ipc uts pid mnt; do echo $n $(readlink "
                 "/proc/self/ns/$n); done; echo hostname $(hostname); cat /proc/1/cmdline")
    lines = r.stdout.decode().splitlines()
    return {**dict(line.split(" ", 1) for line in lines[:-1]), "pid1": lines[-1]}


def test_a_created_container_is_removed_at_once(cri: Cri) -> None:
    """kubelet removes a container it created but never started (the pod
    went away first).  The shim now watches a container's process from
    Create, so a kill before Start ends a Wait at once (`microvm rm -f`
    waited out its 15 s there)."""
    pod = cri.run_pod("created")
    try:
        cid = cri.container(pod, "never", "sleep", "3600", start=False)
        t0 = time.monotonic()
        cri.rt.RemoveContainer(cri.pb.RemoveContainerRequest(container_id=cid), timeout=60)
        assert time.monotonic() - t0 < 5
    finally:
        cri.remove_pod(pod)


def test_pod_containers_share_ipc_and_uts_as_under_runc(cri: Cri) -> None:
    """Without shareProcessNamespace: the pause container's IPC and UTS, pid
    and mount namespaces of their own.  /dev/shm is the pod's."""
    pod = cri.run_pod("nsw")
    a = cri.container(pod, "a", "sleep", "3600")
    b = cri.container(pod, "b", "sleep", "3600")
    na, nb = _namespaces(cri, a), _namespaces(cri, b)
    assert na["ipc"] == nb["ipc"] and na["uts"] == nb["uts"], (na, nb)
    assert na["pid"] != nb["pid"] and na["mnt"] != nb["mnt"], (na, nb)
    assert na["hostname"] == nb["hostname"] == "nsw"
    assert na["pid1"].startswith("sleep")
    assert cri.exec(a, "sh", "-c", "echo from-a > /dev/shm/k").exit_code == 0
    assert cri.exec(b, "cat", "/dev/shm/k").stdout == b"from-a\n"
    cri.remove_pod(pod)
    _nothing_left(cri)


def test_share_process_namespace(cri: Cri) -> None:
    """shareProcessNamespace: the app's pid 1 is the pod's pause, and one
    container sees the other's processes."""
    pod = cri.run_pod("pidns", share_pid=True)
    a = cri.container(pod, "a", "sleep", "3600")
    b = cri.container(pod, "b", "sh", "-c", "exec sleep 3601")
    na, nb = _namespaces(cri, a), _namespaces(cri, b)
    assert na["pid"] == nb["pid"] and na["ipc"] == nb["ipc"], (na, nb)
    assert na["pid1"].startswith("/pause"), na
    ps = cri.exec(a, "ps", "-o", "args").stdout.decode()
    assert "sleep 3601" in ps, ps
    cri.remove_pod(pod)
    _nothing_left(cri)


def test_unknown_handler_fails_cleanly(cri: Cri) -> None:
    with pytest.raises(grpc.RpcError) as e:
        cri.run_pod("nohandler", handler="no-such-runtime")
    assert "no-such-runtime" in (e.value.details() or "")
    assert "nohandler" not in str(cri.pods())
    _nothing_left(cri)


def test_five_pods_in_parallel(cri: Cri) -> None:
    def one(i: int) -> str:
        pod = cri.run_pod(f"par{i}")
        c = cri.container(pod, "c", "sleep", "3600")
        assert cri.exec(c, "true").exit_code == 0
        return pod

    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        pods = list(pool.map(one, range(5)))
    assert len(set(pods)) == 5
    assert len([p for p in helper_processes() if "qemu-system" in p]) == 5
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        list(pool.map(cri.remove_pod, pods))
    _nothing_left(cri)


def test_volumes_oom_and_pod_stats(cri: Cri, tmp_path: Path) -> None:
    """hostPath-style mounts (read-only ones stay read-only), an OOM kill
    kubelet sees as OOMKilled, and the pod's stats."""
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    (ro / "token").write_text("s3cret\n")
    pod = cri.run_pod("vols")
    try:
        c = cri.container(pod, "c", "sleep", "3600", mounts=(
            cri.pb.Mount(container_path="/data", host_path=str(rw)),
            cri.pb.Mount(container_path="/var/run/secrets/token", host_path=str(ro / "token"),
                         readonly=True)))
        r = cri.exec(c, "sh", "-c", "cat /var/run/secrets/token; echo hi > /data/out; "
                     "echo x > /var/run/secrets/token || echo ro-refused")
        assert r.stdout.split() == [b"s3cret", b"ro-refused"], r.stderr
        assert (rw / "out").read_text() == "hi\n"
        assert (ro / "token").read_text() == "s3cret\n"
        t0 = time.time()
        hog = cri.container(pod, "hog", "tail", "/dev/zero", memory=32 << 20)
        deadline = time.monotonic() + 60
        while True:
            st = cri.rt.ContainerStatus(cri.pb.ContainerStatusRequest(container_id=hog)).status
            if st.state == cri.pb.CONTAINER_EXITED or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert st.state == cri.pb.CONTAINER_EXITED and st.reason == "OOMKilled", st
        # `microvm events` tells it too, from the events the pod's shim published.
        out = subprocess.run([MICROVM, "events", "--namespace", "k8s.io", "--since", str(t0),
                              "--until", str(time.time() + 1), "--format", "{{json .}}"],
                             capture_output=True, text=True, timeout=60)
        actions = [e["Action"] for e in map(json.loads, out.stdout.splitlines())
                   if e["Actor"]["Attributes"]["name"] == hog]
        assert actions[:3] == ["create", "start", "oom"] and "die" in actions, actions
        # containerd reads the pod's host cgroup, which holds the shim, QEMU
        # and virtiofsd: the VM's memory is the pod's.
        stats = cri.rt.PodSandboxStats(cri.pb.PodSandboxStatsRequest(pod_sandbox_id=pod))
        assert stats.stats.attributes.id == pod
        assert stats.stats.linux.memory.working_set_bytes.value > 64 << 20
    finally:
        cri.remove_pod(pod)
    _nothing_left(cri)


@pytest.mark.parametrize("handler", ["kata-py", "runc"])
def test_security_context_is_applied_as_under_runc(cri: Cri, handler: str) -> None:
    """kubelet's securityContext: RuntimeDefault seccomp, added and dropped
    capabilities, the default masked and read-only paths."""
    pod = cri.run_pod(f"sec-{handler}", handler=handler)
    try:
        security = cri.pb.LinuxContainerSecurityContext(
            seccomp=cri.pb.SecurityProfile(profile_type=cri.pb.SecurityProfile.RuntimeDefault),
            capabilities=cri.pb.Capability(add_capabilities=["NET_ADMIN"],
                                           drop_capabilities=["CHOWN"]),
            # kubelet sends its default lists (docker's) unless procMount is Unmasked.
            masked_paths=list(oci.DEFAULT_MASKED_PATHS),
            readonly_paths=list(oci.DEFAULT_READONLY_PATHS))
        cid = cri.container(pod, "c", "sleep", "3600", security=security)
        r = cri.exec(cid, "sh", "-c",
                     "grep -E '^(CapEff|Seccomp):' /proc/self/status; "
                     "wc -c < /proc/timer_list; "
                     "echo x > /proc/sys/kernel/domainname 2>/dev/null || echo sys-ro")
        assert r.exit_code == 0, r.stderr
        assert len(r.stdout.decode().splitlines()) == 4, r.stdout
        caps, seccomp, timer_list, sys_ro = [
            line.split(":\t")[-1] for line in r.stdout.decode().splitlines()]
        want = (0xa80425fb | 1 << 12) & ~1  # docker's set, + NET_ADMIN, - CHOWN
        assert (int(caps, 16), seccomp, timer_list, sys_ro) == (want, "2", "0", "sys-ro")
    finally:
        cri.remove_pod(pod)


POD_VICTIMS = {
    "qemu": "qemu-system-x86_64 -name kata-py-",
    "9p-helper": "virtfs-proxy-helper -n -p /run/kata-py/vm/",
    "shim": f"{BINARY} -namespace ",
}


def _only_pid(pattern: str) -> int:
    pids = [int(line.split()[0]) for line in helper_processes() + shim_processes()
            if re.search(pattern, line)]
    assert len(pids) == 1, (pattern, helper_processes(), shim_processes())
    return pids[0]


def _exited(cri: Cri, cid: str, within: float) -> None:
    deadline = time.monotonic() + within
    while cri.rt.ContainerStatus(cri.pb.ContainerStatusRequest(container_id=cid)) \
            .status.state != cri.pb.CONTAINER_EXITED:
        assert time.monotonic() < deadline, "the container still looks alive"
        time.sleep(0.1)


@pytest.mark.parametrize("victim", POD_VICTIMS)
def test_a_pod_whose_vm_or_shim_is_killed_exits_and_is_removed(cri: Cri, victim: str) -> None:
    """SIGKILL of the pod's QEMU, 9p helper or shim: its containers show
    EXITED within a few seconds, and removing the pod leaves nothing."""
    pod = cri.run_pod("doomed")
    try:
        cid = cri.container(pod, "c", "sleep", "3600")
        os.kill(_only_pid(POD_VICTIMS[victim]), 9)
        _exited(cri, cid, 5)
    finally:
        cri.remove_pod(pod)
    _nothing_left(cri)


@pytest.mark.parametrize("victim", POD_VICTIMS)
def test_a_kill_during_a_pod_exec(cri: Cri, victim: str) -> None:
    """kubectl exec's ExecSync ends within seconds, not at its timeout."""
    pod = cri.run_pod("doomed-exec")
    try:
        cid = cri.container(pod, "c", "sleep", "3600")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            running = pool.submit(cri.exec, cid, "sleep", "60", timeout=60)
            time.sleep(1)  # the exec has started in the guest
            os.kill(_only_pid(POD_VICTIMS[victim]), 9)
            t0 = time.monotonic()
            with contextlib.suppress(grpc.RpcError):
                r = running.result(timeout=30)
                assert r.exit_code != 0, r
            assert time.monotonic() - t0 < 5
        _exited(cri, cid, 5)
    finally:
        cri.remove_pod(pod)
    _nothing_left(cri)


@pytest.mark.parametrize("host", ["network", "ipc"])
@pytest.mark.parametrize("handler", ["kata-py", "runc"])
def test_host_namespaces_are_refused_by_name(cri: Cri, handler: str, host: str) -> None:
    """hostNetwork and hostIPC: a pod's VM cannot share the node's, so
    kata-py refuses the pod in one line naming the field (as Kata refuses
    hostNetwork); runc shares them, as it should: here they differ."""
    field = {"network": "hostNetwork", "ipc": "hostIPC"}[host]
    if handler == "runc":
        pod = cri.run_pod(f"host-{host}-runc", handler="runc", host=(host,))
        cri.remove_pod(pod)
        return
    with pytest.raises(grpc.RpcError) as e:
        cri.run_pod(f"host-{host}", host=(host,))
    details = e.value.details()  # type: ignore[attr-defined]
    assert f"kata-py cannot run a pod with {field}" in details, details
    for pod in cri.pods():  # containerd keeps a NOTREADY record of a failed pod
        cri.remove_pod(pod)
    _nothing_left(cri)


@pytest.mark.parametrize("handler", ["kata-py", "runc"])
def test_pod_sysctls_are_applied(cri: Cri, handler: str) -> None:
    """A safe sysctl (kernel.shm_rmid_forced), an unsafe namespaced one
    (kernel.msgmax) and a network one: the pod's containers see them.  A
    sysctl the kernel lacks fails the pod in one line."""
    pod = cri.run_pod(f"sysctl-{handler[:4]}", handler=handler, sysctls={
        "kernel.shm_rmid_forced": "1", "kernel.msgmax": "65000",
        "net.ipv4.ip_unprivileged_port_start": "80"})
    try:
        cid = cri.container(pod, "c", "sleep", "3600")
        r = cri.exec(cid, "cat", "/proc/sys/kernel/shm_rmid_forced", "/proc/sys/kernel/msgmax",
                     "/proc/sys/net/ipv4/ip_unprivileged_port_start")
        assert r.stdout.decode().split() == ["1", "65000", "80"], r.stderr
    finally:
        cri.remove_pod(pod)
    with pytest.raises(grpc.RpcError) as e:
        cri.run_pod(f"nosysctl-{handler[:4]}", handler=handler,
                    sysctls={"kernel.kt_no_such_setting": "1"})
    details = e.value.details()  # type: ignore[attr-defined]
    assert "kernel.kt_no_such_setting" in details or "kt_no_such_setting" in details, details
    if handler == "kata-py":
        assert "sysctl kernel.kt_no_such_setting: the guest kernel has no such setting" \
            in details, details
    for p in cri.pods():
        cri.remove_pod(p)
    _nothing_left(cri)


def test_containerd_restart_keeps_the_pods(cri: Cri) -> None:
    """containerd restarts while a pod runs: the shim keeps serving, and the
    new containerd reconnects, execs, and stops and removes everything."""
    pod = cri.run_pod("survivor")
    try:
        cid = cri.container(pod, "c", "sleep", "3600")
        cri.ctd.stop()
        cri.ctd.start()
        deadline = time.monotonic() + 30
        while True:  # CRI answers once containerd has loaded its state again
            try:
                r = cri.exec(cid, "echo", "still here")
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline
                time.sleep(0.5)
        assert r.exit_code == 0 and r.stdout == b"still here\n"
    finally:
        cri.remove_pod(pod)
    _nothing_left(cri)


KERNEL_FEATURES = (
    "ip link add kt-br0 type bridge && echo bridge=ok; "
    "ip link add kt-v0 type veth peer name kt-v1 && echo veth=ok; "
    "grep -q ' tun$' /proc/misc && echo tun=ok; "
    "[ -e /proc/net/ip_tables_names ] && echo iptables=ok; "
    "[ -e /proc/net/ip6_tables_names ] && echo ip6tables=ok; "
    "[ -e /proc/sys/net/netfilter/nf_conntrack_max ] && echo conntrack=ok; "
    "[ -e /proc/sys/kernel/unprivileged_bpf_disabled ] && echo bpf=ok; true")


@pytest.mark.parametrize("handler", ["kata-py", "runc"])
def test_kernel_features_pods_use(cri: Cri, handler: str) -> None:
    """A container with NET_ADMIN makes a bridge and a veth pair in its pod's
    network namespace, and finds tun, iptables (v4, v6), conntrack and BPF,
    as an init container of a service mesh or a CNI-in-pod would."""
    pod = cri.run_pod(f"kfeat-{handler[:4]}", handler=handler)
    try:
        # As a mesh's init container asks: NET_ADMIN (and NET_RAW), not privileged.
        caps = cri.pb.Capability(add_capabilities=["NET_ADMIN", "NET_RAW"])
        cid = cri.container(pod, "c", "sleep", "3600",
                            security=cri.pb.LinuxContainerSecurityContext(capabilities=caps))
        r = cri.exec(cid, "sh", "-c", KERNEL_FEATURES)
        found = set(r.stdout.decode().split())
        want = {f"{f}=ok" for f in ("bridge", "veth", "tun", "iptables", "ip6tables",
                                    "conntrack", "bpf")}
        assert found >= want, (sorted(want - found), r.stderr)
    finally:
        cri.remove_pod(pod)



@pytest.mark.parametrize("handler", ["kata-py", "runc"])
def test_port_forward(cri: Cri, handler: str) -> None:
    """kubectl port-forward's path: PortForward, then containerd's stream
    server, which dials localhost:8080 in the pod's network namespace on the
    node; a short reply, then a 10 MB one, as under runc.  A port nothing
    listens on ends the stream with an error naming it, at once."""
    pod = cri.run_pod(f"pf-{handler}", handler=handler)
    try:
        cri.container(pod, "web", "sh", "-c", cristack.HTTPD)
        assert cri.http_get(pod, "/small", wait=30) == b"hello\n"
        assert len(cri.http_get(pod, "/big")) == cristack.BIG
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="8081"):
            cri.port_forward(pod, 8081, b"GET / HTTP/1.0\r\n\r\n")
        assert time.monotonic() - t0 < 10
    finally:
        cri.remove_pod(pod)
    _nothing_left(cri)


def test_attach_close_stdin_and_exit_again_and_again(cri: Cri) -> None:
    """kubectl run -i: a stdin_once container gets what attach sent, then EOF
    when the attach ends (containerd's CloseIO while it keeps the FIFO open),
    and exits; ten times in one pod, then the pod goes cleanly.  (A shim
    once cut stdin 50 ms after CloseIO, whatever was still in the FIFO.)"""
    data = bytes(range(256)) * (1 << 13)  # 2 MiB
    pod = cri.run_pod("attach")
    try:
        for i in range(10):
            cid = cri.container(pod, f"a{i}", "wc", "-c", stdin_once=True)
            cri.attach_stdin(cid, data)
            _exited(cri, cid, 30)
            status = cri.rt.ContainerStatus(cri.pb.ContainerStatusRequest(container_id=cid))
            log = (cri.logs / "attach" / f"a{i}.log").read_text()
            assert status.status.exit_code == 0 and log.split()[-1] == str(len(data)), log
    finally:
        cri.remove_pod(pod)
    _nothing_left(cri)


@pytest.mark.parametrize("handler", ["kata-py", "runc"])
def test_mount_propagation_from_the_node(cri: Cri, handler: str, tmp_path: Path) -> None:
    """A mount the node makes under a hostPath after the container started
    (a CSI driver's, a node agent's) appears in it with HostToContainer and
    Bidirectional, and not with the default (private), as under runc.  The
    host path is a shared mount, as on a systemd node (CRI requires it)."""
    base = tmp_path / "vols"
    modes = {"private": cri.pb.PROPAGATION_PRIVATE,
             "h2c": cri.pb.PROPAGATION_HOST_TO_CONTAINER,
             "bidi": cri.pb.PROPAGATION_BIDIRECTIONAL}
    for name in modes:
        (base / name / "sub").mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(base), str(base)], check=True)
    subprocess.run(["mount", "--make-rshared", str(base)], check=True)
    pod = None
    try:
        pod = cri.run_pod(f"prop-{handler}", handler=handler)
        cid = cri.container(pod, "c", "sleep", "3600", mounts=tuple(
            cri.pb.Mount(container_path=f"/{name}", host_path=str(base / name), propagation=mode)
            for name, mode in modes.items()))
        for name in modes:
            subprocess.run(["mount", "-t", "tmpfs", "node-made", str(base / name / "sub")],
                           check=True)
            (base / name / "sub" / "marker").write_text("here\n")
        r = cri.exec(cid, "sh", "-c", "for v in private h2c bidi; do "
                                      "cat /$v/sub/marker 2>/dev/null || echo none; done")
        assert r.stdout.decode().split() == ["none", "here", "here"], r.stderr
    finally:
        if pod is not None:
            cri.remove_pod(pod)
        subprocess.run(["umount", "-R", str(base)], check=False)
    _nothing_left(cri)


@pytest.mark.parametrize("handler", ["kata-py", "runc"])
def test_a_setuid_image_binary_raises_privileges_unless_no_new_privs(cri: Cri,
                                                                     handler: str) -> None:
    """allowPrivilegeEscalation: true (no_new_privs false): the image's
    set-uid-root busybox runs with euid 0 for uid 1000, as under runc; false
    prevents it.  Observed through ping, which needs CAP_NET_RAW, which only
    euid 0 has here (no ping_group_range), while the plain busybox cannot."""
    ping = "ping -c 1 -W 2 127.0.0.1 >/dev/null 2>&1 && echo reached || echo refused"
    pod = cri.run_pod(f"suid-{handler}", handler=handler)
    try:
        for nnp, want in ((False, "reached"), (True, "refused")):
            security = cri.pb.LinuxContainerSecurityContext(
                run_as_user=cri.pb.Int64Value(value=1000), no_new_privs=nnp)
            cid = cri.container(pod, f"c{int(nnp)}", "sleep", "3600", security=security)
            r = cri.exec(cid, "sh", "-c", f"id -u; {cristack.SUID_BUSYBOX} {ping}; "
                                          f"busybox {ping}")
            assert r.stdout.decode().split() == ["1000", want, "refused"], (nnp, r.stderr)
    finally:
        cri.remove_pod(pod)


def test_a_guest_kernel_panic_ends_the_pods_containers(cri: Cri) -> None:
    """A privileged container panics its pod's kernel: the containers show
    EXITED within seconds, and removing the pod leaves nothing."""
    pod = cri.run_pod("panic", privileged=True)
    try:
        privileged = cri.pb.LinuxContainerSecurityContext(privileged=True)
        cid = cri.container(pod, "c", "sleep", "3600", security=privileged)
        other = cri.container(pod, "d", "sleep", "3600")
        with contextlib.suppress(grpc.RpcError):
            cri.exec(cid, "sh", "-c", "echo c > /proc/sysrq-trigger", timeout=10)
        for c in (cid, other):
            _exited(cri, c, 5)
    finally:
        cri.remove_pod(pod)
    _nothing_left(cri)


def test_the_exporter_names_each_pod_and_container(cri: Cri) -> None:
    """`microvm monitor` beside containerd's CRI: the pod's sandbox carries
    the pod's name and namespace from CRI's annotations, each container its
    name, and the containerd namespace is k8s.io."""
    pod = cri.run_pod("metrics")
    try:
        cri.container(pod, "app", "sh", "-c", "sleep 3600 & wait")
        with exporter([MICROVM]) as url:
            m = scrape(url)
        mine = [lab for lab, _ in m["kata_py_container_pids"] if lab["pod"] == "metrics"]
        assert {lab["pod_namespace"] for lab in mine} == {"default"}
        assert {lab["namespace"] for lab in mine} == {"k8s.io"}
        assert sorted(lab["container"] for lab in mine) == ["", "app"]  # the pause has none
        assert len({lab["sandbox"] for lab in mine}) == 1  # one VM for the pod
        app = next(lab for lab in mine if lab["container"] == "app")
        assert one(m, "kata_py_container_pids", container_id=app["container_id"]) == 2
        assert one(m, "kata_py_guest_containers", sandbox=app["sandbox"]) == 2
    finally:
        cri.remove_pod(pod)


@pytest.mark.secure
def test_runtime_class_kata_py_secure_boots_the_secure_flavour(cri: Cri) -> None:
    """RuntimeClass kata-py-secure (`microvm install containerd` registers
    it with its own config file, firmware: secure): the pod's VM boots
    through OVMF with Secure Boot and a vTPM, and starts only once its
    measured boot matched (a mismatch fails RunPodSandbox)."""
    from microvm.cli.install import SECURE_HANDLER
    from microvm.paths import GUEST
    pod = cri.run_pod("secure", handler=SECURE_HANDLER)
    try:
        cid = cri.container(pod, "app", "sleep", "3600")
        r = cri.exec(cid, "uname", "-r")
        assert r.exit_code == 0
        assert r.stdout.decode().strip() == (GUEST / "vmlinuz-secure.release").read_text().strip()
        vms = [Path(f"/proc/{p.split()[0]}/cmdline").read_bytes().replace(b"\0", b" ")
               for p in helper_processes() if "qemu-system" in p]
        assert len(vms) == 1 and b"q35,smm=on" in vms[0] and b"tpm-crb" in vms[0], vms
    finally:
        cri.remove_pod(pod)
    _nothing_left(cri)


def test_pods_take_the_spare_vm_and_the_pods_network(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With spares on (microvm/core/spare.py), a pod's `start` gets the daemon
    spare the server made after the last pod: its VM restored, with a NIC on
    a tap of its own that moves into the pod's namespace.  The pod's address
    answers from the node, the pod's cgroup holds the spare's QEMU, and
    nothing is left once the pods are gone."""
    monkeypatch.delenv("KATA_PY_SPARE", raising=False)
    with namespace("kt-spnode") as node, cristack.stack(tmp_path, node) as c:
        c.remove_pod(c.run_pod("sp0"))  # makes the server, then the first spare
        for name in ("sp1", "sp2"):
            runner = spare_runner("daemon")
            pod = c.run_pod(name)
            try:
                c.container(pod, "web", "sh", "-c", cristack.HTTPD)
                assert fetch(node, f"http://{c.pod_ip(pod)}:8080/small") == "hello\n"
                assert c.http_get(pod, "/small", wait=30).endswith(b"hello\n")
                pids = cristack.pod_pids(name)
                qemu = [p for p in children(runner)
                        if "qemu" in Path(f"/proc/{p}/comm").read_text()]
                assert runner in pids and qemu and qemu[0] in pids, (runner, qemu, pids)
            finally:
                c.remove_pod(pod)
    deadline = time.monotonic() + 20
    while helper_processes() or shim_processes() or network_leftovers():
        assert time.monotonic() < deadline, \
            helper_processes() + shim_processes() + network_leftovers()
        time.sleep(0.2)
