"""
A raw TCP tunnel's connections end to end in this process (a relay and an agent over
loopback TLS, loopback targets and clients), for the agent's shortened stream path: each
way of ending a connection ends it at both ends, the inspector's record says how, and the
agent's target socket leaves the reactor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import protocol
from twisted.internet.interfaces import IHalfCloseableProtocol
from zope.interface import implementer

from tests.protocol.inprocess import Echo, agent_for, connect, get_reactor, wait_until
from tunnel.agent.settings import ForwardSpec
from tunnel.relay.service import RelayService


@implementer(IHalfCloseableProtocol)
class _Target(protocol.Protocol):
    """Sends a greeting and finishes sending at once; keeps what it receives until the
    client finishes too, then closes."""

    instances: list[_Target] = []

    def __init__(self) -> None:
        self.received = b""
        self.read_ended = False
        self.lost = False
        _Target.instances.append(self)

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"hello from the target")
        self.transport.loseWriteConnection()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def readConnectionLost(self) -> None:
        # Both directions have ended: a half-closeable protocol closes its connection.
        self.read_ended = True
        assert self.transport is not None
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: object = None) -> None:
        self.lost = True


@implementer(IHalfCloseableProtocol)
class _HalfClosingClient(protocol.Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.read_ended = False
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def readConnectionLost(self) -> None:
        self.read_ended = True

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: object = None) -> None:
        self.lost = True


def _target_sockets(reactor: Any) -> list[Any]:
    """The agent's transports to local targets that the reactor still watches."""
    from tunnel._splice import ConnectedTCP

    watched = list(reactor.getReaders()) + list(reactor.getWriters())
    return [t for t in watched if type(t) is ConnectedTCP]


@pytest_twisted.ensureDeferred
async def test_the_target_finishes_first_then_the_client(
    relay: RelayService, tmp_path: Path
) -> None:
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    reactor = get_reactor()
    _Target.instances.clear()
    target = reactor.listenTCP(0, protocol.Factory.forProtocol(_Target), interface="127.0.0.1")
    agent = agent_for(relay, tmp_path / "state")
    try:
        tunnel = await agent.forward(ForwardSpec(target.getHost().port, unencrypted=True))
        # The agent's link reads through the lean read of its TCP transport.
        assert agent.link is not None and agent.link.transport is not None
        assert "doRead" in vars(agent.link.transport.transport)  # type: ignore[attr-defined]
        client = _HalfClosingClient()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", tunnel.unencrypted_port or 0)
        await connectProtocol(endpoint, client)
        await wait_until(lambda: client.read_ended, "the target's FIN at the client")
        assert client.received == b"hello from the target" and not client.lost
        (record,) = agent.events.open.values()
        assert record.state == "half-closed" and record.half_closed_by == "target"
        # The client's direction still works after the target's FIN.
        assert client.transport is not None
        client.transport.write(b"and back")
        (served,) = _Target.instances
        await wait_until(lambda: served.received == b"and back", "the client's bytes")
        # The client has read everything: its close is its FIN.
        client.transport.loseConnection()
        await wait_until(lambda: served.lost and client.lost, "both ends to close")
        assert served.read_ended
        await wait_until(lambda: not agent.events.open, "the record to end")
        (ended,) = agent.events.connections()
        assert ended.state == "closed" and ended.by == "target"
        assert ended.from_client == len(b"and back")
        assert ended.to_client == len(b"hello from the target")
        assert _target_sockets(reactor) == []
    finally:
        await agent.stop()
        await target.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_client_reset_right_after_connecting_resets_the_target(
    relay: RelayService, tmp_path: Path
) -> None:
    reactor = get_reactor()
    echo = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
    agent = agent_for(relay, tmp_path / "state")
    try:
        tunnel = await agent.forward(ForwardSpec(echo.getHost().port, unencrypted=True))
        client = await connect(tunnel.unencrypted_port or 0)
        await wait_until(lambda: bool(list(agent.events.connections())), "the stream's open")
        assert client.transport is not None
        client.transport.abortConnection()  # type: ignore[attr-defined]
        await wait_until(lambda: not agent.events.open, "the connection to end")
        (record,) = agent.events.connections()
        assert record.state == "reset" and record.by == "client"
        await wait_until(lambda: _target_sockets(reactor) == [], "the target socket's close")
        # The link is unharmed: the next connection is served.
        again = await connect(tunnel.unencrypted_port or 0)
        assert again.transport is not None
        again.transport.write(b"still there")
        await wait_until(lambda: again.received == b"still there", "the echo")
        again.transport.loseConnection()
        await wait_until(lambda: not agent.events.open, "that connection to end")
    finally:
        await agent.stop()
        await echo.stopListening()
