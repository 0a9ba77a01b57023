"""
The multiplexer's bounds toward a peer that does not read: one backlog for every non-DATA
frame queued, and the gate before the peer is accepted.
"""

from __future__ import annotations

import pytest

from tests.unit.test_mux import HELLO, FakeClock, decode, peer_mux, terminated
from tunnel.wire import frames as F
from tunnel.wire.errors import ErrorCode
from tunnel.wire.events import ControlReceived, HelloReceived, LinkTerminated, StreamOpened
from tunnel.wire.mux import LinkSettings, LinkState, Multiplexer

SMALL = LinkSettings(max_control_backlog=1000)


def _opens(first: int, count: int) -> bytes:
    return b"".join(F.encode_frame(F.FrameType.OPEN, 0, first + 2 * i) for i in range(count))


def _control(payload: bytes = b"{}") -> bytes:
    return F.encode_frame(F.FrameType.CONTROL, 0, 0, payload)


# -- one backlog for every non-DATA frame ---------------------------------------------------


def test_resets_of_opened_streams_count() -> None:
    # The application refuses each stream the peer opens (the relay's agents open none):
    # those RESETs pile up as replies do.
    mux = peer_mux(settings=SMALL)
    for i in range(1000 // 13):
        for event in mux.receive_data(_opens(2 * i + 1, 1)):
            assert isinstance(event, StreamOpened)
            mux.reset_stream(event.stream_id, ErrorCode.REFUSED_STREAM)
    assert mux.control_backlog == 13 * (1000 // 13)
    assert not mux.backlog_exceeded
    mux.receive_data(_opens(2 * (1000 // 13) + 1, 1))
    mux.reset_stream(2 * (1000 // 13) + 1, ErrorCode.REFUSED_STREAM)
    assert mux.backlog_exceeded
    # The next input, or a check after local queuing, ends the link.
    events = mux.check_backlog()
    assert terminated(events).code == ErrorCode.ENHANCE_YOUR_CALM
    assert mux.check_backlog() == []
    # The backlog was dropped: only the GOAWAY goes out.
    frames = decode(mux.data_to_send())
    assert [f.type for f in frames] == [F.FrameType.GOAWAY]


def test_control_messages_count() -> None:
    mux = peer_mux(settings=SMALL)
    for _ in range(1000 // 109):
        mux.send_control(b"x" * 100)
    assert not mux.backlog_exceeded
    assert mux.receive_data(F.encode_ping(b"12345678")) == []
    mux.send_control(b"x" * 100)
    events = mux.receive_data(F.encode_ping(b"12345678"))
    assert terminated(events).code == ErrorCode.ENHANCE_YOUR_CALM
    assert mux.state is LinkState.CLOSED


def test_opens_and_pings_of_this_side_count() -> None:
    mux = peer_mux(settings=SMALL)
    while not mux.backlog_exceeded:
        mux.open_stream(b"m" * 40)
        mux.ping()
    assert terminated(mux.check_backlog()).code == ErrorCode.ENHANCE_YOUR_CALM
    assert mux.stream_count == 0


def test_backlog_written_out_is_no_backlog() -> None:
    mux = peer_mux(settings=SMALL)
    for i in range(200):
        mux.send_control(b"x" * 100)
        mux.receive_data(F.encode_ping(b"12345678"))
        assert mux.check_backlog() == [], i
        mux.data_to_send()
    assert mux.state is LinkState.OPEN


def test_hello_still_goes_first_when_the_backlog_ends_the_link() -> None:
    mux = Multiplexer(client=False, settings=SMALL, clock=FakeClock())
    mux.receive_data(HELLO)
    for _ in range(20):
        mux.send_control(b"x" * 100)
    assert terminated(mux.check_backlog()).code == ErrorCode.ENHANCE_YOUR_CALM
    assert [f.type for f in decode(mux.data_to_send())] == [F.FrameType.HELLO, F.FrameType.GOAWAY]


# -- the gate before the peer is accepted ----------------------------------------------------


def gated(settings: LinkSettings | None = None) -> Multiplexer:
    mux = Multiplexer(client=False, settings=settings, clock=FakeClock(), gated=True)
    mux.data_to_send()
    return mux


def test_gate_admits_hello_ping_control() -> None:
    mux = gated()
    events = mux.receive_data(HELLO + F.encode_ping(b"12345678") + _control(b"hello"))
    assert isinstance(events[0], HelloReceived)
    assert events[-1] == ControlReceived(b"hello")
    assert mux.gated and not mux.closed


@pytest.mark.parametrize(
    "frame",
    [
        F.encode_frame(F.FrameType.OPEN, 0, 1),
        F.encode_data(1, b"x"),
        F.encode_window(1, 10),
        F.encode_reset(1, 0),
        F.encode_frame(0x42, 0, 0, b"unknown"),
    ],
)
def test_gate_refuses_other_frames(frame: bytes) -> None:
    mux = gated()
    events = mux.receive_data(HELLO + frame)
    end = terminated(events)
    assert end.code == ErrorCode.PROTOCOL_ERROR
    assert "before the peer was accepted" in end.message


def test_gate_bounds_octets() -> None:
    settings = LinkSettings(max_unaccepted_input=4096)
    mux = gated(settings)
    ping = F.encode_ping(b"12345678")
    sent = len(HELLO)
    events = mux.receive_data(HELLO)
    while not events or not isinstance(events[-1], LinkTerminated):
        events = mux.receive_data(ping)
        sent += len(ping)
        assert sent <= 4096 + len(ping)
    assert terminated(events).code == ErrorCode.ENHANCE_YOUR_CALM
    # The echoes it got were bounded by the gate too.


def test_gate_refuses_a_large_control_frame_from_its_header() -> None:
    mux = gated()
    big = _control(b"x" * 10000)
    # Only the header and a little of the payload have arrived.
    events = mux.receive_data(HELLO + big[:100])
    assert terminated(events).code == ErrorCode.ENHANCE_YOUR_CALM


def test_gate_holds_input_after_a_control_frame_until_accepted() -> None:
    # A peer may pipeline requests after its hello: they wait for the verdict on it,
    # however much they are, and are processed in order once it is accepted.
    mux = gated()
    requests = b"".join(_control(b"request %d " % i + b"x" * 1000) for i in range(10))
    events = mux.receive_data(HELLO + _control(b"hello") + requests + _opens(1, 1))
    assert events[-1] == ControlReceived(b"hello")
    assert mux.input_pending
    mux.accept_peer()
    events = mux.receive_data(b"")
    assert [e.payload.split()[1] for e in events if isinstance(e, ControlReceived)] == [
        b"%d" % i for i in range(10)
    ]
    assert isinstance(events[-1], StreamOpened)
    assert not mux.input_pending and not mux.closed


def test_gate_stays_shut_when_the_peer_is_not_accepted() -> None:
    mux = gated()
    events = mux.receive_data(HELLO + _control(b"not hello") + _opens(1, 1))
    assert events[-1] == ControlReceived(b"not hello")
    # The application did not accept: the OPEN behind it is refused.
    events = mux.receive_data(b"")
    assert terminated(events).code == ErrorCode.PROTOCOL_ERROR


def test_ungated_multiplexer_has_no_gate() -> None:
    mux = Multiplexer(client=False, clock=FakeClock())
    events = mux.receive_data(HELLO + _opens(1, 1) + _control(b"x" * 10000))
    assert isinstance(events[1], StreamOpened) and isinstance(events[2], ControlReceived)
