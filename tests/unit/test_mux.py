"""Tests for tunnel.wire.mux.Multiplexer: every rule of the link protocol, one at a time."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel.wire import frames as F
from tunnel.wire.errors import ErrorCode, LocalProtocolError, StreamLimitError
from tunnel.wire.events import (
    ControlReceived,
    DataReceived,
    Event,
    GoAwayReceived,
    HelloReceived,
    LinkTerminated,
    PingAcknowledged,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)
from tunnel.wire.mux import LinkSettings, LinkState, Multiplexer, StreamState

KIB = 1024
HELLO = F.encode_hello(1, 1, {})


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def decode(data: bytes) -> list[F.Frame]:
    decoder = F.FrameDecoder(F.MAX_FRAME_SIZE_LIMIT)
    out = decoder.feed(data)
    assert decoder.buffered == 0
    return out


def peer_mux(
    client: bool = False, settings: LinkSettings | None = None, clock: FakeClock | None = None
) -> Multiplexer:
    """A multiplexer that has had a (raw) peer's HELLO and whose own HELLO was taken."""
    mux = Multiplexer(client=client, settings=settings, clock=clock or FakeClock())
    assert isinstance(mux.receive_data(HELLO)[0], HelloReceived)
    mux.data_to_send()
    return mux


def terminated(events: list[Event]) -> LinkTerminated:
    assert events, "no events"
    last = events[-1]
    assert isinstance(last, LinkTerminated), events
    return last


def assert_violation(mux: Multiplexer, data: bytes, code: ErrorCode) -> None:
    events = mux.receive_data(data)
    end = terminated(events)
    assert end.code == code and not end.remote
    assert mux.closed
    goaways = [f for f in decode(mux.data_to_send()) if f.type == F.FrameType.GOAWAY]
    assert len(goaways) == 1
    assert F.decode_goaway(goaways[0].payload)[1] == code
    assert mux.receive_data(F.encode_ping(b"8 octets")) == []  # later input ignored


def pair(
    client_settings: LinkSettings | None = None,
    server_settings: LinkSettings | None = None,
    clock: FakeClock | None = None,
) -> tuple[Multiplexer, Multiplexer]:
    clock = clock or FakeClock()
    c = Multiplexer(client=True, settings=client_settings, clock=clock)
    s = Multiplexer(client=False, settings=server_settings, clock=clock)
    pump(c, s)
    return c, s


def pump(a: Multiplexer, b: Multiplexer) -> tuple[list[Event], list[Event]]:
    """Exchange bytes until both sides are quiet; returns (events of a, events of b)."""
    ea: list[Event] = []
    eb: list[Event] = []
    for _ in range(10_000):
        out_a, out_b = a.data_to_send(), b.data_to_send()
        if not out_a and not out_b:
            return ea, eb
        eb += b.receive_data(out_a)
        ea += a.receive_data(out_b)
    raise AssertionError("pump did not settle")


# -- handshake -----------------------------------------------------------------------------


def test_handshake() -> None:
    c, s = pair()
    assert c.state is s.state is LinkState.OPEN
    assert c.version == s.version == 1
    assert c.can_open_streams and s.can_open_streams


def test_open_before_hello_is_local_error() -> None:
    mux = Multiplexer(client=True)
    with pytest.raises(LocalProtocolError):
        mux.open_stream()


def test_first_frame_not_hello() -> None:
    mux = Multiplexer(client=True)
    mux.data_to_send()
    assert_violation(mux, F.encode_ping(b"12345678"), ErrorCode.PROTOCOL_ERROR)


def test_unknown_first_frame_is_not_hello_either() -> None:
    mux = Multiplexer(client=True)
    mux.data_to_send()
    assert_violation(mux, F.encode_frame(0x42, 0, 0, b""), ErrorCode.PROTOCOL_ERROR)


def test_bad_magic() -> None:
    mux = Multiplexer(client=False)
    bad = F.encode_frame(F.FrameType.HELLO, 0, 0, b"HTTP\x01\x01")
    assert_violation(mux, bad, ErrorCode.PROTOCOL_ERROR)


def test_http_request_instead_of_hello() -> None:
    # "GET " parses as a 4.6 MB frame: refused by size before anything else.
    mux = Multiplexer(client=False)
    assert_violation(mux, b"GET / HTTP/1.1\r\n\r\n", ErrorCode.FRAME_SIZE_ERROR)


@pytest.mark.parametrize("versions", [(2, 3), (0, 0), (5, 1), (2, 255)])
def test_version_mismatch(versions: tuple[int, int]) -> None:
    mux = Multiplexer(client=False)
    assert_violation(mux, F.encode_hello(*versions, {}), ErrorCode.VERSION_UNSUPPORTED)


def test_version_range_overlapping() -> None:
    mux = Multiplexer(client=False)
    events = mux.receive_data(F.encode_hello(0, 7, {}))
    assert events == [HelloReceived(1, {})]


def test_second_hello() -> None:
    assert_violation(peer_mux(), HELLO, ErrorCode.PROTOCOL_ERROR)


def test_hello_on_a_stream() -> None:
    mux = Multiplexer(client=False)
    bad = F.encode_frame(F.FrameType.HELLO, 0, 1, F.HELLO_MAGIC + b"\x01\x01")
    assert_violation(mux, bad, ErrorCode.PROTOCOL_ERROR)


@pytest.mark.parametrize(
    ("setting", "value", "code"),
    [
        (F.Setting.MAX_FRAME_SIZE, 100, ErrorCode.PROTOCOL_ERROR),
        (F.Setting.MAX_FRAME_SIZE, 1 << 24, ErrorCode.PROTOCOL_ERROR),
        (F.Setting.INITIAL_WINDOW, 0, ErrorCode.FLOW_CONTROL_ERROR),
        (F.Setting.INITIAL_WINDOW, 1 << 31, ErrorCode.FLOW_CONTROL_ERROR),
    ],
)
def test_invalid_settings(setting: int, value: int, code: ErrorCode) -> None:
    mux = Multiplexer(client=False)
    assert_violation(mux, F.encode_hello(1, 1, {setting: value}), code)


def test_unknown_settings_ignored() -> None:
    mux = Multiplexer(client=True)
    events = mux.receive_data(F.encode_hello(1, 1, {0x77: 5, F.Setting.MAX_STREAMS: 3}))
    assert events == [HelloReceived(1, {0x77: 5, F.Setting.MAX_STREAMS: 3})]
    assert mux.state is LinkState.OPEN
    for _ in range(3):
        mux.open_stream()
    with pytest.raises(StreamLimitError):
        mux.open_stream()


def test_unknown_frame_types_ignored() -> None:
    mux = peer_mux()
    data = b"".join(
        F.encode_frame(t, 0xFF, sid, b"junk") for t in (0x08, 0x42, 0xFF) for sid in (0, 7)
    )
    assert mux.receive_data(data) == []
    assert mux.state is LinkState.OPEN
    assert mux.data_to_send() == b""


# -- opening streams -----------------------------------------------------------------------


@pytest.mark.parametrize("stream_id", [0, 2, 4])
def test_open_wrong_parity(stream_id: int) -> None:
    mux = peer_mux(client=False)  # peer is the client: odd ids
    assert_violation(mux, F.encode_frame(F.FrameType.OPEN, 0, stream_id), ErrorCode.PROTOCOL_ERROR)


def test_open_wrong_parity_on_client() -> None:
    mux = peer_mux(client=True)  # peer is the server: even ids
    assert_violation(mux, F.encode_frame(F.FrameType.OPEN, 0, 3), ErrorCode.PROTOCOL_ERROR)


@pytest.mark.parametrize("second", [5, 3])
def test_open_reused_or_lower_id(second: int) -> None:
    mux = peer_mux()
    assert mux.receive_data(F.encode_frame(F.FrameType.OPEN, 0, 5, b"m")) == [StreamOpened(5, b"m")]
    assert_violation(mux, F.encode_frame(F.FrameType.OPEN, 0, second), ErrorCode.PROTOCOL_ERROR)


def test_open_reused_after_close() -> None:
    mux = peer_mux()
    mux.receive_data(F.encode_frame(F.FrameType.OPEN, 0, 1) + F.encode_reset(1, 0))
    assert not mux.is_open(1)
    assert_violation(mux, F.encode_frame(F.FrameType.OPEN, 0, 1), ErrorCode.PROTOCOL_ERROR)


def test_streams_over_max_refused_at_once() -> None:
    mux = peer_mux(settings=LinkSettings(max_streams=2))
    opens = b"".join(F.encode_frame(F.FrameType.OPEN, 0, sid) for sid in (1, 3, 5))
    events = mux.receive_data(opens)
    assert events == [StreamOpened(1, b""), StreamOpened(3, b"")]
    assert mux.stream_count == 2 and not mux.is_open(5)
    assert mux.refused_streams == 1
    out = decode(mux.data_to_send())
    assert out == [F.Frame(F.FrameType.RESET, 0, 5, F.encode_reset(5, 6)[9:])]
    # Data in flight on the refused stream is ignored; it is never queued.
    assert mux.receive_data(F.encode_data(5, b"late", fin=True)) == []
    # A slot frees up: the next stream is accepted.
    mux.receive_data(F.encode_reset(1, ErrorCode.CANCEL))
    assert mux.receive_data(F.encode_frame(F.FrameType.OPEN, 0, 7)) == [StreamOpened(7, b"")]


def test_local_stream_limit() -> None:
    c, _s = pair(server_settings=LinkSettings(max_streams=2))
    c.open_stream()
    c.open_stream()
    assert not c.can_open_streams
    with pytest.raises(StreamLimitError):
        c.open_stream()


def test_open_metadata_delivered() -> None:
    c, s = pair()
    sid = c.open_stream(b'{"tunnel":"x"}')
    assert sid % 2 == 1
    _, events = pump(c, s)
    assert events == [StreamOpened(sid, b'{"tunnel":"x"}')]
    assert s.open_stream() % 2 == 0


# -- data and flow control -----------------------------------------------------------------


def test_data_on_idle_stream() -> None:
    assert_violation(peer_mux(), F.encode_data(1, b"x"), ErrorCode.PROTOCOL_ERROR)


def test_data_on_own_idle_stream() -> None:
    assert_violation(peer_mux(client=False), F.encode_data(2, b"x"), ErrorCode.PROTOCOL_ERROR)


def test_data_on_stream_zero() -> None:
    assert_violation(peer_mux(), F.encode_data(0, b"x"), ErrorCode.PROTOCOL_ERROR)


def test_data_on_stream_reset_by_us_ignored() -> None:
    mux = peer_mux()
    mux.receive_data(F.encode_frame(F.FrameType.OPEN, 0, 1))
    mux.reset_stream(1)
    assert mux.receive_data(F.encode_data(1, b"x" * 1000, fin=True)) == []
    assert mux.receive_data(F.encode_window(1, 100) + F.encode_reset(1, 0)) == []
    assert mux.state is LinkState.OPEN


def test_data_on_own_stream_reset_by_us_ignored() -> None:
    mux = peer_mux(client=True)
    sid = mux.open_stream()
    mux.reset_stream(sid)
    assert mux.receive_data(F.encode_data(sid, b"x")) == []
    assert mux.state is LinkState.OPEN


def test_data_on_stream_reset_by_peer_ignored() -> None:
    mux = peer_mux()
    events = mux.receive_data(F.encode_frame(F.FrameType.OPEN, 0, 1) + F.encode_reset(1, 7))
    assert events == [StreamOpened(1, b""), StreamReset(1, 7, remote=True)]
    assert mux.receive_data(F.encode_data(1, b"x")) == []


def test_data_after_fin() -> None:
    mux = peer_mux()
    events = mux.receive_data(F.encode_frame(F.FrameType.OPEN, 0, 1) + F.encode_data(1, b"a", True))
    assert events[-1] == StreamEnded(1)
    assert mux.stream_state(1) is StreamState.HALF_CLOSED_REMOTE
    assert_violation(mux, F.encode_data(1, b"b"), ErrorCode.STREAM_CLOSED)


def test_second_fin() -> None:
    mux = peer_mux()
    mux.receive_data(F.encode_frame(F.FrameType.OPEN, 0, 1) + F.encode_data(1, b"", True))
    assert_violation(mux, F.encode_data(1, b"", True), ErrorCode.STREAM_CLOSED)


def test_window_overrun() -> None:
    mux = peer_mux(settings=LinkSettings(initial_window=16 * KIB))
    mux.receive_data(F.encode_frame(F.FrameType.OPEN, 0, 1))
    assert mux.receive_data(F.encode_data(1, b"x" * 16 * KIB)) == [DataReceived(1, b"x" * 16 * KIB)]
    assert_violation(mux, F.encode_data(1, b"y"), ErrorCode.FLOW_CONTROL_ERROR)


def test_window_overrun_in_one_frame() -> None:
    mux = peer_mux(settings=LinkSettings(initial_window=16 * KIB))
    mux.receive_data(F.encode_frame(F.FrameType.OPEN, 0, 1))
    assert_violation(mux, F.encode_data(1, b"x" * (16 * KIB + 1)), ErrorCode.FLOW_CONTROL_ERROR)


def test_window_overflow() -> None:
    mux = peer_mux(client=True)
    sid = mux.open_stream()
    assert mux.receive_data(F.encode_window(sid, (1 << 31) - 1 - 256 * KIB)) == [
        WindowUpdated(sid, (1 << 31) - 1 - 256 * KIB)
    ]
    assert mux.send_window(sid) == (1 << 31) - 1
    assert_violation(mux, F.encode_window(sid, 1), ErrorCode.FLOW_CONTROL_ERROR)


def test_window_overflow_u32() -> None:
    mux = peer_mux(client=True)
    sid = mux.open_stream()
    bad = F.encode_frame(F.FrameType.WINDOW, 0, sid, b"\xff\xff\xff\xff")
    assert_violation(mux, bad, ErrorCode.FLOW_CONTROL_ERROR)


def test_window_zero_increment() -> None:
    mux = peer_mux(client=True)
    sid = mux.open_stream()
    bad = F.encode_frame(F.FrameType.WINDOW, 0, sid, b"\x00\x00\x00\x00")
    assert_violation(mux, bad, ErrorCode.PROTOCOL_ERROR)


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (F.encode_window(0, 5), ErrorCode.PROTOCOL_ERROR),
        (F.encode_frame(F.FrameType.WINDOW, 0, 1, b"\x00\x01"), ErrorCode.FRAME_SIZE_ERROR),
        (F.encode_reset(0, 0), ErrorCode.PROTOCOL_ERROR),
        (F.encode_frame(F.FrameType.RESET, 0, 1, b"\x00"), ErrorCode.FRAME_SIZE_ERROR),
        (F.encode_frame(F.FrameType.PING, 0, 0, b"1234567"), ErrorCode.FRAME_SIZE_ERROR),
        (F.encode_frame(F.FrameType.PING, 0, 1, b"12345678"), ErrorCode.PROTOCOL_ERROR),
        (F.encode_frame(F.FrameType.CONTROL, 0, 1, b"{}"), ErrorCode.PROTOCOL_ERROR),
        (F.encode_frame(F.FrameType.GOAWAY, 0, 0, b"\x00" * 7), ErrorCode.FRAME_SIZE_ERROR),
        (F.encode_frame(F.FrameType.GOAWAY, 0, 1, b"\x00" * 8), ErrorCode.PROTOCOL_ERROR),
        (F.encode_window(9, 5), ErrorCode.PROTOCOL_ERROR),
        (F.encode_reset(9, 5), ErrorCode.PROTOCOL_ERROR),
    ],
)
def test_malformed_frames(frame: bytes, code: ErrorCode) -> None:
    assert_violation(peer_mux(), frame, code)


def test_send_respects_window_and_resumes_on_credit() -> None:
    c, s = pair(server_settings=LinkSettings(initial_window=16 * KIB))
    sid = c.open_stream()
    c.send(sid, b"z" * 40 * KIB)
    _, events = pump(c, s)
    got = sum(len(e.data) for e in events if isinstance(e, DataReceived))
    assert got == 16 * KIB
    assert c.send_window(sid) == 0 and c.pending(sid) == 24 * KIB
    s.consumed(sid, got)
    ec, es = pump(c, s)
    assert WindowUpdated(sid, 16 * KIB) in ec
    assert sum(len(e.data) for e in es if isinstance(e, DataReceived)) == 16 * KIB


def test_credit_only_on_consumption() -> None:
    c, s = pair()
    sid = c.open_stream()
    c.send(sid, b"a" * 200 * KIB)
    pump(c, s)
    assert s.data_to_send() == b""  # nothing consumed: no WINDOW
    s.consumed(sid, 63 * KIB)
    assert s.data_to_send() == b""  # less than a quarter window
    s.consumed(sid, 1 * KIB)
    assert decode(s.data_to_send()) == [
        F.Frame(F.FrameType.WINDOW, 0, sid, (64 * KIB).to_bytes(4, "big"))
    ]


def test_consumed_more_than_received() -> None:
    c, s = pair()
    sid = c.open_stream()
    c.send(sid, b"abc")
    pump(c, s)
    with pytest.raises(LocalProtocolError):
        s.consumed(sid, 4)


def test_fin_waits_behind_data_without_credit() -> None:
    c, s = pair(server_settings=LinkSettings(initial_window=1024))
    sid = c.open_stream()
    c.send(sid, b"q" * 2048)
    c.end_stream(sid)
    _, events = pump(c, s)
    assert StreamEnded(sid) not in events
    s.consumed(sid, 1024)
    _, events = pump(c, s)
    assert events[-1] == StreamEnded(sid)


# -- half-close, reset, local misuse ---------------------------------------------------------


def test_half_close_client_first() -> None:
    c, s = pair()
    sid = c.open_stream()
    c.send(sid, b"request")
    c.end_stream(sid)
    _, es = pump(c, s)
    assert es == [StreamOpened(sid, b""), DataReceived(sid, b"request"), StreamEnded(sid)]
    assert c.stream_state(sid) is StreamState.HALF_CLOSED_LOCAL
    assert s.stream_state(sid) is StreamState.HALF_CLOSED_REMOTE
    with pytest.raises(LocalProtocolError):
        c.send(sid, b"more")
    for _ in range(3):
        s.send(sid, b"response " * 1000)
        ec, _ = pump(c, s)
        assert sum(len(e.data) for e in ec if isinstance(e, DataReceived)) == 9000
    s.end_stream(sid)
    ec, _ = pump(c, s)
    assert ec == [StreamEnded(sid)]
    assert c.stream_count == s.stream_count == 0


def test_half_close_server_first() -> None:
    c, s = pair()
    sid = c.open_stream()
    pump(c, s)
    s.send(sid, b"banner")
    s.end_stream(sid)
    ec, _ = pump(c, s)
    assert ec == [DataReceived(sid, b"banner"), StreamEnded(sid)]
    c.send(sid, b"still talking")
    _, es = pump(c, s)
    assert es == [DataReceived(sid, b"still talking")]
    c.end_stream(sid)
    _, es = pump(c, s)
    assert es == [StreamEnded(sid)]
    assert c.stream_count == s.stream_count == 0


def test_reset_drops_queued_data() -> None:
    c, s = pair()
    sid = c.open_stream()
    c.send(sid, b"x" * 100)
    c.reset_stream(sid, ErrorCode.CANCEL)
    c.reset_stream(sid)  # a second reset does nothing
    _, es = pump(c, s)
    assert es == [StreamOpened(sid, b""), StreamReset(sid, ErrorCode.CANCEL)]
    assert c.stream_count == s.stream_count == 0
    with pytest.raises(LocalProtocolError):
        c.send(sid, b"x")


def test_crossing_resets() -> None:
    c, s = pair()
    sid = c.open_stream()
    pump(c, s)
    c.reset_stream(sid)
    s.reset_stream(sid)
    ec, es = pump(c, s)
    assert ec == es == []
    assert c.state is s.state is LinkState.OPEN


def test_control_frames() -> None:
    c, s = pair()
    c.send_control(b'{"type":"hello","version":1}')
    _, es = pump(c, s)
    assert es == [ControlReceived(b'{"type":"hello","version":1}')]


# -- floods ----------------------------------------------------------------------------------


def _open_reset(sid: int) -> bytes:
    return F.encode_frame(F.FrameType.OPEN, 0, sid) + F.encode_reset(sid, ErrorCode.CANCEL)


def test_premature_reset_flood() -> None:
    clock = FakeClock()
    mux = peer_mux(settings=LinkSettings(reset_rate=10, reset_burst=20), clock=clock)
    mux.receive_data(b"".join(_open_reset(2 * i + 1) for i in range(20)))
    assert mux.state is LinkState.OPEN
    events = mux.receive_data(_open_reset(41))
    assert terminated(events).code == ErrorCode.ENHANCE_YOUR_CALM


def test_resets_at_sustained_rate_allowed() -> None:
    clock = FakeClock()
    mux = peer_mux(settings=LinkSettings(reset_rate=10, reset_burst=20), clock=clock)
    for i in range(500):
        clock.now += 0.1
        assert mux.receive_data(_open_reset(2 * i + 1))[-1] == StreamReset(2 * i + 1, 7)
    assert mux.state is LinkState.OPEN


def test_refused_stream_flood() -> None:
    mux = peer_mux(settings=LinkSettings(max_streams=1, reset_rate=10, reset_burst=20))
    opens = b"".join(F.encode_frame(F.FrameType.OPEN, 0, 2 * i + 1) for i in range(30))
    assert terminated(mux.receive_data(opens)).code == ErrorCode.ENHANCE_YOUR_CALM


def test_ping_flood_never_read() -> None:
    mux = peer_mux(settings=LinkSettings(max_control_backlog=1000))
    ping = F.encode_ping(b"flooding")
    for i in range(1000 // 17):
        assert mux.receive_data(ping) == [], i
    # never call mux.data_to_send(): the echoes pile up
    assert mux.control_backlog == 17 * (1000 // 17)
    events = mux.receive_data(ping)
    assert terminated(events).code == ErrorCode.ENHANCE_YOUR_CALM


def test_ping_flood_that_is_read_is_fine() -> None:
    mux = peer_mux(settings=LinkSettings(max_control_backlog=1000))
    for _ in range(500):
        assert mux.receive_data(F.encode_ping(b"flooding")) == []
        assert decode(mux.data_to_send()) == [F.Frame(F.FrameType.PING, F.FLAG_ACK, 0, b"flooding")]


# -- ping and GOAWAY -------------------------------------------------------------------------


def test_ping_rtt() -> None:
    clock = FakeClock()
    c, s = pair(clock=clock)
    initial = c.rtt
    assert initial is None
    c.ping()
    out = c.data_to_send()
    clock.now += 0.125
    s.receive_data(out)
    clock.now += 0.125
    assert c.receive_data(s.data_to_send()) == [PingAcknowledged(0.25)]
    assert c.rtt == 0.25
    c.ping()
    clock.now += 0.5
    ec, _ = pump(c, s)
    assert ec == [PingAcknowledged(0.5)]
    assert c.rtt == pytest.approx(0.875 * 0.25 + 0.125 * 0.5)


def test_unsolicited_ping_ack_ignored() -> None:
    mux = peer_mux()
    assert mux.receive_data(F.encode_ping(b"whatever", ack=True)) == []
    assert mux.rtt is None


def test_graceful_goaway() -> None:
    c, s = pair()
    first = c.open_stream()
    pump(c, s)
    second = c.open_stream()  # its OPEN is in flight when the GOAWAY is sent
    in_flight = c.data_to_send()
    s.go_away(ErrorCode.NO_ERROR, "draining")
    assert s.state is LinkState.DRAINING
    with pytest.raises(LocalProtocolError):
        s.open_stream()
    ec = c.receive_data(s.data_to_send())
    assert ec == [
        GoAwayReceived(first, ErrorCode.NO_ERROR, "draining"),
        StreamReset(second, ErrorCode.REFUSED_STREAM, remote=False),
    ]
    assert c.state is LinkState.DRAINING and not c.can_open_streams
    with pytest.raises(LocalProtocolError):
        c.open_stream()
    # The in-flight OPEN is refused; the refusal is ignored by the client.
    assert s.receive_data(in_flight) == []
    assert s.refused_streams == 1
    ec, es = pump(c, s)
    assert ec == es == []
    # The first stream carries on, both ways.
    c.send(first, b"up")
    s.send(first, b"down")
    c.end_stream(first)
    s.end_stream(first)
    ec, es = pump(c, s)
    assert ec == [DataReceived(first, b"down"), StreamEnded(first)]
    assert es == [DataReceived(first, b"up"), StreamEnded(first)]
    assert c.stream_count == s.stream_count == 0
    assert not c.closed and not s.closed


def test_fatal_goaway() -> None:
    c, s = pair()
    sid = c.open_stream()
    pump(c, s)
    events = s.go_away(ErrorCode.SHUTDOWN, "bye")
    assert events == [
        StreamReset(sid, ErrorCode.SHUTDOWN, remote=False),
        LinkTerminated(ErrorCode.SHUTDOWN, "bye", remote=False),
    ]
    assert s.closed
    ec = c.receive_data(s.data_to_send())
    assert ec == [
        GoAwayReceived(sid, ErrorCode.SHUTDOWN, "bye"),
        StreamReset(sid, ErrorCode.SHUTDOWN, remote=True),
        LinkTerminated(ErrorCode.SHUTDOWN, "bye", remote=True),
    ]
    assert c.closed and c.stream_count == 0
    with pytest.raises(LocalProtocolError):
        c.send(sid, b"x")


def test_connection_lost() -> None:
    c, _s = pair()
    sid = c.open_stream()
    assert c.connection_lost() == [
        StreamReset(sid, ErrorCode.CANCEL, remote=True),
        LinkTerminated(ErrorCode.CANCEL, "connection lost", remote=True),
    ]
    assert c.connection_lost() == []
    assert c.data_to_send() == b""


# -- fairness and auto-tuning ----------------------------------------------------------------


def test_fairness_small_write_not_starved() -> None:
    c, _s = pair(
        server_settings=LinkSettings(initial_window=16 * 1024 * KIB, max_window=16 * 1024 * KIB)
    )
    bulk = c.open_stream()
    small = c.open_stream()
    c.data_to_send()
    c.send(bulk, b"B" * 4 * 1024 * KIB)
    c.send(small, b"hello")
    out = decode(c.data_to_send(budget=1 << 30))
    data = [f for f in out if f.type == F.FrameType.DATA]
    index = next(i for i, f in enumerate(data) if f.stream_id == small)
    assert index <= 1
    assert data[index].payload == b"hello"
    assert all(f.stream_id == bulk for f in data[:index])


def test_fairness_round_robin_among_bulk_streams() -> None:
    c, _s = pair(
        server_settings=LinkSettings(initial_window=4 * 1024 * KIB, max_window=4 * 1024 * KIB)
    )
    ids = [c.open_stream() for _ in range(3)]
    c.data_to_send()
    for sid in ids:
        c.send(sid, b"x" * 1024 * KIB)
    out = [f.stream_id for f in decode(c.data_to_send(budget=1 << 30))]
    assert out[:6] == ids + ids


def _rtt_pair(
    rtt: float, clock: FakeClock, window: int, max_window: int
) -> tuple[Multiplexer, Multiplexer, int]:
    st_ = LinkSettings(initial_window=window, max_window=max_window)
    c, s = pair(client_settings=st_, server_settings=st_, clock=clock)
    s.ping()
    out = s.data_to_send()
    clock.now += rtt
    assert c.receive_data(out) == []
    s.receive_data(c.data_to_send())
    assert s.rtt == pytest.approx(rtt)
    sid = c.open_stream()
    pump(c, s)
    return c, s, sid


def _grants(
    c: Multiplexer, s: Multiplexer, sid: int, clock: FakeClock, step: float, rounds: int
) -> list[int]:
    """The client sends; the server consumes whatever arrives `step` seconds later."""
    grants = []
    for _ in range(rounds):
        window = s.receive_window(sid)
        assert window is not None and window.size <= window.max_size
        c.send(sid, b"d" * max(0, 2 * c.send_window(sid) - c.pending(sid)))
        events = s.receive_data(c.data_to_send(budget=1 << 30))
        got = sum(len(e.data) for e in events if isinstance(e, DataReceived))
        clock.now += step
        s.consumed(sid, got)
        for f in decode(s.data_to_send()):
            if f.type == F.FrameType.WINDOW:
                grants.append(int.from_bytes(f.payload, "big"))
                c.receive_data(F.encode_frame(f.type, f.flags, f.stream_id, f.payload))
        window = s.receive_window(sid)
        assert window is not None
        assert window.size == window.available + window.unconsumed + window.unacknowledged
    return grants


def test_autotune_grows_for_fast_reader_up_to_max() -> None:
    clock = FakeClock()
    c, s, sid = _rtt_pair(0.1, clock, 64 * KIB, 1024 * KIB)
    _grants(c, s, sid, clock, 0.01, 12)
    window = s.receive_window(sid)
    assert window is not None and window.size == 1024 * KIB


def test_autotune_never_grows_for_slow_reader() -> None:
    clock = FakeClock()
    c, s, sid = _rtt_pair(0.1, clock, 64 * KIB, 1024 * KIB)
    grants = _grants(c, s, sid, clock, 0.5, 12)
    window = s.receive_window(sid)
    assert window is not None and window.size == 64 * KIB
    assert grants and all(g <= 64 * KIB for g in grants)


# -- chunking --------------------------------------------------------------------------------


def _scripted_output() -> bytes:
    """A realistic byte stream from a client: opens, data, pings, control, FINs, resets."""
    c = Multiplexer(client=True, clock=FakeClock())
    c.receive_data(HELLO)
    out = [c.data_to_send()]
    ids = [c.open_stream(b"meta%d" % i) for i in range(4)]
    c.send_control(b"{}")
    c.ping()
    for n, sid in enumerate(ids):
        c.send(sid, bytes([65 + n]) * (1000 * (n + 1)))
    c.end_stream(ids[0])
    c.reset_stream(ids[1])
    out.append(c.data_to_send(budget=1500))
    c.end_stream(ids[2])
    out.append(c.data_to_send())
    out.append(F.encode_frame(0x33, 1, 99, b"ext"))
    return b"".join(out)


SCRIPT = _scripted_output()


def _feed_chunks(data: bytes, cuts: list[int]) -> list[Event]:
    mux = Multiplexer(client=False, clock=FakeClock())
    events: list[Event] = []
    last = 0
    for cut in [*sorted(cuts), len(data)]:
        events += mux.receive_data(data[last:cut])
        last = cut
    return events


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, len(SCRIPT)), max_size=30))
def test_any_chunking_same_events(cuts: list[int]) -> None:
    assert _feed_chunks(SCRIPT, cuts) == _feed_chunks(SCRIPT, [])


def test_byte_at_a_time_same_events() -> None:
    whole = _feed_chunks(SCRIPT, [])
    assert any(isinstance(e, StreamEnded) for e in whole)
    assert _feed_chunks(SCRIPT, list(range(len(SCRIPT)))) == whole


def test_chunking_same_events_before_oversized_frame() -> None:
    bad = SCRIPT + ((1 << 24) - 1 << 8 | 1).to_bytes(4, "big") + b"\x00" * 5
    assert _feed_chunks(bad, []) == _feed_chunks(bad, [len(SCRIPT)])


# -- fuzz smoke ------------------------------------------------------------------------------


def test_fuzz_smoke_mux_and_decoder() -> None:
    from tests import fuzz

    started = time.monotonic()
    report = fuzz.run(iterations=4000, seed=1234, targets=("mux", "decoder"))
    assert report.failure_count == 0, [f.error for f in report.failures]
    assert report.iterations == 4000
    assert time.monotonic() - started < 30


def test_fuzz_smoke_control() -> None:
    from tests import fuzz

    report = fuzz.run(iterations=1000, seed=1234, targets=("control",))
    assert report.failure_count == 0, [f.error for f in report.failures]
