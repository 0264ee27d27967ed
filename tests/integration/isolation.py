"""The isolation table's machinery: one attack, run under runc and under kata-py.

A runner takes a shell script and runs it as root in a privileged container
of the same busybox tree:

  runc     `runc spec`, then made what `docker run --privileged` makes: every
           capability, no seccomp, no masked or read-only /proc paths, /sys
           and cgroups writable, every device allowed, no no_new_privs; in a
           network namespace the test made (a CNI pod on the node's bridge
           when the row needs a network);
  kata-py  `microvm run --rm --privileged busybox -- sh -c SCRIPT`.

The table itself (Table) is kept by a session fixture and written into
docs/security.md between its markers at the end of the session; a run of
some rows only (-k) updates those rows' cells and keeps the others.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import platform
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import Microvm, Result
from tests.netns import NETNS_DIR, cni_pod, namespace

BUSYBOX_TREE = Path("/var/lib/kata-py/rootfs/busybox")
BEGIN, END = "<!-- isolation-table:begin -->", "<!-- isolation-table:end -->"
RUNC, KATA = "runc", "kata-py"
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]

# Every capability runc 1.1 knows, in number order.
CAPABILITIES = [
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
    "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
    "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE",
    "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME",
    "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP",
    "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ",
    "PERFMON", "BPF", "CHECKPOINT_RESTORE",
]

# The rows, in the table's order.
ATTACKS = {
    1: "Which kernel: `uname -r`, `/proc/version`, first `dmesg` line",
    2: "Host processes: a marker process on the host, looked for with `ps`, "
       "`/proc/*/cmdline` and a fresh `mount -t proc`",
    3: "Kernel settings: write `/proc/sys/kernel/printk_ratelimit` and "
       "`/sys/kernel/mm/transparent_hugepage/khugepaged/pages_to_scan` "
       "(and `kernel.domainname`, which is per UTS namespace)",
    4: "Kernel panic from the container (`/proc/sysrq-trigger`, else "
       "`vm.panic_on_oom=2` and a full tmpfs)",
    5: "Read-only host paths: write a `:ro` volume and a `--read-only` rootfs directory, "
       "after `mount -o remount,bind,rw`; kata-py also mounts the virtio-fs share "
       "itself and opens the networked VM's busybox (the host's `/bin/busybox`) for writing",
    6: "Setuid-root files of an image, run by another host user (`nobody`) from where "
       "the runtime keeps them",
    7: "The host's `127.0.0.1`: a listener on `127.0.0.1` only, dialled at `127.0.0.1` and "
       "at the gateway, and with `127.0.0.1` routed out through the gateway "
       "(`route_localnet`); a listener on `0.0.0.0` for comparison",
    8: "Another sandbox on the same bridge: its listener, and any other path "
       "(its processes, mounts, files, the share)",
}


# -- runners ---------------------------------------------------------------------


@dataclass
class Volume:
    source: Path
    destination: str
    readonly: bool = True


class Runner:
    name: str

    def run(self, script: str, *, rootfs: Path | None = None, read_only: bool = False,
            volumes: Sequence[Volume] = (), bridge: str | None = None,
            timeout: float = 180) -> Result:
        raise NotImplementedError

    def popen(self, script: str, *, rootfs: Path | None = None,
              bridge: str | None = None) -> subprocess.Popen[str]:
        """Started with stdin, stdout and stderr pipes (text); it ends when its
        stdin closes, if the script reads it."""
        raise NotImplementedError


def held_capabilities() -> list[str]:
    """The capabilities this process may hand on (its bounding set): what
    `docker run --privileged` gives is what the daemon holds."""
    status = Path("/proc/self/status").read_text()
    bounding = int(re.search(r"CapBnd:\s*([0-9a-f]+)", status).group(1), 16)  # type: ignore[union-attr]
    return [c for i, c in enumerate(CAPABILITIES) if bounding >> i & 1]


def privileged_spec(template: dict[str, object], root: Path, read_only: bool, netns: str,
                    args: list[str], volumes: Sequence[Volume]) -> dict[str, object]:
    """`runc spec` made into what `docker run --privileged` makes."""
    spec = json.loads(json.dumps(template))
    caps = [f"CAP_{c}" for c in held_capabilities()]
    process = spec["process"]
    process.update(terminal=False, args=args, noNewPrivileges=False, cwd="/",
                   env=["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root"])
    process["capabilities"] = {k: caps for k in
                               ("bounding", "effective", "permitted", "inheritable")}
    process.pop("apparmorProfile", None)
    spec["root"] = {"path": str(root), "readonly": read_only}
    linux = spec["linux"]
    linux.pop("maskedPaths", None)
    linux.pop("readonlyPaths", None)
    linux.pop("seccomp", None)
    linux["resources"] = {"devices": [{"allow": True, "access": "rwm"}]}
    linux["namespaces"] = [n for n in linux["namespaces"] if n["type"] != "network"] + [
        {"type": "network", "path": netns}]
    mounts = []
    for m in spec["mounts"]:
        if m["type"] in ("sysfs", "cgroup"):
            m["options"] = [o for o in m["options"] if o != "ro"]
        mounts.append(m)
    mounts += [{"destination": v.destination, "type": "bind", "source": str(v.source),
                "options": ["rbind", "ro" if v.readonly else "rw"]} for v in volumes]
    spec["mounts"] = mounts
    return spec  # type: ignore[no-any-return]


class Runc(Runner):
    """runc containers, privileged; each gets a fresh writable copy of the
    busybox tree (as docker gives each container its own layer) unless given
    a rootfs. Bundles live under one world-readable directory, laid out as
    runc's own documentation does it (`mkdir rootfs`, `runc spec`)."""

    name = RUNC

    def __init__(self, node: str | None = None) -> None:
        self.node = node
        self.base = Path(tempfile.mkdtemp(prefix="kt-iso-runc-", dir="/var/tmp"))
        self.base.chmod(0o755)
        self.ids: list[str] = []
        self.stack = contextlib.ExitStack()
        spec_dir = self.base / "template"
        spec_dir.mkdir()
        subprocess.run(["runc", "spec"], cwd=spec_dir, check=True)
        self.template = json.loads((spec_dir / "config.json").read_text())

    def close(self) -> None:
        try:
            for cid in self.ids:
                subprocess.run(["runc", "delete", "-f", cid], capture_output=True)
            self.stack.close()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def rootfs_copy(self) -> Path:
        root = Path(tempfile.mkdtemp(prefix="rootfs-", dir=self.base))
        root.chmod(0o755)
        shutil.copytree(BUSYBOX_TREE, root, symlinks=True, dirs_exist_ok=True)
        return root

    def _netns(self, bridge: str | None) -> str:
        if bridge is None:
            return str(NETNS_DIR / self.stack.enter_context(namespace("kt-runc")))
        ipam = self.base / "ipam"
        return self.stack.enter_context(cni_pod(bridge, ipam)).netns

    def _prepare(self, script: str, rootfs: Path | None, read_only: bool,
                 volumes: Sequence[Volume], bridge: str | None) -> list[str]:
        cid = f"kt-iso-{secrets.token_hex(4)}"
        bundle = self.base / cid
        bundle.mkdir()
        spec = privileged_spec(self.template, rootfs or self.rootfs_copy(), read_only,
                               self._netns(bridge), ["sh", "-c", script], volumes)
        (bundle / "config.json").write_text(json.dumps(spec))
        self.ids.append(cid)
        return ["runc", "run", "--bundle", str(bundle), cid]

    def run(self, script: str, *, rootfs: Path | None = None, read_only: bool = False,
            volumes: Sequence[Volume] = (), bridge: str | None = None,
            timeout: float = 180) -> Result:
        argv = self._prepare(script, rootfs, read_only, volumes, bridge)
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=timeout)
        subprocess.run(["runc", "delete", "-f", argv[-1]], capture_output=True)
        return Result(p.returncode, p.stdout, p.stderr)

    def popen(self, script: str, *, rootfs: Path | None = None,
              bridge: str | None = None) -> subprocess.Popen[str]:
        argv = self._prepare(script, rootfs, False, (), bridge)
        return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def init_pid(self, popen: subprocess.Popen[str]) -> int:
        cid = str(popen.args[-1])  # type: ignore[index]
        state = subprocess.run(["runc", "state", cid], capture_output=True, text=True,
                               check=True)
        return int(json.loads(state.stdout)["pid"])


class Kata(Runner):
    """`microvm run --rm --privileged`; bridge: the CLI in that node namespace
    with --network bridge."""

    name = KATA
    PRIVILEGED = ("--privileged",)

    def __init__(self, microvm: Microvm) -> None:
        self.microvm = microvm

    def _cli(self, bridge: str | None) -> Microvm:
        return self.microvm.in_netns(bridge) if bridge else self.microvm

    @classmethod
    def args(cls, script: str, root: str = "busybox", read_only: bool = False,
             volumes: Sequence[Volume] = (), bridge: str | None = None,
             interactive: bool = False) -> list[str]:
        argv = ["run", "--rm", *cls.PRIVILEGED]
        if interactive:
            argv.append("-i")
        if bridge:
            argv += ["--network", "bridge"]
        if read_only:
            argv.append("--read-only")
        for v in volumes:
            argv += ["-v", f"{v.source}:{v.destination}{':ro' if v.readonly else ''}"]
        return [*argv, root, "--", "sh", "-c", script]

    def run(self, script: str, *, rootfs: Path | None = None, read_only: bool = False,
            volumes: Sequence[Volume] = (), bridge: str | None = None,
            timeout: float = 180) -> Result:
        argv = self.args(script, str(rootfs or "busybox"), read_only, volumes, bridge)
        return self._cli(bridge).run(*argv, timeout=timeout)

    def popen(self, script: str, *, rootfs: Path | None = None, bridge: str | None = None,
              image: str | None = None) -> subprocess.Popen[str]:
        argv = self.args(script, image or str(rootfs or "busybox"), bridge=bridge,
                         interactive=True)
        return self._cli(bridge).popen(  # type: ignore[return-value]
            *argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)


@contextlib.contextmanager
def runner(name: str, microvm: Microvm | None) -> Iterator[Runner]:
    if name == RUNC:
        r = Runc()
        try:
            yield r
        finally:
            r.close()
    else:
        assert microvm is not None
        yield Kata(microvm)


# -- probes ------------------------------------------------------------------------


def sections(out: str) -> dict[str, list[str]]:
    """A script's output split at its `== name` lines."""
    found: dict[str, list[str]] = {"": []}
    current = ""
    for line in out.splitlines():
        if line.startswith("== "):
            current = line[3:].strip()
            found[current] = []
        else:
            found[current].append(line)
    return found


def tree_digest(*paths: Path) -> str:
    """Content, mode and link targets of every file under paths (not their times)."""
    h = hashlib.sha256()
    for top in paths:
        entries = [top] if not top.is_dir() or top.is_symlink() else \
            [top, *sorted(top.rglob("*"))]
        for p in entries:
            st = p.lstat()
            h.update(f"{p}\0{st.st_mode:o}\0".encode())
            if p.is_symlink():
                h.update(os.readlink(p).encode())
            elif p.is_file():
                h.update(p.read_bytes())
    return h.hexdigest()


def as_nobody(path: str, *args: str) -> str:
    """What running path as user nobody gives: its output, or the error.

    Through a shell: setpriv keeps its capabilities up to its own execve, so
    the path would be walked with root's powers."""
    p = subprocess.run([*NOBODY, "/bin/sh", "-c", 'exec "$0" "$@"', path, *args],
                       capture_output=True, text=True, cwd="/", timeout=30)
    return (p.stdout + p.stderr).strip()


def listener_script() -> str:
    """A TCP listener for the node namespace: one port per argv pair
    (address, port); each connection gets 'reached-<address>' and is logged."""
    return r"""
import selectors, socket, sys
sel = selectors.DefaultSelector()
pairs = sys.argv[1:]
for addr, port in zip(pairs[::2], pairs[1::2]):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, int(port)))
    s.listen(16)
    sel.register(s, selectors.EVENT_READ, addr)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        c, peer = key.fileobj.accept()
        print(f"accepted {key.data} from {peer[0]}", flush=True)
        c.sendall(f"reached-{key.data}\n".encode())
        c.close()
"""


# -- the table ----------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


@dataclass
class Row:
    attack: str
    cells: dict[str, str] = field(default_factory=dict)
    held: bool | None = None       # kata-py reached nothing but its own VM


@dataclass
class Table:
    rows: dict[int, Row] = field(default_factory=dict)
    guest_kernel: str = ""

    def record(self, n: int, runtime: str, reached: str, held: bool | None = None) -> None:
        row = self.rows.setdefault(n, Row(ATTACKS[n]))
        row.cells[runtime] = reached
        if held is not None:
            row.held = held

    def render(self, previous: str) -> str:
        """The block between the markers; rows and cells this session did not
        measure are kept from previous (the block found in the doc)."""
        old: dict[int, list[str]] = {}
        for line in previous.splitlines():
            m = re.match(r"\| (\d+) \|", line)
            if m:
                cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
                if len(cells) == 5:
                    old[int(m.group(1))] = cells
        guest = self.guest_kernel
        if not guest:
            m = re.search(r"kata-py guest kernel `([^`]*)`", previous)
            guest = m.group(1) if m else "unknown"
        runc = subprocess.run(["runc", "--version"], capture_output=True, text=True
                              ).stdout.split("\n")[0].removeprefix("runc version ") \
            if shutil.which("runc") else "not installed"
        lines = [
            f"Last run {datetime.date.today().isoformat()}: host kernel "
            f"`{platform.release()}`, kata-py guest kernel `{guest}`, runc `{runc}`. "
            "Written by `tests/integration/test_isolation.py`.",
            "",
            "| # | Attack | runc, privileged | kata-py, `--privileged` | kata-py reached only "
            "its own VM |",
            "|---|---|---|---|---|",
        ]
        for n in sorted(set(old) | set(self.rows) | set(ATTACKS)):
            prev = old.get(n, [str(n), _cell(ATTACKS.get(n, "")), "not run", "not run", "—"])
            row = self.rows.get(n)
            cells = list(prev)
            cells[1] = _cell(ATTACKS.get(n, prev[1]))
            if row is not None:
                for i, rt in ((2, RUNC), (3, KATA)):
                    if rt in row.cells:
                        cells[i] = _cell(row.cells[rt])
                if row.held is not None:
                    cells[4] = "yes" if row.held else "**NO**"
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def write(self, doc: Path) -> None:
        text = doc.read_text()
        if BEGIN not in text or END not in text:
            text = text.rstrip("\n") + f"\n\n{BEGIN}\n{END}\n"
        head, rest = text.split(BEGIN, 1)
        previous, tail = rest.split(END, 1)
        doc.write_text(f"{head}{BEGIN}\n{self.render(previous)}\n{END}{tail}")
