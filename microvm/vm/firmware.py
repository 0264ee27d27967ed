"""The secure flavour's firmware: OVMF with Secure Boot enforced, this
install's own keys, and the guest kernel signed with them.

Made once (scripts/setup, or `microvm check --fix`), by root:

  LIB/secure/       0700: PK, KEK and db, keys and certificates, and the
                    owner GUID they are enrolled under
  GUEST/secure-vars.fd
                    OVMF's varstore with PK, KEK and db enrolled and Secure
                    Boot on (virt-fw-vars); each VM boots a copy of it
  GUEST/vmlinuz-secure.signed
                    the EFI-stub kernel (kernels/build --flavour secure),
                    signed with the db key (sbsign)

Only certificates leave LIB/secure: QEMU, which runs as a user of its own,
reads the varstore and the signed kernel, never a private key.  Removing
LIB/secure and running `microvm check --fix` again makes new keys (that is
how they are rotated: docs/secure-boot.md).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from microvm import paths
from microvm.errors import KataError

log = logging.getLogger(__name__)

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd")
# systemd's EFI stub (Debian's systemd-boot-efi): the front of a unified
# kernel image, which runs the kernel with the initrd and command line
# embedded beside it.
STUB = Path("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
KEY_NAMES = ("PK", "KEK", "db")


@dataclass(frozen=True)
class Layout:
    """Where one install keeps its secure-boot files."""

    keys: Path = paths.LIB / "secure"
    varstore: Path = paths.GUEST / "secure-vars.fd"
    kernel: Path = paths.GUEST / "vmlinuz-secure"          # unsigned, from kernels/build
    signed: Path = paths.GUEST / "vmlinuz-secure.signed"
    disks: Path = paths.GUEST / "secure"                  # boot disks, by content

    def key(self, name: str) -> Path:
        return self.keys / f"{name}.key"

    def cert(self, name: str) -> Path:
        return self.keys / f"{name}.crt"


class FirmwareError(KataError):
    pass


@contextlib.contextmanager
def library_errors(what: str) -> Iterator[None]:
    """virt-firmware reports a bad file by logging and sys.exit(1): one line
    here instead, naming the file."""
    logging.disable(logging.CRITICAL)
    try:
        yield
    except SystemExit:
        raise FirmwareError(f"{what}: not a valid file (virt-firmware could not read it)") \
            from None
    except (ValueError, RuntimeError, OSError) as e:
        raise FirmwareError(f"{what}: {e}") from None
    finally:
        logging.disable(logging.NOTSET)


def make_key(layout: Layout, name: str, days: int = 3650) -> None:
    """An RSA key and a self-signed certificate for it (PK, KEK or db)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                            f"kata-py {name} {os.uname().nodename}")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    _write(layout.key(name), key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()), 0o600)
    _write(layout.cert(name), cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _write(path: Path, data: bytes, mode: int) -> None:
    """path's new content, whole or not at all."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _publish(tmp: Path, out: Path) -> None:
    """A file made beside its place, readable by QEMU, put there whole."""
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)


def _tool(name: str) -> str:
    """virt-firmware's command-line tools live beside this Python."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if found is None:
        raise FirmwareError(f"{name} not found (pip install virt-firmware)")
    return found


def _run(argv: list[str], what: str, env: dict[str, str] | None = None) -> None:
    p = subprocess.run(argv, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        last = (p.stderr.strip() or p.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise FirmwareError(f"{what} failed: {last[0]}")


def make_varstore(layout: Layout, template: Path = OVMF_VARS) -> None:
    """OVMF's empty varstore with this install's PK, KEK and db enrolled and
    Secure Boot on; no Microsoft keys (nothing of theirs should boot here)."""
    if not template.exists():
        raise FirmwareError(f"{template} not found (apt-get install ovmf)")
    owner = (layout.keys / "owner.guid").read_text().strip()
    tmp = layout.varstore.with_name(f".{layout.varstore.name}.{os.getpid()}")
    _run([_tool("virt-fw-vars"), "--input", str(template), "--output", str(tmp),
          "--set-pk", owner, str(layout.cert("PK")), "--add-kek", owner,
          str(layout.cert("KEK")), "--add-db", owner, str(layout.cert("db")),
          "--secure-boot"], "virt-fw-vars")
    _publish(tmp, layout.varstore)


def sign(layout: Layout, kernel: Path, out: Path, key: str = "db") -> None:
    """kernel signed with one of this install's keys (sbsign)."""
    if shutil.which("sbsign") is None:
        raise FirmwareError("sbsign not found (apt-get install sbsigntool)")
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    _run(["sbsign", "--key", str(layout.key(key)), "--cert", str(layout.cert(key)),
          "--output", str(tmp), str(kernel)], f"signing {kernel}")
    _publish(tmp, out)


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_private(path: Path, data: bytes) -> None:
    """A root-only file, replaced whole."""
    _write(path, data, 0o600)


def cert_der(path: Path) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    with library_errors(str(path)):
        return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(Encoding.DER)


def prepare(layout: Layout | None = None) -> list[str]:
    """Make what is missing or stale: keys (once), the varstore, the signed
    kernel.  Returns what it did, one line each."""
    layout = layout or Layout()
    done = []
    if not layout.kernel.exists():
        raise FirmwareError(f"{layout.kernel} not found: build it with "
                            "kernels/build --flavour secure (scripts/setup does)")
    layout.keys.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(layout.keys, 0o700)  # the private keys: root's alone
    guid = layout.keys / "owner.guid"
    if not all(layout.key(n).exists() and layout.cert(n).exists() for n in KEY_NAMES):
        for n in KEY_NAMES:
            make_key(layout, n)
        _write(guid, f"{uuid.uuid4()}\n".encode(), 0o644)
        done.append(f"made Secure Boot keys (PK, KEK, db) in {layout.keys}")
        layout.varstore.unlink(missing_ok=True)
    stamp = layout.keys / "varstore.stamp"
    want = "".join(file_digest(layout.cert(n)) for n in KEY_NAMES) + file_digest(OVMF_VARS)
    if not layout.varstore.exists() or _read(stamp) != want:
        make_varstore(layout)
        _write(stamp, want.encode(), 0o600)
        done.append(f"enrolled them in {layout.varstore} (Secure Boot on)")
    stamp = layout.keys / "kernel.stamp"
    want = file_digest(layout.kernel) + file_digest(layout.cert("db"))
    if not layout.signed.exists() or _read(stamp) != want:
        sign(layout, layout.kernel, layout.signed)
        _write(stamp, want.encode(), 0o600)
        done.append(f"signed {layout.signed} with the db key")
    return done


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


@dataclass
class VarstoreState:
    """What `microvm check` reports of a varstore."""

    secure_boot: bool
    certificates: dict[str, list[str]] = field(default_factory=dict)  # PK/KEK/db -> CNs


def varstore_state(path: Path) -> VarstoreState:
    from cryptography.x509.oid import NameOID
    from virt.firmware.varstore.edk2 import Edk2VarStore

    with library_errors(str(path)):
        varlist = Edk2VarStore(str(path)).get_varlist()
    enable = varlist.get("SecureBootEnable")
    state = VarstoreState(secure_boot=bool(enable is not None and enable.data[:1] == b"\x01"))
    for name in KEY_NAMES:
        var = varlist.get(name)
        names = []
        for siglist in (var.sigdb if var is not None and var.sigdb is not None else []):
            if siglist.x509 is not None:
                cn = siglist.x509.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
                names.append(str(cn[0].value) if cn else siglist.x509.subject.rfc4514_string())
        state.certificates[name] = names
    return state


# Why a unified image on a disk, not QEMU's -kernel: QEMU writes into the
# kernel's setup header (so its signature no longer verifies) and OVMF
# 2022.11 then falls back to a loader that checks nothing.  From a disk,
# OVMF verifies the whole image against db and refuses what fails.
def _uki_sections(stub: Path) -> tuple[int, int]:
    """(section alignment, end of the stub's last section) of the stub."""
    import pefile

    with library_errors(str(stub)):
        pe = pefile.PE(str(stub), fast_load=True)
        try:
            align = pe.OPTIONAL_HEADER.SectionAlignment
            end = max(sec.VirtualAddress + max(sec.Misc_VirtualSize, sec.SizeOfRawData)
                      for sec in pe.sections)
            return align, end + pe.OPTIONAL_HEADER.ImageBase
        finally:
            pe.close()


def build_uki(kernel: Path, initrd: Path, cmdline: str, out: Path, stub: Path = STUB) -> None:
    """kernel + initrd + command line as one EFI image (unsigned), with
    objcopy as systemd-stub(7) describes: each section after the stub's,
    aligned."""
    if not stub.exists():
        raise FirmwareError(f"{stub} not found (apt-get install systemd-boot-efi)")
    if shutil.which("objcopy") is None:
        raise FirmwareError("objcopy not found (apt-get install binutils)")
    align, vma = _uki_sections(stub)
    tmp = out.with_name(f".{out.name}.cmdline")
    tmp.write_bytes(cmdline.encode() + b"\0")
    argv = ["objcopy"]
    try:
        for name, path in ((".cmdline", tmp), (".linux", kernel), (".initrd", initrd)):
            vma = (vma + align - 1) // align * align
            argv += ["--add-section", f"{name}={path}",
                     "--change-section-vma", f"{name}={vma:#x}"]
            vma += path.stat().st_size
        _run([*argv, str(stub), str(out)], "building the unified kernel image")
    finally:
        tmp.unlink(missing_ok=True)


def build_esp(image: Path, out: Path) -> None:
    """A FAT disk with image as the removable-media boot path, which OVMF
    boots first (no boot entry needed)."""
    for tool, pkg in (("mkfs.fat", "dosfstools"), ("mcopy", "mtools")):
        if shutil.which(tool) is None:
            raise FirmwareError(f"{tool} not found (apt-get install {pkg})")
    size_kib = image.stat().st_size // 1024 + 4096
    out.unlink(missing_ok=True)
    _run(["mkfs.fat", "-C", "-n", "KATAPY", str(out), str(size_kib)], "mkfs.fat")
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    _run(["mmd", "-i", str(out), "::/EFI", "::/EFI/BOOT"], "mmd", env)
    _run(["mcopy", "-i", str(out), str(image), "::/EFI/BOOT/BOOTX64.EFI"], "mcopy", env)


def _lz4(initrd: Path, out: Path) -> None:
    """The initrd compressed as the kernel unpacks it (lz4's legacy frames):
    the 19 MiB guest image is hashed three times before the kernel runs
    (OVMF's Authenticode check, systemd-stub's and the kernel stub's
    measurements), which under TCG costs more than unpacking 9 MiB."""
    if shutil.which("lz4") is None:
        raise FirmwareError("lz4 not found (apt-get install lz4)")
    _run(["lz4", "-q", "-f", "-l", "-9", str(initrd), str(out)], "compressing the initrd")


# Part of each disk's name: how a disk is made (a change makes new ones).
DISK_FORMAT = "uki, lz4 initrd"


@dataclass(frozen=True)
class BootDisk:
    """A secure VM's boot disk, the signed image on it, and that image's
    Authenticode hash as it was built (PCR 4 must show it)."""

    esp: Path
    image: Path
    image_hash: bytes = b""


def boot_disk(layout: Layout, initrd: Path, cmdline: str) -> BootDisk:
    """The signed unified image for this kernel, initrd and command line,
    on its disk: made once, kept under GUEST/secure (nothing secret in it;
    QEMU reads it), by content so a change of any input makes a new one."""
    key = hashlib.sha256()
    for part in (DISK_FORMAT, file_digest(layout.signed), file_digest(initrd), cmdline,
                 file_digest(layout.cert("db")), file_digest(STUB)):
        key.update(part.encode() + b"\0")
    name = key.hexdigest()[:20]
    d = layout.disks
    d.mkdir(mode=0o755, parents=True, exist_ok=True)
    # The hash of each image as built, where only root writes: what is on
    # the disk when a VM boots is what the vTPM shows, and must match it.
    hashes = layout.keys / "images.json"
    try:
        known = json.loads(hashes.read_text())
    except (OSError, ValueError):
        known = {}
    esp, image = d / f"{name}.esp", d / f"{name}.efi"
    if esp.exists() and image.exists() and name in known:
        with contextlib.suppress(OSError):
            os.utime(esp)  # the latest used is kept longest (below)
        return BootDisk(esp, image, bytes.fromhex(known[name]))
    from microvm.vm import measure
    unsigned = d / f".{name}.{os.getpid()}.unsigned"
    packed = d / f".{name}.{os.getpid()}.initrd.lz4"
    try:
        _lz4(initrd, packed)
        build_uki(layout.signed, packed, cmdline, unsigned)
        known[name] = measure.image_hash(unsigned).hex()
        sign(layout, unsigned, image)
        tmp = d / f".{name}.{os.getpid()}.esp"
        build_esp(image, tmp)
        _publish(tmp, esp)
    finally:
        unsigned.unlink(missing_ok=True)
        packed.unlink(missing_ok=True)
    # Only the four last used stay: each is the size of the guest image.
    for old in sorted(d.glob("*.esp"), key=lambda p: p.stat().st_mtime)[:-4]:
        old.unlink(missing_ok=True)
        old.with_suffix(".efi").unlink(missing_ok=True)
        known.pop(old.stem, None)
    _write(hashes, json.dumps(known).encode(), 0o600)
    return BootDisk(esp, image, bytes.fromhex(known[name]))


def list_disks(layout: Layout | None = None) -> list[tuple[Path, int]]:
    """The secure flavour's boot disks kept (each with its image), and their
    sizes in bytes."""
    layout = layout or Layout()
    out = []
    for esp in sorted(layout.disks.glob("*.esp")) if layout.disks.is_dir() else []:
        with contextlib.suppress(OSError):
            out.append((esp, esp.stat().st_size + esp.with_suffix(".efi").stat().st_size))
    return out


def prune_disks(layout: Layout | None = None) -> list[str]:
    """Remove every boot disk (a running VM keeps its open; the next secure
    start builds its disk again); what went."""
    layout = layout or Layout()
    removed = []
    for esp, _ in list_disks(layout):
        esp.unlink(missing_ok=True)
        esp.with_suffix(".efi").unlink(missing_ok=True)
        removed.append(f"secure boot disk {esp.stem}")
    if removed:
        (layout.keys / "images.json").unlink(missing_ok=True)
    return removed
