"""
The relay's control core without I/O: a `RelaySession` per link, over the relay's state
(`Relay`, on a `MemoryReactorClock`, with a stand-in for each link adapter). Messages go
in; the effects that come out are checked, and what the relay's state then holds.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock

from tunnel.relay._control import FEATURES, TRANSITIONS, Input, LinkState, RelaySession
from tunnel.relay._effects import AcceptPeer, Effect, GoAway, ProbeHolder, Send
from tunnel.relay._state import Relay
from tunnel.relay.config import RATE_STRIKES, RECLAIM_PROBE_TIMEOUT, RelayConfig
from tunnel.relay.registry import ReclaimKey
from tunnel.wire import ErrorCode
from tunnel.wire import options as tunnel_options
from tunnel.wire.codes import ErrorReason, RefusalCode
from tunnel.wire.control import (
    AgentHello,
    ErrorMessage,
    RelayWelcome,
    TunnelClose,
    TunnelClosed,
    TunnelGranted,
    TunnelRefused,
    TunnelRequest,
)
from tunnel.wire.errors import LocalProtocolError

KEY = ReclaimKey(b"k" * 32)
BASE = RelayConfig(
    domain="tunnel.localhost", tcp_ports=(30000, 30099), tokens=frozenset({"token-a", "token-b"})
)


class _NoTLS:
    """Stands in for the relay's TLS contexts: no certificate in service."""

    pair = None


def make_relay(**changes: Any) -> Relay:
    return Relay(MemoryReactorClock(), replace(BASE, **changes), tls=_NoTLS(), reclaim_key=KEY)  # type: ignore[arg-type]


class Link:
    """Stands in for the link adapter: what the relay's state asks of a link."""

    def __init__(self, relay: Relay, source: str = "127.0.0.2") -> None:
        self.session = RelaySession(relay, self, relay.reactor.seconds)
        self.session.connected(f"{source}:40000", source)
        self.streams: dict[int, Any] = {}
        #: What the relay's state sent directly (`TunnelClosed` once a port is closed).
        self.sent: list[Any] = []
        #: Effects the relay's state asked this link to carry out (revocation, drain).
        self.performed: list[Effect] = []
        relay.links.add(self)  # type: ignore[arg-type]

    principal = property(lambda self: self.session.principal)
    authenticated = property(lambda self: self.session.authenticated)
    token = property(lambda self: self.session.token)
    peer_name = property(lambda self: self.session.peer_name)

    def send(self, message: Any) -> None:
        self.sent.append(message)

    def perform(self, effects: list[Effect]) -> None:
        self.performed += effects


def sent(effects: list[Effect]) -> list[Any]:
    return [e.message for e in effects if isinstance(e, Send)]


def goaways(effects: list[Effect]) -> list[int]:
    return [e.code for e in effects if isinstance(e, GoAway)]


def hello(relay: Relay, token: str | None = "token-a", source: str = "127.0.0.2") -> Link:
    link = Link(relay, source)
    effects = link.session.received(AgentHello(1, token, "test"))
    assert link.session.state is LinkState.ACCEPTED, effects
    return link


def ask(link: Link, request: TunnelRequest) -> Any:
    (answer,) = sent(link.session.received(request))
    return answer


def granted(relay: Relay, token: str = "token-a") -> tuple[Link, TunnelGranted]:
    link = hello(relay, token)
    answer = ask(link, TunnelRequest(1, "tls"))
    assert isinstance(answer, TunnelGranted), answer
    return link, answer


def reclaim(grant: TunnelGranted) -> TunnelRequest:
    return TunnelRequest(2, "tls", reclaim_id=grant.tunnel_id, reclaim_secret=grant.secret)


# -- hello and authentication ---------------------------------------------------------------


def test_a_hello_with_an_accepted_token_is_welcomed_with_the_tables_features() -> None:
    relay = make_relay()
    link = Link(relay)
    effects = link.session.received(AgentHello(1, "token-a", "test"))
    assert any(isinstance(e, AcceptPeer) for e in effects)
    (welcome,) = sent(effects)
    assert isinstance(welcome, RelayWelcome) and welcome.domain == "tunnel.localhost"
    restricting = {o.feature for o in tunnel_options.OPTIONS if o.restricts}
    assert set(welcome.features) >= restricting == {"allow", "deny", "client_ca"}
    featured = {o.feature for o in tunnel_options.OPTIONS if o.feature}
    assert set(welcome.features) == set(FEATURES) == featured
    assert featured >= {"allow", "deny", "client_ca", "name", "passthrough", "rate_limit"}
    assert link.session.principal.startswith("token:")
    assert relay.principal_links.count(link.session.principal) == 1


@pytest.mark.parametrize("token", ["wrong", None, ""])
def test_a_refused_token_is_told_unauthorized_and_the_link_ends(token: str | None) -> None:
    relay = make_relay()
    link = Link(relay)
    effects = link.session.received(AgentHello(1, token, "test"))
    (error,) = sent(effects)
    assert isinstance(error, ErrorMessage) and error.code == ErrorReason.UNAUTHORIZED
    assert "does not accept this token" in error.message
    assert goaways(effects) == [ErrorCode.UNAUTHORIZED]
    assert not any(isinstance(e, AcceptPeer) for e in effects)
    assert link.session.state is LinkState.ENDING and not link.session.authenticated
    # What the ending link still sends is ignored.
    assert link.session.received(TunnelRequest(1, "tls")) == []
    assert link.session.received(AgentHello(1, "token-a", "test")) == []
    assert len(relay.registry) == 0


def test_the_first_message_must_be_hello() -> None:
    relay = make_relay()
    for first in (TunnelRequest(1, "tls"), TunnelClose("k3j5h2g7d9q1xwzp"), TunnelClosed("x", "y")):
        link = Link(relay)
        effects = link.session.received(first)
        (error,) = sent(effects)
        assert isinstance(error, ErrorMessage) and error.code == ErrorReason.UNAUTHORIZED
        assert error.message == "the first control message must be hello"
        assert goaways(effects) == [ErrorCode.UNAUTHORIZED]
        assert link.session.state is LinkState.ENDING
    assert len(relay.registry) == 0


def test_no_hello_in_time_and_a_malformed_message() -> None:
    relay = make_relay()
    late = Link(relay)
    effects = late.session.hello_timed_out()
    assert [m.code for m in sent(effects)] == [ErrorReason.TIMEOUT]
    assert goaways(effects) == [ErrorCode.TIMEOUT]
    garbled = hello(relay)
    effects = garbled.session.bad_message("tunnel_request: member 'kind' must be ...")
    assert [m.code for m in sent(effects)] == [ErrorReason.BAD_MESSAGE]
    assert goaways(effects) == [ErrorCode.PROTOCOL_ERROR]
    # A timer firing after the hello is a race, not an error.
    assert hello(relay).session.hello_timed_out() == []


def test_an_adapter_input_outside_the_table_is_a_local_error() -> None:
    link = Link(make_relay())
    with pytest.raises(LocalProtocolError):
        link.session.probe_answered(1)
    with pytest.raises(LocalProtocolError):
        link.session.token_revoked()
    assert (LinkState.AWAITING_HELLO, Input.REQUEST) not in TRANSITIONS
    assert all((state, Input.LINK_LOST) in TRANSITIONS for state in LinkState)


def test_links_per_principal_are_bounded() -> None:
    relay = make_relay(max_links_per_token=2)
    first, _second = hello(relay), hello(relay)
    over = Link(relay)
    effects = over.session.received(AgentHello(1, "token-a", "test"))
    (error,) = sent(effects)
    assert isinstance(error, ErrorMessage) and error.code == ErrorReason.LIMIT
    assert "at most 2" in error.message
    # The calm GOAWAY drops what is queued, so it waits for the error to be written.
    (goaway,) = [e for e in effects if isinstance(e, GoAway)]
    assert goaway.code == ErrorCode.ENHANCE_YOUR_CALM and goaway.after_turn
    assert not over.session.authenticated and relay.refused["links_per_token"] == 1
    # Another token has its own share; a link gone frees a place.
    hello(relay, "token-b")
    first.session.link_lost()
    hello(relay)


def test_a_revoked_tokens_links_are_told_and_closed_with_their_tunnels() -> None:
    relay = make_relay()
    revoked, _grant = granted(relay, "token-a")
    kept, _ = granted(relay, "token-b")
    relay.set_tokens(frozenset({"token-b"}))
    (error,) = sent(revoked.performed)
    assert isinstance(error, ErrorMessage) and error.code == ErrorReason.UNAUTHORIZED
    assert "no longer accepts this token" in error.message
    assert goaways(revoked.performed) == [ErrorCode.UNAUTHORIZED]
    assert revoked.session.state is LinkState.ENDING
    assert kept.performed == []
    # The GOAWAY ends the link; its tunnels go with it.
    revoked.session.link_lost()
    assert [r.owner for r in relay.registry.all()] == [kept]


# -- requests ---------------------------------------------------------------------------------


def test_bad_options_are_refused_with_bad_request() -> None:
    relay = make_relay()
    link = hello(relay)
    cases = [
        ("tls", {"allow": ["nope"]}, "'nope' is not an IP network"),
        ("tls", {"allow": "10.0.0.0/8"}, "is a list"),
        ("tcp", {"deny": []}, "a deny list needs at least one network"),
        ("tls", {"client_ca": "garbage"}, "no PEM certificate"),
        ("tls", {"client_ca": 7}, "is PEM text"),
        ("tcp", {"client_ca": "any PEM"}, "need a TLS tunnel"),
        ("tcp", {"h2": True}, "h2 applies to TLS tunnels only"),
        ("tls", {"h2": "yes"}, "h2 is True or False"),
    ]
    for n, (kind, options, why) in enumerate(cases):
        answer = ask(link, TunnelRequest(n, kind, options))
        assert isinstance(answer, TunnelRefused), answer
        assert answer.code == RefusalCode.BAD_REQUEST and why in answer.message, answer
    assert len(relay.registry) == 0
    # Unknown options are ignored, as the protocol says; known ones give typed values.
    answer = ask(link, TunnelRequest(99, "tls", {"h2": True, "allow": ["10.0.0.0/8"], "x": 1}))
    assert isinstance(answer, TunnelGranted), answer
    record = relay.registry.get(answer.tunnel_id)
    assert record is not None and record.options == {"h2": True}
    assert record.allow is not None and record.allow.entries() == ["10.0.0.0/8"]
    assert record.deny is None
    answer = ask(link, TunnelRequest(100, "tcp", {"deny": ["10.6.6.0/24"]}))
    record = relay.registry.get(answer.tunnel_id)
    assert record is not None and record.deny is not None and record.options == {}
    assert record.deny.entries() == ["10.6.6.0/24"] and record.allow is None


def test_requests_over_the_link_rate_are_refused_then_the_link_is_calmed() -> None:
    relay = make_relay(tunnel_request_rate=1.0, tunnel_request_burst=3, max_tunnels_per_agent=10)
    link = hello(relay)
    assert all(isinstance(ask(link, TunnelRequest(n, "tls")), TunnelGranted) for n in range(3))
    effects = link.session.received(TunnelRequest(3, "tls"))
    (refused,) = sent(effects)
    assert refused.code == RefusalCode.LIMIT and "per link" in refused.message
    assert relay.refused["tunnel_requests_rate"] == 1 and goaways(effects) == []
    for n in range(RATE_STRIKES - 1):
        assert goaways(link.session.received(TunnelRequest(10 + n, "tls"))) == []
    effects = link.session.received(TunnelRequest(100, "tls"))
    assert goaways(effects) == [ErrorCode.ENHANCE_YOUR_CALM]
    # Tokens come back with time.
    relay.reactor.advance(1.0)  # type: ignore[attr-defined]
    assert isinstance(ask(link, TunnelRequest(200, "tls")), TunnelGranted)


def test_requests_over_the_principals_rate_are_refused_across_its_links() -> None:
    relay = make_relay(token_request_rate=1.0, token_request_burst=2)
    one, two = hello(relay), hello(relay)
    assert isinstance(ask(one, TunnelRequest(1, "tls")), TunnelGranted)
    assert isinstance(ask(two, TunnelRequest(1, "tls")), TunnelGranted)
    refused = ask(two, TunnelRequest(2, "tls"))
    assert refused.code == RefusalCode.LIMIT and "per token" in refused.message
    # Another token is not slowed down.
    assert isinstance(ask(hello(relay, "token-b"), TunnelRequest(1, "tls")), TunnelGranted)


def test_tunnels_per_agent_and_close() -> None:
    relay = make_relay(max_tunnels_per_agent=1)
    link, grant = granted(relay)
    refused = ask(link, TunnelRequest(2, "tls"))
    assert refused.code == RefusalCode.LIMIT and "at most 1 tunnels" in refused.message
    other = hello(relay)
    (answer,) = sent(other.session.received(TunnelClose(grant.tunnel_id)))
    assert answer == TunnelClosed(grant.tunnel_id, "not held by this agent")
    assert len(relay.registry) == 1
    assert sent(link.session.received(TunnelClose(grant.tunnel_id))) == []
    assert len(relay.registry) == 0
    assert link.sent == [TunnelClosed(grant.tunnel_id, "closed by the agent")]


def test_a_draining_relay_grants_nothing() -> None:
    relay = make_relay()
    link, grant = granted(relay)
    waiting = Link(relay)
    relay.draining = True
    assert goaways(link.session.drain()) == [ErrorCode.NO_ERROR]
    assert link.session.state is LinkState.DRAINING
    assert goaways(waiting.session.drain()) == [ErrorCode.NO_ERROR]
    refused = ask(link, TunnelRequest(2, "tls"))
    assert refused.code == RefusalCode.DRAINING
    # Not even its own tunnel back; closing still works.
    assert ask(link, reclaim(grant)).code == RefusalCode.DRAINING
    link.session.received(TunnelClose(grant.tunnel_id))
    assert len(relay.registry) == 0
    # A hello that still comes is answered; its requests are refused alike.
    waiting.session.received(AgentHello(1, "token-a", "test"))
    assert ask(waiting, TunnelRequest(1, "tls")).code == RefusalCode.DRAINING


# -- reclaim ------------------------------------------------------------------------------


def test_reclaim_with_its_own_secret_gets_the_id_back_and_another_tokens_is_refused() -> None:
    relay = make_relay()
    first, grant = granted(relay, "token-a")
    first.session.link_lost()
    assert len(relay.registry) == 0
    other = hello(relay, "token-b")
    refused = ask(other, reclaim(grant))
    assert refused.code == RefusalCode.RECLAIM_REFUSED
    again = hello(relay, "token-a")
    answer = ask(again, reclaim(grant))
    assert isinstance(answer, TunnelGranted) and answer.tunnel_id == grant.tunnel_id
    assert answer.secret == grant.secret
    # A wrong or malformed id is refused alike.
    bad = TunnelRequest(3, "tls", reclaim_id="NOT-AN-ID", reclaim_secret=grant.secret)
    assert ask(again, bad).code == RefusalCode.RECLAIM_REFUSED


def probe_of(effects: list[Effect], holder: Link) -> ProbeHolder:
    (probe,) = [e for e in effects if isinstance(e, ProbeHolder)]
    assert probe.holder is holder and probe.timeout == RECLAIM_PROBE_TIMEOUT
    assert sent(effects) == []  # the answer waits for the probe
    return probe


def test_a_live_holder_keeps_its_tunnel() -> None:
    relay = make_relay()
    holder, grant = granted(relay)
    rival = hello(relay)
    probe = probe_of(rival.session.received(reclaim(grant)), holder)
    assert rival.session.pending_reclaims == 1
    (answer,) = sent(rival.session.probe_answered(probe.probe))
    assert answer.code == RefusalCode.RECLAIM_REFUSED and "alive" in answer.message
    record = relay.registry.get(grant.tunnel_id)
    assert record is not None and record.owner is holder
    assert rival.session.pending_reclaims == 0


def test_a_silent_holder_loses_its_tunnel_after_the_probe_timeout() -> None:
    relay = make_relay()
    holder, grant = granted(relay)
    heir = hello(relay)
    probe = probe_of(heir.session.received(reclaim(grant)), holder)
    (answer,) = sent(heir.session.probe_timed_out(probe.probe))
    assert isinstance(answer, TunnelGranted) and answer.tunnel_id == grant.tunnel_id
    record = relay.registry.get(grant.tunnel_id)
    assert record is not None and record.owner is heir
    assert holder.sent == [TunnelClosed(grant.tunnel_id, "reclaimed by another link")]


def test_a_reclaiming_link_gone_meanwhile_takes_nothing() -> None:
    relay = make_relay()
    holder, grant = granted(relay)
    heir = hello(relay)
    probe = probe_of(heir.session.received(reclaim(grant)), holder)
    heir.session.link_lost()
    assert heir.session.pending_reclaims == 0
    assert heir.session.probe_timed_out(probe.probe) == []
    record = relay.registry.get(grant.tunnel_id)
    assert record is not None and record.owner is holder


def test_a_holder_gone_meanwhile_lets_the_reclaim_through() -> None:
    relay = make_relay()
    holder, grant = granted(relay)
    heir = hello(relay)
    probe = probe_of(heir.session.received(reclaim(grant)), holder)
    holder.session.link_lost()
    (answer,) = sent(heir.session.probe_answered(probe.probe))
    assert isinstance(answer, TunnelGranted) and answer.tunnel_id == grant.tunnel_id


def test_waiting_reclaims_are_bounded() -> None:
    relay = make_relay(max_tunnels_per_agent=2)
    holder = hello(relay)
    grants = [ask(holder, TunnelRequest(n, "tls")) for n in range(2)]
    heir = hello(relay)
    for grant in grants:
        probe_of(heir.session.received(reclaim(grant)), holder)
    (refused,) = sent(heir.session.received(reclaim(grants[0])))
    assert refused.code == RefusalCode.LIMIT and "reclaims may wait" in refused.message
