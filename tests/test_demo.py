"""``python -m tunnel.demo --once``: the demo brings a tunnel up, fetches through it, and stops."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    not hasattr(os, "setsid"), reason="the demo starts its children in their own sessions"
)


def test_demo_once(tmp_path: Path) -> None:
    """The demo prints the public URL and the curl command, then the page fetched through it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNNEL_")}
    result = subprocess.run(
        [sys.executable, "-m", "tunnel.demo", "--once"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    url = re.search(r"public URL +(https://[a-z0-9]{16}\.tunnel\.localhost:\d+)", output)
    assert url, output
    ca = os.path.join(".demo-state", "relay", "ca.pem")
    assert f"curl --cacert {ca} {url.group(1)}/" in output
    assert "Hello from behind the tunnel!" in output
    assert "Stopping ... done." in output
    assert (tmp_path / ".demo-state" / "relay" / "ca.pem").is_file()


def test_demo_once_without_curl(tmp_path: Path) -> None:
    """With no curl on PATH the demo fetches with Python's ssl module instead."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNNEL_")}
    env["PATH"] = str(tmp_path / "empty-bin")
    result = subprocess.run(
        [sys.executable, "-m", "tunnel.demo", "--once", "--state-dir", str(tmp_path / "s")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Hello from behind the tunnel!" in output


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_demo_reuses_its_ca(tmp_path: Path) -> None:
    """A second run keeps the development CA, so a CA trusted once stays trusted."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNNEL_")}
    ca = tmp_path / ".demo-state" / "relay" / "ca.pem"
    texts = []
    for _ in range(2):
        result = subprocess.run(
            [sys.executable, "-m", "tunnel.demo", "--once"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        texts.append(ca.read_text())
    assert texts[0] == texts[1]


def test_demo_relay_does_not_warn_about_its_ports(tmp_path: Path) -> None:
    """The demo's raw TCP range is below the ephemeral range its relay would warn about."""
    from tunnel.demo import tcp_port_range

    for seed in (0, 1, 4242, 65535):
        low, high = tcp_port_range(seed)
        assert high - low == 99 and low >= 1024 and high < 32768
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNNEL_")}
    result = subprocess.run(
        [sys.executable, "-m", "tunnel.demo", "--once", "--state-dir", str(tmp_path / "s")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    relay_log = (tmp_path / "s" / "relay.log").read_text()
    assert "overlaps the ephemeral port range" not in relay_log, relay_log
