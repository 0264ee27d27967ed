"""deploy/: the manifests carry what Kubernetes requires and agree with each
other and with the runtime; the installer installs and uninstalls cleanly.

No cluster runs here: the manifests are checked field by field, and the
installer runs against scratch paths (containerd's restart is a stand-in)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from microvm.cli.install import HANDLER, RUNTIME_TYPE, SECURE_HANDLER

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|Ki|Mi|Gi|Ti|k|M|G|T)?$")
NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def docs(name: str) -> list[dict[str, Any]]:
    with open(DEPLOY / name) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def by_kind(name: str) -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in docs(name)}


@pytest.mark.parametrize("name", ["runtimeclass.yaml", "runtimeclass-secure.yaml",
                                  "example-pod.yaml",
                                  "kata-py-deploy.yaml", "kata-py-cleanup.yaml",
                                  "kata-py-monitor.yaml"])
def test_every_object_has_what_the_api_requires(name: str) -> None:
    for d in docs(name):
        assert {"apiVersion", "kind", "metadata"} <= d.keys(), d
        assert NAME.match(d["metadata"]["name"]), d["metadata"]


@pytest.mark.parametrize(("name", "handler"), [("runtimeclass.yaml", HANDLER),
                                               ("runtimeclass-secure.yaml", SECURE_HANDLER)])
def test_runtimeclass(name: str, handler: str) -> None:
    """Each class names a handler `microvm install containerd` registers."""
    rc = by_kind(name)["RuntimeClass"]
    assert rc["apiVersion"] == "node.k8s.io/v1"
    assert rc["handler"] == handler and rc["metadata"]["name"] == handler
    from microvm.cli.install import plan
    assert f"runtimes.{handler}]" in (plan("", "t") or "")
    fixed = rc["overhead"]["podFixed"]
    assert set(fixed) == {"memory", "cpu"} and all(QUANTITY.match(v) for v in fixed.values())
    # The scheduler may only pick nodes the installer labelled.
    label = rc["scheduling"]["nodeSelector"]
    script = (DEPLOY / "kata-py-deploy.sh").read_text()
    assert list(label) == ["kata-py.io/runtime"] and f"LABEL={list(label)[0]}" in script
    assert label[list(label)[0]] == "true"


def test_example_pod_uses_the_class() -> None:
    pod = by_kind("example-pod.yaml")["Pod"]
    assert pod["apiVersion"] == "v1" and pod["spec"]["runtimeClassName"] == HANDLER
    for c in pod["spec"]["containers"]:
        assert c["name"] and c["image"]
        assert all(QUANTITY.match(v) for v in c["resources"]["limits"].values())


@pytest.mark.parametrize("name", ["kata-py-deploy.yaml", "kata-py-cleanup.yaml"])
def test_daemonsets(name: str) -> None:
    ds = next(d for d in docs(name) if d["kind"] == "DaemonSet")
    assert ds["apiVersion"] == "apps/v1"
    spec, pod = ds["spec"], ds["spec"]["template"]["spec"]
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert pod["hostPID"] is True
    volumes = {v["name"] for v in pod["volumes"]}
    for c in pod["containers"]:
        assert c["image"] and c["args"][0] in ("install", "uninstall")
        assert c["securityContext"]["privileged"] is True
        assert {m["name"] for m in c["volumeMounts"]} <= volumes
        env = {e["name"]: e for e in c["env"]}
        assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    accounts = {d["metadata"]["name"] for d in docs("kata-py-deploy.yaml")
                if d["kind"] == "ServiceAccount"}
    assert pod["serviceAccountName"] in accounts


def test_the_monitor_runs_where_kata_py_is_and_serves_the_node() -> None:
    ds = by_kind("kata-py-monitor.yaml")["DaemonSet"]
    pod = ds["spec"]["template"]["spec"]
    # Where the installer put kata-py: its label, as the RuntimeClass uses it.
    rc = by_kind("runtimeclass.yaml")["RuntimeClass"]
    assert pod["nodeSelector"] == rc["scheduling"]["nodeSelector"]
    assert pod["hostPID"] is True and pod["hostNetwork"] is True
    c = pod["containers"][0]
    assert c["args"] == ["monitor"]
    env = {e["name"]: e["value"] for e in c["env"]}
    port = int(env["LISTEN"].rpartition(":")[2])
    assert c["ports"][0]["containerPort"] == port
    assert ds["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    assert all(QUANTITY.match(v) for v in c["resources"]["limits"].values())


def test_the_monitor_action_runs_microvm_monitor_on_the_host(tmp_path: Path) -> None:
    """The entrypoint's monitor action, with a stand-in for nsenter and microvm."""
    record = tmp_path / "argv"
    fake = tmp_path / "microvm"
    fake.write_text(f'#!/bin/sh\necho "$@" > {record}\n')
    fake.chmod(0o755)
    env = {**os.environ, "HOST_EXEC": "", "MICROVM": str(fake), "LISTEN": "127.0.0.1:9999"}
    r = subprocess.run(["sh", str(DEPLOY / "kata-py-deploy.sh"), "monitor"], env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert record.read_text().split() == ["monitor", "--listen", "127.0.0.1:9999"]


def test_the_systemd_unit_runs_the_installed_microvm() -> None:
    unit = (DEPLOY / "kata-py-monitor.service").read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    argv = exec_start.removeprefix("ExecStart=").split()
    assert argv[0] == "/opt/kata-py/venv/bin/microvm" and argv[1:3] == ["monitor", "--listen"]
    setup = (DEPLOY.parent / "scripts/setup").read_text()
    assert "/opt/kata-py/venv" in setup  # where setup installs it


def test_rbac_lets_the_installer_label_its_node() -> None:
    objs = by_kind("kata-py-deploy.yaml")
    rules = objs["ClusterRole"]["rules"]
    assert any("nodes" in r["resources"] and {"get", "patch"} <= set(r["verbs"])
               for r in rules)
    binding = objs["ClusterRoleBinding"]
    assert binding["roleRef"]["name"] == objs["ClusterRole"]["metadata"]["name"]
    assert binding["subjects"][0]["name"] == objs["ServiceAccount"]["metadata"]["name"]


def test_installer_installs_and_uninstalls(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "marker").write_text("kata-py source\n")
    config = tmp_path / "config.toml"
    original = "# the node's own settings\nversion = 2\n"
    config.write_text(original)
    state, bins = tmp_path / "state", tmp_path / "bin"
    state.mkdir()
    bins.mkdir()
    (bins / "microvm").touch()
    env = {**os.environ, "HOST_EXEC": "", "HOST_ROOT": "", "SRC": str(src),
           "DEST": str(tmp_path / "opt"), "SETUP": "true",
           "MICROVM": str(Path(sys.executable).with_name("microvm")),
           "CONTAINERD_CONFIG": str(config),
           "RESTART_CONTAINERD": f"touch {tmp_path / 'restarted'}",
           "STATE": str(state), "BIN_DIR": str(bins), "NO_WAIT": "1",
           "KATA_PY_SECURE_CONFIG": str(tmp_path / "secure.yaml")}
    env.pop("KUBERNETES_SERVICE_HOST", None)

    def deploy(action: str) -> str:
        p = subprocess.run(["sh", str(DEPLOY / "kata-py-deploy.sh"), action], env=env,
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stdout + p.stderr
        return p.stdout

    out = deploy("install")
    assert "node label left alone" in out and "installed" in out
    assert (tmp_path / "opt/src/marker").read_text() == "kata-py source\n"
    assert f'runtime_type = "{RUNTIME_TYPE}"' in config.read_text()
    assert (tmp_path / "restarted").exists()
    deploy("install")  # again: nothing doubles
    assert config.read_text().count(f"runtimes.{HANDLER}]") == 1
    (tmp_path / "restarted").unlink()
    assert "uninstalled" in deploy("uninstall")
    assert config.read_text() == original
    assert (tmp_path / "restarted").exists()
    assert not (tmp_path / "opt").exists() and not state.exists()
    assert not (bins / "microvm").exists()
    assert "uninstalled" in deploy("uninstall")  # idempotent
