"""
The Twisted adapter around the sans-IO multiplexer: a link protocol and its streams.

`LinkProtocol` owns one `tunnel.wire.Multiplexer` and one transport (the TLS connection
between agent and relay). Each stream of the link is a `Stream`: a real `ITransport`,
`IConsumer` and `IPushProducer`, modelled on Twisted's `H2Stream`, so that ordinary protocols
and `splice` can be attached to it.

Flow control runs end to end:

- Credit on a stream goes back to the peer only when the protocol attached to the stream has
  consumed the data: delivered it by `dataReceived` without pausing the stream. A paused
  stream buffers at most its window and returns no credit, so the peer's sender stops.
- A stream whose queued output passes `HIGH_WATER` pauses the producer registered on it (the
  socket that feeds it) until the link has framed the queue below `LOW_WATER`.
- The link is itself a producer for its transport: when the socket's buffer is full, the link
  stops framing DATA (control frames wait in the multiplexer, whose backlog is bounded: past
  it, whether the frames answer the peer or come from this side, the link ends).
  One stream's pause never pauses the link, nor any other stream.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import address, defer, error
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

# The stream and the splice live in their own modules; their names are this module's too.
from tunnel._splice import SOCKET_READ as SOCKET_READ
from tunnel._splice import SpliceProtocol as SpliceProtocol
from tunnel._splice import close_now as close_now
from tunnel._splice import half_close as half_close
from tunnel._splice import release_connector as release_connector
from tunnel._splice import set_nodelay as set_nodelay
from tunnel._splice import splice as splice
from tunnel._splice import write_now as write_now
from tunnel._stream import HIGH_WATER as HIGH_WATER
from tunnel._stream import LOW_WATER as LOW_WATER
from tunnel._stream import Stream as Stream
from tunnel._stream import StreamResetError as StreamResetError
from tunnel.wire import (
    ControlReceived,
    DataReceived,
    ErrorCode,
    Event,
    GoAwayReceived,
    HelloReceived,
    LinkSettings,
    LinkState,
    LinkTerminated,
    Multiplexer,
    PingAcknowledged,
    StreamEnded,
    StreamOpened,
    StreamReset,
)
from tunnel.wire.errors import describe

__all__ = [
    "HIGH_WATER",
    "LOW_WATER",
    "LinkProtocol",
    "SpliceProtocol",
    "Stream",
    "StreamResetError",
    "close_now",
    "half_close",
    "set_nodelay",
    "splice",
    "write_now",
]

#: Octets of DATA framed per write to the link's transport.
_WRITE_BUDGET = 256 * 1024

_log = Logger()


class LinkProtocol(Protocol):
    """
    One end of a link, over a connected transport. Subclasses implement the hooks
    `linkReady`, `controlReceived`, `streamOpened`, `goAwayReceived` and `linkLost`.

    @param keepalive_interval: seconds of silence from the peer before we ping it.
    @param keepalive_timeout: seconds of silence after which the link is declared dead.
    @param gated: the peer must be accepted (`acceptPeer`, after its first control message)
        before it may do more than HELLO, PING, GOAWAY and CONTROL, in at most
        `LinkSettings.max_unaccepted_input` octets (see `Multiplexer`).
    """

    #: The multiplexer; created in `connectionMade`.
    mux: Multiplexer

    def __init__(
        self,
        reactor: IReactorTime,
        *,
        client: bool,
        settings: LinkSettings | None = None,
        keepalive_interval: float = 5.0,
        keepalive_timeout: float = 15.0,
        gated: bool = False,
    ) -> None:
        self.reactor = reactor
        self.gated = gated
        self.client = client
        self.settings = settings or LinkSettings()
        self.keepalive_interval = keepalive_interval
        self.keepalive_timeout = keepalive_timeout
        self.streams: dict[int, Stream] = {}
        self._blocked: dict[int, Stream] = {}
        self._paused = False
        self._receiving = False
        self._closing = False
        self._last_received = 0.0
        self._last_ping = 0.0
        self._keepalive: IDelayedCall | None = None
        self._abort_call: IDelayedCall | None = None
        self._flush_call: IDelayedCall | None = None
        #: A flush is queued to run after the reactor's current events (`after_events`).
        self._flush_queued = False
        self._lost = False
        self._lost_waiters: list[defer.Deferred[None]] = []
        #: `probe` callers waiting for a ping to be answered, and the probe's deadline.
        self._probe_waiters: list[defer.Deferred[bool]] = []
        self._probe_timer: IDelayedCall | None = None
        #: The last probe went unanswered, and no ping has been answered since.
        self._probe_failed = False
        self.terminated: tuple[int, str, bool] | None = None
        #: The transport's addresses, kept for streams asking after the link is gone.
        self.host: Any = None
        self.peer: Any = None

    # -- hooks -------------------------------------------------------------------------------

    def linkReady(self) -> None:
        """
        Both HELLOs are exchanged; streams may be opened.
        """

    def controlReceived(self, payload: bytes) -> None:
        """
        A CONTROL frame arrived.
        """

    def streamOpened(self, stream: Stream, metadata: bytes) -> None:
        """
        The peer opened `stream`. The default resets it.
        """
        stream.abortConnection(ErrorCode.REFUSED_STREAM)

    def goAwayReceived(self, code: int, message: str) -> None:
        """
        The peer is draining (`code` NO_ERROR) or ending the link.
        """

    def linkLost(self, reason: Failure) -> None:
        """
        The link is gone; every stream has been reset.
        """

    def streamForgotten(self) -> None:
        """
        A stream ended (closed or reset) and left `streams`.
        """

    # -- Protocol ----------------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.mux = Multiplexer(
            client=self.client, settings=self.settings, clock=self.reactor.seconds, gated=self.gated
        )
        transport = self.transport
        assert transport is not None
        self.host = transport.getHost()
        self.peer = transport.getPeer()
        set_nodelay(transport)
        transport.registerProducer(self, True)  # type: ignore[attr-defined]
        self._last_received = self.reactor.seconds()
        self.mux.ping()
        self._last_ping = self._last_received
        self.flush()
        self._schedule_keepalive()

    def dataReceived(self, data: bytes) -> None:
        self._last_received = self.reactor.seconds()
        self._receiving = True
        try:
            mux = self.mux
            self._dispatch(mux.receive_data(data))
            # A gated link holds input after each control message until the handler has
            # accepted the peer (or not): then the rest is processed, in order. (Only a
            # gated multiplexer holds input.)
            while self.gated and mux.input_pending:
                self._dispatch(mux.receive_data(b""))
        finally:
            self._receiving = False
        # `flush` when it has anything to do (its own first check, inline): most reads
        # of a connection's open and close queue nothing to send.
        mux = self.mux
        if mux._control or mux._ready or self._blocked or mux.state is LinkState.CLOSED:
            self.flush()

    def connectionLost(self, reason: Failure = error.ConnectionDone) -> None:  # type: ignore[assignment]
        self._lost = True
        self._cancel_timers()
        try:
            clean = reason.check(error.ConnectionDone) is not None
            events = (
                self.mux.connection_lost(str(reason.value), clean) if hasattr(self, "mux") else []
            )
            self._dispatch(events)
            for stream in list(self.streams.values()):
                stream._reset(ErrorCode.CANCEL, "link lost")
        finally:
            self._probe_done(False)
            try:
                self.linkLost(reason)
            finally:
                # The transport (a TLS layer, which holds this link as its protocol and its
                # producer) is let go, so that reference counting frees the closed link and its
                # OpenSSL state now rather than at some later cyclic collection.
                release_connector(self.transport)
                self.transport = None
                waiters, self._lost_waiters = self._lost_waiters, []
                for waiter in waiters:
                    waiter.callback(None)

    # -- IPushProducer (our transport's buffer is full) --------------------------------------

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self.flush()

    def stopProducing(self) -> None:
        self._paused = True

    # -- actions -----------------------------------------------------------------------------

    def openStream(
        self, metadata: bytes, peer: address.IPv4Address | address.IPv6Address | None = None
    ) -> Stream:
        """
        Open a stream to the peer.

        @raise tunnel.wire.StreamLimitError: the peer accepts no more streams now.
        @raise tunnel.wire.LocalProtocolError: the link is not open.
        """
        stream_id = self.mux.open_stream(metadata)
        stream = Stream(self, stream_id, peer)
        self.streams[stream_id] = stream
        self.flush_soon()
        return stream

    def acceptPeer(self) -> None:
        """
        The peer is accepted (a gated link's first control message checked out): every
        frame type is allowed from now on.
        """
        self.mux.accept_peer()

    def sendControl(self, payload: bytes) -> None:
        """
        Send a CONTROL frame; silently dropped on a link that is over.
        """
        if self.mux.closed:
            return
        self.mux.send_control(payload)
        self.flush()

    def goAway(self, code: int = ErrorCode.NO_ERROR, message: str = "") -> None:
        """
        Drain (NO_ERROR) or end the link with `code`; an ended link's transport is closed
        once the GOAWAY is written, and aborted if that takes more than a second.
        """
        self._dispatch(self.mux.go_away(code, message))
        self.flush()

    def close(self, message: str = "closing", timeout: float = 1.0) -> defer.Deferred[None]:
        """
        End the link gracefully: a GOAWAY, then the transport closes once what is queued is
        written; it is aborted if that takes longer than `timeout` seconds.

        @return: fires when the connection is gone.
        """
        done: defer.Deferred[None] = defer.Deferred()
        if self._lost or self.transport is None:
            done.callback(None)
            return done
        self._lost_waiters.append(done)
        self._dispatch(self.mux.go_away(ErrorCode.NO_ERROR, message))
        self.flush()
        self._lose_transport()
        if self._abort_call is None:
            self._abort_call = self.reactor.callLater(timeout, self._abort)
        return done

    def probe(self, timeout: float) -> defer.Deferred[bool]:
        """
        Ask whether the peer is alive: send a PING and fire True as soon as a ping is
        answered (a PING ACK proves the peer reads what we send, which octets that merely
        arrive from it do not), False if none is within `timeout` seconds or the link ends.

        Probes made while one is pending share its PING and deadline. Once a probe failed,
        later ones fail at once until a ping is answered again (the keepalive's pings keep
        asking).
        """
        d: defer.Deferred[bool] = defer.Deferred()
        if self._lost or self.transport is None or self.mux.closed or self._probe_failed:
            d.callback(False)
            return d
        self._probe_waiters.append(d)
        if self._probe_timer is None:
            self._probe_timer = self.reactor.callLater(timeout, self._probe_done, False)
            self.mux.ping()
            self.flush()
        return d

    def _probe_done(self, answered: bool) -> None:
        timer, self._probe_timer = self._probe_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        self._probe_failed = not answered and timer is not None
        waiters, self._probe_waiters = self._probe_waiters, []
        for waiter in waiters:
            waiter.callback(answered)

    def flush_soon(self) -> None:
        """
        Flush once the reactor has handled the events of its current turn: the writes of
        every stream that had data in this turn share one TLS write and one system call.
        The delay is the rest of the turn, not a timer.
        """
        if (
            self._flush_call is None
            and not self._flush_queued
            and not self._receiving
            and not self._lost
        ):
            # `after_events`, inline (two calls less per write of a stream): the daemons'
            # reactor, inside a poll's handlers, holds the list of what it runs once the
            # poll's events are handled.
            try:
                pending = self.reactor._tunnel_after_events  # type: ignore[attr-defined]
            except AttributeError:
                pending = None
            if pending is not None:
                pending.append(self.flush)
                self._flush_queued = True
            else:
                self._flush_call = self.reactor.callLater(0, self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_call = None
        self.flush()

    def flush(self) -> None:
        """
        Write what the multiplexer has to send, unless the transport asked us to pause or we
        are in the middle of processing input (then it happens once at the end).
        """
        # A flush queued by `flush_soon` is this one, or finds nothing left to send.
        self._flush_queued = False
        if self._receiving or self._lost:
            return
        transport = self.transport
        if transport is None:
            return
        mux = self.mux
        # The multiplexer's queues are read directly (its `has_data_to_send` and
        # `backlog_exceeded`, without their property calls): this runs several times per
        # connection and once or twice per request, often with nothing to send.
        if not mux._control and not mux._ready:
            if mux.state is not LinkState.CLOSED:
                if self._blocked:
                    self._resume_blocked(mux)
                return
        elif mux._control_size > mux.settings.max_control_backlog:
            # Frames this side queued (control answers, resets, OPENs) pile up like replies
            # when the peer does not read: past the bound the link ends, backlog dropped.
            self._dispatch(mux.check_backlog())
        if mux.state is LinkState.CLOSED:
            # The link is over: its GOAWAY goes out even to a peer that is not reading,
            # and the transport closes.
            data = mux.data_to_send()
            if data:
                transport.write(data)
            if not self._closing:
                self._closing = True
                # A TLS loseConnection can wait forever for the peer's close_notify, so
                # abort if it has not finished soon.
                self._lose_transport()
                self._abort_call = self.reactor.callLater(1.0, self._abort)
            return
        if self._paused:
            return
        # One call when there is nothing to send, two when one write takes it all (the
        # usual case): this runs at least once per reactor turn with traffic.
        data = mux.data_to_send(_WRITE_BUDGET)
        while data:
            transport.write(data)
            if self._paused or not (mux._control or mux._ready):
                break
            data = mux.data_to_send(_WRITE_BUDGET)
        if self._blocked:
            self._resume_blocked(mux)

    def _resume_blocked(self, mux: Multiplexer) -> None:
        """Resume the producers of the streams whose queue fell below `LOW_WATER`."""
        for stream_id, stream in list(self._blocked.items()):
            if mux.pending(stream_id) < LOW_WATER:
                del self._blocked[stream_id]
                producer = stream._producer
                stream._producer_paused = False
                if producer is not None:
                    producer.resumeProducing()

    def abort(self) -> None:
        """
        Drop the transport at once.
        """
        self._abort()

    # -- internals ---------------------------------------------------------------------------

    def _lose_transport(self) -> None:
        """
        Close the transport after what is written. The link stops being its producer first:
        a TLS transport does not start its close (close_notify) while a producer is
        registered, so the close would wait for the abort timer, and the peer would see a
        connection lost "in a non-clean fashion" instead of a clean close.
        """
        transport = self.transport
        if transport is None:
            return
        try:
            transport.unregisterProducer()  # type: ignore[attr-defined]
        except Exception:
            pass
        transport.loseConnection()

    def _abort(self) -> None:
        self._abort_call = None
        transport = self.transport
        if transport is not None and not self._lost:
            transport.abortConnection()  # type: ignore[attr-defined]

    def _dispatch(self, events: list[Event]) -> None:
        streams = self.streams
        for event in events:
            kind = type(event)
            if kind is DataReceived:
                stream = streams.get(event.stream_id)  # type: ignore[attr-defined]
                if stream is not None:
                    stream._data_received(event.data)  # type: ignore[attr-defined]
                else:
                    self.mux.consumed(event.stream_id, len(event.data))  # type: ignore[attr-defined]
            elif kind is StreamOpened:
                assert isinstance(event, StreamOpened)
                stream = Stream(self, event.stream_id, None)
                streams[event.stream_id] = stream
                self.streamOpened(stream, event.metadata)
            elif kind is StreamEnded:
                stream = streams.get(event.stream_id)  # type: ignore[attr-defined]
                if stream is not None:
                    stream._remote_end()
            elif kind is StreamReset:
                assert isinstance(event, StreamReset)
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream._reset(event.code, "by the peer" if event.remote else "")
            elif kind is ControlReceived:
                assert isinstance(event, ControlReceived)
                try:
                    self.controlReceived(event.payload)
                except Exception:
                    # A bug in a handler ends this link cleanly, never half-alive; the rest
                    # of this input is moot (the link's streams are reset by the GOAWAY).
                    _log.failure("error handling a control message from {peer}", peer=self.peer)
                    self.terminated = (ErrorCode.INTERNAL_ERROR, "internal error", False)
                    self._dispatch(self.mux.go_away(ErrorCode.INTERNAL_ERROR, "internal error"))
                    return
            elif kind is PingAcknowledged:
                self._probe_failed = False
                if self._probe_waiters:
                    self._probe_done(True)
            elif kind is HelloReceived:
                self.linkReady()
            elif kind is GoAwayReceived:
                assert isinstance(event, GoAwayReceived)
                self.goAwayReceived(event.code, event.message)
            elif kind is LinkTerminated:
                assert isinstance(event, LinkTerminated)
                self.terminated = (event.code, event.message, event.remote)
                side = "peer" if event.remote else "this side"
                _log.info(
                    "link ended by {side}: {code} {message}",
                    side=side,
                    code=describe(event.code),
                    message=event.message,
                )

    def _forget(self, stream: Stream) -> None:
        if self.streams.pop(stream.stream_id, None) is not None:
            self._blocked.pop(stream.stream_id, None)
            self.streamForgotten()

    def _schedule_keepalive(self) -> None:
        delay = min(1.0, self.keepalive_interval)
        self._keepalive = self.reactor.callLater(delay, self._keepalive_tick)

    def _keepalive_tick(self) -> None:
        self._keepalive = None
        if self.transport is None or self.mux.closed:
            return
        now = self.reactor.seconds()
        silent = now - self._last_received
        if silent >= self.keepalive_timeout:
            _log.warn("link silent for {silent:.1f}s, declaring it dead", silent=silent)
            self.terminated = (ErrorCode.TIMEOUT, "keepalive timeout", False)
            self._dispatch(self.mux.go_away(ErrorCode.TIMEOUT, "keepalive timeout"))
            self._abort()
            return
        if silent >= self.keepalive_interval and now - self._last_ping >= self.keepalive_interval:
            self._last_ping = now
            self.mux.ping()
            self.flush()
        self._schedule_keepalive()

    def _cancel_timers(self) -> None:
        for call in (self._keepalive, self._abort_call, self._flush_call):
            if call is not None and call.active():
                call.cancel()
        self._keepalive = None
        self._abort_call = None
        self._flush_call = None
