"""microvm.images.save: the output file appears whole or not at all."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from microvm.images import save


def test_a_killed_save_leaves_nothing(tmp_path: Path) -> None:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            with save._replacing(tmp_path / "out.tar") as f:
                f.write(b"x" * 4096)
                f.flush()
                os.write(w, b"1")
                signal.pause()
        finally:
            os._exit(1)
    os.close(w)
    assert os.read(r, 1) == b"1"
    os.close(r)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert os.listdir(tmp_path) == []


def test_a_failed_save_leaves_the_old_file(tmp_path: Path) -> None:
    out = tmp_path / "out.tar"
    out.write_bytes(b"old")
    with pytest.raises(RuntimeError), save._replacing(out) as f:
        f.write(b"new, half")
        raise RuntimeError("disk full")
    assert out.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.tar"]
    with save._replacing(out) as f:
        f.write(b"new")
    assert out.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["out.tar"]
