"""Where kata-py keeps things on the host (overridable for tests)."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from microvm.errors import KataError

LIB = Path(os.environ.get("KATA_PY_LIB", "/var/lib/kata-py"))
CACHE = Path(os.environ.get("KATA_PY_CACHE", "/var/cache/kata-py"))
# Mount point of each owner's private tmpfs (see mountns.py); empty on the host.
RUN = Path(os.environ.get("KATA_PY_RUN", "/run/kata-py"))
CONFIG = Path("/etc/kata-py/config.yaml")
# RuntimeClass kata-py-secure's config (`microvm install containerd` writes it).
SECURE_CONFIG = Path(os.environ.get("KATA_PY_SECURE_CONFIG", "/etc/kata-py/secure.yaml"))

GUEST = LIB / "guest"
ROOTFS = LIB / "rootfs"

# LIB's directories for root alone: image layers keep their setuid files and
# device nodes (the guest's business), blobs are whatever was imported, and
# containers hold their writable layers and state.
PRIVATE = ("images", "containers", "rootfs")


def lib() -> Path:
    """LIB, made if missing, 0711: QEMU runs as a uid of its own and opens
    the guest kernel and image under GUEST (0755), but may list nothing."""
    return _mode(LIB, 0o711)


def private(name: str) -> Path:
    """LIB/name, a directory only root may enter (made if missing).

    Every private directory an older kata-py left open (0755) is closed on
    this first use, not only this one: any command fixes the whole store.
    """
    lib()
    for other in PRIVATE:
        if other != name and (LIB / other).is_dir():
            _mode(LIB / other, 0o700)
    return _mode(LIB / name, 0o700)


def _mode(path: Path, mode: int) -> Path:
    """path as a directory with exactly these permission bits."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, mode)
        # chmod, not mkdir's mode alone: the umask, or an older kata-py.
        if stat.S_IMODE(os.stat(path).st_mode) != mode:
            os.chmod(path, mode)
    except OSError as e:
        raise KataError(f"{path}: {e.strerror} (kata-py keeps its store as root)") from None
    return path

# Beside a container's bundle: why its VM is gone, written by the shim when
# it sees that (containerd's events have no field for it), read by the CLI.
BUNDLE_DEATH = "vm-death"
