"""OCI seccomp profiles, compiled on the host into the BPF the guest loads.

libseccomp (through pyseccomp) does the compiling, as it does for runc; the
guest agent only installs the result, so the guest image carries no
libseccomp and the host checks the profile before a VM is touched.
"""

from __future__ import annotations

import errno
import os
import tempfile
from typing import Any

_ACTIONS = {
    "SCMP_ACT_KILL": 0x00000000, "SCMP_ACT_KILL_THREAD": 0x00000000,
    "SCMP_ACT_KILL_PROCESS": 0x80000000, "SCMP_ACT_TRAP": 0x00030000,
    "SCMP_ACT_ERRNO": 0x00050000, "SCMP_ACT_TRACE": 0x7FF00000,
    "SCMP_ACT_LOG": 0x7FFC0000, "SCMP_ACT_ALLOW": 0x7FFF0000,
}
_OPS = {"SCMP_CMP_NE": 1, "SCMP_CMP_LT": 2, "SCMP_CMP_LE": 3, "SCMP_CMP_EQ": 4,
        "SCMP_CMP_GE": 5, "SCMP_CMP_GT": 6, "SCMP_CMP_MASKED_EQ": 7}
_ARCHES = {
    "SCMP_ARCH_X86": 0x40000003, "SCMP_ARCH_X86_64": 0xC000003E, "SCMP_ARCH_X32": 0x4000003E,
}


class ProfileError(ValueError):
    """The profile is malformed or asks for what kata-py cannot do; the
    message names the field."""


def _action(name: Any, errno_ret: Any, where: str) -> int:
    if name not in _ACTIONS:
        raise ProfileError(f"{where}: unsupported action {name!r}")
    base = _ACTIONS[name]
    if name == "SCMP_ACT_ERRNO":
        # runc's default return code is EPERM.
        ret = errno.EPERM if errno_ret is None else errno_ret
        if not isinstance(ret, int) or not 0 <= ret <= 0xFFFF:
            raise ProfileError(f"{where}: errnoRet must be a number from 0 to 65535")
        return base | ret
    if name == "SCMP_ACT_TRACE":
        return base | errno.EPERM
    return base


def compile_profile(profile: Any) -> bytes:
    """The BPF program (struct sock_filter[]) for an OCI linux.seccomp object."""
    import pyseccomp  # libseccomp: only hosts that meet a profile load it

    if not isinstance(profile, dict):
        raise ProfileError("linux.seccomp must be an object")
    if profile.get("listenerPath"):
        raise ProfileError("linux.seccomp.listenerPath: seccomp notify is not supported")
    default = _action(profile.get("defaultAction"), profile.get("defaultErrnoRet"),
                      "linux.seccomp.defaultAction")
    f = pyseccomp.SyscallFilter(default)
    # The guest loads it itself (no_new_privs is the spec's business).
    f.set_attr(pyseccomp.Attr.CTL_NNP, 0)
    for arch in profile.get("architectures") or []:
        if arch in _ARCHES and not f.exist_arch(_ARCHES[arch]):
            f.add_arch(_ARCHES[arch])
    rules = profile.get("syscalls") or []
    if not isinstance(rules, list):
        raise ProfileError("linux.seccomp.syscalls must be a list")
    for i, rule in enumerate(rules):
        _add_rule(pyseccomp, f, rule, default, f"linux.seccomp.syscalls[{i}]")
    with tempfile.TemporaryFile() as out:
        f.export_bpf(out)
        out.seek(0)
        program = out.read()
    if not program or len(program) % 8:
        raise ProfileError("libseccomp exported no program")
    return program


def _add_rule(lib: Any, f: Any, rule: Any, default: int, where: str) -> None:
    if not isinstance(rule, dict) or not isinstance(rule.get("names"), list):
        raise ProfileError(f"{where}: must be an object with a names list")
    action = _action(rule.get("action"), rule.get("errnoRet"), f"{where}.action")
    if action == default:
        return  # libseccomp refuses a rule that repeats the default
    args = []
    for j, a in enumerate(rule.get("args") or []):
        if not isinstance(a, dict) or a.get("op") not in _OPS or \
                not isinstance(a.get("index"), int) or not 0 <= a["index"] < 6 or \
                not isinstance(a.get("value", 0), int) or \
                not isinstance(a.get("valueTwo", 0), int):
            raise ProfileError(f"{where}.args[{j}]: needs index 0-5, a known op and numbers")
        args.append(lib.Arg(a["index"], _OPS[a["op"]], a.get("value", 0), a.get("valueTwo", 0)))
    # libseccomp takes one comparison per argument in a rule: as runc does,
    # several on the same argument become several rules.
    indexes = [a["index"] for a in rule.get("args") or []]
    groups = [[a] for a in args] if len(set(indexes)) < len(indexes) else [args]
    for name in rule["names"]:
        if not isinstance(name, str):
            raise ProfileError(f"{where}.names: must be strings")
        number = lib.resolve_syscall(lib.Arch.NATIVE, name)
        if number == -1:  # __NR_SCMP_ERROR (others below 0 are other arches')
            continue  # a syscall this libseccomp does not know: runc skips it too
        for group in groups:
            try:
                f.add_rule(action, number, *group)
            except OSError as e:
                raise ProfileError(f"{where}: {name}: {os.strerror(e.errno or 0)}") from None
