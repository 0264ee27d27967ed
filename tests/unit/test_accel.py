"""microvm.vm.accel: KVM only where a stock guest boots, TCG otherwise.

A fake root (tmp_path) stands in for / with dev/kvm as a regular file and
sys/module/<name> directories.  A regular file opens but fails the
KVM_GET_API_VERSION ioctl, so the vendor-module case ends there.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from microvm.errors import KataError
from microvm.vm import accel
from microvm.vm.accel import Choice, choose, probe_kvm


def fake_root(tmp_path: Path, *modules: str, kvm: bool = True) -> Path:
    (tmp_path / "dev").mkdir()
    if kvm:
        (tmp_path / "dev/kvm").write_bytes(b"")
    for m in modules:
        (tmp_path / "sys/module" / m).mkdir(parents=True)
    return tmp_path


def test_no_dev_kvm(tmp_path: Path) -> None:
    root = fake_root(tmp_path, "kvm", "kvm_intel", kvm=False)
    ok, why = probe_kvm(root)
    assert not ok
    assert "/dev/kvm does not exist" in why
    assert choose("auto", root) == Choice("tcg", why, True)


def test_pvm_only(tmp_path: Path) -> None:
    root = fake_root(tmp_path, "kvm", "kvm_pvm")
    ok, why = probe_kvm(root)
    assert not ok
    assert "kvm_pvm" in why
    assert "PVM" in why
    c = choose("auto", root)
    assert c.accel == "tcg"
    assert c.fallback is True
    assert c.reason == why


def test_kvm_requested_on_pvm_is_error(tmp_path: Path) -> None:
    root = fake_root(tmp_path, "kvm", "kvm_pvm")
    with pytest.raises(KataError) as e:
        choose("kvm", root)
    assert "accel kvm requested" in str(e.value)
    assert "kvm_pvm" in str(e.value)


def test_kvm_requested_without_dev_kvm_is_error(tmp_path: Path) -> None:
    root = fake_root(tmp_path, kvm=False)
    with pytest.raises(KataError, match="does not exist"):
        choose("kvm", root)


def test_no_vendor_module(tmp_path: Path) -> None:
    root = fake_root(tmp_path, "kvm")
    ok, why = probe_kvm(root)
    assert not ok
    assert "neither kvm_intel nor kvm_amd" in why
    assert "PVM" not in why
    assert choose("auto", root) == Choice("tcg", why, True)


@pytest.mark.parametrize("modules", [("kvm_intel",), ("kvm_amd",), ("kvm_intel", "kvm_pvm")])
def test_vendor_module_decides_then_ioctl(tmp_path: Path, modules: tuple[str, ...]) -> None:
    # With a vendor module loaded the probe goes on to the device itself
    # (even next to kvm_pvm); a regular file fails the ioctl.
    root = fake_root(tmp_path, "kvm", *modules)
    ok, why = probe_kvm(root)
    assert not ok
    assert "KVM_GET_API_VERSION" in why
    assert "PVM" not in why
    c = choose("auto", root)
    assert (c.accel, c.fallback) == ("tcg", True)


def test_dev_kvm_not_openable(tmp_path: Path) -> None:
    # A directory cannot be opened O_RDWR, even by root.
    root = fake_root(tmp_path, "kvm_amd", kvm=False)
    (root / "dev/kvm").mkdir()
    ok, why = probe_kvm(root)
    assert not ok
    assert why.startswith("/dev/kvm: ")
    assert "kvm group" in why


def test_tcg_requested_never_probes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def no_probe(root: Path = Path("/")) -> tuple[bool, str]:
        raise AssertionError("probe_kvm called for accel tcg")
    monkeypatch.setattr(accel, "probe_kvm", no_probe)
    c = choose("tcg", tmp_path / "does-not-exist")
    assert c.accel == "tcg"
    assert c.fallback is False
    assert "TCG requested" in c.reason


def test_tcg_requested_on_pvm(tmp_path: Path) -> None:
    root = fake_root(tmp_path, "kvm", "kvm_pvm")
    assert choose("tcg", root) == Choice("tcg", "TCG requested in the configuration", False)


def test_usable_kvm_is_chosen(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The probe stubbed as succeeding: choose() itself must pick KVM, no fallback.
    monkeypatch.setattr(accel, "probe_kvm", lambda root=Path("/"): (True, "usable"))
    assert choose("auto", tmp_path) == Choice("kvm", "usable", False)
    assert choose("kvm", tmp_path) == Choice("kvm", "usable", False)


def test_real_host_pvm_falls_back_to_tcg() -> None:
    modules = Path("/sys/module")
    if not (modules / "kvm_pvm").exists():
        pytest.skip("host has no kvm_pvm module")
    if (modules / "kvm_intel").exists() or (modules / "kvm_amd").exists():
        pytest.skip("host has kvm_intel/kvm_amd loaded: KVM may be usable here")
    c = choose("auto", Path("/"))
    assert c.accel == "tcg"
    assert c.fallback is True
    assert "kvm_pvm" in c.reason or "does not exist" in c.reason
