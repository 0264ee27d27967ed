"""microvm.vm.qemu.command_line(): the argv for one microVM, checked option by option."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from microvm.protocol import SERIAL_PORT_NAME, SHARED_FS_TAG
from microvm.vm.qemu import BASE_KERNEL_PARAMS, VMSpec, command_line

QEMU = "/usr/bin/qemu-system-x86_64"


def spec(**kw: Any) -> VMSpec:
    base: dict[str, Any] = {"name": "vm1", "kernel": "/k/vmlinuz", "image": "/g/initrd.cpio"}
    base.update(kw)
    return VMSpec(**base)


def values(argv: list[str], flag: str) -> list[str]:
    """The argument after every occurrence of flag."""
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def one(argv: list[str], flag: str) -> str:
    found = values(argv, flag)
    assert len(found) == 1, f"{flag}: {found}"
    return found[0]


def opts(value: str) -> tuple[str, dict[str, str]]:
    """'driver,k=v,flag' -> ('driver', {'k': 'v', 'flag': ''})."""
    head, *rest = value.split(",")
    return head, dict(kv.partition("=")[::2] for kv in rest)


def devices(argv: list[str], driver: str) -> list[dict[str, str]]:
    return [o for d, o in map(opts, values(argv, "-device")) if d == driver]


def objects(argv: list[str], kind: str) -> list[dict[str, str]]:
    return [o for d, o in map(opts, values(argv, "-object")) if d == kind]


def chardevs(argv: list[str]) -> dict[str, tuple[str, dict[str, str]]]:
    out = {}
    for v in values(argv, "-chardev"):
        backend, o = opts(v)
        assert o["id"] not in out, f"duplicate chardev id {o['id']}"
        out[o["id"]] = (backend, o)
    return out


def kernel_params(argv: list[str]) -> list[str]:
    return one(argv, "-append").split()


def test_binary_and_name() -> None:
    argv = command_line(QEMU, spec(name="sandbox-42"))
    assert argv[0] == QEMU
    assert one(argv, "-name") == "sandbox-42"
    assert one(argv, "-kernel") == "/k/vmlinuz"


def test_microvm_machine_without_acpi() -> None:
    argv = command_line(QEMU, spec())
    machine, o = opts(one(argv, "-M"))
    assert machine == "microvm"
    assert o["acpi"] == "off"
    assert o["memory-backend"] == "mem"


@pytest.mark.parametrize("mib", [64, 512, 3072])
def test_memory_backend_memfd_shared_same_size(mib: int) -> None:
    argv = command_line(QEMU, spec(memory_mib=mib))
    (o,) = objects(argv, "memory-backend-memfd")
    assert o["id"] == opts(one(argv, "-M"))[1]["memory-backend"]
    assert o["share"] == "on"
    assert o["size"] == f"{mib}M"
    assert one(argv, "-m") == f"{mib}M"


def test_fixed_options() -> None:
    argv = command_line(QEMU, spec())
    for flag in ("-nodefaults", "-no-reboot", "-no-user-config", "-nographic"):
        assert argv.count(flag) == 1, flag
    assert "virtio-mmio.force-legacy=false" in values(argv, "-global")
    params = kernel_params(argv)
    assert "panic=-1" in params
    assert "console=ttyS0" in params
    assert params[:len(BASE_KERNEL_PARAMS)] == BASE_KERNEL_PARAMS


@pytest.mark.parametrize("vcpus", [1, 4])
def test_smp(vcpus: int) -> None:
    assert one(command_line(QEMU, spec(vcpus=vcpus)), "-smp") == str(vcpus)


def test_serial_transport() -> None:
    argv = command_line(QEMU, spec(transport="serial", serial_fd=17))
    assert "kata_py.transport=serial" in kernel_params(argv)
    assert len(devices(argv, "virtio-serial-device")) == 1
    (port,) = devices(argv, "virtserialport")
    assert port["name"] == SERIAL_PORT_NAME == "kata-py.agent"
    backend, o = chardevs(argv)[port["chardev"]]
    assert backend == "socket"
    assert o["fd"] == "17"
    assert devices(argv, "vhost-vsock-device") == []


def test_vsock_transport() -> None:
    argv = command_line(QEMU, spec(transport="vsock", vsock_cid=1234, vsock_fd=11))
    assert "kata_py.transport=vsock" in kernel_params(argv)
    (dev,) = devices(argv, "vhost-vsock-device")
    # The owner opened /dev/vhost-vsock: QEMU, not root, opens no device.
    assert dev == {"guest-cid": "1234", "vhostfd": "11"}
    assert devices(argv, "virtserialport") == []
    assert devices(argv, "virtio-serial-device") == []
    assert "agent" not in chardevs(argv)


def test_initramfs_image() -> None:
    argv = command_line(QEMU, spec(image="/g/initrd.cpio"))
    assert one(argv, "-initrd") == "/g/initrd.cpio"
    assert "rdinit=/init" in kernel_params(argv)
    assert "-drive" not in argv
    assert devices(argv, "virtio-blk-device") == []
    assert not any(p.startswith("root=") for p in kernel_params(argv))


@pytest.mark.parametrize("image", ["/g/root.ext4", "/g/root.img"])
def test_block_image(image: str) -> None:
    argv = command_line(QEMU, spec(image=image))
    assert "-initrd" not in argv
    iface, drive = opts(one(argv, "-drive"))
    assert drive["file"] == image
    assert drive["readonly"] == "on"
    assert drive["format"] == "raw"
    assert iface == "if=none"
    (blk,) = devices(argv, "virtio-blk-device")
    assert blk["drive"] == drive["id"]
    params = kernel_params(argv)
    assert "root=/dev/vda" in params
    assert "ro" in params
    assert "rdinit=/init" not in params


def test_kvm() -> None:
    argv = command_line(QEMU, spec(accel="kvm", vcpus=2))
    assert one(argv, "-accel") == "kvm"
    assert one(argv, "-cpu") == "host"


def test_tcg_single_vcpu() -> None:
    argv = command_line(QEMU, spec(accel="tcg", vcpus=1))
    assert one(argv, "-accel") == "tcg"
    # max under TCG: containers get x86-64-v2 and better (SSE4.2, POPCNT, AVX2).
    assert one(argv, "-cpu") == "max"


def test_tcg_multi_vcpu_uses_mttcg() -> None:
    argv = command_line(QEMU, spec(accel="tcg", vcpus=2))
    accel, o = opts(one(argv, "-accel"))
    assert accel == "tcg"
    assert o["thread"] == "multi"
    assert one(argv, "-cpu") == "max"


def test_tcg_kernel_params_and_tsc_rate() -> None:
    append = one(command_line(QEMU, spec(accel="tcg", tsc_khz=2445406)), "-append").split()
    for p in ("tsc=reliable", "no_timer_check", "nolapic_timer", "noreplace-smp",
              "tsc_early_khz=2445406"):
        assert p in append
    # Without a known rate, no tsc_early_khz at all (rather than a wrong one).
    append = one(command_line(QEMU, spec(accel="tcg", tsc_khz=0)), "-append").split()
    assert not [p for p in append if p.startswith("tsc_early_khz")]


def test_kvm_gets_no_tcg_workarounds() -> None:
    append = one(command_line(QEMU, spec(accel="kvm", tsc_khz=2445406)), "-append").split()
    for p in ("tsc=reliable", "no_timer_check", "nolapic_timer", "noreplace-smp"):
        assert p not in append
    assert not [p for p in append if p.startswith("tsc_early_khz")]


def test_virtiofs_only_with_socket() -> None:
    argv = command_line(QEMU, spec(virtiofs_fd=12))
    (fs,) = devices(argv, "vhost-user-fs-device")
    assert fs["tag"] == SHARED_FS_TAG == "kata-py-shared"
    backend, o = chardevs(argv)[fs["chardev"]]
    assert backend == "socket"
    assert o == {"id": "vfs", "fd": "12"}  # connected by the owner: no path

    argv = command_line(QEMU, spec())
    assert devices(argv, "vhost-user-fs-device") == []
    assert all("path" not in o for _, o in chardevs(argv).values())


def test_qmp_fd() -> None:
    argv = command_line(QEMU, spec(qmp_fd=9))
    mon, o = opts(one(argv, "-mon"))
    assert mon.startswith("chardev=")
    assert o["mode"] == "control"
    backend, co = chardevs(argv)[mon.removeprefix("chardev=")]
    assert backend == "socket"
    assert co["fd"] == "9"


def test_no_qmp_without_fd() -> None:
    argv = command_line(QEMU, spec(qmp_fd=-1))
    assert "-mon" not in argv
    assert "qmp" not in chardevs(argv)


def test_sandbox() -> None:
    on, o = opts(one(command_line(QEMU, spec(sandbox=True)), "-sandbox"))
    assert on == "on"
    assert o["spawn"] == "deny"
    assert o["elevateprivileges"] == "deny"
    assert "-sandbox" not in command_line(QEMU, spec(sandbox=False))


def test_entropy_device() -> None:
    argv = command_line(QEMU, spec())
    (rng,) = objects(argv, "rng-random")
    assert rng["filename"] == "/dev/urandom"
    (dev,) = devices(argv, "virtio-rng-device")
    assert dev["rng"] == rng["id"]


def test_object_ids_unique() -> None:
    argv = command_line(QEMU, spec())
    ids = [o["id"] for _, o in map(opts, values(argv, "-object"))]
    assert len(ids) == len(set(ids))


def test_extra_kernel_params_appended() -> None:
    argv = command_line(QEMU, spec(kernel_params=["loglevel=7", "foo=bar baz"]))
    append = one(argv, "-append")
    assert append.endswith(" loglevel=7 foo=bar baz")
    assert kernel_params(argv)[:len(BASE_KERNEL_PARAMS)] == BASE_KERNEL_PARAMS


def test_console_on_stdio() -> None:
    argv = command_line(QEMU, spec())
    backend, o = chardevs(argv)["console"]
    assert backend == "stdio"
    assert one(argv, "-serial") == "chardev:console"


@pytest.mark.parametrize("kw", [
    {"transport": "serial", "serial_fd": 3, "qmp_fd": 4, "virtiofs_fd": 5},
    {"transport": "vsock", "vsock_cid": 3, "qmp_fd": 4, "virtiofs_fd": 5,
     "image": "/r.ext4"},
])
def test_every_chardev_reference_resolves(kw: dict[str, Any]) -> None:
    argv = command_line(QEMU, spec(**kw))
    ids = set(chardevs(argv))
    for value in values(argv, "-device") + values(argv, "-mon"):
        _, o = opts(value)
        ref = o.get("chardev") or (value.split(",")[0].removeprefix("chardev=")
                                   if value.startswith("chardev=") else None)
        if ref:
            assert ref in ids, value


def test_pure() -> None:
    s = spec(transport="serial", serial_fd=5, qmp_fd=6)
    assert command_line(QEMU, s) == command_line(QEMU, s)


def qemu_opts(value: str) -> list[str]:
    """Split a QEMU option string as QemuOpts does: ',' separates, ',,' is a comma."""
    return [part.replace("\0", ",") for part in value.replace(",,", "\0").split(",")]


def test_comma_in_paths_is_escaped() -> None:
    argv = command_line(QEMU, spec(image="/g/guest,v2.ext4"))
    assert "file=/g/guest,v2.ext4" in qemu_opts(one(argv, "-drive"))


def test_nics_on_open_taps() -> None:
    from microvm.vm.qemu import Nic
    argv = command_line(QEMU, spec(nics=[Nic("02:00:00:00:00:01", [7], 1400),
                                         Nic("02:00:00:00:00:02", [8, 9], 9000)]))
    netdevs = [opts(v) for v in values(argv, "-netdev")]
    assert netdevs == [("tap", {"id": "net0", "fd": "7", "vhost": "off"}),
                       ("tap", {"id": "net1", "fds": "8:9", "vhost": "off"})]
    assert devices(argv, "virtio-net-device") == [
        {"netdev": "net0", "mac": "02:00:00:00:00:01", "host_mtu": "1400"},
        {"netdev": "net1", "mac": "02:00:00:00:00:02", "host_mtu": "9000", "mq": "on"}]


def test_no_nics_no_netdev() -> None:
    argv = command_line(QEMU, spec())
    assert values(argv, "-netdev") == [] and devices(argv, "virtio-net-device") == []


def test_free_page_reporting() -> None:
    assert devices(command_line(QEMU, spec()), "virtio-balloon-device") == [
        {"free-page-reporting": "on"}]
    assert devices(command_line(QEMU, spec(free_page_reporting=False)),
                   "virtio-balloon-device") == []


def test_a_qemu_killed_while_starting_is_one_line(tmp_path: Path) -> None:
    """Killed from outside before QMP answered: not a start-up QEMU refused,
    so no command line (seen when a fault test killed it that early)."""
    import signal
    import subprocess

    from microvm.vm.qemu import Machine, VMSpec
    m = Machine("qemu-system-x86_64", VMSpec(name="t", kernel="k", image="i"),
                tmp_path / "console.log", tmp_path / "qemu.log", None)
    m.proc = subprocess.Popen(["sleep", "30"])
    m.proc.send_signal(signal.SIGKILL)
    m.proc.wait()
    assert str(m.launch_error("QMP handshake failed")) == "QEMU died (signal 9) while starting"
