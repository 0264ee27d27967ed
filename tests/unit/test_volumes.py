"""Volumes: docker's -v, the OCI spec's mounts, and the guest's symlink-safe join."""

from __future__ import annotations

from pathlib import Path

import pytest

from guest.container import secure_join
from microvm.core.volumes import Volume, from_oci, parse_volume
from microvm.errors import KataError


def test_parse_volume_makes_the_host_dir(tmp_path: Path) -> None:
    v = parse_volume(f"{tmp_path}/new:/data/:ro")
    assert v == Volume("/data", str(tmp_path / "new"), "bind", True)
    assert (tmp_path / "new").is_dir()
    with pytest.raises(KataError, match="not /"):
        parse_volume(f"{tmp_path}:/")


def test_from_oci_keeps_binds_and_tmpfs_skips_what_the_guest_makes() -> None:
    spec = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["mode=755"]},
        {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/x/hosts",
         "options": ["rbind", "rprivate", "ro"]},
        {"destination": "/data", "source": "/srv/data", "options": ["rbind"]},
        {"destination": "/scratch", "type": "tmpfs", "options": ["nosuid", "size=1m"]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup"},
    ]
    assert from_oci(spec) == [
        Volume("/etc/hosts", "/var/lib/x/hosts", "bind", True),
        Volume("/data", "/srv/data", "bind", False, propagation="slave"),  # runc's default
        Volume("/scratch", "", "tmpfs", False, ("size=1m",)),
    ]


@pytest.mark.parametrize("options, want", [
    (["rbind", "rprivate"], "private"), (["rbind", "rslave"], "slave"),
    (["rbind", "rshared"], "shared"), (["bind", "slave", "private"], "private")])
def test_from_oci_keeps_propagation(options: list[str], want: str) -> None:
    [v] = from_oci([{"destination": "/d", "source": "/s", "options": options}])
    assert v.propagation == want


def test_parse_volume_takes_dockers_propagation(tmp_path: Path) -> None:
    assert parse_volume(f"{tmp_path}:/d").propagation == "private"  # docker's default
    v = parse_volume(f"{tmp_path}:/d:ro,rslave")
    assert (v.readonly, v.propagation) == (True, "slave")
    with pytest.raises(KataError, match="unknown option 'rsalve'"):
        parse_volume(f"{tmp_path}:/d:rsalve")


@pytest.mark.parametrize("bad, message", [
    (["x"], "not an object"),
    ([{"destination": "rel"}], "destination must be an absolute path"),
    ([{"destination": "/d", "type": "bind", "source": "rel"}], "source must be an absolute"),
    ([{"destination": "/d", "options": "ro"}], "options a list of strings"),
])
def test_from_oci_names_the_bad_field(bad: list[object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        from_oci(bad)


def test_secure_join_resolves_links_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "abs").symlink_to("/etc")
    (root / "up").symlink_to("../../../..")
    (root / "etc/loop").symlink_to("/etc/loop")
    r = str(root)
    assert secure_join(r, "/abs/x") == f"{r}/etc/x"
    assert secure_join(r, "/up/etc") == f"{r}/etc"
    assert secure_join(r, "/../../x") == f"{r}/x"
    assert secure_join(r, "/new/dir") == f"{r}/new/dir"
    with pytest.raises(Exception, match="too many symbolic links"):
        secure_join(r, "/etc/loop/x")
