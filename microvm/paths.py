"""Where kata-py keeps things on the host (overridable for tests)."""

from __future__ import annotations

import os
from pathlib import Path

LIB = Path(os.environ.get("KATA_PY_LIB", "/var/lib/kata-py"))
CACHE = Path(os.environ.get("KATA_PY_CACHE", "/var/cache/kata-py"))
# Mount point of each owner's private tmpfs (see mountns.py); empty on the host.
RUN = Path(os.environ.get("KATA_PY_RUN", "/run/kata-py"))
CONFIG = Path("/etc/kata-py/config.yaml")

GUEST = LIB / "guest"
ROOTFS = LIB / "rootfs"
