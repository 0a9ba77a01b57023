"""
The bounds on resets: the relay's per-source `ResetGuard`, and which resets spend a link's
rapid-reset bound on each side of the multiplexer.
"""

from __future__ import annotations

import pytest

from tests.unit.test_mux import FakeClock, peer_mux, terminated
from tunnel.relay._shares import ResetGuard
from tunnel.wire import ErrorCode, LinkSettings
from tunnel.wire import frames as F
from tunnel.wire.mux import LinkState


def _guard(clock: FakeClock) -> ResetGuard[str]:
    return ResetGuard(rate=10.0, burst=20, hold=5.0, clock=clock)


def test_a_source_past_its_reset_rate_is_refused_for_the_hold_then_admitted() -> None:
    clock = FakeClock()
    guard = _guard(clock)
    assert not guard.blocking
    assert not any(guard.reset("198.51.100.7") for _ in range(20))
    assert guard.admits("198.51.100.7")
    assert guard.reset("198.51.100.7")  # the 21st at once: blocked
    assert guard.blocking
    assert not guard.admits("198.51.100.7")
    assert guard.admits("198.51.100.8")  # others unaffected
    # Resets of connections still open while blocked do not extend the hold.
    assert not guard.reset("198.51.100.7")
    clock.now += 4.9
    assert not guard.admits("198.51.100.7")
    clock.now += 0.2
    assert guard.admits("198.51.100.7")
    assert not guard.blocking


def test_resets_at_the_sustained_rate_never_block() -> None:
    clock = FakeClock()
    guard = _guard(clock)
    for _ in range(1000):
        clock.now += 0.1  # 10 a second, the rate
        assert not guard.reset("203.0.113.1")
        assert guard.admits("203.0.113.1")


def test_a_source_that_keeps_resetting_after_its_hold_is_blocked_again() -> None:
    clock = FakeClock()
    guard = _guard(clock)
    for _ in range(21):
        guard.reset("s")
    clock.now += 5.0
    assert guard.admits("s")
    # 5 s refilled the bucket (rate 10, burst 20): a burst again, then blocked again.
    assert not any(guard.reset("s") for _ in range(20))
    assert guard.reset("s")
    assert not guard.admits("s")


def test_expired_blocks_are_dropped_as_new_ones_come() -> None:
    clock = FakeClock()
    guard: ResetGuard[int] = ResetGuard(rate=1.0, burst=1, hold=1.0, clock=clock)
    for source in range(5000):
        guard.reset(source)
        assert guard.reset(source)
        clock.now += 0.01
    # Never more than the sources blocked within the last hold (100), plus the slack
    # of the amortised pruning.
    assert len(guard) <= 2048


def test_a_guard_needs_a_positive_hold_rate_and_burst() -> None:
    clock = FakeClock()
    with pytest.raises(ValueError):
        ResetGuard(rate=1.0, burst=1, hold=0.0, clock=clock)
    with pytest.raises(ValueError):
        ResetGuard(rate=0.0, burst=1, hold=1.0, clock=clock)


# -- the multiplexer: which resets spend the link-ending bound ---------------------------------

SMALL = LinkSettings(reset_rate=10, reset_burst=20)


def _open_reset(sid: int) -> bytes:
    return F.encode_frame(F.FrameType.OPEN, 0, sid) + F.encode_reset(sid, ErrorCode.CANCEL)


def test_the_dialling_side_does_not_end_its_link_for_resets_of_streams_the_peer_opened() -> None:
    # The agent (client) and its relay, which opens even streams and resets them when
    # their public clients do.
    mux = peer_mux(client=True, settings=SMALL, clock=FakeClock())
    mux.receive_data(b"".join(_open_reset(2 * i + 2) for i in range(1000)))
    assert mux.state is LinkState.OPEN
    assert mux.stream_count == 0


def test_the_accepting_side_still_ends_a_link_that_opens_and_resets_in_a_loop() -> None:
    mux = peer_mux(client=False, settings=SMALL, clock=FakeClock())
    events = mux.receive_data(b"".join(_open_reset(2 * i + 1) for i in range(21)))
    assert terminated(events).code == ErrorCode.ENHANCE_YOUR_CALM


def test_the_dialling_side_still_bounds_opens_it_refuses() -> None:
    # Only a relay that breaks MAX_STREAMS gets here: a conforming opener is never refused.
    mux = peer_mux(client=True, settings=LinkSettings(max_streams=1, reset_rate=10, reset_burst=20))
    opens = b"".join(F.encode_frame(F.FrameType.OPEN, 0, 2 * i + 2) for i in range(30))
    assert terminated(mux.receive_data(opens)).code == ErrorCode.ENHANCE_YOUR_CALM
