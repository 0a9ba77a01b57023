"""
Helpers for protocol-tier tests of `tunnel.link`: recording link and stream protocols, two
links joined by `twisted.test.iosim`, a raw frame peer, and a simulated one-way delay.

Nothing here opens a socket or sleeps: time is a `MemoryReactorClock` the test advances.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import interfaces
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer

from tunnel.link import LinkProtocol, Stream
from tunnel.wire import LinkSettings
from tunnel.wire import frames as f

__all__ = [
    "CountingProducer",
    "LinkPair",
    "RawPeer",
    "RecordingLink",
    "StreamRecorder",
    "decode_frames",
    "goaway_codes",
    "make_link_pair",
]


@implementer(interfaces.IHalfCloseableProtocol)
class StreamRecorder(Protocol):
    """
    A protocol for a stream that records everything that happens to it.

    @param pause_on_connect: pause the stream before any data is delivered.
    @param pause_on_data: pause the stream from inside every `dataReceived` (a reader that
        takes one chunk and stops until the test resumes it).
    """

    def __init__(self, *, pause_on_connect: bool = False, pause_on_data: bool = False) -> None:
        self.chunks: list[bytes] = []
        self.read_closed = 0
        self.write_closed = 0
        self.lost: Failure | None = None
        self.pause_on_connect = pause_on_connect
        self.pause_on_data = pause_on_data
        #: Called from `readConnectionLost`, e.g. to write back.
        self.on_read_closed: Callable[[StreamRecorder], None] | None = None

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    @property
    def received(self) -> int:
        return sum(len(c) for c in self.chunks)

    def connectionMade(self) -> None:
        if self.pause_on_connect:
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)
        if self.pause_on_data:
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def readConnectionLost(self) -> None:
        self.read_closed += 1
        if self.on_read_closed is not None:
            self.on_read_closed(self)

    def writeConnectionLost(self) -> None:
        self.write_closed += 1

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        assert self.lost is None, "connectionLost twice"
        self.lost = reason


class RecordingLink(LinkProtocol):
    """
    A link that records its hooks. Streams the peer opens get a `StreamRecorder` from
    `recorder_factory` (None: the default, which refuses them).
    """

    def __init__(
        self,
        reactor: Any,
        *,
        client: bool,
        recorder_factory: Callable[[], Protocol] | None = StreamRecorder,
        **kwargs: Any,
    ) -> None:
        super().__init__(reactor, client=client, **kwargs)
        self.recorder_factory = recorder_factory
        self.ready = 0
        self.controls: list[bytes] = []
        self.opened: list[tuple[Stream, bytes, Protocol | None]] = []
        self.goaways: list[tuple[int, str]] = []
        self.lost: Failure | None = None

    def linkReady(self) -> None:
        self.ready += 1

    def controlReceived(self, payload: bytes) -> None:
        self.controls.append(payload)

    def streamOpened(self, stream: Stream, metadata: bytes) -> None:
        if self.recorder_factory is None:
            self.opened.append((stream, metadata, None))
            super().streamOpened(stream, metadata)
            return
        protocol = self.recorder_factory()
        self.opened.append((stream, metadata, protocol))
        stream.attach(protocol)

    def goAwayReceived(self, code: int, message: str) -> None:
        self.goaways.append((code, message))

    def linkLost(self, reason: Failure) -> None:
        self.lost = reason


@implementer(interfaces.IPushProducer)
class CountingProducer:
    """
    A push producer that writes `total` octets of a known pattern to `consumer`, in
    `chunk`-sized writes, whenever it is not paused.
    """

    def __init__(self, consumer: Any, total: int, chunk: int = 16 * 1024) -> None:
        self.consumer = consumer
        self.total = total
        self.chunk = chunk
        self.sent = 0
        self.paused = False
        self.pauses = 0
        self.resumes = 0
        self.stopped = False
        #: `consumer`'s queued octets when it paused us, when the test supplies a probe.
        self.pending_at_pause: list[int] = []
        self.pending_probe: Callable[[], int] | None = None
        self._producing = False

    @staticmethod
    def pattern(total: int) -> bytes:
        block = bytes(range(256)) * 4
        return (block * (total // len(block) + 1))[:total]

    def start(self) -> None:
        self.consumer.registerProducer(self, True)
        self._produce()

    def _produce(self) -> None:
        if self._producing:
            return
        self._producing = True
        try:
            data = self.pattern(self.total)
            while not self.paused and not self.stopped and self.sent < self.total:
                piece = data[self.sent : self.sent + self.chunk]
                self.sent += len(piece)
                self.consumer.write(piece)
        finally:
            self._producing = False

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1
        if self.pending_probe is not None:
            self.pending_at_pause.append(self.pending_probe())

    def resumeProducing(self) -> None:
        self.paused = False
        self.resumes += 1
        self._produce()

    def stopProducing(self) -> None:
        self.stopped = True


@dataclass
class LinkPair:
    """
    A client and a server link joined by iosim.
    """

    clock: MemoryReactorClock
    client: RecordingLink
    server: RecordingLink
    client_io: iosim.FakeTransport
    server_io: iosim.FakeTransport
    pump: iosim.IOPump
    delivered: list[float] = field(default_factory=list)

    def flush(self) -> None:
        """
        Move bytes both ways until nothing moves, without advancing the clock (but running
        what is due now: the links defer their writes to the end of the reactor turn).
        """
        for _ in range(100_000):
            self.pump.flush(advanceClock=False)
            now = self.clock.seconds()
            if not any(c.getTime() <= now for c in self.clock.getDelayedCalls()):
                return
            self.clock.advance(0)
        raise AssertionError("traffic did not settle")

    def flush_delayed(self, one_way: float, max_rounds: int = 10_000) -> int:
        """
        Move bytes both ways until nothing moves, each delivery taking `one_way` seconds of
        clock time (what both sides wrote by then travels together).

        @return: the number of rounds.
        """
        rounds = 0
        while rounds < max_rounds:
            self.clock.advance(0)
            from_client = self.client_io.getOutBuffer()
            from_server = self.server_io.getOutBuffer()
            if not from_client and not from_server:
                return rounds
            self.clock.advance(one_way)
            if from_client:
                self.server_io.bufferReceived(from_client)
            if from_server:
                self.client_io.bufferReceived(from_server)
            rounds += 1
        raise AssertionError("traffic did not settle")

    def open(self, metadata: bytes = b"", recorder: Protocol | None = None) -> OpenedStream:
        """
        Open a stream from the client, attach `recorder` (a new `StreamRecorder` if None),
        deliver the OPEN, and return both ends.
        """
        stream = self.client.openStream(metadata)
        local = recorder if recorder is not None else StreamRecorder()
        stream.attach(local)
        self.flush()
        remote_stream, got_metadata, remote = self.server.opened[-1]
        assert remote_stream.stream_id == stream.stream_id
        assert got_metadata == metadata
        return OpenedStream(stream, local, remote_stream, remote)


@dataclass
class OpenedStream:
    stream: Stream
    local: Any
    remote_stream: Stream
    remote: Any


def make_link_pair(
    clock: MemoryReactorClock | None = None,
    *,
    greet: bool = True,
    client_kwargs: dict[str, Any] | None = None,
    server_kwargs: dict[str, Any] | None = None,
    settings: LinkSettings | None = None,
) -> LinkPair:
    """
    Connect a client link (client=True) to a server link (client=False) with iosim. With
    `greet`, pump until both HELLOs (and the first pings) are exchanged.
    """
    clock = clock or MemoryReactorClock()
    client = RecordingLink(clock, client=True, settings=settings, **(client_kwargs or {}))
    server = RecordingLink(clock, client=False, settings=settings, **(server_kwargs or {}))
    client_io = iosim.makeFakeClient(client)
    server_io = iosim.makeFakeServer(server)
    pump = iosim.connect(server, server_io, client, client_io, greet=False, clock=clock)
    pair = LinkPair(clock, client, server, client_io, server_io, pump)
    if greet:
        pair.flush()
    return pair


def decode_frames(data: bytes, max_frame_size: int = f.MAX_FRAME_SIZE_LIMIT) -> list[f.Frame]:
    """
    Decode everything a link wrote; the bytes must end on a frame boundary.
    """
    decoder = f.FrameDecoder(max_frame_size)
    frames = decoder.feed(data)
    assert decoder.buffered == 0, "trailing partial frame"
    return frames


def goaway_codes(data: bytes) -> list[int]:
    """
    The codes of the GOAWAY frames in `data`.
    """
    return [
        f.decode_goaway(frame.payload)[1]
        for frame in decode_frames(data)
        if frame.type == f.FrameType.GOAWAY
    ]


class RawPeer:
    """
    A `RecordingLink` on a `StringTransport`, driven by hand-built frames.

    @param client: the role of the link under test; the raw peer plays the other one.
    """

    def __init__(self, clock: MemoryReactorClock | None = None, *, client: bool = False, **kw: Any):
        self.clock = clock or MemoryReactorClock()
        self.link = RecordingLink(self.clock, client=client, **kw)
        self.transport = StringTransport()
        self.link.makeConnection(self.transport)
        self.written = 0

    def hello(self) -> None:
        self.feed(f.encode_hello(1, 1, {}))

    def feed(self, data: bytes) -> None:
        self.link.dataReceived(data)

    def frames(self) -> list[f.Frame]:
        """
        Every frame the link has written so far.
        """
        return decode_frames(self.transport.value())

    def goaway_codes(self) -> list[int]:
        return goaway_codes(self.transport.value())
