"""The attack suite's own tools work against a real relay: a raw link is welcomed."""

from __future__ import annotations

from tests.attacks.harness import AttackWorld
from tests.attacks.rawlink import HELLO, RawLink
from tests.e2e.reliability_harness import Group


def test_raw_link_is_welcomed_and_granted(group: Group) -> None:
    world = AttackWorld(group)
    with RawLink(world.relay.port, world.relay.ca) as link:
        answer = link.handshake()
        assert answer["type"] == "welcome", answer
        assert answer["domain"] == "tunnel.localhost"
        granted = link.request(1, "tls")
        assert granted["type"] == "tunnel_granted", granted
        assert granted["host"] == f"{granted['tunnel_id']}.tunnel.localhost"
    world.assert_serves()
    assert world.usage().fds > 0


def test_relay_hello_is_the_first_frame(group: Group) -> None:
    world = AttackWorld(group)
    with RawLink(world.relay.port, world.relay.ca) as link:
        first = link.recv_frame()
        assert first is not None and first.kind == HELLO
        assert first.payload[:4] == b"TUNL"
