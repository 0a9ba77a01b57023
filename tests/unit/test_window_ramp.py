"""
How fast a stream's window opens over a long, capped path: two multiplexers joined by an
emulated WAN link (a one-way delay and a rate cap in each direction, with a bounded queue
that pushes back rather than drops, as `bench.delayproxy` does), on a simulated clock.

The agent sends as fast as its credit allows on streams the relay opened; the relay's
readers consume at a given rate (or at once). Nothing here depends on wall-clock time.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from tunnel.wire import LinkSettings
from tunnel.wire.events import DataReceived, StreamOpened
from tunnel.wire.mux import Multiplexer

MB = 1_000_000
KIB = 1024
MIB = 1024 * KIB
STEP = 0.001


class Direction:
    """One direction of the path: a queue bounded at `queue` octets drained at `rate`, then
    `delay` seconds of propagation."""

    def __init__(self, rate: float, delay: float, queue: int = 4 * MIB) -> None:
        self.rate = rate
        self.delay = delay
        self.queue_bound = queue
        self.queue: deque[bytes] = deque()
        self.queued = 0
        self.flight: deque[tuple[float, bytes]] = deque()

    def room(self) -> int:
        return self.queue_bound - self.queued

    def put(self, data: bytes) -> None:
        if data:
            self.queue.append(data)
            self.queued += len(data)

    def step(self, now: float) -> None:
        budget = int(self.rate * STEP)
        out = []
        while self.queue and budget > 0:
            head = self.queue[0]
            if len(head) <= budget:
                self.queue.popleft()
            else:
                self.queue[0], head = head[budget:], head[:budget]
            out.append(head)
            budget -= len(head)
            self.queued -= len(head)
        if out:
            self.flight.append((now + self.delay, b"".join(out)))

    def arrived(self, now: float) -> bytes:
        got = []
        while self.flight and self.flight[0][0] <= now + 1e-9:
            got.append(self.flight.popleft()[1])
        return b"".join(got)


@dataclass
class Reader:
    """A relay-side reader of one stream: consumes `rate` octets/s (None: all at once)."""

    rate: float | None = None
    held: int = 0
    received: int = 0
    sizes: list[int] = field(default_factory=list)


class Path:
    """An agent and a relay over one emulated WAN link, streams opened by the relay."""

    def __init__(self, rtt: float, rate: float, settings: LinkSettings | None = None) -> None:
        self.now = 0.0
        self.agent = Multiplexer(client=True, settings=settings, clock=self.clock)
        self.relay = Multiplexer(client=False, settings=settings, clock=self.clock)
        self.up = Direction(rate, rtt / 2)  # agent -> relay: the downloads' data
        self.down = Direction(rate, rtt / 2)
        self.readers: dict[int, Reader] = {}
        self.sending: set[int] = set()
        self.chunk = b"x" * (64 * KIB)
        #: The most the relay's windows together had grown, seen after every step.
        self.peak_growth = 0
        self.relay.ping()
        while self.relay.rtt is None:
            self.step()

    def clock(self) -> float:
        return self.now

    def open(self, reader: Reader) -> int:
        stream_id = self.relay.open_stream(b"")
        self.readers[stream_id] = reader
        return stream_id

    def step(self) -> None:
        for event in self.agent.receive_data(self.down.arrived(self.now)):
            if isinstance(event, StreamOpened):
                self.sending.add(event.stream_id)
        for stream_id in self.sending:
            while self.agent.pending(stream_id) < MIB:
                self.agent.send(stream_id, self.chunk)
        if self.up.room() > 0:
            self.up.put(self.agent.data_to_send(min(self.up.room(), MIB)))
        for event in self.relay.receive_data(self.up.arrived(self.now)):
            if isinstance(event, DataReceived):
                reader = self.readers[event.stream_id]
                reader.held += len(event.data)
                reader.received += len(event.data)
        for stream_id, reader in self.readers.items():
            take = reader.held if reader.rate is None else min(reader.held, int(reader.rate * STEP))
            if take:
                reader.held -= take
                self.relay.consumed(stream_id, take)
            window = self.relay.receive_window(stream_id)
            assert window is not None
            reader.sizes.append(window.size)
        self.peak_growth = max(self.peak_growth, self.relay.window_growth)
        self.down.put(self.relay.data_to_send())
        self.up.step(self.now)
        self.down.step(self.now)
        self.now += STEP

    def run_until(self, done: float) -> None:
        while self.now < done - 1e-9:
            self.step()


def transfer_time(rtt: float, rate: float, total: int) -> float:
    """Seconds from the relay opening one stream to `total` octets consumed from it."""
    path = Path(rtt, rate)
    reader = Reader()
    start = path.now
    path.open(reader)
    while reader.received < total:
        path.step()
        assert path.now - start < 60, "the transfer did not finish"
    return path.now - start


def test_one_stream_loses_at_most_three_round_trips_to_its_start_at_100ms() -> None:
    # 100 ms, 50 MB/s: a 5 MB bandwidth-delay product, 20 times the first window. Ideal:
    # one round trip (the OPEN out, the first data back), then the cap. Doubling the window
    # once per round trip from 256 KiB costs about five round trips more than that.
    rtt, rate, total = 0.1, 50 * MB, 60 * MB
    shortfall = transfer_time(rtt, rate, total) - rtt - total / rate
    assert shortfall <= 3 * rtt


def test_one_stream_loses_at_most_three_round_trips_to_its_start_at_30ms() -> None:
    rtt, rate, total = 0.03, 125 * MB, 60 * MB
    shortfall = transfer_time(rtt, rate, total) - rtt - total / rate
    assert shortfall <= 3 * rtt


def test_windows_grow_within_the_links_budget() -> None:
    # Eight fast streams at once, each of which would grow to `max_window` alone: the
    # link's budget, not the streams, bounds what the relay has granted above the start.
    settings = LinkSettings(max_link_growth=8 * MIB)
    path = Path(0.1, 50 * MB, settings)
    readers = [Reader() for _ in range(8)]
    for reader in readers:
        path.open(reader)
    path.run_until(path.now + 3.0)
    assert all(reader.received > 0 for reader in readers)
    assert 0 < path.peak_growth <= 8 * MIB
    assert sum(max(r.sizes) - 256 * KIB for r in readers) <= 8 * MIB
    assert all(max(r.sizes) <= settings.max_window for r in readers)


def test_a_slow_reader_never_grows_its_window_beside_a_fast_one() -> None:
    path = Path(0.1, 50 * MB)
    fast, slow = Reader(), Reader(rate=160_000)  # 160 kB/s: a sixteenth of 256 KiB per RTT
    path.open(fast)
    path.open(slow)
    path.run_until(path.now + 3.0)
    assert max(fast.sizes) >= 4 * MIB
    assert slow.received >= 400_000
    assert set(slow.sizes) == {256 * KIB}


def test_a_readers_window_grows_only_as_far_as_its_rate_needs() -> None:
    # A reader that keeps up 2 MB/s needs 200 kB in flight per 100 ms round trip; the window
    # grows while the reader consumed a quarter of it per round trip (up to 800 kB), so
    # stops at the first doubling past that, never near `max_window`.
    path = Path(0.1, 50 * MB)
    reader = Reader(rate=2 * MB)
    path.open(reader)
    path.run_until(path.now + 3.0)
    assert reader.received >= 5 * MB
    assert max(reader.sizes) <= 1 * MIB
