"""microvm.net.tcfilter's claims: which plumbing prune may undo.

Only the bookkeeping runs here (no namespace is touched: the claimed
namespaces are gone or replaced); tests/integration/test_network.py undoes
a real redirect a SIGKILLed CLI left in a CNI namespace.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from microvm import owner, paths
from microvm.net import tcfilter


def _write(d: Path, name: str, **claim: object) -> Path:
    f = d / name
    f.write_text(json.dumps(claim))
    return f


def test_prune_keeps_live_owners_claims_and_drops_the_rest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(paths, "RUN", tmp_path)
    d = tcfilter.claims_dir()
    d.mkdir()
    pid, started = owner.me()
    dead = subprocess.Popen(["true"])
    dead_started = owner.start_time(dead.pid)
    dead.wait()
    ns = os.stat("/proc/self/ns/net")
    live = _write(d, f"{pid}-{started}-1", path="/proc/self/ns/net", dev=ns.st_dev,
                  ino=ns.st_ino, pid=pid, started=started)
    gone_ns = _write(d, f"{dead.pid}-{dead_started}-2", path=str(tmp_path / "no-such-ns"),
                     dev=1, ino=2, pid=dead.pid, started=dead_started)
    # The path now names something else: never touched, only forgotten.
    other = tmp_path / "other"
    other.write_text("")
    replaced = _write(d, f"{dead.pid}-{dead_started}-3", path=str(other), dev=1, ino=3,
                      pid=dead.pid, started=dead_started)
    # Our own pid with a start time that is not ours: a reused pid.
    reused = _write(d, f"{pid}-1-4", path=str(tmp_path / "no-such-ns"), dev=1, ino=4,
                    pid=pid, started="1")
    torn = d / f"{dead.pid}-{dead_started}-5"
    torn.write_text('{"path": ')
    writing = d / f".{pid}-{started}-6"  # not a claim until renamed
    writing.write_text("")

    assert tcfilter.prune_claims() == []
    assert sorted(d.iterdir()) == sorted([live, writing])
    for f in (gone_ns, replaced, reused, torn):
        assert not f.exists()
