"""
The relay's TLS port reads what a client sent with its connect in the turn that accepted
it (a TLS client sends its ClientHello at once): whatever arrives with the connect (a
ClientHello, the client's end of input, a whole exchange) is handled as if read a turn
later.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest_twisted
from twisted.internet import protocol, threads

from tests.protocol.inprocess import Echo, agent_for, get_reactor
from tests.protocol.test_front_door import client_hello
from tunnel.agent.session import parse_forward
from tunnel.relay._clienthello import ALERT_UNRECOGNIZED_NAME, alert_record
from tunnel.relay.service import RelayService


def _send_and_end(port: int, data: bytes) -> bytes:
    """Connect, send `data` and the end of input at once, read until the relay closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
        return got


@pytest_twisted.ensureDeferred
async def test_a_hello_and_the_end_sent_with_the_connect_are_answered(
    relay: RelayService,
) -> None:
    port = relay.port.getHost().port
    hello = client_hello(b"nosuchtunnel.tunnel.localhost")
    for _ in range(3):
        answer = await threads.deferToThread(_send_and_end, port, hello)
        assert answer == alert_record(ALERT_UNRECOGNIZED_NAME)
    # Not TLS at all, with the end at once: aborted, without an answer.
    try:
        answer = await threads.deferToThread(_send_and_end, port, b"GET / HTTP/1.1\r\n\r\n")
    except OSError:  # reset (also before our end of input went out)
        answer = b""
    assert answer == b""


@pytest_twisted.ensureDeferred
async def test_connections_one_after_another_are_served(
    relay: RelayService, tmp_path: Path
) -> None:
    reactor = get_reactor()
    echo = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
    agent = agent_for(relay, tmp_path / "state")
    try:
        tunnel = await agent.forward(parse_forward(f"{echo.getHost().port}"))
        port = relay.port.getHost().port
        ctx = ssl.create_default_context(cafile=str(tmp_path / "state" / "ca.pem"))

        def exchange(i: int) -> bytes:
            raw = socket.create_connection(("127.0.0.1", port), timeout=10)
            with ctx.wrap_socket(raw, server_hostname=tunnel.host) as sock:
                sock.sendall(b"%d" % i)
                return sock.recv(16)

        for i in range(20):
            assert await threads.deferToThread(exchange, i) == b"%d" % i
    finally:
        await agent.stop()
        await echo.stopListening()
