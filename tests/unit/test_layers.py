"""The package's layers, as docs/architecture.md draws them: an import that
goes up a layer (the VM layer reaching into the sandbox core, the core into
a front end) fails here, not in review.  Imports inside functions count."""

from __future__ import annotations

import ast
from pathlib import Path

import microvm

ROOT = Path(microvm.__file__).parent
SHARED = "shared"  # top-level modules: config, paths, errors, linux, protocol...
# What each layer may import, besides itself and the shared modules.
ALLOWED = {
    SHARED: set(),
    "vm": set(),
    "net": set(),
    "images": set(),
    "core": {"vm", "net"},
    "shim": {"core", "vm", "net"},
    "cli": {"shim", "core", "vm", "net", "images"},
}


def layer(module: str) -> str:
    if module == "microvm.__main__":
        return "cli"  # `python -m microvm` is the CLI
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else SHARED


def imports(path: Path) -> set[str]:
    """Every microvm module path imports, at any depth: `from microvm import x`
    counts as microvm.x."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "microvm":
                found |= {f"microvm.{a.name}" for a in node.names}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m.startswith("microvm.")}


def violations(module: str, path: Path) -> list[str]:
    mine = layer(module)
    return [f"{module} ({mine}) imports {target} ({layer(target)})"
            for target in sorted(imports(path))
            if layer(target) not in {mine, SHARED, *ALLOWED[mine]}]


def test_no_import_goes_up_a_layer() -> None:
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        if not path.name.endswith("_pb2.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            wrong += violations("microvm." + ".".join(parts), path)
    assert wrong == []


def test_no_relative_imports() -> None:
    """Absolute imports name the layer they reach into."""
    relative = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
                if not p.name.endswith("_pb2.py") and p.parent.name != "protocol"
                and any(isinstance(n, ast.ImportFrom) and n.level
                        for n in ast.walk(ast.parse(p.read_text())))]
    assert relative == []


def test_the_check_sees_a_lazy_import_going_up(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("from microvm import paths\n\n"
                   "def f():\n"
                   "    from microvm.core import sandbox\n"
                   "    import microvm.shim.client\n")
    assert violations("microvm.vm.qemu", src) == [
        "microvm.vm.qemu (vm) imports microvm.core (core)",
        "microvm.vm.qemu (vm) imports microvm.shim.client (shim)"]
    assert violations("microvm.cli.commands", src) == []


def test_the_network_layer_loads_only_the_pyroute2_it_uses() -> None:
    """pyroute2's package __init__ (NDB, sqlite3: 8 MiB of heap the shim
    would keep for a pod's life) is skipped; `from pyroute2 import IPRoute`
    anywhere in kata-py would bring it back."""
    import subprocess
    import sys
    code = ("import sys, microvm.net.netlink, microvm.net.tcfilter, microvm.net.bridge\n"
            "print(sorted(m for m in sys.modules if m in ('sqlite3', 'pyroute2.ndb')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
    bare = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
            if any(isinstance(n, ast.ImportFrom) and n.module == "pyroute2"
                   and any(a.name != "netns" for a in n.names)
                   for n in ast.walk(ast.parse(p.read_text())))]
    assert bare == []
