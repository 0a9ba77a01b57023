"""
Closed links and public connections are freed by reference counting, not left for the
cyclic collector.

A relay runs for months under churn: every link and public connection that ends must give
its memory (OpenSSL state, buffers) back at once. Objects caught in a reference cycle wait
instead for one of CPython's rare full collections, which shows as a slow RSS creep. Here a
relay and an agent run in this process over real loopback TLS, with the cyclic collector
switched off; whatever ends must be gone once its connection is lost.
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import protocol

from tests.protocol.inprocess import Echo, agent_for, connect, get_reactor, wait_until
from tunnel.agent.session import ForwardSpec
from tunnel.relay.service import RelayService


def holders(ref: weakref.ref[Any]) -> list[str]:
    """What still refers to the object behind `ref` (for a failing assertion's message)."""
    return [type(r).__qualname__ for r in gc.get_referrers(ref())]


@pytest.fixture
def no_cyclic_gc() -> Any:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest_twisted.ensureDeferred
async def test_lost_links_and_closed_connections_are_freed_at_once(
    relay: RelayService, tmp_path: Path, no_cyclic_gc: None
) -> None:
    reactor = get_reactor()
    echo = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
    agent = agent_for(relay, tmp_path / "state")
    try:
        tunnel = await agent.forward(ForwardSpec(echo.getHost().port, unencrypted=True))
        state = relay.relay
        (link,) = state.links
        relay_link = weakref.ref(link)
        del link

        # A public connection through the tunnel, echoed, then closed by the client.
        client = await connect(tunnel.unencrypted_port)
        assert client.transport is not None
        client.transport.write(b"ping")
        await wait_until(lambda: client.received == b"ping", "the echo")
        # Its pieces: the relay's public connection, the agent's stream and local connection.
        (public,) = state.public_connections
        assert agent.link is not None
        (stream,) = agent.link.streams.values()
        pieces = {
            "relay public connection": weakref.ref(public),
            "agent stream": weakref.ref(stream),
            "agent local connection": weakref.ref(stream.protocol.other),
        }
        del public, stream
        client.transport.loseConnection()
        await client.lost
        await wait_until(lambda: not state.public_connections, "the relay to see the close")
        await wait_until(lambda: not agent.link.streams, "the agent's stream to end")  # type: ignore[union-attr]
        await wait_until(lambda: pieces["agent local connection"]() is None, "local close")
        left = [name for name, ref in pieces.items() if ref() is not None]
        assert not left, f"still referenced: {left}"

        # The agent leaves; the relay's end of its link is freed.
        await agent.stop()
        await wait_until(lambda: not state.links, "the relay to see the link go")
        assert relay_link() is None, holders(relay_link)
    finally:
        await agent.stop()
        await echo.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_link_cut_by_the_peer_is_freed_at_once(
    relay: RelayService, tmp_path: Path, no_cyclic_gc: None
) -> None:
    reactor = get_reactor()
    agent = agent_for(relay, tmp_path / "state")
    echo = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
    try:
        await agent.forward(ForwardSpec(echo.getHost().port))
        state = relay.relay
        (link,) = state.links
        relay_link = weakref.ref(link)
        del link
        # The agent's socket is reset under its TLS layer: the relay sees the peer vanish.
        tls = agent.link.transport  # type: ignore[union-attr]
        tls.transport.abortConnection()  # type: ignore[union-attr]
        del tls
        await wait_until(lambda: relay_link() is None or relay_link() not in state.links, "loss")
        assert relay_link() is None, holders(relay_link)
    finally:
        await agent.stop()
        await echo.stopListening()
