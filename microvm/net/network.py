"""What network a sandbox gets, and the /etc files a CLI container sees.

  none       loopback only
  bridge     the CLI's bridge (bridge.py), with published ports (ports.py)
  ns:PATH    an existing namespace's veths (as CNI prepared for containerd)

The shim learns a detached CLI container's wishes from the annotations
below, which only our CLI writes; containerd's pods name their namespace
in the spec instead.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from microvm.errors import KataError
from microvm.net.ports import PortSpec, parse

ANNOTATION = "io.containerd.kata-py.network"        # none | bridge | ns:PATH
PORTS_ANNOTATION = "io.containerd.kata-py.ports"    # JSON list of -p specs

# RFC 1123 labels; the kernel's sethostname() takes at most HOST_NAME_MAX.
HOST_NAME_MAX = 64
_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


@dataclass(frozen=True)
class NetworkSpec:
    mode: str = "none"
    path: str = ""
    ports: tuple[PortSpec, ...] = field(default_factory=tuple)


def parse_mode(mode: str, port_specs: list[str] | tuple[str, ...] = ()) -> NetworkSpec:
    ports = tuple(parse(p) for p in port_specs)
    if mode in ("none", "bridge"):
        if ports and mode == "none":
            raise KataError("-p needs a network: --network none publishes nothing")
        return NetworkSpec(mode, "", ports)
    if mode.startswith("ns:") and mode[3:]:
        if ports:
            raise KataError("-p goes with --network bridge (ns:PATH is its owner's to publish)")
        if not os.path.exists(mode[3:]):
            raise KataError(f"--network {mode}: no such network namespace")
        return NetworkSpec("ns", mode[3:])
    raise KataError(f"--network {mode!r}: expected bridge, none or ns:PATH")


def to_annotations(spec: NetworkSpec) -> dict[str, str]:
    mode = f"ns:{spec.path}" if spec.mode == "ns" else spec.mode
    out = {ANNOTATION: mode}
    if spec.ports:
        out[PORTS_ANNOTATION] = json.dumps([p.flag for p in spec.ports])
    return out


def from_annotations(annotations: dict[str, str]) -> NetworkSpec | None:
    """None when the spec is not our CLI's (containerd's own pods)."""
    mode = annotations.get(ANNOTATION)
    if mode is None:
        return None
    try:
        ports = json.loads(annotations.get(PORTS_ANNOTATION, "[]"))
    except ValueError:
        raise KataError(f"annotation {PORTS_ANNOTATION}: not JSON") from None
    if not isinstance(ports, list) or not all(isinstance(p, str) for p in ports):
        raise KataError(f"annotation {PORTS_ANNOTATION}: expected a list of strings")
    return parse_mode(mode, ports)


def hostname_problem(name: str) -> str | None:
    """Why name cannot be a container's host name (None: it can).  It goes
    into /etc/hosts and sethostname(): a newline would add a hosts line."""
    if len(name) > HOST_NAME_MAX:
        return f"longer than {HOST_NAME_MAX} characters"
    if not all(_LABEL.fullmatch(label) for label in name.split(".")):
        return ("not an RFC 1123 host name (dot-separated labels of letters, digits and "
                "'-', not starting or ending with '-')")
    return None


def check_hostname(name: str) -> None:
    problem = hostname_problem(name)
    if problem:
        raise KataError(f"invalid hostname {_shown(name)}: {problem}")


def _shown(name: str) -> str:
    # One line whatever the name holds.
    return repr(name if len(name) <= HOST_NAME_MAX else name[:HOST_NAME_MAX] + "...")


def resolv_conf(host: Path = Path("/etc/resolv.conf")) -> str:
    """The host's resolvers, less loopback ones a container cannot reach."""
    try:
        lines = host.read_text().splitlines()
    except OSError:
        return ""
    kept = []
    for line in lines:
        words = line.split()
        if words[:1] == ["nameserver"] and len(words) > 1 and \
                (words[1].startswith("127.") or words[1] == "::1"):
            continue
        kept.append(line)
    return "\n".join(kept) + "\n" if kept else ""


def etc_files(hostname: str, ip: str | None) -> dict[str, str]:
    """What docker writes for a container: its name, hosts, resolvers."""
    if hostname:  # the callers checked it; a line of /etc/hosts is at stake
        check_hostname(hostname)
    hosts = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    if ip:
        hosts.append(f"{ip}\t{hostname}")
    files = {"etc/hostname": hostname + "\n", "etc/hosts": "\n".join(hosts) + "\n"}
    if ip:
        files["etc/resolv.conf"] = resolv_conf()
    return files


def write_etc(rootfs: Path, files: dict[str, str]) -> None:
    """Into the container's own writable layer; never through a symlink the
    image planted (that could point anywhere on the host)."""
    for rel, content in files.items():
        parent = rootfs / os.path.dirname(rel)
        if parent.is_symlink() or not parent.is_dir():
            continue
        target = parent / os.path.basename(rel)
        if target.is_symlink():
            target.unlink()
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(content)
