"""Tests for tunnel.agent._retry.ReconnectPolicy: quick after a cut, back-off otherwise."""

from __future__ import annotations

import random

import pytest
from twisted.application.internet import backoffPolicy

from tunnel.agent._retry import ReconnectPolicy


class Jitter:
    """A jitter source that returns the given values in turn (then the last one)."""

    def __init__(self, *values: float) -> None:
        self.values = list(values)

    def __call__(self) -> float:
        return self.values.pop(0) if len(self.values) > 1 else self.values[0]


def up_then_cut(policy: ReconnectPolicy, up_for: float, *, cut: bool = True) -> None:
    policy.link_up(100.0)
    policy.link_down(100.0 + up_for, cut=cut)


def test_without_a_cut_it_is_twisteds_backoff() -> None:
    ours = ReconnectPolicy(jitter=Jitter(0.37))
    twisted = backoffPolicy(initialDelay=0.1, maxDelay=10.0, factor=2.0, jitter=Jitter(0.37))
    for attempt in range(1, 40):
        assert ours(attempt) == pytest.approx(twisted(attempt))
    assert ours(1) == pytest.approx(0.2 + 0.37)
    assert ours(39) == pytest.approx(10.0 + 0.37)


def test_a_cut_settled_link_retries_within_tens_of_ms() -> None:
    policy = ReconnectPolicy(jitter=Jitter(0.999))
    up_then_cut(policy, 30.0)
    delay = policy(1)
    assert delay == pytest.approx(0.05 * 0.999)
    assert delay < policy.quick


def test_the_quick_retry_is_jittered() -> None:
    rng = random.Random(7)
    delays = []
    for _ in range(1000):
        policy = ReconnectPolicy(jitter=rng.random)
        up_then_cut(policy, 5.0)
        delays.append(policy(1))
    assert all(0 <= d < 0.05 for d in delays)
    # Spread over the whole interval, not one burst: each 10 ms fifth holds about a fifth.
    for k in range(5):
        share = sum(1 for d in delays if k * 0.01 <= d < (k + 1) * 0.01) / len(delays)
        assert 0.15 < share < 0.25


def test_only_the_first_retry_after_a_cut_is_quick() -> None:
    policy = ReconnectPolicy(jitter=Jitter(0.0))
    up_then_cut(policy, 30.0)
    assert policy(1) == 0.0
    # That attempt failed (refused: the relay is gone): back off as before.
    assert policy(2) == pytest.approx(0.4)
    assert policy(3) == pytest.approx(0.8)


def test_a_connection_that_ends_before_its_welcome_backs_off() -> None:
    policy = ReconnectPolicy(jitter=Jitter(0.0))
    up_then_cut(policy, 30.0)
    assert policy(1) == 0.0
    # The quick retry connected (so the service counts from 1 again) but the relay closed
    # it before welcoming it: no second quick retry.
    policy.link_down(130.5, cut=True)
    assert policy(1) == pytest.approx(0.2)


def test_a_link_cut_before_it_settled_backs_off() -> None:
    policy = ReconnectPolicy(settled=1.0, jitter=Jitter(0.0))
    up_then_cut(policy, 0.99)
    assert policy(1) == pytest.approx(0.2)
    up_then_cut(policy, 1.0)
    assert policy(1) == 0.0


def test_a_link_the_relay_drained_or_refused_backs_off() -> None:
    policy = ReconnectPolicy(jitter=Jitter(0.0))
    up_then_cut(policy, 30.0, cut=False)
    assert policy(1) == pytest.approx(0.2)


def test_a_flapping_link_gets_one_quick_retry_per_settled_period() -> None:
    # Links that are welcomed and cut 0.5 s later, over and over, with a settled time of
    # 1 s: only those that lived a second earn a quick retry.
    policy = ReconnectPolicy(settled=1.0, jitter=Jitter(0.0))
    now, quick = 0.0, 0
    for _ in range(20):
        policy.link_up(now)
        now += 0.5
        policy.link_down(now, cut=True)
        delay = policy(1)
        quick += delay < 0.05
        now += delay
    assert quick == 0


def test_a_new_link_forgets_an_unused_quick_retry() -> None:
    policy = ReconnectPolicy(jitter=Jitter(0.0))
    up_then_cut(policy, 30.0)
    policy.link_up(200.0)  # welcomed again without the service asking (an adopted link)
    policy.link_down(200.1, cut=True)
    assert policy(1) == pytest.approx(0.2)


@pytest.mark.parametrize(
    "kwargs",
    [{"initial": -1.0}, {"factor": 0.5}, {"max_delay": 0.01}, {"quick": -0.1}, {"settled": -1}],
)
def test_bad_parameters_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ReconnectPolicy(**kwargs)  # type: ignore[arg-type]
