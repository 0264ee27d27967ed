"""microvm.core.oci: linux.namespaces, as CRI writes them for a pod's containers."""

from __future__ import annotations

import pytest

from microvm.core.oci import joined_namespaces, network_namespace
from microvm.protocol import ttrpc

PAUSE = [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
         {"type": "network", "path": "/var/run/netns/cni-1"}]
APP = [{"type": "pid"}, {"type": "ipc", "path": "/proc/42/ns/ipc"},
       {"type": "uts", "path": "/proc/42/ns/uts"}, {"type": "mount"},
       {"type": "network", "path": "/var/run/netns/cni-1"}]
SHARED_PID = [{"type": "pid", "path": "/proc/42/ns/pid"}, *APP[1:]]


def test_pause_makes_new_namespaces_apps_join_ipc_and_uts() -> None:
    assert joined_namespaces(PAUSE) == ()
    assert joined_namespaces(APP) == ("ipc", "uts")
    assert joined_namespaces(SHARED_PID) == ("ipc", "uts", "pid")
    # The network path is the host's (the shim plumbs it), never joined in the guest.
    assert network_namespace(APP) == "/var/run/netns/cni-1"
    assert joined_namespaces([{"type": "user", "path": "/proc/42/ns/user"}]) == ()


@pytest.mark.parametrize("bad", [["ipc"], [{"type": "ipc", "path": 3}], [{"type": 1}]])
def test_malformed_namespaces_are_one_error(bad: list[object]) -> None:
    with pytest.raises(ttrpc.InvalidArgument, match="OCI spec"):
        joined_namespaces(bad)
