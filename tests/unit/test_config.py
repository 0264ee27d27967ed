"""microvm.config: defaults, the YAML file over them, and strict validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from microvm import config, paths
from microvm.config import ACCELS, LOG_LEVELS, TRANSPORTS, Config, load
from microvm.errors import ConfigError, KataError


@pytest.fixture(autouse=True)
def no_host_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Neither the host's /etc/kata-py/config.yaml nor $KATA_PY_CONFIG leaks in."""
    absent = tmp_path / "etc" / "absent.yaml"
    monkeypatch.delenv("KATA_PY_CONFIG", raising=False)
    monkeypatch.setattr(paths, "CONFIG", absent)
    assert config.paths.CONFIG is absent
    return absent


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_when_default_file_absent() -> None:
    cfg = load()
    assert cfg == Config()
    assert cfg.source == "defaults"
    assert cfg.vcpus == 1
    assert cfg.memory_mib == 512
    assert cfg.accel == "auto"
    assert cfg.transport == "auto"
    assert cfg.log_level == "warning"
    assert cfg.boot_timeout == 60.0
    assert cfg.kernel == str(paths.GUEST / "vmlinuz")
    assert cfg.guest_image == str(paths.GUEST / "initrd.cpio")


def test_default_file_used_when_present(no_host_config: Path) -> None:
    no_host_config.parent.mkdir()
    no_host_config.write_text("vcpus: 3\n")
    cfg = load()
    assert cfg.vcpus == 3
    assert cfg.source == str(no_host_config)


def test_yaml_overrides_defaults(tmp_path: Path) -> None:
    p = write(tmp_path, """
vcpus: 2
memory_mib: 1024
accel: tcg
transport: serial
boot_timeout: 5.5
kernel_params: "loglevel=7 debug"
log_dir: /tmp/logs
qemu: /opt/qemu/bin/qemu-system-x86_64
""")
    cfg = load(p)
    assert cfg.vcpus == 2
    assert cfg.memory_mib == 1024
    assert cfg.accel == "tcg"
    assert cfg.transport == "serial"
    assert cfg.boot_timeout == 5.5
    assert cfg.kernel_params == "loglevel=7 debug"
    assert cfg.log_dir == "/tmp/logs"
    assert cfg.qemu == "/opt/qemu/bin/qemu-system-x86_64"
    # Keys not in the file keep their defaults.
    assert cfg.shutdown_timeout == Config().shutdown_timeout
    assert cfg.log_level == Config().log_level
    assert cfg.kernel == Config().kernel
    assert cfg.source == str(p)


def test_env_var_names_the_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    p = write(tmp_path, "memory_mib: 256\n")
    monkeypatch.setenv("KATA_PY_CONFIG", str(p))
    assert load().memory_mib == 256


def test_explicit_path_wins_over_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KATA_PY_CONFIG", str(write(tmp_path, "vcpus: 4\n", "env.yaml")))
    assert load(write(tmp_path, "vcpus: 5\n", "arg.yaml")).vcpus == 5


def test_explicit_missing_file_is_error(tmp_path: Path) -> None:
    p = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as e:
        load(p)
    assert str(p) in str(e.value)
    assert "not found" in str(e.value)


def test_env_missing_file_is_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    p = tmp_path / "gone.yaml"
    monkeypatch.setenv("KATA_PY_CONFIG", str(p))
    with pytest.raises(ConfigError, match="not found"):
        load()


def test_unreadable_path_is_config_error(tmp_path: Path) -> None:
    d = tmp_path / "adir"
    d.mkdir()
    with pytest.raises(ConfigError) as e:
        load(d)
    assert str(d) in str(e.value)


def test_config_error_is_kata_error() -> None:
    assert issubclass(ConfigError, KataError)
    assert ConfigError.exit_code == 125


def test_unknown_key(tmp_path: Path) -> None:
    p = write(tmp_path, "vcpus: 2\nmemory: 1024\n")
    with pytest.raises(ConfigError) as e:
        load(p)
    msg = str(e.value)
    assert "'memory'" in msg
    assert str(p) in msg
    assert "unknown key" in msg


def test_source_is_not_a_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key 'source'"):
        load(write(tmp_path, "source: elsewhere\n"))


@pytest.mark.parametrize(("key", "yaml_value", "expected", "got"), [
    ("vcpus", '"two"', "int", "str"),
    ("vcpus", "1.5", "int", "float"),
    ("memory_mib", "true", "int", "bool"),
    ("memory_mib", "[512]", "int", "list"),
    ("boot_timeout", "fast", "float", "str"),
    ("boot_timeout", "true", "float", "bool"),
    ("shutdown_timeout", "null", "float", "NoneType"),
    ("kernel", "5", "str", "int"),
    ("accel", "{a: 1}", "str", "dict"),
    ("log_dir", "false", "str", "bool"),
])
def test_wrong_type(tmp_path: Path, key: str, yaml_value: str, expected: str, got: str) -> None:
    p = write(tmp_path, f"{key}: {yaml_value}\n")
    with pytest.raises(ConfigError) as e:
        load(p)
    msg = str(e.value)
    assert key in msg
    assert str(p) in msg
    assert f"must be of type {expected}" in msg
    assert f"not {got}" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("key", ["boot_timeout", "shutdown_timeout"])
def test_int_accepted_for_float(tmp_path: Path, key: str) -> None:
    cfg = load(write(tmp_path, f"{key}: 7\n"))
    value = getattr(cfg, key)
    assert value == 7.0
    assert type(value) is float


@pytest.mark.parametrize("text", [
    "vcpus: [1, 2\n",
    "a: b: c\n",
    "vcpus: 1\n  memory_mib: 2\n",
    "\tvcpus: 1\n",
])
def test_invalid_yaml_one_line_error(tmp_path: Path, text: str) -> None:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: not valid YAML")
    assert "\n" not in msg


@pytest.mark.parametrize("text", ["", "\n", "# nothing configured\n", "---\n"])
def test_empty_file_gives_defaults(tmp_path: Path, text: str) -> None:
    p = write(tmp_path, text)
    cfg = load(p)
    assert cfg == Config()
    assert cfg.source == str(p)


@pytest.mark.parametrize("text", ["- vcpus\n- 2\n", "just a string\n", "42\n"])
def test_top_level_must_be_mapping(tmp_path: Path, text: str) -> None:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load(p)
    assert str(p) in str(e.value)
    assert "mapping" in str(e.value)


@pytest.mark.parametrize(("key", "allowed"), [
    ("accel", ACCELS), ("transport", TRANSPORTS), ("log_level", LOG_LEVELS),
])
def test_choices_accepted(tmp_path: Path, key: str, allowed: tuple[str, ...]) -> None:
    for value in allowed:
        assert getattr(load(write(tmp_path, f"{key}: {value}\n")), key) == value


@pytest.mark.parametrize(("key", "value"), [
    ("accel", "xen"), ("accel", "KVM"), ("accel", ""),
    ("transport", "tcp"), ("transport", "virtio"),
    ("log_level", "verbose"), ("log_level", "WARNING"),
])
def test_choices_rejected(tmp_path: Path, key: str, value: str) -> None:
    p = write(tmp_path, f"{key}: {value!r}\n")
    with pytest.raises(ConfigError) as e:
        load(p)
    msg = str(e.value)
    assert key in msg
    assert str(p) in msg
    assert repr(value) in msg


def test_choice_sets() -> None:
    assert set(ACCELS) == {"auto", "kvm", "tcg"}
    assert set(TRANSPORTS) == {"auto", "vsock", "serial"}
    assert set(LOG_LEVELS) == {"debug", "info", "warning", "error"}


@pytest.mark.parametrize("value", [999999, 3073, 63, 0, -512])
def test_memory_out_of_range(tmp_path: Path, value: int) -> None:
    p = write(tmp_path, f"memory_mib: {value}\n")
    with pytest.raises(ConfigError) as e:
        load(p)
    assert "memory_mib" in str(e.value)
    assert str(value) in str(e.value)
    assert str(p) in str(e.value)


@pytest.mark.parametrize("value", [64, 3072])
def test_memory_bounds_accepted(tmp_path: Path, value: int) -> None:
    assert load(write(tmp_path, f"memory_mib: {value}\n")).memory_mib == value


@pytest.mark.parametrize("value", [0, 256, -1])
def test_vcpus_out_of_range(tmp_path: Path, value: int) -> None:
    with pytest.raises(ConfigError, match="vcpus"):
        load(write(tmp_path, f"vcpus: {value}\n"))


@pytest.mark.parametrize("value", [1, 255])
def test_vcpus_bounds_accepted(tmp_path: Path, value: int) -> None:
    assert load(write(tmp_path, f"vcpus: {value}\n")).vcpus == value


@pytest.mark.parametrize("key", ["boot_timeout", "shutdown_timeout"])
@pytest.mark.parametrize("value", ["0", "-1", "0.0"])
def test_timeouts_must_be_positive(tmp_path: Path, key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"{key} must be positive"):
        load(write(tmp_path, f"{key}: {value}\n"))


@pytest.mark.parametrize("key", ["boot_timeout", "shutdown_timeout"])
def test_timeouts_reject_nan(tmp_path: Path, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load(write(tmp_path, f"{key}: .nan\n"))


def test_from_mapping_none_is_defaults() -> None:
    cfg = config.from_mapping(None, "somewhere")
    assert cfg == Config()
    assert cfg.source == "somewhere"
