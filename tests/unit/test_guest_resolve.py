"""guest.container.resolve_executable: execvp's search with docker's error classes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from guest.container import (
    DEFAULT_PATH,
    ERR_NOT_EXECUTABLE,
    ERR_NOT_FOUND,
    ChildError,
    resolve_executable,
)


def exe(path: Path, mode: int = 0o755) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(mode)
    return path


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    return a, b


def test_found_in_path(dirs: tuple[Path, Path]) -> None:
    a, b = dirs
    exe(b / "prog")
    env = ["HOME=/", f"PATH={a}:{b}", "TERM=xterm"]
    assert resolve_executable("prog", env) == str(b / "prog")


def test_first_path_entry_wins(dirs: tuple[Path, Path]) -> None:
    a, b = dirs
    exe(a / "prog")
    exe(b / "prog")
    assert resolve_executable("prog", [f"PATH={a}:{b}"]) == str(a / "prog")


def test_non_executable_earlier_entry_skipped(dirs: tuple[Path, Path]) -> None:
    a, b = dirs
    exe(a / "prog", 0o644)
    (a / "other").mkdir()
    exe(b / "prog")
    assert resolve_executable("prog", [f"PATH={a}:{b}"]) == str(b / "prog")


def test_only_PATH_variable_counts(dirs: tuple[Path, Path]) -> None:
    a, b = dirs
    exe(b / "prog")
    env = [f"MYPATH={a}", f"XPATH={a}", f"PATH={b}"]
    assert resolve_executable("prog", env) == str(b / "prog")
    (b / "prog").unlink()
    exe(a / "prog")
    with pytest.raises(ChildError) as e:
        resolve_executable("prog", env)
    assert e.value.kind == ERR_NOT_FOUND


def test_absolute_path(dirs: tuple[Path, Path]) -> None:
    a, b = dirs
    p = exe(a / "prog")
    # PATH is not searched for a name with a slash.
    assert resolve_executable(str(p), [f"PATH={b}"]) == str(p)


def test_relative_path_with_slash(dirs: tuple[Path, Path],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = dirs
    exe(a / "prog")
    exe(b / "prog")
    monkeypatch.chdir(a)
    assert resolve_executable("./prog", [f"PATH={b}"]) == "./prog"


def test_empty_path_entry_is_cwd(dirs: tuple[Path, Path],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = dirs
    exe(a / "prog")
    monkeypatch.chdir(a)
    assert resolve_executable("prog", [f"PATH={b}:"]) == os.path.join(".", "prog")


def test_default_path_without_PATH() -> None:
    found = resolve_executable("sh", ["HOME=/"])
    assert os.path.basename(found) == "sh"
    assert os.path.dirname(found) in DEFAULT_PATH.split(":")


def test_not_found_in_path(dirs: tuple[Path, Path]) -> None:
    a, b = dirs
    with pytest.raises(ChildError) as e:
        resolve_executable("prog", [f"PATH={a}:{b}"])
    assert e.value.kind == ERR_NOT_FOUND
    assert str(e.value) == "prog: executable file not found in $PATH"


def test_absolute_not_found(tmp_path: Path) -> None:
    p = tmp_path / "missing"
    with pytest.raises(ChildError) as e:
        resolve_executable(str(p), ["PATH=/bin"])
    assert e.value.kind == ERR_NOT_FOUND
    assert str(e.value) == f"{p}: no such file or directory"


def test_empty_command() -> None:
    with pytest.raises(ChildError) as e:
        resolve_executable("", ["PATH=/bin"])
    assert e.value.kind == ERR_NOT_FOUND


def test_absolute_directory(tmp_path: Path) -> None:
    with pytest.raises(ChildError) as e:
        resolve_executable(str(tmp_path), ["PATH=/bin"])
    assert e.value.kind == ERR_NOT_EXECUTABLE
    assert "is a directory" in str(e.value)


def test_directory_in_path(dirs: tuple[Path, Path]) -> None:
    a, b = dirs
    (a / "prog").mkdir()
    with pytest.raises(ChildError) as e:
        resolve_executable("prog", [f"PATH={a}:{b}"])
    assert e.value.kind == ERR_NOT_EXECUTABLE
    assert str(e.value) == "prog: is a directory"


def test_absolute_non_executable(tmp_path: Path) -> None:
    p = exe(tmp_path / "data", 0o644)
    with pytest.raises(ChildError) as e:
        resolve_executable(str(p), ["PATH=/bin"])
    assert e.value.kind == ERR_NOT_EXECUTABLE
    assert str(e.value) == f"{p}: permission denied"


def test_non_executable_in_path(dirs: tuple[Path, Path]) -> None:
    a, b = dirs
    exe(b / "prog", 0o600)
    with pytest.raises(ChildError) as e:
        resolve_executable("prog", [f"PATH={a}:{b}"])
    assert e.value.kind == ERR_NOT_EXECUTABLE
    assert str(e.value) == "prog: permission denied"
