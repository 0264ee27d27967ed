"""`microvm install containerd`: register the kata-py runtime with containerd.

The file is edited as text -- our table appended -- so comments, order and
formatting of everything else stay exactly as they were; the result is
parsed back to prove it is valid TOML that says what we meant before it
replaces the file (atomically, keeping its mode).
"""

from __future__ import annotations

import difflib
import os
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from microvm import paths
from microvm.errors import KataError

HANDLER = "kata-py"
# RuntimeClass kata-py-secure: the same shim, with the secure flavour's
# config file (docs/secure-boot.md).
SECURE_HANDLER = "kata-py-secure"
RUNTIME_TYPE = "io.containerd.kata-py.v2"
DEFAULT_CONFIG = Path("/etc/containerd/config.toml")

# Where CRI keeps its runtimes, by containerd config version.
_CRI_PLUGIN = {1: "cri", 2: "io.containerd.grpc.v1.cri", 3: "io.containerd.cri.v1.runtime"}


def _runtimes(doc: dict[str, Any], version: int) -> dict[str, Any]:
    plugin = doc.get("plugins", {}).get(_CRI_PLUGIN[version], {})
    runtimes = plugin.get("containerd", {}).get("runtimes", {})
    return runtimes if isinstance(runtimes, dict) else {}


# Our whole addition sits between these lines, so uninstall removes exactly it.
BEGIN = "# BEGIN kata-py (added by `microvm install containerd`; " \
        "`microvm uninstall containerd` removes it)"
END = "# END kata-py"


def _block(version: int, config_path: Path, secure_config: Path) -> str:
    out = ""
    for handler, config, why in (
            (HANDLER, config_path, "runs in its own microVM"),
            (SECURE_HANDLER, secure_config, "boots with Secure Boot, its boot measured")):
        table = f'plugins."{_CRI_PLUGIN[version]}".containerd.runtimes.{handler}'
        out += (f"# Every pod with runtimeClassName: {handler} {why}.\n"
                f"[{table}]\n"
                f'  runtime_type = "{RUNTIME_TYPE}"\n'
                f"[{table}.options]\n"
                f'  ConfigPath = "{config}"\n')
    return out


def _default_runtime_block(doc: dict[str, Any], version: int) -> str:
    """containerd replaces its built-in runtimes table with the file's: a
    file naming only ours would lose runc, and CRI refuses to load when its
    default runtime is missing.  So runc is written out too when absent."""
    cri = doc.get("plugins", {}).get(_CRI_PLUGIN[version], {})
    containerd = cri.get("containerd", {}) if isinstance(cri, dict) else {}
    default = containerd.get("default_runtime_name", "runc") \
        if isinstance(containerd, dict) else "runc"
    if default != "runc" or "runc" in _runtimes(doc, version):
        return ""
    table = f'plugins."{_CRI_PLUGIN[version]}".containerd.runtimes.runc'
    return (f"# containerd's default runtime, kept: a runtimes table in this file\n"
            f"# replaces containerd's built-in one.\n"
            f"[{table}]\n"
            f'  runtime_type = "io.containerd.runc.v2"\n')


def plan(text: str, where: str, config_path: Path = paths.CONFIG,
         secure_config: Path | None = None) -> str | None:
    """The new file text, or None when the runtime is already there."""
    secure_config = secure_config or paths.SECURE_CONFIG
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise KataError(f"{where}: not valid TOML: {e}") from None
    version = doc.get("version", 1 if text.strip() else 2)
    if version not in _CRI_PLUGIN:
        raise KataError(f"{where}: unsupported containerd config version {version!r}")
    existing = _runtimes(doc, version).get(HANDLER)
    if existing is not None:
        if isinstance(existing, dict) and existing.get("runtime_type") == RUNTIME_TYPE:
            if SECURE_HANDLER in _runtimes(doc, version) or BEGIN not in text.splitlines():
                return None
            # Our block from before kata-py-secure: made again, whole.
            older = unplan(text, where)
            assert older is not None
            return plan(older, where, config_path, secure_config)
        raise KataError(f"{where}: a runtime named {HANDLER} exists with runtime_type "
                        f"{existing.get('runtime_type') if isinstance(existing, dict) else '?'}"
                        f"; not changing it")
    new = text if text.strip() else "version = 2\n"
    if new and not new.endswith("\n"):
        new += "\n"
    new += (f"\n{BEGIN}\n" + _default_runtime_block(doc, version)
            + _block(version, config_path, secure_config) + f"{END}\n")
    try:
        check = _runtimes(tomllib.loads(new), version).get(HANDLER, {})
    except tomllib.TOMLDecodeError as e:
        raise KataError(f"{where}: adding the runtime would break the file ({e}); "
                        "add it by hand") from None
    if check.get("runtime_type") != RUNTIME_TYPE:
        raise KataError(f"{where}: the runtime table did not take effect; add it by hand")
    return new


def unplan(text: str, where: str) -> str | None:
    """The file without our section, or None when it has none."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.rstrip("\n") == BEGIN]
    if not starts:
        doc = tomllib.loads(text)
        version = doc.get("version", 2)
        if version in _CRI_PLUGIN and HANDLER in _runtimes(doc, version):
            raise KataError(f"{where}: the {HANDLER} runtime was not added by `microvm install "
                            "containerd` (no BEGIN kata-py line); remove it by hand")
        return None
    start = starts[0]
    try:
        end = next(i for i in range(start, len(lines)) if lines[i].rstrip("\n") == END)
    except StopIteration:
        raise KataError(f"{where}: '{BEGIN}' has no '{END}' line; fix it by hand") from None
    if start > 0 and not lines[start - 1].strip():
        start -= 1  # the blank line install put before it
    return "".join(lines[:start] + lines[end + 1:])


def _replace(path: Path, new: str) -> None:
    """Atomically, keeping the file's mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o7777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(new)
        os.chmod(tmp, mode)
        os.rename(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def uninstall_containerd(path: Path = DEFAULT_CONFIG, dry_run: bool = False) -> str:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return f"{path}: no such file; nothing to do"
    except OSError as e:
        raise KataError(f"{path}: {e.strerror}") from None
    try:
        new = unplan(text, str(path))
    except tomllib.TOMLDecodeError as e:
        raise KataError(f"{path}: not valid TOML: {e}") from None
    if new is None:
        return f"{path}: the {HANDLER} runtime is not installed; nothing to do"
    if dry_run:
        return "".join(difflib.unified_diff(text.splitlines(keepends=True),
                                            new.splitlines(keepends=True),
                                            fromfile=str(path), tofile=str(path))).rstrip("\n")
    _replace(path, new)
    return f"{path}: removed the {HANDLER} runtime; restart containerd"


SECURE_CONFIG_TEXT = """\
# kata-py's config for RuntimeClass kata-py-secure (written by `microvm
# install containerd`; keys as in config.yaml, docs/config.md).  This file
# is read instead of config.yaml, so repeat here what you set there.
firmware: secure
"""


def install_containerd(path: Path = DEFAULT_CONFIG, dry_run: bool = False,
                       config_path: Path = paths.CONFIG,
                       secure_config: Path | None = None) -> str:
    """Apply (or with dry_run, show) the change; returns what to tell the user.
    secure_config: kata-py-secure's config file (paths.SECURE_CONFIG),
    written if missing."""
    secure_config = secure_config or paths.SECURE_CONFIG
    try:
        text = path.read_text()
    except FileNotFoundError:
        text = ""
    except OSError as e:
        raise KataError(f"{path}: {e.strerror}") from None
    new = plan(text, str(path), config_path, secure_config)
    if new is None:
        return f"{path}: the {HANDLER} runtime is already installed; nothing to do"
    diff = "".join(difflib.unified_diff(text.splitlines(keepends=True),
                                        new.splitlines(keepends=True),
                                        fromfile=str(path), tofile=str(path)))
    if dry_run:
        return diff.rstrip("\n")
    _replace(path, new)
    if not secure_config.exists():
        _replace(secure_config, SECURE_CONFIG_TEXT)
    return (f"{path}: added the {HANDLER} and {SECURE_HANDLER} runtimes ({RUNTIME_TYPE}); "
            "restart containerd to use them")
