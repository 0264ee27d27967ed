"""A secure sandbox's boot: its firmware files, its vTPM, and the check of
what the vTPM measured against what the host expects.

Per sandbox: a copy of the enrolled varstore (OVMF writes to it), passed to
QEMU as an fd; an swtpm whose state lives in the sandbox's run directory;
and, once the agent answers and before any container starts, the PCRs the
guest's kernel reads from that vTPM, compared with microvm/vm/measure.py's
values.  A mismatch stops the sandbox with one line naming the PCR and
both values.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from microvm.errors import KataError
from microvm.protocol import agent_pb2, monitor_pb2
from microvm.vm import firmware, measure
from microvm.vm.qemu import Firmware
from microvm.vm.qemuuser import Credentials
from microvm.vm.swtpm import Swtpm, qemu_credentials

log = logging.getLogger(__name__)


class AttestationError(KataError):
    pass


@dataclass
class Check:
    """One PCR: what the host expects and what the vTPM holds."""

    index: int
    what: str
    expected: str
    measured: str

    @property
    def ok(self) -> bool:
        return self.expected == self.measured


@dataclass
class Attestation:
    checks: list[Check] = field(default_factory=list)
    detail: str = ""

    @property
    def passed(self) -> bool:
        return not self.detail and bool(self.checks) and all(c.ok for c in self.checks)

    def first_failure(self) -> str:
        if self.detail:
            return self.detail
        for c in self.checks:
            if not c.ok:
                return (f"measured boot mismatch: PCR {c.index} ({c.what}) is {c.measured}, "
                        f"expected {c.expected}")
        return ""

    def to_proto(self) -> monitor_pb2.Attestation:
        return monitor_pb2.Attestation(
            passed=self.passed, detail=self.first_failure(),
            pcrs=[monitor_pb2.PcrCheck(index=c.index, expected=c.expected, measured=c.measured,
                                       what=c.what) for c in self.checks])


# OVMF's words when Secure Boot refuses the boot image (from a disk:
# "Access Denied"; its built-in shell then fails the same way), after which
# it waits at its boot menu for a key that never comes.
_REFUSED = re.compile(r"BdsDxe: failed to (?:load|start) Boot\w+ .*: "
                      r"(Access Denied|Security Violation)")


def refusal(console: str) -> str:
    """The one line to tell when the firmware refused to boot the image."""
    m = _REFUSED.search(console)
    if m is None:
        return ""
    return (f"Secure Boot refused the boot image ({m.group(1)}): it is not signed by this "
            "install's db key (microvm check --fix signs the kernel again)")


def compare(expected: dict[int, measure.Expected],
            report: agent_pb2.Measurements) -> Attestation:
    """The guest's report against the host's values."""
    if report.error and not report.pcr_sha256:
        return Attestation(detail=f"no measurements from the guest: {report.error}")
    checks = [Check(i, e.what, e.value.hex(), report.pcr_sha256.get(i, b"").hex() or "none")
              for i, e in sorted(expected.items())]
    return Attestation(checks)


class SecureBoot:
    """One secure sandbox's firmware and vTPM; stop() removes both."""

    def __init__(self, run_dir: Path, log_dir: Path, vcpus: int = 1,
                 layout: firmware.Layout | None = None) -> None:
        self.layout = layout or firmware.Layout()
        self.vcpus = vcpus
        self.run_dir = run_dir
        self.tpm = Swtpm(run_dir / "tpm", log_dir / "swtpm.log")
        self.disk: firmware.BootDisk | None = None
        self.attestation: Attestation | None = None

    def check_installed(self) -> None:
        for path, fix in ((firmware.OVMF_CODE, "apt-get install ovmf"),
                          (self.layout.varstore, "microvm check --fix"),
                          (self.layout.signed, "microvm check --fix")):
            if not path.exists():
                raise KataError(f"the secure flavour needs {path} ({fix})")

    def firmware(self, initrd: str, cmdline: str) -> Firmware:
        """QEMU's firmware: the boot disk for this initrd and command line,
        its own copy of the varstore, the vTPM's channel; the fds are
        QEMU's to inherit (the caller closes them)."""
        if initrd.endswith((".ext4", ".img")):
            raise KataError("the secure flavour boots an initramfs guest image (.cpio), "
                            f"not {initrd}")
        self.disk = firmware.boot_disk(self.layout, Path(initrd), cmdline)
        vars_copy = self.run_dir / "vars.fd"
        shutil.copyfile(self.layout.varstore, vars_copy)
        fds = (os.open(vars_copy, os.O_RDONLY | os.O_CLOEXEC),
               os.open(vars_copy, os.O_RDWR | os.O_CLOEXEC))
        try:
            tpm = self.tpm.channel()
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return Firmware(code=str(firmware.OVMF_CODE), vars_fds=fds, tpm_fd=tpm.detach(),
                        esp=str(self.disk.esp))

    def start_tpm(self, qemu: subprocess.Popen[bytes], creds: Credentials | None) -> None:
        """swtpm, as QEMU's own user, once QEMU runs (it waits for it)."""
        self.tpm.start(qemu_credentials(creds, qemu.pid))

    async def stop(self) -> None:
        await self.tpm.stop()

    def expected(self) -> dict[int, measure.Expected]:
        assert self.disk is not None
        owner = (self.layout.keys / "owner.guid").read_text().strip()
        der = firmware.cert_der(self.layout.cert("db"))
        return measure.expected(self.layout.varstore, self.disk.image_hash, owner, der)

    def _firmware_pcr(self, measured: bytes) -> measure.Expected:
        """PCR 0 for this OVMF build and vCPU count: what its first secure
        boot here measured (measure.py says why it is not computed; the
        firmware measures the vCPU count with its own code)."""
        pins = self.layout.keys / "pcr0.json"
        try:
            known = json.loads(pins.read_text())
        except (OSError, ValueError):
            known = {}
        build = f"{firmware.file_digest(firmware.OVMF_CODE)} vcpus={self.vcpus}"
        if build not in known and measured:
            known[build] = measured.hex()
            firmware.write_private(pins, json.dumps(known).encode())
            log.debug("PCR 0 of %s with %d vCPUs pinned at its first boot: %s",
                      firmware.OVMF_CODE, self.vcpus, measured.hex())
        return measure.Expected(bytes.fromhex(known.get(build, "")), "firmware (OVMF)")

    def check(self, report: agent_pb2.Measurements) -> Attestation:
        """The attestation, kept for inspect; raises on a mismatch."""
        try:
            expected = {0: self._firmware_pcr(report.pcr_sha256.get(0, b"")),
                        **self.expected()}
        except (OSError, ValueError, KataError) as e:
            self.attestation = Attestation(detail=f"cannot compute the expected PCRs: {e}")
        else:
            self.attestation = compare(expected, report)
        for c in self.attestation.checks:
            log.debug("PCR %d (%s): %s %s", c.index, c.what, c.measured,
                      "ok" if c.ok else f"!= {c.expected}")
        if not self.attestation.passed:
            raise AttestationError(self.attestation.first_failure())
        return self.attestation
