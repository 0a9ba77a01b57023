"""
Two workers' relays in one process, joined by the supervisor's directory (sans-IO): what a
worker grants is told to the other through `Directory.handle`, and the grant's decisions
that span workers (a reclaim of what the other holds, probed there; a conflicting claim;
links and tunnels per token) come out as with one relay. The links are the control core's
stand-ins (`tests.unit.test_relay_control`); the messages are encoded and decoded on the way.
"""

from __future__ import annotations

import weakref
from collections import deque
from typing import Any

from twisted.internet import defer

from tests.unit.test_relay_control import (
    Link,
    ask,
    granted,
    hello,
    make_relay,
    reclaim,
    sent,
)
from tunnel.relay._directory import Directory
from tunnel.relay._effects import ProbeHolder
from tunnel.relay._state import Relay
from tunnel.relay._worker import RemoteHolder, Worker
from tunnel.relay._workermsg import MessageDecoder, encode
from tunnel.wire.codes import ErrorReason, RefusalCode
from tunnel.wire.control import (
    AgentHello,
    ErrorMessage,
    TunnelClosed,
    TunnelGranted,
    TunnelRequest,
)


class Bus:
    """The supervisor's part: messages from the workers through the directory, queued,
    delivered by `run` (or held, to make two workers decide before they hear of each other)."""

    def __init__(self, workers: list[Worker]) -> None:
        self.workers = workers
        self.directory = Directory(len(workers))
        self.queue: deque[tuple[int, dict[str, Any]]] = deque()
        for i, worker in enumerate(workers):
            worker.send = lambda m, i=i: self.queue.append((i, self._wire(m)))  # type: ignore[method-assign]

    @staticmethod
    def _wire(message: dict[str, Any]) -> dict[str, Any]:
        (decoded,) = MessageDecoder().feed(encode(message))
        return decoded

    def run(self) -> None:
        while self.queue:
            worker, message = self.queue.popleft()
            for to, out in self.directory.handle(worker, message, lambda w: True):
                self.workers[to].received(self._wire(out))


class ProbedLink(Link):
    """A link stand-in whose probe the test answers."""

    def __init__(self, relay: Relay, source: str = "127.0.0.2") -> None:
        super().__init__(relay, source)
        self.probes: list[defer.Deferred[bool]] = []

    def probe(self, timeout: float) -> defer.Deferred[bool]:
        d: defer.Deferred[bool] = defer.Deferred()
        self.probes.append(d)
        return d


def two_workers(**changes: Any) -> tuple[list[Relay], Bus]:
    relays = [make_relay(**changes) for _ in range(2)]
    workers = [Worker(r.reactor, r, i, 2, "/nonexistent") for i, r in enumerate(relays)]
    return relays, Bus(workers)


def probed_hello(relay: Relay, token: str = "token-a") -> ProbedLink:
    link = ProbedLink(relay)
    link.session.received(AgentHello(1, token, "test"))
    assert link.session.authenticated
    return link


def carry_out_probe(effects: list[Any], heir: Link) -> tuple[ProbeHolder, defer.Deferred[bool]]:
    """What `RelayLink._probe` does: ask the holder, then answer the heir's session."""
    (probe,) = [e for e in effects if isinstance(e, ProbeHolder)]
    assert isinstance(probe.holder, RemoteHolder) and probe.holder.index == 0
    d = probe.holder.probe(probe.timeout)
    return probe, d


def test_a_grant_on_one_worker_is_known_to_the_other() -> None:
    (r0, _), bus = two_workers()
    link, grant = granted(r0)
    bus.run()
    assert bus.directory.holders(grant.tunnel_id) == [0]
    assert bus.workers[1].replica.elsewhere(grant.tunnel_id) == [0]
    assert bus.workers[1].tunnels(link.principal) == 1
    link.session.link_lost()
    for record in r0.registry.owned_by(link):
        r0.close_tunnel(record, "gone")
    bus.run()
    assert bus.directory.holders(grant.tunnel_id) == []
    assert bus.workers[1].replica.elsewhere(grant.tunnel_id) == []


def test_a_silent_holder_on_another_worker_loses_the_tunnel_to_a_reclaim() -> None:
    (r0, r1), bus = two_workers()
    holder = probed_hello(r0)
    grant = ask(holder, TunnelRequest(1, "tls"))
    bus.run()
    heir = hello(r1)
    probe, d = carry_out_probe(heir.session.received(reclaim(grant)), heir)
    bus.run()
    # Worker 0 probes its link; it does not answer.
    (ping,) = holder.probes
    ping.callback(False)
    bus.run()
    # Worker 0 closed it (its release told first), then answered: not alive.
    assert holder.sent == [TunnelClosed(grant.tunnel_id, "reclaimed by another link")]
    answers: list[bool] = []
    d.addCallback(answers.append)
    assert answers == [False]
    (answer,) = sent(heir.session.probe_timed_out(probe.probe))
    assert isinstance(answer, TunnelGranted) and answer.tunnel_id == grant.tunnel_id
    assert answer.secret == grant.secret
    bus.run()
    assert bus.directory.holders(grant.tunnel_id) == [1]
    assert bus.directory.conflicts == 0


def test_an_alive_holder_on_another_worker_keeps_the_tunnel() -> None:
    (r0, r1), bus = two_workers()
    holder = probed_hello(r0)
    grant = ask(holder, TunnelRequest(1, "tls"))
    bus.run()
    heir = hello(r1)
    probe, d = carry_out_probe(heir.session.received(reclaim(grant)), heir)
    bus.run()
    holder.probes[0].callback(True)
    bus.run()
    alive: list[bool] = []
    d.addCallback(alive.append)
    assert alive == [True]
    (answer,) = sent(heir.session.probe_answered(probe.probe))
    assert answer.code == RefusalCode.RECLAIM_REFUSED and "alive" in answer.message
    assert r0.registry.get(grant.tunnel_id) is not None
    assert r1.registry.get(grant.tunnel_id) is None


def test_a_probe_that_gets_no_answer_is_not_alive() -> None:
    (r0, r1), bus = two_workers()
    holder = probed_hello(r0)
    grant = ask(holder, TunnelRequest(1, "tls"))
    bus.run()
    heir = hello(r1)
    probe, d = carry_out_probe(heir.session.received(reclaim(grant)), heir)
    bus.queue.clear()  # the supervisor never forwards it
    answers: list[bool] = []
    d.addCallback(answers.append)
    r1.reactor.advance(probe.timeout + 0.5)
    assert answers == []
    r1.reactor.advance(0.6)
    assert answers == [False]


def test_the_same_id_claimed_on_two_workers_at_once_closes_the_later() -> None:
    (r0, r1), bus = two_workers()
    first, grant = granted(r0)
    bus.queue.clear()  # worker 1 has not heard of it yet; the directory neither
    first.session.link_lost()
    # Two reclaims, one on each worker, before either hears of the other.
    a, b = hello(r0), hello(r1)
    for record in r0.registry.owned_by(first):
        r0.close_tunnel(record, "gone", notify=False)
    assert isinstance(ask(a, reclaim(grant)), TunnelGranted)
    assert isinstance(ask(b, reclaim(grant)), TunnelGranted)
    bus.run()
    # Worker 0's claim came first: worker 1's lost, and it closed the tunnel, saying why.
    assert bus.directory.holders(grant.tunnel_id) == [0] and bus.directory.conflicts == 1
    assert r1.registry.get(grant.tunnel_id) is None
    assert b.sent == [TunnelClosed(grant.tunnel_id, "the tunnel is held on another worker")]


def test_a_name_with_other_options_on_another_worker_is_refused() -> None:
    tokens = {"web-token": ("web",)}
    (r0, r1), bus = two_workers(tokens=tokens)
    web0 = hello(r0, "web-token")
    assert isinstance(ask(web0, TunnelRequest(1, "tls", options={"name": "web"})), TunnelGranted)
    bus.run()
    web1 = hello(r1, "web-token")
    other = ask(web1, TunnelRequest(1, "tls", options={"name": "web", "h2": True}))
    assert other.code == RefusalCode.BAD_REQUEST and "other options" in other.message
    same = ask(web1, TunnelRequest(2, "tls", options={"name": "web"}))
    assert isinstance(same, TunnelGranted)
    bus.run()
    assert bus.directory.holders("web") == [0, 1] and bus.directory.conflicts == 0


def test_links_per_token_count_over_both_workers() -> None:
    (r0, r1), bus = two_workers(max_links_per_token=1)
    hello(r0)
    bus.run()
    late = Link(r1)
    effects = late.session.received(AgentHello(1, "token-a", "test"))
    (error,) = sent(effects)
    assert isinstance(error, ErrorMessage) and error.code == ErrorReason.LIMIT
    # Another token is not counted with it.
    hello(r1, "token-b")


def test_tunnels_per_agent_stay_per_link_and_per_token_count_over_workers() -> None:
    (r0, r1), bus = two_workers(max_tunnels_per_agent=1)
    link0 = hello(r0)
    assert isinstance(ask(link0, TunnelRequest(1, "tls")), TunnelGranted)
    bus.run()
    link1 = hello(r1)
    # Per agent (link): its own, whatever the other worker holds.
    assert isinstance(ask(link1, TunnelRequest(1, "tls")), TunnelGranted)
    assert ask(link1, TunnelRequest(2, "tls")).code == RefusalCode.LIMIT


class _Pending:
    """A link as `Worker._unauthenticated` sees it."""

    def __init__(self, authenticated: bool = False, lost: bool = False) -> None:
        self.authenticated = authenticated
        self.lost = lost


def test_links_waiting_for_their_hello_are_counted_without_the_settled_ones() -> None:
    """Only links whose hello is pending count; the authenticated and the lost leave the
    set once seen, so routing the next link costs the pending ones, not every link held
    (with 10,000 links the scan made each link's routing cost grow with the links)."""
    worker: Any = type("W", (), {})()
    worker._linking = weakref.WeakSet()
    held = [_Pending(authenticated=True) for _ in range(1000)]
    gone = [_Pending(lost=True) for _ in range(10)]
    pending = [_Pending() for _ in range(3)]
    for link in (*held, *gone, *pending):
        worker._linking.add(link)
    assert Worker._unauthenticated(worker) == 3
    assert set(worker._linking) == set(pending)
    pending[0].authenticated = True
    assert Worker._unauthenticated(worker) == 2
    assert len(worker._linking) == 2
