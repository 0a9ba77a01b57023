"""
Allow lists between a real agent and relay in this process: the relay enforces them, and an
agent never sends one to a relay that would ignore it (malformed ones: the relay's control
core, tests/unit/test_relay_control.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import protocol

from tests.protocol.inprocess import Echo, Recorder, agent_for, connect, get_reactor, wait_until
from tunnel.agent.session import ForwardSpec
from tunnel.errors import TunnelRefused
from tunnel.relay import _control as relay_control
from tunnel.relay.service import RelayService


async def exchange(port: int) -> Recorder:
    """Connect to the raw TCP `port`, send a line, and return once the connection closes or
    the line comes back."""
    client = await connect(port)
    assert client.transport is not None
    client.transport.write(b"hello\n")
    await wait_until(lambda: client.closed or client.received == b"hello\n", "echo or close")
    if not client.closed:
        client.transport.loseConnection()
    return client


@pytest_twisted.ensureDeferred
async def test_raw_tcp_clients_outside_the_list_are_closed(
    relay: RelayService, tmp_path: Path
) -> None:
    reactor = get_reactor()
    echo = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
    echo2 = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
    echo3 = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
    agent = agent_for(relay, tmp_path / "state")
    try:
        outside = await agent.forward(
            ForwardSpec(echo.getHost().port, unencrypted=True, allow=("10.0.0.0/8",))
        )
        inside = await agent.forward(
            ForwardSpec(echo2.getHost().port, unencrypted=True, allow=("10.0.0.0/8", "127.0.0.1"))
        )
        assert outside.unencrypted_port is not None and inside.unencrypted_port is not None
        refused = await exchange(outside.unencrypted_port)
        assert refused.closed and refused.received == b""
        assert relay.relay.denied_connections == 1
        admitted = await exchange(inside.unencrypted_port)
        assert admitted.received == b"hello\n"
        assert relay.relay.denied_connections == 1
        # A deny list wins over the allow list that admits the client.
        denied = await agent.forward(
            ForwardSpec(
                echo3.getHost().port,
                unencrypted=True,
                allow=("127.0.0.0/8",),
                deny=("127.0.0.1",),
            )
        )
        assert denied.unencrypted_port is not None
        refused = await exchange(denied.unencrypted_port)
        assert refused.closed and refused.received == b""
        assert relay.relay.denied_connections == 2
    finally:
        await agent.stop()
        await echo.stopListening()
        await echo2.stopListening()
        await echo3.stopListening()


def relay_ca_pem(relay: RelayService) -> str:
    """Some valid PEM certificate: the relay's own."""
    from cryptography.hazmat.primitives import serialization

    return relay.relay.tls.certificate.public_bytes(serialization.Encoding.PEM).decode()


@pytest_twisted.ensureDeferred
async def test_agent_will_not_send_restrictions_to_a_relay_that_would_ignore_them(
    relay: RelayService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(relay_control, "FEATURES", ())  # as a first-release relay
    agent = agent_for(relay, tmp_path / "state")
    try:
        with pytest.raises(TunnelRefused, match="does not support allow lists"):
            await agent.forward(ForwardSpec(8000, allow=("10.0.0.0/8",)))
        with pytest.raises(TunnelRefused, match="does not support client certificates"):
            await agent.forward(ForwardSpec(8002, client_ca=relay_ca_pem(relay)))
        with pytest.raises(TunnelRefused, match="does not support deny lists"):
            await agent.forward(ForwardSpec(8003, deny=("10.0.0.0/8",)))
        assert len(relay.relay.registry) == 0
        # Without one, the same relay grants the tunnel.
        await agent.forward(ForwardSpec(8001))
        assert len(relay.relay.registry) == 1
    finally:
        await agent.stop()
