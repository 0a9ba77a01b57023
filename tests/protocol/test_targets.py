"""Local targets other than IPv4 loopback, through a real agent and relay in this process."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import protocol

from tests.protocol.inprocess import Echo, agent_for, connect, get_reactor, wait_until
from tunnel.agent.session import parse_forward
from tunnel.relay.service import RelayService


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
@pytest_twisted.ensureDeferred
async def test_an_ipv6_target(relay: RelayService, tmp_path: Path) -> None:
    reactor = get_reactor()
    echo = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="::1")
    agent = agent_for(relay, tmp_path / "state")
    try:
        spec = parse_forward(f"[::1]:{echo.getHost().port}:tcp")
        tunnel = await agent.forward(spec)
        assert tunnel.unencrypted_port is not None
        client = await connect(tunnel.unencrypted_port)
        assert client.transport is not None
        client.transport.write(b"over ipv6\n")
        await wait_until(lambda: client.received == b"over ipv6\n", "the echo from ::1")
        client.transport.loseConnection()
    finally:
        await agent.stop()
        await echo.stopListening()
