"""Who owns a record left on disk: a pid and that process's start time.

A pid alone may be reused after its process dies; with the start time it
names one process for good, so a record whose owner is gone can be told
from a live one after any crash.
"""

from __future__ import annotations

import os


def start_time(pid: int) -> str:
    """A process's start time (clock ticks since boot); "" if it is gone,
    or dead and waiting to be reaped (a SIGKILLed shim's parent may not
    have got to it yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return ""
    fields = stat[stat.rindex(")") + 2:].split()
    return "" if fields[0] in ("Z", "X") else fields[19]


def me() -> tuple[int, str]:
    pid = os.getpid()
    return pid, start_time(pid)


def alive(pid: object, started: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    now = start_time(pid)
    return bool(now) and now == started
