"""Every public name of tunnel.wire exists, and the package stays free of Twisted."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import tunnel.wire

MODULES = [
    "tunnel.wire",
    "tunnel.wire.frames",
    "tunnel.wire.mux",
    "tunnel.wire.windows",
    "tunnel.wire.events",
    "tunnel.wire.errors",
    "tunnel.wire.control",
    "tunnel.wire.codes",
    "tunnel.wire.options",
]
#: Public packages outside the sans-IO core, whose ``__all__`` is checked the same way.
PUBLIC = ["tunnel", "tunnel.client", "tunnel.testing"]
WIRE_DIR = Path(tunnel.wire.__file__).parent


@pytest.mark.parametrize("name", MODULES + PUBLIC)
def test_all_names_exist(name: str) -> None:
    module = importlib.import_module(name)
    exported = module.__all__
    assert len(exported) == len(set(exported)), "duplicates in __all__"
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing


def _twisted_after(prelude: str) -> str:
    code = (
        "import sys\n"
        + prelude
        + "".join(f"import {m}\n" for m in MODULES)
        + "bad = sorted(m for m in sys.modules if m == 'twisted' or m.startswith('twisted.'))\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return result.stdout.strip()


#: Stand in for the top-level `tunnel` package (whose __init__ is the Twisted-based public API)
#: and refuse any Twisted import, so that only tunnel/wire/*.py is exercised.
_ISOLATE = f"""
import types, importlib.abc
class _NoTwisted(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "twisted" or name.startswith("twisted."):
            raise ImportError("tunnel.wire must not import " + name)
        return None
sys.meta_path.insert(0, _NoTwisted())
pkg = types.ModuleType("tunnel")
pkg.__path__ = [{str(WIRE_DIR.parent)!r}]
sys.modules["tunnel"] = pkg
"""


def test_wire_modules_import_no_twisted() -> None:
    assert _twisted_after(_ISOLATE) == ""


def test_wire_sources_name_no_twisted() -> None:
    for path in sorted(WIRE_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n.split(".")[0] == "twisted" for n in names), (path, names)


def test_import_tunnel_wire_loads_no_twisted() -> None:
    assert _twisted_after("") == ""
