"""`microvm ps` in docker's words: times, status, the default table and --format."""

from __future__ import annotations

import pytest

from microvm.cli import listing
from microvm.cli.detached import Listed, Meta
from microvm.errors import KataError


@pytest.mark.parametrize("seconds,words", [
    (0.4, "Less than a second"), (1, "1 second"), (59, "59 seconds"), (60, "About a minute"),
    (119, "About a minute"), (120, "2 minutes"), (3599, "59 minutes"),
    (3600, "About an hour"), (2 * 3600, "2 hours"), (47 * 3600, "47 hours"),
    (3 * 86400, "3 days"), (20 * 86400, "2 weeks"), (90 * 86400, "3 months"),
    (800 * 86400, "2 years")])
def test_human_duration_as_go_units(seconds: float, words: str) -> None:
    assert listing.human_duration(seconds) == words


def listed(status: str, **kw: object) -> Listed:
    meta = Meta("web", "/layers/x", ["sh", "-c", "sleep 1000 & sleep 1000 & wait"], 1000.0,
                image="docker.io/library/busybox:latest", image_arg="busybox",
                ports=["127.0.0.1:8080->80/tcp"])
    return Listed(meta, status, **kw)  # type: ignore[arg-type]


def test_fields() -> None:
    f = listing.fields(listed("running"), 1000.0 + 125)
    assert f["Image"] == "busybox"  # as the user named it, not the resolved reference
    assert f["Status"] == "Up 2 minutes" and f["RunningFor"] == "2 minutes ago"
    assert f["Command"] == '"sh -c sleep 1000 & …"'  # 19 characters and …
    assert len(f["ID"]) == 12 and f["Ports"] == "127.0.0.1:8080->80/tcp"
    gone = listing.fields(listed("exited", exit_status=3, exited_at=1100.0), 1160.0)
    assert (gone["State"], gone["Status"]) == ("exited", "Exited (3) About a minute ago")
    assert listing.fields(listed("gone"), 1.0)["State"] == "dead"
    assert listing.fields(listed("paused"), 1001.0)["Status"] == "Up 1 second (Paused)"


def test_the_default_table_lines_up_as_dockers() -> None:
    rows = [listing.fields(listed("running"), 1010.0)]
    header, line = listing.render(listing.DEFAULT, rows)
    assert header.split("   ")[0] == "CONTAINER ID"
    for column in ("IMAGE", "COMMAND", "CREATED", "STATUS", "PORTS", "NAMES"):
        assert line[header.index(column):].split("  ")[0] == rows[0][
            {"IMAGE": "Image", "COMMAND": "Command", "CREATED": "RunningFor",
             "STATUS": "Status", "PORTS": "Ports", "NAMES": "Names"}[column]]


def test_format_without_table_is_one_line_each_and_tabs_are_tabs() -> None:
    rows = [listing.fields(listed("running"), 1010.0)]
    assert listing.render("{{.Names}}\\t{{ .State }}", rows) == ["web\trunning"]
    assert listing.render("{{.Names}}", []) == []


@pytest.mark.parametrize("bad", ["{{.Nope}}", "{{json .}}", "{{.Names | upper}}"])
def test_what_format_does_not_know_is_one_error(bad: str) -> None:
    with pytest.raises(KataError, match="--format"):
        listing.render(bad, [])
