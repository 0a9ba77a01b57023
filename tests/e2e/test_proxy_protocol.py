"""
PROXY protocol end to end: a local server behind a tunnel learns the public client's address
(and the relay's, which the client connected to) from the header the agent sends first.
"""

from __future__ import annotations

import socket

import pytest

from tests.e2e.harness import DEADLINE, LOOPBACK, Procs, Relay, tls_connect

pytestmark = pytest.mark.e2e


def read_line(sock: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        data = sock.recv(1)
        assert data, f"closed after {line!r}"
        line += data
    return line


@pytest.mark.parametrize("version", [1, 2])
def test_local_server_sees_the_public_client_address(
    procs: Procs, relay: Relay, version: int
) -> None:
    tls_backend = procs.backend("proxy")
    tcp_backend = procs.backend("proxy")
    tls_forward = f"{tls_backend.port}:proxy{version}"
    tcp_forward = f"{tcp_backend.port}:tcp:proxy{version}"
    agent = procs.agent(relay, [tls_forward, tcp_forward])
    tls_tunnel = agent.ready(tls_forward)
    tcp_tunnel = agent.ready(tcp_forward)
    assert tcp_tunnel.tcp_port is not None

    with tls_connect(relay, tls_tunnel) as tls:
        client_port = tls.getsockname()[1]
        tls.sendall(b"through TLS\n")
        assert read_line(tls) == (
            f"proxy v{version} {LOOPBACK} {client_port} {LOOPBACK} {relay.port}\n".encode()
        )
        assert read_line(tls) == b"through TLS\n"  # then the client's bytes, unchanged

    with socket.create_connection((LOOPBACK, tcp_tunnel.tcp_port), timeout=DEADLINE) as raw:
        client_port = raw.getsockname()[1]
        raw.sendall(b"raw TCP\n")
        assert (
            read_line(raw)
            == (
                f"proxy v{version} {LOOPBACK} {client_port} {LOOPBACK} {tcp_tunnel.tcp_port}\n"
            ).encode()
        )
        assert read_line(raw) == b"raw TCP\n"


def test_without_the_option_no_header_is_sent(procs: Procs, relay: Relay) -> None:
    backend = procs.backend("echo")
    agent = procs.agent(relay, [f"{backend.port}:tcp"])
    tunnel = agent.ready(f"{backend.port}:tcp")
    assert tunnel.tcp_port is not None
    with socket.create_connection((LOOPBACK, tunnel.tcp_port), timeout=DEADLINE) as raw:
        raw.sendall(b"only this\n")
        assert read_line(raw) == b"only this\n"
