"""
Socket options of the relay's public connections, set once on the listening socket where
the system copies them to every accepted socket (Linux does, at accept).

A public connection needs TCP_NODELAY, and TCP keepalive with a user timeout (so that the
relay notices a client that is gone while its connection is paused or idle: see
`_peerwatch`). Set per connection that is seven system calls; set on the listening socket,
none. The relay's TLS port also accepts the agents' links, which are not public
connections: `not_public` takes the public keepalive and user timeout off a link's socket.
"""

from __future__ import annotations

import socket
import sys
from typing import Any

from twisted.internet import tcp

from tunnel.relay._peerwatch import set_keepalive

__all__ = ["INHERITED_OPTIONS", "not_public", "tuned_by_listener"]

#: Whether accepted TCP sockets inherit the listening socket's TCP_NODELAY and keepalive
#: options (Linux copies them at accept).
INHERITED_OPTIONS = sys.platform.startswith("linux")


def tuned_by_listener(transport: Any) -> bool:
    """
    Whether the socket of `transport` (a connection Twisted's TCP port accepted) already
    has TCP_NODELAY and the keepalive options, inherited from its listening socket, so that
    setting them again can be skipped. The first connection of a listener sets them on the
    listening socket too, and is answered False (the caller sets them on that connection).
    """
    port = getattr(transport, "server", None)
    listening = getattr(port, "socket", None)
    if not INHERITED_OPTIONS or type(transport) is not tcp.Server or listening is None:
        return False
    if getattr(port, "_tunnel_tuned", False):
        return True
    try:
        listening.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        return False
    set_keepalive(listening)
    port._tunnel_tuned = True  # type: ignore[union-attr]
    return False


#: What `not_public` turns off: keepalive probes and the user timeout.
_PUBLIC_ONLY = [
    (socket.SOL_SOCKET, getattr(socket, "SO_KEEPALIVE", None)),
    (socket.IPPROTO_TCP, getattr(socket, "TCP_USER_TIMEOUT", None)),
]


def not_public(sock: socket.socket | None) -> None:
    """
    Take the public connections' keepalive and user timeout off `sock` (an agent's link,
    accepted on the public TLS port): the system's defaults again. Errors are ignored (the
    socket may already be gone).
    """
    if sock is None:
        return
    for level, name in _PUBLIC_ONLY:
        if name is None:
            continue
        try:
            sock.setsockopt(level, name, 0)
        except OSError:
            pass
