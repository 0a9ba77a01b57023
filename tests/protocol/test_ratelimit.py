"""
Rate limits between a real agent and relay in this process, over loopback: the relay holds
each direction of a tunnel to its rate, over all of the tunnel's connections, and applies
its ceiling to tunnels that ask for more or for none. Times are checked as lower bounds only.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest_twisted
from twisted.internet import protocol

from tests.protocol.inprocess import agent_for, connect, get_reactor, wait_until
from tunnel.agent.session import ForwardSpec
from tunnel.relay.service import RelayService

RATE = 1_000_000
SIZE = 2_000_000


class Sender(protocol.Protocol):
    """Sends `SIZE` octets on connect, then closes."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"d" * SIZE)
        self.transport.loseConnection()


class Sink(protocol.Protocol):
    """Counts what it receives (over all its connections, in `received`)."""

    received = 0

    def dataReceived(self, data: bytes) -> None:
        Sink.received += len(data)


def record_of(relay: RelayService, url_host: str) -> object:
    return relay.relay.registry.get(url_host.split(".", 1)[0])


@pytest_twisted.ensureDeferred
async def test_downloads_and_uploads_are_held_to_the_rate(
    relay: RelayService, tmp_path: Path
) -> None:
    reactor = get_reactor()
    sender = reactor.listenTCP(0, protocol.Factory.forProtocol(Sender), interface="127.0.0.1")
    sink = reactor.listenTCP(0, protocol.Factory.forProtocol(Sink), interface="127.0.0.1")
    agent = agent_for(relay, tmp_path / "state")
    try:
        down = await agent.forward(
            ForwardSpec(sender.getHost().port, unencrypted=True, rate_limit=RATE)
        )
        up = await agent.forward(
            ForwardSpec(sink.getHost().port, unencrypted=True, rate_limit=RATE)
        )
        assert down.unencrypted_port is not None and up.unencrypted_port is not None

        # Two downloads at once share the tunnel's bucket: 2 x SIZE at RATE.
        started = time.monotonic()
        clients = [await connect(down.unencrypted_port) for _ in range(2)]
        await wait_until(lambda: all(len(c.received) == SIZE for c in clients), "both downloads")
        took = time.monotonic() - started
        # The burst is 0.1 s of the rate; allow it and a 256 KiB read per connection.
        assert took >= (2 * SIZE - 0.1 * RATE - 2 * 256 * 1024) / RATE * 0.9, took
        record = record_of(relay, down.host)
        assert record.throttle.down.holds > 0  # type: ignore[attr-defined]

        # An upload, counted where it arrives (the kernel's buffers before the relay take a
        # burst of their own, but the relay reads no faster than the rate).
        Sink.received = 0
        started = time.monotonic()
        client = await connect(up.unencrypted_port)
        assert client.transport is not None
        client.transport.write(b"u" * SIZE)
        await wait_until(lambda: Sink.received == SIZE, "the upload")
        took = time.monotonic() - started
        assert took >= (SIZE - 0.1 * RATE - 256 * 1024) / RATE * 0.9, took
        client.transport.loseConnection()
    finally:
        await agent.stop()
        await sender.stopListening()
        await sink.stopListening()


@pytest_twisted.ensureDeferred
async def test_the_relay_ceiling_applies_to_every_tunnel(
    relay: RelayService, tmp_path: Path
) -> None:
    relay.relay.config.max_rate = 3_000_000
    agent = agent_for(relay, tmp_path / "state")
    try:
        unlimited = await agent.forward(ForwardSpec(8001))
        higher = await agent.forward(ForwardSpec(8002, rate_limit=9_000_000))
        lower = await agent.forward(ForwardSpec(8003, rate_limit=2_000_000))
        rates = [
            record_of(relay, t.host).throttle.rate  # type: ignore[attr-defined]
            for t in (unlimited, higher, lower)
        ]
        assert rates == [3_000_000, 3_000_000, 2_000_000]
        assert [f.granted_rate for f in agent.forwards] == rates
    finally:
        await agent.stop()
