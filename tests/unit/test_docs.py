"""
The README documents every option: each daemon option (read from the `Options` classes of
``twistd tunnelrelay`` and ``twistd tunnelagent``) and each option of the ``tunnel`` command
appears in it as ``--name``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from twisted.python import usage

from tunnel import cli
from tunnel.agent import tap as agent_tap
from tunnel.relay import tap as relay_tap

README = Path(__file__).resolve().parents[2] / "README.md"


def _daemon_options(options: type[usage.Options]) -> set[str]:
    names = set()
    for table in ("optParameters", "optFlags"):
        for row in getattr(options, table, []):
            names.add(row[0])
    for attribute in dir(options):
        if attribute.startswith("opt_"):
            names.add(attribute[4:].replace("_", "-"))
    # twistd's own (every usage.Options has them).
    return names - {"help", "version"}


def _command_options() -> set[str]:
    parser = cli._parser()
    return {
        s[2:]
        for action in parser._actions
        for s in action.option_strings
        if s.startswith("--") and s not in ("--help",)
    }


def _documented() -> set[str]:
    return set(re.findall(r"`(--[a-z0-9-]+)", README.read_text()))


@pytest.mark.parametrize(
    ("what", "options"),
    [
        ("twistd tunnelrelay", _daemon_options(relay_tap.Options)),
        ("twistd tunnelagent", _daemon_options(agent_tap.Options)),
        ("tunnel", _command_options()),
    ],
)
def test_every_option_is_in_the_readme(what: str, options: set[str]) -> None:
    missing = sorted(f"--{name}" for name in options if f"--{name}" not in _documented())
    assert not missing, f"{what} options missing from README.md: {missing}"


def test_every_doc_is_linked_from_the_readme() -> None:
    text = README.read_text()
    docs = sorted(p.name for p in (README.parent / "docs").glob("*.md"))
    assert docs, "no docs found"
    unlinked = [name for name in docs if f"(docs/{name})" not in text]
    assert not unlinked, f"docs not linked from README.md: {unlinked}"
