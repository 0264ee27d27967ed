"""`microvm check`: one line per capability, with the fix for what is missing."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import click

from microvm import linux
from microvm.config import Config
from microvm.core.sandbox import vhost_vsock_usable
from microvm.errors import KataError
from microvm.images import rootfs
from microvm.vm import accel as accel_mod
from microvm.vm import qemuuser, template


def _line(ok: bool | None, what: str, detail: str, fix: str = "") -> None:
    mark = {True: click.style("ok  ", fg="green"), False: click.style("FAIL", fg="red"),
            None: click.style("warn", fg="yellow")}[ok]
    text = f"{mark} {what:<14} {detail}"
    if fix and ok is not True:
        text += f"\n     {'':<14} fix: {fix}"
    click.echo(text)


def _check_secure(cfg: Config, fix: bool) -> bool:
    """The secure flavour's pieces; True when one it needs is missing and
    the config asks for it (otherwise only a warning)."""
    from microvm.vm import firmware

    need = cfg.firmware == "secure"
    missing = []
    for what, path, pkg in (("OVMF", firmware.OVMF_CODE, "ovmf"),
                            ("swtpm", shutil.which("swtpm"), "swtpm swtpm-tools"),
                            ("sbsign", shutil.which("sbsign"), "sbsigntool")):
        if not path or not os.path.exists(path):
            missing.append(f"{what} (apt-get install {pkg})")
    layout = firmware.Layout()
    if fix and not missing:
        try:
            for line in firmware.prepare(layout):
                click.echo(f"     {'':<14} {line}")
        except KataError as e:
            _line(False, "secure boot", str(e), "kernels/build --flavour secure")
            return need
    if missing:
        _line(False if need else None, "secure boot", "missing: " + ", ".join(missing),
              "apt-get install ovmf swtpm swtpm-tools sbsigntool (optional: --firmware secure)")
        return need
    if not layout.signed.exists() or not layout.varstore.exists():
        _line(False if need else None, "secure boot",
              "no keys, varstore or signed kernel yet", "microvm check --fix")
        return need
    try:
        state = firmware.varstore_state(layout.varstore)
    except KataError as e:
        _line(False if need else None, "secure boot", str(e), "microvm check --fix")
        return need
    enrolled = "; ".join(f"{n}: {', '.join(state.certificates.get(n, [])) or 'none'}"
                         for n in firmware.KEY_NAMES)
    _line(state.secure_boot or (None if not need else False), "secure boot",
          f"{'enforced' if state.secure_boot else 'NOT enforced'} in {layout.varstore} "
          f"({enrolled}); OVMF {firmware.OVMF_CODE.name}, swtpm, sbsign present",
          "microvm check --fix")
    return need and not state.secure_boot


def run_checks(cfg: Config, fix: bool = False) -> int:
    """0 when a VM can run here.  fix: make what kata-py can make itself
    (the secure flavour's keys, varstore and signed kernel)."""
    fatal = False
    qemu = shutil.which(cfg.qemu)
    if qemu:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout
        _line(True, "qemu", out.splitlines()[0] if out else qemu)
    else:
        fatal = True
        _line(False, "qemu", f"{cfg.qemu} not found", "apt-get install qemu-system-x86")

    choice = None
    try:
        choice = accel_mod.choose(cfg.accel)
    except Exception as e:
        fatal = True
        _line(False, "accelerator", str(e), "set accel: auto or tcg in the config")
    if choice:
        _line(None if choice.fallback else True, "accelerator",
              f"{choice.accel}: {choice.reason}",
              "TCG works but is slow; use a host with kvm_intel or kvm_amd for speed")
    ok, why = accel_mod.probe_kvm()
    _line(ok or None, "/dev/kvm", why, "load kvm_intel or kvm_amd, or run with TCG")

    if choice:
        try:
            creds = qemuuser.resolve(cfg.qemu_user, choice.accel)
        except KataError as e:
            fatal = True
            _line(False, "qemu user", str(e), "see qemu_user in docs/config.md")
        else:
            _line(True if creds else None, "qemu user",
                  "root" if creds is None else
                  "a uid of its own per VM, no capabilities" if creds.uid < 0 else
                  f"uid {creds.uid}, shared by every VM",
                  "qemu_user: dynamic (the default) keeps QEMU off root")

    vsock = vhost_vsock_usable()
    _line(True if vsock else None, "vhost-vsock",
          "usable: agent over vsock" if vsock else "not usable: agent over virtio-serial",
          "modprobe vhost_vsock (optional)")
    tun = os.path.exists("/dev/net/tun")
    _line(True if tun else None, "tun", "/dev/net/tun present" if tun else "missing",
          "modprobe tun (needed for networking)")
    bb = os.access(rootfs.BUSYBOX, os.X_OK)
    _line(True if bb else None, "busybox",
          f"{rootfs.BUSYBOX} (the built-in busybox image)" if bb
          else f"{rootfs.BUSYBOX} not found: `run busybox` needs an image instead",
          "apt-get install busybox-static")
    ipt = shutil.which("iptables")
    _line(True if ipt else None, "iptables",
          "NAT for the bridge network" if ipt else "not found: bridge containers get no NAT",
          "apt-get install iptables")
    vfs = os.access(cfg.virtiofsd, os.X_OK)
    fatal |= not vfs
    _line(vfs, "virtiofsd", cfg.virtiofsd if vfs else f"{cfg.virtiofsd} not found",
          "apt-get install qemu-system-x86")
    kernel = Path(cfg.kernel)
    release = kernel.with_name(kernel.name + ".release")
    kok = kernel.is_file()
    fatal |= not kok
    _line(kok, "kernel",
          f"{kernel} ({release.read_text().strip()})" if kok and release.exists()
          else str(kernel) if kok else f"{kernel} not built", "scripts/quickstart (kernels/build)")
    image = Path(cfg.guest_image)
    iok = image.is_file()
    fatal |= not iok
    _line(iok, "guest image",
          f"{image} ({image.stat().st_size / 2**20:.1f} MiB)" if iok else f"{image} not built",
          "scripts/quickstart (python -m guest.build_image)")
    mount_api = linux.mount_api_usable()
    fatal |= not mount_api
    _line(mount_api, "mount api",
          "open_tree, mount_setattr: shares read-only from the start" if mount_api
          else f"this kernel ({os.uname().release}) lacks mount_setattr",
          "Linux 5.12 or newer (read-only shares depend on it)")
    try:
        import pyseccomp  # noqa: F401 - loads libseccomp
        seccomp_ok, seccomp_why = True, "libseccomp: OCI seccomp profiles are compiled"
    except (ImportError, OSError, RuntimeError) as e:
        seccomp_ok, seccomp_why = False, f"libseccomp not loadable ({e})"
    fatal |= not seccomp_ok
    _line(seccomp_ok, "seccomp", seccomp_why, "apt-get install libseccomp2")
    transport = "vsock" if cfg.transport == "vsock" or (
        cfg.transport == "auto" and vsock) else "serial"
    ok_t, why_t = template.check(cfg, transport)
    _line(ok_t, "templates", why_t, "template: true, transport: serial or auto")
    fatal |= _check_secure(cfg, fix)
    root = os.geteuid() == 0
    fatal |= not root
    _line(root, "privileges", "root" if root else "not root", "run as root")
    if fatal:
        click.echo("microvm check: a VM cannot run here yet")
        return 1
    click.echo("microvm check: ready")
    return 0
