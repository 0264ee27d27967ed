"""microvm install containerd: the edit, its idempotence and its refusals."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from microvm.cli.install import HANDLER, RUNTIME_TYPE, install_containerd
from microvm.errors import KataError


@pytest.fixture(autouse=True)
def _secure_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """kata-py-secure's config file goes to the test's directory, not /etc."""
    path = tmp_path / "secure.yaml"
    monkeypatch.setattr("microvm.paths.SECURE_CONFIG", path)
    return path

BASE = """# site config: keep me
version = 2
root = "/var/lib/containerd"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.9"  # pinned

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
"""


def runtime(path: Path, plugin: str = "io.containerd.grpc.v1.cri") -> dict[str, object]:
    doc = tomllib.loads(path.read_text())
    return doc["plugins"][plugin]["containerd"]["runtimes"][HANDLER]  # type: ignore[no-any-return]


def test_adds_the_runtime_and_keeps_the_rest_byte_for_byte(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(BASE)
    cfg.chmod(0o600)
    msg = install_containerd(cfg)
    assert "restart containerd" in msg
    text = cfg.read_text()
    assert text.startswith(BASE)
    assert runtime(cfg)["runtime_type"] == RUNTIME_TYPE
    assert runtime(cfg)["options"] == {"ConfigPath": "/etc/kata-py/config.yaml"}
    doc = tomllib.loads(text)
    assert doc["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]["runc"] == {
        "runtime_type": "io.containerd.runc.v2"}
    assert cfg.stat().st_mode & 0o777 == 0o600


def test_second_run_changes_nothing(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(BASE)
    install_containerd(cfg)
    once = cfg.read_bytes()
    assert "nothing to do" in install_containerd(cfg)
    assert cfg.read_bytes() == once


def test_dry_run_prints_the_diff_and_writes_nothing(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(BASE)
    out = install_containerd(cfg, dry_run=True)
    assert cfg.read_text() == BASE
    assert f'+  runtime_type = "{RUNTIME_TYPE}"' in out
    assert out.startswith(f"--- {cfg}")


def test_missing_file_is_created(tmp_path: Path) -> None:
    cfg = tmp_path / "etc/containerd/config.toml"
    install_containerd(cfg)
    assert tomllib.loads(cfg.read_text())["version"] == 2
    assert runtime(cfg)["runtime_type"] == RUNTIME_TYPE


def test_containerd_2_config_uses_the_new_cri_plugin(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text("version = 3\n")
    install_containerd(cfg)
    assert runtime(cfg, "io.containerd.cri.v1.runtime")["runtime_type"] == RUNTIME_TYPE


def test_a_different_kata_py_runtime_is_not_overwritten(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    other = BASE + ('[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kata-py]\n'
                    '  runtime_type = "io.containerd.other.v2"\n')
    cfg.write_text(other)
    with pytest.raises(KataError, match="io.containerd.other.v2"):
        install_containerd(cfg)
    assert cfg.read_text() == other


def test_invalid_toml_is_refused_naming_the_file(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text("version = 2\n[plugins\n")
    with pytest.raises(KataError, match=f"{cfg}: not valid TOML"):
        install_containerd(cfg)
    assert cfg.read_text() == "version = 2\n[plugins\n"


@pytest.mark.skipif(shutil.which("containerd") is None, reason="containerd not installed")
def test_containerd_reads_the_result(tmp_path: Path) -> None:
    """The real containerd parses the edited file and sees the runtime."""
    cfg = tmp_path / "config.toml"
    cfg.write_text(BASE)
    install_containerd(cfg)
    dump = subprocess.run(["containerd", "--config", str(cfg), "config", "dump"],
                          capture_output=True, text=True, timeout=30)
    assert dump.returncode == 0, dump.stderr
    assert f"[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.{HANDLER}]" in dump.stdout
    assert f'runtime_type = "{RUNTIME_TYPE}"' in dump.stdout


def test_runc_is_kept_when_the_file_names_no_runtime() -> None:
    """containerd replaces its built-in runtimes with the file's table: ours
    alone would drop runc and leave CRI without its default runtime."""
    import tomllib

    from microvm.cli.install import plan
    new = plan("version = 2\n", "t")
    assert new is not None
    runtimes = tomllib.loads(new)["plugins"]["io.containerd.grpc.v1.cri"]["containerd"][
        "runtimes"]
    assert runtimes["runc"]["runtime_type"] == "io.containerd.runc.v2"
    assert runtimes["kata-py"]["runtime_type"] == "io.containerd.kata-py.v2"
    has_runc = ('version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]\n'
                '  runtime_type = "io.containerd.runc.v2"\n  SystemdCgroup = true\n')
    kept = plan(has_runc, "t")
    assert kept is not None and kept.count("runtimes.runc]") == 1  # theirs, untouched
    other = ('version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd]\n'
             '  default_runtime_name = "crun"\n')
    assert "runtimes.runc" not in (plan(other, "t") or "")



@pytest.mark.parametrize("original", [
    "",
    "version = 2\n",
    "# the operator's comment\nversion = 2\n\n[plugins.\"io.containerd.grpc.v1.cri\"]\n"
    "  sandbox_image = \"pause:3.9\"\n",
    "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n"
    "  runtime_type = \"io.containerd.runc.v2\"\n",
])
def test_uninstall_restores_the_file(original: str) -> None:
    from microvm.cli.install import plan, unplan
    installed = plan(original, "t")
    assert installed is not None
    restored = unplan(installed, "t")
    # An empty file was given a version line by install: that line stays.
    assert restored == (original or "version = 2\n")
    assert unplan(restored, "t") is None


def test_uninstall_refuses_a_hand_made_entry() -> None:
    from microvm.cli.install import unplan
    from microvm.errors import KataError
    hand = ('version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kata-py]\n'
            '  runtime_type = "io.containerd.kata-py.v2"\n')
    with pytest.raises(KataError, match="remove it by hand"):
        unplan(hand, "t")
