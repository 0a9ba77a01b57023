"""Rate limits: how users write rates (`tunnel._rate`), the option's row and suffix, the
relay's buckets that hold and release senders (`tunnel.relay._ratelimit`), and the grant's
ceiling."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from tests.unit.test_relay_control import ask, hello, make_relay
from tunnel._rate import MAX_RATE, MIN_RATE, check_rate, format_rate, parse_rate
from tunnel.agent.settings import ForwardSpec, parse_forward
from tunnel.relay._grant import effective_rate
from tunnel.relay._ratelimit import MIN_BURST, Direction, RateBucket, Throttle
from tunnel.wire.control import (
    TunnelGranted,
    TunnelRefused,
    TunnelRequest,
    decode_message,
    encode_message,
)
from tunnel.wire.options import check_values, parse_request_options, request_options


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("10MB/s", 10_000_000),
        ("10MB", 10_000_000),
        ("500KB/s", 500_000),
        ("500kB/s", 500_000),
        ("1GB/s", 1_000_000_000),
        ("1.5MB/s", 1_500_000),
        ("8MiB/s", 8 * 1024 * 1024),
        ("64KiB", 64 * 1024),
        ("1500B/s", 1500),
        (" 2 MB/s ", 2_000_000),
    ],
)
def test_rates_as_written(text: str, rate: int) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10", "has no unit"),
        ("10M", "has no unit"),
        ("10Mb/s", "is in bits"),
        ("80Mbit/s", "is in bits"),
        ("10Mbps", "is in bits"),
        ("fast", "is not a number with a unit"),
        ("-1MB/s", "is not a number with a unit"),
        ("10 MB per second", "is not a number with a unit"),
        ("999B/s", "below the minimum of 1KB/s"),
        ("2000TB/s", "above the maximum"),
    ],
)
def test_bad_rates_say_why(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_rate(text)


def test_check_rate_takes_none_text_and_bytes_per_second() -> None:
    assert check_rate(None) is None
    assert check_rate("1MB/s") == 1_000_000
    assert check_rate(2048) == 2048
    for bad in (True, 1.5, [1], 10):
        with pytest.raises(ValueError):
            check_rate(bad)


def test_format_rate() -> None:
    assert format_rate(10_000_000) == "10MB/s"
    assert format_rate(1_500_000_000) == "1.5GB/s"
    assert format_rate(8 * 1024 * 1024) == "8.389MB/s"
    assert format_rate(1000) == "1KB/s" and format_rate(999) == "999B/s"


@given(st.integers(MIN_RATE, MAX_RATE))
def test_formatted_rates_read_back_close(rate: int) -> None:
    assert abs(parse_rate(format_rate(rate)) - rate) <= rate * 1e-3


# -- the option ----------------------------------------------------------------------------------


def test_the_option_goes_on_the_wire_as_bytes_per_second() -> None:
    values = check_values({"rate_limit": "10MB/s"})
    assert values["rate_limit"] == 10_000_000
    assert request_options(values) == ("tls", {"rate_limit": 10_000_000})
    assert request_options(check_values({})) == ("tls", {})
    assert parse_request_options("tcp", {"rate_limit": 5000}) == {"rate_limit": 5000}
    for bad in ("10MB/s", None, 10, True, 1.5):
        with pytest.raises(ValueError):
            parse_request_options("tls", {"rate_limit": bad})


def test_forward_specs_and_suffixes() -> None:
    assert ForwardSpec(8000, rate_limit="500KB/s").rate_limit == 500_000  # type: ignore[arg-type]
    assert parse_forward("8000:rate=10MB").rate_limit == 10_000_000
    spec = parse_forward("[::1]:22:tcp:proxy2:rate=8MiB/s")
    assert (spec.host, spec.unencrypted, spec.proxy_protocol) == ("::1", True, 2)
    assert spec.rate_limit == 8 * 1024 * 1024
    with pytest.raises(ValueError, match="has no unit"):
        parse_forward("8000:rate=10")
    with pytest.raises(ValueError, match="rate=1MB and rate=2MB together"):
        parse_forward("8000:rate=1MB:rate=2MB")
    with pytest.raises(ValueError, match="'speed=1MB' is not a port"):
        parse_forward("8000:speed=1MB")


def test_agent_and_command_flag() -> None:
    from tunnel.agent.tap import Options

    options = Options()
    options.parseOptions(
        ["--relay", "localhost:8443", "--forward", "8000", "--rate-limit", "2MB/s"]
    )
    assert [f.rate_limit for f in options["forward"]] == [2_000_000]


# -- buckets ------------------------------------------------------------------------------------


class FakeGate:
    def __init__(self) -> None:
        self.events: list[str] = []

    def throttled(self) -> None:
        self.events.append("held")

    def unthrottled(self) -> None:
        self.events.append("released")


def test_a_bucket_goes_into_debt_and_says_how_long_to_wait() -> None:
    clock = Clock()
    bucket = RateBucket(1000, 500, clock.seconds)
    assert bucket.charge(400) == 0
    assert bucket.charge(600) == pytest.approx(0.5)
    clock.advance(0.25)
    assert bucket.wait() == pytest.approx(0.25)
    clock.advance(10)
    assert bucket.tokens == 500  # capped at the burst


def test_a_direction_holds_its_senders_until_the_debt_is_paid() -> None:
    clock = Clock()
    direction = Direction(100_000, clock)
    burst = direction.bucket.burst
    assert burst == MIN_BURST
    a, b = FakeGate(), FakeGate()
    direction.sent(a, burst)  # the burst, no debt
    assert a.events == []
    direction.sent(a, 50_000)  # half a second of debt
    direction.sent(b, 10_000)  # b shares the bucket: held too
    assert a.events == ["held"] and b.events == ["held"] and direction.held == 2
    direction.sent(a, 1)  # a chunk still arriving: charged, not held twice
    assert a.events == ["held"]
    clock.advance(0.5)
    assert a.events == ["held"] and direction.held == 2  # the timer found more debt
    clock.advance(0.2)
    assert a.events == b.events == ["held", "released"] and direction.held == 0
    assert direction.holds == 2


def test_a_forgotten_gate_is_not_released_and_stop_cancels_the_timer() -> None:
    clock = Clock()
    throttle = Throttle(10_000, clock)
    a, b = FakeGate(), FakeGate()
    throttle.down.sent(a, MIN_BURST + 10_000)
    throttle.down.sent(b, 1)
    throttle.down.forget(a)
    clock.advance(2)
    assert a.events == ["held"] and b.events == ["held", "released"]
    throttle.up.sent(a, MIN_BURST + 10_000)
    assert clock.getDelayedCalls()
    throttle.stop()
    assert not [c for c in clock.getDelayedCalls() if c.active()]
    assert throttle.down.held == 0 and a.events == ["held", "held"]


@given(st.lists(st.integers(1, 300_000), min_size=1, max_size=60))
def test_what_passes_is_bounded_by_rate_times_time_plus_burst_and_a_chunk(
    chunks: list[int],
) -> None:
    """A sender that sends one chunk whenever it is not held: by the time it is released
    after its last chunk, the time elapsed pays for all but the burst."""
    clock = Clock()
    rate = 1_000_000
    direction = Direction(rate, clock)
    gate = FakeGate()
    sent = 0
    for chunk in chunks:
        while gate.events and gate.events[-1] == "held":
            clock.advance(0.01)
        direction.sent(gate, chunk)
        sent += chunk
        assert sent <= rate * clock.seconds() + direction.bucket.burst + chunk
    while gate.events and gate.events[-1] == "held":
        clock.advance(0.01)
    assert sent <= rate * (clock.seconds() + 0.01) + direction.bucket.burst


# -- the grant ----------------------------------------------------------------------------------


def test_the_relay_ceiling_is_the_default_and_the_cap() -> None:
    assert effective_rate(None, None) is None
    assert effective_rate(5, None) == 5
    assert effective_rate(None, 7) == 7
    assert effective_rate(5, 7) == 5 and effective_rate(9, 7) == 7


def granted_rate(relay: Any, options: dict[str, Any]) -> tuple[int | None, Any]:
    link = hello(relay)
    answer = ask(link, TunnelRequest(1, "tls", options))
    assert isinstance(answer, TunnelGranted), answer
    record = relay.registry.get(answer.tunnel_id)
    return answer.rate_limit, record.throttle


def test_grants_carry_the_rate_the_relay_enforces() -> None:
    rate, throttle = granted_rate(make_relay(), {})
    assert rate is None and throttle is None
    rate, throttle = granted_rate(make_relay(), {"rate_limit": 2_000_000})
    assert rate == 2_000_000 and throttle.rate == 2_000_000
    rate, throttle = granted_rate(make_relay(max_rate=1_000_000), {"rate_limit": 2_000_000})
    assert rate == 1_000_000 and throttle.up.bucket.rate == 1_000_000
    rate, throttle = granted_rate(make_relay(max_rate=1_000_000), {})
    assert rate == 1_000_000 and throttle.down.bucket.rate == 1_000_000


def test_a_bad_wire_rate_is_a_bad_request_and_closing_stops_the_throttle() -> None:
    relay = make_relay()
    link = hello(relay)
    refused = ask(link, TunnelRequest(1, "tls", {"rate_limit": "10MB/s"}))
    assert isinstance(refused, TunnelRefused) and "integer number of bytes" in refused.message
    granted = ask(link, TunnelRequest(2, "tls", {"rate_limit": 5000}))
    record = relay.registry.get(granted.tunnel_id)
    record.throttle.up.sent(FakeGate(), 10**6)
    assert record.throttle.up._timer is not None
    relay.close_tunnel(record, "test")
    assert record.throttle.up._timer is None


def test_rate_limit_in_a_grant_round_trips_and_is_validated() -> None:
    grant = TunnelGranted(1, "abc", "abc.x", 443, rate_limit=10_000_000)
    assert decode_message(encode_message(grant)) == grant
    assert decode_message(encode_message(replace(grant, rate_limit=None))) == replace(
        grant, rate_limit=None
    )
    from tunnel.wire.control import ControlError

    with pytest.raises(ControlError, match="rate_limit"):
        decode_message(encode_message(replace(grant, rate_limit=0)))
