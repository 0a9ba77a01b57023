"""
Named tunnels in the relay's control core, without I/O: who may hold a name (the token's
``names``), a name's pool of agents (same options, joined and left), the choice of a member
for each public connection, and the ids and names that can never be the same string.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.address import IPv4Address

from tests.unit.test_relay_control import Link, ask, hello, make_relay, sent
from tunnel.relay._state import Relay
from tunnel.relay.config import POOL_REFUSED_PAUSE
from tunnel.relay.registry import Member, TunnelRecord, new_tunnel_id
from tunnel.wire.codes import RefusalCode
from tunnel.wire.control import (
    TunnelClose,
    TunnelClosed,
    TunnelGranted,
    TunnelRefused,
    TunnelRequest,
)
from tunnel.wire.names import ID_ALPHABET, ID_LENGTH, check_name, is_random_id

TOKENS = {"web-token": ("web", "api-*"), "api-token": ("api-*",), "plain": ()}


def named(n: int, name: str, kind: str = "tls", **options: Any) -> TunnelRequest:
    return TunnelRequest(n, kind, {"name": name, **options})


def relay_with_names(**changes: Any) -> Relay:
    return make_relay(tokens=TOKENS, **changes)


# -- names and ids ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["web", "a", "api-1", "x" * 63, "k3j5h2g7d9q1-xwz", "0" * 17])
def test_names_are_dns_labels_not_of_the_form_of_a_random_id(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "not a DNS label"),
        ("Web", "not a DNS label"),
        ("-web", "not a DNS label"),
        ("web-", "not a DNS label"),
        ("we_b", "not a DNS label"),
        ("web.example", "not a DNS label"),
        ("x" * 64, "not a DNS label"),
        ("k3j5h2g7d9q1xwzp", "form of a random tunnel id"),
        (7, "is a string"),
    ],
)
def test_bad_names_are_value_errors_saying_why(name: Any, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        check_name(name)


def test_random_ids_are_never_valid_names() -> None:
    for _ in range(200):
        tunnel_id = new_tunnel_id()
        assert is_random_id(tunnel_id)
        with pytest.raises(ValueError):
            check_name(tunnel_id)
    assert len(ID_ALPHABET) == 32 and ID_LENGTH == 16


# -- who may hold a name ------------------------------------------------------------------


def test_a_name_is_granted_only_to_a_token_that_allows_it() -> None:
    relay = relay_with_names()
    web = hello(relay, "web-token")
    answer = ask(web, named(1, "web"))
    assert isinstance(answer, TunnelGranted), answer
    assert answer.tunnel_id == "web" and answer.host == "web.tunnel.localhost"
    assert answer.secret == ""  # the name is the identity; no reclaim secret
    assert isinstance(ask(web, named(2, "api-7")), TunnelGranted)  # a glob
    api = hello(relay, "api-token")
    refused = ask(api, named(1, "web"))
    assert isinstance(refused, TunnelRefused)
    assert refused.code == RefusalCode.NAME_NOT_ALLOWED and "'web'" in refused.message
    # Without names=, a token holds random ids only.
    plain = hello(relay, "plain")
    assert ask(plain, named(1, "web")).code == RefusalCode.NAME_NOT_ALLOWED
    assert isinstance(ask(plain, TunnelRequest(2, "tls")), TunnelGranted)
    assert (
        relay.registry.get("web") is not None and relay.registry.get("web").members[0].link is web
    )  # type: ignore[union-attr]


def test_a_relay_without_tokens_lets_any_agent_hold_any_name() -> None:
    relay = make_relay(tokens=None)
    link = hello(relay, None)
    assert isinstance(ask(link, named(1, "anything")), TunnelGranted)


def test_a_name_of_the_form_of_an_id_and_a_malformed_one_are_bad_requests() -> None:
    relay = make_relay(tokens=None)
    link = hello(relay, None)
    for n, name in enumerate(["k3j5h2g7d9q1xwzp", "UPPER", 7, ""]):
        refused = ask(link, TunnelRequest(n, "tls", {"name": name}))
        assert refused.code == RefusalCode.BAD_REQUEST, refused
    # And a reclaim cannot take a name either: reclaim ids are random ids only.
    assert isinstance(ask(link, named(10, "web")), TunnelGranted)
    other = hello(relay, None)
    sneaky = TunnelRequest(11, "tls", reclaim_id="web", reclaim_secret="x")
    assert ask(other, sneaky).code == RefusalCode.RECLAIM_REFUSED


def test_a_names_no_longer_allowed_are_left_when_the_tokens_change() -> None:
    relay = relay_with_names()
    web = hello(relay, "web-token")
    ask(web, named(1, "web"))
    ask(web, named(2, "api-1"))
    relay.set_tokens({"web-token": ("api-*",), "api-token": ("api-*",), "plain": ()})
    assert relay.registry.get("web") is None and relay.registry.get("api-1") is not None
    assert TunnelClosed("web", "the token no longer allows this name") in web.sent


# -- pools ---------------------------------------------------------------------------------


def test_agents_asking_for_a_name_together_serve_it_as_a_pool() -> None:
    relay = relay_with_names()
    one, two = hello(relay, "web-token"), hello(relay, "web-token")
    assert isinstance(ask(one, named(1, "web", h2=True)), TunnelGranted)
    joined = ask(two, named(1, "web", h2=True))
    assert isinstance(joined, TunnelGranted) and joined.tunnel_id == "web"
    record = relay.registry.get("web")
    assert record is not None and [m.link for m in record.members] == [one, two]
    # The same link twice, or other options, are refused.
    assert ask(two, named(2, "web", h2=True)).code == RefusalCode.BAD_REQUEST
    three = hello(relay, "web-token")
    mismatch = ask(three, named(1, "web"))
    assert mismatch.code == RefusalCode.BAD_REQUEST and "other options" in mismatch.message
    assert ask(three, named(2, "web", "tcp")).code == RefusalCode.BAD_REQUEST
    allow = ask(three, named(3, "web", h2=True, allow=["10.0.0.0/8"]))
    assert allow.code == RefusalCode.BAD_REQUEST
    # One member closing, or its link lost, leaves the others serving the name.
    assert sent(one.session.received(TunnelClose("web"))) == []
    assert one.sent == [TunnelClosed("web", "closed by the agent")]
    assert [m.link for m in record.members] == [two] and relay.registry.get("web") is record
    assert isinstance(ask(one, named(3, "web", h2=True)), TunnelGranted)
    two.session.link_lost()
    assert [m.link for m in record.members] == [one]
    one.session.link_lost()
    assert relay.registry.get("web") is None
    # Once nobody serves it, it may start again with other options.
    assert isinstance(ask(three, named(4, "web")), TunnelGranted)


def test_a_named_raw_tcp_tunnel_asks_first_for_a_port_derived_from_its_name() -> None:
    relay = relay_with_names()
    link = hello(relay, "web-token")
    listened: list[int] = []

    def listen_tcp(record: TunnelRecord, wanted: Any) -> bool:
        listened.extend(p for p in wanted if p is not None)
        record.tcp_port = wanted[0]
        return True

    relay.listen_tcp = listen_tcp  # type: ignore[method-assign]
    answer = ask(link, TunnelRequest(1, "tcp", {"name": "api-db"}, reclaim_port=30042))
    preferred = relay.preferred_port("api-db")
    assert 30000 <= preferred <= 30099 and answer.tcp_port == preferred
    assert listened == [preferred, 30042]
    # The same on every start of the relay: derived with its key, not random.
    assert relay_with_names().preferred_port("api-db") == preferred


def test_max_tunnels_of_a_permit_counts_over_all_links_of_its_principal() -> None:
    from dataclasses import replace

    relay = make_relay(tokens=None)
    one, two = hello(relay, None), hello(relay, None)
    for link in (one, two):
        link.session.permit = replace(link.session.permit, max_tunnels=2)
    assert isinstance(ask(one, TunnelRequest(1, "tls")), TunnelGranted)
    assert isinstance(ask(two, named(1, "web")), TunnelGranted)
    refused = ask(two, TunnelRequest(2, "tls"))
    assert refused.code == RefusalCode.LIMIT and "at most 2 tunnels" in refused.message


# -- choosing a member ---------------------------------------------------------------------


class _Usable:
    def __init__(self) -> None:
        self.lost = False
        self.draining = False


def members(n: int) -> tuple[TunnelRecord, list[_Usable]]:
    links = [_Usable() for _ in range(n)]
    record = TunnelRecord("web", "tls", links[0], named=True)
    for link in links[1:]:
        record.join(link)
    return record, links


def choose(record: TunnelRecord, now: float = 100.0, skip: Any = ()) -> Any:
    from tunnel.relay.registry import usable_link

    member = record.choose(now, usable_link, POOL_REFUSED_PAUSE, skip)
    return None if member is None else member.link


def test_each_connection_goes_to_the_member_with_the_fewest_streams_ties_in_turn() -> None:
    record, (a, b, c) = members(3)
    first = [choose(record) for _ in range(6)]
    assert set(first) == {a, b, c} and first[:3] != first[3:4] * 3
    assert all(first.count(link) == 2 for link in (a, b, c))
    record.members[0].streams = 5
    record.members[1].streams = 1
    assert {choose(record) for _ in range(4)} == {c}
    record.members[2].streams = 1
    assert {choose(record) for _ in range(4)} == {b, c}


def test_a_single_member_serves_while_usable_even_resting_and_never_when_skipped() -> None:
    record, (a,) = members(1)
    turn = record.turn
    # Its target refused a connection just now: with no other member, it still serves.
    record.members[0].refused_at = 100.0
    assert choose(record, now=100.0) is a
    assert record.turn == turn + 1
    assert choose(record, skip=[record.members[0]]) is None
    a.draining = True
    assert choose(record) is None
    a.draining = False
    a.lost = True
    assert choose(record) is None


def test_lost_draining_and_refusing_members_are_out_of_rotation() -> None:
    record, (a, b) = members(2)
    a.draining = True
    assert {choose(record) for _ in range(4)} == {b}
    a.draining = False
    b.lost = True
    assert {choose(record) for _ in range(4)} == {a}
    b.lost = False
    # A refused target: out for a few seconds, unless it succeeds sooner.
    record.members[0].refused_at = 100.0
    assert {choose(record, now=101.0) for _ in range(4)} == {b}
    assert {choose(record, now=100.0 + POOL_REFUSED_PAUSE) for _ in range(4)} == {a, b}
    record.members[0].refused_at = None
    assert {choose(record, now=101.0) for _ in range(4)} == {a, b}
    # With every member refusing, connections still go somewhere (best effort)...
    for member in record.members:
        member.refused_at = 100.0
    assert choose(record, now=101.0) in (a, b)
    # ... but never to a lost or draining link, nor to one skipped.
    a.lost = b.draining = True
    assert choose(record) is None
    a.lost = b.draining = False
    assert choose(record, skip=[record.members[0]]) is b


class _Stream:
    tunnel_id = ""


class _PoolLink(Link):
    """A link stand-in that opens streams."""

    lost = False
    draining = False

    def openStream(self, metadata: bytes, peer: Any) -> _Stream:
        stream = _Stream()
        self.streams[len(self.streams) + 1] = stream
        return stream


class _Transport:
    def getPeer(self) -> IPv4Address:
        return IPv4Address("TCP", "198.51.100.7", 40000)

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 443)


class _Public:
    transport = _Transport()


def pool_links(relay: Relay, n: int) -> list[_PoolLink]:
    from tunnel.wire.control import AgentHello

    links = []
    for _ in range(n):
        link = _PoolLink(relay)
        link.session.received(AgentHello(1, "web-token", "test"))
        assert isinstance(ask(link, named(1, "web")), TunnelGranted)
        links.append(link)
    return links


def test_public_connections_spread_over_a_pool_and_skip_a_refusing_target() -> None:
    relay = relay_with_names()
    a, b = pool_links(relay, 2)
    opened = [_Public() for _ in range(4)]
    for public in opened:
        assert relay.open_public_stream("web", public) is not None  # type: ignore[arg-type]
    assert len(a.streams) == len(b.streams) == 2
    record = relay.registry.get("web")
    assert record is not None and [m.streams for m in record.members] == [2, 2]
    on_a = [p for p in opened if relay._public_sources[p][2].link is a]  # type: ignore[index]
    on_b = [p for p in opened if p not in on_a]
    # a's target refuses: new connections go to b until a succeeds again.
    relay.target_refused(on_a[0])  # type: ignore[arg-type]
    for _ in range(3):
        relay.open_public_stream("web", _Public())  # type: ignore[arg-type]
    assert len(a.streams) == 2 and len(b.streams) == 5
    relay.target_answered(on_a[0])  # type: ignore[arg-type]
    assert record.members[0].refused_at is None
    # A connection that ends is counted off its member.
    relay.public_closed("web", on_b[0])  # type: ignore[arg-type]
    assert [m.streams for m in record.members] == [2, 4]
    # A stream refused unprocessed (its member draining) moves to another member.
    a.draining = True
    moved = relay.reopen_public_stream(on_a[0])  # type: ignore[arg-type]
    assert moved is not None and len(b.streams) == 6
    assert [m.streams for m in record.members] == [1, 5]
    b.draining = True
    assert relay.reopen_public_stream(on_a[1]) is None  # type: ignore[arg-type]
    assert relay.open_public_stream("web", _Public()) is None  # type: ignore[arg-type]


def test_status_shows_pools_and_their_members() -> None:
    from tunnel.relay._status import relay_status

    relay = relay_with_names()
    a, _b = pool_links(relay, 2)
    relay.open_public_stream("web", _Public())  # type: ignore[arg-type]
    a.draining = True
    status = relay_status(relay)
    assert status["named_tunnels"] == 1 and status["pool_members"] == 2
    assert status["pool_members_in_rotation"] == 1
    pool = status["pools"]["web"]
    assert pool["kind"] == "tls" and pool["connections"] == 1
    assert [m["in_rotation"] for m in pool["members"]] == [False, True]
    assert sum(m["streams"] for m in pool["members"]) == 1


def test_member_defaults() -> None:
    assert Member(object()).streams == 0 and Member(object()).refused_at is None


def test_a_raw_tcp_connection_opens_on_the_record_its_factory_found(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tunnel.relay._public import _PublicFactory

    relay = relay_with_names()
    pool_links(relay, 1)
    record = relay.registry.get("web")
    assert record is not None
    client = IPv4Address("TCP", "198.51.100.7", 40000)
    raw: Any = _PublicFactory(relay, "web", tls=False).buildProtocol(client)
    tls: Any = _PublicFactory(relay, "web", tls=True).buildProtocol(client)
    # Its stream opens in the same call (raw TCP); a TLS one's after its handshake, when
    # the tunnel may have been closed and its name served again: looked up then.
    assert raw._record is record and tls._record is None

    def looked_up(tunnel_id: str) -> None:
        raise AssertionError(f"{tunnel_id} looked up again")

    monkeypatch.setattr(relay.registry, "get", looked_up)
    assert relay.open_public_stream("web", _Public(), record) is not None  # type: ignore[arg-type]
    assert record.connections == 1


def test_a_paused_public_connection_that_ends_leaves_the_paused_watch() -> None:
    from twisted.internet import error
    from twisted.python.failure import Failure

    from tunnel.relay._public import PublicProtocol

    class _Pausable(_Transport):
        def pauseProducing(self) -> None:
            pass

        def resumeProducing(self) -> None:
            pass

    relay = relay_with_names()
    held, free = PublicProtocol(relay, "web"), PublicProtocol(relay, "web")
    for p in (held, free):
        p.transport = _Pausable()  # type: ignore[assignment]
    held.pauseProducing()
    assert len(relay.paused_watch) == 1
    free.connectionLost(Failure(error.ConnectionDone()))
    assert len(relay.paused_watch) == 1
    held.connectionLost(Failure(error.ConnectionDone()))
    assert len(relay.paused_watch) == 0
