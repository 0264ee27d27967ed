"""microvm.vm.qemuuser: whom QEMU runs as.  The switch itself is tested on real
VMs (tests/integration/test_run.py); here, the choices."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from microvm.errors import ConfigError
from microvm.vm import qemuuser
from microvm.vm.qemuuser import Credentials


def test_settings() -> None:
    assert qemuuser.resolve("root", "tcg") is None
    assert qemuuser.resolve("dynamic", "tcg") == Credentials(-1, -1, ())
    nobody = pwd.getpwnam("nobody")
    assert qemuuser.resolve("nobody", "tcg") == Credentials(nobody.pw_uid, nobody.pw_gid, ())
    assert qemuuser.resolve(str(nobody.pw_uid), "tcg") == \
        Credentials(nobody.pw_uid, nobody.pw_gid, ())
    assert qemuuser.resolve("0", "tcg") is None  # uid 0 is root, whatever its name
    with pytest.raises(ConfigError, match="no such user"):
        qemuuser.resolve("no-such-user-kp", "tcg")


def _dev(tmp_path: Path, mode: int, gid: int) -> str:
    f = tmp_path / "kvm"
    f.touch()
    os.chown(f, 0, gid)
    f.chmod(mode)
    return str(f)


def test_kvm_group_is_never_roots(tmp_path: Path) -> None:
    assert qemuuser._kvm_group(_dev(tmp_path, 0o660, 36)) == (36,)    # root:kvm, as udev
    assert qemuuser._kvm_group(_dev(tmp_path, 0o666, 36)) == ()       # anyone may
    with pytest.raises(ConfigError, match="cannot be opened by an unprivileged QEMU"):
        qemuuser._kvm_group(_dev(tmp_path, 0o660, 0))                # root:root
    with pytest.raises(ConfigError, match="qemu_user: root"):
        qemuuser._kvm_group(_dev(tmp_path, 0o600, 36))
    assert qemuuser._kvm_group(str(tmp_path / "none")) == ()
