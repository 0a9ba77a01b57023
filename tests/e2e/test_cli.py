"""
The ``tunnel`` command, as a user runs it in a terminal.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path

import pytest

from tests.e2e.harness import LOOPBACK, Endpoint, Procs, curl, free_port, wait_for

pytestmark = pytest.mark.e2e

TUNNEL = str(Path(sys.executable).parent / "tunnel")


@pytest.fixture
def tunnel_command() -> str:
    if not os.path.exists(TUNNEL):
        pytest.skip("the tunnel command is not installed next to this interpreter")
    return TUNNEL


def test_forwards_until_interrupted(procs: Procs, tunnel_command: str) -> None:
    web = procs.backend("http")
    echo = procs.backend("echo")
    relay = procs.relay()
    cli = procs.start(
        "tunnel",
        [
            tunnel_command, "--relay", f"localhost:{relay.port}", "--ca", str(relay.ca),
            str(web.port), f"{echo.port}:tcp",
        ],
    )  # fmt: skip
    https = cli.wait_log(
        rf"https://([a-z0-9]+\.tunnel\.localhost):(\d+) -> 127\.0\.0\.1:{web.port}"
    )
    tcp = cli.wait_log(rf"-> 127\.0\.0\.1:{echo.port}\s+tcp://tunnel\.localhost:(\d+)")
    cli.wait_log("press Ctrl-C to stop")

    tunnel = Endpoint(host=https.group(1), port=int(https.group(2)), tcp_port=None)
    page = curl(relay, tunnel, tunnel.url + "/hello")
    assert page.returncode == 0, page.stderr
    with socket.create_connection((LOOPBACK, int(tcp.group(1))), timeout=10) as s:
        s.sendall(b"ping")
        assert s.recv(4) == b"ping"

    os.kill(cli.pid, signal.SIGINT)
    assert cli.popen.wait(20) == 0
    # The tunnels were closed on the way out, not left to time out.
    relay.wait_log(rf"tunnel {tunnel.id} closed by its agent")


def test_relay_down_is_a_clear_error(procs: Procs, tunnel_command: str) -> None:
    cli = procs.start("tunnel", [tunnel_command, "--relay", f"localhost:{free_port()}", "8000"])
    wait_for(lambda: cli.popen.poll() is not None or None, "the command to exit")
    assert cli.popen.returncode == 1
    assert "cannot connect to localhost" in cli.text()


def test_bad_arguments(procs: Procs, tunnel_command: str) -> None:
    cli = procs.start("tunnel", [tunnel_command, "--relay", "localhost:1", "eighty"])
    wait_for(lambda: cli.popen.poll() is not None or None, "the command to exit")
    assert cli.popen.returncode == 2
    assert "is not a port" in cli.text()
