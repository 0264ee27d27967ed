"""Pure parts of CLI networking: -p specs, network modes and annotations,
/etc files, the lease table."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from microvm import paths
from microvm.config import ConfigError, from_mapping
from microvm.errors import KataError
from microvm.net import bridge, network
from microvm.net.ports import PortSpec, parse


@pytest.mark.parametrize("spec, want", [
    ("8080:80", PortSpec("0.0.0.0", 8080, 80, "tcp")),
    ("127.0.0.1:18080:80", PortSpec("127.0.0.1", 18080, 80, "tcp")),
    ("53:53/udp", PortSpec("0.0.0.0", 53, 53, "udp")),
    ("[::1]:8443:443/tcp", PortSpec("::1", 8443, 443, "tcp")),
])
def test_publish_specs(spec: str, want: PortSpec) -> None:
    assert parse(spec) == want


@pytest.mark.parametrize("spec, message", [
    ("0:80", "invalid port '0'"), ("80:65536", "invalid port '65536'"),
    ("a:b", "invalid port 'a'"), ("1:2:3:4", "expected [IP:]HOST:CONTAINER"),
    ("80:80/icmp", "invalid protocol"), ("[::1:80:80", "expected [IPv6]"),
    ("300.1.1.1:80:80", "invalid host address"),
])
def test_bad_publish_specs(spec: str, message: str) -> None:
    with pytest.raises(KataError, match=message.replace("[", r"\[")):
        parse(spec)


def test_modes_and_annotations_round_trip(tmp_path: Path) -> None:
    spec = network.parse_mode("bridge", ["127.0.0.1:8080:80", "[::1]:53:53/udp"])
    assert network.from_annotations(network.to_annotations(spec)) == spec
    ns = network.parse_mode(f"ns:{tmp_path}")
    assert ns == network.NetworkSpec("ns", str(tmp_path))
    assert network.from_annotations(network.to_annotations(ns)) == ns
    assert network.from_annotations({}) is None  # containerd's own specs
    with pytest.raises(KataError, match="-p needs a network"):
        network.parse_mode("none", ["80:80"])
    with pytest.raises(KataError, match="-p goes with --network bridge"):
        network.parse_mode(f"ns:{tmp_path}", ["80:80"])
    with pytest.raises(KataError, match="not JSON"):
        network.from_annotations({network.ANNOTATION: "bridge",
                                  network.PORTS_ANNOTATION: "[oops"})


def test_etc_files(tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.53\nnameserver 192.0.2.53\nsearch example\n")
    assert network.resolv_conf(resolv) == "nameserver 192.0.2.53\nsearch example\n"
    files = network.etc_files("web", "10.89.0.7")
    assert files["etc/hostname"] == "web\n"
    assert files["etc/hosts"].splitlines()[-1] == "10.89.0.7\tweb"
    assert "etc/resolv.conf" not in network.etc_files("web", None)


def test_write_etc_never_follows_a_planted_symlink(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "etc").mkdir(parents=True)
    outside.write_text("precious\n")
    (root / "etc/hosts").symlink_to(outside)
    network.write_etc(root, {"etc/hosts": "127.0.0.1\tlocalhost\n"})
    assert outside.read_text() == "precious\n"
    assert (root / "etc/hosts").read_text() == "127.0.0.1\tlocalhost\n"
    other = tmp_path / "other"
    other.mkdir()
    (root / "etc").rename(tmp_path / "etc-real")
    (root / "etc").symlink_to(other)
    network.write_etc(root, {"etc/hosts": "x"})
    assert list(other.iterdir()) == []


def test_leases(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(paths, "RUN", tmp_path)
    cfg = bridge.BridgeConfig(subnet="10.90.0.0/29")  # .1 is the gateway: .2 to .6
    got = [bridge.allocate(cfg, f"sb{i}") for i in range(5)]
    assert got == [f"10.90.0.{i}" for i in range(2, 7)]
    with pytest.raises(KataError, match="no free address"):
        bridge.allocate(cfg, "one-too-many")
    bridge.release("10.90.0.3")
    assert bridge.allocate(cfg, "again") == "10.90.0.3"
    # A lease whose owner is gone is reclaimed.
    dead = subprocess.Popen(["true"])
    dead.wait()
    bridge.release("10.90.0.4")
    assert bridge.allocate(cfg, "dead", pid=dead.pid) == "10.90.0.4"
    assert bridge.list_leases()["10.90.0.4"]["alive"] is False
    assert bridge.allocate(cfg, "reuses-the-dead-one's") == "10.90.0.4"
    assert bridge.list_leases()["10.90.0.4"]["pid"] == os.getpid()


def test_network_config_keys() -> None:
    assert from_mapping({"network": "none"}, "t").network == "none"
    for bad, message in [({"network": "host"}, "network must be one of"),
                         ({"bridge_name": "a-very-long-bridge-name"}, "bridge_name"),
                         ({"bridge_subnet": "10.0.0.0/30"}, "too small"),
                         ({"bridge_subnet": "nonsense"}, "bridge_subnet")]:
        with pytest.raises(ConfigError, match=message):
            from_mapping(bad, "t")
