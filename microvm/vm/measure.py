"""The PCR values a correct secure boot leaves in its vTPM, computed on the
host before the VM runs (sha256 bank).

  PCR 4  what the firmware started: the signed boot image's Authenticode
         hash (virt.peutils), after the boot-attempt action and the
         separator.  The image is a unified kernel image (firmware.py):
         the kernel, the initrd and the command line in one signed PE, so
         this one value pins all three
  PCR 7  the Secure Boot policy: SecureBoot, PK, KEK, db, dbx, a separator
         (virt-fw-measure's records), then the db certificate that
         passed the image

PCR 0 (the firmware) is pinned per OVMF build and vCPU count by its first
boot (core/secureboot.py).  virt-fw-measure computes the DXE volume's digest
right, but not the PEI volume's that Debian's OVMF 2022.11 measures: OVMF
runs its PEI modules from the RAM copy it then hashes, and by then
PlatformPei has written its platform-info global (host bridge, SMM, MMIO
windows, CPU counts: 116 bytes at PEI FV offset 0xe0d8 in this build) into
it.  Computing it would mean rebuilding that struct for one exact build; the
pin takes what the firmware did.  (virt-fw-measure also leaves out the
version event of a build whose version string is empty; this one measures
it.)
PCRs 1-3, 5 and 6 hold the machine's configuration (boot variables OVMF
writes at first boot, ACPI, ExitBootServices), which depends on QEMU's
version and the device set more than on anything kata-py chose; they are
not checked.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from microvm.vm.firmware import library_errors

BANK = "sha256"
EV_EFI_ACTION_BOOT = b"Calling EFI Application from Boot Option"
SEPARATOR = bytes(4)


@dataclass(frozen=True)
class Expected:
    value: bytes
    what: str


def replay(digests: list[bytes]) -> bytes:
    """A PCR after extending it, from zero, with each digest in turn."""
    pcr = bytes(32)
    for d in digests:
        pcr = hashlib.sha256(pcr + d).digest()
    return pcr


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _records_digests(records: list[dict[str, Any]], index: int) -> list[bytes]:
    return [bytes.fromhex(d["digest"]) for r in records if r["pcr"] == index
            for d in r["digests"] if d["hashAlg"] == BANK]


def secure_boot_records(varstore: Path) -> list[bytes]:
    """PCR 7 up to its separator: SecureBoot, PK, KEK, db, dbx, as
    virt-fw-measure computes them from the varstore."""
    from virt.firmware import measure as fwmeasure
    from virt.firmware.varstore.edk2 import Edk2VarStore

    with library_errors(str(varstore)):
        varlist = Edk2VarStore(str(varstore)).get_varlist()
        records: list[dict[str, Any]] = fwmeasure.measure_varlist([BANK], varlist,
                                                                  secureboot=True)
    return _records_digests(records, 7)


# EFI_IMAGE_SECURITY_DATABASE_GUID: db's vendor GUID.
_DB_GUID = uuid.UUID("d719b2cb-3d3a-4596-a3bc-dad00e67656f")


def db_authority(owner: str, cert_der: bytes) -> bytes:
    """PCR 7's EV_EFI_VARIABLE_AUTHORITY digest for the db entry that
    verified the boot image: an EFI_VARIABLE_DATA of db holding our one
    EFI_SIGNATURE_DATA (owner GUID, then the certificate)."""
    name = "db".encode("utf-16-le")
    data = uuid.UUID(owner).bytes_le + cert_der
    return _sha256(_DB_GUID.bytes_le + (len(name) // 2).to_bytes(8, "little")
                   + len(data).to_bytes(8, "little") + name + data)


def image_hash(image: Path) -> bytes:
    """A PE image's Authenticode hash, which OVMF measures into PCR 4."""
    import pefile
    from virt.peutils import pesign

    with library_errors(str(image)):
        pe = pefile.PE(str(image), fast_load=True)
        try:
            return bytes(pesign.pe_authenticode_hash(pe, BANK))
        finally:
            pe.close()


def expected(varstore: Path, uki_hash: bytes, owner: str,
             db_cert_der: bytes) -> dict[int, Expected]:
    """PCRs 4 and 7 (PCR 0: the module's docstring says why it is pinned)."""
    return {
        4: Expected(replay([_sha256(EV_EFI_ACTION_BOOT), _sha256(SEPARATOR), uki_hash]),
                    "the signed boot image: kernel, initrd and command line"),
        7: Expected(replay([*secure_boot_records(varstore), db_authority(owner, db_cert_der)]),
                    "Secure Boot state, PK, KEK, db, dbx and the db key that passed the image"),
    }
