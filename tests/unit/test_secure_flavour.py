"""The secure flavour's pieces without a VM: QEMU's command line, keys and
varstore made with the real tools (virt-fw-vars, sbsign), a real swtpm, the
PCR arithmetic and the checks' words."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from microvm import config as config_mod
from microvm import paths
from microvm.core.secureboot import Attestation, Check, compare, refusal
from microvm.errors import ConfigError
from microvm.protocol import agent_pb2
from microvm.vm import firmware, measure, template
from microvm.vm.qemu import Firmware, VMSpec, command_line, kernel_cmdline
from microvm.vm.qemuuser import DYNAMIC_UID_BASE, Credentials
from microvm.vm.swtpm import Swtpm, qemu_credentials

FW = Firmware(code="/usr/share/OVMF/OVMF_CODE_4M.secboot.fd", vars_fds=(7, 8), tpm_fd=9,
              esp="/var/lib/kata-py/guest/secure/x.esp")


def _argv(firmware_: Firmware | None) -> list[str]:
    return command_line("qemu", VMSpec("vm", "/k", "/i.cpio", firmware=firmware_,
                                       serial_fd=5, qmp_fd=6))


def test_a_secure_vm_boots_q35_through_ovmf_from_its_signed_disk() -> None:
    argv = _argv(FW)
    text = " ".join(argv)
    assert argv[argv.index("-M") + 1].startswith("q35,smm=on")
    assert "driver=cfi.pflash01,property=secure,value=on" in argv
    assert f"if=pflash,format=raw,unit=0,readonly=on,file={FW.code}" in argv
    # QEMU gets the varstore as fds it dups, never a path it opens.
    assert "fd=7,set=1" in argv and "fd=8,set=1" in argv
    assert "if=pflash,format=raw,unit=1,file=/dev/fdset/1" in argv
    assert "socket,id=tpm,fd=9" in argv and "tpm-crb,tpmdev=tpm0" in argv
    assert "virtio-blk-pci,drive=esp,bootindex=0" in argv
    # Nothing outside the signed image: no -kernel, -initrd or -append.
    assert not {"-kernel", "-initrd", "-append"} & set(argv)
    assert "virtio-serial-pci" in text and "-device virtio-serial-device" not in text


def test_the_default_flavour_is_unchanged() -> None:
    argv = _argv(None)
    assert argv[argv.index("-M") + 1].startswith("microvm")
    assert "-kernel" in argv and "virtio-serial-device,max_ports=2" in argv
    assert not any("pflash" in a or "tpm" in a for a in argv)


def test_the_image_carries_the_command_line_qemu_would_have_passed() -> None:
    spec = VMSpec("vm", "/k", "/i.cpio", firmware=FW, serial_fd=5, qmp_fd=6)
    plain = _argv(None)
    assert kernel_cmdline(spec) == plain[plain.index("-append") + 1]


def test_config_names_the_flavour() -> None:
    assert config_mod.from_mapping({"firmware": "secure"}, "f").firmware == "secure"
    with pytest.raises(ConfigError, match="firmware must be one of default, secure"):
        config_mod.from_mapping({"firmware": "tpm"}, "f")
    cfg = config_mod.Config(firmware="secure")
    assert "secure flavour" in template.usable(cfg, "serial", 0)


def test_an_annotation_raises_the_flavour_and_never_lowers_it() -> None:
    cfg = config_mod.Config()
    config_mod.raise_firmware(cfg, {config_mod.FIRMWARE_ANNOTATION: "secure"})
    assert cfg.firmware == "secure"
    config_mod.raise_firmware(cfg, {config_mod.FIRMWARE_ANNOTATION: "default"})
    assert cfg.firmware == "secure"  # a pod's annotation cannot undo kata-py-secure


def test_pcr_replay() -> None:
    assert measure.replay([]) == bytes(32)
    d = hashlib.sha256(b"x").digest()
    assert measure.replay([d]) == hashlib.sha256(bytes(32) + d).digest()
    assert measure.replay([d, d]) == hashlib.sha256(measure.replay([d]) + d).digest()


def test_a_mismatch_is_one_line_naming_the_pcr_and_both_values() -> None:
    expected = {4: measure.Expected(b"\x01" * 32, "the signed boot image"),
                7: measure.Expected(b"\x02" * 32, "keys")}
    report = agent_pb2.Measurements(pcr_sha256={4: b"\x01" * 32, 7: b"\x03" * 32})
    a = compare(expected, report)
    assert not a.passed
    assert a.first_failure() == (f"measured boot mismatch: PCR 7 (keys) is {'03' * 32}, "
                                 f"expected {'02' * 32}")
    report.pcr_sha256[7] = b"\x02" * 32
    assert compare(expected, report).passed
    none = compare(expected, agent_pb2.Measurements(error="this VM has no TPM"))
    assert not none.passed and "this VM has no TPM" in none.first_failure()
    assert not Attestation().passed  # nothing checked is not a pass
    assert Check(0, "x", "ab", "none").ok is False


def test_ovmf_refusals_are_recognised() -> None:
    refused = ('BdsDxe: failed to load Boot0001 "UEFI Non-Block Boot Device" from '
               "PciRoot(0x0)/Pci(0x1,0x0): Access Denied\n"
               "BdsDxe: No bootable option or device was found.\n")
    assert "Secure Boot refused the boot image (Access Denied)" in refusal(refused)
    assert refusal("BdsDxe: loading Boot0001 ...\nLinux version 6.1\n") == ""


@pytest.fixture
def layout(tmp_path: Path) -> firmware.Layout:
    kernel = paths.GUEST / "vmlinuz-secure"
    if not kernel.exists():
        pytest.fail(f"{kernel} not built (scripts/setup builds it)")
    return firmware.Layout(keys=tmp_path / "keys", varstore=tmp_path / "vars.fd",
                           kernel=kernel, signed=tmp_path / "vmlinuz.signed",
                           disks=tmp_path / "disks")


def test_prepare_makes_keys_varstore_and_signature_once(layout: firmware.Layout) -> None:
    done = firmware.prepare(layout)
    assert len(done) == 3
    assert os.stat(layout.keys).st_mode & 0o777 == 0o700
    for name in firmware.KEY_NAMES:
        assert os.stat(layout.key(name)).st_mode & 0o777 == 0o600
    state = firmware.varstore_state(layout.varstore)
    assert state.secure_boot
    assert all(len(state.certificates[n]) == 1 for n in firmware.KEY_NAMES)
    ok = subprocess.run(["sbverify", "--cert", str(layout.cert("db")), str(layout.signed)],
                        capture_output=True)
    assert ok.returncode == 0, ok.stderr
    assert firmware.prepare(layout) == []  # nothing stale: nothing redone


def test_a_corrupt_varstore_is_one_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "vars.fd"
    bad.write_bytes(b"\0" * 4096)
    with pytest.raises(firmware.FirmwareError, match="not a valid file"):
        firmware.varstore_state(bad)


def test_boot_disk_is_made_once_and_its_hash_kept_apart(layout: firmware.Layout,
                                                        tmp_path: Path) -> None:
    firmware.prepare(layout)
    initrd = tmp_path / "initrd.cpio"
    initrd.write_bytes(b"07070100" * 64)
    disk = firmware.boot_disk(layout, initrd, "console=ttyS0")
    assert disk.esp.exists() and os.stat(disk.esp).st_mode & 0o777 == 0o644
    assert disk.image_hash == measure.image_hash(disk.image)  # the signature is not hashed
    made = disk.image.stat().st_mtime_ns
    again = firmware.boot_disk(layout, initrd, "console=ttyS0")
    assert again == disk and again.image.stat().st_mtime_ns == made  # not made again
    other = firmware.boot_disk(layout, initrd, "console=ttyS0 quiet")
    assert other.esp != disk.esp and other.image_hash != disk.image_hash
    assert sorted(p for p, _ in firmware.list_disks(layout)) == sorted([disk.esp, other.esp])
    assert len(firmware.prune_disks(layout)) == 2  # system prune
    assert firmware.list_disks(layout) == [] and list(layout.disks.iterdir()) == []
    assert not (layout.keys / "images.json").exists()


def test_swtpm_runs_as_qemus_user_and_leaves_nothing(tmp_path: Path) -> None:
    if shutil.which("swtpm") is None:
        pytest.fail("swtpm not installed (scripts/setup installs it)")
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    tpm = Swtpm(run / "tpm", tmp_path / "swtpm.log")
    qemu_end = tpm.channel()
    creds = qemu_credentials(Credentials(-1, -1), 4242)
    assert creds == Credentials(DYNAMIC_UID_BASE + 4242, DYNAMIC_UID_BASE + 4242, ())
    import asyncio

    async def go() -> tuple[int, int]:
        tpm.start(creds)
        assert tpm.proc is not None
        # CMD_GET_CAPABILITY on the control channel: swtpm answers.
        qemu_end.sendall((1).to_bytes(4, "big"))
        qemu_end.settimeout(10)
        answer = qemu_end.recv(64)
        uid = 0
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            status = Path(f"/proc/{tpm.proc.pid}/status").read_text()
            uid = int(next(x for x in status.splitlines() if x.startswith("Uid:")).split()[1])
            if uid != 0:
                break
            await asyncio.sleep(0.02)
        await tpm.stop()
        return len(answer), uid

    size, uid = asyncio.run(go())
    qemu_end.close()
    assert size >= 8 and uid == DYNAMIC_UID_BASE + 4242
    assert not (run / "tpm").exists()
    assert tpm.proc is not None and tpm.proc.poll() is not None


def test_qemu_credentials_keep_a_named_user_and_root() -> None:
    named = Credentials(1000, 1000, (5,))
    assert qemu_credentials(named, 99) == named
    assert qemu_credentials(None, 99) is None
