"""What a container's process may do: capabilities, no_new_privs, seccomp,
masked and read-only paths, and read-only shares.

The guest applies these between fork and exec; the same code runs here on
the host (as root), in a forked child, and reports what the kernel says in
/proc/self/status.  The VM-level checks are in tests/integration/test_security.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

from guest import container
from guest.agent import _spec
from microvm import capabilities, linux
from microvm.core import oci, seccomp
from microvm.protocol import agent_pb2, ttrpc


def _in_child(fn: Any) -> dict[str, Any]:
    """fn() in a forked child; its dict return value, or {"error": ...}."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            out = fn()
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            out = {"error": f"{type(e).__name__}: {e}"}
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data) if data else {"error": "child died"}


def _status() -> dict[str, Any]:
    with open("/proc/self/status") as f:
        rows = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    return {k: rows[k].strip() for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
                                        "NoNewPrivs", "Uid", "Seccomp")}


def _apply(process: agent_pb2.Process) -> dict[str, Any]:
    spec = _spec(process)
    container._setup_credentials(spec)
    return _status()


def test_docker_default_set() -> None:
    caps = capabilities.choose()
    assert caps == sorted(capabilities.DEFAULT, key=capabilities.NUMBERS.__getitem__)
    assert "CAP_SYS_ADMIN" not in caps and "CAP_NET_ADMIN" not in caps
    assert set(capabilities.choose(privileged=True)) == set(capabilities.ALL)
    assert "CAP_NET_ADMIN" in capabilities.choose(add=("net_admin",))
    assert "CAP_CHOWN" not in capabilities.choose(drop=("chown",))
    assert capabilities.choose(add=("ALL",), drop=("CAP_SYS_ADMIN",)) == \
        [c for c in capabilities.ALL if c != "CAP_SYS_ADMIN"]
    assert capabilities.choose(drop=("all",), add=("kill",)) == []  # drop comes last
    with pytest.raises(ValueError, match="unknown capability"):
        capabilities.choose(add=("CAP_NOPE",))


def test_default_capabilities_are_applied() -> None:
    caps = oci.Privileges().capabilities()
    got = _in_child(lambda: _apply(agent_pb2.Process(args=["x"], capabilities=caps)))
    want = f"{capabilities.mask(list(capabilities.DEFAULT)):016x}"
    assert got["CapEff"] == got["CapPrm"] == got["CapBnd"] == want, got
    assert got["CapInh"] == got["CapAmb"] == "0" * 16


def test_no_capabilities_field_keeps_them_all() -> None:
    """runc's rule for a spec without process.capabilities."""
    got = _in_child(lambda: _apply(agent_pb2.Process(args=["x"])))
    assert int(got["CapEff"], 16) == int(_status()["CapEff"], 16)


def test_non_root_user_keeps_only_what_the_spec_gives() -> None:
    caps = agent_pb2.Capabilities(bounding=["CAP_KILL", "CAP_CHOWN"], effective=["CAP_KILL"],
                                  permitted=["CAP_KILL"], ambient=["CAP_KILL"],
                                  inheritable=["CAP_KILL"])
    got = _in_child(lambda: _apply(agent_pb2.Process(
        args=["x"], capabilities=caps, user=agent_pb2.User(uid=1000, gid=1000))))
    kill = f"{1 << capabilities.NUMBERS['CAP_KILL']:016x}"
    assert got["Uid"].split()[0] == "1000", got
    assert got["CapEff"] == got["CapAmb"] == kill, got
    assert int(got["CapBnd"], 16) == capabilities.mask(["CAP_KILL", "CAP_CHOWN"])


def test_no_new_privileges() -> None:
    got = _in_child(lambda: _apply(agent_pb2.Process(args=["x"], no_new_privileges=True)))
    assert got["NoNewPrivs"] == "1"
    got = _in_child(lambda: _apply(agent_pb2.Process(args=["x"])))
    assert got["NoNewPrivs"] == "0"


def test_unknown_capability_from_the_host_is_refused_by_the_agent() -> None:
    with pytest.raises(ttrpc.InvalidArgument, match="CAP_NOPE"):
        _spec(agent_pb2.Process(args=["x"], capabilities=agent_pb2.Capabilities(
            bounding=["CAP_NOPE"])))


def _mkdir_under_filter(program: bytes, nnp: bool) -> dict[str, Any]:
    d = tempfile.mkdtemp()

    def go() -> dict[str, Any]:
        spec = _spec(agent_pb2.Process(args=["x"], seccomp=program, no_new_privileges=nnp))
        container._setup_credentials(spec)
        if nnp:  # loaded right before exec
            container._load_seccomp(spec.seccomp)
        try:
            os.mkdir(f"{d}/x")
            return {"mkdir": "ok", **_status()}
        except OSError as e:
            return {"mkdir": e.errno, **_status()}

    try:
        return _in_child(go)
    finally:
        shutil.rmtree(d)


DENY_MKDIR = {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"],
              "syscalls": [{"names": ["mkdir", "mkdirat", "no_such_syscall"],
                            "action": "SCMP_ACT_ERRNO", "errnoRet": 13}]}


@pytest.mark.parametrize("nnp", [True, False])
def test_seccomp_profile_is_compiled_and_enforced(nnp: bool) -> None:
    program = seccomp.compile_profile(DENY_MKDIR)
    got = _mkdir_under_filter(program, nnp)
    assert got["mkdir"] == 13 and got["Seccomp"] == "2", got


@pytest.mark.parametrize("profile,error", [
    ([], "must be an object"),
    ({"defaultAction": "SCMP_ACT_NOPE"}, "defaultAction"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/x"}, "notify"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": "mkdir"}]}, "syscalls\\[0\\]"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO",
         "args": [{"index": 9, "value": 1, "op": "SCMP_CMP_EQ"}]}]}, "args\\[0\\]"),
])
def test_bad_profiles_name_the_field(profile: Any, error: str) -> None:
    with pytest.raises(seccomp.ProfileError, match=error):
        seccomp.compile_profile(profile)


def test_same_argument_twice_becomes_two_rules() -> None:
    """runc's rule; libseccomp alone refuses two comparisons of one argument."""
    seccomp.compile_profile({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["personality"], "action": "SCMP_ACT_ERRNO",
         "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_NE"},
                  {"index": 0, "value": 8, "op": "SCMP_CMP_NE"}]}]})


def _bundle(tmp: Path, spec: dict[str, Any]) -> Path:
    base: dict[str, Any] = {"process": {"args": ["sh"]}, "root": {"path": "rootfs"}}
    (tmp / "config.json").write_text(json.dumps({**base, **spec}))
    return tmp


def test_spec_fields_reach_the_agent_schema(tmp_path: Path) -> None:
    spec = oci.load_bundle(_bundle(tmp_path, {
        "process": {"args": ["sh"], "capabilities": {
            "bounding": ["CAP_KILL", "CAP_FUTURE_THING"], "effective": ["CAP_KILL"]}},
        "linux": {"maskedPaths": ["/proc/kcore"], "readonlyPaths": ["/proc/sys"],
                  "seccomp": DENY_MKDIR}}))
    assert list(spec.process.capabilities.bounding) == ["CAP_KILL"]  # unknown: ignored
    assert list(spec.process.capabilities.permitted) == []
    assert spec.masked_paths == ["/proc/kcore"] and spec.readonly_paths == ["/proc/sys"]
    assert spec.seccomp and spec.process.seccomp == spec.seccomp
    assert not oci.load_bundle(_bundle(tmp_path, {})).process.HasField("capabilities")


@pytest.mark.parametrize("linux_", [
    {"maskedPaths": ["proc/kcore"]},
    {"readonlyPaths": "/proc/sys"},
    {"seccomp": {"defaultAction": "SCMP_ACT_WHAT"}},
])
def test_bad_spec_fields_are_invalid_argument(tmp_path: Path, linux_: dict[str, Any]) -> None:
    with pytest.raises(ttrpc.InvalidArgument, match="OCI spec"):
        oci.load_bundle(_bundle(tmp_path, {"linux": linux_}))


def test_masked_and_readonly_paths(tmp_path: Path) -> None:
    """In a private mount namespace on the host: a masked file reads empty, a
    masked directory is empty, a read-only path refuses writes."""
    for d in ("secret-dir", "ro"):
        (tmp_path / d).mkdir()
    (tmp_path / "secret-dir" / "key").write_text("k")
    (tmp_path / "secret").write_text("s")

    def go() -> dict[str, Any]:
        linux.unshare(linux.CLONE_NEWNS)
        linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
        container.mask_paths([str(tmp_path / "secret"), str(tmp_path / "secret-dir"),
                              str(tmp_path / "missing")], [str(tmp_path / "ro")])
        try:
            (tmp_path / "ro" / "f").write_text("x")
            wrote = "yes"
        except OSError as e:
            wrote = os.strerror(e.errno or 0)
        return {"secret": (tmp_path / "secret").read_text(),
                "dir": os.listdir(tmp_path / "secret-dir"), "ro": wrote}

    got = _in_child(go)
    assert got == {"secret": "", "dir": [], "ro": "Read-only file system"}
    assert (tmp_path / "secret").read_text() == "s"  # the host's own view is untouched


def test_readonly_bind_is_readonly_in_a_helpers_namespace_too(tmp_path: Path) -> None:
    """The share hole: virtiofsd's mount namespace (a slave made before the
    bind) received a writable copy when the bind was remounted read-only
    afterwards.  linux.bind_tree attaches a tree that is read-only from
    the start, so every propagated copy is too."""
    src, shared = tmp_path / "src", tmp_path / "shared"
    src.mkdir()
    shared.mkdir()
    (src / "f").write_text("host")

    def go() -> dict[str, Any]:
        linux.unshare(linux.CLONE_NEWNS)
        linux.mount(None, "/", None, linux.MS_REC | linux.MS_SLAVE)
        linux.mount(str(shared), str(shared), None, linux.MS_BIND)
        linux.mount(None, str(shared), None, linux.MS_SHARED)
        r, w = os.pipe()
        go_on_r, go_on_w = os.pipe()
        helper = os.fork()
        if helper == 0:  # the helper: its own namespace, a slave of ours
            linux.unshare(linux.CLONE_NEWNS)
            linux.mount(None, "/", None, linux.MS_REC | linux.MS_SLAVE)
            os.write(w, b".")
            os.read(go_on_r, 1)
            with contextlib.suppress(OSError):
                (shared / "vol" / "f").write_text("guest")
            os._exit(0)
        os.read(r, 1)
        (shared / "vol").mkdir()
        linux.bind_tree(str(src), str(shared / "vol"), readonly=True)
        os.write(go_on_w, b".")
        os.waitpid(helper, 0)
        return {"nosuid": "nosuid" in _options(shared / "vol")}

    got = _in_child(go)
    assert (src / "f").read_text() == "host", "written through the helper's copy"
    assert got == {"nosuid": True}


def _options(path: Path) -> list[str]:
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if fields[1] == str(path):
                return fields[3].split(",")
    return []


def test_device_rules_from_the_spec(tmp_path: Path) -> None:
    spec = oci.load_bundle(_bundle(tmp_path, {"linux": {"resources": {"devices": [
        {"allow": False, "access": "rwm"}, {"allow": True, "type": "c", "major": 1,
                                            "minor": 3, "access": "rw"}]}}}))
    assert [(d.allow, d.type, d.major, d.minor, d.access) for d in spec.devices] == [
        (False, "a", -1, -1, "rwm"), (True, "c", 1, 3, "rw"), *oci.RUNC_ALLOWED_DEVICES]
    for bad in ({"allow": True, "type": "x"}, {"allow": True, "access": "rwx"}, "c 1:3 rwm"):
        with pytest.raises(ttrpc.InvalidArgument, match="devices"):
            oci.load_bundle(_bundle(tmp_path, {"linux": {"resources": {"devices": [bad]}}}))


def test_cli_privileges() -> None:
    default, privileged = oci.Privileges(), oci.Privileges(privileged=True)
    assert "/proc/kcore" in default.masked_paths and "/proc/sys" in default.readonly_paths
    assert privileged.masked_paths == () and privileged.readonly_paths == ()
    assert default.devices[0].type == "a" and not default.devices[0].allow
    assert [(d.allow, d.type) for d in privileged.devices] == [(True, "a")]
    assert list(oci.Privileges(cap_drop=("ALL",)).capabilities().bounding) == []


@pytest.mark.parametrize("user", [{"uid": 2**33}, {"uid": -1}, {"gid": 2**32 - 1},
                                  {"additionalGids": ["wheel"]}, {"uid": True}])
def test_user_ids_out_of_range_are_invalid_argument(tmp_path: Path,
                                                     user: dict[str, Any]) -> None:
    """Before: protobuf's ValueError reached containerd as an internal error."""
    with pytest.raises(ttrpc.InvalidArgument, match="user"):
        oci.load_bundle(_bundle(tmp_path, {"process": {"args": ["sh"], "user": user}}))
