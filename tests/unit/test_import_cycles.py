"""No import cycle among the modules of tunnel/ (module-level imports; TYPE_CHECKING and
imports inside functions excepted), and every module imports on its own."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import tunnel

ROOT = Path(tunnel.__file__).parent


def _name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    for node in tree.body:  # module level only
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for inner in ast.walk(node) if not isinstance(node, ast.FunctionDef | ast.ClassDef) else ():
            if isinstance(inner, ast.Import):
                found.update(a.name for a in inner.names)
            elif isinstance(inner, ast.ImportFrom) and inner.module and inner.level == 0:
                found.add(inner.module)
                found.update(f"{inner.module}.{a.name}" for a in inner.names)
    return {name for name in found if name in MODULES}


def test_no_import_cycle() -> None:
    graph = {name: _imports(path) - {name} for name, path in MODULES.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for dep in sorted(graph[name]):
            # A package's __init__ is imported before its submodules: not a cycle edge back.
            if name.startswith(dep + "."):
                continue
            if state.get(dep) == 1:
                cycle = [*stack[stack.index(dep) :], dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_the_relay_modules_are_checked_and_admin_does_not_import_the_service() -> None:
    relay = {name for name in MODULES if name.startswith("tunnel.relay.")}
    assert {"tunnel.relay.service", "tunnel.relay.admin", "tunnel.relay._control"} <= relay
    assert "tunnel.relay.service" not in _imports(MODULES["tunnel.relay.admin"])
    # The control core is sans-IO: it imports nothing of Twisted, even indirectly.
    code = (
        "import sys, tunnel.relay._control\n"
        "assert not [m for m in sys.modules if m.startswith('twisted')], 'twisted imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_every_agent_relay_and_wire_module_imports_first_in_a_fresh_interpreter() -> None:
    names = [
        n for n in MODULES if n.startswith(("tunnel.agent", "tunnel.relay", "tunnel.wire"))
    ] + [
        "tunnel.client",
        "tunnel.cli",
    ]
    code = (
        "import importlib, subprocess, sys\n"
        f"for name in {names!r}:\n"
        "    subprocess.run([sys.executable, '-c', 'import ' + name], check=True)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
