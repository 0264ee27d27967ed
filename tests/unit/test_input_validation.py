"""Input from the command line, config files and OCI specs: every bad value
is one clear line (exit 125 from the CLI), refused before a VM boots, and
never echoes what a file holds.

The CLI cases run the real `microvm` in a subprocess with a config whose
kernel does not exist: even a check that fails to refuse boots nothing.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from microvm import config, paths
from microvm.cli import commands, detached
from microvm.config import load
from microvm.core.volumes import from_oci, parse_volume
from microvm.errors import ConfigError, KataError
from microvm.net import network

SECRET = "$y$j9T$Zq3n0tAr3alHash$s3cr3tS4lt"


@pytest.fixture(autouse=True)
def no_host_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("KATA_PY_CONFIG", raising=False)
    monkeypatch.setattr(paths, "CONFIG", tmp_path / "absent.yaml")


def microvm(tmp_path: Path, *args: str, config_file: Path | None = None
            ) -> subprocess.CompletedProcess[str]:
    """The real CLI; a config that can boot nothing (no such kernel) and
    makes no network."""
    if config_file is None:
        config_file = tmp_path / "config.yaml"
        config_file.write_text(yaml.safe_dump({
            "kernel": str(tmp_path / "no-such-vmlinuz"), "network": "none",
            "log_dir": str(tmp_path / "logs")}))
    return subprocess.run([sys.executable, "-m", "microvm", "--config", str(config_file),
                           *args], capture_output=True, text=True, timeout=60)


def one_line(r: subprocess.CompletedProcess[str], *words: str) -> str:
    lines = [line for line in r.stderr.splitlines() if "using TCG emulation" not in line]
    assert r.returncode == 125, r.stderr
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


# --- 1. --config never echoes the file it reads --------------------------------


def shadow(tmp_path: Path) -> Path:
    p = tmp_path / "shadow"
    p.write_text(f"toor:{SECRET}:20228:0:99999:7:::\ndaemon:*:20228:0:99999:7:::\n")
    return p


def test_config_shadow_like_file_is_not_echoed(tmp_path: Path) -> None:
    p = shadow(tmp_path)
    with pytest.raises(ConfigError) as e:
        load(p)
    msg = str(e.value)
    assert str(p) in msg and "line 1" in msg and "unknown key" in msg
    assert "toor" not in msg and SECRET not in msg and "20228" not in msg


def test_config_shadow_through_the_cli(tmp_path: Path) -> None:
    r = microvm(tmp_path, "run", "--rm", "busybox", "true", config_file=shadow(tmp_path))
    line = one_line(r, str(tmp_path / "shadow"), "line 1")
    assert "toor" not in line and SECRET not in r.stderr + r.stdout


@pytest.mark.parametrize(("text", "words"), [
    (f"a: *{SECRET[3:9]}\n", ["not valid YAML at line 1"]),
    (f"accel: {SECRET}\n", ["accel must be one of"]),
    (f"qemu_user: '{SECRET}'\n", ["qemu_user"]),
    (f"bridge_subnet: '{SECRET}'\n", ["bridge_subnet"]),
    (f"vcpus: '{SECRET}'\n", ["vcpus must be of type int, not str"]),
    (f"{SECRET}\n", ["not a YAML mapping"]),
    (f"- {SECRET}\n", ["not a YAML mapping"]),
    (f"k: v\n{SECRET}: [\n", ["not valid YAML at line"]),
    (f"'{SECRET}': 1\n", ["line 1: unknown key"]),
    (f"? [{SECRET}]\n: 1\n", ["not valid YAML"]),
])
def test_config_errors_never_quote_the_file(tmp_path: Path, text: str,
                                            words: list[str]) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load(p)
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg
    for w in words:
        assert w in msg
    assert SECRET[3:9] not in msg.replace(str(p), "")


@pytest.mark.parametrize(("content", "words"), [
    (b"a: \x00secret\n", "not valid YAML: character 3"),
    (b"\xff\xfesecret", "not UTF-8 text"),
])
def test_config_binary_files(tmp_path: Path, content: bytes, words: str) -> None:
    p = tmp_path / "c.bin"
    p.write_bytes(content)
    with pytest.raises(ConfigError, match=words) as e:
        load(p)
    assert "secret" not in str(e.value).replace(str(p), "")


def test_config_endless_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a config file"):
        load("/dev/zero")
    big = tmp_path / "big.yaml"
    big.write_text("#" * (config.MAX_FILE_BYTES + 1))
    with pytest.raises(ConfigError, match="not a config file"):
        load(big)


def test_config_plain_words_are_still_named(tmp_path: Path) -> None:
    """A typo in a real config file is named, as before."""
    p = tmp_path / "c.yaml"
    p.write_text("vcpus: 1\nmemory: 512\n")
    with pytest.raises(ConfigError, match="unknown key 'memory'"):
        load(p)
    p.write_text("accel: xen\n")
    with pytest.raises(ConfigError, match="not 'xen'"):
        load(p)


# --- 2, 3. host names: RFC 1123, at most the kernel's 64 ----------------------------


@pytest.mark.parametrize("name", ["a", "box1", "web-1.example.org", "A" * 63,
                                  ".".join(["abcdefghijklmno"] * 4)])
def test_hostname_accepted(name: str) -> None:
    assert len(name) <= 64
    assert network.hostname_problem(name) is None


@pytest.mark.parametrize(("name", "problem"), [
    ("evil\n10.0.0.1\tbank.example", "RFC 1123"),
    ("a b", "RFC 1123"), ("-a", "RFC 1123"), ("a-", "RFC 1123"), ("a..b", "RFC 1123"),
    ("a.", "RFC 1123"), ("a_b", "RFC 1123"), ("é", "RFC 1123"), ("x\0", "RFC 1123"),
    ("a" * 64 + ".b", "longer than 64"), ("a" * 300, "longer than 64"),
    ("b" * 64, "RFC 1123"),  # a label is at most 63
])
def test_hostname_refused(name: str, problem: str) -> None:
    assert problem in (network.hostname_problem(name) or "")
    with pytest.raises(KataError) as e:
        network.check_hostname(name)
    assert "\n" not in str(e.value)


def test_etc_files_never_write_a_second_hosts_line() -> None:
    with pytest.raises(KataError):
        network.etc_files("evil\n6.6.6.6\tbank.example", "10.89.0.2")
    files = network.etc_files("web", "10.89.0.2")
    assert files["etc/hosts"].splitlines()[-1] == "10.89.0.2\tweb"


@pytest.mark.parametrize("detach", [[], ["-d"]])
@pytest.mark.parametrize("name", ["evil\n6.6.6.6\tbank.example", "h" * 300])
def test_cli_hostname_refused_before_boot(tmp_path: Path, name: str, detach: list[str]) -> None:
    r = microvm(tmp_path, "run", "--rm", *detach, "--hostname", name, "busybox", "true")
    one_line(r, "invalid hostname")
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").iterdir())


def test_shim_refuses_a_spec_hostname_before_boot(tmp_path: Path) -> None:
    """The shim's Create (containerd's path) refuses it before any VM."""
    from microvm.protocol import task_pb2, ttrpc
    from microvm.shim.task_service import TaskService

    bundle = tmp_path / "bundle"
    (bundle / "rootfs").mkdir(parents=True)
    (bundle / "config.json").write_text(json.dumps({
        "ociVersion": "1.0.2", "hostname": "pod\n6.6.6.6 bank.example",
        "process": {"args": ["true"], "cwd": "/"}, "root": {"path": "rootfs"}}))
    booted = []

    async def body() -> None:
        svc = TaskService("default", None, lambda: None)

        async def no_boot(*args: object) -> None:
            booted.append(args)
            raise AssertionError("a VM was asked for")
        svc._ensure_sandbox = no_boot  # type: ignore[method-assign, assignment]
        with pytest.raises(ttrpc.InvalidArgument, match="hostname: not an RFC 1123"):
            await svc.Create(task_pb2.CreateTaskRequest(id="c1", bundle=str(bundle)),
                             ttrpc.CallContext("s", "Create", {}, None))
        assert svc.containers == {}
    asyncio.run(body())
    assert booted == []


# --- 4. uid and gid: 0 to 2^32-2 ------------------------------------------------------


@pytest.mark.parametrize("user", ["99999999999999999999", "0:99999999999999999999",
                                  "4294967295", "1" * 5000, "\u00b2", "0:\u0661"])
def test_cli_run_user_out_of_range(tmp_path: Path, user: str) -> None:
    r = microvm(tmp_path, "run", "--rm", "-u", user, "busybox", "true")
    one_line(r, "uid and gid must be numbers from 0 to 4294967294")


@pytest.mark.parametrize("user", ["99999999999999999999", "1:4294967295", "\u00b2"])
def test_cli_exec_user_out_of_range(tmp_path: Path, user: str) -> None:
    r = microvm(tmp_path, "exec", "-u", user, "no-such-container", "true")
    one_line(r, "uid and gid must be numbers from 0 to 4294967294")


def test_user_ids_at_the_edges(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text("big:x:4294967295:0::/:/bin/sh\n"
                                         "odd:x:\u00b2:0::/:/bin/sh\n")
    assert commands._lookup_user(tmp_path, "-u", "4294967294:0")[:2] == (4294967294, 0)
    with pytest.raises(KataError, match="gives an id outside"):
        commands._lookup_user(tmp_path, "-u", "big")
    with pytest.raises(KataError, match="has an invalid id"):
        commands._lookup_user(tmp_path, "-u", "odd")


# --- 5. -v may not cover /proc, /sys or /dev --------------------------------------------


@pytest.mark.parametrize("dest", ["/proc", "/proc/sys", "/sys", "/sys/fs/cgroup", "/dev",
                                  "/dev/pts", "/proc/", "//proc", "/x/../proc/sys",
                                  "/dev/./shm"])
def test_volume_destination_reserved(tmp_path: Path, dest: str) -> None:
    with pytest.raises(KataError, match="invalid mount destination") as e:
        parse_volume(f"{tmp_path}/src:{dest}")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "src").exists()  # refused before the host dir is made


@pytest.mark.parametrize("dest", ["/procfs", "/sysroot", "/devices", "/data/proc", "//data"])
def test_volume_destination_near_misses_accepted(tmp_path: Path, dest: str) -> None:
    v = parse_volume(f"{tmp_path}:{dest}")
    assert v.destination == "/" + dest.lstrip("/")


def test_cli_volume_on_proc(tmp_path: Path) -> None:
    r = microvm(tmp_path, "run", "--rm", "-v", f"{tmp_path}:/proc", "busybox", "true")
    one_line(r, "invalid mount destination", "/proc")


# --- 6. --name: docker's rule -----------------------------------------------------


@pytest.mark.parametrize("name", ["", "a", "-x", "a b", "x/../y", "web\n", "w" * 65, "é1"])
def test_new_container_name_refused(name: str) -> None:
    with pytest.raises(KataError, match="invalid container name"):
        detached.check_name(name)


@pytest.mark.parametrize("name", ["ab", "web", "Web_1.x-y", "0a", "w" * 64])
def test_new_container_name_accepted(name: str) -> None:
    detached.check_name(name)


def test_name_with_a_trailing_newline_is_no_directory() -> None:
    with pytest.raises(KataError, match="invalid container name"):
        detached._dir("web\n")


@pytest.mark.parametrize("name", ["", "a", "bad name"])
def test_cli_name_refused_before_anything(tmp_path: Path, name: str) -> None:
    r = microvm(tmp_path, "run", "-d", "--name", name, "busybox", "true")
    one_line(r, "invalid container name")


def test_cli_empty_name_without_detach(tmp_path: Path) -> None:
    one_line(microvm(tmp_path, "run", "--rm", "--name", "", "busybox", "true"),
             "--name goes with -d")


@pytest.mark.parametrize("dest", ["/proc/sys", "/proc/sysrq-trigger", "//proc/sys/kernel",
                                  "/proc/1/root"])
def test_spec_mount_inside_proc_refused(dest: str) -> None:
    """As runc's checkProcMount: an OCI spec may not bind over /proc's knobs."""
    with pytest.raises(ValueError, match="inside /proc"):
        from_oci([{"destination": dest, "type": "bind", "source": "/tmp", "options": ["rbind"]}])


def test_spec_mounts_runc_allows_stay() -> None:
    mounts = [{"destination": d, "type": "bind", "source": "/tmp", "options": ["rbind"]}
              for d in ("/proc/meminfo", "/dev/termination-log", "/sys/fs/x", "/data")]
    mounts.append({"destination": "/proc", "type": "proc", "source": "proc"})
    assert [v.destination for v in from_oci(mounts)] == [
        "/proc/meminfo", "/dev/termination-log", "/sys/fs/x", "/data"]


def test_cli_secure_flavour_refuses_another_kernel(tmp_path: Path) -> None:
    one_line(microvm(tmp_path, "run", "--rm", "--firmware", "secure", "--kernel", "/x",
                     "busybox", "true"), "--kernel does not apply to the secure flavour")


def test_cli_attest_of_an_unknown_container(tmp_path: Path) -> None:
    one_line(microvm(tmp_path, "attest", "no-such-ctr"), "no-such-ctr")
