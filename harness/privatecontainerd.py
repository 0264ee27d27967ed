"""A containerd of our own, under a directory we choose: for tests and benchmarks.

Its root, state and sockets live in that directory, never the machine's
/var/lib/containerd or /run/containerd (shim sockets aside: the runtime v2
convention puts them in /run/containerd/s).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

CONFIG = """version = 2
root = "{root}/root"
state = "{root}/state"
[grpc]
  address = "{root}/containerd.sock"
[ttrpc]
  address = "{root}/containerd.sock.ttrpc"
"""
NO_CRI = """[plugins."io.containerd.grpc.v1.cri"]
  disable_cri = true
"""
# CRI as kubelet's containerd has it, with its CNI configuration in our
# directory; restrict_oom_score_adj because these machines lack
# CAP_SYS_RESOURCE (the pause container's -998 would fail).
CRI = """[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{root}/cni"
"""


@dataclass
class Containerd:
    root: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    prefix: tuple[str, ...] = ()          # e.g. nsenter into a network namespace

    @classmethod
    def create(cls, root: Path, cri_sandbox_image: str | None = None,
               prefix: tuple[str, ...] = (), path: tuple[Path, ...] = ()) -> Containerd:
        """cri_sandbox_image: turn CRI on (with that pause image) and register
        the kata-py runtime the way a user does, with `microvm install containerd`.
        path: more directories where containerd finds shims, after this venv's."""
        root.mkdir(parents=True, exist_ok=True)
        config = root / "config.toml"
        config.write_text(CONFIG.format(root=root) + (
            CRI.format(root=root, sandbox_image=cri_sandbox_image) if cri_sandbox_image
            else NO_CRI))
        if cri_sandbox_image:
            from microvm.cli.install import install_containerd
            (root / "cni").mkdir(exist_ok=True)
            install_containerd(config, secure_config=root / "secure.yaml")
        env = dict(os.environ)
        # containerd finds shims on its PATH: this venv's first.
        env["PATH"] = ":".join([str(Path(sys.executable).parent), *map(str, path),
                                env.get("PATH", "/usr/bin:/bin")])
        c = cls(root, env, prefix=prefix)
        c.start()
        return c

    @property
    def address(self) -> str:
        return str(self.root / "containerd.sock")

    def ctr(self, *args: str, input: str | None = None, timeout: float = 90,
            check: bool = False) -> subprocess.CompletedProcess[str]:
        p = subprocess.run(["ctr", "-a", self.address, *args], input=input, text=True,
                           capture_output=True, timeout=timeout, env=self.env)
        if check and p.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)}: {p.stderr.strip()}")
        return p

    def bundle(self, cid: str, namespace: str = "default") -> Path:
        return self.root / "state/io.containerd.runtime.v2.task" / namespace / cid

    def start(self) -> None:
        sock = self.root / "containerd.sock"
        sock.unlink(missing_ok=True)
        with open(self.root / "containerd.log", "ab") as log:
            self.proc = subprocess.Popen(
                [*self.prefix, "containerd", "--config", str(self.root / "config.toml")],
                stdout=log, stderr=log, env=self.env)
        deadline = time.monotonic() + 30
        while not sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log_text = (self.root / "containerd.log").read_text()[-2000:]
                raise RuntimeError(f"containerd did not start:\n{log_text}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def remove_all_tasks(self) -> None:
        for cid in self.ctr("task", "ls", "-q").stdout.split():
            self.ctr("task", "kill", "-s", "9", cid)
        time.sleep(0.5)
        for cid in self.ctr("task", "ls", "-q").stdout.split():
            self.ctr("task", "delete", cid)
        for cid in self.ctr("container", "ls", "-q").stdout.split():
            self.ctr("container", "rm", cid)
