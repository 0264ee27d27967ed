"""`microvm run` against real VMs (TCG here): what a user sees and what is left."""

from __future__ import annotations

import json
import os
import platform
import pty
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import (
    Microvm,
    Result,
    assert_no_leaks,
    helper_processes,
    pty_expect,
    pty_winsize,
    write_config,
)

pytestmark = pytest.mark.vm
DRIVER = Path(__file__).with_name("sandbox_driver.py")


def test_guest_kernel_is_not_the_hosts(microvm: Microvm) -> None:
    r = microvm.run("run", "--rm", "busybox", "--", "sh", "-c", "uname -r; dmesg | head -3")
    assert r.returncode == 0, r.stderr
    release, *dmesg = r.stdout.splitlines()
    assert release != platform.release()
    assert release.endswith("-kata-py")
    # The guest's own boot log, not the host's.
    assert dmesg[0].startswith(f"Linux version {release} ")


@pytest.mark.parametrize("command,status", [
    ("exit 0", 0),
    ("exit 7", 7),
    # PID 1 of the container ignores signals it has no handler for (as under
    # docker), so a handler turns SIGINT into the conventional 130.
    ("trap 'exit 130' INT; kill -INT $$; sleep 5", 130),
    # sh reports a child killed by SIGKILL as 128+9.
    ("sleep 30 & kill -9 $!; wait $!", 137),
])
def test_exit_status(microvm: Microvm, command: str, status: int) -> None:
    r = microvm.run("run", "--rm", "busybox", "--", "sh", "-c", command)
    assert r.returncode == status, r.stderr


def test_signals_reach_the_process_and_set_its_status(microvm: Microvm) -> None:
    """SIGKILL of the container's init gives 137, SIGINT of an exec gives 130."""
    r = subprocess.run([sys.executable, str(DRIVER), str(microvm.config), "signals"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"exec_sigint": 130, "init_sigkill": 137}


def test_exec_joins_the_container(microvm: Microvm) -> None:
    r = subprocess.run([sys.executable, str(DRIVER), str(microvm.config), "exec"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    # The exec sees the container's pid namespace: its init is pid 1.
    assert got["out"].splitlines()[0] == "1"
    assert got["status"] == 4
    assert got["missing"] == "CommandNotFound"


def test_two_containers_share_one_guest(microvm: Microvm) -> None:
    r = subprocess.run([sys.executable, str(DRIVER), str(microvm.config), "two"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["a"][0] == got["b"][0]          # one guest boot id
    assert got["a"][1] == got["b"][1] == "1"   # each its own pid namespace


def test_ctrl_c_is_delivered_as_sigint(microvm: Microvm) -> None:
    p = microvm.popen("run", "--rm", "busybox", "--", "sh", "-c",
                      "trap 'echo caught; exit 130' INT; echo ready; "
                      "while :; do sleep 0.1; done",
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None
    assert p.stdout.readline() == b"ready\n"
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert out == b"caught\n"
    assert p.returncode == 130, err


def test_stdin_round_trip_is_byte_identical(microvm: Microvm) -> None:
    data = os.urandom(1 << 20)
    p = subprocess.run(microvm.argv("run", "--rm", "-i", "busybox", "--", "cat"), input=data,
                       capture_output=True, timeout=120)
    assert p.returncode == 0
    assert len(p.stdout) == len(data)
    assert p.stdout == data


def test_stdout_and_stderr_stay_apart(microvm: Microvm) -> None:
    r = microvm.run("run", "--rm", "busybox", "--", "sh", "-c", "echo out; echo err >&2")
    assert r.stdout == "out\n"
    assert r.error_lines == ["err"]


def test_env_workdir_user_hostname(microvm: Microvm) -> None:
    r = microvm.run("run", "--rm", "-e", "FOO=bar baz", "-w", "/tmp/work", "-u", "nobody",
                    "--hostname", "box1", "busybox", "--", "sh", "-c",
                    'echo "$FOO"; pwd; id -u; id -g; hostname')
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["bar baz", "/tmp/work", "65534", "65534", "box1"]


def test_uid_gid_numeric(microvm: Microvm) -> None:
    r = microvm.run("run", "--rm", "-u", "1234:5678", "busybox", "--", "sh", "-c", "id -u; id -g")
    assert r.stdout.split() == ["1234", "5678"]


def test_rootfs_writes_stay_in_the_container(microvm: Microvm) -> None:
    r = microvm.run("run", "--rm", "busybox", "--", "sh", "-c",
                    "echo hi > /etc/kata-py-test && cat /etc/kata-py-test")
    assert r.stdout == "hi\n"
    assert not Path("/var/lib/kata-py/rootfs/busybox/etc/kata-py-test").exists()


def test_read_only_rootfs(microvm: Microvm) -> None:
    r = microvm.run("run", "--rm", "--read-only", "busybox", "--", "sh", "-c",
                    "touch /x 2>&1; echo $?")
    assert "Read-only file system" in r.stdout
    assert r.stdout.splitlines()[-1] != "0"


def test_directory_rootfs(microvm: Microvm, tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    (root / "bin/busybox").write_bytes(Path("/bin/busybox").read_bytes())
    (root / "bin/busybox").chmod(0o755)
    r = microvm.run("run", "--rm", str(root), "/bin/busybox", "echo", "from a directory")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "from a directory\n"
    # proc, sys and dev were made for the mounts, in the container's upper layer only.
    assert sorted(p.name for p in root.iterdir()) == ["bin"]


def test_tty_and_resize(microvm: Microvm) -> None:
    """-it: a real pty in the guest that follows our terminal's size."""
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(microvm.argv()[0], microvm.argv("run", "--rm", "-it", "busybox", "sh"))
    try:
        pty_winsize(fd, 30, 100)
        pty_expect(fd, b"# ")
        os.write(fd, b"tty; stty size\n")
        out = pty_expect(fd, b"30 100")
        assert b"/dev/pts/" in out
        # The terminal grows: the kernel sends SIGWINCH to the CLI, which resizes the guest pty.
        pty_winsize(fd, 40, 120)
        time.sleep(0.5)
        os.write(fd, b"stty size\n")
        pty_expect(fd, b"40 120")
        os.write(fd, b"exit 5\n")
        pty_expect(fd, b"exit 5")
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 5


def test_ten_runs_leave_nothing_behind(microvm: Microvm) -> None:
    tmp_before = set(os.listdir("/tmp"))
    for i in range(10):
        r = microvm.run("run", "--rm", "busybox", "--", "echo", str(i))
        assert r.stdout == f"{i}\n", r.stderr
        assert_no_leaks(timeout=2)
    assert set(os.listdir("/tmp")) - tmp_before == set()


def test_sigkill_of_the_cli_leaves_nothing(microvm: Microvm) -> None:
    p = microvm.popen("run", "--rm", "busybox", "--", "sh", "-c", "echo up; sleep 1000",
                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert p.stdout is not None
    assert p.stdout.readline() == b"up\n"
    assert helper_processes(), "the VM should be running"
    p.kill()
    p.wait()
    assert_no_leaks(timeout=10)


def _qemu_status(microvm: Microvm) -> tuple[int, dict[str, str]]:
    """Run a container; QEMU's pid and /proc status while it runs."""
    p = microvm.popen("run", "--rm", "busybox", "--", "sh", "-c", "echo up; sleep 1000",
                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert p.stdout is not None and p.stdout.readline() == b"up\n"
        (qemu,) = [int(line.split()[0]) for line in helper_processes() if "qemu-system" in line]
        with open(f"/proc/{qemu}/status") as f:
            status = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    finally:
        p.kill()
        p.wait()
    assert_no_leaks(timeout=10)  # a change of user clears the parent-death signal: set after
    return qemu, status


@pytest.mark.parametrize("user", ["dynamic", "nobody"])
def test_qemu_runs_unprivileged(microvm: Microvm, tmp_path: Path, artifacts: Path,
                                user: str) -> None:
    """dynamic (the default): a uid and gid of its own, 0x7F000000 + its pid;
    no capabilities, no groups; it still dies with a SIGKILLed owner."""
    cfg = write_config(tmp_path / "c.yaml", artifacts, qemu_user=user)
    qemu, status = _qemu_status(Microvm(microvm.log_dir, cfg))
    uid = 0x7F000000 + qemu if user == "dynamic" else 65534
    gid = 0x7F000000 + qemu if user == "dynamic" else 65534
    assert status["Uid"].split() == [str(uid)] * 4
    assert status["Gid"].split() == [str(gid)] * 4
    assert status["Groups"].strip() == ""
    assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == 0


def _pss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Pss:")) / 1024


def test_freed_guest_memory_goes_back_to_the_host(microvm: Microvm) -> None:
    """Free page reporting: 64 MiB a container touched and freed leaves QEMU
    within seconds (without it, QEMU would keep all 64 MiB).  A cold boot's:
    clones have no balloon (test_template.py: QEMU 7.2 would punch the pages
    out of the template's RAM file, under every other clone)."""
    p = microvm.popen("run", "--rm", "--no-template", "busybox", "--", "sh", "-c",
                      "echo up; sleep 2; dd if=/dev/zero of=/dev/null bs=64M count=1 2>/dev/null;"
                      " echo freed; sleep 1000", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert p.stdout is not None and p.stdout.readline() == b"up\n"
        (qemu,) = [int(line.split()[0]) for line in helper_processes() if "qemu-system" in line]
        before = _pss_mib(qemu)
        assert p.stdout.readline() == b"freed\n"
        deadline = time.monotonic() + 15
        while (grown := _pss_mib(qemu) - before) > 24 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert grown <= 24, f"QEMU kept {grown:.1f} MiB of the 64 MiB the guest freed"
    finally:
        p.kill()
        p.wait()
    assert_no_leaks(timeout=10)


def test_qemu_user_root_and_an_unknown_user(microvm: Microvm, tmp_path: Path,
                                            artifacts: Path) -> None:
    cfg = write_config(tmp_path / "root.yaml", artifacts, qemu_user="root")
    _, status = _qemu_status(Microvm(microvm.log_dir, cfg))
    assert status["Uid"].split() == ["0"] * 4
    cfg = write_config(tmp_path / "bad.yaml", artifacts, qemu_user="no-such-user-kp")
    r = Microvm(microvm.log_dir, cfg).run("run", "--rm", "busybox", "true")
    assert r.returncode == 125 and len(r.error_lines) == 1, r.stderr
    assert "qemu_user 'no-such-user-kp': no such user" in r.error_lines[0]
    assert_no_leaks()


# -- bad input: one line, docker's exit code, nothing left behind ----------------


def _one_line(r: Result, code: int, *words: str) -> None:
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.error_lines) == 1, r.stderr
    for w in words:
        assert w in r.error_lines[0]


def test_missing_rootfs(microvm: Microvm) -> None:
    _one_line(microvm.run("run", "--rm", "/nonexistent/rootfs", "true"), 125, "no such directory")


def test_command_not_found(microvm: Microvm) -> None:
    _one_line(microvm.run("run", "--rm", "busybox", "no-such-command"), 127, "no-such-command")


def test_command_not_executable(microvm: Microvm) -> None:
    _one_line(microvm.run("run", "--rm", "busybox", "/etc/passwd"), 126, "permission denied")


def test_absurd_memory(microvm: Microvm) -> None:
    _one_line(microvm.run("run", "--rm", "--memory", "99999999", "busybox", "true"), 125,
              "memory")


def test_missing_kernel(microvm: Microvm) -> None:
    _one_line(microvm.run("run", "--rm", "--kernel", "/nonexistent/vmlinuz", "busybox", "true"),
              125, "/nonexistent/vmlinuz")


def test_bad_config_key(microvm: Microvm, tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("memory: 512\n")
    r = subprocess.run(microvm.argv()[:1] + ["--config", str(cfg), "run", "busybox", "true"],
                       capture_output=True, text=True)
    assert r.returncode == 125
    assert r.stderr.strip().splitlines() == [
        f"microvm: error: {cfg}: unknown key 'memory'"]


def test_unknown_flag_is_a_usage_error(microvm: Microvm) -> None:
    r = microvm.run("run", "--no-such-flag", "busybox", "true")
    assert r.returncode == 125
    assert "no such option" in r.stderr.lower()


def test_boot_timeout_shows_the_console_and_cleans_up(microvm: Microvm, tmp_path: Path,
                                                       artifacts: Path) -> None:
    # A cold boot: a clone answers well within 0.3 s.
    cfg = write_config(tmp_path / "slow.yaml", artifacts, boot_timeout=0.3, template=False)
    r = subprocess.run(microvm.argv()[:1] + ["--config", str(cfg), "run", "busybox", "true"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 125
    assert "did not answer within 0.3s" in r.stderr
    assert "Traceback" not in r.stderr


def test_kernel_that_panics_is_named(microvm: Microvm, tmp_path: Path,
                                                artifacts: Path) -> None:
    """A guest that dies during boot: the error names the panic and its reason."""
    cfg = write_config(tmp_path / "panic.yaml", artifacts, kernel_params="rdinit=/nonexistent")
    r = subprocess.run(microvm.argv()[:1] + ["--config", str(cfg), "run", "busybox", "true"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 125
    # The panic's own reason, not the console's last lines.
    assert "error: guest kernel panicked: VFS: Unable to mount root fs" in r.stderr, r.stderr


def test_qmp_status_pause_resume(microvm: Microvm) -> None:
    r = subprocess.run([sys.executable, str(DRIVER), str(microvm.config), "qmp"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["states"] == ["running", "paused", "running"]
    assert [e for e in got["events"] if e in ("STOP", "RESUME")] == ["STOP", "RESUME"]
    assert got["status"] == 0


def test_check_reports_what_runs_here(microvm: Microvm) -> None:
    r = microvm.run("check")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "microvm check: ready" in r.stdout
    if Path("/sys/module/kvm_pvm").exists() and not Path("/sys/module/kvm_intel").exists():
        assert "tcg" in r.stdout and "kvm_pvm" in r.stdout
    assert "ok   busybox" in r.stdout and "ok   iptables" in r.stdout
    assert "ok   qemu user      a uid of its own per VM, no capabilities" in r.stdout


def test_check_judges_the_qemu_user(microvm: Microvm, tmp_path: Path, artifacts: Path) -> None:
    for user, code, line in (("root", 0, "warn qemu user      root"),
                             ("no-such-user-kp", 1, "FAIL qemu user      qemu_user "
                                                    "'no-such-user-kp': no such user")):
        cfg = write_config(tmp_path / f"{user}.yaml", artifacts, qemu_user=user)
        r = subprocess.run(microvm.argv()[:1] + ["--config", str(cfg), "check"],
                           capture_output=True, text=True)
        assert r.returncode == code and line in r.stdout, r.stdout


def test_check_names_the_busybox_of_the_builtin_image(microvm: Microvm) -> None:
    """The guest's own `ip` is in the guest image now; the host's busybox
    only makes the built-in `busybox` image."""
    r = subprocess.run(microvm.argv("check"), capture_output=True, text=True)
    assert "/bin/busybox (the built-in busybox image)" in r.stdout, r.stdout


def test_check_fails_without_a_kernel(microvm: Microvm, tmp_path: Path, artifacts: Path) -> None:
    cfg = write_config(tmp_path / "nokernel.yaml", artifacts, kernel="/nonexistent/bzImage")
    r = subprocess.run(microvm.argv()[:1] + ["--config", str(cfg), "check"],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert "/nonexistent/bzImage not built" in r.stdout
    assert "fix: scripts/quickstart" in r.stdout


@pytest.mark.skipif(os.path.exists("/dev/vhost-vsock"), reason="vhost-vsock exists here")
def test_vsock_transport_without_vhost_vsock(microvm: Microvm, tmp_path: Path,
                                             artifacts: Path) -> None:
    """The vsock path needs /dev/vhost-vsock, which these machines lack: a clear error."""
    cfg = write_config(tmp_path / "vsock.yaml", artifacts, transport="vsock")
    r = subprocess.run(microvm.argv()[:1] + ["--config", str(cfg), "run", "busybox", "true"],
                       capture_output=True, text=True)
    assert r.returncode == 125
    assert r.stderr.strip().splitlines()[-1] == (
        "microvm: error: transport vsock requested but /dev/vhost-vsock is not usable")


def test_volumes_rw_ro_file_and_no_escape(microvm: Microvm, tmp_path: Path) -> None:
    rw, ro, single = tmp_path / "rw", tmp_path / "ro", tmp_path / "single"
    rw.mkdir()
    ro.mkdir()
    (ro / "f").write_text("host-file\n")
    single.write_text("single\n")
    # A rootfs whose /escape points far above its root: the mount must land
    # inside the container's root, as the container would resolve the link.
    root = tmp_path / "rootfs"
    shutil.copytree("/var/lib/kata-py/rootfs/busybox", root, symlinks=True)
    (root / "escape").symlink_to("/../../../../run")
    r = microvm.run("run", "--rm", "-v", f"{rw}:/data", "-v", f"{ro}:/conf:ro",
                    "-v", f"{single}:/etc/single:ro", "-v", f"{rw}:/escape/here", str(root),
                    "sh", "-c", "echo written > /data/out; cat /conf/f /etc/single; "
                    "echo x > /conf/f 2>/dev/null || echo ro-refused; ls /run/here")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["host-file", "single", "ro-refused", "out"]
    assert (rw / "out").read_text() == "written\n"
    assert (ro / "f").read_text() == "host-file\n"


@pytest.mark.parametrize("flag, value, message", [
    ("--network", "ns:/var/run/netns/kata-py-no-such-ns", "no such network namespace"),
    ("--network", "ns:/etc/hostname", "is not a network namespace"),
    ("--network", "bogus", "expected bridge, none or ns:PATH"),
    ("-v", "data:/data", "named volumes are not supported"),
    ("-v", "/tmp:data", "must be absolute"),
    ("-v", "/tmp:/data:rx", "unknown option 'rx'"),
    ("-v", "/tmp", "expected /HOST/PATH:/CONTAINER/PATH"),
    ("-p", "99999:80", "invalid port '99999'"),
    ("-p", "80", "expected [IP:]HOST:CONTAINER"),
    ("-p", "80:80/sctp", "invalid protocol 'sctp'"),
    ("-p", "nohost:80:80", "invalid host address 'nohost'"),
    ("--hostname", "evil\n6.6.6.6\tbank.example", "invalid hostname"),
    ("--hostname", "h" * 300, "longer than 64 characters"),
    ("-u", "99999999999999999999", "uid and gid must be numbers from 0 to 4294967294"),
    ("-u", "0:4294967295", "uid and gid must be numbers from 0 to 4294967294"),
    ("-v", "/tmp:/proc", "invalid mount destination"),
    ("-v", "/tmp:/sys/fs/cgroup", "invalid mount destination"),
    ("-v", "/tmp:/dev/pts", "invalid mount destination"),
    ("--name", "", "--name goes with -d"),
])
def test_bad_run_flags_are_one_line(microvm: Microvm, flag: str, value: str,
                                    message: str) -> None:
    """Refused before anything starts: exit 125, one line, nothing left behind."""
    net = ["--network", "bridge"] if flag == "-p" else []
    r = microvm.run("run", "--rm", *net, flag, value, "busybox", "true")
    assert r.returncode == 125
    assert len(r.error_lines) == 1 and message in r.error_lines[0], r.stderr


@pytest.mark.parametrize("flags, message", [
    (["--name", ""], "invalid container name ''"),
    (["--name", "x"], "invalid container name 'x'"),
    (["--name", "kt-badhost", "--hostname", "a\nb"], "invalid hostname"),
    (["--name", "kt-baduser", "-u", "99999999999999999999"], "uid and gid must be numbers"),
])
def test_bad_detached_flags_are_one_line(microvm: Microvm, flags: list[str],
                                         message: str) -> None:
    """Refused before a bundle or a shim exists: exit 125, one line."""
    before = set(os.listdir("/var/lib/kata-py/containers")) \
        if os.path.isdir("/var/lib/kata-py/containers") else set()
    r = microvm.run("run", "-d", *flags, "busybox", "true")
    assert r.returncode == 125
    assert len(r.error_lines) == 1 and message in r.error_lines[0], r.stderr
    after = set(os.listdir("/var/lib/kata-py/containers")) \
        if os.path.isdir("/var/lib/kata-py/containers") else set()
    assert after <= before
