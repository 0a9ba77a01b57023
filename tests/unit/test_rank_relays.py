"""
The agent's ranking of its relays by connect time (`tunnel.agent._dial.rank_times`): it
waits for every probe, but not for long after the first answer.
"""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from tunnel.agent import _dial
from tunnel.agent.settings import RelayAddress

INF = float("inf")


class Probes:
    """`connect_time` stand-in: one Deferred per relay, fired by the test."""

    def __init__(self) -> None:
        self.made: dict[str, defer.Deferred[float]] = {}
        self.cancelled: list[str] = []

    def __call__(
        self, reactor: object, relay: RelayAddress, timeout: float
    ) -> defer.Deferred[float]:
        def cancel(d: defer.Deferred[float]) -> None:
            self.cancelled.append(relay.host)
            d.callback(INF)  # as connect_time turns a cancelled connect into infinity

        d: defer.Deferred[float] = defer.Deferred(cancel)
        self.made[relay.host] = d
        return d


@pytest.fixture
def probes(monkeypatch: pytest.MonkeyPatch) -> Probes:
    made = Probes()
    monkeypatch.setattr(_dial, "connect_time", made)
    return made


def relays(*hosts: str) -> list[RelayAddress]:
    return [RelayAddress(host, 443) for host in hosts]


def test_a_relay_that_never_answers_does_not_hold_the_ranking(probes: Probes) -> None:
    clock = Clock()
    ranked = _dial.rank_times(clock, relays("a", "b", "c"), 10.0)
    result: list[list[float]] = []
    ranked.addCallback(result.append)
    probes.made["b"].callback(0.010)
    clock.advance(0.020)
    probes.made["a"].callback(0.030)
    assert not result  # c still has until 4 times 10 ms + 50 ms
    clock.advance(0.089 - 0.020)
    assert not result
    clock.advance(0.002)
    assert result == [[0.030, 0.010, INF]] and probes.cancelled == ["c"]


def test_every_answer_ends_the_ranking_at_once(probes: Probes) -> None:
    clock = Clock()
    result: list[list[float]] = []
    _dial.rank_times(clock, relays("a", "b"), 10.0).addCallback(result.append)
    probes.made["a"].callback(0.2)
    probes.made["b"].callback(0.1)
    assert result == [[0.2, 0.1]] and not clock.getDelayedCalls()
    assert probes.cancelled == []


def test_failures_alone_wait_for_every_probe(probes: Probes) -> None:
    clock = Clock()
    result: list[list[float]] = []
    _dial.rank_times(clock, relays("a", "b"), 10.0).addCallback(result.append)
    probes.made["a"].callback(INF)
    clock.advance(5)
    assert not result  # no answer yet: b may still be the only relay that works
    probes.made["b"].callback(INF)
    assert result == [[INF, INF]]
