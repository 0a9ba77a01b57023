"""
The link protocol, sans-IO: frames, the multiplexer, flow-control windows, control messages.

Nothing in this package imports Twisted or touches a socket; see docs/protocol.md.
"""

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
from tunnel.wire.mux import (
    LINK_ALPN,
    PROTOCOL_VERSION,
    LinkSettings,
    LinkState,
    Multiplexer,
    StreamState,
)

__all__ = [
    "LINK_ALPN",
    "PROTOCOL_VERSION",
    "ControlReceived",
    "DataReceived",
    "ErrorCode",
    "Event",
    "GoAwayReceived",
    "HelloReceived",
    "LinkSettings",
    "LinkState",
    "LinkTerminated",
    "LocalProtocolError",
    "Multiplexer",
    "PingAcknowledged",
    "ProtocolError",
    "StreamEnded",
    "StreamLimitError",
    "StreamOpened",
    "StreamReset",
    "StreamState",
    "WindowUpdated",
]
