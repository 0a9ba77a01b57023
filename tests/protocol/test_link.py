"""
`tunnel.link.LinkProtocol` and `Stream` over in-memory transports: two links joined by
`twisted.test.iosim`, or one link fed hand-built frames over a `StringTransport`. Time is a
`MemoryReactorClock`; nothing sleeps and no socket is opened.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import error
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from tests.protocol.linkpair import (
    CountingProducer,
    RawPeer,
    StreamRecorder,
    decode_frames,
    make_link_pair,
)
from tunnel.link import HIGH_WATER, LOW_WATER, StreamResetError
from tunnel.wire import ErrorCode, LinkState, LocalProtocolError
from tunnel.wire import frames as f

WINDOW = 256 * 1024
MAX_FRAME = f.DEFAULT_MAX_FRAME_SIZE


def buffered(stream: Any) -> int:
    """Octets a `Stream` holds for its protocol (not yet delivered)."""
    return sum(len(b) for b in stream._buffer)


# -- handshake ---------------------------------------------------------------------------------


def test_handshake_makes_both_links_ready() -> None:
    pair = make_link_pair()
    assert pair.client.ready == 1
    assert pair.server.ready == 1
    assert pair.client.mux.state is LinkState.OPEN
    assert pair.server.mux.state is LinkState.OPEN
    # Both handshake pings were echoed: each side has measured a round trip.
    assert pair.client.mux.rtt == 0.0
    assert pair.server.mux.rtt == 0.0


def test_streams_and_control_after_handshake() -> None:
    pair = make_link_pair()
    opened = pair.open(b"meta")
    assert opened.remote_stream.stream_id % 2 == 1  # client-opened: odd
    opened.stream.write(b"ping")
    pair.server.sendControl(b'{"hello": 1}')
    pair.flush()
    assert opened.remote.data == b"ping"
    assert pair.client.controls == [b'{"hello": 1}']
    opened.remote_stream.write(b"pong")
    pair.flush()
    assert opened.local.data == b"pong"


def test_streams_opened_before_the_handshake_are_refused_locally() -> None:
    pair = make_link_pair(greet=False)
    with pytest.raises(LocalProtocolError):
        pair.client.openStream(b"")


def test_default_stream_opened_refuses() -> None:
    pair = make_link_pair(server_kwargs={"recorder_factory": None})
    stream = pair.client.openStream(b"")
    local = StreamRecorder()
    stream.attach(local)
    pair.flush()
    assert local.lost is not None
    assert local.lost.check(StreamResetError)
    assert local.lost.value.code == ErrorCode.REFUSED_STREAM


# -- backpressure --------------------------------------------------------------------------------


@pytest.mark.parametrize("pause", ["on_connect", "on_data"])
def test_stalled_stream_holds_its_window_and_does_not_block_others(pause: str) -> None:
    pair = make_link_pair()
    stalled_reader = StreamRecorder(
        pause_on_connect=pause == "on_connect", pause_on_data=pause == "on_data"
    )
    stalled = pair.open(b"stalled")
    # Swap in the stalling reader on the server end before any data arrives.
    stalled.remote_stream.protocol = None
    stalled.remote_stream.attach(stalled_reader)
    moving = pair.open(b"moving")

    total = 2 * 1024 * 1024
    producer = CountingProducer(stalled.stream, total)
    producer.pending_probe = lambda: pair.client.mux.pending(stalled.stream.stream_id)
    producer.start()
    other = CountingProducer.pattern(total)[::-1]
    moving.stream.write(other)
    pair.flush()

    # The second stream on the same link moved completely.
    assert moving.remote.data == other
    # The stalled stream's receiver holds at most its window (+ at most one frame).
    held = buffered(stalled.remote_stream) + stalled_reader.received
    assert held <= WINDOW + MAX_FRAME
    recv = pair.server.mux.receive_window(stalled.remote_stream.stream_id)
    assert recv is not None
    assert recv.size == WINDOW
    assert recv.unconsumed <= WINDOW
    assert pair.client.mux.send_window(stalled.stream.stream_id) == 0
    # The sender's producer is paused: its queue passed HIGH_WATER (it may have been paused
    # and resumed while the window still had room; writes are framed at the end of a turn).
    assert producer.paused
    assert producer.pauses >= 1
    assert producer.pending_at_pause[0] > HIGH_WATER
    assert pair.client.mux.pending(stalled.stream.stream_id) >= LOW_WATER
    assert producer.sent < total

    # Resume the reader (one chunk at a time for the on_data reader): everything arrives,
    # in order, and the producer is resumed.
    for _ in range(10_000):
        if stalled_reader.received == total:
            break
        stalled.remote_stream.resumeProducing()
        pair.flush()
    assert stalled_reader.data == CountingProducer.pattern(total)
    assert producer.sent == total
    assert producer.resumes >= 1
    assert not producer.paused


def test_receiving_paused_link_does_not_pause_other_streams_of_the_peer() -> None:
    # One stalled stream never pauses the link itself: the peer's link stays producing.
    pair = make_link_pair()
    stalled = pair.open()
    stalled.remote_stream.pauseProducing()
    stalled.stream.write(b"x" * (WINDOW * 2))
    pair.flush()
    assert not pair.client._paused
    assert not pair.server._paused


def test_link_pause_stops_framing_data_and_resume_sends_it() -> None:
    pair = make_link_pair()
    opened = pair.open()
    pair.client.pauseProducing()
    opened.stream.write(b"y" * 1000)
    pair.flush()
    assert opened.remote.received == 0
    pair.client.resumeProducing()
    pair.flush()
    assert opened.remote.data == b"y" * 1000


def test_registering_a_producer_on_a_full_stream_pauses_it_at_once() -> None:
    pair = make_link_pair()
    opened = pair.open()
    opened.remote_stream.pauseProducing()
    opened.stream.write(b"z" * (WINDOW + HIGH_WATER + 1))
    pair.flush()
    producer = CountingProducer(opened.stream, 0)
    opened.stream.registerProducer(producer, True)
    assert producer.paused
    opened.remote_stream.resumeProducing()
    pair.flush()
    assert producer.resumes == 1


def test_non_streaming_producer_is_refused() -> None:
    pair = make_link_pair()
    opened = pair.open()
    with pytest.raises(ValueError):
        opened.stream.registerProducer(object(), False)


# -- half-close ----------------------------------------------------------------------------------


@pytest.mark.parametrize("first", ["client", "server"])
def test_half_close_both_directions(first: str) -> None:
    pair = make_link_pair()
    opened = pair.open()
    ends = {
        "client": (opened.stream, opened.local),
        "server": (opened.remote_stream, opened.remote),
    }
    closer_stream, closer = ends[first]
    other_stream, other = ends["server" if first == "client" else "client"]

    closer_stream.write(b"request")
    closer_stream.loseWriteConnection()
    pair.flush()
    assert other.data == b"request"
    assert other.read_closed == 1
    assert other.lost is None
    assert closer.lost is None
    # The half-closed side can still be written to, and its peer can still write.
    other_stream.write(b"response")
    pair.flush()
    assert closer.data == b"response"
    assert closer.read_closed == 0
    # Writes on the closed direction are dropped, as on TCP.
    closer_stream.write(b"late")
    pair.flush()
    assert other.data == b"request"

    other_stream.loseWriteConnection()
    pair.flush()
    assert closer.read_closed == 1
    for proto in (closer, other):
        assert proto.lost is not None
        assert proto.lost.check(error.ConnectionDone)
        assert not proto.lost.check(StreamResetError)
    assert pair.client.streams == {}
    assert pair.server.streams == {}
    assert pair.client.mux.stream_count == 0
    assert pair.server.mux.stream_count == 0


def test_write_back_from_read_connection_lost() -> None:
    pair = make_link_pair()
    opened = pair.open()

    def answer(proto: StreamRecorder) -> None:
        proto.transport.write(b"bye")  # type: ignore[union-attr]
        proto.transport.loseWriteConnection()  # type: ignore[union-attr]

    opened.remote.on_read_closed = answer
    opened.stream.loseWriteConnection()
    pair.flush()
    assert opened.local.data == b"bye"
    assert opened.local.lost is not None and opened.local.lost.check(error.ConnectionDone)
    assert opened.remote.lost is not None and opened.remote.lost.check(error.ConnectionDone)


def test_lose_connection_sends_fin_and_discards_later_data() -> None:
    pair = make_link_pair()
    opened = pair.open()
    opened.stream.write(b"last words")
    opened.stream.loseConnection()
    opened.remote_stream.write(b"x" * (WINDOW * 2))  # credit must still come back
    pair.flush()
    assert opened.remote.data == b"last words"
    assert opened.remote.read_closed == 1
    assert opened.local.data == b""
    assert pair.server.mux.send_window(opened.remote_stream.stream_id) > 0
    opened.remote_stream.loseWriteConnection()
    pair.flush()
    assert opened.local.lost is not None and opened.local.lost.check(error.ConnectionDone)
    assert opened.remote.lost is not None and opened.remote.lost.check(error.ConnectionDone)


def test_lose_connection_on_a_paused_stream_returns_all_credit() -> None:
    pair = make_link_pair()
    opened = pair.open(recorder=StreamRecorder(pause_on_data=True))
    opened.remote_stream.write(b"x" * WINDOW)
    pair.flush()
    assert opened.local.received == MAX_FRAME  # one chunk taken, then the reader paused
    opened.stream.loseConnection()
    pair.flush()
    recv = pair.client.mux.receive_window(opened.stream.stream_id)
    assert recv is not None
    assert recv.unconsumed == 0
    assert pair.server.mux.send_window(opened.remote_stream.stream_id) == WINDOW


def test_fin_closes_a_protocol_that_is_not_half_closeable() -> None:
    class Plain(Protocol):
        lost: Any = None

        def connectionLost(self, reason: Any = None) -> None:
            self.lost = reason

    pair = make_link_pair()
    plain = Plain()
    opened = pair.open(recorder=plain)
    opened.remote_stream.loseWriteConnection()
    pair.flush()
    assert plain.lost is not None


# -- reset ---------------------------------------------------------------------------------------


def test_abort_resets_the_peer_with_the_code_and_late_data_is_ignored(
    logged_failures: list[dict[str, Any]],
) -> None:
    pair = make_link_pair()
    opened = pair.open()
    # Data in flight both ways when the reset happens.
    opened.remote_stream.write(b"a" * 100_000)
    opened.stream.write(b"b" * 1000)
    opened.stream.abortConnection(ErrorCode.IDLE_TIMEOUT)
    assert opened.local.lost is not None
    assert opened.local.lost.check(StreamResetError)
    assert opened.local.lost.value.code == ErrorCode.IDLE_TIMEOUT
    opened.stream.write(b"after abort")  # dropped, no error
    pair.flush()
    lost = opened.remote.lost
    assert lost is not None
    assert lost.check(StreamResetError)
    assert lost.value.code == ErrorCode.IDLE_TIMEOUT
    assert opened.local.data == b""
    # Writes on the reset stream from the peer are dropped too.
    opened.remote_stream.write(b"too late")
    opened.remote_stream.abortConnection()
    pair.flush()
    assert pair.client.terminated is None
    assert pair.server.terminated is None
    assert pair.client.streams == {} and pair.server.streams == {}
    assert logged_failures == []
    # The link is unharmed.
    again = pair.open()
    again.stream.write(b"still here")
    pair.flush()
    assert again.remote.data == b"still here"


def test_data_frame_for_a_reset_stream_is_ignored_by_a_raw_link() -> None:
    peer = RawPeer(client=False)
    peer.hello()
    peer.feed(f.encode_frame(f.FrameType.OPEN, 0, 1, b""))
    (stream, _, recorder) = peer.link.opened[0]
    stream.abortConnection()
    peer.feed(f.encode_data(1, b"in flight") + f.encode_data(1, b"", fin=True))
    assert peer.link.terminated is None
    assert recorder.data == b""


# -- GOAWAY --------------------------------------------------------------------------------------


def test_graceful_goaway_drains_the_link() -> None:
    pair = make_link_pair()
    opened = pair.open()
    pair.server.goAway(ErrorCode.NO_ERROR, "draining")
    pair.flush()
    assert pair.client.goaways == [(ErrorCode.NO_ERROR, "draining")]
    with pytest.raises(LocalProtocolError):
        pair.client.openStream(b"")
    # Existing streams go on.
    opened.stream.write(b"more")
    opened.remote_stream.write(b"back")
    pair.flush()
    assert opened.remote.data == b"more"
    assert opened.local.data == b"back"
    assert not pair.client_io.disconnecting and not pair.server_io.disconnecting


def test_fatal_goaway_resets_streams_and_closes_both_ends() -> None:
    pair = make_link_pair()
    opened = pair.open()
    pair.server.goAway(ErrorCode.SHUTDOWN, "bye")
    assert opened.remote.lost is not None
    assert opened.remote.lost.value.code == ErrorCode.SHUTDOWN
    pair.flush()
    assert pair.client.goaways == [(ErrorCode.SHUTDOWN, "bye")]
    assert pair.client.terminated == (ErrorCode.SHUTDOWN, "bye", True)
    assert opened.local.lost is not None
    assert opened.local.lost.check(StreamResetError)
    assert opened.local.lost.value.code == ErrorCode.SHUTDOWN
    assert pair.client.lost is not None and pair.server.lost is not None
    assert pair.clock.getDelayedCalls() == []


# -- floods and malformed input ------------------------------------------------------------------


def ping_flood(count: int) -> bytes:
    return b"".join(f.encode_ping(i.to_bytes(8, "big")) for i in range(count))


def test_ping_flood_while_not_reading_ends_with_enhance_your_calm() -> None:
    peer = RawPeer(client=False)
    peer.hello()
    peer.link.pauseProducing()  # our socket buffer is full: the peer does not read
    peer.feed(ping_flood((1 << 20) // 17 + 10))
    assert peer.link.terminated is not None
    assert peer.link.terminated[0] == ErrorCode.ENHANCE_YOUR_CALM
    # Give the link every chance: its abort timer, and longer than the keepalive timeout.
    for _ in range(30):
        peer.clock.advance(1.0)
    assert peer.goaway_codes() == [ErrorCode.ENHANCE_YOUR_CALM]
    assert peer.transport.disconnecting


def test_ping_flood_is_ended_once_the_transport_resumes() -> None:
    peer = RawPeer(client=False)
    peer.hello()
    peer.link.pauseProducing()
    peer.feed(ping_flood((1 << 20) // 17 + 10))
    assert peer.link.terminated is not None
    assert peer.link.terminated[0] == ErrorCode.ENHANCE_YOUR_CALM
    peer.link.resumeProducing()
    assert peer.goaway_codes() == [ErrorCode.ENHANCE_YOUR_CALM]
    # No echoes are written after the link ended: the backlog was dropped.
    pongs = [fr for fr in peer.frames() if fr.type == f.FrameType.PING and fr.flags]
    assert pongs == []
    assert peer.transport.disconnecting
    peer.clock.advance(1.0)
    assert peer.transport.disconnected  # aborted: StringTransport.abortConnection


def test_pings_from_a_reading_peer_are_answered() -> None:
    peer = RawPeer(client=False)
    peer.hello()
    peer.transport.clear()
    peer.feed(ping_flood(5000))
    assert peer.link.terminated is None
    pongs = [fr for fr in peer.frames() if fr.type == f.FrameType.PING and fr.flags]
    assert len(pongs) == 5000


def test_open_reset_flood_ends_with_enhance_your_calm() -> None:
    peer = RawPeer(client=False)
    peer.hello()
    peer.feed(open_reset_flood())
    assert peer.link.terminated is not None
    assert peer.link.terminated[0] == ErrorCode.ENHANCE_YOUR_CALM
    assert peer.goaway_codes() == [ErrorCode.ENHANCE_YOUR_CALM]
    assert peer.transport.disconnecting
    # Once the transport is gone, every stream it opened has been told.
    peer.link.connectionLost(Failure(error.ConnectionDone()))
    assert all(rec.lost is not None for _, _, rec in peer.link.opened)
    assert peer.link.streams == {}


def open_reset_flood() -> bytes:
    return b"".join(
        f.encode_frame(f.FrameType.OPEN, 0, sid, b"") + f.encode_reset(sid, ErrorCode.CANCEL)
        for sid in range(1, 2 * 2100, 2)
    )


def test_open_reset_flood_resets_every_stream_when_the_link_ends() -> None:
    peer = RawPeer(client=False)
    peer.hello()
    peer.feed(open_reset_flood())
    assert peer.link.terminated is not None
    assert [s.stream_id for s, _, rec in peer.link.opened if rec.lost is None] == []
    assert peer.link.streams == {}


def test_slow_open_reset_churn_is_allowed() -> None:
    peer = RawPeer(client=False)
    peer.hello()
    for sid in range(1, 2 * 3000, 2):
        peer.feed(
            f.encode_frame(f.FrameType.OPEN, 0, sid, b"") + f.encode_reset(sid, ErrorCode.CANCEL)
        )
        peer.clock.advance(1 / 150)  # below the sustained rate
    assert peer.link.terminated is None


def test_oversized_frame_is_frame_size_error() -> None:
    peer = RawPeer(client=False)
    peer.hello()
    header = f._HEADER.pack(((MAX_FRAME + 1) << 8) | f.FrameType.DATA, 0, 1)
    peer.feed(header)  # refused on the header alone, before any payload
    assert peer.link.terminated is not None
    assert peer.link.terminated[0] == ErrorCode.FRAME_SIZE_ERROR
    assert peer.goaway_codes() == [ErrorCode.FRAME_SIZE_ERROR]
    assert peer.transport.disconnecting
    before = peer.transport.value()
    peer.feed(b"\x00" * 100_000)  # later input is ignored
    assert peer.transport.value() == before


@pytest.mark.parametrize(
    "garbage",
    [
        f.encode_data(1, b"hi"),  # a DATA frame before HELLO
        f.encode_frame(0x42, 0, 0, b"???"),  # an unknown type before HELLO
        f.encode_frame(f.FrameType.HELLO, 0, 0, b"NOPE\x01\x01"),  # wrong magic
        f.encode_frame(f.FrameType.HELLO, 0, 3, f.encode_hello(1, 1, {})[9:]),  # stream 3
        b"\x00\x00\x10SSH-2.0-OpenSSH_9.6 Ubuntu\r\n",
    ],
    ids=["data", "unknown", "magic", "stream", "ssh-banner"],
)
def test_garbage_first_bytes_are_protocol_error(garbage: bytes) -> None:
    peer = RawPeer(client=True)
    peer.feed(garbage)
    assert peer.link.terminated is not None
    assert peer.link.terminated[0] == ErrorCode.PROTOCOL_ERROR
    frames = peer.frames()
    # Our HELLO still comes first, then the GOAWAY.
    assert frames[0].type == f.FrameType.HELLO
    assert peer.goaway_codes() == [ErrorCode.PROTOCOL_ERROR]
    assert peer.transport.disconnecting
    assert peer.link.ready == 0


def test_http_request_as_first_bytes_ends_the_link() -> None:
    # "GET" read as a 24-bit length is far beyond MAX_FRAME_SIZE: refused on the header.
    peer = RawPeer(client=True)
    peer.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert peer.link.terminated is not None
    assert peer.goaway_codes() == [peer.link.terminated[0]]
    assert peer.link.terminated[0] in (ErrorCode.PROTOCOL_ERROR, ErrorCode.FRAME_SIZE_ERROR)
    assert peer.transport.disconnecting


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (f.encode_frame(f.FrameType.PING, 0, 0, b"1234567"), ErrorCode.FRAME_SIZE_ERROR),
        (f.encode_frame(f.FrameType.WINDOW, 0, 1, b"\x00\x00\x00\x00"), ErrorCode.PROTOCOL_ERROR),
        (f.encode_frame(f.FrameType.RESET, 0, 0, b"\x00\x00\x00\x00"), ErrorCode.PROTOCOL_ERROR),
        (f.encode_frame(f.FrameType.GOAWAY, 0, 0, b"\x00"), ErrorCode.FRAME_SIZE_ERROR),
        (f.encode_frame(f.FrameType.DATA, 0, 99, b"x"), ErrorCode.PROTOCOL_ERROR),
        (f.encode_frame(f.FrameType.OPEN, 0, 2, b""), ErrorCode.PROTOCOL_ERROR),
        (f.encode_hello(1, 1, {}), ErrorCode.PROTOCOL_ERROR),
        (f.encode_frame(f.FrameType.CONTROL, 0, 5, b"{}"), ErrorCode.PROTOCOL_ERROR),
    ],
    ids=["ping7", "window0", "reset0", "goaway-short", "idle-data", "even-open", "hello2", "ctl"],
)
def test_malformed_frame_after_handshake_ends_the_link_with_its_code(
    frame: bytes, code: ErrorCode, logged_failures: list[dict[str, Any]]
) -> None:
    peer = RawPeer(client=False)
    peer.hello()
    peer.feed(f.encode_frame(f.FrameType.OPEN, 0, 1, b""))
    (_, _, recorder) = peer.link.opened[0]
    peer.feed(frame)
    assert peer.link.terminated is not None
    assert peer.link.terminated[0] == code
    assert peer.goaway_codes() == [code]
    assert peer.transport.disconnecting
    assert recorder.lost is not None
    assert recorder.lost.check(StreamResetError)
    assert recorder.lost.value.code == code
    assert logged_failures == []


def test_data_beyond_the_window_is_flow_control_error() -> None:
    peer = RawPeer(client=False)
    peer.hello()
    peer.feed(f.encode_frame(f.FrameType.OPEN, 0, 1, b""))
    peer.link.opened[0][0].pauseProducing()
    chunk = b"w" * MAX_FRAME
    peer.feed(f.encode_data(1, chunk) * (WINDOW // MAX_FRAME))
    assert peer.link.terminated is None
    peer.feed(f.encode_data(1, b"!"))
    assert peer.link.terminated is not None
    assert peer.link.terminated[0] == ErrorCode.FLOW_CONTROL_ERROR


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    frames=st.lists(
        st.tuples(
            st.integers(0, 9),
            st.integers(0, 255),
            st.sampled_from([0, 1, 2, 3, 5, 0xFFFFFFFF]),
            st.binary(max_size=24),
        ),
        max_size=12,
    ),
    tail=st.binary(max_size=40),
    split=st.integers(1, 64),
)
def test_malformed_input_never_raises_out_of_data_received(
    frames: list[tuple[int, int, int, bytes]], tail: bytes, split: int
) -> None:
    peer = RawPeer(client=False)
    peer.hello()
    data = b"".join(f.encode_frame(t, fl, sid, p) for t, fl, sid, p in frames) + tail
    for i in range(0, len(data), split):
        peer.feed(data[i : i + split])
    # Whatever the link wrote is well-formed frames; an ended link has exactly one GOAWAY.
    written = decode_frames(peer.transport.value())
    goaways = [fr for fr in written if fr.type == f.FrameType.GOAWAY]
    if peer.link.terminated is not None and not peer.link.terminated[2]:
        assert len(goaways) == 1
        assert peer.transport.disconnecting
    for _, _, rec in peer.link.opened:
        if peer.link.terminated is not None:
            assert rec.lost is not None


# -- keepalive -----------------------------------------------------------------------------------


def test_idle_link_pings_after_the_keepalive_interval() -> None:
    pair = make_link_pair(
        client_kwargs={"keepalive_interval": 5.0, "keepalive_timeout": 15.0},
        server_kwargs={"keepalive_interval": 5.0, "keepalive_timeout": 15.0},
    )
    start = pair.clock.seconds()

    def pings_written(io: Any) -> list[f.Frame]:
        return [
            fr
            for fr in decode_frames(b"".join(io.stream))
            if fr.type == f.FrameType.PING and not fr.flags
        ]

    while pair.clock.seconds() - start < 4.9:
        pair.clock.advance(0.1)
    assert pings_written(pair.client_io) == []
    assert pings_written(pair.server_io) == []
    while pair.clock.seconds() - start < 5.0 + 1.0 and not pings_written(pair.client_io):
        pair.clock.advance(0.1)
    assert pings_written(pair.client_io)
    assert pings_written(pair.server_io)
    # Answered pings keep the link alive indefinitely.
    for _ in range(60):
        pair.clock.advance(1.0)
        pair.flush()
    assert pair.client.terminated is None and pair.server.terminated is None
    assert not pair.client_io.disconnecting


def test_busy_link_does_not_ping() -> None:
    pair = make_link_pair()
    opened = pair.open()
    for _ in range(100):
        pair.clock.advance(0.5)
        opened.stream.write(b"tick")
        opened.remote_stream.write(b"tock")
        pings = [
            fr
            for fr in decode_frames(b"".join(pair.client_io.stream + pair.server_io.stream))
            if fr.type == f.FrameType.PING
        ]
        assert pings == []
        pair.flush()


def test_silent_link_times_out_and_resets_its_streams() -> None:
    pair = make_link_pair(client_kwargs={"keepalive_interval": 5.0, "keepalive_timeout": 15.0})
    opened = pair.open()
    other = pair.open()
    opened.stream.write(b"x")
    pair.flush()
    heard = pair.clock.seconds()
    # From now on the server is silent: nothing it writes is delivered.
    dead_at = None
    while pair.clock.seconds() - heard < 30.0:
        pair.clock.advance(0.1)
        pair.server_io.stream.clear()
        if pair.client_io.disconnecting:
            dead_at = pair.clock.seconds()
            break
    assert dead_at is not None
    assert 15.0 <= dead_at - heard <= 15.0 + 1.0 + 1e-6
    assert pair.client.terminated is not None
    assert pair.client.terminated[0] == ErrorCode.TIMEOUT
    for proto in (opened.local, other.local):
        assert proto.lost is not None
        assert proto.lost.check(StreamResetError)
        assert proto.lost.value.code == ErrorCode.TIMEOUT
    assert pair.client.streams == {}
    # The transport going away afterwards is harmless.
    pair.flush()
    assert pair.client.lost is not None
    assert pair.server.lost is not None
    assert opened.remote.lost is not None


def test_connection_lost_resets_streams_and_cancels_timers() -> None:
    pair = make_link_pair()
    opened = pair.open()
    pair.client_io.loseConnection()
    pair.flush()
    for proto in (opened.local, opened.remote):
        assert proto.lost is not None
        assert proto.lost.check(StreamResetError)
    assert pair.client.lost is not None and pair.server.lost is not None
    assert pair.clock.getDelayedCalls() == []


# -- window auto-tuning --------------------------------------------------------------------------

ONE_WAY = 0.05


def delayed_pair() -> Any:
    pair = make_link_pair(greet=False)
    pair.flush_delayed(ONE_WAY)
    assert pair.client.ready == 1 and pair.server.ready == 1
    return pair


def test_handshake_measures_the_simulated_rtt() -> None:
    pair = delayed_pair()
    assert pair.client.mux.rtt == pytest.approx(2 * ONE_WAY)
    assert pair.server.mux.rtt == pytest.approx(2 * ONE_WAY)


def test_window_grows_under_rtt_with_a_reader_that_keeps_up() -> None:
    pair = delayed_pair()
    stream = pair.client.openStream(b"")
    stream.attach(StreamRecorder())
    pair.flush_delayed(ONE_WAY)
    remote_stream, _, reader = pair.server.opened[0]
    total = 8 * 1024 * 1024
    data = CountingProducer.pattern(total)
    stream.write(data)
    pair.flush_delayed(ONE_WAY)
    assert reader.data == data
    recv = pair.server.mux.receive_window(remote_stream.stream_id)
    assert recv is not None
    assert recv.size > WINDOW
    assert recv.size <= 16 * 1024 * 1024
    assert pair.server.mux.window_growth == recv.size - WINDOW


def test_window_does_not_grow_with_a_slow_reader() -> None:
    pair = delayed_pair()
    stream = pair.client.openStream(b"")
    stream.attach(StreamRecorder())
    pair.flush_delayed(ONE_WAY)
    remote_stream, _, reader = pair.server.opened[0]
    reader.pause_on_data = True
    total = 2 * 1024 * 1024
    data = CountingProducer.pattern(total)
    stream.write(data)
    pair.flush_delayed(ONE_WAY)
    for _ in range(1000):
        if reader.received == total:
            break
        # The reader takes one chunk per second, far slower than the round trip.
        pair.clock.advance(1.0)
        remote_stream.resumeProducing()
        pair.flush_delayed(ONE_WAY)
    assert reader.data == data
    recv = pair.server.mux.receive_window(remote_stream.stream_id)
    assert recv is not None
    assert recv.size == WINDOW
    assert pair.server.mux.window_growth == 0


def test_window_does_not_grow_without_rtt_delay() -> None:
    # With no delay the measured RTT is 0: nothing is "within two round trips".
    pair = make_link_pair()
    opened = pair.open()
    opened.stream.write(b"q" * (4 * 1024 * 1024))
    pair.flush()
    recv = pair.server.mux.receive_window(opened.remote_stream.stream_id)
    assert recv is not None and recv.size == WINDOW
