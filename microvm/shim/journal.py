"""The events each shim publishes, also kept on the host for `microvm events`.

containerd is the event hub for its own shims; the CLI has none, so every
shim appends each event it publishes, as one JSON line, to
/run/kata-py/events/<namespace>.jsonl (one write per line, O_APPEND: lines
from many shims never interleave).  A journal that passes MAX_BYTES is
renamed to .1, replacing the one before: two generations at most.  It is
on tmpfs: a reboot ends it, as it ends every container it speaks of.
"""

from __future__ import annotations

import contextlib
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


def _records(data: bytes) -> list[dict[str, Any]]:
    out = []
    for line in data.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a crash mid-write
    return out


class Tail:
    """The journal as it grows, for `microvm events` following it: each
    read() returns only what was appended since the last, reading on from
    where it stopped (across a rotation: the rest of the file that became
    .1, then the new one), so each record is read and parsed once."""

    def __init__(self, namespace: str) -> None:
        self.path = path(namespace)
        self._started = False
        self._inode = 0  # of the file being read; 0: none yet
        self._offset = 0
        self._partial = b""

    def _rest(self, f: Path) -> bytes:
        """f's complete lines from where reading stopped."""
        with open(f, "rb") as fh:
            fh.seek(self._offset)
            new = fh.read()
        self._offset += len(new)
        data, sep, self._partial = (self._partial + new).rpartition(b"\n")
        return data + sep

    def read(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        older = self.path.with_name(self.path.name + ".1")
        try:
            inode = os.stat(self.path).st_ino
        except OSError:
            inode = 0
        if not self._started:  # the first read: the older generation whole
            self._started = True
            with contextlib.suppress(OSError):
                out += _records(older.read_bytes())
        elif self._inode and inode != self._inode:  # rotated: what was read is .1 now
            try:
                if os.stat(older).st_ino == self._inode:
                    out += _records(self._rest(older))
            except OSError:
                pass
            self._offset, self._partial = 0, b""
        self._inode = inode
        if inode:
            with contextlib.suppress(OSError):
                out += _records(self._rest(self.path))
        return out


def read(namespace: str) -> list[dict[str, Any]]:
    """Every event still kept, oldest first."""
    out: list[dict[str, Any]] = []
    p = path(namespace)
    for f in (p.with_name(p.name + ".1"), p):
        try:
            out += _records(f.read_bytes())
        except OSError:
            continue
    return out
