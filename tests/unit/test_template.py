"""VM templates without a VM: the command lines, the store's rules, and the
guest's side of adopting a clone (tests/integration/test_template.py boots them)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from guest import network
from microvm import paths
from microvm.config import Config
from microvm.protocol import agent_pb2
from microvm.vm import template
from microvm.vm.qemu import Nic, VMSpec, command_line


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(paths, "RUN", tmp_path / "run")
    return tmp_path / "run" / "templates"


def _spec(**kw: object) -> VMSpec:
    return VMSpec(name="t", kernel="/k", image="/i.cpio", serial_fd=5, **kw)  # type: ignore[arg-type]


def test_template_and_clone_command_lines_differ_only_where_they_may() -> None:
    tmpl = command_line("qemu", _spec(memory_file="/proc/self/fd/7", ninep_fd=8,
                                      nics=[Nic(template.TEMPLATE_MAC.format(0), [])]))
    clone = command_line("qemu", _spec(memory_file="/proc/self/fd/7", memory_shared=False,
                                       incoming=True, ninep_fd=8,
                                       nics=[Nic("02:00:00:00:00:01", [9])]))
    assert "memory-backend-file,id=mem,size=512M,mem-path=/proc/self/fd/7,share=on" in tmpl
    assert "memory-backend-file,id=mem,size=512M,mem-path=/proc/self/fd/7,share=off" in clone
    assert clone[-2:] == ["-incoming", "defer"] and "-incoming" not in tmpl
    for argv in (tmpl, clone):
        assert "proxy,id=fs0,sock_fd=8" in argv
        assert "virtio-9p-device,fsdev=fs0,mount_tag=kata-py-shared" in argv
        assert not any("vhost-user-fs" in a for a in argv)
    # Same devices; a template's NIC sits on a hub port, a clone's on its tap.
    assert "hubport,id=net0,hubid=0" in tmpl and "tap,id=net0,fd=9,vhost=off" in clone
    devices = [a.split(",")[0] for a in tmpl if a.startswith("virtio")]
    assert devices == [a.split(",")[0] for a in clone if a.startswith("virtio")]
    # Without a template: a memfd, as before.
    assert any(a.startswith("memory-backend-memfd") for a in command_line("qemu", _spec()))


def test_key_follows_every_input(tmp_path: Path) -> None:
    kernel, image = tmp_path / "vmlinuz", tmp_path / "initrd.cpio"
    kernel.write_bytes(b"k")
    image.write_bytes(b"i")
    cfg = Config(kernel=str(kernel), guest_image=str(image), qemu="/bin/true")
    k = template.key(cfg, "tcg", 0, 1000)
    assert k == template.key(cfg, "tcg", 0, 1000)
    others = {template.key(cfg, "kvm", 0, 1000), template.key(cfg, "tcg", 1, 1000),
              template.key(Config(**{**cfg.__dict__, "memory_mib": 256}), "tcg", 0, 1000)}
    new = tmp_path / "new"
    new.write_bytes(b"k2")
    new.rename(kernel)  # a rebuilt kernel, renamed into place as setup does
    others.add(template.key(cfg, "tcg", 0, 1000))
    assert k not in others and len(others) == 4


def _whole(d: Path, k: str, mib: int = 1) -> None:
    d.mkdir(parents=True)
    (d / "state").write_bytes(b"s")
    fd = template.memory_file(d / "mem", mib)
    os.close(fd)
    (d / "meta.json").write_text(json.dumps({"key": k, "next_stream_id": 3}))


def test_find_takes_a_whole_template_and_removes_a_broken_one(run_dir: Path) -> None:
    assert template.find("k1", 1) is None
    _whole(template.root() / "k1", "k1")
    found = template.find("k1", 1)
    assert found is not None and found.next_stream_id == 3
    # The RAM file: reachable only through the owner's fd (0666, root-only dir).
    assert oct(found.mem.stat().st_mode & 0o777) == "0o666"
    assert oct(template.root().stat().st_mode & 0o777) == "0o700"
    for breakage in ("state", "meta.json"):
        _whole(template.root() / f"k-{breakage}", f"k-{breakage}")
        (template.root() / f"k-{breakage}" / breakage).write_bytes(b"")
        assert template.find(f"k-{breakage}", 1) is None
        assert not (template.root() / f"k-{breakage}").exists()
    assert template.find("k1", 2) is None  # another memory size: stale


def test_one_builder_at_a_time_and_prune(run_dir: Path) -> None:
    with template.build_lock("k") as first, template.build_lock("k") as second:
        assert first and not second
    _whole(template.root() / "k", "k")
    build = template.staging("k2")  # a killed build's leftovers
    assert [k for k, _ in template.list_templates()] == ["k"]
    with template.build_lock("k"):  # being built: prune leaves it
        assert template.prune() == []
    assert template.prune() == ["template k"]
    assert not build.exists() and template.list_templates() == []


def test_usable_says_why_not() -> None:
    assert template.usable(Config(template=False), "serial", 0) == "template: false"
    assert "vsock" in template.usable(Config(), "vsock", 0)
    assert "multi-queue" in template.usable(Config(vcpus=2), "serial", 1)


def test_clone_interfaces_take_the_macs_asked_for() -> None:
    """A clone's guest has the template's MACs: the asked-for MACs go to
    the unclaimed interfaces in device order."""
    req = agent_pb2.NetworkConfig(
        interfaces=[agent_pb2.NetworkInterface(mac="02:aa:00:00:00:01", name="eth0"),
                    agent_pb2.NetworkInterface(mac="02:aa:00:00:00:02", name="eth1")],
        ip_command=["/bb", "ip"])
    names = {"00:00:00:00:00:00": "lo", "02:6b:70:00:00:01": "eth1",
             "02:6b:70:00:00:00": "eth0"}
    cmds = network.adopt_macs(req, names, {"lo": 1, "eth0": 2, "eth1": 3})
    assert cmds == [("eth0", "02:aa:00:00:00:01"), ("eth1", "02:aa:00:00:00:02")]
    assert names["02:aa:00:00:00:02"] == "eth1"
    # A cold boot's guest already has them: nothing to do.
    assert network.adopt_macs(req, {"02:aa:00:00:00:01": "eth0", "02:aa:00:00:00:02": "eth1"},
                              {}) == []


def test_templates_of_replaced_files_are_swept(run_dir: Path, tmp_path: Path) -> None:
    """Each setup that installs a new guest image makes a new template: the
    old one, which no start can use again, must not stay on tmpfs."""
    kernel, image = tmp_path / "vmlinuz", tmp_path / "initrd.cpio"
    kernel.write_bytes(b"k")
    image.write_bytes(b"i")
    cfg = Config(kernel=str(kernel), guest_image=str(image), qemu="/bin/true")
    old = template.key(cfg, "tcg", 0, 0)
    template.commit(template.staging(old), old, 3, cfg)
    assert [k for k, _ in template.list_templates()] == [old]
    (tmp_path / "new").write_bytes(b"i2")
    (tmp_path / "new").rename(image)  # setup installs a new image
    new = template.key(cfg, "tcg", 0, 0)
    template.commit(template.staging(new), new, 3, cfg)
    assert [k for k, _ in template.list_templates()] == [new]
