"""Per-party shares: token buckets, holdings, and the port pool's quarantine share."""

from __future__ import annotations

import pytest

from tunnel.relay._shares import Buckets, Holdings, TokenBucket
from tunnel.relay.registry import PortPool


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_burst_then_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10, burst=5, clock=clock)
    assert [bucket.take() for _ in range(6)] == [True] * 5 + [False]
    clock.now += 0.1
    assert bucket.take() and not bucket.take()
    clock.now += 100
    assert bucket.tokens == 5, "never above the burst"
    assert bucket.full()


def test_bucket_arguments() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0, 5, FakeClock())
    with pytest.raises(ValueError):
        TokenBucket(1, 0, FakeClock())


def test_buckets_per_key_and_forgets_full_ones() -> None:
    clock = FakeClock()
    buckets: Buckets[str] = Buckets(1, 2, clock, sweep_at=4)
    assert buckets.take("a") and buckets.take("a") and not buckets.take("a")
    assert buckets.take("b"), "another key has its own bucket"
    for n in range(10):
        buckets.take(f"k{n}")
    peak = len(buckets)
    clock.now += 10
    for n in range(peak + 1):
        buckets.take(f"new{n}")
    assert not any(f"k{n}" in buckets for n in range(10)), "full buckets were swept"
    assert len(buckets) <= peak + 1
    assert buckets.take("a") and buckets.take("a") and not buckets.take("a")


def test_holdings() -> None:
    held: Holdings[str, int] = Holdings()
    held.add("p", 1)
    held.add("p", 2)
    held.add("q", 3)
    assert held.count("p") == 2 and held.of("q") == {3}
    held.discard("p", 1)
    held.discard("p", 2)
    held.discard("nobody", 9)
    assert held.count("p") == 0 and len(held) == 1


def test_quarantine_share_of_a_churning_principal() -> None:
    """
    One principal opening and closing tunnels in a loop holds at most its share of the
    quarantine; the rest of the range stays free for the others.
    """
    clock = FakeClock()
    pool = PortPool(20000, 20099, clock, quarantine=300.0, share=0.1)
    assert pool.max_quarantined == 10
    for n in range(1000):
        (port,) = pool.candidates(f"t{n}")[:1]
        pool.take(port)
        pool.release(port, f"t{n}", "token:attacker")
    assert pool.quarantined == 10 == pool.quarantined_by("token:attacker")
    assert pool.released_early == 990
    # Another principal still gets ports: 90 of 100 are free.
    free = {p for p in pool.candidates("victim") if p}
    assert len(free) >= 30
    # The others' quarantine is untouched by the attacker's churn.
    victim_port = next(iter(free))
    pool.take(victim_port)
    pool.release(victim_port, "victim-tunnel", "token:victim")
    for n in range(100):
        (port,) = pool.candidates(f"u{n}")[:1]
        pool.take(port)
        pool.release(port, f"u{n}", "token:attacker")
    assert victim_port not in pool.candidates("someone else")
    assert pool.candidates("victim-tunnel", victim_port)[0] == victim_port


def test_quarantine_share_keeps_the_newest_and_expires() -> None:
    clock = FakeClock()
    pool = PortPool(1000, 1009, clock, quarantine=300.0, share=0.2)
    assert pool.max_quarantined == 2
    for port in (1000, 1001, 1002):
        pool.take(port)
        clock.now += 1
        pool.release(port, f"t{port}", "p")
    # The oldest was released early; the two newest still rest for their tunnels.
    assert pool.candidates("t1000", 1000)[0] == 1000
    assert 1001 not in pool.candidates("x") and 1002 not in pool.candidates("x")
    clock.now += 300
    assert pool.quarantined == 0 and pool.quarantined_by("p") == 0


def test_small_range_share_is_at_least_one() -> None:
    pool = PortPool(5000, 5001, FakeClock(), share=0.1)
    assert pool.max_quarantined == 1
    with pytest.raises(ValueError):
        PortPool(5000, 5001, FakeClock(), share=0)
