"""Packaging: the Twisted plugins are discoverable, and `pip install .` ships them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins

ROOT = Path(__file__).resolve().parent.parent
PLUGIN_FILES = {"tunnel_relay.py", "tunnel_agent.py"}


def test_plugins_discoverable_in_this_environment() -> None:
    from twisted import plugins

    tapnames = {p.tapname for p in getPlugins(IServiceMaker, plugins)}
    assert {"tunnelrelay", "tunnelagent"} <= tapnames


def test_plugin_modules_name_the_tap_modules() -> None:
    from twisted import plugins

    makers = {p.tapname: p for p in getPlugins(IServiceMaker, plugins)}
    assert makers["tunnelrelay"].module == "tunnel.relay.tap"
    assert makers["tunnelagent"].module == "tunnel.agent.tap"


@pytest.mark.slow
def test_regular_install_ships_plugins(tmp_path: Path) -> None:
    """`pip install --no-deps --target DIR .` puts both plugin files in twisted/plugins/."""
    # Build from a copy, so concurrent work in the tree (build/, *.egg-info) is undisturbed.
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(ROOT / "pyproject.toml", src)
    shutil.copy(ROOT / "setup.cfg", src)
    for name in ("README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "dropin.cache")
    shutil.copytree(ROOT / "tunnel", src / "tunnel", ignore=ignore)
    shutil.copytree(ROOT / "twisted", src / "twisted", ignore=ignore)
    target = tmp_path / "target"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-input",
            "--disable-pip-version-check",
            "--target",
            str(target),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=55,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    plugin_dir = target / "twisted" / "plugins"
    assert {p.name for p in plugin_dir.iterdir()} >= PLUGIN_FILES
    # Namespace directory: no __init__.py of ours (Twisted's own must win).
    assert not (plugin_dir / "__init__.py").exists()
    assert not (target / "twisted" / "__init__.py").exists()
    assert (target / "tunnel" / "__init__.py").exists()
    assert (target / "tunnel" / "relay" / "_sni.py").exists()
    # The pages the agent and the relay serve are package data (setup.cfg).
    assert (target / "tunnel" / "agent" / "inspector.html").exists()
    assert (target / "tunnel" / "relay" / "status.html").exists()


def test_twistd_help_lists_plugins() -> None:
    twistd = Path(sys.executable).parent / "twistd"
    if not twistd.exists():
        pytest.skip("twistd script not installed next to this interpreter")
    result = subprocess.run(
        [str(twistd), "--help"], capture_output=True, text=True, timeout=55, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "tunnelrelay" in result.stdout
    assert "tunnelagent" in result.stdout
