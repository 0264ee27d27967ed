"""`microvm events`: container lifecycle events as docker prints them.

Read from the journal every shim keeps (shim/journal.py), so the events are
exactly those the shim publishes to containerd, in docker's words:
create, start, die (with exitCode), oom, destroy, pause, unpause,
exec_create, exec_start, exec_die.  Like docker, it prints what happens from
now on until interrupted; --since and --until bound it.
"""

from __future__ import annotations

import datetime
import json
import re
import time
from collections.abc import Iterator
from typing import Any

from microvm.cli import detached
from microvm.errors import KataError
from microvm.shim import journal

ACTIONS = {"/tasks/create": "create", "/tasks/start": "start", "/tasks/exit": "die",
           "/tasks/oom": "oom", "/tasks/delete": "destroy", "/tasks/paused": "pause",
           "/tasks/resumed": "unpause", "/tasks/exec-added": "exec_create",
           "/tasks/exec-started": "exec_start"}
_SPAN = re.compile(r"(\d+(?:\.\d+)?)(s|m|h)")
POLL = 0.2


def when(text: str, now: float) -> float:
    """docker's --since/--until: a span back from now (10m, 1.5h, 30s), seconds
    since the epoch, or an RFC 3339 time."""
    if m := _SPAN.fullmatch(text):
        return now - float(m[1]) * {"s": 1, "m": 60, "h": 3600}[m[2]]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise KataError(f"invalid time {text!r}: give 10m, 1h, seconds since the epoch "
                        "or an RFC 3339 time") from None


class Namer:
    """The ID and image docker would show for a container id, from the CLI's
    records (looked up again when an unknown id shows up)."""

    def __init__(self) -> None:
        self._metas: dict[str, detached.Meta] = {}

    def __call__(self, cid: str) -> tuple[str, str]:
        if cid not in self._metas:
            self._metas = {m.name: m for m in _metas()}
        meta = self._metas.get(cid)
        return (meta.id, meta.image_arg or meta.image) if meta else (cid, "")


def _metas() -> Iterator[detached.Meta]:
    root = detached.root()
    for p in root.glob("*/meta.json") if root.exists() else []:
        try:
            yield detached.read_meta(p)
        except (OSError, ValueError, TypeError):
            continue


def docker_event(rec: dict[str, Any], namer: Namer) -> dict[str, Any] | None:
    """A journal record as docker's JSON event; None for topics docker has no word for."""
    action = ACTIONS.get(str(rec.get("topic")))
    if action is None:
        return None
    ev = rec.get("event") or {}
    cid = str(ev.get("container_id", ""))
    attrs = {"name": cid}
    if action == "die":
        if ev.get("id") and ev["id"] != cid:
            action = "exec_die"
            attrs["execID"] = str(ev["id"])
        attrs["exitCode"] = str(ev.get("exit_status", 0))
    elif action.startswith("exec_"):
        attrs["execID"] = str(ev.get("exec_id", ""))
    known = rec.get("attributes") or {}
    ident, image = (known["id"], known.get("image", "")) if known.get("id") else namer(cid)
    image = known.get("image") or image
    if image:
        attrs["image"] = image
    t = float(rec.get("time", 0.0))
    return {"status": action, "id": ident, "from": image, "Type": "container",
            "Action": action, "Actor": {"ID": ident, "Attributes": attrs}, "scope": "local",
            "time": int(t), "timeNano": int(t * 1e9)}


def line(e: dict[str, Any]) -> str:
    t = datetime.datetime.fromtimestamp(e["timeNano"] / 1e9).astimezone()
    stamp = t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{e['timeNano'] % 1_000_000_000:09d}" \
        + t.strftime("%z")[:3] + ":" + t.strftime("%z")[3:]
    attrs = ", ".join(f"{k}={v}" for k, v in sorted(e["Actor"]["Attributes"].items()))
    return f"{stamp} container {e['Action']} {e['id']} ({attrs})"


def follow(namespace: str, since: float, until: float | None) -> Iterator[dict[str, Any]]:
    """Journal records from since on, waiting for more until until (forever
    when None).  Each is told once, whatever the journal's rotations: the
    journal is read on from where the last poll stopped."""
    namer = Namer()
    tail = journal.Tail(namespace)
    while True:
        for rec in tail.read():
            t = float(rec.get("time", 0))
            if t < since:
                continue
            if until is not None and t > until:
                return
            e = docker_event(rec, namer)
            if e is not None:
                yield e
        if until is not None and time.time() > until:
            return
        time.sleep(POLL)


def emit(e: dict[str, Any], as_json: bool) -> str:
    return json.dumps(e) if as_json else line(e)
