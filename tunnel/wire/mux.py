"""
The multiplexer: a sans-IO state machine for one link.

Bytes from the peer go into `Multiplexer.receive_data`, which returns `tunnel.wire.events`;
bytes for the peer come out of `Multiplexer.data_to_send`. Nothing here reads a socket, starts
a timer or imports Twisted; time comes from the `clock` callable given at construction.

Streams follow the transition table `STREAM_TRANSITIONS`. An input that is not in the table is
a `LocalProtocolError` when this side made it, and a `ProtocolError` when the peer did; a
`ProtocolError` ends the link with a GOAWAY carrying its code.

Sending is pull-based so that the link is shared fairly: `send` only queues data on its
stream; `data_to_send` takes one frame at a time from each stream that has data and credit,
in round-robin order, so a bulk transfer delays a small write on another stream by at most
one frame per busy stream. Control frames (window updates, pings, resets) go first.

Every non-DATA frame queued for the peer counts against one bound, `max_control_backlog`:
DATA is bounded by the windows, everything else by it, so a peer that never reads cannot
make this side buffer without limit.

The rapid-reset bound (`LinkSettings.reset_rate`/`reset_burst`) is spent by what a peer
does with the streams *it* opens, and differs by side because only the relay opens streams
in practice (one per public connection; agents open none, and the relay refuses theirs):

- On the accepting side (``client=False``, the relay) every RESET received on a live
  stream the peer opened, and every peer OPEN refused (past MAX_STREAMS, after a GOAWAY),
  spends a token: it protects the relay from an agent that opens and resets streams in a
  loop, making the relay do work for free.
- On the dialling side (``client=True``, the agent) the peer is the relay it dialled and
  verified, which opens streams and resets them *on behalf of public clients*: a client's
  TCP reset reaches the agent as a RESET of a relay-opened stream. Such RESETs spend
  nothing here, so that no public client can make the agent end its link (and every
  tunnel on it); the relay bounds clients' resets per source address instead. Refused
  OPENs still spend tokens: a conforming opener is never refused for MAX_STREAMS (its
  count is never lower than ours, protocol.md section 5.4), and after our GOAWAY only the
  OPENs already in flight are refused, so only a relay that breaks the protocol spends
  them, whatever its clients do.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from tunnel.wire import frames as _f
from tunnel.wire.errors import ErrorCode, LocalProtocolError, ProtocolError, StreamLimitError
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
from tunnel.wire.windows import ReceiveWindow

__all__ = [
    "LINK_ALPN",
    "PROTOCOL_VERSION",
    "STREAM_TRANSITIONS",
    "LinkSettings",
    "LinkState",
    "Multiplexer",
    "StreamInput",
    "StreamState",
]

#: The one protocol version this implementation speaks.
PROTOCOL_VERSION = 1
#: The ALPN protocol id of a link (how the relay tells an agent from a browser).
LINK_ALPN = b"tunnel/1"
_MIN_VERSION = 1
_MAX_WINDOW = (1 << 31) - 1
_MAX_OUTSTANDING_PINGS = 16
#: What a gated peer may send before it is accepted.
_UNACCEPTED_TYPES = frozenset(
    {_f.FrameType.HELLO, _f.FrameType.PING, _f.FrameType.GOAWAY, _f.FrameType.CONTROL}
)


@dataclass(frozen=True, slots=True)
class LinkSettings:
    """
    This side's limits. The first three are advertised to the peer in HELLO; the rest are
    enforced locally.
    """

    #: The largest frame payload we accept (advertised as MAX_FRAME_SIZE).
    max_frame_size: int = _f.DEFAULT_MAX_FRAME_SIZE
    #: How many streams the peer may have open, that it opened, at once (MAX_STREAMS).
    max_streams: int = 1024
    #: The receive window each new stream starts with (INITIAL_WINDOW).
    initial_window: int = 256 * 1024
    #: The largest a stream's receive window may grow to by auto-tuning.
    max_window: int = 16 * 1024 * 1024
    #: The most that all streams' windows together may have grown above `initial_window`,
    #: so that a link holds at most max_streams * initial_window + this in receive buffers.
    max_link_growth: int = 64 * 1024 * 1024
    #: Octets of non-DATA frames (control messages, echoes, window updates, resets, OPENs:
    #: everything queued that DATA windows do not bound) that may wait unsent because the
    #: peer does not read; beyond it the link ends with ENHANCE_YOUR_CALM.
    max_control_backlog: int = 1 << 20
    #: On a gated multiplexer: octets the peer may send before the application accepts it
    #: (`Multiplexer.accept_peer`), in HELLO, PING, GOAWAY and CONTROL frames only.
    max_unaccepted_input: int = 4096
    #: The rapid-reset bound, per second: on the accepting side, RESETs received on live
    #: streams the peer opened plus peer OPENs refused; on the dialling side (an agent, whose
    #: peer resets streams on behalf of public clients), peer OPENs refused only. Past it
    #: the link ends with ENHANCE_YOUR_CALM.
    reset_rate: float = 200.0
    #: Burst of those allowed above the sustained rate.
    reset_burst: int = 2000

    def __post_init__(self) -> None:
        if not _f.MIN_MAX_FRAME_SIZE <= self.max_frame_size <= _f.MAX_FRAME_SIZE_LIMIT:
            raise ValueError(f"max_frame_size {self.max_frame_size} out of range")
        if not 1 <= self.max_streams <= 1 << 31:
            raise ValueError(f"max_streams {self.max_streams} out of range")
        if not 1024 <= self.initial_window <= _MAX_WINDOW:
            raise ValueError(f"initial_window {self.initial_window} out of range")
        if not self.initial_window <= self.max_window <= _MAX_WINDOW:
            raise ValueError(f"max_window {self.max_window} out of range")
        if self.max_unaccepted_input < 64:
            raise ValueError(f"max_unaccepted_input {self.max_unaccepted_input} too small")

    def advertised(self) -> dict[int, int]:
        """
        The settings as they go into HELLO.
        """
        return {
            _f.Setting.MAX_FRAME_SIZE: self.max_frame_size,
            _f.Setting.MAX_STREAMS: self.max_streams,
            _f.Setting.INITIAL_WINDOW: self.initial_window,
        }


class StreamState(enum.Enum):
    """
    The life of a stream. Each direction is closed independently (half-close).
    """

    # Members are unique singletons, so identity is equality: hashing them by identity (in
    # C) rather than by name (a Python call) keeps the transition lookups off the profile.
    __hash__ = object.__hash__

    OPEN = "open"
    #: We sent FIN (or queued it): we send no more data; the peer may.
    HALF_CLOSED_LOCAL = "half-closed (local)"
    #: The peer sent FIN: it sends no more data; we may.
    HALF_CLOSED_REMOTE = "half-closed (remote)"
    CLOSED = "closed"


class StreamInput(enum.Enum):
    """
    What can happen to a stream.
    """

    __hash__ = object.__hash__

    SEND_DATA = "send data"
    SEND_FIN = "send fin"
    SEND_RESET = "send reset"
    RECV_DATA = "receive data"
    RECV_FIN = "receive fin"
    RECV_RESET = "receive reset"


_S = StreamState
_I = StreamInput

#: (state, input) -> next state. Everything else is an error.
STREAM_TRANSITIONS: dict[tuple[StreamState, StreamInput], StreamState] = {
    (_S.OPEN, _I.SEND_DATA): _S.OPEN,
    (_S.OPEN, _I.RECV_DATA): _S.OPEN,
    (_S.OPEN, _I.SEND_FIN): _S.HALF_CLOSED_LOCAL,
    (_S.OPEN, _I.RECV_FIN): _S.HALF_CLOSED_REMOTE,
    (_S.HALF_CLOSED_LOCAL, _I.RECV_DATA): _S.HALF_CLOSED_LOCAL,
    (_S.HALF_CLOSED_LOCAL, _I.RECV_FIN): _S.CLOSED,
    (_S.HALF_CLOSED_REMOTE, _I.SEND_DATA): _S.HALF_CLOSED_REMOTE,
    (_S.HALF_CLOSED_REMOTE, _I.SEND_FIN): _S.CLOSED,
    (_S.OPEN, _I.SEND_RESET): _S.CLOSED,
    (_S.OPEN, _I.RECV_RESET): _S.CLOSED,
    (_S.HALF_CLOSED_LOCAL, _I.SEND_RESET): _S.CLOSED,
    (_S.HALF_CLOSED_LOCAL, _I.RECV_RESET): _S.CLOSED,
    (_S.HALF_CLOSED_REMOTE, _I.SEND_RESET): _S.CLOSED,
    (_S.HALF_CLOSED_REMOTE, _I.RECV_RESET): _S.CLOSED,
    # Our FIN may still be queued behind data when the peer's FIN closes the stream; a
    # reset then still aborts what is queued.
    (_S.CLOSED, _I.SEND_RESET): _S.CLOSED,
    (_S.CLOSED, _I.RECV_RESET): _S.CLOSED,
}

#: The states that sending (receiving) data leaves as they are: the common case, checked
#: without a call; every other transition goes through `_transition` and the table.
_SEND_DATA_KEEPS = frozenset(
    state for state in StreamState if STREAM_TRANSITIONS.get((state, _I.SEND_DATA)) is state
)
_RECV_DATA_KEEPS = frozenset(
    state for state in StreamState if STREAM_TRANSITIONS.get((state, _I.RECV_DATA)) is state
)


class LinkState(enum.Enum):
    """
    The life of the link.
    """

    #: Our HELLO is queued; the peer's has not arrived. No stream may be opened yet.
    AWAITING_HELLO = "awaiting hello"
    OPEN = "open"
    #: A graceful GOAWAY was sent or received: no new streams; existing ones go on.
    DRAINING = "draining"
    #: Over: an error, a fatal GOAWAY or the transport's loss.
    CLOSED = "closed"


class _Stream:
    """
    The multiplexer's record of one stream.
    """

    __slots__ = (
        "fin_queued",
        "id",
        "local",
        "pending",
        "pending_size",
        "recv",
        "scheduled",
        "send_window",
        "state",
    )

    def __init__(self, stream_id: int, local: bool, send_window: int, recv: ReceiveWindow):
        self.id = stream_id
        #: Opened by this side.
        self.local = local
        self.state = StreamState.OPEN
        #: Credit granted by the peer that we have not used.
        self.send_window = send_window
        self.recv = recv
        #: Data queued by `send`, not yet framed.
        self.pending: deque[memoryview] = deque()
        self.pending_size = 0
        #: A FIN is to follow the pending data.
        self.fin_queued = False
        #: The stream is in the round-robin queue.
        self.scheduled = False


def _transition(stream: _Stream, event: StreamInput, remote: bool) -> None:
    try:
        stream.state = STREAM_TRANSITIONS[stream.state, event]
    except KeyError:
        message = f"stream {stream.id}: {event.value} is not allowed in state {stream.state.value}"
        if remote:
            raise ProtocolError(ErrorCode.STREAM_CLOSED, message) from None
        raise LocalProtocolError(message) from None


class Multiplexer:
    """
    One end of a link: streams, windows, pings and the handshake.

    @param client: True on the side that dialled the link (the agent). Client-opened
        streams have odd identifiers, server-opened ones even identifiers.
    @param gated: the peer must be accepted by the application (`accept_peer`, after its
        first control message, such as the relay's check of an agent's token) before it may
        do more than say HELLO, PING, GOAWAY and CONTROL, in at most
        `LinkSettings.max_unaccepted_input` octets. While gated, input is processed up to
        each CONTROL frame and held there (`input_pending`) for the application to decide.
    """

    def __init__(
        self,
        *,
        client: bool,
        settings: LinkSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
        gated: bool = False,
    ) -> None:
        self.settings = settings or LinkSettings()
        self.client = client
        self._clock = clock
        self.state = LinkState.AWAITING_HELLO
        #: The agreed protocol version, once the peer's HELLO is in.
        self.version: int | None = None
        self._decoder = _f.FrameDecoder(self.settings.max_frame_size)
        self._streams: dict[int, _Stream] = {}
        self._ready: deque[_Stream] = deque()
        #: Non-DATA frames queued for the peer, and their octets: the backlog a peer that
        #: does not read can grow, bounded by `max_control_backlog`.
        self._control: list[bytes] = []
        self._control_size = 0
        self._gated = gated
        #: Octets received while gated, and frames decoded but held back for the
        #: application's decision on the peer.
        self._unaccepted_input = 0
        self._held: deque[_f.Frame] = deque()
        self._hello_written = False
        self._next_stream_id = 1 if client else 2
        self._last_peer_stream_id = 0
        self._peer_opened = 0
        self._local_opened = 0
        # Until the peer's HELLO: the protocol's defaults.
        self._peer_max_frame = _f.MIN_MAX_FRAME_SIZE
        self._peer_max_streams = 0
        self._peer_initial_window = 256 * 1024
        self._peer_draining = False
        self._local_goaway = False
        self._pings: dict[bytes, float] = {}
        self._ping_counter = 0
        #: Smoothed round-trip time from our pings, in seconds; None until measured.
        self.rtt: float | None = None
        self._reset_tokens = float(self.settings.reset_burst)
        self._reset_stamp = clock()
        #: How many peer streams were refused for exceeding MAX_STREAMS or a drain.
        self.refused_streams = 0
        #: How much the live streams' receive windows have grown above their initial size.
        self.window_growth = 0
        self._queue(_f.encode_hello(_MIN_VERSION, PROTOCOL_VERSION, self.settings.advertised()))

    # -- inspection ----------------------------------------------------------------------

    @property
    def stream_count(self) -> int:
        """
        The number of streams not yet fully closed.
        """
        return len(self._streams)

    def stream_ids(self) -> list[int]:
        """
        The identifiers of the streams not yet fully closed.
        """
        return list(self._streams)

    def is_open(self, stream_id: int) -> bool:
        """
        Whether `stream_id` is a live stream.
        """
        return stream_id in self._streams

    def pending(self, stream_id: int) -> int:
        """
        Octets queued by `send` on `stream_id` and not yet framed (0 for a gone stream).
        """
        stream = self._streams.get(stream_id)
        return stream.pending_size if stream is not None else 0

    def send_window(self, stream_id: int) -> int:
        """
        The credit the peer has granted on `stream_id` that we have not used.
        """
        stream = self._streams.get(stream_id)
        return stream.send_window if stream is not None else 0

    def receive_window(self, stream_id: int) -> ReceiveWindow | None:
        """
        The receive window of `stream_id`, for inspection; None for a gone stream.
        """
        stream = self._streams.get(stream_id)
        return stream.recv if stream is not None else None

    def stream_state(self, stream_id: int) -> StreamState:
        """
        The state of `stream_id`; CLOSED for a stream that is gone or never was.
        """
        stream = self._streams.get(stream_id)
        return stream.state if stream is not None else StreamState.CLOSED

    @property
    def closed(self) -> bool:
        """
        Whether the link is over.
        """
        return self.state is LinkState.CLOSED

    @property
    def control_backlog(self) -> int:
        """
        Octets of control frames waiting for `data_to_send`.
        """
        return self._control_size

    @property
    def backlog_exceeded(self) -> bool:
        """
        Whether the queued non-DATA frames are over `max_control_backlog` (see
        `check_backlog`).
        """
        return self._control_size > self.settings.max_control_backlog

    @property
    def gated(self) -> bool:
        """
        Whether the peer has yet to be accepted (`accept_peer`).
        """
        return self._gated

    @property
    def input_pending(self) -> bool:
        """
        Whether frames were held back at a CONTROL frame while gated: call `receive_data`
        (with b"" if nothing new arrived) once the application has decided.
        """
        return bool(self._held) and self.state is not LinkState.CLOSED

    @property
    def has_data_to_send(self) -> bool:
        """
        Whether `data_to_send` would return anything.
        """
        return bool(self._control) or bool(self._ready)

    @property
    def can_open_streams(self) -> bool:
        """
        Whether `open_stream` may be called now.
        """
        return (
            self.state is LinkState.OPEN
            and not self._peer_draining
            and self._local_opened < self._peer_max_streams
        )

    # -- local actions -------------------------------------------------------------------

    def accept_peer(self) -> None:
        """
        The application accepted the peer (its first control message): it may now use
        every frame type, without the gate's octet limit. Held input is processed by the
        next `receive_data`.
        """
        self._gated = False

    def check_backlog(self) -> list[Event]:
        """
        End the link with ENHANCE_YOUR_CALM if the queued non-DATA frames exceed
        `max_control_backlog`. `receive_data` checks after processing input; call this after
        queuing frames on this side's initiative (control messages, resets, OPENs), since
        a peer that does not read makes them pile up too. The backlog is dropped; the
        GOAWAY is queued alone.

        @return: the events this causes (stream resets and `LinkTerminated`), or none.
        """
        if self.state is LinkState.CLOSED or not self.backlog_exceeded:
            return []
        events: list[Event] = []
        self._terminate(
            ErrorCode.ENHANCE_YOUR_CALM,
            self._backlog_message(),
            remote=False,
            events=events,
            send_goaway=True,
        )
        return events

    def _backlog_message(self) -> str:
        return f"{self._control_size} octets of frames to the peer are not being read"

    def open_stream(self, metadata: bytes = b"") -> int:
        """
        Open a stream and queue its OPEN frame.

        @return: the new stream's identifier.
        @raise StreamLimitError: the peer's MAX_STREAMS would be exceeded.
        @raise LocalProtocolError: the handshake is not complete, the link is draining or
            closed, or the metadata does not fit a frame.
        """
        if self.state is not LinkState.OPEN or self._peer_draining:
            raise LocalProtocolError(f"cannot open a stream on a link that is {self.state.value}")
        if self._local_opened >= self._peer_max_streams:
            raise StreamLimitError(f"the peer accepts at most {self._peer_max_streams} streams")
        if len(metadata) > self._peer_max_frame:
            raise LocalProtocolError("stream metadata does not fit one frame")
        stream_id = self._next_stream_id
        if stream_id > 0xFFFFFFFF:
            raise LocalProtocolError("stream identifiers exhausted")
        self._next_stream_id += 2
        self._streams[stream_id] = _Stream(
            stream_id,
            True,
            self._peer_initial_window,
            ReceiveWindow(self.settings.initial_window, self.settings.max_window, self._clock()),
        )
        self._local_opened += 1
        self._queue(_f.encode_frame(_f.FrameType.OPEN, 0, stream_id, metadata))
        return stream_id

    def send(self, stream_id: int, data: bytes) -> int:
        """
        Queue `data` on a stream. It is framed by `data_to_send` as credit allows.

        @return: the octets now queued on the stream and not yet framed (`pending`).
        @raise LocalProtocolError: the stream is gone or this side already ended it.
        """
        stream = self._streams.get(stream_id)
        if stream is None or self.state is LinkState.CLOSED:
            raise LocalProtocolError(f"stream {stream_id} is closed")
        if stream.state not in _SEND_DATA_KEEPS:
            _transition(stream, StreamInput.SEND_DATA, remote=False)
        if not data:
            return stream.pending_size
        stream.pending.append(memoryview(data))
        stream.pending_size += len(data)
        if not stream.scheduled and stream.send_window > 0:
            stream.scheduled = True
            self._ready.append(stream)
        return stream.pending_size

    def end_stream(self, stream_id: int) -> None:
        """
        Half-close our direction of a stream: a FIN follows the data already queued.

        @raise LocalProtocolError: the stream is gone or already ended by us.
        """
        # `_stream_for_local` and `_transition`, inline on the allowed path: this runs for
        # every stream this side ends.
        stream = self._streams.get(stream_id)
        if stream is None or self.state is LinkState.CLOSED:
            raise LocalProtocolError(f"stream {stream_id} is closed")
        try:
            stream.state = STREAM_TRANSITIONS[stream.state, StreamInput.SEND_FIN]
        except KeyError:
            _transition(stream, StreamInput.SEND_FIN, remote=False)
        stream.fin_queued = True
        if not stream.scheduled:
            stream.scheduled = True
            self._ready.append(stream)

    def reset_stream(self, stream_id: int, code: int = ErrorCode.CANCEL) -> None:
        """
        Abort a stream in both directions; queued data is dropped. Resetting a stream that is
        already gone does nothing, so both sides may race to reset.
        """
        stream = self._streams.get(stream_id)
        if stream is None or self.state is LinkState.CLOSED:
            return
        _transition(stream, StreamInput.SEND_RESET, remote=False)
        self._drop(stream)
        self._queue(_f.encode_reset(stream_id, code))

    def consumed(self, stream_id: int, length: int) -> None:
        """
        Report that the application consumed `length` octets of a stream's received data:
        their credit may go back to the peer.

        @raise LocalProtocolError: more was consumed than had arrived.
        """
        stream = self._streams.get(stream_id)
        if stream is None or length <= 0:
            return
        final = stream.state in (StreamState.HALF_CLOSED_REMOTE, StreamState.CLOSED)
        recv = stream.recv
        before = recv.size
        try:
            increment = recv.consumed(
                length,
                self._clock(),
                self.rtt,
                final,
                self.settings.max_link_growth - self.window_growth,
            )
        except ValueError as e:
            raise LocalProtocolError(str(e)) from None
        self.window_growth += recv.size - before
        if increment:
            self._queue(_f.encode_window(stream_id, increment))

    def ping(self) -> bytes:
        """
        Queue a PING; its echo yields a `PingAcknowledged` with the round-trip time.

        @return: the ping's 8 opaque octets.
        """
        self._ping_counter += 1
        opaque = self._ping_counter.to_bytes(8, "big")
        if len(self._pings) >= _MAX_OUTSTANDING_PINGS:
            del self._pings[next(iter(self._pings))]
        self._pings[opaque] = self._clock()
        self._queue(_f.encode_ping(opaque))
        return opaque

    def send_control(self, payload: bytes) -> None:
        """
        Queue a CONTROL frame.

        @raise LocalProtocolError: the link is closed or the payload does not fit a frame.
        """
        if self.state is LinkState.CLOSED:
            raise LocalProtocolError("the link is closed")
        if len(payload) > self._peer_max_frame:
            raise LocalProtocolError("control message does not fit one frame")
        self._queue(_f.encode_frame(_f.FrameType.CONTROL, 0, 0, payload))

    def go_away(self, code: int = ErrorCode.NO_ERROR, message: str = "") -> list[Event]:
        """
        Queue a GOAWAY. With NO_ERROR the link drains: no new streams either way, existing
        ones go on. With any other code the link ends now: every stream is reset.

        @return: the events this causes (stream resets and `LinkTerminated` for an error).
        """
        if self.state is LinkState.CLOSED:
            return []
        if code == ErrorCode.NO_ERROR:
            if not self._local_goaway:
                self._local_goaway = True
                self._queue(_f.encode_goaway(self._last_peer_stream_id, code, message))
            if self.state is LinkState.OPEN:
                self.state = LinkState.DRAINING
            return []
        events: list[Event] = []
        self._terminate(code, message, remote=False, events=events, send_goaway=True)
        return events

    def connection_lost(self, message: str = "connection lost", clean: bool = False) -> list[Event]:
        """
        The transport is gone: reset every stream and end the link without sending anything.

        @param clean: the transport closed cleanly (the peer closed it on purpose): the link
            ends with NO_ERROR rather than CANCEL.
        """
        if self.state is LinkState.CLOSED:
            return []
        events: list[Event] = []
        code = ErrorCode.NO_ERROR if clean else ErrorCode.CANCEL
        self._terminate(code, message, remote=True, events=events, send_goaway=False)
        return events

    # -- output --------------------------------------------------------------------------

    def data_to_send(self, budget: int = 1 << 20) -> bytes:
        """
        Frames to write to the transport: all queued control frames, then DATA frames, one
        per stream in turn, until about `budget` octets of DATA have been taken.
        """
        out = self._control
        self._control = []
        self._control_size = 0
        self._hello_written = True
        ready = self._ready
        if ready and self.state is not LinkState.CLOSED:
            max_frame = self._peer_max_frame
            header = _f._HEADER.pack
            data_type = _f.FrameType.DATA
            taken = 0
            while ready and taken < budget:
                stream = ready.popleft()
                stream.scheduled = False
                size = stream.pending_size
                length = min(size, stream.send_window, max_frame)
                fin = stream.fin_queued and length == size
                if length == 0 and not fin:
                    continue
                if length:
                    pending = stream.pending
                    first = pending[0]
                    if len(first) == length:
                        pending.popleft()
                        chunk: memoryview | bytes = first
                    elif len(first) > length:
                        chunk = first[:length]
                        pending[0] = first[length:]
                    else:
                        parts = []
                        need = length
                        while need:
                            piece = pending[0]
                            if len(piece) <= need:
                                pending.popleft()
                                parts.append(piece)
                                need -= len(piece)
                            else:
                                parts.append(piece[:need])
                                pending[0] = piece[need:]
                                need = 0
                        chunk = b"".join(parts)
                    stream.pending_size = size - length
                    stream.send_window -= length
                out.append(header((length << 8) | data_type, _f.FLAG_FIN if fin else 0, stream.id))
                out.append(chunk if length else b"")  # type: ignore[arg-type]
                taken += length + _f.HEADER_SIZE
                if fin:
                    stream.fin_queued = False
                    if stream.state is StreamState.CLOSED:
                        self._drop(stream)
                elif stream.pending_size and stream.send_window > 0:
                    stream.scheduled = True
                    ready.append(stream)
        if not out:
            return b""
        return b"".join(out)

    # -- input ---------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """
        Process octets from the peer.

        @return: what the peer did, in order. A protocol violation queues a GOAWAY with its
            code, resets every stream and ends with `LinkTerminated`; later input is ignored.
        """
        if self.state is LinkState.CLOSED:
            return []
        events: list[Event] = []
        # `closed`, `backlog_exceeded` and the decoder's `failed`, inline: this runs for
        # every read of the link.
        closed = LinkState.CLOSED
        try:
            decoder = self._decoder
            frames = decoder.feed(data) if data or not decoder.failed else []
            if self._gated or self._held:
                self._held.extend(frames)
                self._receive_held(events)
            else:
                data_type = _f.FrameType.DATA
                for frame in frames:
                    # `_handle`'s dispatch of DATA (after the HELLO), inline: the
                    # commonest frame, once or more per read.
                    if frame.type == data_type and self.version is not None:
                        self._on_data(frame, events)
                    else:
                        self._handle(frame, events)
                    if self.state is closed:
                        break
                if decoder.failed and self.state is not closed:
                    decoder.feed(b"")
            if self._control_size > self.settings.max_control_backlog and self.state is not closed:
                raise ProtocolError(ErrorCode.ENHANCE_YOUR_CALM, self._backlog_message())
        except ProtocolError as e:
            self._terminate(e.code, e.message, remote=False, events=events, send_goaway=True)
        return events

    def _receive_held(self, events: list[Event]) -> None:
        """
        Process held frames; while gated, admit only the gate's frame types and octets, and
        stop after each CONTROL frame so the application can accept the peer first.
        """
        held = self._held
        limit = self.settings.max_unaccepted_input
        while held:
            frame = held.popleft()
            if self._gated:
                if frame.type not in _UNACCEPTED_TYPES:
                    raise ProtocolError(
                        ErrorCode.PROTOCOL_ERROR,
                        f"frame type {frame.type} before the peer was accepted",
                    )
                self._unaccepted_input += _f.HEADER_SIZE + len(frame.payload)
                if self._unaccepted_input > limit:
                    raise ProtocolError(
                        ErrorCode.ENHANCE_YOUR_CALM,
                        f"more than {limit} octets before the peer was accepted",
                    )
            self._handle(frame, events)
            if self.closed or (self._gated and frame.type == _f.FrameType.CONTROL):
                return
        decoder = self._decoder
        if decoder.failed:
            decoder.feed(b"")
        if self._gated and self._unaccepted_input + decoder.pending_size > limit:
            # Refused from the header on: a large frame is not buffered to be counted.
            raise ProtocolError(
                ErrorCode.ENHANCE_YOUR_CALM,
                f"more than {limit} octets before the peer was accepted",
            )

    def _handle(self, frame: _f.Frame, events: list[Event]) -> None:
        kind = frame.type
        if self.version is None and kind != _f.FrameType.HELLO:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "the first frame must be HELLO")
        if kind == _f.FrameType.DATA:
            self._on_data(frame, events)
        elif kind == _f.FrameType.WINDOW:
            self._on_window(frame, events)
        elif kind == _f.FrameType.OPEN:
            self._on_open(frame, events)
        elif kind == _f.FrameType.RESET:
            self._on_reset(frame, events)
        elif kind == _f.FrameType.PING:
            self._on_ping(frame, events)
        elif kind == _f.FrameType.CONTROL:
            self._require_link_frame(frame)
            events.append(ControlReceived(frame.payload))
        elif kind == _f.FrameType.GOAWAY:
            self._on_goaway(frame, events)
        elif kind == _f.FrameType.HELLO:
            self._on_hello(frame, events)
        # Unknown frame types are ignored, so that later versions can add them.

    def _on_hello(self, frame: _f.Frame, events: list[Event]) -> None:
        self._require_link_frame(frame)
        if self.version is not None:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "a second HELLO")
        low, high, settings = _f.decode_hello(frame.payload)
        version = min(high, PROTOCOL_VERSION)
        if version < max(low, _MIN_VERSION):
            raise ProtocolError(
                ErrorCode.VERSION_UNSUPPORTED,
                f"peer speaks versions {low}-{high}, we speak {_MIN_VERSION}-{PROTOCOL_VERSION}",
            )
        max_frame = settings.get(_f.Setting.MAX_FRAME_SIZE, _f.DEFAULT_MAX_FRAME_SIZE)
        if not _f.MIN_MAX_FRAME_SIZE <= max_frame <= _f.MAX_FRAME_SIZE_LIMIT:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"MAX_FRAME_SIZE {max_frame} invalid")
        window = settings.get(_f.Setting.INITIAL_WINDOW, 256 * 1024)
        if not 0 < window <= _MAX_WINDOW:
            raise ProtocolError(ErrorCode.FLOW_CONTROL_ERROR, f"INITIAL_WINDOW {window} invalid")
        self.version = version
        self._peer_max_frame = max_frame
        self._peer_max_streams = settings.get(_f.Setting.MAX_STREAMS, 1024)
        self._peer_initial_window = window
        if self.state is LinkState.AWAITING_HELLO:
            self.state = LinkState.DRAINING if self._local_goaway else LinkState.OPEN
        events.append(HelloReceived(version, settings))

    def _on_data(self, frame: _f.Frame, events: list[Event]) -> None:
        stream = self._streams.get(frame.stream_id)
        if stream is None:
            self._check_past(frame, "DATA")
            return
        payload = frame.payload
        if stream.state not in _RECV_DATA_KEEPS:
            _transition(stream, StreamInput.RECV_DATA, remote=True)
        if payload:
            if not stream.recv.received(len(payload)):
                raise ProtocolError(
                    ErrorCode.FLOW_CONTROL_ERROR,
                    f"stream {stream.id}: {len(payload)} octets exceed the window of "
                    f"{stream.recv.available}",
                )
            events.append(DataReceived(stream.id, payload))
        if frame.flags & _f.FLAG_FIN:
            try:
                stream.state = STREAM_TRANSITIONS[stream.state, StreamInput.RECV_FIN]
            except KeyError:
                _transition(stream, StreamInput.RECV_FIN, remote=True)
            events.append(StreamEnded(stream.id))
            if stream.state is StreamState.CLOSED and not stream.fin_queued:
                self._drop(stream)

    def _on_window(self, frame: _f.Frame, events: list[Event]) -> None:
        increment = _f.parse_u32(frame.payload, "WINDOW")
        if frame.stream_id == 0 or increment == 0:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "WINDOW on stream 0 or of 0 octets")
        stream = self._streams.get(frame.stream_id)
        if stream is None:
            self._check_past(frame, "WINDOW")
            return
        window = stream.send_window + increment
        if window > _MAX_WINDOW:
            raise ProtocolError(
                ErrorCode.FLOW_CONTROL_ERROR, f"stream {stream.id}: window overflows 2^31-1"
            )
        stream.send_window = window
        if not stream.scheduled and (stream.pending_size or stream.fin_queued):
            stream.scheduled = True
            self._ready.append(stream)
        events.append(WindowUpdated(stream.id, increment))

    def _on_open(self, frame: _f.Frame, events: list[Event]) -> None:
        stream_id = frame.stream_id
        peer_parity = 0 if self.client else 1
        if stream_id == 0 or stream_id % 2 != peer_parity:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"OPEN with stream id {stream_id}")
        if stream_id <= self._last_peer_stream_id:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"OPEN reuses stream id {stream_id}")
        self._last_peer_stream_id = stream_id
        if (
            self._local_goaway
            or self._peer_draining
            or self._peer_opened >= self.settings.max_streams
        ):
            self.refused_streams += 1
            self._spend_reset_token()
            self._queue(_f.encode_reset(stream_id, ErrorCode.REFUSED_STREAM))
            return
        self._streams[stream_id] = _Stream(
            stream_id,
            False,
            self._peer_initial_window,
            ReceiveWindow(self.settings.initial_window, self.settings.max_window, self._clock()),
        )
        self._peer_opened += 1
        events.append(StreamOpened(stream_id, frame.payload))

    def _on_reset(self, frame: _f.Frame, events: list[Event]) -> None:
        code = _f.parse_u32(frame.payload, "RESET")
        if frame.stream_id == 0:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "RESET on stream 0")
        stream = self._streams.get(frame.stream_id)
        if stream is None:
            self._check_past(frame, "RESET")
            return
        _transition(stream, StreamInput.RECV_RESET, remote=True)
        self._drop(stream)
        events.append(StreamReset(stream.id, code, remote=True))
        # The dialling side's peer (the relay) resets the streams it opened when their public
        # clients do: that is the relay's to bound, per client, not a reason to end the link.
        if not stream.local and not self.client:
            self._spend_reset_token()

    def _on_ping(self, frame: _f.Frame, events: list[Event]) -> None:
        self._require_link_frame(frame)
        if len(frame.payload) != 8:
            raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "PING payload must be 8 octets")
        if frame.flags & _f.FLAG_ACK:
            sent = self._pings.pop(frame.payload, None)
            if sent is not None:
                sample = max(self._clock() - sent, 0.0)
                self.rtt = sample if self.rtt is None else 0.875 * self.rtt + 0.125 * sample
                events.append(PingAcknowledged(sample))
        else:
            self._queue(_f.encode_ping(frame.payload, ack=True))

    def _on_goaway(self, frame: _f.Frame, events: list[Event]) -> None:
        self._require_link_frame(frame)
        last_stream_id, code, message = _f.decode_goaway(frame.payload)
        self._peer_draining = True
        events.append(GoAwayReceived(last_stream_id, code, message))
        if code != ErrorCode.NO_ERROR:
            self._terminate(code, message, remote=True, events=events, send_goaway=False)
            return
        if self.state is LinkState.OPEN:
            self.state = LinkState.DRAINING
        for stream in list(self._streams.values()):
            if stream.local and stream.id > last_stream_id:
                self._drop(stream)
                events.append(StreamReset(stream.id, ErrorCode.REFUSED_STREAM, remote=False))

    # -- helpers -------------------------------------------------------------------------

    def _require_link_frame(self, frame: _f.Frame) -> None:
        if frame.stream_id != 0:
            raise ProtocolError(
                ErrorCode.PROTOCOL_ERROR, f"frame type {frame.type} on stream {frame.stream_id}"
            )

    def _check_past(self, frame: _f.Frame, what: str) -> None:
        """
        A frame for a stream that is not live is ignored when the stream existed (it was
        reset or closed while the frame was in flight), and an error when it never did.
        """
        stream_id = frame.stream_id
        if stream_id == 0:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"{what} on stream 0")
        mine = stream_id % 2 == (1 if self.client else 0)
        last = self._next_stream_id - 2 if mine else self._last_peer_stream_id
        if stream_id > last:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"{what} on idle stream {stream_id}")

    def _stream_for_local(self, stream_id: int) -> _Stream:
        stream = self._streams.get(stream_id)
        if stream is None or self.state is LinkState.CLOSED:
            raise LocalProtocolError(f"stream {stream_id} is closed")
        return stream

    def _drop(self, stream: _Stream) -> None:
        """
        Forget a stream that is fully closed or reset, with everything queued on it.
        """
        if self._streams.pop(stream.id, None) is None:
            return
        stream.state = StreamState.CLOSED
        self.window_growth -= stream.recv.size - self.settings.initial_window
        stream.pending.clear()
        stream.pending_size = 0
        stream.fin_queued = False
        if stream.local:
            self._local_opened -= 1
        else:
            self._peer_opened -= 1
        # A scheduled stream is skipped by data_to_send: it has nothing left to send.

    def _queue(self, frame: bytes) -> None:
        self._control.append(frame)
        self._control_size += len(frame)

    def _spend_reset_token(self) -> None:
        """
        Spend one token of the rapid-reset bound (see the module docstring for what spends
        one on each side).

        @raise ProtocolError: ENHANCE_YOUR_CALM, the bucket is empty.
        """
        now = self._clock()
        settings = self.settings
        self._reset_tokens = min(
            float(settings.reset_burst),
            self._reset_tokens + (now - self._reset_stamp) * settings.reset_rate,
        )
        self._reset_stamp = now
        self._reset_tokens -= 1.0
        if self._reset_tokens < 0:
            raise ProtocolError(
                ErrorCode.ENHANCE_YOUR_CALM, "streams are opened and reset faster than allowed"
            )

    def _terminate(
        self, code: int, message: str, *, remote: bool, events: list[Event], send_goaway: bool
    ) -> None:
        for stream in list(self._streams.values()):
            self._drop(stream)
            events.append(StreamReset(stream.id, code, remote=remote))
        self._ready.clear()
        self.state = LinkState.CLOSED
        if not send_goaway:
            # The transport is gone (or the peer ended the link): nothing more goes out.
            self._control = []
        elif code == ErrorCode.ENHANCE_YOUR_CALM:
            # The backlog is the problem: drop it, but our HELLO still goes first if it was
            # never written, so that the peer reads the GOAWAY's code rather than a
            # complaint about a missing HELLO.
            self._control = self._control[:1] if not self._hello_written else []
        # Otherwise what was queued before the end (such as a CONTROL message saying why)
        # goes out ahead of the GOAWAY.
        self._control_size = sum(len(frame) for frame in self._control)
        self._held.clear()
        if send_goaway:
            self._queue(_f.encode_goaway(self._last_peer_stream_id, code, message))
        events.append(LinkTerminated(code, message, remote))
