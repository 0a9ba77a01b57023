"""
Error codes and exceptions of the link protocol.

Two kinds of failure are kept apart, as h11 does:

- `ProtocolError`: the *peer* sent something the protocol does not allow. It carries the
  `ErrorCode` that goes into the GOAWAY frame that ends the link.
- `LocalProtocolError`: *this* side misused the API (wrote to a stream it had closed, opened a
  stream before the handshake, ...). Nothing is sent; the caller has a bug or lost a race.
"""

from __future__ import annotations

import enum

__all__ = [
    "ErrorCode",
    "LocalProtocolError",
    "ProtocolError",
    "StreamLimitError",
]


class ErrorCode(enum.IntEnum):
    """
    The 32-bit codes carried by RESET and GOAWAY frames (see docs/protocol.md, "Error codes").

    Unknown codes received from a peer are kept as plain integers, never rejected.
    """

    #: Graceful: a GOAWAY announcing a drain, a RESET of a stream nobody wants any more.
    NO_ERROR = 0x0
    #: The peer broke a rule of the protocol that has no more specific code.
    PROTOCOL_ERROR = 0x1
    #: This side failed in a way that is not the peer's fault.
    INTERNAL_ERROR = 0x2
    #: The peer sent more DATA than the stream's window allowed, or overflowed a window.
    FLOW_CONTROL_ERROR = 0x3
    #: A frame arrived for a stream in a state that does not accept it.
    STREAM_CLOSED = 0x4
    #: A frame was larger than the receiver's MAX_FRAME_SIZE, or malformed in length.
    FRAME_SIZE_ERROR = 0x5
    #: The stream was refused before any processing; it may be retried.
    REFUSED_STREAM = 0x6
    #: The stream is no longer wanted (its public client or local server went away).
    CANCEL = 0x7
    #: The peer floods: pings or window updates it never reads, or rapid resets.
    ENHANCE_YOUR_CALM = 0x8
    #: The two sides share no protocol version.
    VERSION_UNSUPPORTED = 0x9
    #: The agent could not connect to the local target (refused, unreachable).
    CONNECT_FAILED = 0xA
    #: The agent's connection to the local target did not complete in time.
    CONNECT_TIMEOUT = 0xB
    #: The agent's token was refused.
    UNAUTHORIZED = 0xC
    #: The link was silent beyond the keepalive timeout.
    TIMEOUT = 0xD
    #: A stream or connection was idle beyond its idle timeout.
    IDLE_TIMEOUT = 0xE
    #: The relay is shutting down (drain over) or the tunnel was closed.
    SHUTDOWN = 0xF


def describe(code: int) -> str:
    """
    A readable name for an error code, including unknown ones.
    """
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"UNKNOWN_ERROR_{code:#x}"


class ProtocolError(Exception):
    """
    The peer violated the protocol; the link must end with a GOAWAY carrying `code`.
    """

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        #: What goes into the GOAWAY frame.
        self.code = code
        #: A human-readable reason, also sent as the GOAWAY's debug text.
        self.message = message


class LocalProtocolError(Exception):
    """
    This side used the API in a way the protocol state does not allow.
    """


class StreamLimitError(LocalProtocolError):
    """
    Opening a stream would exceed the number of concurrent streams the peer accepts.
    """
