"""Every public name of tunnel.wire exists, and the package stays free of Twisted."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

MODULES = [
    "tunnel.wire",
    "tunnel.wire.frames",
    "tunnel.wire.mux",
    "tunnel.wire.windows",
    "tunnel.wire.events",
    "tunnel.wire.errors",
    "tunnel.wire.control",
]


@pytest.mark.parametrize("name", MODULES)
def test_all_names_exist(name: str) -> None:
    module = importlib.import_module(name)
    exported = module.__all__
    assert len(exported) == len(set(exported)), "duplicates in __all__"
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing


def test_wire_imports_no_twisted() -> None:
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in MODULES)
        + "bad = sorted(m for m in sys.modules if m == 'twisted' or m.startswith('twisted.'))\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == ""
