"""The suite's leak check must be able to fail: a mount left in a private
mount namespace, where no `cat /proc/self/mounts` of ours can see it."""

from __future__ import annotations

import os
import subprocess
import time
import uuid

from tests.conftest import RUN_DIR, kata_mounts


def test_a_mount_in_another_namespace_is_found() -> None:
    target = RUN_DIR / f"kt-leak-{uuid.uuid4().hex[:8]}"
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    target.mkdir()
    holder = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         f"mount -t tmpfs kt-leak {target} && echo up && exec sleep 60"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "up\n"
        with open("/proc/self/mounts") as f:
            assert str(target) not in f.read()  # what the old check read
        found = kata_mounts()
        assert any(str(target) in m and f"[{holder.pid}]" in m for m in found), found
    finally:
        holder.kill()
        holder.wait()
        deadline = time.monotonic() + 5
        while any(str(target) in m for m in kata_mounts()) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.rmdir(target)
    assert not any(str(target) in m for m in kata_mounts())
