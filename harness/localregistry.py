"""Debian's docker-registry on a loopback port, for the tests and the benchmark."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from microvm.errors import KataError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise KataError(f"docker-registry did not start: {log.read_text()[-500:]}")
        time.sleep(0.05)


@contextlib.contextmanager
def serve(root: Path, auth: dict[str, object] | None = None) -> Iterator[str]:
    """docker-registry with its storage under root; yields HOST:PORT."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config: dict[str, object] = {
        "version": 0.1,
        "storage": {"filesystem": {"rootdirectory": str(root / "data")},
                    "delete": {"enabled": True}},
        "http": {"addr": f"127.0.0.1:{port}"}}
    if auth:
        config["auth"] = auth
    (root / "config.yml").write_text(json.dumps(config))  # JSON is YAML
    log = root / "log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["docker-registry", "serve", str(root / "config.yml")],
                                stdout=out, stderr=out, stdin=subprocess.DEVNULL)
    try:
        wait_port(port, proc, log)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def push(archive: Path, dest: str, *flags: str) -> None:
    """skopeo copy oci-archive -> registry (flags: e.g. --dest-creds)."""
    subprocess.run(["skopeo", "copy", "-q", *flags, f"oci-archive:{archive}",
                    f"docker://{dest}", "--dest-tls-verify=false"], check=True, timeout=300,
                   stdin=subprocess.DEVNULL)
