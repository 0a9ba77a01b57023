"""
A stateful hypothesis test: two connected multiplexers driven through random opens, writes,
partial consumption, pauses, half-closes, resets and chunked delivery, with frames crossing in
flight. Checks delivery (exactly once, in order), window accounting and clean teardown.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from hypothesis import event as note
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from tunnel.wire.events import (
    DataReceived,
    Event,
    LinkTerminated,
    StreamEnded,
    StreamOpened,
    StreamReset,
)
from tunnel.wire.mux import LinkSettings, Multiplexer, StreamState

#: Content depends on the offset in the stream, so a lost, repeated or reordered byte shows.
PATTERN = bytes(range(251)) * 1200
MAX_WRITE = len(PATTERN) - 251


def expected(offset: int, length: int) -> bytes:
    start = offset % 251
    return PATTERN[start : start + length]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Direction:
    """One direction of one stream: what the writer wrote and what the reader got."""

    written: int = 0
    ended: bool = False
    received: int = 0
    fin_received: bool = False
    unconsumed: int = 0


@dataclass
class Stream:
    opener: int  # 0 client, 1 server
    #: Index = writer side: 0 is client -> server, 1 is server -> client.
    dirs: tuple[Direction, Direction]
    reset: bool = False
    seen_by_peer: bool = False


SENDABLE = (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE)


class TwoMultiplexers(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.muxes: list[Multiplexer] = []
        self.wires: list[bytearray] = [bytearray(), bytearray()]  # index = sender
        self.streams: dict[int, Stream] = {}
        self.terminated: list[LinkTerminated] = []

    @initialize(
        window=st.sampled_from([1024, 4096, 16384, 256 * 1024]),
        growth=st.sampled_from([1, 4, 64]),
        max_streams=st.sampled_from([1, 3, 1024]),
        frame=st.sampled_from([16384, 65536]),
    )
    def setup(self, window: int, growth: int, max_streams: int, frame: int) -> None:
        link = LinkSettings(
            max_frame_size=frame,
            max_streams=max_streams,
            initial_window=window,
            max_window=window * growth,
        )
        self.muxes = [
            Multiplexer(client=True, settings=link, clock=self.clock),
            Multiplexer(client=False, settings=link, clock=self.clock),
        ]
        for side in (0, 1):
            self._flush(side, 1 << 30)
        for side in (0, 1):
            self._deliver(side, 1 << 30)

    # -- helpers ---------------------------------------------------------------------------

    def _flush(self, side: int, budget: int) -> None:
        self.wires[side] += self.muxes[side].data_to_send(budget)

    def _deliver(self, sender: int, n: int) -> None:
        wire = self.wires[sender]
        chunk = bytes(wire[:n])
        del wire[:n]
        receiver = 1 - sender
        self._handle(receiver, self.muxes[receiver].receive_data(chunk))

    def _handle(self, side: int, events: list[Event]) -> None:
        peer = 1 - side
        for event in events:
            if isinstance(event, LinkTerminated):
                self.terminated.append(event)
                raise AssertionError(f"link terminated on side {side}: {event}")
            if isinstance(event, StreamOpened):
                stream = self.streams[event.stream_id]
                assert stream.opener == peer and not stream.seen_by_peer
                stream.seen_by_peer = True
            elif isinstance(event, DataReceived):
                stream = self.streams[event.stream_id]
                d = stream.dirs[peer]
                assert not d.fin_received
                assert event.data == expected(d.received, len(event.data)), "corrupt data"
                d.received += len(event.data)
                assert d.received <= d.written, "more data than written"
                d.unconsumed += len(event.data)
            elif isinstance(event, StreamEnded):
                d = self.streams[event.stream_id].dirs[peer]
                assert d.ended and not d.fin_received
                d.fin_received = True
                if not self.streams[event.stream_id].reset:
                    assert d.received == d.written, "FIN before all data"
            elif isinstance(event, StreamReset):
                assert event.remote, f"local reset in a well-behaved run: {event}"
                self.streams[event.stream_id].reset = True
                if self.wires[side]:
                    note("peer reset a stream while bytes were in flight to it")

    def _live(self, side: int) -> list[int]:
        return sorted(self.muxes[side].stream_ids())

    def _pick(self, side: int, index: int) -> int | None:
        live = self._live(side)
        return live[index % len(live)] if live else None

    # -- rules -----------------------------------------------------------------------------

    @rule(side=st.integers(0, 1), metadata=st.binary(max_size=16))
    def open(self, side: int, metadata: bytes) -> None:
        mux = self.muxes[side]
        if not mux.can_open_streams:
            note("open refused locally: stream limit")
            return
        sid = mux.open_stream(metadata)
        assert sid not in self.streams
        self.streams[sid] = Stream(side, (Direction(), Direction()))

    @rule(
        side=st.integers(0, 1),
        index=st.integers(0, 100),
        size=st.one_of(st.integers(1, 100), st.integers(1, MAX_WRITE)),
    )
    def write(self, side: int, index: int, size: int) -> None:
        sid = self._pick(side, index)
        if sid is None or self.muxes[side].stream_state(sid) not in SENDABLE:
            return
        d = self.streams[sid].dirs[side]
        self.muxes[side].send(sid, expected(d.written, size))
        d.written += size

    @rule(side=st.integers(0, 1), index=st.integers(0, 100))
    def end(self, side: int, index: int) -> None:
        sid = self._pick(side, index)
        if sid is None or self.muxes[side].stream_state(sid) not in SENDABLE:
            return
        self.muxes[side].end_stream(sid)
        self.streams[sid].dirs[side].ended = True

    @rule(side=st.integers(0, 1), index=st.integers(0, 100))
    def reset(self, side: int, index: int) -> None:
        sid = self._pick(side, index)
        if sid is None:
            return
        self.muxes[side].reset_stream(sid)
        self.streams[sid].reset = True
        if self.wires[1 - side]:
            note("reset a stream while bytes were in flight from the peer")

    @rule(
        side=st.integers(0, 1),
        index=st.integers(0, 100),
        fraction=st.sampled_from([0.5, 1.0]) | st.floats(0, 1),
    )
    def consume(self, side: int, index: int, fraction: float) -> None:
        sid = self._pick(side, index)
        if sid is None:
            return
        d = self.streams[sid].dirs[1 - side]
        n = int(d.unconsumed * fraction)
        if n:
            self.muxes[side].consumed(sid, n)
            d.unconsumed -= n

    @rule(seconds=st.sampled_from([0.001, 0.05, 1.0, 10.0]))
    def pause(self, seconds: float) -> None:
        """Time passes and nobody consumes: a slow reader, or a fast one for small steps."""
        self.clock.now += seconds

    @rule(side=st.integers(0, 1))
    def ping(self, side: int) -> None:
        self.muxes[side].ping()

    @rule(rtt=st.sampled_from([0.01, 2.0, 100.0]))
    def measure_rtt(self, rtt: float) -> None:
        """Pings both ways whose echoes come back `rtt` later (in-flight bytes arrive too)."""
        for side in (0, 1):
            self.muxes[side].ping()
            self._flush(side, 1 << 30)
        self.clock.now += rtt / 2
        for side in (0, 1):
            self._deliver(side, 1 << 30)
        for side in (0, 1):
            self._flush(side, 1 << 30)
        self.clock.now += rtt / 2
        for side in (0, 1):
            self._deliver(side, 1 << 30)

    @rule(side=st.integers(0, 1), budget=st.sampled_from([1, 1000, 70_000, 1 << 30]))
    def flush(self, side: int, budget: int) -> None:
        self._flush(side, budget)

    @precondition(lambda self: any(self.wires))
    @rule(sender=st.integers(0, 1), n=st.one_of(st.integers(1, 20), st.integers(1, 1 << 20)))
    def deliver(self, sender: int, n: int) -> None:
        self._deliver(sender, n)

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def windows_are_sound(self) -> None:
        for side, mux in enumerate(self.muxes):
            assert not mux.closed
            for sid in mux.stream_ids():
                assert mux.send_window(sid) >= 0
                window = mux.receive_window(sid)
                assert window is not None
                assert window.available >= 0
                assert window.size == window.available + window.unconsumed + window.unacknowledged
                assert window.size <= mux.settings.max_window
                if window.size > mux.settings.initial_window:
                    note("a receive window grew")
                d = self.streams[sid].dirs[1 - side]
                assert window.unconsumed == d.unconsumed
                assert d.unconsumed <= window.size

    @invariant()
    def link_growth_is_bounded(self) -> None:
        for mux in self.muxes:
            grown = 0
            for sid in mux.stream_ids():
                window = mux.receive_window(sid)
                assert window is not None
                grown += window.size - mux.settings.initial_window
            assert mux.window_growth == grown
            assert grown <= mux.settings.max_link_growth

    @invariant()
    def delivery_is_prefix(self) -> None:
        for stream in self.streams.values():
            for d in stream.dirs:
                assert d.received <= d.written
                assert not d.fin_received or d.ended

    def teardown(self) -> None:
        if not self.muxes or self.terminated:
            return
        for _ in range(10_000):
            for side in (0, 1):
                mux = self.muxes[side]
                for sid in mux.stream_ids():
                    if mux.stream_state(sid) in SENDABLE:
                        mux.end_stream(sid)
                        self.streams[sid].dirs[side].ended = True
                    d = self.streams[sid].dirs[1 - side]
                    if d.unconsumed:
                        mux.consumed(sid, d.unconsumed)
                        d.unconsumed = 0
                self._flush(side, 1 << 30)
            if not any(self.wires):
                break
            for side in (0, 1):
                self._deliver(side, 1 << 30)
        else:
            raise AssertionError("teardown did not settle")
        for sid, stream in self.streams.items():
            if stream.reset:
                continue
            for d in stream.dirs:
                assert d.fin_received, f"stream {sid}: no FIN"
                assert d.received == d.written, f"stream {sid}: data lost"
        assert self.muxes[0].stream_count == 0
        assert self.muxes[1].stream_count == 0


#: Raise for a longer hunt: TUNNELS_STATEFUL_EXAMPLES=5000 pytest tests/unit/test_mux_stateful.py
EXAMPLES = int(os.environ.get("TUNNELS_STATEFUL_EXAMPLES", "150"))
TwoMultiplexers.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=60, deadline=None
)
TestTwoMultiplexers = TwoMultiplexers.TestCase
