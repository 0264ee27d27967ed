"""The shim binary's command-line contract, without a VM."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from google.protobuf import any_pb2

from microvm.protocol import task_pb2
from microvm.shim.manager import parse_args, socket_path
from microvm.shim.options import runtime_options_config

SHIM = str(Path(sys.executable).with_name("containerd-shim-kata-py-v2"))


def test_go_style_flags() -> None:
    a = parse_args(["-namespace", "k8s.io", "-address", "/run/c.sock", "-publish-binary",
                    "/usr/bin/containerd", "-id", "abc", "-debug", "-unknown-flag", "start"])
    assert (a.namespace, a.address, a.id, a.debug, a.action) == (
        "k8s.io", "/run/c.sock", "abc", True, "start")
    b = parse_args(["-namespace=default", "-id=x", "-bundle", "/b", "delete"])
    assert (b.namespace, b.id, b.bundle, b.action, b.debug) == ("default", "x", "/b", "delete",
                                                               False)


def test_socket_path_is_runcs_convention() -> None:
    import hashlib
    a = parse_args(["-namespace", "k8s.io", "-address", "/run/containerd/containerd.sock"])
    want = hashlib.sha256(b"/run/containerd/containerd.sock/k8s.io/pod1").hexdigest()
    assert socket_path(a, "pod1") == Path("/run/containerd/s") / want


def test_delete_prints_only_a_delete_response_and_is_idempotent(tmp_path: Path) -> None:
    for _ in range(2):
        t0 = time.monotonic()
        p = subprocess.run([SHIM, "-namespace", "default", "-address", "/nonexistent.sock",
                            "-id", "gone", "-bundle", str(tmp_path), "delete"],
                           capture_output=True, cwd=tmp_path, timeout=10)
        assert time.monotonic() - t0 < 5
        assert p.returncode == 0, p.stderr
        resp = task_pb2.DeleteResponse()
        resp.ParseFromString(p.stdout)
        assert resp.exit_status == 137
        assert resp.exited_at.seconds > 0


def test_delete_removes_a_dead_shims_socket(tmp_path: Path) -> None:
    import socket
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()  # bound, never listening: nobody answers
    (tmp_path / "address").write_text(f"unix://{stale}")
    p = subprocess.run([SHIM, "-id", "x", "-bundle", str(tmp_path), "delete"],
                       capture_output=True, cwd=tmp_path, timeout=10)
    assert p.returncode == 0
    assert not stale.exists()


def test_unknown_action_is_an_error() -> None:
    p = subprocess.run([SHIM, "-id", "x", "frobnicate"], capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip() == "containerd-shim-kata-py-v2: unknown action 'frobnicate'"


def test_runtime_options_config_path() -> None:
    opts = task_pb2.RuntimeOptions(config_path="/etc/kata-py/other.yaml")
    assert runtime_options_config(any_pb2.Any(value=opts.SerializeToString())) == \
        "/etc/kata-py/other.yaml"
    body = task_pb2.RuntimeOptions(config_body=b'ConfigPath = "/x.yaml"\n')
    assert runtime_options_config(any_pb2.Any(value=body.SerializeToString())) == "/x.yaml"
    assert runtime_options_config(any_pb2.Any(value=b"\xff\xff")) is None
