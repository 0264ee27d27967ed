"""Each owner (a CLI run, a shim) works in its own mount namespace.

Its run files (sockets, overlay upper dirs, logs while the VM runs) live on
a tmpfs mounted only in that namespace, and every mount it makes stays
there.  When the owner and its helpers are gone -- exited, crashed or
SIGKILLed -- the kernel frees the namespace and everything in it goes too:
no clean-up pass is needed for a crash to leave nothing behind.
"""

from __future__ import annotations

import os
from pathlib import Path

from microvm import linux, paths
from microvm.errors import KataError

_entered = False


def enter() -> Path:
    """Move this process into a private mount namespace; return its run dir.

    Call before any thread starts: a new mount namespace also unshares the
    filesystem context, which a multi-threaded process may not.
    """
    global _entered
    run = paths.RUN / "vm"
    if _entered:
        return run
    if os.geteuid() != 0:
        raise KataError("kata-py needs root (mount namespaces, virtio-fs, /dev/kvm)")
    run.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        linux.unshare(linux.CLONE_NEWNS)
        # Nothing mounted from here on may reach the host's namespace.
        linux.mount(None, "/", None, linux.MS_REC | linux.MS_SLAVE)
        linux.mount("kata-py", str(run), "tmpfs", linux.MS_NOSUID | linux.MS_NODEV,
                    "mode=0700")
        # Shared within this namespace, so mounts made under it after a helper
        # started (virtiofsd keeps a slave copy) still reach the helper.
        linux.mount(None, str(run), None, linux.MS_SHARED)
    except OSError as e:
        raise KataError(f"cannot set up a private mount namespace: {e}") from None
    _entered = True
    return run
