"""The events journal the shims keep, and `microvm events`' reading of it."""

from __future__ import annotations

from pathlib import Path

import pytest

from microvm import paths
from microvm.cli import events
from microvm.errors import KataError
from microvm.protocol import events_pb2
from microvm.shim import journal


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(paths, "RUN", tmp_path)
    return tmp_path


def test_records_survive_one_rotation_and_a_torn_line(run: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal, "MAX_BYTES", 300)
    for i in range(6):
        journal.write("ns", "/tasks/start", events_pb2.TaskStart(container_id=f"c{i}", pid=i),
                      when=float(i), attributes={"image": "busybox"})
    with open(journal.path("ns"), "a") as f:
        f.write('{"time": 9, "top')  # a writer killed mid-line
    got = journal.read("ns")
    # Rotation keeps the newer half: at most two generations, oldest first.
    assert [r["time"] for r in got] == sorted(r["time"] for r in got)
    assert got[-1]["event"] == {"container_id": "c5", "pid": 5}
    assert 2 <= len(got) < 6 and (run / "events" / "ns.jsonl.1").exists()
    assert oct((run / "events").stat().st_mode & 0o777) == "0o700"


def test_docker_words_for_each_topic(run: Path) -> None:
    def one(topic: str, **ev: object) -> dict[str, object] | None:
        return events.docker_event({"time": 1.5, "topic": topic, "event": ev,
                                    "attributes": {"id": "f" * 64, "image": "busybox"}},
                                   events.Namer())
    die = one("/tasks/exit", container_id="web", id="web", exit_status=3)
    assert die is not None and die["Action"] == "die"
    assert die["Actor"] == {"ID": "f" * 64, "Attributes": {
        "name": "web", "exitCode": "3", "image": "busybox"}}
    assert die["timeNano"] == 1_500_000_000 and die["from"] == "busybox"
    exec_die = one("/tasks/exit", container_id="web", id="e1", exit_status=0)
    assert exec_die is not None and exec_die["Action"] == "exec_die"
    assert exec_die["Actor"]["Attributes"]["execID"] == "e1"  # type: ignore[index]
    assert one("/tasks/oom", container_id="web")["Action"] == "oom"  # type: ignore[index]
    assert one("/tasks/checkpointed", container_id="web") is None
    line = events.line(die)
    assert " container die " + "f" * 64 + " (exitCode=3, image=busybox, name=web)" in line


def test_times_as_docker_takes_them() -> None:
    assert events.when("10m", 1000.0) == 400.0
    assert events.when("1.5h", 10000.0) == 10000.0 - 5400
    assert events.when("1700000000", 0) == 1700000000.0
    assert events.when("2026-12-04T00:00:00Z", 0) == 1796342400.0
    with pytest.raises(KataError, match="invalid time"):
        events.when("yesterday", 0)


def test_follow_tells_each_record_once_and_stops_at_until(run: Path) -> None:
    for i in range(3):
        journal.write("ns", "/tasks/create", events_pb2.TaskCreate(container_id="c"),
                      when=100.0 + i)
    got = list(events.follow("ns", 101.0, 500.0))
    assert [e["time"] for e in got] == [101, 102]


def test_tail_reads_each_record_once_across_a_rotation_and_a_torn_write(
        run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal, "MAX_BYTES", 400)
    tail = journal.Tail("ns")
    assert tail.read() == []  # no journal yet

    def write(i: int) -> None:
        journal.write("ns", "/tasks/start", events_pb2.TaskStart(container_id=f"c{i}"),
                      when=float(i))

    seen: list[float] = []
    for i in range(12):  # several rotations (about 3 records per file)
        write(i)
        if i % 2:
            seen += [r["time"] for r in tail.read()]
    with open(journal.path("ns"), "a") as f:
        f.write('{"time": 99, "to')  # a line still being written
    seen += [r["time"] for r in tail.read()]
    with open(journal.path("ns"), "a") as f:
        f.write('pic": "/tasks/start", "event": {}}\n')
    seen += [r["time"] for r in tail.read()]
    assert seen == [float(i) for i in range(12)] + [99.0]
    assert tail.read() == []
