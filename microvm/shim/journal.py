"""The events each shim publishes, also kept on the host for `microvm events`.

containerd is the event hub for its own shims; the CLI has none, so every
shim appends each event it publishes, as one JSON line, to
/run/kata-py/events/<namespace>.jsonl (one write per line, O_APPEND: lines
from many shims never interleave).  A journal that passes MAX_BYTES is
renamed to .1, replacing the one before: two generations at most.  It is
on tmpfs: a reboot ends it, as it ends every container it speaks of.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from microvm import paths

log = logging.getLogger(__name__)

MAX_BYTES = 4 << 20


def path(namespace: str) -> Path:
    return paths.RUN / "events" / f"{namespace}.jsonl"


# What the journal keeps of a container's annotations, as docker's event
# attributes: the CLI's (detached.py writes them) and CRI's.
ANNOTATIONS = {"io.containerd.kata-py.image": "image", "io.kubernetes.cri.image-name": "image",
               "io.containerd.kata-py.id": "id"}


def attributes(annotations: dict[str, str]) -> dict[str, str]:
    return {name: annotations[key] for key, name in ANNOTATIONS.items() if key in annotations}


def write(namespace: str, topic: str, event: Message, when: float | None = None,
          attributes: dict[str, str] | None = None) -> None:
    """Best effort: a full disk must not fail the call that caused the event."""
    line = json.dumps({"time": time.time() if when is None else when, "namespace": namespace,
                       "topic": topic, "attributes": attributes or {},
                       "event": json_format.MessageToDict(event, preserving_proto_field_name=True)},
                      separators=(",", ":")) + "\n"
    p = path(namespace)
    try:
        p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, line.encode())
            if os.fstat(fd).st_size > MAX_BYTES:
                os.replace(p, p.with_name(p.name + ".1"))
        finally:
            os.close(fd)
    except OSError as e:
        log.warning("event journal %s: %s", p, e)


def read(namespace: str) -> list[dict[str, Any]]:
    """Every event still kept, oldest first."""
    out: list[dict[str, Any]] = []
    p = path(namespace)
    for f in (p.with_name(p.name + ".1"), p):
        try:
            text = f.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a crash mid-write
    return out
