"""Which requests make a spare, and which a spare fits (microvm/cli/spare.py):
the server's judgement, from a run's arguments or a shim bundle's spec.  No
VM (tests/integration/test_cli_runner.py and the e2e tests take spares)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from microvm.cli import spare


@pytest.fixture
def bundle(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    yield tmp_path, fd
    os.close(fd)


def _spec(annotations: dict[str, str] | None = None, netns: str = "") -> dict[str, object]:
    ns = [{"type": "pid"}, {"type": "network", **({"path": netns} if netns else {})}]
    return {"annotations": annotations or {}, "linux": {"namespaces": ns}}


@pytest.mark.parametrize(("spec", "shape"), [
    (_spec(), ["none"]),                                              # ctr run
    (_spec(netns="/var/run/netns/x"), None),                          # a namespace of its own
    (_spec({"io.kubernetes.cri.container-type": "sandbox"}, "/run/netns/cni-1"), ["pod"]),
    (_spec({"io.kubernetes.cri.container-type": "container"}, "/run/netns/cni-1"), None),
    (_spec({"io.kubernetes.cri.container-type": "sandbox"}), None),  # hostNetwork
    (_spec({"io.containerd.kata-py.network": "none"}), ["none"]),    # microvm run -d
    (_spec({"io.containerd.kata-py.network": "bridge"}), None),
    (_spec({"io.containerd.kata-py.network": "none",
            "io.containerd.kata-py.ports": '["8080:80"]'}), None),
    (_spec({"io.containerd.kata-py.network": "sideways"}), None),   # bad input
])
def test_a_bundles_spare(bundle: tuple[Path, int], spec: dict[str, object],
                         shape: list[str] | None) -> None:
    path, fd = bundle
    (path / "config.json").write_text(json.dumps(spec))
    assert spare.shape("daemon", [], fd) == shape
    if shape is not None:
        assert spare.fits("daemon", [], fd, shape)
        assert not spare.fits("daemon", [], fd, ["pod" if shape == ["none"] else "none"])


@pytest.mark.parametrize("text", ["", "{", "[]", '{"linux": 3}', "\0" * 10, "x" * (2 << 20)])
def test_a_malformed_bundle_makes_no_spare(bundle: tuple[Path, int], text: str) -> None:
    path, fd = bundle
    (path / "config.json").write_text(text)
    assert spare.shape("daemon", [], fd) is None


def test_a_bundle_without_a_spec_makes_no_spare(bundle: tuple[Path, int]) -> None:
    assert spare.shape("daemon", [], bundle[1]) is None


def test_runs_fit_a_spare_made_for_the_same_vm(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("network: none\n")
    other = tmp_path / "o.yaml"
    other.write_text("network: none\nmemory_mib: 300\n")
    made_for = ["--config", str(cfg), "run", "--rm", "busybox", "true"]
    assert spare.shape("cli", made_for, -1) == made_for
    # Container flags change nothing of the VM.
    assert spare.fits("cli", ["--config", str(cfg), "run", "-i", "-e", "A=1", "-v", "/x:/y",
                              "--privileged", "busybox", "sh"], -1, made_for)
    for argv in (
        ["--config", str(other), "run", "busybox", "true"],            # another VM size
        ["--config", str(cfg), "--debug", "run", "busybox", "true"],  # the guest's log level
        ["--config", str(cfg), "run", "--memory", "300", "busybox", "true"],
        ["--config", str(cfg), "run", "--network", "bridge", "busybox", "true"],
        ["--config", str(cfg), "run", "-d", "busybox", "true"],       # a shim's VM
        ["--config", str(cfg), "ps"],
        ["--config", str(cfg), "run", "--cpus", "many", "busybox"],    # bad input
        ["--config", str(tmp_path / "missing.yaml"), "run", "busybox", "true"],
    ):
        assert not spare.fits("cli", argv, -1, made_for), argv
