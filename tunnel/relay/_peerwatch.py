"""
Noticing public clients that went away while their connection is paused.

A public transport is paused when the stream it feeds has no credit (the target does not
read). A paused transport reads nothing, so the reactor never sees the client's FIN or RST
behind the data it has not read: without a check, a client that closed would hold its
descriptor and a slot of its tunnel's connection limit until the target reads again.

`PausedWatch` looks at every paused public socket on one timer (every
`PAUSED_CHECK_INTERVAL` seconds, only while some are paused), with ``TCP_INFO``, whose
``tcpi_state`` shows the peer's FIN even behind unread data, and ``SO_ERROR``:

- a reset (or a keepalive that timed out) ends the connection at once;
- a FIN on a TLS connection ends it at once: a TLS client that closes has finished;
- a FIN on a raw TCP connection may be a legitimate half-close (``nc -N``, an upload then
  a wait for the answer), so it is kept while the target catches up: only if the
  connection is still paused `HALF_CLOSED_PAUSED_LIMIT` seconds after the FIN was first
  seen does it end. Resuming forgets the FIN (the transport then reads it as usual).

Where ``TCP_INFO`` is missing (not Linux) only a pending ``SO_ERROR`` (a reset) is seen.

`set_keepalive` turns on TCP keepalive for public sockets, for a client that vanished
without a FIN or RST: probes after `KEEPALIVE_IDLE` s of silence, every `KEEPALIVE_INTERVAL`
s, `KEEPALIVE_COUNT` of them; and ``TCP_USER_TIMEOUT`` (`USER_TIMEOUT` s), which bounds data
left unacknowledged by a client that is gone. A connection ended that way is seen by the
reactor if it is reading, by `PausedWatch` if it is paused.
"""

from __future__ import annotations

import socket
from typing import Any, Protocol

from twisted.protocols.tls import TLSMemoryBIOProtocol

__all__ = [
    "HALF_CLOSED_PAUSED_LIMIT",
    "PAUSED_CHECK_INTERVAL",
    "PausedWatch",
    "PeerState",
    "peer_state",
    "set_keepalive",
    "socket_of",
]

#: Seconds between checks of paused public sockets.
PAUSED_CHECK_INTERVAL = 1.0
#: Seconds a raw TCP connection may stay paused after its client's FIN was seen.
HALF_CLOSED_PAUSED_LIMIT = 10.0

#: TCP keepalive of public sockets: idle seconds before the first probe, seconds between
#: probes, probes unanswered before the connection is dropped (about 2 minutes in all).
KEEPALIVE_IDLE = 60
KEEPALIVE_INTERVAL = 10
KEEPALIVE_COUNT = 6
#: Seconds sent data may stay unacknowledged before the connection is dropped.
USER_TIMEOUT = 120

# Linux tcpi_state values (include/net/tcp_states.h).
_TIME_WAIT, _CLOSE, _CLOSE_WAIT, _LAST_ACK, _CLOSING = 6, 7, 8, 9, 11
_PEER_FINISHED = frozenset({_TIME_WAIT, _CLOSE_WAIT, _LAST_ACK, _CLOSING})
_TCP_INFO: int | None = getattr(socket, "TCP_INFO", None)


class PeerState:
    """What a socket says about its peer."""

    OPEN = "open"
    #: The peer sent a FIN (which may sit behind data not read yet).
    FINISHED = "finished"
    #: The connection was reset, or failed (keepalive, user timeout).
    RESET = "reset"
    #: The socket cannot tell.
    UNKNOWN = "unknown"


def socket_of(transport: Any) -> socket.socket | None:
    """
    The TCP socket under a public transport: a TCP transport's handle, or the handle of the
    TCP transport a TLS layer wraps (the TLS layer's own handle is its OpenSSL connection).
    """
    if isinstance(transport, TLSMemoryBIOProtocol):
        transport = transport.transport
    get = getattr(transport, "getHandle", None)
    if get is None:
        return None
    try:
        handle = get()
    except Exception:
        return None
    return handle if isinstance(handle, socket.socket) else None


def peer_state(sock: socket.socket | None) -> str:
    """
    A `PeerState` of `sock`. Reading a pending ``SO_ERROR`` clears it: call this only when
    a reset would end the connection anyway.
    """
    if sock is None:
        return PeerState.UNKNOWN
    try:
        if sock.fileno() < 0:
            return PeerState.UNKNOWN
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            return PeerState.RESET
        if _TCP_INFO is None:
            return PeerState.UNKNOWN
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 8)
    except OSError:
        return PeerState.UNKNOWN
    if not info:
        return PeerState.UNKNOWN
    state = info[0]
    if state == _CLOSE:
        return PeerState.RESET
    if state in _PEER_FINISHED:
        return PeerState.FINISHED
    return PeerState.OPEN


def set_keepalive(sock: socket.socket | None) -> None:
    """
    Turn on TCP keepalive (and the user timeout) of a public socket, where the system has
    the options; errors are ignored (the socket may already be gone).
    """
    if sock is None:
        return
    options = [
        (socket.SOL_SOCKET, getattr(socket, "SO_KEEPALIVE", None), 1),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPIDLE", None), KEEPALIVE_IDLE),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", None), KEEPALIVE_INTERVAL),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", None), KEEPALIVE_COUNT),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_USER_TIMEOUT", None), USER_TIMEOUT * 1000),
    ]
    for level, name, value in options:
        if name is None:
            continue
        try:
            sock.setsockopt(level, name, value)
        except OSError:
            pass


class Watched(Protocol):
    """A paused public connection, as `PausedWatch` sees it."""

    def peer_socket(self) -> socket.socket | None:
        """Its TCP socket, if it has one."""

    @property
    def may_half_close(self) -> bool:
        """Whether a FIN from the client may be a half-close (raw TCP), not an end (TLS)."""

    def peer_gone(self, why: str) -> None:
        """End the connection (and reset its stream): the client is gone."""


class PausedWatch:
    """
    Checks every paused public connection on one timer, ending those whose client is gone
    (the rules are in the module's docstring).
    """

    def __init__(
        self,
        reactor: Any,
        interval: float = PAUSED_CHECK_INTERVAL,
        half_closed_limit: float = HALF_CLOSED_PAUSED_LIMIT,
        state_of: Any = peer_state,
    ) -> None:
        self.reactor = reactor
        self.interval = interval
        self.half_closed_limit = half_closed_limit
        self._state_of = state_of
        #: Paused connection -> when its client's FIN was first seen (None: not yet).
        self._paused: dict[Watched, float | None] = {}
        self._timer: Any = None
        #: Connections ended because their client was gone, since start.
        self.ended = 0

    def __len__(self) -> int:
        return len(self._paused)

    def add(self, connection: Watched) -> None:
        """`connection` was paused."""
        self._paused.setdefault(connection, None)
        if self._timer is None:
            self._timer = self.reactor.callLater(self.interval, self._check)

    def discard(self, connection: Watched) -> None:
        """`connection` was resumed or ended."""
        self._paused.pop(connection, None)
        if not self._paused and self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        now = self.reactor.seconds()
        gone: list[tuple[Watched, str]] = []
        for connection, finished_at in list(self._paused.items()):
            state = self._state_of(connection.peer_socket())
            if state == PeerState.RESET:
                gone.append((connection, "reset by the client"))
            elif state == PeerState.FINISHED:
                if not connection.may_half_close:
                    gone.append((connection, "closed by the client"))
                elif finished_at is None:
                    self._paused[connection] = now
                elif now - finished_at >= self.half_closed_limit:
                    gone.append((connection, "half-closed by the client and paused too long"))
        for connection, why in gone:
            self._paused.pop(connection, None)
            self.ended += 1
            connection.peer_gone(why)
        if self._paused and self._timer is None:
            self._timer = self.reactor.callLater(self.interval, self._check)

    def stop(self) -> None:
        """Forget every connection and cancel the timer."""
        self._paused.clear()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
