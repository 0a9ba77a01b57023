"""
Allow lists end to end: a client outside a tunnel's list gets a clear refusal (a TLS
``access_denied`` alert, or its raw TCP connection closed), clients inside it are served,
and other tunnels of the same relay are not affected.
"""

from __future__ import annotations

import socket

import pytest

from tests.e2e.harness import DEADLINE, LOOPBACK, Procs, Relay, curl, first_reply

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


def reply_from(source: str, port: int, data: bytes) -> bytes:
    """Send `data` to the raw TCP `port` from the loopback address `source`; what comes back
    first (b"" on a close or reset)."""
    with socket.create_connection(
        (LOOPBACK, port), timeout=DEADLINE, source_address=(source, 0)
    ) as s:
        s.sendall(data)
        try:
            return s.recv(1024)
        except ConnectionResetError:
            return b""


def test_deny_wins_over_allow_for_one_loopback_address(procs: Procs, relay: Relay) -> None:
    backend = procs.backend("http")
    echo = procs.backend("echo")
    agent = procs.agent(
        relay,
        [str(backend.port), f"{echo.port}:tcp"],
        extra=["--allow", "127.0.0.0/8", "--deny", "127.0.0.2,2001:db8::/32"],
    )
    tls_tunnel = agent.ready(str(backend.port))
    tcp_tunnel = agent.ready(f"{echo.port}:tcp")
    assert tcp_tunnel.tcp_port is not None

    # 127.0.0.1 is allowed and not denied: served.
    result = curl(relay, tls_tunnel, tls_tunnel.url + "/hello")
    assert result.stdout == b"hello /hello\n", result.stderr
    assert reply_from("127.0.0.1", tcp_tunnel.tcp_port, b"hi\n") == b"hi\n"

    # 127.0.0.2 is allowed too, but denied: refused before anything reaches the agent.
    denied = relay.proc.status()["denied_connections"]
    result = curl(relay, tls_tunnel, "--interface", "127.0.0.2", tls_tunnel.url + "/hello")
    assert result.returncode == 35, (result.returncode, result.stderr)
    assert b"access denied" in result.stderr.lower(), result.stderr
    relay.wait_log(r"access denied: 127\.0\.0\.2 is on the deny list")
    assert reply_from("127.0.0.2", tcp_tunnel.tcp_port, b"hi\n") == b""
    relay.proc.wait_status(
        lambda s: s["denied_connections"] >= denied + 2, "both refusals to be counted"
    )
