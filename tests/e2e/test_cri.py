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
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest

from microvm import hostcgroup
from microvm.ociarchive import gzip_layer, layer_from_dir, oci_archive_from_layers
from microvm.privatecontainerd import Containerd
from tests.conftest import helper_processes
from tests.netns import CNI_BIN, fetch, links, namespace

pytestmark = [pytest.mark.vm, pytest.mark.skipif(
    shutil.which("containerd") is None or not (CNI_BIN / "bridge").exists()
    or shutil.which("gcc") is None,
    reason="needs containerd, containernetworking-plugins and gcc")]

HERE = Path(__file__).parent
PAUSE_IMAGE = "registry.k8s.io/pause:kata-py-test"
APP_IMAGE = "docker.io/library/kata-py-cri-test:latest"
HANDLER = "kata-py"
CGROUP_PARENT = "kata-py-cri-test"
PAUSE_C = r"""
#include <signal.h>
#include <stdlib.h>
#include <unistd.h>
static void bye(int sig) { (void)sig; _exit(0); }
int main(void) {
    signal(SIGTERM, bye);
    signal(SIGINT, bye);
    for (;;) pause();
}
"""


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModuleType, ModuleType]:
    """The CRI v1 messages and stubs, compiled from tests/e2e/cri/api.proto."""
    out = tmp_path_factory.mktemp("cri_pb")
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{HERE / 'cri'}",
                    f"--python_out={out}", f"--grpc_python_out={out}", "api.proto"],
                   check=True, capture_output=True)
    sys.path.insert(0, str(out))
    try:
        import api_pb2  # type: ignore[import-not-found]
        import api_pb2_grpc  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(out))
    return api_pb2, api_pb2_grpc


def _images(tmp: Path) -> tuple[Path, Path]:
    src = tmp / "pause.c"
    src.write_text(PAUSE_C)
    root = tmp / "pause-root"
    root.mkdir()
    subprocess.run(["gcc", "-static", "-O2", "-o", str(root / "pause"), str(src)], check=True,
                   capture_output=True)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as t:
        t.add(root / "pause", arcname="pause")
    pause = oci_archive_from_layers(tmp / "pause.tar", PAUSE_IMAGE, [gzip_layer(raw.getvalue())],
                                    {"Entrypoint": ["/pause"]})
    app = oci_archive_from_layers(tmp / "app.tar", APP_IMAGE,
                                  [layer_from_dir(Path("/var/lib/kata-py/rootfs/busybox"))],
                                  {"Cmd": ["sh"]})
    return pause, app


class Cri:
    """kubelet's side: RuntimeService and ImageService over containerd's socket."""

    def __init__(self, ctd: Containerd, api: tuple[ModuleType, ModuleType], node: str) -> None:
        self.ctd, self.pb, self.node = ctd, api[0], node
        self.channel = grpc.insecure_channel(f"unix://{ctd.address}")
        self.rt = api[1].RuntimeServiceStub(self.channel)
        self.logs = ctd.root / "pod-logs"

    def run_pod(self, name: str, handler: str = HANDLER) -> str:
        logs = self.logs / name
        logs.mkdir(parents=True, exist_ok=True)
        config = self.pb.PodSandboxConfig(
            metadata=self.pb.PodSandboxMetadata(name=name, uid=f"uid-{name}",
                                                namespace="default", attempt=0),
            hostname=name, log_directory=str(logs),
            # As kubelet's cgroupfs driver names a pod's cgroup.
            linux=self.pb.LinuxPodSandboxConfig(cgroup_parent=f"/{CGROUP_PARENT}/pod-{name}"))
        r = self.rt.RunPodSandbox(self.pb.RunPodSandboxRequest(config=config,
                                                               runtime_handler=handler),
                                  timeout=180)
        self._configs = getattr(self, "_configs", {})
        self._configs[r.pod_sandbox_id] = config
        return str(r.pod_sandbox_id)

    def container(self, pod: str, name: str, *cmd: str, mounts: tuple[Any, ...] = (),
                  memory: int = 0) -> str:
        linux = self.pb.LinuxContainerConfig(
            resources=self.pb.LinuxContainerResources(memory_limit_in_bytes=memory))
        config = self.pb.ContainerConfig(
            metadata=self.pb.ContainerMetadata(name=name), image=self.pb.ImageSpec(
                image=APP_IMAGE), command=list(cmd), log_path=f"{name}.log",
            mounts=list(mounts), linux=linux)
        cid = self.rt.CreateContainer(self.pb.CreateContainerRequest(
            pod_sandbox_id=pod, config=config, sandbox_config=self._configs[pod]),
            timeout=120).container_id
        self.rt.StartContainer(self.pb.StartContainerRequest(container_id=cid), timeout=120)
        return str(cid)

    def exec(self, cid: str, *cmd: str, timeout: int = 30) -> Any:
        return self.rt.ExecSync(self.pb.ExecSyncRequest(container_id=cid, cmd=list(cmd),
                                                        timeout=timeout), timeout=timeout + 30)

    def pod_ip(self, pod: str) -> str:
        st = self.rt.PodSandboxStatus(self.pb.PodSandboxStatusRequest(pod_sandbox_id=pod))
        return str(st.status.network.ip)

    def remove_pod(self, pod: str) -> None:
        self.rt.StopPodSandbox(self.pb.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=120)
        self.rt.RemovePodSandbox(self.pb.RemovePodSandboxRequest(pod_sandbox_id=pod),
                                 timeout=120)

    def pods(self) -> list[str]:
        return [p.id for p in self.rt.ListPodSandbox(self.pb.ListPodSandboxRequest()).items]


@pytest.fixture(scope="module")
def cri(tmp_path_factory: pytest.TempPathFactory,
        api: tuple[ModuleType, ModuleType]) -> Iterator[Cri]:
    tmp = tmp_path_factory.mktemp("cri")
    with namespace("kt-node") as node:
        ctd = Containerd.create(tmp / "containerd", cri_sandbox_image=PAUSE_IMAGE,
                                prefix=("nsenter", f"--net=/var/run/netns/{node}"))
        (ctd.root / "cni" / "10-kata-py-test.conflist").write_text(json.dumps({
            "cniVersion": "0.4.0", "name": "kata-py-cri-test", "plugins": [{
                "type": "bridge", "bridge": "kcri0", "isGateway": True, "ipMasq": False,
                "ipam": {"type": "host-local", "subnet": "10.88.0.0/24",
                         "dataDir": str(tmp / "ipam"), "routes": [{"dst": "0.0.0.0/0"}]}}]}))
        try:
            for archive in _images(tmp):
                ctd.ctr("-n", "k8s.io", "image", "import", str(archive), check=True)
            c = Cri(ctd, api, node)
            yield c
            for pod in c.pods():
                with contextlib.suppress(Exception):
                    c.remove_pod(pod)
        finally:
            ctd.stop()
            for f in Path("/var/lib/cni/results").glob("kata-py-cri-test-*"):
                f.unlink()
            # The pod cgroups' parents are kubelet's to remove: here, ours.
            for h in hostcgroup.hierarchies():
                for d in sorted((h / CGROUP_PARENT).glob("**/"), reverse=True):
                    with contextlib.suppress(OSError):
                        d.rmdir()


def _nothing_left(cri: Cri) -> None:
    deadline = time.monotonic() + 20
    while True:
        left = helper_processes()
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
        web = cri.container(pod, "web", "sh", "-c",
                            "mkdir -p /www && echo pod-web > /www/index.html && "
                            "nc -ll -p 7000 -e echo from-web & exec httpd -f -p 8080 -h /www")
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
        hog = cri.container(pod, "hog", "tail", "/dev/zero", memory=32 << 20)
        deadline = time.monotonic() + 60
        while True:
            st = cri.rt.ContainerStatus(cri.pb.ContainerStatusRequest(container_id=hog)).status
            if st.state == cri.pb.CONTAINER_EXITED or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert st.state == cri.pb.CONTAINER_EXITED and st.reason == "OOMKilled", st
        # containerd reads the pod's host cgroup, which holds the shim, QEMU
        # and virtiofsd: the VM's memory is the pod's.
        stats = cri.rt.PodSandboxStats(cri.pb.PodSandboxStatsRequest(pod_sandbox_id=pod))
        assert stats.stats.attributes.id == pod
        assert stats.stats.linux.memory.working_set_bytes.value > 64 << 20
    finally:
        cri.remove_pod(pod)
    _nothing_left(cri)
