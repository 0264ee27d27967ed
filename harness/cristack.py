"""containerd with its CRI plugin and kata-py, driven from kubelet's side:
for the CRI tests and the CRI benchmark.

containerd runs with its own root and sockets inside a network namespace
the caller made (the CNI bridge and the pods' traffic stay there), with
Debian's CNI bridge plugin, kata-py registered by `microvm install
containerd`, and two images built here: a static pause program (with gcc)
and busybox.  The CRI v1 client is compiled at run time from the schema
subset in tests/e2e/cri/api.proto (grpcio, a development dependency).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from microvm.core import hostcgroup
from microvm.images.ociarchive import gzip_layer, layer_from_dir, oci_archive_from_layers

from .privatecontainerd import Containerd

API_PROTO = Path(__file__).resolve().parents[1] / "tests" / "e2e" / "cri" / "api.proto"
PAUSE_IMAGE = "registry.k8s.io/pause:kata-py-test"
APP_IMAGE = "docker.io/library/kata-py-cri-test:latest"
HANDLER = "kata-py"
CGROUP_PARENT = "kata-py-cri-test"
CNI_NETWORK = "kata-py-cri-test"
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


def compile_api(out: Path) -> tuple[ModuleType, ModuleType]:
    """The CRI v1 messages and stubs (api_pb2, api_pb2_grpc)."""
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{API_PROTO.parent}",
                    f"--python_out={out}", f"--grpc_python_out={out}", API_PROTO.name],
                   check=True, capture_output=True)
    sys.path.insert(0, str(out))
    try:
        return importlib.import_module("api_pb2"), importlib.import_module("api_pb2_grpc")
    finally:
        sys.path.remove(str(out))


def build_images(tmp: Path) -> tuple[Path, Path]:
    """OCI archives: the pause image (a static program) and busybox."""
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
    # A second layer: a set-uid-root copy of busybox, as images ship (ping, su).
    suid = tmp / "suid-root" / SUID_BUSYBOX.lstrip("/")
    suid.parent.mkdir(parents=True)
    shutil.copy2("/var/lib/kata-py/rootfs/busybox/bin/busybox", suid)
    os.chown(suid, 0, 0)
    os.chmod(suid, 0o4755)
    for d in (suid.parent, suid.parent.parent):
        os.chmod(d, 0o755)
    app = oci_archive_from_layers(tmp / "app.tar", APP_IMAGE,
                                  [layer_from_dir(Path("/var/lib/kata-py/rootfs/busybox")),
                                   layer_from_dir(tmp / "suid-root")],
                                  {"Cmd": ["sh"]})
    return pause, app


SUID_BUSYBOX = "/usr/local/bin/busybox-suid"  # in the app image, mode 4755, root's
# A pod's web server, for port-forward: /small ("hello\n") and /big (10 MiB).
HTTPD = ("mkdir -p /www && echo hello > /www/small && head -c 10485760 /dev/zero > /www/big "
         "&& exec httpd -f -p 8080 -h /www")
BIG = 10 << 20


class Cri:
    """kubelet's side: RuntimeService and ImageService over containerd's socket."""

    def __init__(self, ctd: Containerd, api: tuple[ModuleType, ModuleType], node: str) -> None:
        import grpc
        self.ctd, self.pb, self.node = ctd, api[0], node
        self.channel = grpc.insecure_channel(f"unix://{ctd.address}")
        self.rt = api[1].RuntimeServiceStub(self.channel)
        self.logs = ctd.root / "pod-logs"

    def run_pod(self, name: str, handler: str = HANDLER, share_pid: bool = False,
                host: tuple[str, ...] = (), sysctls: dict[str, str] | None = None,
                privileged: bool = False) -> str:
        """share_pid: a pod with shareProcessNamespace; host: the namespaces
        it shares with the node ("network", "ipc": hostNetwork, hostIPC);
        privileged: a pod that may hold privileged containers."""
        logs = self.logs / name
        logs.mkdir(parents=True, exist_ok=True)
        config = self.pb.PodSandboxConfig(
            metadata=self.pb.PodSandboxMetadata(name=name, uid=f"uid-{name}",
                                                namespace="default", attempt=0),
            # As kubelet: a hostNetwork pod has the node's UTS namespace too.
            hostname="" if "network" in host else name, log_directory=str(logs),
            # As kubelet's cgroupfs driver names a pod's cgroup.
            linux=self.pb.LinuxPodSandboxConfig(
                cgroup_parent=f"/{CGROUP_PARENT}/pod-{name}", sysctls=sysctls or {},
                security_context=self.pb.LinuxSandboxSecurityContext(
                    namespace_options=self._namespaces(share_pid, host),
                    privileged=privileged)))
        r = self.rt.RunPodSandbox(self.pb.RunPodSandboxRequest(config=config,
                                                               runtime_handler=handler),
                                  timeout=180)
        self._configs = getattr(self, "_configs", {})
        self._configs[r.pod_sandbox_id] = config
        return str(r.pod_sandbox_id)

    def _namespaces(self, share_pid: bool, host: tuple[str, ...] = ()) -> Any:
        return self.pb.NamespaceOption(
            pid=self.pb.POD if share_pid else self.pb.CONTAINER,
            network=self.pb.NODE if "network" in host else self.pb.POD,
            ipc=self.pb.NODE if "ipc" in host else self.pb.POD)

    def container(self, pod: str, name: str, *cmd: str, mounts: tuple[Any, ...] = (),
                  memory: int = 0, security: Any = None, start: bool = True,
                  stdin_once: bool = False) -> str:
        """security: a LinuxContainerSecurityContext (its namespace options
        are set here); start=False: created only; stdin_once: stdin open
        until the first attach ends (kubectl run -i --rm)."""
        # kubelet copies the pod's namespace options into each container's.
        options = self._configs[pod].linux.security_context.namespace_options
        context = security or self.pb.LinuxContainerSecurityContext()
        context.namespace_options.CopyFrom(options)
        linux = self.pb.LinuxContainerConfig(
            resources=self.pb.LinuxContainerResources(memory_limit_in_bytes=memory),
            security_context=context)
        config = self.pb.ContainerConfig(
            metadata=self.pb.ContainerMetadata(name=name), image=self.pb.ImageSpec(
                image=APP_IMAGE), command=list(cmd), log_path=f"{name}.log",
            mounts=list(mounts), linux=linux, stdin=stdin_once, stdin_once=stdin_once)
        cid = self.rt.CreateContainer(self.pb.CreateContainerRequest(
            pod_sandbox_id=pod, config=config, sandbox_config=self._configs[pod]),
            timeout=120).container_id
        if start:
            self.rt.StartContainer(self.pb.StartContainerRequest(container_id=cid), timeout=120)
        return str(cid)

    def exec(self, cid: str, *cmd: str, timeout: int = 30) -> Any:
        return self.rt.ExecSync(self.pb.ExecSyncRequest(container_id=cid, cmd=list(cmd),
                                                        timeout=timeout), timeout=timeout + 30)

    def _websocket(self, url: str, timeout: float) -> Any:
        """A WebSocket to containerd's stream server (in the node's namespace)
        at url, speaking v4.channel.k8s.io: a channel byte before every message."""
        import websocket

        from microvm.net import netlink
        host, _, rest = url.removeprefix("http://").partition(":")
        sock = netlink.in_namespace(lambda: socket.create_connection(
            (host, int(rest.split("/")[0])), timeout=timeout), f"/var/run/netns/{self.node}")
        return websocket.create_connection(url.replace("http://", "ws://", 1), socket=sock,
                                           subprotocols=["v4.channel.k8s.io"], timeout=timeout)

    def attach_stdin(self, cid: str, data: bytes, timeout: float = 60) -> None:
        """kubectl attach -i: data to the container's stdin, then the end of
        the attach (for a stdin_once container, the end of its stdin)."""
        url = self.rt.Attach(self.pb.AttachRequest(container_id=cid, stdin=True),
                             timeout=30).url
        ws = self._websocket(url, timeout)
        try:
            for i in range(0, len(data), 1 << 16):
                ws.send_binary(b"\x00" + data[i:i + (1 << 16)])
        finally:
            ws.close()

    def port_forward(self, pod: str, port: int, request: bytes, timeout: float = 60) -> bytes:
        """kubelet's port-forward: PortForward's URL, then the streaming
        protocol over a WebSocket (v4.channel.k8s.io: a channel byte before
        every message; data on 0, errors on 1, each opened by the port,
        little-endian).  Sends request; returns all the pod sent back."""
        import websocket

        url = self.rt.PortForward(self.pb.PortForwardRequest(
            pod_sandbox_id=pod, port=[port]), timeout=30).url
        ws = self._websocket(url, timeout)
        data, errors = bytearray(), bytearray()
        opened: set[int] = set()
        gone = (websocket.WebSocketConnectionClosedException, ConnectionError)
        try:
            while True:
                if len(opened) == 2 and request:  # after both opening messages, as kubelet
                    with contextlib.suppress(*gone):  # an error may have closed it already
                        ws.send_binary(b"\x00" + request)
                    request = b""
                try:
                    msg = ws.recv()
                except gone:
                    break
                if not msg:
                    break
                msg = msg if isinstance(msg, bytes) else msg.encode()
                channel, body = msg[0], msg[1:]
                if channel not in opened:  # the port, first on each channel
                    opened.add(channel)
                    assert body == port.to_bytes(2, "little"), body
                    continue
                (data if channel == 0 else errors).extend(body)
        finally:
            ws.close()
        if errors:
            raise RuntimeError(f"port-forward to {port}: {errors.decode(errors='replace')}")
        return bytes(data)

    def http_get(self, pod: str, path: str, port: int = 8080, wait: float = 0) -> bytes:
        """The body of an HTTP/1.0 GET through port-forward; wait: seconds to
        retry while the server is not up yet."""
        deadline = time.monotonic() + wait
        while True:
            try:
                reply = self.port_forward(pod, port, f"GET {path} HTTP/1.0\r\n\r\n".encode())
            except RuntimeError:
                reply = b""
            head, _, body = reply.partition(b"\r\n\r\n")
            if head.startswith(b"HTTP/1.") or time.monotonic() > deadline:
                return body
            time.sleep(0.2)

    def pod_ip(self, pod: str) -> str:
        st = self.rt.PodSandboxStatus(self.pb.PodSandboxStatusRequest(pod_sandbox_id=pod))
        return str(st.status.network.ip)

    def remove_pod(self, pod: str) -> None:
        self.rt.StopPodSandbox(self.pb.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=120)
        self.rt.RemovePodSandbox(self.pb.RemovePodSandboxRequest(pod_sandbox_id=pod),
                                 timeout=120)

    def pods(self) -> list[str]:
        return [p.id for p in self.rt.ListPodSandbox(self.pb.ListPodSandboxRequest()).items]


@contextlib.contextmanager
def stack(tmp: Path, node: str) -> Iterator[Cri]:
    """containerd with CRI in the network namespace `node` (by name); every pod
    left is removed and containerd stopped at the end."""
    api = compile_api(Path(tempfile.mkdtemp(dir=tmp, prefix="cri-pb-")))
    ctd = Containerd.create(tmp / "containerd", cri_sandbox_image=PAUSE_IMAGE,
                            prefix=("nsenter", f"--net=/var/run/netns/{node}"))
    (ctd.root / "cni" / "10-kata-py-test.conflist").write_text(json.dumps({
        "cniVersion": "0.4.0", "name": CNI_NETWORK, "plugins": [{
            "type": "bridge", "bridge": "kcri0", "isGateway": True, "ipMasq": False,
            "ipam": {"type": "host-local", "subnet": "10.88.0.0/24",
                     "dataDir": str(tmp / "ipam"), "routes": [{"dst": "0.0.0.0/0"}]}}]}))
    try:
        for archive in build_images(tmp):
            ctd.ctr("-n", "k8s.io", "image", "import", str(archive), check=True)
        c = Cri(ctd, api, node)
        yield c
        for pod in c.pods():
            with contextlib.suppress(Exception):
                c.remove_pod(pod)
    finally:
        ctd.stop()
        for f in Path("/var/lib/cni/results").glob(f"{CNI_NETWORK}-*"):
            f.unlink()
        # The pod cgroups' parents are kubelet's to remove: here, ours.
        for h in hostcgroup.hierarchies():
            for d in sorted((h / CGROUP_PARENT).glob("**/"), reverse=True):
                with contextlib.suppress(OSError):
                    d.rmdir()


def pod_pids(pod_name: str) -> list[int]:
    """The host processes of a kata-py pod: its cgroup holds the shim, QEMU, virtiofsd."""
    for h in hostcgroup.hierarchies():
        for procs in (h / CGROUP_PARENT / f"pod-{pod_name}").glob("*/cgroup.procs"):
            return [int(p) for p in procs.read_text().split()]
    return []

