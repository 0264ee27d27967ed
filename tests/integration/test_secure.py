"""The secure flavour (docs/secure-boot.md): real OVMF with Secure Boot, a
real swtpm, a signed unified kernel image.  OVMF takes ~6 s to boot under
TCG, so these are few; each is a whole secure boot."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from microvm import paths
from microvm.vm import firmware
from tests.conftest import Microvm

pytestmark = [pytest.mark.vm, pytest.mark.secure]

LAYOUT = firmware.Layout()
INITRD = paths.GUEST / "initrd.cpio"


@pytest.fixture(scope="module")
def boot_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[firmware.BootDisk]:
    """The boot disk a secure run of the tests' configuration uses: the
    last used after one such run (which must print the secure kernel's
    release)."""
    from tests.conftest import assert_no_leaks, write_config
    tmp = tmp_path_factory.mktemp("secure")
    m = Microvm(tmp, write_config(tmp / "config.yaml", tmp))
    r = m.run("run", "--rm", "--firmware", "secure", "busybox", "--", "uname", "-r",
              timeout=180)
    assert r.returncode == 0, r.stderr
    release = (paths.GUEST / "vmlinuz-secure.release").read_text().strip()
    assert r.stdout.strip() == release
    assert_no_leaks()
    newest = max(LAYOUT.disks.glob("*.esp"), key=lambda p: p.stat().st_mtime)
    yield firmware.BootDisk(newest, newest.with_suffix(".efi"))


def test_a_secure_run_prints_the_secure_kernel(boot_disk: firmware.BootDisk) -> None:
    """The fixture's run: a q35 + OVMF boot of the signed image."""
    assert boot_disk.esp.exists() and boot_disk.image.exists()


def test_another_vcpu_count_is_its_own_firmware_measurement(
        microvm: Microvm, boot_disk: firmware.BootDisk) -> None:
    """OVMF measures the vCPU count into PCR 0 (with its own code): after the
    fixture's 1-vCPU boot, a 2-vCPU one must not be held to its PCR 0."""
    r = microvm.run("run", "--rm", "--firmware", "secure", "--cpus", "2", "busybox", "nproc",
                    timeout=180)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "2"


def test_attest_passes_and_inspect_shows_the_pcrs(microvm: Microvm,
                                                  boot_disk: firmware.BootDisk) -> None:
    r = microvm.run("run", "-d", "--name", "sec1", "--firmware", "secure", "busybox",
                    "sleep", "300", timeout=180)
    try:
        assert r.returncode == 0, r.stderr
        a = microvm.run("attest", "sec1")
        assert a.returncode == 0, a.stdout + a.stderr
        assert "attestation passed" in a.stdout
        for pcr in (0, 4, 7):
            assert f"PCR {pcr:<2} ok" in a.stdout
        info = json.loads(microvm.run("inspect", "sec1").stdout)
        assert info["firmware"] == "secure" and info["attestation"]["passed"]
        pcrs = {p["index"]: p for p in info["attestation"]["pcrs"]}
        assert pcrs[4]["measured"] == pcrs[4]["expected"] != "0" * 64
        e = microvm.run("exec", "sec1", "cat", "/proc/cmdline")
        assert e.returncode == 0 and "kata_py.transport=serial" in e.stdout
        from tests.metrics import exporter, scrape
        with exporter(microvm.argv()) as url:
            m = scrape(url)
        assert [v for _, v in m["kata_py_sandbox_attested"]] == [1.0]
    finally:
        microvm.run("rm", "-f", "sec1")


def _cmdline_of(image: Path) -> str:
    import pefile
    pe = pefile.PE(str(image))
    try:
        sec = next(s for s in pe.sections if s.Name.rstrip(b"\0") == b".cmdline")
        return sec.get_data()[:sec.Misc_VirtualSize].rstrip(b"\0").decode()
    finally:
        pe.close()


@pytest.fixture
def swap_disk(boot_disk: firmware.BootDisk, tmp_path: Path) -> Iterator[Path]:
    """Put another image on the run's boot disk for one test; the disk as it
    was comes back after."""
    saved = tmp_path / "saved"
    saved.mkdir()
    shutil.copy2(boot_disk.esp, saved / "esp")
    shutil.copy2(boot_disk.image, saved / "efi")
    yield tmp_path
    shutil.copy2(saved / "esp", boot_disk.esp)
    shutil.copy2(saved / "efi", boot_disk.image)


def _install(boot_disk: firmware.BootDisk, layout: firmware.Layout, cmdline: str,
             tmp: Path) -> None:
    unsigned = tmp / "unsigned.efi"
    firmware.build_uki(LAYOUT.signed, INITRD, cmdline, unsigned)
    firmware.sign(layout, unsigned, boot_disk.image)
    firmware.build_esp(boot_disk.image, boot_disk.esp)


def test_a_tampered_command_line_fails_attestation(microvm: Microvm, swap_disk: Path,
                                                   boot_disk: firmware.BootDisk) -> None:
    """Signed with our own db key, so the firmware boots it: the measured
    boot is what tells it is not the image the host made."""
    cmdline = _cmdline_of(boot_disk.image)
    _install(boot_disk, LAYOUT, cmdline + " init=/bin/sh", swap_disk)
    r = microvm.run("run", "--rm", "--firmware", "secure", "busybox", "true", timeout=180)
    lines = r.error_lines
    assert r.returncode == 125 and len(lines) == 1, r.stderr
    assert "measured boot mismatch: PCR 4" in lines[0] and "expected" in lines[0]


def test_a_kernel_signed_with_another_key_is_refused(microvm: Microvm, swap_disk: Path,
                                                     boot_disk: firmware.BootDisk) -> None:
    other = firmware.Layout(keys=swap_disk / "keys")
    other.keys.mkdir()
    firmware.make_key(other, "db")
    _install(boot_disk, other, _cmdline_of(boot_disk.image), swap_disk)
    r = microvm.run("run", "--rm", "--firmware", "secure", "busybox", "true", timeout=180)
    lines = r.error_lines
    assert r.returncode == 125 and len(lines) == 1, r.stderr
    assert "Secure Boot refused the boot image (Access Denied)" in lines[0]


@pytest.mark.parametrize("victim", ["swtpm", "cli"])
def test_a_kill_during_a_secure_boot_leaves_nothing(microvm: Microvm,
                                                    boot_disk: firmware.BootDisk,
                                                    victim: str) -> None:
    """The vTPM is a helper like the others: its death ends the boot with
    one line, and the owner's death takes it along (the microvm fixture's
    leak check covers swtpm and its state directory)."""
    import os
    import signal
    import subprocess

    from tests.conftest import SWTPM, pid_of
    p = microvm.popen("run", "--rm", "--firmware", "secure", "busybox", "true",
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    tpm = pid_of(SWTPM)
    time.sleep(1)  # OVMF is booting, talking to the vTPM
    if victim == "cli":
        p.kill()
        p.communicate(timeout=30)
        return  # the fixture: nothing of it left
    os.kill(tpm, signal.SIGKILL)
    _, err = p.communicate(timeout=60)
    lines = [x for x in err.decode().splitlines() if "TCG" not in x]
    assert p.returncode == 125 and lines == ["microvm: error: swtpm died (signal 9)"], lines
