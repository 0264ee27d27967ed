"""Runtime configuration: defaults, the YAML file, and strict validation.

Every key is a field of Config below; docs/config.md documents them.  An
unknown key or a wrong type is an error that names the key and the file.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from microvm import paths
from microvm.errors import ConfigError

ACCELS = ("auto", "kvm", "tcg")
TRANSPORTS = ("auto", "vsock", "serial")
LOG_LEVELS = ("debug", "info", "warning", "error")
NETWORKS = ("bridge", "none")
# default: QEMU microvm, direct kernel boot.  secure: q35 + OVMF with Secure
# Boot enforced, a signed kernel, a vTPM, and the boot's measurements checked
# before any container starts (docs/secure-boot.md).
FIRMWARES = ("default", "secure")
# `microvm run -d --firmware secure` asks the shim for the secure flavour
# with this annotation.  It can only raise the flavour, never lower it: a
# pod's annotations must not undo RuntimeClass kata-py-secure.
FIRMWARE_ANNOTATION = "io.containerd.kata-py.firmware"
# QEMU's microvm cannot address more than the low 3 GiB without the
# high-memory hole set-up.
MAX_MEMORY_MIB = 3072
# A config file is a few lines; /dev/zero or a huge file must not fill memory.
MAX_FILE_BYTES = 1 << 20
# Errors name a key or value only when it looks like one: --config may name
# any file (/etc/shadow), and its text must not reach the error.
_TOKEN = re.compile(r"[A-Za-z0-9_.-]{0,32}")


@dataclass
class Config:
    # Guest kernel (bzImage) and guest image: an initramfs (.cpio) or a
    # read-only ext4 image (.ext4) booted from virtio-blk.
    kernel: str = str(paths.GUEST / "vmlinuz")
    guest_image: str = str(paths.GUEST / "initrd.cpio")
    vcpus: int = 1
    memory_mib: int = 512
    accel: str = "auto"
    # TCG only: QEMU's translation cache per VM in MiB (-accel tcg,tb-size=);
    # 0: QEMU's own (1 GiB, filled lazily).  scripts/bench measures it.
    tcg_tb_mib: int = 0
    transport: str = "auto"
    qemu: str = "qemu-system-x86_64"
    # Whom QEMU runs as: dynamic (a uid of its own per VM), root, or a user.
    qemu_user: str = "dynamic"
    virtiofsd: str = "/usr/lib/qemu/virtiofsd"
    # Start every sandbox as a clone of a booted VM (microvm/vm/template.py);
    # false: every sandbox boots its own kernel.
    template: bool = True
    # microvm run: the fork server keeps one VM restored ahead for the next
    # run like the last (microvm/cli/spare.py); false: none is kept.
    spare: bool = True
    # default or secure (FIRMWARES above); secure sandboxes boot cold.
    firmware: str = "default"
    # Seconds.  TCG boots take a few seconds; KVM well under one.
    boot_timeout: float = 60.0
    shutdown_timeout: float = 10.0
    kernel_params: str = ""
    log_level: str = "warning"
    # `microvm console`: a root shell in the guest, outside every container.
    # A way into the VM, so off unless asked for (the guest checks it too).
    debug_console: bool = False
    # Where console and helper logs go; empty: kept only while the VM runs.
    log_dir: str = ""
    # microvm run's default --network, and its bridge.
    network: str = "bridge"
    bridge_name: str = "microvm0"
    bridge_subnet: str = "10.89.0.0/16"
    # docker's --icc: containers on the bridge reach each other (true), or
    # only the gateway and the outside (false: isolated bridge ports).
    bridge_icc: bool = True
    source: str = field(default="defaults", compare=False, repr=False)

    def guest_kernel_params(self) -> list[str]:
        """The guest kernel's command line beyond what the VM layer adds."""
        from microvm.protocol import DEBUG_CONSOLE_PARAM
        return [*self.kernel_params.split(),
                *(["kata_py.debug=1"] if self.log_level == "debug" else []),
                *([DEBUG_CONSOLE_PARAM] if self.debug_console else [])]

    def validate(self) -> None:
        where = self.source
        _choice("accel", self.accel, ACCELS, where)
        _choice("transport", self.transport, TRANSPORTS, where)
        _choice("log_level", self.log_level, LOG_LEVELS, where)
        if not 1 <= self.vcpus <= 255:
            raise ConfigError(f"{where}: vcpus must be between 1 and 255, not {self.vcpus}")
        # The agent and Python need room (see MAX_MEMORY_MIB for the top).
        if not 64 <= self.memory_mib <= MAX_MEMORY_MIB:
            raise ConfigError(f"{where}: memory_mib must be between 64 and {MAX_MEMORY_MIB}, "
                              f"not {self.memory_mib}")
        _choice("network", self.network, NETWORKS, where)
        _choice("firmware", self.firmware, FIRMWARES, where)
        if not self.qemu_user or not all(c.isalnum() or c in "._-" for c in self.qemu_user):
            raise ConfigError(f"{where}: qemu_user must be dynamic, root or a user name, "
                              f"not {_shown(self.qemu_user)}")
        if not 1 <= len(self.bridge_name) <= 15 or not all(
                c.isalnum() or c in "-_." for c in self.bridge_name):
            raise ConfigError(f"{where}: bridge_name must be an interface name of 1 to 15 "
                              f"letters, digits, '-', '_' or '.', not {_shown(self.bridge_name)}")
        try:
            net = ipaddress.IPv4Network(self.bridge_subnet)
        except ValueError:
            raise ConfigError(f"{where}: bridge_subnet {_shown(self.bridge_subnet, '/')} is not "
                              "an IPv4 network (ADDRESS/PREFIX)") from None
        if net.prefixlen > 29:
            raise ConfigError(f"{where}: bridge_subnet {self.bridge_subnet} is too small")
        if not 0 <= self.tcg_tb_mib <= 4096:
            raise ConfigError(f"{where}: tcg_tb_mib must be between 0 (QEMU's default) and "
                              f"4096, not {self.tcg_tb_mib}")
        for key in ("boot_timeout", "shutdown_timeout"):
            if not getattr(self, key) > 0:  # also refuses NaN
                raise ConfigError(f"{where}: {key} must be positive")


def raise_firmware(cfg: Config, annotations: dict[str, str]) -> None:
    """FIRMWARE_ANNOTATION's ask for the secure flavour; nothing lowers it."""
    if annotations.get(FIRMWARE_ANNOTATION) == "secure":
        cfg.firmware = "secure"


def _shown(value: object, extra: str = "") -> str:
    """value quoted if it looks like a setting's value; else only its kind."""
    if isinstance(value, str) and _TOKEN.fullmatch(value.replace(extra, "") if extra else value):
        return repr(value)
    return "the value given (not shown)"


def _choice(key: str, value: str, allowed: tuple[str, ...], where: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{where}: {key} must be one of {', '.join(allowed)}, "
                          f"not {_shown(value)}")


_FIELDS = {f.name: f for f in dataclasses.fields(Config) if f.name != "source"}


def _coerce(key: str, value: Any, where: str) -> Any:
    kind = _FIELDS[key].type
    if kind == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    ok = {"str": str, "int": int, "float": float, "bool": bool}[str(kind)]
    if not isinstance(value, ok) or (ok is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: {key} must be of type {kind}, not {type(value).__name__}")
    return value


def from_mapping(data: object, where: str, lines: dict[str, int] | None = None) -> Config:
    """lines: each key's line in the file, for errors about keys not shown."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: not a YAML mapping of keys to values")
    values = {}
    for key, value in data.items():
        if key not in _FIELDS:
            if isinstance(key, str) and _TOKEN.fullmatch(key):
                raise ConfigError(f"{where}: unknown key {key!r}")
            line = (lines or {}).get(str(key))
            raise ConfigError(f"{where}: {f'line {line}: ' if line else ''}unknown key "
                              "(not a kata-py setting; not shown)")
        values[key] = _coerce(key, value, where)
    cfg = Config(**values, source=where)
    cfg.validate()
    return cfg


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """The config file's values over the defaults.

    An explicitly named file must exist; the default file is optional.
    """
    env = os.environ.get("KATA_PY_CONFIG") or None
    p = Path(path or env or paths.CONFIG)
    # The default file stays optional even when named (containerd's runtime
    # options name it); any other file named must exist.
    explicit = p != paths.CONFIG
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file {p} not found") from None
        return from_mapping({}, "defaults")
    except OSError as e:
        raise ConfigError(f"config file {p}: {e.strerror}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"{p}: not a config file (over {MAX_FILE_BYTES >> 20} MiB)")
    try:
        text = raw.decode()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start})") from None
    data, lines = _parse_yaml(text, p)
    return from_mapping(data, str(p), lines)


def _parse_yaml(text: str, p: Path) -> tuple[object, dict[str, int]]:
    """The document, and the line of each top-level key.  A syntax error
    names its line and column; PyYAML's own message would quote the text."""
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # checks the characters
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.reader.ReaderError as e:  # a control character, say
        raise ConfigError(f"{p}: not valid YAML: character {e.position} is not allowed "
                          "in YAML") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = _QUOTED.sub(_mask, str(getattr(e, "problem", "") or ""))
        raise ConfigError(f"{p}: not valid YAML{where}{': ' if problem else ''}"
                          f"{' '.join(problem.split())}") from None
    finally:
        if loader is not None:
            loader.dispose()
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode) and isinstance(data, dict):
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                lines.setdefault(key_node.value, key_node.start_mark.line + 1)
    return data, lines


# PyYAML's problems quote what they found: a character or a token of ours
# ('\t', ',', '<stream end>') may be shown, a word of the file (an alias) not.
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def _mask(m: re.Match[str]) -> str:
    inner = m.group(0)[1:-1]
    return m.group(0) if len(inner) <= 2 or re.fullmatch(r"<[a-z ]+>", inner) else "'…'"
