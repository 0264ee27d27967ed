"""OCI linux.sysctl: the host checks names and values (they become paths
under the guest's /proc/sys), the guest writes them."""

from __future__ import annotations

from pathlib import Path

import pytest

from guest import container
from microvm.core import oci
from microvm.protocol import ttrpc


def test_names_and_values_that_pass() -> None:
    ok = {"kernel.shm_rmid_forced": "1", "net.ipv4.conf.eth0.rp_filter": "2",
          "net.ipv4.ip_local_port_range": "1024 65000"}
    assert oci.sysctls(ok) == ok


@pytest.mark.parametrize("raw", [
    {"../../etc/passwd": "x"}, {"kernel/../../x": "1"}, {"kernel..x": "1"}, {"kernel": "1"},
    {"": "1"}, {1: "1"}, {"kernel.x": "1\nkernel.y=2"}, {"kernel.x": 1},
])
def test_what_is_refused(raw: dict[object, object]) -> None:
    with pytest.raises(ttrpc.InvalidArgument, match="linux.sysctl"):
        oci.sysctls(raw)


def test_the_guest_writes_them_and_names_a_missing_one(tmp_path: Path) -> None:
    (tmp_path / "kernel").mkdir()
    (tmp_path / "kernel" / "msgmax").write_text("8192\n")
    container.apply_sysctls({"kernel.msgmax": "65000"}, str(tmp_path))
    assert (tmp_path / "kernel" / "msgmax").read_text() == "65000"
    with pytest.raises(container.ChildError, match="kernel.nope: the guest kernel has no"):
        container.apply_sysctls({"kernel.nope": "1"}, str(tmp_path))
