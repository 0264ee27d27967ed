"""containerd-shim-kata-py-v2: containerd's runtime v2 shim contract.

  <shim> -namespace NS -address ADDR -publish-binary BIN -id ID [-debug] start
  <shim> -namespace NS -address ADDR -publish-binary BIN -id ID -bundle B delete
  <shim> -namespace NS -address ADDR -id ID [-debug]          (serve; fd 3 = socket)

`start` prints only the socket address; every container of one pod (same
io.kubernetes.cri.sandbox-id) gets the same shim, which owns the pod's VM.
`delete` prints only a marshalled DeleteResponse.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

# Nothing heavy here: containerd runs `start` (and `delete`) for every
# container and waits for it.  The daemon's and delete's imports are theirs.
from microvm import forkserver
from microvm.protocol import CRI_SANDBOX_ID

BINARY = "containerd-shim-kata-py-v2"
SOCKET_DIR = forkserver.SOCKET_DIR
GROUP_ANNOTATIONS = ("io.containerd.kata-py.group", CRI_SANDBOX_ID)
_BOOL_FLAGS = {"debug", "v", "version", "info"}


class Args:
    """The flags containerd passes.  A plain class: `start` runs for every
    container, and dataclasses would import inspect (5 ms) for it."""

    def __init__(self) -> None:
        self.namespace = "default"
        self.address = "/run/containerd/containerd.sock"
        self.publish_binary = ""
        self.id = ""
        self.bundle = ""
        self.debug = False
        self.socket = ""
        self.action = ""


def parse_args(argv: list[str]) -> Args:
    """Go flag-package style (-flag value, -flag=value); unknown flags ignored."""
    args = Args()
    i = 0
    while i < len(argv):
        word = argv[i]
        if word.startswith("-") and len(word) > 1:
            name, eq, value = word.lstrip("-").partition("=")
            key = name.replace("-", "_")
            if name in _BOOL_FLAGS:
                if name == "debug":
                    args.debug = value.lower() not in ("false", "0") if eq else True
            elif hasattr(args, key):
                if not eq:
                    i += 1
                    value = argv[i] if i < len(argv) else ""
                setattr(args, key, value)
        elif not args.action:
            args.action = word
        i += 1
    return args


def socket_path(args: Args, group: str) -> Path:
    digest = hashlib.sha256(os.path.join(args.address, args.namespace, group).encode())
    return SOCKET_DIR / digest.hexdigest()


def read_annotations(bundle: Path) -> dict[str, str]:
    """Just the spec's annotations (for grouping at start), tolerant of a bad spec."""
    try:
        data = json.loads((bundle / "config.json").read_text())
        found = data.get("annotations") or {}
        return {str(k): str(v) for k, v in found.items()} if isinstance(found, dict) else {}
    except (OSError, ValueError, AttributeError):
        return {}


def alive(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False


def _write_address(bundle: Path, address: str) -> None:
    tmp = bundle / ".address.tmp"
    tmp.write_text(address)
    tmp.rename(bundle / "address")


def _spawn_daemon(argv: list[str], bundle: Path, listener: socket.socket) -> None:
    """The daemon as a fresh interpreter, where the fork server cannot serve."""
    # It gets the listener as fd 3, and must not hold containerd's pipe
    # (containerd reads it to EOF): its stdio is /dev/null.
    if listener.fileno() != 3:
        os.dup2(listener.fileno(), 3)
    subprocess.Popen([sys.executable, "-m", "microvm.shim", *argv], stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=(3,),
                     cwd=bundle, process_group=0)


def start(args: Args) -> int:
    bundle = Path.cwd()
    annotations = read_annotations(bundle)
    group = next((annotations[k] for k in GROUP_ANNOTATIONS if annotations.get(k)), args.id)
    path = socket_path(args, group)
    address = f"unix://{path}"
    SOCKET_DIR.mkdir(parents=True, exist_ok=True, mode=0o711)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
    except OSError:
        if alive(path):
            # The pod's shim already runs: this container joins its VM.
            listener.close()
            _write_address(bundle, address)
            print(address, end="")
            return 0
        path.unlink(missing_ok=True)
        listener.bind(str(path))
    os.chmod(path, 0o600)
    listener.listen(128)
    _write_address(bundle, address)
    argv = ["-namespace", args.namespace, "-address", args.address, "-id", args.id]
    if args.debug:
        argv.append("-debug")
    try:
        forkserver.fork_daemon(argv, bundle, listener.fileno())
    except forkserver.Unavailable:
        _spawn_daemon(argv, bundle, listener)
    listener.close()
    print(address, end="")
    return 0


def act(args: Args) -> int:
    """One action in this process; the fork server's children run this too."""
    try:
        if args.action == "start":
            return start(args)
        if args.action == "delete":
            from microvm.shim.cleanup import delete
            return delete(args)
        if args.action:
            print(f"{BINARY}: unknown action {args.action!r}", file=sys.stderr)
            return 2
        from microvm.shim.daemon import serve_main
        return serve_main(args)
    except Exception as e:
        print(f"{BINARY}: {e}", file=sys.stderr)
        return 1


def main() -> None:
    args = parse_args(sys.argv[1:])
    if args.action == "delete":
        # containerd waits for it after every shim's end: a warm child of
        # the fork server does it, if one runs here.
        with contextlib.suppress(forkserver.Unavailable, OSError):
            sys.exit(forkserver.run_delete(sys.argv[1:], Path.cwd()))
    sys.exit(act(args))


if __name__ == "__main__":
    main()
