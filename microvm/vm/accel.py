"""Choosing the accelerator: KVM where it can boot a stock guest, else TCG."""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from microvm.errors import KataError

KVM_GET_API_VERSION = 0xAE00
KVM_API_VERSION = 12


@dataclass(frozen=True)
class Choice:
    accel: str           # "kvm" or "tcg"
    reason: str          # why, in words a user can act on
    fallback: bool       # auto fell back to TCG


def probe_kvm(root: Path = Path("/")) -> tuple[bool, str]:
    """Whether /dev/kvm can run a standard guest, and why not.

    PVM hosts (module kvm_pvm, no kvm_intel/kvm_amd) expose a /dev/kvm on
    which stock kernels hang on entering long mode, so the vendor module
    decides, not the device node.
    """
    dev = root / "dev/kvm"
    modules = root / "sys/module"
    if not dev.exists():
        return False, "/dev/kvm does not exist (no hardware virtualization, or kvm not loaded)"
    vendor = [m for m in ("kvm_intel", "kvm_amd") if (modules / m).exists()]
    if not vendor:
        if (modules / "kvm_pvm").exists():
            return False, ("/dev/kvm is provided by kvm_pvm (PVM), on which standard guest "
                           "kernels do not boot; neither kvm_intel nor kvm_amd is loaded")
        return False, "/dev/kvm exists but neither kvm_intel nor kvm_amd is loaded"
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return False, f"/dev/kvm: {e.strerror} (add the user to the kvm group)"
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as e:
        return False, f"/dev/kvm: KVM_GET_API_VERSION failed: {e.strerror}"
    finally:
        os.close(fd)
    if version != KVM_API_VERSION:
        return False, f"/dev/kvm speaks KVM API {version}, not {KVM_API_VERSION}"
    return True, f"/dev/kvm usable ({vendor[0]})"


def choose(requested: str, root: Path = Path("/")) -> Choice:
    if requested == "tcg":
        return Choice("tcg", "TCG requested in the configuration", False)
    ok, why = probe_kvm(root)
    if requested == "kvm":
        if not ok:
            raise KataError(f"accel kvm requested but {why}")
        return Choice("kvm", why, False)
    if ok:
        return Choice("kvm", why, False)
    return Choice("tcg", why, True)
