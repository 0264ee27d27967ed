"""Networking: netlink (pyroute2), the tap and tc redirect beside a veth, the
CLI's bridge networks, published ports and kubelet's port-forward."""

from __future__ import annotations

import importlib.util
import sys
import types


def _pyroute2_without_its_package_init() -> None:
    """pyroute2's package __init__ imports all of pyroute2 (NDB and sqlite3
    among it): 8 MiB of heap and 50 ms in every shim, which keeps it for the
    pod's whole life.  We use IPRoute, netns and a few constants, so the
    package is entered without its __init__ and each submodule loads on its
    own (3 MiB, 26 ms; docs/benchmarks.md).  Every import of pyroute2 in
    kata-py names its submodule (pyroute2.iproute.linux, not pyroute2)."""
    if "pyroute2" in sys.modules:
        return
    spec = importlib.util.find_spec("pyroute2")
    if spec is None or not spec.submodule_search_locations:
        return
    package = types.ModuleType("pyroute2")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules["pyroute2"] = package


_pyroute2_without_its_package_init()
