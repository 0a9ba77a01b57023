"""The rate-limited log: N lines per key per interval, then one summary per interval."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, formatEvent

from tunnel.relay._ratelog import RateLog, shorten


def capture() -> tuple[Logger, list[str]]:
    lines: list[str] = []

    def observer(event: dict[str, Any]) -> None:
        lines.append(formatEvent(event))

    return Logger(observer=observer), lines


def test_limit_lines_then_one_summary_per_interval() -> None:
    log, lines = capture()
    clock = Clock()
    rate = RateLog(log, clock, limit=3, interval=10.0)
    written = [rate.warn("refused", "refused {n}", n=n) for n in range(10_000)]
    assert written[:3] == [True, True, True] and not any(written[3:])
    assert lines == ["refused 0", "refused 1", "refused 2"]
    clock.advance(10.0)
    assert lines[3:] == ["refused: … and 9,997 more in the last 10 s"]
    assert rate.dropped == 9_997
    # A new interval: lines again.
    assert rate.warn("refused", "refused again")
    assert lines[-1] == "refused again"
    clock.advance(10.0)
    assert len(lines) == 5, "no summary when nothing was left out"


def test_keys_are_independent() -> None:
    log, lines = capture()
    clock = Clock()
    rate = RateLog(log, clock, limit=1, interval=5.0)
    for _ in range(5):
        rate.info("a", "a")
        rate.info("b", "b")
    assert lines == ["a", "b"]
    clock.advance(5.0)
    assert sorted(lines[2:]) == [
        "a: … and 4 more in the last 5 s",
        "b: … and 4 more in the last 5 s",
    ]


def test_summary_before_the_next_line_when_the_timer_is_late() -> None:
    log, lines = capture()
    clock = Clock()
    rate = RateLog(log, clock, limit=1, interval=10.0)
    rate.warn("k", "one")
    rate.warn("k", "two")
    clock.rightNow += 11.0  # time passes without the timer having run yet
    rate.warn("k", "three")
    assert lines == ["one", "k: … and 1 more in the last 10 s", "three"]
    clock.advance(0)
    assert len(lines) == 3, "the summary is written once"


def test_per_call_limit_and_flush() -> None:
    log, lines = capture()
    clock = Clock()
    rate = RateLog(log, clock, limit=1)
    for n in range(5):
        rate.emit("grant", LogLevel.info, "granted {n}", limit=3, n=n)
    assert lines == ["granted 0", "granted 1", "granted 2"]
    rate.flush()
    assert lines[-1] == "grant: … and 2 more in the last 10 s"
    assert not clock.getDelayedCalls()


def test_bad_arguments() -> None:
    log, _ = capture()
    with pytest.raises(ValueError):
        RateLog(log, Clock(), limit=0)
    with pytest.raises(ValueError):
        RateLog(log, Clock(), interval=0)


def test_shorten() -> None:
    assert shorten("abc") == "abc"
    long = "x" * 10_240
    short = shorten(long)
    assert short.startswith("x" * 80 + "…") and "10,240 characters" in short
    assert len(short) < 110
    assert shorten(None) == "None"
    assert len(shorten(repr("y" * 5000), 64)) < 100
