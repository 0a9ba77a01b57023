"""
Events the multiplexer reports from `Multiplexer.receive_data`.

Each event is a frozen dataclass: a fact about what the peer did, in the order it happened.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ControlReceived",
    "DataReceived",
    "Event",
    "GoAwayReceived",
    "HelloReceived",
    "LinkTerminated",
    "PingAcknowledged",
    "StreamEnded",
    "StreamOpened",
    "StreamReset",
    "WindowUpdated",
]


@dataclass(frozen=True, slots=True)
class Event:
    """
    Base class of every multiplexer event.
    """


@dataclass(frozen=True, slots=True)
class HelloReceived(Event):
    """
    The peer's HELLO arrived and a version was agreed; streams may now be opened.
    """

    #: The protocol version both sides speak from now on.
    version: int
    #: The peer's settings, unknown identifiers included.
    settings: dict[int, int]


@dataclass(frozen=True, slots=True)
class StreamOpened(Event):
    """
    The peer opened a stream.
    """

    #: The new stream's identifier.
    stream_id: int
    #: The opaque metadata of the OPEN frame (the control layer decodes it).
    metadata: bytes


@dataclass(frozen=True, slots=True)
class DataReceived(Event):
    """
    Data arrived on a stream. It counts against the stream's receive window until the
    application reports it consumed with `Multiplexer.consumed`.
    """

    #: The stream the data belongs to.
    stream_id: int
    #: The octets, never empty.
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamEnded(Event):
    """
    The peer half-closed a stream: it will send no more data on it.
    """

    #: The stream that was half-closed.
    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset(Event):
    """
    A stream was aborted. Data not yet delivered is lost; the stream is gone.
    """

    #: The stream that was aborted.
    stream_id: int
    #: The error code (an `ErrorCode` value, or an unknown integer from the peer).
    code: int
    #: True when the peer sent the RESET; False when this side refused or ended the stream
    #: itself (a stream over the limit, a stream cut off by a GOAWAY).
    remote: bool = True


@dataclass(frozen=True, slots=True)
class WindowUpdated(Event):
    """
    The peer granted credit on a stream; buffered data may now be sent.
    """

    #: The stream that received credit.
    stream_id: int
    #: The number of octets granted.
    increment: int


@dataclass(frozen=True, slots=True)
class PingAcknowledged(Event):
    """
    The peer echoed one of our pings.
    """

    #: The round-trip time of that ping, in seconds.
    rtt: float


@dataclass(frozen=True, slots=True)
class ControlReceived(Event):
    """
    A CONTROL frame arrived (tunnel requests, grants and the like; see `tunnel.wire.control`).
    """

    #: The frame's payload.
    payload: bytes


@dataclass(frozen=True, slots=True)
class GoAwayReceived(Event):
    """
    The peer will accept no new streams. With `code == NO_ERROR` it is draining: streams up to
    `last_stream_id` go on. Otherwise a `LinkTerminated` follows.
    """

    #: The last stream of ours that the peer has processed or will process.
    last_stream_id: int
    #: Why (an `ErrorCode` value or an unknown integer).
    code: int
    #: The peer's debug text.
    message: str


@dataclass(frozen=True, slots=True)
class LinkTerminated(Event):
    """
    The link is over: no further frames are processed in either direction. Every stream
    still open has been reset (each has its own `StreamReset` before this event).
    """

    #: The error code that ended the link.
    code: int
    #: A human-readable reason.
    message: str
    #: True when the peer ended the link (its GOAWAY), False when this side did.
    remote: bool
