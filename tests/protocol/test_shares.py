"""
Per-party bounds of the relay's control plane: tunnel-request rates per link and per
principal, links per principal, and the quarantine share of a churning principal. The relay
runs on a `MemoryReactorClock`; each link is a `RelayLink` on a `StringTransport`.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from tests.protocol.linkpair import decode_frames, goaway_codes
from tunnel.relay.registry import ReclaimKey
from tunnel.relay.service import RATE_STRIKES, Relay, RelayConfig, RelayLink
from tunnel.wire import ErrorCode
from tunnel.wire import frames as f

BASE = RelayConfig(domain="tunnel.localhost", tcp_ports=(30000, 30099), tokens=None)


def make_relay(**changes: Any) -> Relay:
    config = replace(BASE, **changes)
    return Relay(MemoryReactorClock(), config, None, ReclaimKey(b"k" * 32))  # type: ignore[arg-type]


class Peer:
    """A hand-driven agent on one `RelayLink`."""

    def __init__(self, relay: Relay, host: str = "127.0.0.2", token: str | None = None) -> None:
        self.relay = relay
        self.link = RelayLink(relay)
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", host, 40000))
        self.link.makeConnection(self.transport)
        self.link.dataReceived(f.encode_hello(1, 1, {}))
        self.control({"type": "hello", "version": 1, "token": token, "agent": "test"})

    def control(self, message: dict[str, Any]) -> None:
        payload = json.dumps(message).encode()
        self.link.dataReceived(f.encode_frame(f.FrameType.CONTROL, 0, 0, payload))

    def messages(self, start: int = 0) -> list[dict[str, Any]]:
        return [
            json.loads(frame.payload)
            for frame in decode_frames(self.transport.value()[start:])
            if frame.type == f.FrameType.CONTROL
        ]

    def request(self, request_id: int, kind: str = "tls") -> dict[str, Any]:
        start = len(self.transport.value())
        self.control({"type": "tunnel_request", "request_id": request_id, "kind": kind})
        answers = self.messages(start)
        return answers[-1] if answers else {}

    def close(self, tunnel_id: str) -> None:
        self.control({"type": "tunnel_close", "tunnel_id": tunnel_id})

    def goaways(self) -> list[int]:
        return goaway_codes(self.transport.value())


def test_requests_over_the_link_rate_are_refused_with_limit_then_calm() -> None:
    relay = make_relay(tunnel_request_rate=5.0, tunnel_request_burst=10)
    peer = Peer(relay)
    answers = []
    for n in range(10):
        answers.append(peer.request(n + 1))
        peer.close(answers[-1]["tunnel_id"])
    assert all(a["type"] == "tunnel_granted" for a in answers)
    refused = peer.request(100)
    assert refused["type"] == "tunnel_refused" and refused["code"] == "limit"
    assert "slow down" in refused["message"]
    assert relay.refused["tunnel_requests_rate"] == 1
    # Tokens come back with time.
    relay.reactor.advance(0.2)
    assert peer.request(101)["type"] == "tunnel_granted"
    # A link that goes on asking after refusals is ended.
    assert peer.goaways() == []
    for n in range(RATE_STRIKES + 1):
        peer.request(200 + n)
    assert peer.goaways() == [ErrorCode.ENHANCE_YOUR_CALM]


def test_requests_over_the_principal_rate_are_refused_on_every_link() -> None:
    relay = make_relay(token_request_rate=1.0, token_request_burst=4)
    first, second = Peer(relay), Peer(relay)
    assert [first.request(n)["type"] for n in (1, 2)] == ["tunnel_granted"] * 2
    assert [second.request(n)["type"] for n in (1, 2)] == ["tunnel_granted"] * 2
    assert second.request(3)["code"] == "limit"
    assert first.request(3)["code"] == "limit"
    # Another source is another principal on a relay without tokens.
    other = Peer(relay, host="127.0.0.3")
    assert other.request(1)["type"] == "tunnel_granted"


def test_links_per_principal_are_bounded() -> None:
    relay = make_relay(tokens=frozenset({"attacker", "victim"}), max_links_per_token=3)
    links = [Peer(relay, token="attacker") for _ in range(3)]
    assert all(p.messages()[0]["type"] == "welcome" for p in links)
    over = Peer(relay, token="attacker")
    over.request(1)
    relay.reactor.advance(0)
    assert [m["type"] for m in over.messages()] == ["error"]
    assert over.messages()[0]["code"] == "limit"
    assert over.goaways() == [ErrorCode.ENHANCE_YOUR_CALM]
    assert not over.link.authenticated
    assert relay.refused["links_per_token"] == 1
    # The same address with another token is not affected.
    victim = Peer(relay, token="victim")
    assert victim.messages()[0]["type"] == "welcome"
    # A link that ends frees its place.
    links[0].link.connectionLost(Failure(error.ConnectionDone()))
    again = Peer(relay, token="attacker")
    assert again.messages()[0]["type"] == "welcome"


def test_tcp_churn_of_one_principal_leaves_ports_to_others() -> None:
    relay = make_relay(
        tokens=frozenset({"attacker", "victim"}),
        tunnel_request_burst=100_000,
        token_request_burst=100_000,
    )
    attacker = Peer(relay, token="attacker")
    for n in range(1000):
        granted = attacker.request(n + 1, "tcp")
        assert granted["type"] == "tunnel_granted", granted
        attacker.close(granted["tunnel_id"])
    assert relay.ports.quarantined == relay.ports.max_quarantined == 10
    victim = Peer(relay, token="victim")
    for n in range(50):
        assert victim.request(n + 1, "tcp")["type"] == "tunnel_granted"


def public(host: str) -> Protocol:
    """A public connection's protocol from `host`, as `open_public_stream` sees it."""
    protocol = Protocol()
    protocol.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", host, 50000)))
    return protocol


def test_connections_per_source_share_of_a_tunnel() -> None:
    relay = make_relay(max_connections_per_source=3, max_connections_per_tunnel=10)
    agent = Peer(relay)
    tunnel_id = agent.request(1)["tunnel_id"]
    mine = [public("127.0.0.2") for _ in range(5)]
    opened = [relay.open_public_stream(tunnel_id, p) for p in mine]
    assert [s is not None for s in opened] == [True] * 3 + [False] * 2
    assert relay.refused["connections_per_source"] == 2
    # Another source (and the same /64 rule for IPv6 is `source_of`'s) still gets in.
    assert relay.open_public_stream(tunnel_id, public("127.0.0.1")) is not None
    # A connection that ends gives its place back to its source.
    relay.public_closed(tunnel_id, mine[0])
    assert relay.open_public_stream(tunnel_id, public("127.0.0.2")) is not None
    record = relay.registry.get(tunnel_id)
    assert record is not None and record.sources == {"127.0.0.2": 3, "127.0.0.1": 1}
    assert record.connections == 4


def test_streams_per_principal_over_its_links() -> None:
    relay = make_relay(tokens=frozenset({"t"}), max_streams_per_token=4)
    first, second = Peer(relay, token="t"), Peer(relay, token="t")
    tunnels = [first.request(1)["tunnel_id"], second.request(1)["tunnel_id"]]
    opened = [relay.open_public_stream(tunnels[n % 2], public(f"127.0.1.{n}")) for n in range(6)]
    assert sum(s is not None for s in opened) == 4
    assert relay.refused["streams_per_token"] == 2
