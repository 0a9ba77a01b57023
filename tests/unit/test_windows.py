"""Tests for tunnel.wire.windows.ReceiveWindow: exact accounting and auto-tuning."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel.wire.windows import ReceiveWindow

KIB = 1024


def _check(w: ReceiveWindow) -> None:
    assert w.available >= 0
    assert w.unconsumed >= 0
    assert w.unacknowledged >= 0
    assert w.size == w.available + w.unconsumed + w.unacknowledged
    assert w.size <= w.max_size


def test_overrun_refused_without_change() -> None:
    w = ReceiveWindow(1000, 1000, 0.0)
    assert w.received(1000)
    assert not w.received(1)
    assert (w.available, w.unconsumed) == (0, 1000)


def test_credit_returned_per_quarter_window() -> None:
    w = ReceiveWindow(1000, 1000, 0.0)
    assert w.received(1000)
    assert w.consumed(249, 1.0, None, False) == 0
    assert w.consumed(1, 1.0, None, False) == 250
    _check(w)
    assert w.consumed(249, 1.0, None, False) == 0
    assert w.consumed(1, 1.0, None, False) == 250
    _check(w)
    assert w.consumed(500, 1.0, None, True) == 0  # final: nothing goes back
    _check(w)


def test_overconsume_raises() -> None:
    w = ReceiveWindow(1000, 1000, 0.0)
    w.received(10)
    with pytest.raises(ValueError):
        w.consumed(11, 0.0, None, False)


def test_grows_when_fast_and_caps_at_max() -> None:
    w = ReceiveWindow(256 * KIB, 1024 * KIB, 0.0)
    t = 0.0
    sizes = []
    for _ in range(10):
        quarter = w.size // 4
        assert w.received(quarter)
        t += 0.001  # far less than 1 RTT
        assert w.consumed(quarter, t, 0.1, False) > 0
        sizes.append(w.size)
        _check(w)
    assert sizes[:3] == [512 * KIB, 1024 * KIB, 1024 * KIB]
    assert max(sizes) == 1024 * KIB


def test_never_grows_for_slow_reader() -> None:
    w = ReceiveWindow(256 * KIB, 16 * 1024 * KIB, 0.0)
    t = 0.0
    for _ in range(20):
        quarter = w.size // 4
        w.received(quarter)
        t += 0.25  # 2.5 RTTs per quarter window
        assert w.consumed(quarter, t, 0.1, False) == quarter
    assert w.size == 256 * KIB


def test_no_growth_without_rtt() -> None:
    w = ReceiveWindow(1024, 1 << 20, 0.0)
    w.received(256)
    assert w.consumed(256, 0.0, None, False) == 256
    assert w.size == 1024


@given(
    st.lists(
        st.tuples(st.booleans(), st.integers(0, 5000), st.floats(0, 1)),
        max_size=60,
    )
)
def test_accounting_invariant(ops: list[tuple[bool, int, float]]) -> None:
    w = ReceiveWindow(4096, 65536, 0.0)
    now = 0.0
    granted = w.size  # what the peer was ever allowed to send
    sent = 0
    for receive, n, dt in ops:
        now += dt
        if receive:
            n = min(n, w.available)
            assert w.received(n)
            sent += n
        else:
            n = min(n, w.unconsumed)
            granted += w.consumed(n, now, 0.05, False)
        _check(w)
        assert granted - sent == w.available
