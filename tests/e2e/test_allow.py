"""
Allow lists end to end: a client outside a tunnel's list gets a clear refusal (a TLS
``access_denied`` alert, or its raw TCP connection closed), clients inside it are served,
and other tunnels of the same relay are not affected.
"""

from __future__ import annotations

import pytest

from tests.e2e.harness import Procs, Relay, curl, first_reply

pytestmark = pytest.mark.e2e


def test_clients_outside_the_allow_list_are_refused(procs: Procs, relay: Relay) -> None:
    backend = procs.backend("http")
    echo = procs.backend("echo")
    outside = procs.agent(
        relay, [str(backend.port), f"{echo.port}:tcp"], extra=["--allow", "192.0.2.0/24"]
    )
    tls_tunnel = outside.ready(str(backend.port))
    tcp_tunnel = outside.ready(f"{echo.port}:tcp")

    result = curl(relay, tls_tunnel, tls_tunnel.url + "/hello")
    assert result.returncode == 35, (result.returncode, result.stderr)
    assert b"access denied" in result.stderr.lower(), result.stderr
    relay.wait_log(r"access denied: 127\.0\.0\.1 is not on the allow list")

    assert tcp_tunnel.tcp_port is not None
    assert first_reply(tcp_tunnel.tcp_port, b"hello\n") == b""

    # The same servers through an agent whose list admits loopback clients.
    backend2 = procs.backend("http")
    inside = procs.agent(relay, [str(backend2.port)], extra=["--allow", "10.0.0.0/8,127.0.0.1"])
    tunnel = inside.ready(str(backend2.port))
    result = curl(relay, tunnel, tunnel.url + "/hello")
    assert result.stdout == b"hello /hello\n", result.stderr
