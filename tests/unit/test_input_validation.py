"""Input from the command line, config files and OCI specs: every bad value
is one clear line (exit 125 from the CLI), refused before a VM boots, and
never echoes what a file holds.

The CLI cases run the real `microvm` in a subprocess with a config whose
kernel does not exist: even a check that fails to refuse boots nothing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from microvm import config, paths
from microvm.config import load
from microvm.errors import ConfigError

SECRET = "$y$j9T$Zq3n0tAr3alHash$s3cr3tS4lt"


@pytest.fixture(autouse=True)
def no_host_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("KATA_PY_CONFIG", raising=False)
    monkeypatch.setattr(paths, "CONFIG", tmp_path / "absent.yaml")


def microvm(tmp_path: Path, *args: str, config_file: Path | None = None
            ) -> subprocess.CompletedProcess[str]:
    """The real CLI; a config that can boot nothing (no such kernel) and
    makes no network."""
    if config_file is None:
        config_file = tmp_path / "config.yaml"
        config_file.write_text(yaml.safe_dump({
            "kernel": str(tmp_path / "no-such-vmlinuz"), "network": "none",
            "log_dir": str(tmp_path / "logs")}))
    return subprocess.run([sys.executable, "-m", "microvm", "--config", str(config_file),
                           *args], capture_output=True, text=True, timeout=60)


def one_line(r: subprocess.CompletedProcess[str], *words: str) -> str:
    lines = [line for line in r.stderr.splitlines() if "using TCG emulation" not in line]
    assert r.returncode == 125, r.stderr
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


# --- 1. --config never echoes the file it reads --------------------------------


def shadow(tmp_path: Path) -> Path:
    p = tmp_path / "shadow"
    p.write_text(f"toor:{SECRET}:20228:0:99999:7:::\ndaemon:*:20228:0:99999:7:::\n")
    return p


def test_config_shadow_like_file_is_not_echoed(tmp_path: Path) -> None:
    p = shadow(tmp_path)
    with pytest.raises(ConfigError) as e:
        load(p)
    msg = str(e.value)
    assert str(p) in msg and "line 1" in msg and "unknown key" in msg
    assert "toor" not in msg and SECRET not in msg and "20228" not in msg


def test_config_shadow_through_the_cli(tmp_path: Path) -> None:
    r = microvm(tmp_path, "run", "--rm", "busybox", "true", config_file=shadow(tmp_path))
    line = one_line(r, str(tmp_path / "shadow"), "line 1")
    assert "toor" not in line and SECRET not in r.stderr + r.stdout


@pytest.mark.parametrize(("text", "words"), [
    (f"a: *{SECRET[3:9]}\n", ["not valid YAML at line 1"]),
    (f"accel: {SECRET}\n", ["accel must be one of"]),
    (f"qemu_user: '{SECRET}'\n", ["qemu_user"]),
    (f"bridge_subnet: '{SECRET}'\n", ["bridge_subnet"]),
    (f"vcpus: '{SECRET}'\n", ["vcpus must be of type int, not str"]),
    (f"{SECRET}\n", ["not a YAML mapping"]),
    (f"- {SECRET}\n", ["not a YAML mapping"]),
    (f"k: v\n{SECRET}: [\n", ["not valid YAML at line"]),
    (f"'{SECRET}': 1\n", ["line 1: unknown key"]),
    (f"? [{SECRET}]\n: 1\n", ["not valid YAML"]),
])
def test_config_errors_never_quote_the_file(tmp_path: Path, text: str,
                                            words: list[str]) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load(p)
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg
    for w in words:
        assert w in msg
    assert SECRET[3:9] not in msg.replace(str(p), "")


@pytest.mark.parametrize(("content", "words"), [
    (b"a: \x00secret\n", "not valid YAML: character 3"),
    (b"\xff\xfesecret", "not UTF-8 text"),
])
def test_config_binary_files(tmp_path: Path, content: bytes, words: str) -> None:
    p = tmp_path / "c.bin"
    p.write_bytes(content)
    with pytest.raises(ConfigError, match=words) as e:
        load(p)
    assert "secret" not in str(e.value).replace(str(p), "")


def test_config_endless_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a config file"):
        load("/dev/zero")
    big = tmp_path / "big.yaml"
    big.write_text("#" * (config.MAX_FILE_BYTES + 1))
    with pytest.raises(ConfigError, match="not a config file"):
        load(big)


def test_config_plain_words_are_still_named(tmp_path: Path) -> None:
    """A typo in a real config file is named, as before."""
    p = tmp_path / "c.yaml"
    p.write_text("vcpus: 1\nmemory: 512\n")
    with pytest.raises(ConfigError, match="unknown key 'memory'"):
        load(p)
    p.write_text("accel: xen\n")
    with pytest.raises(ConfigError, match="not 'xen'"):
        load(p)
