"""
The agent's end of its link: a thin adapter that decodes control messages and link events
and hands them to the `Agent` (whose `AgentControl` decides).
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING, Any

from twisted.application._client_service import _ReconnectingProtocolProxy
from twisted.internet import defer, tcp
from twisted.internet.endpoints import _WrappingProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from tunnel._splice import ConnectedTCP
from tunnel.link import LinkProtocol, Stream, set_nodelay
from tunnel.wire import ErrorCode
from tunnel.wire.control import (
    ControlError,
    ControlMessage,
    TunnelGranted,
    decode_message,
    encode_message,
)
from tunnel.wire.control import TunnelRefused as TunnelRefusedMessage

if TYPE_CHECKING:
    from tunnel.agent.session import Agent
    from tunnel.wire import Multiplexer

__all__ = ["AgentLink", "lean_socket_reads", "shorten_read_path"]

_log = Logger()


def shorten_read_path(link: LinkProtocol) -> int:
    """
    Take the pass-through layers that Twisted's connecting puts between the socket and the
    link off its read path; returns how many were taken off (0, 1 or 2).

    - `ClientService`'s proxy (``_ReconnectingProtocolProxy``, between the TLS layer and the
      link) forwards every attribute it lacks through ``__getattr__``: the link's own
      ``dataReceived`` is bound on it, so a read costs one call, not three. Its
      ``connectionLost`` (the reconnect bookkeeping) is untouched.
    - The endpoint's ``_WrappingProtocol`` (between the TCP transport and the TLS layer) only
      forwards once it has connected the TLS layer: the TCP transport is pointed at the TLS
      layer itself, which gets the same ``dataReceived`` and ``connectionLost`` calls.

    Any other shape (a link over a test transport, an HTTP CONNECT tunnel, an adopted link)
    is left as it is.
    """
    taken = 0
    tls: Any = link.transport
    proxy: Any = getattr(tls, "wrappedProtocol", None)
    if type(proxy) is _ReconnectingProtocolProxy and getattr(proxy, "_protocol", None) is link:
        proxy.dataReceived = link.dataReceived  # type: ignore[attr-defined]
        taken += 1
    tcp: Any = getattr(tls, "transport", None)
    wrapper = getattr(tcp, "protocol", None)
    if type(wrapper) is _WrappingProtocol and wrapper._wrappedProtocol is tls:
        tcp.protocol = tls
        taken += 1
    return taken


def lean_socket_reads(link: LinkProtocol) -> bool:
    """
    Give the TCP transport under the link's TLS layer (Twisted's ``tcp.Client``) the read
    of `ConnectedTCP` (``recv`` and the protocol's ``dataReceived``, without
    ``_dataReceived`` between them): a Python call less per read of the link. Returns
    whether it did; any other shape is left as it is.
    """
    tcp_transport: Any = getattr(link.transport, "transport", None)
    if type(tcp_transport) is not tcp.Client or "doRead" in vars(tcp_transport):
        return False
    # An instance attribute shadows the class's method for this transport alone (as
    # Twisted's own abortConnection does with its no-op doRead).
    tcp_transport.doRead = types.MethodType(ConnectedTCP.doRead, tcp_transport)  # type: ignore[method-assign]
    return True


class AgentLink(LinkProtocol):
    """
    The agent's end of its link.
    """

    def __init__(self, agent: Agent, mux: Multiplexer | None = None) -> None:
        super().__init__(agent.reactor, client=True, settings=agent.settings)
        self.agent = agent
        self.draining = False
        #: A GOAWAY went either way on this link (the relay drained or ended it, or this
        #: side did): its end was asked for, not a cut.
        self.went_away = False
        self._idle_waiters: list[defer.Deferred[None]] = []
        #: The link was made elsewhere and adopted with its multiplexer (`Agent.adopt`).
        self.adopted = mux is not None
        if mux is not None:
            self.mux = mux

    def connectionMade(self) -> None:
        if not self.adopted:
            super().connectionMade()
            shorten_read_path(self)
            lean_socket_reads(self)
            self.agent._connected(self)
            return
        # LinkProtocol.connectionMade, but for the multiplexer, which is already running
        # (hello and ping sent), and the session, which the agent takes over.
        transport = self.transport
        assert transport is not None
        self.host = transport.getHost()
        self.peer = transport.getPeer()
        set_nodelay(transport)
        transport.registerProducer(self, True)  # type: ignore[attr-defined]
        self._last_received = self._last_ping = self.reactor.seconds()
        self._schedule_keepalive()
        self.agent._adopted(self)
        self.flush()

    def send(self, message: ControlMessage) -> None:
        """
        Send a control message to the relay.
        """
        self.sendControl(encode_message(message))

    def controlReceived(self, payload: bytes) -> None:
        try:
            message = decode_message(payload)
        except ControlError as e:
            _log.warn("malformed control message from the relay: {e}", e=e)
            self.goAway(ErrorCode.PROTOCOL_ERROR, str(e))
            return
        if message is None:
            return
        if isinstance(message, TunnelGranted | TunnelRefusedMessage):
            self.agent._answered(message)
        else:
            self.agent._received(self, message)

    def streamOpened(self, stream: Stream, metadata: bytes) -> None:
        self.agent._stream_opened(self, stream, metadata)

    @property
    def cut(self) -> bool:
        """
        Whether the link ended without either side asking: the connection was reset or
        closed with no GOAWAY, or this side's keepalive timed out (the path went silent).
        False while the link is up.
        """
        ended = self.terminated
        if not self._lost or self.went_away or ended is None:
            return False
        code, _, remote = ended
        # Remote without a GOAWAY: the transport went away. Local: only the keepalive.
        return remote or code == ErrorCode.TIMEOUT

    def goAway(self, code: int = ErrorCode.NO_ERROR, message: str = "") -> None:
        self.went_away = True
        super().goAway(code, message)

    def close(self, message: str = "closing", timeout: float = 1.0) -> defer.Deferred[None]:
        self.went_away = True
        return super().close(message, timeout)

    def goAwayReceived(self, code: int, message: str) -> None:
        self.went_away = True
        if code != ErrorCode.NO_ERROR:
            return
        # The relay is draining: streams in flight finish here; the link closes as soon as
        # none is left, so the ClientService reconnects (to the next relay, if there are
        # several) while nothing is lost.
        self.agent._drain(self, message)

    def drainWhenIdle(self) -> None:
        """
        Close as soon as no stream is left.
        """
        self.draining = True
        self.streamForgotten()

    def idle(self, timeout: float) -> defer.Deferred[None]:
        """
        Fires once no stream is left on the link (or it is gone), or after `timeout`
        seconds, whichever comes first.
        """
        d: defer.Deferred[None] = defer.Deferred()
        if not self.streams or self._lost:
            d.callback(None)
            return d
        self._idle_waiters.append(d)
        timer = self.reactor.callLater(timeout, self._idle_done, d)

        def done(result: None) -> None:
            if timer.active():
                timer.cancel()
            return result

        d.addCallback(done)
        return d

    def _idle_done(self, d: defer.Deferred[None] | None = None) -> None:
        waiters = [d] if d is not None else list(self._idle_waiters)
        for waiter in waiters:
            if waiter in self._idle_waiters:
                self._idle_waiters.remove(waiter)
                waiter.callback(None)

    def streamForgotten(self) -> None:
        if not self.streams:
            self._idle_done()
        if self.draining and not self.streams and self.transport is not None:
            self.abort()

    def linkLost(self, reason: Failure) -> None:
        self._idle_done()
        self.agent._link_lost(self, reason)
