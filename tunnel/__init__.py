"""
Tunnels: a public URL for a local port, through a relay you run.

Plain Python (the reactor runs in a background thread; nothing to set up)::

    import tunnel
    with tunnel.forward(8000) as t:
        print(t.url)          # https://<id>.<domain>[:port]
        print(t.tls_socket)   # (host, port)

With ``unencrypted=True`` the tunnel also has a raw TCP port: ``t.tcp_socket``. With
``name="web"`` its URL is ``https://web.<domain>``, kept across reconnects (if the token
allows the name). Several ports at once (Modal's ``Sandbox.tunnels()``)::

    with tunnel.forward_many([8000, "22:tcp"]) as tunnels:
        print(tunnels[8000].url, tunnels[22].tcp_socket)

In Twisted code, use `tunnel.client.forward`, which returns a Deferred.

Where the relay is comes from the arguments or from ``TUNNEL_RELAY``, ``TUNNEL_TOKEN`` and
``TUNNEL_CA``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Unpack

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "RelayUnavailable",
    "Tunnel",
    "TunnelError",
    "TunnelRefused",
    "__version__",
    "forward",
    "forward_many",
    "make_csr",
]

from tunnel._csr import make_csr
from tunnel.errors import (
    AuthenticationError,
    RelayUnavailable,
    TunnelError,
    TunnelRefused,
)


def __getattr__(name: str) -> Any:
    # `Tunnel` pulls in Twisted; import it on first use so that `import tunnel.wire` (the
    # sans-IO core) stays free of Twisted.
    if name == "Tunnel":
        from tunnel._tunnel import Tunnel

        return Tunnel
    raise AttributeError(f"module 'tunnel' has no attribute {name!r}")


if TYPE_CHECKING:
    from tunnel._tunnel import Tunnel
    from tunnel.agent._firstlink import FirstLink
    from tunnel.agent.settings import ForwardArgs

_lock = threading.Lock()
_thread: threading.Thread | None = None
#: Set once the background reactor runs (and has adopted the first link, if one was made).
_started = threading.Event()


def _first_link(
    entries: list[int | str], kwargs: ForwardArgs, api: str
) -> tuple[FirstLink, dict[int, Tunnel]] | None:
    """
    For the process's first forward: make its link with the standard library, before
    Twisted is imported (`tunnel.agent._firstlink`), and return its tunnels; None where the
    Twisted path is taken (a reactor already, several relays, an HTTP proxy, the inspector,
    or a link lost before its answers).

    @raise ValueError, RelayUnavailable, AuthenticationError, TunnelRefused: as `forward`.
    """
    global _thread
    import sys

    if _thread is not None or "twisted.internet.reactor" in sys.modules:
        return None
    from tunnel.agent.settings import ForwardArgs, connection_settings, forward_spec, forward_specs

    unknown = sorted(set(kwargs) - set(ForwardArgs.__annotations__))
    if unknown:
        raise TypeError(f"{api}() got an unexpected keyword argument {unknown[0]!r}")
    if api == "forward":
        specs = [forward_spec(entries[0], kwargs)]  # type: ignore[arg-type]
    else:
        specs = forward_specs(entries, kwargs)
    settings = connection_settings(
        kwargs.get("relay"), kwargs.get("token"), kwargs.get("ca"), kwargs.get("proxy")
    )
    if len(settings.relays) != 1 or settings.proxy is not None or kwargs.get("inspect"):
        return None
    from tunnel.agent._firstlink import FirstLink

    def failed() -> None:
        global _thread
        with _lock:
            if _thread is first.thread:
                _thread = None

    with _lock:
        if _thread is not None:  # another thread's, meanwhile
            return None  # type: ignore[unreachable]
        connection = {
            "relay": kwargs.get("relay"),
            "token": settings.token,
            "ca": settings.ca,
        }
        first = FirstLink(settings.relays[0], connection, specs, _started, failed)
        _thread = first.thread
    tunnels = first.tunnels()
    if tunnels is None:
        return None
    return first, tunnels


def _running_reactor() -> Any:
    """
    The global reactor, running in a background thread (started on first use).

    @raise RuntimeError: called from the reactor's own thread, where blocking would deadlock.
    """
    global _thread
    thread = _thread
    # Started (perhaps by a first link still importing Twisted): wait until it runs.
    if thread is not None and thread is not threading.current_thread() and not _started.wait(30):
        raise RuntimeError("the Twisted reactor did not start")
    from twisted.internet import reactor
    from twisted.python import threadable

    with _lock:
        if reactor.running:
            if threadable.isInIOThread():
                raise RuntimeError(
                    "tunnel.forward blocks; in Twisted code use "
                    "tunnel.client.forward(reactor, port)"
                )
            return reactor
        if _thread is None:
            from tunnel._reactor import lean_dispatch

            # This module runs the reactor, so it may trim the reactor's event dispatch.
            lean_dispatch(reactor)
            started = _started
            reactor.callWhenRunning(started.set)
            _thread = threading.Thread(
                target=reactor.run,
                kwargs={"installSignalHandlers": False},
                name="tunnel-reactor",
                daemon=True,
            )
            _thread.start()
            if not started.wait(10):
                raise RuntimeError("the Twisted reactor did not start")
    return reactor


def _blocking(reactor: Any, t: Tunnel) -> Tunnel:
    """
    `t`, whose `Tunnel.issue_certificate` blocks this thread for its answer, as everything of
    this API does (its Deferred is the reactor thread's).
    """
    from dataclasses import replace

    from twisted.internet.threads import blockingCallFromThread

    issue = t._issue
    if issue is None:
        return t
    return replace(t, _issue=lambda csr: blockingCallFromThread(reactor, issue, csr))


@contextmanager
def forward(port: int, **kwargs: Unpack[ForwardArgs]) -> Iterator[Tunnel]:
    """
    Forward a local port through the relay for the duration of a ``with`` block.

    The arguments are those of `tunnel.client.forward`. Leaving the block closes the tunnel.

    @raise ValueError: a bad argument, or a port that is already forwarded.
    @raise RelayUnavailable: the relay could not be reached in time.
    @raise AuthenticationError: the relay refused the token.
    @raise TunnelRefused: the relay refused the tunnel.
    """
    first = _first_link([port], kwargs, "forward")
    if first is not None:
        link, tunnels = first
        try:
            yield tunnels[port]
        finally:
            link.close()
        return
    from twisted.internet import defer
    from twisted.internet.threads import blockingCallFromThread

    from tunnel import client

    reactor = _running_reactor()

    def start() -> defer.Deferred[Tunnel]:
        return client.forward(reactor, port, **kwargs)

    t: Tunnel = _blocking(reactor, blockingCallFromThread(reactor, start))  # type: ignore[arg-type]
    try:
        yield t
    finally:
        blockingCallFromThread(reactor, t.close)  # type: ignore[arg-type]


@contextmanager
def forward_many(
    ports: Iterable[int | str], **kwargs: Unpack[ForwardArgs]
) -> Iterator[dict[int, Tunnel]]:
    """
    Forward several local ports for the duration of a ``with`` block; yields
    ``{port: Tunnel}``, as Modal's ``Sandbox.tunnels()``.

    The arguments are those of `tunnel.client.forward_many`: each entry a port or a
    ``--forward`` value (``"22:tcp"``). Leaving the block closes every tunnel.

    @raise ValueError: a bad entry or argument, a port given twice or already forwarded.
    @raise RelayUnavailable: the relay could not be reached in time.
    @raise AuthenticationError: the relay refused the token.
    @raise TunnelRefused: the relay refused one of the tunnels (none is left open).
    """
    from twisted.internet import defer
    from twisted.internet.threads import blockingCallFromThread

    from tunnel import client

    reactor = _running_reactor()
    entries = list(ports)

    def start() -> defer.Deferred[dict[int, Tunnel]]:
        return client.forward_many(reactor, entries, **kwargs)

    granted: dict[int, Tunnel] = blockingCallFromThread(reactor, start)
    tunnels = {port: _blocking(reactor, t) for port, t in granted.items()}
    try:
        yield tunnels
    finally:
        blockingCallFromThread(reactor, client.close_all, tunnels)  # type: ignore[arg-type]
