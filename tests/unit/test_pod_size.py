"""microvm.core.oci.pod_size: CRI's pod-level resources size the pod's VM."""

from __future__ import annotations

import pytest

from microvm.core.oci import SANDBOX_CPU_PERIOD, SANDBOX_CPU_QUOTA, SANDBOX_MEMORY, pod_size
from microvm.protocol import ttrpc


def test_pod_size_from_cri_annotations() -> None:
    big = {SANDBOX_CPU_QUOTA: "250000", SANDBOX_CPU_PERIOD: "100000",
           SANDBOX_MEMORY: str(256 << 20)}
    assert pod_size({}, 1, 512, 8, 3072) == (1, 512)              # the floor
    assert pod_size(big, 1, 512, 8, 3072) == (3, 768)             # 2.5 CPUs -> 3; +256 MiB
    assert pod_size(big, 4, 512, 8, 3072) == (4, 768)             # never below the config
    assert pod_size(big, 1, 3000, 2, 3072) == (2, 3072)           # never above the maxima
    assert pod_size({SANDBOX_CPU_QUOTA: "-1", SANDBOX_CPU_PERIOD: "100000"}, 1, 512, 8,
                    3072) == (1, 512)                             # -1: no limit
    with pytest.raises(ttrpc.InvalidArgument, match="not a number"):
        pod_size({SANDBOX_MEMORY: "lots"}, 1, 512, 8, 3072)
