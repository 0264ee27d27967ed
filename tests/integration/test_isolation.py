"""The isolation table: the same attacks from a privileged container under
runc and under kata-py; kata-py may reach nothing but its own VM.

Each row's test records what each runtime reached (the `table` fixture
writes the rows into docs/security.md at the end of the session) and then
asserts, for kata-py only, that the attack stayed inside its VM.  The runc
variant only records: it is the reference, one kernel for everything.
"""

from __future__ import annotations

import contextlib
import io
import platform
import queue
import re
import secrets
import shutil
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

from microvm import paths
from microvm.images.ociarchive import gzip_layer, layer_from_dir, oci_archive_from_layers
from microvm.protocol import SHARED_FS_TAG
from tests.conftest import REPO, Microvm, helper_processes
from tests.integration.isolation import (
    BUSYBOX_TREE,
    KATA,
    RUNC,
    Kata,
    Runc,
    Runner,
    Table,
    Volume,
    as_nobody,
    listener_script,
    runner,
    sections,
    tree_digest,
)
from tests.netns import NETNS_DIR

pytestmark = pytest.mark.vm
DOC = REPO / "docs" / "security.md"


@pytest.fixture(scope="session")
def table() -> Iterator[Table]:
    t = Table()
    yield t
    if t.rows:
        t.write(DOC)


@pytest.fixture(params=[RUNC, KATA])
def rt(request: pytest.FixtureRequest, node: str) -> Iterator[Runner]:
    """The runtime under attack; kata-py's variant comes with the leak check.
    (node first: runc's CNI pods on its bridge go before it does.)"""
    if request.param == RUNC and shutil.which("runc") is None:
        pytest.skip("runc is not installed")
    microvm = request.getfixturevalue("microvm") if request.param == KATA else None
    with runner(request.param, microvm) as r:
        yield r


class Lines:
    """A process's stdout lines, read by a thread, so a wedged VM cannot hang a test."""

    def __init__(self, p: subprocess.Popen[str]) -> None:
        self.q: queue.Queue[str] = queue.Queue()
        assert p.stdout is not None
        out = p.stdout

        def pump() -> None:
            for line in out:
                self.q.put(line)
            self.q.put("")

        threading.Thread(target=pump, daemon=True).start()

    def next(self, timeout: float = 120) -> str:
        try:
            return self.q.get(timeout=timeout)
        except queue.Empty:
            return "<no answer>"


def _stop(p: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str]:
    """Close its stdin and wait; (status, stderr)."""
    assert p.stdin is not None
    with contextlib.suppress(BrokenPipeError):
        p.stdin.close()
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    return p.returncode, p.stderr.read() if p.stderr else ""


# -- 1. which kernel -------------------------------------------------------------------


def test_the_kernel_is_the_guests(rt: Runner, table: Table) -> None:
    host = {"release": platform.release(),
            "version": Path("/proc/version").read_text().strip(),
            "dmesg": subprocess.run("dmesg | head -1", shell=True, capture_output=True,
                                    text=True).stdout.strip()}
    r = rt.run("uname -r; cat /proc/version; dmesg 2>&1 | head -1")
    assert r.returncode == 0, r.stderr
    got = dict(zip(("release", "version", "dmesg"), [*r.stdout.splitlines(), "", "", ""],
                   strict=False))
    whose = {k: "the host's" if got[k] == host[k] else "its own" for k in host}
    text = (f"`{got['release']}` ({whose['release']}); /proc/version: {whose['version']}; "
            f"dmesg: {whose['dmesg']} boot log")
    if rt.name == RUNC:
        table.record(1, RUNC, text)
        return
    own = (set(whose.values()) == {"its own"}
           and got["version"].startswith(f"Linux version {got['release']} ")
           and got["dmesg"].startswith(f"Linux version {got['release']} "))
    table.guest_kernel = got["release"]
    table.record(1, KATA, text.replace("its own", "the guest's"), held=own)
    assert own, f"host {host}, container {got}"


# -- 2. host processes -----------------------------------------------------------------

PROCESSES = r"""
echo "== ps"; ps 2>&1
echo "== proc"; for f in /proc/[0-9]*/cmdline; do tr '\0' ' ' < "$f" 2>/dev/null; echo; done
echo "== fresh proc"
mkdir -p /dev/kt-proc
if mount -t proc proc /dev/kt-proc 2>&1; then
  echo mounted
  for f in /dev/kt-proc/[0-9]*/cmdline; do tr '\0' ' ' < "$f" 2>/dev/null; echo; done
fi
"""


def _host_processes() -> int:
    n = 0
    for p in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            n += p.name.isdigit() and bool((p / "cmdline").read_bytes())
    return n


def test_host_processes_are_out_of_sight(rt: Runner, table: Table) -> None:
    marker = f"kt-iso-marker-{secrets.token_hex(6)}"
    host = subprocess.Popen([marker, "1000"], executable="/bin/sleep")
    try:
        host_count = _host_processes()
        r = rt.run(PROCESSES)
    finally:
        host.kill()
        host.wait()
    assert r.returncode == 0, r.stderr
    s = sections(r.stdout)
    seen = [name for name in ("ps", "proc", "fresh proc") if marker in "\n".join(s[name])]
    own = len([line for line in s["proc"] if line.strip()])
    fresh = "mounted" in s["fresh proc"]
    mine = "its pid namespace's" if rt.name == RUNC else "the guest's"
    text = (f"seen via {', '.join(seen)}" if seen else "not seen") + \
        f": {own} processes, {mine} (the host has {host_count}); " + \
        (f"`mount -t proc` works and shows {mine} too" if fresh
         else "`mount -t proc` refused")
    table.record(2, rt.name, text, held=not seen if rt.name == KATA else None)
    if rt.name == KATA:
        assert not seen, r.stdout


# -- 3. kernel settings ----------------------------------------------------------------

SYSCTL = Path("/proc/sys/kernel/printk_ratelimit")
MM_KNOBS = [Path("/sys/kernel/mm/transparent_hugepage/khugepaged/pages_to_scan"),
            Path("/sys/kernel/mm/ksm/pages_to_scan")]
DOMAINNAME = Path("/proc/sys/kernel/domainname")
WRITE = r"""
w() {
  if echo "$2" > "$1" 2>/dev/null; then echo "$1 written: $(cat "$1")"; else echo "$1 refused"; fi
}
mount -o remount,bind,rw /sys 2>/dev/null
"""


def test_kernel_settings_stay_in_the_guest(rt: Runner, table: Table) -> None:
    """printk_ratelimit and the mm knob are global: under runc they change
    the host's (restored at once); kata-py's may change only the guest's."""
    knobs = [SYSCTL, next((k for k in MM_KNOBS if k.exists()), MM_KNOBS[0])]
    before = {k: k.read_text().strip() if k.exists() else "" for k in [*knobs, DOMAINNAME]}
    new = {k: str(int(before[k] or 0) + 37) for k in knobs}
    new[DOMAINNAME] = f"kt-iso-{secrets.token_hex(4)}"
    script = WRITE + "".join(f"w {k} {v}\n" for k, v in new.items())
    try:
        r = rt.run(script)
    finally:
        after = {k: k.read_text().strip() if k.exists() else "" for k in before}
        for k, v in before.items():
            if after[k] != v:
                k.write_text(v + "\n")
    assert r.returncode == 0, r.stderr
    changed = [k for k in before if after[k] != before[k]]
    inside = {k: ("written" if f"{k} written" in r.stdout else "refused") for k in new}
    parts = []
    for k in new:
        short = k.name if k != knobs[1] else "/".join(k.parts[-2:])
        if k in changed:
            parts.append(f"{short}: **the host's** changed ({before[k]} → {after[k]}, restored)")
        else:
            parts.append(f"{short}: {inside[k]} in the container, the host's unchanged")
    table.record(3, rt.name, "; ".join(parts), held=not changed if rt.name == KATA else None)
    if rt.name == KATA:
        assert not changed, f"the host's {[str(k) for k in changed]} changed: {r.stdout}"


# -- 4. kernel panic ------------------------------------------------------------------

PANIC = r"""
if [ -e /proc/sysrq-trigger ]; then
  echo 1 > /proc/sys/kernel/sysrq; echo c > /proc/sysrq-trigger
fi
echo 2 > /proc/sys/vm/panic_on_oom
mkdir -p /dev/kt-fill && mount -t tmpfs -o size=100% fill /dev/kt-fill
cat /dev/zero > /dev/kt-fill/zero
echo survived
"""


def test_guest_panic_takes_down_only_its_sandbox(microvm: Microvm, table: Table) -> None:
    table.record(4, RUNC, "not attempted: a runc container's kernel is the host's, "
                          "so this panics the host")
    other = cast("subprocess.Popen[str]", microvm.popen(
        "run", "--rm", "-i", "busybox", "--", "sh", "-c",
        "echo up; while read l; do echo pong-$l; done",
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    lines = Lines(other)
    try:
        assert lines.next() == "up\n", "the other sandbox did not start"
        r = microvm.run("run", "--rm", *Kata.PRIVILEGED, "--memory", "128", "busybox", "--",
                        "sh", "-c", PANIC, timeout=300)
        assert other.stdin is not None
        other.stdin.write("1\n")
        other.stdin.flush()
        answer = lines.next(60)
    finally:
        status, other_err = _stop(other)
    consoles = "".join(p.read_text(errors="replace")
                       for p in microvm.log_dir.glob("*/console.log"))
    panicked = "Kernel panic - not syncing" in consoles
    told = next((line for line in r.error_lines if "guest kernel panicked" in line), "")
    survived = answer == "pong-1\n" and status == 0
    text = (f"{'its guest kernel panicked' if panicked else 'no panic'}, that VM is gone "
            f"(exit {r.returncode}"
            + (f", told: “{told.removeprefix('microvm: error: ')}”" if told
               else ", not told “guest kernel panicked”") + "); "
            + ("another sandbox started before kept answering" if survived
               else f"**the other sandbox did not answer** ({answer!r}, exit {status})"))
    table.record(4, KATA, text, held=survived and "survived" not in r.stdout)
    assert panicked and "survived" not in r.stdout, f"no guest panic: {r.stdout}{r.stderr}"
    assert survived, f"the other sandbox: {answer!r}, exit {status}: {other_err}"
    assert r.returncode != 0
    assert told, f"the user is not told the guest kernel panicked: {r.stderr}"


# -- 5. read-only host paths ------------------------------------------------------------

READ_ONLY = r"""
try() {
  what=$1; shift; if "$@" 2>/dev/null; then echo "$what: ok"; else echo "$what: refused"; fi
}
put() { echo pwned > "$1"; }
echo "== volume"
try "write /ro/f" put /ro/f
try "remount /ro rw" mount -o remount,bind,rw /ro
try "write /ro/f after the remount" put /ro/f
echo "== rootfs"
try "write /etc/kt-file" put /etc/kt-file
try "remount / rw" mount -o remount,bind,rw /
try "write /etc/kt-file after the remount" put /etc/kt-file
echo "== share"
# virtio-fs for a cold boot, virtio-9p for a clone of a template
fs=$(awk '$3 == "virtiofs" || $3 == "9p" {print $3; exit}' /proc/mounts)
tag=$(awk '$3 == "virtiofs" || $3 == "9p" {print $1; exit}' /proc/mounts)
opts=; [ "$fs" = 9p ] && opts="-o trans=virtio,version=9p2000.L"
if [ -n "$tag" ]; then
  mkdir -p /dev/kt-share
  try "mount -t $fs $tag" mount -t "$fs" $opts "$tag" /dev/kt-share
  ls -a /dev/kt-share
  for f in /dev/kt-share/*/volumes/*/f; do [ -e "$f" ] && try "write share/volumes/f" put "$f"; done
  for f in /dev/kt-share/*/rootfs/etc/kt-file; do
    [ -e "$f" ] && try "write share/rootfs/etc/kt-file" put "$f"
  done
  b=/dev/kt-share/.kata-py-tools/busybox
  if [ -e $b ]; then try "open share/.kata-py-tools/busybox for writing" sh -c ": >> $b"; fi
else
  echo "no shared file system"
fi
"""


def test_read_only_host_paths_stay_read_only(rt: Runner, table: Table, node: str,
                                             tmp_path: Path) -> None:
    """A privileged container remounts its read-only mounts read-write (and
    kata-py's mounts the shared file system itself): the host files must not change.
    kata-py's VM is networked, so the host's busybox is shared into it too."""
    hostdir = tmp_path / "hostdir"
    hostdir.mkdir()
    (hostdir / "f").write_text("host original\n")
    root = tmp_path / "rootfs"
    shutil.copytree(BUSYBOX_TREE, root, symlinks=True)
    (root / "etc/kt-file").write_text("rootfs original\n")
    (root / "ro").mkdir()
    busybox = Path(shutil.which("busybox") or "/bin/busybox").resolve()
    before = {p: tree_digest(p) for p in (hostdir, root, busybox)}
    r = rt.run(READ_ONLY, rootfs=root, read_only=True, volumes=[Volume(hostdir, "/ro")],
               bridge=node if rt.name == KATA else None)
    after = {p: tree_digest(p) for p in before}
    assert r.returncode == 0, r.stderr
    changed = [p for p in before if before[p] != after[p]]
    writes = [line.removesuffix(": ok") for line in r.stdout.splitlines()
              if line.endswith(": ok") and ("write" in line or "open" in line)]
    s = sections(r.stdout)
    names = {hostdir: "the `:ro` volume", root: "the `--read-only` rootfs",
             busybox: "the host's busybox"}
    steps = [line for sec in ("volume", "rootfs", "share") for line in s.get(sec, [])
             if line.endswith((": ok", ": refused"))]
    text = "; ".join(steps) + ". " + (
        "Changed on the host: **" + ", ".join(names[p] for p in changed) + "**"
        if changed else "Host files unchanged")
    table.record(5, rt.name, text, held=not (changed or writes) if rt.name == KATA else None)
    if rt.name == KATA:
        assert "mount -t virtiofs" in r.stdout or "mount -t 9p" in r.stdout, \
            "the share was not attempted"
        assert not writes and not changed, r.stdout


# -- 6. setuid files of an image ---------------------------------------------------------


def _suid_layer(dest: Path | None = None) -> tuple[bytes, str]:
    """A layer with two setuid-root files: a busybox copy and coreutils' id
    (which says euid=0 when its set-id bit works)."""
    files = {"bin/busybox-kt-suid": Path("/bin/busybox").read_bytes(),
             "bin/kt-suid-id": Path("/usr/bin/id").read_bytes()}
    if dest is not None:
        for name, data in files.items():
            (dest / name).write_bytes(data)
            (dest / name).chmod(0o4755)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.uid, info.gid = len(data), 0o4755, 0, 0
            t.addfile(info, io.BytesIO(data))
    return gzip_layer(buf.getvalue())


def _nobody_reaches(paths_: list[str]) -> dict[str, str]:
    return {p: as_nobody(p) for p in paths_}


def _glob(root: str, pattern: str) -> list[str]:
    """As root; [] if that process is gone meanwhile."""
    try:
        return [str(f) for f in Path(root).glob(pattern)]
    except OSError:
        return []


def _short(path: str) -> str:
    path = re.sub(r"/proc/\d+/", "/proc/PID/", path)
    path = re.sub(r"[0-9a-f]{16,}", "…", path)
    return re.sub(r"/var/tmp/kt-iso-runc-\w+/rootfs-\w+", "BUNDLE/rootfs", path)


def test_setuid_files_of_an_image_stay_out_of_other_users_reach(
        rt: Runner, table: Table, tmp_path: Path) -> None:
    """At rest (where the runtime keeps the image) and while a container of
    it runs (through its helpers' /proc/PID/root): user nobody must not be
    able to run the image's setuid-root files."""
    wait = "echo up; read x"
    if isinstance(rt, Runc):
        root = rt.rootfs_copy()
        _suid_layer(root)
        at_rest = [str(p) for p in root.rglob("kt-suid-id")]
        p = rt.popen(wait, rootfs=root)
        image = ""
    else:
        assert isinstance(rt, Kata)
        image = f"localhost/kt-iso-suid:{secrets.token_hex(4)}"
        archive = oci_archive_from_layers(tmp_path / "suid.tar", image,
                                          [layer_from_dir(BUSYBOX_TREE), _suid_layer()], {})
        imp = rt.microvm.run("import", str(archive))
        assert imp.returncode == 0, imp.stderr
        at_rest = sorted(str(p) for p in paths.LIB.rglob("kt-suid-id"))
        p = rt.popen(wait, image=image)
    lines = Lines(p)
    try:
        assert lines.next() == "up\n", _stop(p)[1]
        if isinstance(rt, Runc):
            roots = {f"/proc/{rt.init_pid(p)}/root": "bin/kt-suid-id"}
        else:
            # virtiofsd's root is the shared directory; QEMU's and the CLI's,
            # the owner's mount namespace.
            owner = "run/kata-py/vm/*/shared/*/rootfs/bin/kt-suid-id"
            roots = {f"/proc/{pid}/root": "*/rootfs/bin/kt-suid-id" if "virtiofsd" in line
                     else owner for line in helper_processes()
                     for pid in [line.split()[0]]}
            roots[f"/proc/{p.pid}/root"] = owner
        running = sorted({f for root, pattern in roots.items() for f in _glob(root, pattern)})
        results = _nobody_reaches(at_rest + running)
    finally:
        _stop(p)
        if isinstance(rt, Kata):
            rt.microvm.run("rmi", image)
    assert at_rest, "the image's files were not found where the runtime keeps them"
    rooted = [path for path, out in results.items() if "euid=0" in out]
    parts: list[str] = []
    for path, out in results.items():
        if "euid=0" in out:
            what = "ran with **euid=0**"
        elif out.startswith("uid="):
            what = "ran, its set-id bit ignored (another mount namespace)"
        else:
            what = "refused (" + out.split(": ")[-1] + ")"
        part = f"`{_short(path)}`: {what}"
        if part not in parts:  # virtiofsd's two processes, QEMU and the CLI: one line each
            parts.append(part)
    if not running:
        parts.append("no path through the running container's /proc/PID/root")
    table.record(6, rt.name, "nobody: " + "; ".join(parts),
                 held=not rooted if rt.name == KATA else None)
    if rt.name == KATA:
        assert not rooted, results


# -- 7. the host's loopback -----------------------------------------------------------

LOOPBACK = r"""
gw=$(ip route | awk '/^default/ {print $3; exit}')
dev=$(ip route | awk '/^default/ {print $5; exit}')
probe() { r=$(nc -w 3 "$2" "$3" </dev/null 2>/dev/null | head -1); echo "$1: ${r:-no answer}"; }
probe "127.0.0.1:LO" 127.0.0.1 LO
probe "gateway:LO" "$gw" LO
probe "gateway:ANY" "$gw" ANY
echo 1 > /proc/sys/net/ipv4/conf/all/route_localnet
echo 1 > /proc/sys/net/ipv4/conf/$dev/route_localnet
ip route del local 127.0.0.1 dev lo table local 2>&1
ip route del local 127.0.0.0/8 dev lo table local 2>&1
ip route add 127.0.0.1/32 via "$gw" dev "$dev" 2>&1
probe "127.0.0.1:LO routed via the gateway" 127.0.0.1 LO
"""


@pytest.fixture
def node_listener(node: str) -> Iterator[tuple[subprocess.Popen[str], Lines]]:
    """Listeners in the node namespace (the machine's stand-in): 127.0.0.1:7001
    and 0.0.0.0:7002."""
    p = subprocess.Popen(["nsenter", f"--net={NETNS_DIR / node}", sys.executable, "-c",
                          listener_script(), "127.0.0.1", "7001", "0.0.0.0", "7002"],
                         stdout=subprocess.PIPE, text=True)
    lines = Lines(p)
    try:
        assert lines.next(30) == "ready\n"
        yield p, lines
    finally:
        p.kill()
        p.wait()


def test_the_hosts_loopback_is_out_of_reach(rt: Runner, table: Table, node: str,
                                            node_listener: tuple[subprocess.Popen[str], Lines]
                                            ) -> None:
    script = LOOPBACK.replace("LO", "7001").replace("ANY", "7002")
    r = rt.run(script, bridge=node)
    assert r.returncode == 0, r.stderr
    _, lines = node_listener
    accepted = []
    while (line := lines.next(0.5)) not in ("", "<no answer>"):
        accepted.append(line.strip())
    probes = dict(line.split(": ", 1) for line in r.stdout.splitlines() if ": " in line
                  and line.split(": ")[0].endswith(("7001", "7002", "gateway")))
    loopback = {k: v for k, v in probes.items() if "7001" in k}
    reached_lo = [k for k, v in loopback.items() if v.startswith("reached")] + \
        [a for a in accepted if "127.0.0.1" in a.split()[1]]
    names = {"127.0.0.1:7001": "its `127.0.0.1`",
             "gateway:7001": "the gateway, at the 127.0.0.1 listener's port",
             "gateway:7002": "the gateway, at the 0.0.0.0 listener's port",
             "127.0.0.1:7001 routed via the gateway": "`127.0.0.1` routed out via the gateway"}
    text = "; ".join(f"{names.get(k, k)}: {'**reached**' if v.startswith('reached') else v}"
                     for k, v in probes.items())
    table.record(7, rt.name, text, held=not reached_lo if rt.name == KATA else None)
    if rt.name == KATA:
        assert len(loopback) == 3, r.stdout
        assert not reached_lo, f"{r.stdout}\naccepted: {accepted}"


# -- 8. another sandbox ------------------------------------------------------------------

SERVE = r"""
ip=$(ip -4 -o addr show dev eth0 | awk '{print $4}' | cut -d/ -f1)
echo secret > /kt-a-MARK
nc -l -p 7777 -e echo hello-from-a &
sleep 0.3
echo "ready $ip"
read x
"""
PEEK = r"""
r=$(nc -w 5 ADDR 7777 </dev/null 2>/dev/null | head -1); echo "== bridge"; echo "${r:-no answer}"
echo "== proc"; for f in /proc/[0-9]*/cmdline; do tr '\0' ' ' < "$f" 2>/dev/null; echo; done
echo "== mounts"; cat /proc/mounts
echo "== find"; find / -xdev -name 'kt-a-*' 2>/dev/null
echo "== share"
fs=$(awk '$3 == "virtiofs" || $3 == "9p" {print $3; exit}' /proc/mounts)
tag=$(awk '$3 == "virtiofs" || $3 == "9p" {print $1; exit}' /proc/mounts)
opts=; [ "$fs" = 9p ] && opts="-o trans=virtio,version=9p2000.L"
if [ -z "$tag" ]; then
  echo "(no share)"
elif mkdir -p /dev/kt-share && mount -t "$fs" $opts "$tag" /dev/kt-share 2>/dev/null; then
  ls -a /dev/kt-share; find /dev/kt-share -maxdepth 4 -name 'kt-a-*'
else
  echo "(share refused)"
fi
"""


def test_sandboxes_meet_only_on_the_bridge(rt: Runner, table: Table, node: str) -> None:
    mark = secrets.token_hex(6)
    a = rt.popen(SERVE.replace("MARK", mark), bridge=node)
    lines = Lines(a)
    try:
        ready = lines.next()
        assert ready.startswith("ready "), f"{ready!r}: {_stop(a)[1]}"
        addr = ready.split()[1]
        r = rt.run(PEEK.replace("ADDR", addr), bridge=node)
    finally:
        _stop(a)
    assert r.returncode == 0, r.stderr
    s = sections(r.stdout)
    bridge = s["bridge"][0] if s["bridge"] else "no answer"
    found = [name for name in ("proc", "mounts", "find", "share")
             if mark in "\n".join(s[name])]
    share = [e for e in s["share"] if e not in (".", "..", ".kata-py-tools", "(no share)",
                                                "(share refused)") and not e.startswith("/")]
    text = ("A's listener over the bridge: " +
            ("reached (as docker's default icc=true)" if bridge == "hello-from-a"
             else bridge) + "; " +
            (f"A's marker **found** via {', '.join(found)}" if found else
             "A's processes, mounts and files: not seen") +
            ("; mounting its share again: refused (a clone's 9p channel is in use)"
             if s["share"] == ["(share refused)"] else
             f"; its own share shows {len(share)} container, its own" if s["share"] != [
                "(no share)"] else ""))
    table.record(8, rt.name, text,
                 held=not found and len(share) <= 1 if rt.name == KATA else None)
    if rt.name == KATA:
        assert not found, r.stdout
        assert len(share) == 1 or s["share"] == ["(share refused)"], \
            f"{SHARED_FS_TAG} shows more than this sandbox: {s['share']}"
