"""
The relay's public TLS front: read the ClientHello, route by SNI, then terminate TLS.

Each accepted connection is buffered (bounded) while `ClientHelloParser` reads the first
flight.  The router maps the `ClientHello` to a `Route` (TLS context + protocol factory) or
None.  With a route, a `TLSMemoryBIOProtocol` using the route's context is attached to the
TCP transport and replays the buffered bytes; the route's protocol sees only plaintext.
Without one, the client gets a fatal ``unrecognized_name`` alert; garbage gets
``decode_error`` (or, if it is not TLS at all, a plain abort).  A *passthrough* route does no
TLS at all: its protocol gets the TCP transport itself and the buffered bytes, untouched.

Bounds: the ClientHello size; the time from accept until the whole ClientHello has arrived
(``client_hello_timeout``, short: real clients send it at once) and until the end of the TLS
handshake (``handshake_timeout``), both enforced with ``abortConnection`` (Twisted's TLS
``loseConnection`` waits for the peer and can hang); and the number of connections still
handshaking, in all (``max_pending_handshakes``) and from one source
(``max_pending_per_source``: an IPv4 address or an IPv6 /64), so that one client cannot take
every slot.  When a limit is reached, the oldest *silent* connection (no complete ClientHello
yet) under that limit is aborted to make room for the new one; only when there is none is
the new connection aborted at once.

A route marked `Route.local` (the relay answers the connection itself instead of handing it
to an agent link or a tunnel) keeps its slot and its handshake deadline until it closes.

Route factories are not started or stopped by the dispatcher (``doStart``/``doStop``): their
owner does that.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from socket import AF_INET as _AF_INET
from socket import inet_ntop as _inet_ntop
from socket import inet_pton as _inet_pton
from typing import Any, cast

from OpenSSL import SSL
from twisted.internet import protocol, tcp
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IOpenSSLServerConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    ITCPTransport,
)
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from tunnel._fasttls import FastTLSProtocol
from tunnel.relay._peerwatch import set_keepalive, socket_of
from tunnel.relay._ratelog import RateLog, shorten
from tunnel.relay._tuning import not_public, tuned_by_listener

from ._clienthello import (
    ALERT_ACCESS_DENIED,
    ALERT_DECODE_ERROR,
    ALERT_INTERNAL_ERROR,
    ALERT_UNRECOGNIZED_NAME,
    ClientHello,
    ClientHelloError,
    ClientHelloParser,
    NotTLS,
    alert_record,
)

__all__ = ["Route", "Router", "SNIDispatchFactory"]

_log = Logger()


@dataclass(frozen=True)
class Route:
    """Where a public TLS connection goes once its ClientHello is known."""

    context: SSL.Context | None
    """The server TLS context to terminate the connection with (None for `passthrough`)."""
    factory: IProtocolFactory
    """Builds the protocol that receives the decrypted bytes (its transport is the TLS layer,
    so ``transport.negotiatedProtocol`` tells it the ALPN result)."""
    local: bool = False
    """The relay answers the connection itself (it is not handed to an agent link or a
    tunnel): it stays under the handshake deadline, counted against the pending-handshake
    limits, until it closes."""
    passthrough: bool = False
    """The relay does not terminate the connection: the factory's protocol gets the TCP
    transport itself and every byte from the client's first (the buffered ClientHello
    included), untouched. It is no longer a pending handshake of the relay's."""
    link: bool = False
    """An agent's link, not a public connection: the public connections' keepalive and
    user timeout are taken off its socket."""


Router = Callable[[ClientHello], Route | None]
"""Maps a ClientHello to a Route, or None to refuse with ``unrecognized_name``."""


class AccessDenied(Exception):
    """
    Raised by a route's factory (from ``buildProtocol``, which gets the client's address) to
    refuse that client with an ``access_denied`` alert.
    """


@implementer(IOpenSSLServerConnectionCreator)
class _RouteConnectionCreator:
    """Creates each server ``SSL.Connection`` from the context its route chose."""

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        context: SSL.Context = tlsProtocol.routeContext
        return SSL.Connection(context, None)


class _RoutedTLS(FastTLSProtocol):
    """A TLS layer whose ``SSL.Connection`` uses the context of its route."""

    def __init__(
        self, factory: TLSMemoryBIOFactory, wrapped: IProtocol, context: SSL.Context
    ) -> None:
        self.routeContext = context
        super().__init__(factory, wrapped)

    def _shutdownTLS(self) -> None:
        if getattr(self, "_tlsConnection", None) is None:
            # Already torn down (an abort after the connection was lost): nothing to shut.
            return
        super()._shutdownTLS()
        # Twisted then waits for the client's close_notify, which a client that is still
        # sending may never send. Closing after our own close_notify is allowed (RFC 8446
        # section 6.1) and is what web servers do.
        transport = self.transport
        if transport is not None and not getattr(transport, "disconnecting", True):
            transport.loseConnection()


@implementer(IHandshakeListener)
class _HandshakeWatch(protocol.Protocol):
    """
    Sits between the TLS layer and the route's protocol until the handshake completes.

    It tells the dispatcher when the handshake finishes (or the connection is lost first),
    then takes itself out of the path: the TLS layer talks to the inner protocol directly.
    The inner protocol's transport is the TLS layer itself, never this object.
    """

    def __init__(self, owner: _SNIDispatchProtocol, inner: IProtocol) -> None:
        self._owner = owner
        self._inner = inner
        self.tls: _RoutedTLS | None = None

    def makeConnection(self, transport: Any) -> None:
        self._inner.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        # Only for a local route (or before the handshake completes): the watch stays in the
        # path so that the dispatcher learns when the connection ends.
        self._inner.dataReceived(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._owner._handshakeFinished(completed=False)
        self._inner.connectionLost(reason)

    def handshakeCompleted(self) -> None:
        self._owner._handshakeFinished(completed=True)
        tls = self.tls
        if self._owner._local:
            pass  # still counted until it closes: stay in the path to see connectionLost
        elif tls is not None and cast(object, tls.wrappedProtocol) is self:
            tls.wrappedProtocol = self._inner
        if IHandshakeListener.providedBy(self._inner):
            self._inner.handshakeCompleted()

    def logPrefix(self) -> str:
        prefix = getattr(self._inner, "logPrefix", None)
        return prefix() if callable(prefix) else self._inner.__class__.__name__


def source_of(peer: object) -> str:
    """
    Whom a pending handshake is counted against: the IPv4 address (also when it arrives
    IPv4-mapped), or the /64 of an IPv6 one (a single host often holds a whole /64).
    """
    host: str = getattr(peer, "host", "")
    try:
        # The common case, an IPv4 address in its canonical form (as the kernel gives it),
        # without building an `ipaddress` object: it is its own source.
        if _inet_ntop(_AF_INET, _inet_pton(_AF_INET, host)) == host:
            return host
    except (OSError, TypeError, ValueError):
        pass
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def _abortTransport(transport: object) -> None:
    """``abortConnection()`` on a TCP transport (or TLS layer): close now, never wait."""
    cast(ITCPTransport, transport).abortConnection()


# Connection states.
_READING_HELLO = "reading-hello"
_TLS = "tls"
_PASSTHROUGH = "passthrough"
_CLOSING = "closing"


class _SNIDispatchProtocol(protocol.Protocol):
    """One public connection, from accept until it is handed to a TLS layer."""

    factory: SNIDispatchFactory

    def __init__(self, factory: SNIDispatchFactory) -> None:
        self.factory = factory
        self._state = _READING_HELLO
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._parser = ClientHelloParser(factory.max_hello_size)
        self._timer: IDelayedCall | None = None
        self._accepted_at = 0.0
        self._counted = False
        self._silent = False
        self._local = False
        self._source: str | None = None
        self._tls: _RoutedTLS | None = None
        #: The protocol a passthrough route handed the connection to.
        self._passed: IProtocol | None = None
        self._server_name: str | None = None
        #: The client's address (from connectionMade).
        self._address: IAddress | None = None

    # -- connection setup ------------------------------------------------------------------

    def connectionMade(self) -> None:
        f = self.factory
        transport = self.transport
        assert transport is not None
        # Public options (TCP_NODELAY, keepalive), inherited from the listening socket where
        # the system copies them; a link has the keepalive taken off (_dispatch).
        if (
            f.set_nodelay
            and ITCPTransport.providedBy(transport)
            and not tuned_by_listener(transport)
        ):
            try:
                transport.setTcpNoDelay(True)
            except OSError:  # pragma: no cover - socket already gone
                pass
            set_keepalive(socket_of(transport))
        peer = self._address = transport.getPeer()
        source = source_of(peer)
        if not f._admit(self, source, peer):
            self._state = _CLOSING
            _abortTransport(transport)
            return
        self._accepted_at = f.reactor.seconds()
        self._timer = f.reactor.callLater(f.client_hello_timeout, self._timedOut)
        if f.set_nodelay and type(transport) is tcp.Server and transport.server is not None:
            # A TLS client sends its ClientHello as soon as its connect returns: often it is
            # there already, and is read (and answered) in this turn rather than the next.
            # Nothing there costs one recv that finds nothing; an end of input or an error
            # found so is handled as the reactor handles it.
            why = transport.doRead()
            if why:
                transport.reactor._disconnectSelectable(transport, why, True)  # type: ignore[attr-defined]

    def _timedOut(self) -> None:
        self._timer = None
        if self._state == _READING_HELLO:
            self._refuseLog("no complete ClientHello in time")
        else:
            self._refuseLog("handshake timeout")
        self._close_now()

    def _close_now(self) -> None:
        """Give up the slot and abort: never ``loseConnection``, as TLS close waits for the
        peer."""
        self._release()
        self._state = _CLOSING
        self._buffer.clear()
        if self.transport is not None:
            _abortTransport(self.transport)

    def _evicted(self) -> None:
        """Aborted to make room for a newer connection (this one is still silent)."""
        self._refuseLog("evicted while silent: the pending-handshake slots are full")
        self._close_now()

    def _handshakeFinished(self, completed: bool) -> None:
        """The TLS handshake completed, or the connection ended before it did."""
        if completed and self._local:
            # Answered by the relay itself: the slot and the deadline last until it closes.
            return
        self._release()

    def _release(self) -> None:
        """Stop the timer and give back the pending-handshake slot (idempotent)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._leaveSilent()
        if self._counted:
            self._counted = False
            self.factory._released(self._source or "")

    def _leaveSilent(self) -> None:
        if self._silent:
            self._silent = False
            self.factory._unsilent(self, self._source or "")

    # -- reading the ClientHello -----------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._state == _PASSTHROUGH:
            # Only reached when the transport's protocol could not be swapped.
            assert self._passed is not None
            self._passed.dataReceived(data)
            return
        if self._state == _TLS:
            # Only reached when the transport's protocol could not be swapped.
            assert self._tls is not None
            cast(IProtocol, self._tls).dataReceived(data)
            return
        if self._state != _READING_HELLO:
            return
        self._buffer.append(data)
        self._buffered += len(data)
        try:
            hello = self._parser.feed(data)
            if hello is None and self._buffered > self.factory.max_buffer:
                raise ClientHelloError(ALERT_DECODE_ERROR, "too many bytes before ClientHello")
        except NotTLS as e:
            self._refuseLog(f"not TLS: {e.message}")
            self._abort()
            return
        except ClientHelloError as e:
            self._refuseLog(f"bad ClientHello: {e.message}")
            self._refuse(e.alert)
            return
        if hello is not None:
            self._server_name = hello.server_name
            # The parser holds the whole ClientHello; a long-lived connection needs none of it.
            self._parser = None  # type: ignore[assignment]
            self._heard()
            self._dispatch(hello)

    def replay(self, data: bytes, hello: ClientHello) -> None:
        """
        The connection's first bytes, `data`, whose ClientHello `hello` was parsed already
        (by the worker that handed the connection here): routed by this factory's router
        and replayed into TLS (or passthrough) as if read here, without parsing again.
        """
        if self._state != _READING_HELLO:
            return
        if self._buffered + len(data) > self.factory.max_buffer:
            self._refuseLog("bad ClientHello: too many bytes before ClientHello")
            self._refuse(ALERT_DECODE_ERROR)
            return
        self._buffer.append(data)
        self._buffered += len(data)
        self._server_name = hello.server_name
        self._parser = None  # type: ignore[assignment]
        self._heard()
        self._dispatch(hello)

    def _heard(self) -> None:
        """The whole ClientHello arrived: no longer evictable, and the rest of the handshake
        has until ``handshake_timeout`` after accept."""
        self._leaveSilent()
        timer = self._timer
        if timer is not None and timer.active():
            f = self.factory
            left = self._accepted_at + f.handshake_timeout - f.reactor.seconds()
            timer.reset(max(left, 0.0))

    def _dispatch(self, hello: ClientHello) -> None:
        try:
            route = self.factory.router(hello)
        except Exception:
            _log.failure(
                "SNI router raised for {peer} (SNI {sni!r}); refusing",
                peer=self._peer(),
                sni=hello.server_name,
            )
            route = None
        if route is None:
            self._refuseLog("no route" if hello.server_name else "no SNI")
            self._refuse(ALERT_UNRECOGNIZED_NAME)
            return
        transport = self.transport
        assert transport is not None
        try:
            inner = route.factory.buildProtocol(self._address or transport.getPeer())
        except AccessDenied as e:
            self._refuseLog(f"access denied: {e}")
            self._refuse(ALERT_ACCESS_DENIED)
            return
        except Exception:
            _log.failure("route factory raised for SNI {sni!r}", sni=hello.server_name)
            inner = None
        if inner is None:
            self._refuseLog("route factory refused the connection")
            self._refuse(ALERT_INTERNAL_ERROR)
            return
        if route.link:
            not_public(socket_of(transport))
        if route.passthrough or route.context is None:
            self._passThrough(inner)
            return
        self._local = route.local
        watch = _HandshakeWatch(self, inner)
        tls = _RoutedTLS(self.factory._tlsFactory, watch, route.context)
        watch.tls = tls
        self._tls = tls
        self._state = _TLS
        data = b"".join(self._buffer)
        self._buffer.clear()
        # Hand the TCP transport to the TLS layer.  Swapping transport.protocol removes
        # this object from the per-chunk path (Twisted's TCP, SSL-less, transports read it
        # on every doRead); otherwise keep forwarding.
        if getattr(transport, "protocol", None) is self:
            transport.protocol = tls  # type: ignore[attr-defined]
        tlsp = cast(IProtocol, tls)
        tlsp.makeConnection(transport)
        if data and tls.connected and not tls.disconnecting:
            tlsp.dataReceived(data)

    def _passThrough(self, inner: IProtocol) -> None:
        """
        Hand the TCP connection to `inner` as it is, then the bytes buffered so far (the
        ClientHello): the relay does no TLS on it, so its slot and deadline end here.
        """
        self._release()
        self._state = _PASSTHROUGH
        self._passed = inner
        data = b"".join(self._buffer)
        self._buffer.clear()
        transport = self.transport
        assert transport is not None
        if getattr(transport, "protocol", None) is self:
            transport.protocol = inner  # type: ignore[attr-defined]
        inner.makeConnection(transport)
        if (
            data
            and getattr(transport, "connected", True)
            and not getattr(transport, "disconnecting", False)
        ):
            inner.dataReceived(data)

    # -- refusing --------------------------------------------------------------------------

    def _refuse(self, alert: int) -> None:
        """Send a fatal alert and close; the handshake timer still bounds the close."""
        self._leaveSilent()
        self._state = _CLOSING
        self._buffer.clear()
        transport = self.transport
        assert transport is not None
        transport.write(alert_record(alert))
        transport.loseConnection()

    def _abort(self) -> None:
        self._leaveSilent()
        self._state = _CLOSING
        self._buffer.clear()
        if self.transport is not None:
            _abortTransport(self.transport)

    def _peer(self) -> str:
        try:
            peer = self.transport.getPeer() if self.transport is not None else None
        except Exception:  # pragma: no cover
            return "?"
        host = getattr(peer, "host", None)
        port = getattr(peer, "port", None)
        return f"{host}:{port}" if host is not None else str(peer)

    def _refuseLog(self, reason: str) -> None:
        # One key per kind of refusal (the reason up to its first colon is fixed text);
        # the SNI name is the client's and may be 10 KB long.
        self.factory.ratelog.info(
            "TLS front refused (" + reason.split(":", 1)[0] + ")",
            "TLS front refused {peer}: {reason} (SNI {sni})",
            peer=self._peer(),
            reason=shorten(reason),
            sni=shorten(repr(self._server_name)),
        )

    # -- teardown --------------------------------------------------------------------------

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        passed, self._passed = self._passed, None
        if passed is not None and self._state == _PASSTHROUGH:
            passed.connectionLost(reason)
        tls, self._tls = self._tls, None
        if tls is not None:
            # Not swapped: the TLS layer (and through it the watch) learns of it from us,
            # also after a timeout.
            cast(IProtocol, tls).connectionLost(reason)
        self._release()
        self._buffer.clear()
        self._state = _CLOSING


class SNIDispatchFactory(protocol.Factory):
    """
    Listening factory for the relay's public TLS port.

    ``router(hello)`` picks the `Route` for each connection, or None to refuse it with an
    ``unrecognized_name`` alert.  It is called at most once per connection, on the reactor
    thread; an exception in it is logged and counts as None.

    ``client_hello_timeout`` is capped at ``handshake_timeout``. A connection whose
    ClientHello was read elsewhere is given it with its protocol's ``replay(data, hello)``.

    @raise ValueError: a timeout that is not positive, or a limit below 1.
    """

    noisy = False

    def __init__(
        self,
        router: Router,
        reactor: IReactorTime,
        *,
        handshake_timeout: float = 10.0,
        client_hello_timeout: float = 3.0,
        max_pending_handshakes: int = 1024,
        max_pending_per_source: int = 256,
        max_hello_size: int = 16384,
        set_nodelay: bool = True,
    ) -> None:
        if handshake_timeout <= 0 or client_hello_timeout <= 0:
            raise ValueError("handshake_timeout and client_hello_timeout must be positive")
        if max_pending_handshakes < 1 or max_pending_per_source < 1:
            raise ValueError("max_pending_handshakes and max_pending_per_source must be >= 1")
        self.router = router
        self.reactor = reactor
        self.handshake_timeout = handshake_timeout
        self.client_hello_timeout = min(client_hello_timeout, handshake_timeout)
        self.max_pending_handshakes = max_pending_handshakes
        self.max_pending_per_source = max_pending_per_source
        self.max_hello_size = max_hello_size
        #: Whether the connections come from this factory's own listener: each gets the
        #: public socket options (TCP_NODELAY, keepalive) and has what it sent read in the
        #: turn that accepted it. False for sockets handed over by another worker (which
        #: set the options already, and whose first bytes are replayed).
        self.set_nodelay = set_nodelay
        # Raw bytes held while the hello arrives: the hello plus record headers, with room
        # for clients that split it into a few records.
        self.max_buffer = 2 * max_hello_size + 2**14
        self.pending = 0
        """Connections accepted whose TLS handshake has not completed yet (or that a local
        route answers, until they close)."""
        self.refused_overload = 0
        """Connections aborted because a pending-handshake limit was reached."""
        self.refused_source_overload = 0
        """Of those, the ones aborted for ``max_pending_per_source``."""
        self.evicted_silent = 0
        """Silent connections (no complete ClientHello) aborted to make room for new ones."""
        self._pending_by_source: dict[str, int] = {}
        # Silent connections, oldest first (dicts keep insertion order), in all and by source.
        self._silent: dict[_SNIDispatchProtocol, None] = {}
        self._silent_by_source: dict[str, dict[_SNIDispatchProtocol, None]] = {}
        #: Refusals are logged through it: a flood costs a few lines and a summary.
        self.ratelog = RateLog(_log, reactor)
        # One TLS factory for every route: the context comes from each connection's route,
        # so no per-route (or per-connection) factory is needed.
        self._tlsFactory = TLSMemoryBIOFactory(
            _RouteConnectionCreator(), isClient=False, wrappedFactory=self, clock=reactor
        )

    def buildProtocol(self, addr: IAddress | None) -> protocol.Protocol:
        return _SNIDispatchProtocol(self)

    # -- pending-handshake slots -------------------------------------------------------------

    def _admit(self, conn: _SNIDispatchProtocol, source: str, peer: IAddress) -> bool:
        """
        Give `conn` a pending-handshake slot (and mark it silent), evicting the oldest
        silent connection under a full limit; False (and counted) when none can be evicted.
        """
        if self._pending_by_source.get(source, 0) >= self.max_pending_per_source:
            why = f"{self.max_pending_per_source} pending from {source}, the limit"
            # The oldest silent one from the same source: evicting it frees a global slot too.
            victim = next(iter(self._silent_by_source.get(source, ())), None)
            if victim is None:
                self.refused_source_overload += 1
                self._refusedOverload(peer, why)
                return False
            self._evict(victim, peer, why)
        elif self.pending >= self.max_pending_handshakes:
            why = f"{self.pending} handshakes pending, the limit"
            victim = next(iter(self._silent), None)
            if victim is None:
                self._refusedOverload(peer, why)
                return False
            self._evict(victim, peer, why)
        self.pending += 1
        self._pending_by_source[source] = self._pending_by_source.get(source, 0) + 1
        conn._source = source
        conn._counted = True
        conn._silent = True
        self._silent[conn] = None
        self._silent_by_source.setdefault(source, {})[conn] = None
        return True

    def _evict(self, victim: _SNIDispatchProtocol, peer: IAddress, why: str) -> None:
        self.evicted_silent += 1
        self.ratelog.warn(
            "TLS front evicted (silent)",
            "TLS front evicted a silent connection for a newer one from {peer}: {why}",
            peer=peer,
            why=why,
        )
        victim._evicted()

    def _released(self, source: str) -> None:
        self.pending -= 1
        left = self._pending_by_source.get(source, 1) - 1
        if left:
            self._pending_by_source[source] = left
        else:
            self._pending_by_source.pop(source, None)

    def _unsilent(self, conn: _SNIDispatchProtocol, source: str) -> None:
        self._silent.pop(conn, None)
        of_source = self._silent_by_source.get(source)
        if of_source is not None:
            of_source.pop(conn, None)
            if not of_source:
                del self._silent_by_source[source]

    def _refusedOverload(self, peer: IAddress, why: str) -> None:
        self.refused_overload += 1
        self.ratelog.warn(
            "TLS front refused (overload)",
            "TLS front refused a connection from {peer}: {why}",
            peer=peer,
            why=why,
        )
