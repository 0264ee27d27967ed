"""microvm.images.rootfs.lookup_user: docker's -u USER[:GROUP] against the rootfs's files."""

from __future__ import annotations

from pathlib import Path

import pytest

from microvm.errors import KataError
from microvm.images.rootfs import lookup_user

PASSWD = """\
root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
# carol:x:2000:2000::/home/carol:/bin/sh
alice:x:1000:1000:Alice:/home/alice:/bin/sh
bob:x:1001:100::/home/bob:/bin/sh
al:x:1002:1002::/home/al:/bin/sh
odd:x:1003:notanumber::/:/bin/sh

nobody:x:65534:65534:nobody:/nonexistent:/bin/false
"""

GROUP = """\
root:x:0:
daemon:x:1:
users:x:100:alice,bob
wheel:x:10:alice,bob
audio:x:29:bob
staff:x:50:
alice:x:1000:
al:x:1002:
# secret:x:77:alice
nogroup:x:65534:
"""


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text(PASSWD)
    (tmp_path / "etc/group").write_text(GROUP)
    return tmp_path


@pytest.mark.parametrize(("spec", "expected"), [
    ("0", (0, 0, [])),
    ("root", (0, 0, [])),
    ("1", (1, 1, [])),
    # Supplementary groups: membership lists, minus the primary group.
    ("1000", (1000, 1000, [10, 100])),
    ("alice", (1000, 1000, [10, 100])),
    ("bob", (1001, 100, [10, 29])),           # bob is listed in his primary group too
    ("65534", (65534, 65534, [])),
])
def test_user(rootfs: Path, spec: str, expected: tuple[int, int, list[int]]) -> None:
    assert lookup_user(rootfs, spec) == expected


@pytest.mark.parametrize(("spec", "uid", "gid"), [
    ("1000:50", 1000, 50),
    ("alice:staff", 1000, 50),
    ("alice:users", 1000, 100),
    ("bob:audio", 1001, 29),
    ("bob:1000", 1001, 1000),
    ("0:0", 0, 0),
    ("root:nogroup", 0, 65534),
    ("1001:4242", 1001, 4242),    # a numeric gid needs no entry
])
def test_user_and_group(rootfs: Path, spec: str, uid: int, gid: int) -> None:
    assert lookup_user(rootfs, spec)[:2] == (uid, gid)


@pytest.mark.parametrize("spec", ["alice:staff", "1000:50", "alice:users", "bob:audio"])
def test_explicit_group_has_no_supplementary_groups(rootfs: Path, spec: str) -> None:
    assert lookup_user(rootfs, spec)[2] == []


def test_numeric_uid_without_entry(rootfs: Path) -> None:
    # docker runs an unknown numeric uid with gid 0 and no extra groups.
    assert lookup_user(rootfs, "4242") == (4242, 0, [])
    assert lookup_user(rootfs, "4242:4243") == (4242, 4243, [])


def test_membership_is_by_exact_name(rootfs: Path) -> None:
    # "al" is a prefix of "alice", who is in users and wheel; al is in neither.
    assert lookup_user(rootfs, "al") == (1002, 1002, [])


def test_comments_ignored(rootfs: Path) -> None:
    with pytest.raises(KataError, match="unable to find user carol"):
        lookup_user(rootfs, "carol")
    # alice's commented-out membership of "secret" (77) does not count.
    assert 77 not in lookup_user(rootfs, "alice")[2]
    with pytest.raises(KataError, match="unable to find group secret"):
        lookup_user(rootfs, "alice:secret")


def test_non_numeric_primary_gid_is_zero(rootfs: Path) -> None:
    assert lookup_user(rootfs, "odd") == (1003, 0, [])


def test_unknown_user(rootfs: Path) -> None:
    with pytest.raises(KataError) as e:
        lookup_user(rootfs, "mallory")
    assert str(e.value) == "unable to find user mallory: no matching entries in passwd file"


def test_unknown_group(rootfs: Path) -> None:
    with pytest.raises(KataError) as e:
        lookup_user(rootfs, "alice:nosuch")
    assert str(e.value) == "unable to find group nosuch: no matching entries in group file"


def test_unknown_user_checked_before_group(rootfs: Path) -> None:
    with pytest.raises(KataError, match="unable to find user mallory"):
        lookup_user(rootfs, "mallory:nosuch")


def test_rootfs_without_etc_files(tmp_path: Path) -> None:
    assert lookup_user(tmp_path, "0") == (0, 0, [])
    assert lookup_user(tmp_path, "1000:1000") == (1000, 1000, [])
    with pytest.raises(KataError, match="unable to find user root"):
        lookup_user(tmp_path, "root")
    with pytest.raises(KataError, match="unable to find group wheel"):
        lookup_user(tmp_path, "0:wheel")
