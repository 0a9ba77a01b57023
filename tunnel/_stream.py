"""
A stream of a link, as Twisted sees it: `Stream` is a real `ITransport`, `IConsumer` and
`IPushProducer` (modelled on Twisted's `H2Stream`), so that ordinary protocols and
`tunnel.link.splice` can be attached to it. Its link (`tunnel.link.LinkProtocol`) creates
it and feeds it; credit goes back to the peer only when the attached protocol has consumed
the data (see `tunnel.link`).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from twisted.internet import address, error, interfaces
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tunnel.wire import ErrorCode, LocalProtocolError
from tunnel.wire.errors import describe

if TYPE_CHECKING:
    from tunnel.link import LinkProtocol

__all__ = ["HIGH_WATER", "LOW_WATER", "Stream", "StreamResetError"]

#: Octets queued on a stream beyond which its producer is paused (one socket read fits).
HIGH_WATER = 256 * 1024
#: Octets queued on a stream below which its paused producer resumes.
LOW_WATER = 64 * 1024

_log = Logger()

#: The reason of every stream's clean end: one shared Failure, as Twisted's reactor shares
#: its own for connections that are done (a Failure costs a dozen calls to make).
_STREAM_CLOSED = Failure(error.ConnectionDone("stream closed"))


class StreamResetError(error.ConnectionLost):
    """
    The stream was reset: by the peer, by this side, or because its link ended.
    """

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(f"stream reset: {describe(code)}{': ' + message if message else ''}")
        #: The `ErrorCode` (or unknown integer) the stream was reset with.
        self.code = code


@implementer(
    interfaces.ITransport,
    interfaces.IConsumer,
    interfaces.IPushProducer,
)
class Stream:
    """
    One stream of a link, as a Twisted transport.

    Attach a protocol with `attach`; until then, received data is buffered (within the
    window: no credit goes back for it).
    """

    __slots__ = (
        "__weakref__",
        "_buffer",
        "_closed",
        "_discarding",
        "_local_ended",
        "_owed",
        "_paused",
        "_peer",
        "_producer",
        "_producer_paused",
        "_remote_end_delivered",
        "_remote_ended",
        "disconnecting",
        "link",
        "protocol",
        "stream_id",
        "tunnel_id",
    )

    def __init__(
        self,
        link: LinkProtocol,
        stream_id: int,
        peer: address.IPv4Address | address.IPv6Address | None,
    ):
        self.link = link
        self.stream_id = stream_id
        #: The tunnel the stream belongs to, set by the relay or agent that uses it.
        self.tunnel_id: str | None = None
        self.protocol: Any = None
        self._peer = peer
        self._buffer: deque[bytes] = deque()
        self._paused = False
        #: Octets delivered while paused by the consumer itself; credited at resume.
        self._owed = 0
        self._remote_ended = False
        self._remote_end_delivered = False
        self._local_ended = False
        self._discarding = False
        self._closed = False
        self._producer: interfaces.IPushProducer | None = None
        self._producer_paused = False
        self.disconnecting = False

    # -- attaching -------------------------------------------------------------------------

    def attach(self, protocol: Any) -> None:
        """
        Connect `protocol` to this stream and deliver whatever arrived before.
        """
        self.protocol = protocol
        protocol.makeConnection(self)
        if not self._paused:
            self._drain()

    # -- ITransport --------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """
        Queue data for the peer. Writes after `loseConnection` or a reset are dropped, as a
        TCP transport drops them.
        """
        if self._closed or self._local_ended or not data:
            return
        link = self.link
        try:
            pending = link.mux.send(self.stream_id, data)
        except LocalProtocolError:
            return
        link.flush_soon()
        if pending > HIGH_WATER and self._producer is not None and not self._producer_paused:
            self._producer_paused = True
            link._blocked[self.stream_id] = self
            self._producer.pauseProducing()

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def loseWriteConnection(self) -> None:
        """
        Half-close: the peer gets a FIN after the queued data; reading goes on.
        """
        if self._closed or self._local_ended:
            return
        self._local_ended = True
        link = self.link
        link.mux.end_stream(self.stream_id)
        link.flush()
        # `_maybe_finished`, inline (this side has just ended).
        if self._remote_end_delivered and not self._closed:
            self._finish(_STREAM_CLOSED)

    def loseConnection(self) -> None:
        """
        Close after the queued data is sent. Data still arriving is discarded (its credit is
        returned, so the peer is never stuck on a closed stream).
        """
        if self._closed:
            return
        self.disconnecting = True
        self._discarding = True
        # Everything held or delivered-while-paused is consumed now, as far as the peer's
        # credit is concerned.
        held = sum(len(b) for b in self._buffer) + self._owed
        self._buffer.clear()
        self._owed = 0
        self._credit(held)
        self.loseWriteConnection()
        self._maybe_finished()

    def abortConnection(self, code: int = ErrorCode.CANCEL) -> None:
        """
        Reset the stream at once; queued data is dropped.
        """
        if self._closed:
            return
        self.link.mux.reset_stream(self.stream_id, code)
        self.link.flush()
        self._finish(Failure(StreamResetError(code, "reset by this side")))

    @property
    def peer_open(self) -> bool:
        """Whether the peer (the other end of the link) may still send on this stream: it
        has neither ended its side nor has the stream closed or been reset."""
        return not (self._remote_ended or self._closed)

    def getPeer(self) -> Any:
        return self._peer or self.link.peer

    def getHost(self) -> Any:
        return self.link.host

    # -- IConsumer ---------------------------------------------------------------------------

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if not streaming:
            raise ValueError("streams accept streaming (push) producers only")
        self._producer = producer
        self._producer_paused = False
        if self.link.mux.pending(self.stream_id) > HIGH_WATER:
            self._producer_paused = True
            self.link._blocked[self.stream_id] = self
            producer.pauseProducing()

    def unregisterProducer(self) -> None:
        self._producer = None
        self._producer_paused = False
        self.link._blocked.pop(self.stream_id, None)

    # -- IPushProducer (the consumer of our received data pauses us) ------------------------

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        if not self._paused:
            return
        self._paused = False
        if self._owed:
            owed, self._owed = self._owed, 0
            self._credit(owed)
        self._drain()
        self.link.flush_soon()

    def stopProducing(self) -> None:
        # A transport calls this on its producer as it closes, *before* its protocol's
        # connectionLost says whether the close was clean; that decides FIN or RESET.
        self._paused = True

    # -- called by the link ------------------------------------------------------------------

    def _credit(self, length: int) -> None:
        if length and not self._closed:
            self.link.mux.consumed(self.stream_id, length)

    def _data_received(self, data: bytes) -> None:
        if self._discarding:
            self._credit(len(data))
        elif self._paused or self.protocol is None or self._buffer:
            self._buffer.append(data)
        else:
            # `_deliver` and `_credit`, inline: this runs for every DATA frame.
            self.protocol.dataReceived(data)
            # dataReceived may have paused or closed the stream (mypy cannot know).
            if self._paused:
                self._owed += len(data)  # type: ignore[unreachable]
            elif not self._closed:
                self.link.mux.consumed(self.stream_id, len(data))

    def _deliver(self, data: bytes) -> None:
        self.protocol.dataReceived(data)
        if self._paused:
            self._owed += len(data)
        else:
            self._credit(len(data))

    def _drain(self) -> None:
        buffer = self._buffer
        while buffer and not self._paused and not self._closed and self.protocol is not None:
            self._deliver(buffer.popleft())
        if not buffer and self._remote_ended and not self._remote_end_delivered:
            self._deliver_end()

    def _remote_end(self) -> None:
        self._remote_ended = True
        if not self._buffer and self.protocol is not None:
            self._deliver_end()

    def _deliver_end(self) -> None:
        self._remote_end_delivered = True
        protocol = self.protocol
        if protocol is not None and not self._discarding:
            if interfaces.IHalfCloseableProtocol.providedBy(protocol):
                protocol.readConnectionLost()
            else:
                # Twisted's contract: a protocol that cannot be half-closed sees the
                # connection end when the peer finishes sending.
                self.loseConnection()
                return
        # `_maybe_finished`, inline (the peer's end has just been delivered).
        if self._local_ended and not self._closed:
            self._finish(_STREAM_CLOSED)

    def _maybe_finished(self) -> None:
        if self._local_ended and self._remote_end_delivered and not self._closed:
            self._finish(_STREAM_CLOSED)

    def _reset(self, code: int, message: str) -> None:
        self._finish(Failure(StreamResetError(code, message)))

    def _finish(self, reason: Failure) -> None:
        if self._closed:
            return
        self._closed = True
        self._buffer.clear()
        self.link._forget(self)
        self._producer = None
        protocol, self.protocol = self.protocol, None
        if protocol is not None:
            try:
                protocol.connectionLost(reason)
            except Exception:
                # One stream's protocol failing must not stop the others' clean-up.
                _log.failure("error in the connectionLost of stream {id}", id=self.stream_id)
