"""
`tunnel.testing`'s in-process relay, used as a user's own test would: plain code calling
``tunnel.forward(port)`` with no settings (in a subprocess, since the plain API runs the
reactor in a thread), and the Deferred API in this process's reactor.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest_twisted
from twisted.internet import threads

from tests.protocol.inprocess import get_reactor
from tunnel import client
from tunnel.testing import start_local_relay
from tunnel.testing._servers import LocalServer, echo_handler, http_handler

PLAIN = textwrap.dedent(
    """
    import os, socket, sys
    import tunnel, tunnel.testing

    port, echo = int(sys.argv[1]), int(sys.argv[2])
    assert "TUNNEL_RELAY" not in os.environ
    with tunnel.testing.local_relay() as relay:
        # The code under test reads its settings from the environment, as in production.
        assert os.environ["TUNNEL_RELAY"] == relay.address
        with tunnel.forward(port) as t:
            status, body = relay.get(t, "/")
            assert (status, body) == (200, b"ok\\n"), (status, body)
            assert t.host.endswith(".tunnel.localhost") and t.port == relay.port
        with tunnel.forward(echo, unencrypted=True) as raw:
            with relay.connect(raw) as sock:
                sock.sendall(b"ping")
                assert sock.recv(4) == b"ping"
        held = tunnel.forward(port).__enter__()  # left open: the relay's end closes it
        address = relay.port
    assert "TUNNEL_RELAY" not in os.environ
    try:
        socket.create_connection(("127.0.0.1", address), timeout=5).close()
    except ConnectionRefusedError:
        print("STOPPED")
    """
)


def test_plain_code_runs_against_a_relay_in_its_own_process(tmp_path: Path) -> None:
    http = LocalServer(http_handler)
    echo = LocalServer(echo_handler)
    try:
        script = tmp_path / "plain.py"
        script.write_text(PLAIN)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TUNNEL_")}
        result = subprocess.run(
            [sys.executable, str(script), str(http.port), str(echo.port)],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
    finally:
        http.close()
        echo.close()
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "STOPPED"


@pytest_twisted.ensureDeferred
async def test_deferred_code_runs_against_a_relay_in_this_process(tmp_path: Path) -> None:
    reactor = get_reactor()
    http = LocalServer(http_handler)
    try:
        relay = await start_local_relay(reactor, state_dir=str(tmp_path / "state"))
        try:
            t = await client.forward(reactor, http.port, **relay.settings)
            status, body = await threads.deferToThread(relay.get, t, "/")
            assert (status, body) == (200, b"ok\n")
            await t.close()
        finally:
            await relay.stop()
        assert relay.service.port is None
        assert (tmp_path / "state" / "ca.pem").exists()  # a given directory is kept
    finally:
        http.close()
