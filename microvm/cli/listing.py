"""`microvm ps` as docker words it: its columns, its times, and --format.

--format takes docker's Go-template habit for the common fields:
`{{.Names}}\\t{{.Status}}`, with `table` in front for a header and aligned
columns.  Only field references are understood (no functions, no
conditions): anything else is one clear error.
"""

from __future__ import annotations

import json
import re
import time

from microvm.cli.detached import Listed
from microvm.errors import KataError

DEFAULT = "table {{.ID}}\t{{.Image}}\t{{.Command}}\t{{.RunningFor}}\t{{.Status}}\t{{.Ports}}\t" \
          "{{.Names}}"
HEADERS = {"ID": "CONTAINER ID", "Image": "IMAGE", "Command": "COMMAND",
           "CreatedAt": "CREATED AT", "RunningFor": "CREATED", "Ports": "PORTS",
           "State": "STATE", "Status": "STATUS", "Names": "NAMES", "Labels": "LABELS"}
_FIELD = re.compile(r"\{\{\s*\.(\w+)\s*\}\}")
_ANY = re.compile(r"\{\{.*?\}\}")


def human_duration(seconds: float) -> str:
    """docker's (go-units HumanDuration) words for a span of time."""
    s = int(seconds)
    if s < 1:
        return "Less than a second"
    if s == 1:
        return "1 second"
    if s < 60:
        return f"{s} seconds"
    minutes = s // 60
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = round(seconds / 3600)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{hours // 24 // 365} years"


def fields(c: Listed, now: float) -> dict[str, str]:
    m = c.meta
    command = " ".join(m.command)
    if len(command) > 20:  # docker cuts it to 20 characters, then quotes it
        command = command[:19] + "…"
    command = json.dumps(command, ensure_ascii=False)
    if c.status == "running":
        status = f"Up {human_duration(now - m.created)}"
    elif c.status == "paused":
        status = f"Up {human_duration(now - m.created)} (Paused)"
    elif c.status == "exited":
        status = f"Exited ({c.exit_status})"
        if c.exited_at:
            status += f" {human_duration(now - c.exited_at)} ago"
    elif c.status == "gone":
        status = "Dead"  # its shim is gone: nothing serves it any more
    else:
        status = "Created"
    return {
        "ID": m.id[:12], "Image": m.image_arg or m.image or m.rootfs, "Command": command,
        "CreatedAt": time.strftime("%Y-%m-%d %H:%M:%S %z %Z", time.localtime(m.created)),
        "RunningFor": f"{human_duration(now - m.created)} ago",
        "Ports": ", ".join(m.ports), "State": {"gone": "dead"}.get(c.status, c.status),
        "Status": status, "Names": m.name,
        "Labels": ",".join(f"{k}={v}" for k, v in sorted(m.labels.items())),
    }


def render(template: str, rows: list[dict[str, str]]) -> list[str]:
    """Lines for template over rows: docker's `table` prefix gives a header
    and columns padded as its tabwriter pads them (at least 10 wide, 3 apart)."""
    table = template.startswith("table ") or template == "table"
    template = template.removeprefix("table").strip() if table else template
    template = template.replace("\\t", "\t").replace("\\n", "\n")
    for bad in _ANY.findall(template):
        m = _FIELD.fullmatch(bad)
        if not m:
            raise KataError(f"--format: {bad}: only field references such as "
                            "{{.Names}} are understood")
        if m[1] not in HEADERS:
            raise KataError(f"--format: no field {m[1]} (known: {', '.join(HEADERS)})")

    def fill(values: dict[str, str]) -> str:
        return _FIELD.sub(lambda m: values[m[1]], template)

    lines = [fill(r) for r in rows]
    if not table:
        return lines
    lines.insert(0, fill(HEADERS))
    cells = [line.split("\t") for line in lines]
    widths = [max(max(len(c[i]) for c in cells if i < len(c)) + 3, 10)
              for i in range(max(len(c) for c in cells))]
    return ["".join(v.ljust(widths[i]) if i < len(c) - 1 else v for i, v in enumerate(c))
            for c in cells]
