"""
The relay's public data path: a public client's connection (TLS-terminated or raw TCP)
joined to one stream of the owning agent's link.

`_PublicFactory` admits the clients a tunnel's deny and allow lists admit; `PublicProtocol`
opens the stream (once any TLS handshake has completed) and is its producer; `_Activity` is the
stream's side, counting traffic for the idle timeout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet import error, tcp
from twisted.internet.interfaces import IHandshakeListener, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from tunnel.link import (
    SOCKET_READ,
    SpliceProtocol,
    Stream,
    StreamResetError,
    half_close,
    set_nodelay,
    write_now,
)
from tunnel.relay._peerwatch import set_keepalive, socket_of
from tunnel.relay._ratelimit import Throttle
from tunnel.relay._sni import AccessDenied, source_of
from tunnel.relay._tuning import tuned_by_listener
from tunnel.wire import ErrorCode

if TYPE_CHECKING:
    from tunnel.relay._state import Relay
    from tunnel.relay.registry import TunnelRecord

__all__ = ["PublicProtocol"]

_log = Logger()

#: Octets a public TLS connection may deliver before its stream opens (TLS delivers none
#: before the handshake completes; this only bounds what a TLS layer might let through).
_EARLY_DATA_LIMIT = 256 * 1024

#: Octets of a client's request kept until the target answers, so that a stream the agent
#: refused unprocessed (it was draining) can be opened again on another member of a pool.
_REPLAY_LIMIT = 64 * 1024
#: Times one public connection is moved to another member that way.
_MAX_RETRIES = 3


@implementer(IHandshakeListener, IPushProducer)
class PublicProtocol(SpliceProtocol):
    """
    A public client's connection (TLS-terminated, or raw TCP), joined to a new stream.

    A raw TCP connection's stream opens at once. A TLS connection's opens only once its
    handshake has completed, client-certificate check included: before that no byte and
    no connection reaches the agent, so a bare ClientHello costs the target nothing.

    It is the producer registered on its stream (standing in for its transport) so that it
    knows when it is paused, and puts itself in the relay's `PausedWatch` meanwhile: a
    paused transport reads nothing, not even the client's FIN or RST.
    """

    def __init__(
        self,
        relay: Relay,
        tunnel_id: str,
        peer: Any = None,
        read_at_once: bool = True,
        here: Any = None,
        record: TunnelRecord | None = None,
    ) -> None:
        super().__init__(None)
        self.relay = relay
        self.tunnel_id = tunnel_id
        #: The client's address, as the factory was given it (None: ask the transport).
        self.peer = peer
        #: The connection's own address, when the factory knows it (the listener's, bound
        #: to one address); None: ask the transport.
        self.here = here
        #: The tunnel's record as the factory found it, for a raw TCP connection whose
        #: stream opens in the same call (`_open`); None: looked up when the stream opens.
        self._record = record
        #: Whether a raw TCP connection's socket is read as soon as its stream opens (not
        #: for one the TLS front passes through: the bytes it read come first, after this).
        self._read_at_once = read_at_once
        self._counted = False
        #: Whether the target has sent anything yet (its member is in rotation again).
        self._answered = False
        #: What the client sent while the target has not answered (None: too much, or
        #: answered), whether its input ended meanwhile, and the moves so far (`retry`).
        self._replay: list[bytes] | None = []
        self._replay_size = 0
        self._client_ended = False
        self._retries = 0
        self._idle: Any = None
        self._tls = False
        #: Why the transport is paused: "stream" (the agent has no credit left), "rate"
        #: (the tunnel's upload is over its rate limit). Read again once none is left.
        self._holds: set[str] = set()
        #: The tunnel's rate limit (`Throttle`), and the stream's gate for downloads.
        self._throttle: Throttle | None = None
        self._download: _StreamGate | None = None
        #: What arrived before the stream opened, and whether the client's input ended.
        self._early: list[bytes] = []
        self._early_size = 0
        self._early_end = False

    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None
        self._tls = isinstance(transport, TLSMemoryBIOProtocol)
        if self._tls:
            # The TLS front set TCP_NODELAY and the keepalive options at accept
            # (`SNIDispatchFactory`; a handed-over socket had them set by the worker that
            # accepted it); the reads are the TCP transport's, under the TLS layer.
            tcp_transport: Any = getattr(transport, "transport", None)
            if hasattr(tcp_transport, "bufferSize"):
                tcp_transport.bufferSize = SOCKET_READ
        elif tuned_by_listener(transport):
            server: Any = transport
            server.bufferSize = SOCKET_READ  # as `set_nodelay` would
        else:
            set_nodelay(transport)
            set_keepalive(socket_of(transport))
        if not self._tls:
            self._open()
            if (
                self._read_at_once
                and self.other is not None
                and not self._holds
                and type(transport) is tcp.Server
            ):
                _read_now(transport)
        # A TLS connection's stream opens in handshakeCompleted; the relay's handshake
        # timeout bounds the wait.

    def handshakeCompleted(self) -> None:
        if self.other is None and not self.lost and self.transport is not None:
            self._open()

    def _open(self) -> None:
        transport = self.transport
        assert transport is not None
        record, self._record = self._record, None
        stream = self.relay.open_public_stream(self.tunnel_id, self, record)
        if stream is None:
            transport.abortConnection()  # type: ignore[attr-defined]
            return
        self._counted = True
        self.relay.public_connections.add(self)
        self.other = stream
        if record is None:
            record = self.relay.registry.get(self.tunnel_id)
        self._throttle = record.throttle if record is not None else None
        stream.registerProducer(self, True)
        if self._throttle is not None:
            self._download = _StreamGate(stream, self._throttle)
        stream.attach(_Activity(self, transport, self._download))
        if self.relay.config.idle_timeout:
            self._touch()
        early, self._early = self._early, []
        if early:
            write_now(stream, b"".join(early))
        if self._early_end:
            half_close(stream)

    # -- IPushProducer, for the stream: it pauses us when the agent has no credit left -----

    def pauseProducing(self) -> None:
        self._hold("stream")

    def resumeProducing(self) -> None:
        self._release("stream")

    # -- the tunnel's upload rate limit (`Gate`) ----------------------------------------------

    def throttled(self) -> None:
        self._hold("rate")

    def unthrottled(self) -> None:
        self._release("rate")

    def _hold(self, reason: str) -> None:
        first = not self._holds
        self._holds.add(reason)
        if first and self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]
            self.relay.paused_watch.add(self)

    def _release(self, reason: str) -> None:
        if reason not in self._holds:
            return
        self._holds.discard(reason)
        if not self._holds:
            self.relay.paused_watch.discard(self)
            if self.transport is not None:
                self.transport.resumeProducing()  # type: ignore[attr-defined]

    def stopProducing(self) -> None:
        self.relay.paused_watch.discard(self)
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    # -- what the PausedWatch asks ---------------------------------------------------------

    def peer_socket(self) -> Any:
        return socket_of(self.transport)

    @property
    def may_half_close(self) -> bool:
        return not self._tls

    def peer_gone(self, why: str) -> None:
        _log.info(
            "tunnel {id}: public client gone while paused ({why}); resetting its stream",
            id=self.tunnel_id,
            why=why,
        )
        if self.transport is not None:
            # connectionLost follows, and resets the stream (CANCEL).
            self.transport.abortConnection()  # type: ignore[attr-defined]

    # -- data ------------------------------------------------------------------------------

    def target_unreachable(self) -> None:
        """
        The agent could not connect to the tunnel's target, so nothing was sent. Close
        cleanly (the stream opens only after any TLS handshake): the client sees an empty
        reply, not a TLS error that would look like a problem with the relay's certificate.
        The member that served it leaves its pool's rotation for a while.
        """
        self.relay.target_refused(self)
        if self.transport is not None:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.other is None:
            # Before the stream opens (TLS delivers nothing before its handshake completes;
            # this only guards against a layer that would): kept, within a bound.
            self._early.append(data)
            self._early_size += len(data)
            if self._early_size > _EARLY_DATA_LIMIT and self.transport is not None:
                self.transport.abortConnection()  # type: ignore[attr-defined]
            return
        if self.relay.config.idle_timeout:
            self._touch()  # guarded here: this runs for every chunk a client sends
        if self._replay is not None:
            self._replay.append(data)
            self._replay_size += len(data)
            if self._replay_size > _REPLAY_LIMIT:
                self._replay = None
        write_now(self.other, data)
        if self._throttle is not None:
            self._throttle.up.sent(self, len(data))

    def readConnectionLost(self) -> None:
        if self.other is None:
            self._early_end = True
            return
        self._client_ended = True
        super().readConnectionLost()

    def answered(self) -> None:
        """
        The target sent its first bytes: its member is in rotation, and nothing is kept for
        a replay any more.
        """
        if not self._answered:
            self._answered = True
            self._replay = None
            self.relay.target_answered(self)

    def retry(self) -> bool:
        """
        The agent refused this connection's stream unprocessed (REFUSED_STREAM: it was
        draining when the stream reached it): open one on another member of the tunnel's
        pool and send it what the client sent so far. Whether it was moved (False: nothing
        to move to, or too late, and the connection is reset).
        """
        if (
            self._answered
            or self._replay is None
            or self._retries >= _MAX_RETRIES
            or self.lost
            or self.transport is None
        ):
            return False
        stream = self.relay.reopen_public_stream(self)
        if stream is None:
            return False
        self._retries += 1
        self.other = stream
        stream.registerProducer(self, True)
        if self._throttle is not None:
            # The new stream is charged to the tunnel's download limit like the first.
            if self._download is not None:
                self._throttle.down.forget(self._download)
            self._download = _StreamGate(stream, self._throttle)
        stream.attach(_Activity(self, self.transport, self._download))
        if self._replay:
            write_now(stream, b"".join(self._replay))
        if self._client_ended:
            half_close(stream)
        return True

    def _touch(self) -> None:
        timeout = self.relay.config.idle_timeout
        if not timeout:
            return
        if self._idle is not None and self._idle.active():
            self._idle.reset(timeout)
        else:
            self._idle = self.relay.reactor.callLater(timeout, self._idled)

    def _idled(self) -> None:
        self._idle = None
        if self.other is not None:
            self.other.abortConnection(ErrorCode.IDLE_TIMEOUT)
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = error.ConnectionDone) -> None:  # type: ignore[assignment]
        self.lost = True
        # A reset costs the agent only while its side of the stream is open: a client that
        # resets after the whole answer (as `wrk` does on `Connection: close`) is not charged.
        agent_open = isinstance(self.other, Stream) and self.other.peer_open
        self._early = []
        self._record = None
        if self._holds:
            # Only a held (paused) connection is watched (`_hold`, `_release`).
            self.relay.paused_watch.discard(self)
        if self._throttle is not None:
            self._throttle.up.forget(self)
            if self._download is not None:
                self._throttle.down.forget(self._download)
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        if not self._counted:
            return
        self._counted = False
        self.relay.public_connections.discard(self)
        self.relay.public_closed(self.tunnel_id, self)
        if agent_open and not isinstance(reason.value, _ORDERLY):
            # The client reset (or broke) its connection while the agent's side was open, so
            # its stream is reset: counted against its source. The relay's own aborts (idle,
            # a target's reset) are not.
            _count_reset(self.relay, self.transport)
        super().connectionLost(reason)


#: A public connection's ends that are not the client's reset.
_ORDERLY = (error.ConnectionDone, error.ConnectionAborted)


def _count_reset(relay: Relay, transport: Any) -> None:
    """
    Charge a client's reset to its source (`Relay.reset_guard`); say so, summarised, when
    that blocks the source.
    """
    if transport is None:
        return
    source = source_of(transport.getPeer())
    if relay.reset_guard.reset(source):
        relay.ratelog.warn(
            "resets-per-source",
            "public source {source} resets connections faster than "
            "{rate:g}/s: refusing its connections for {hold:g} s",
            source=source,
            rate=relay.config.source_reset_rate,
            hold=relay.reset_guard.hold,
        )


def _read_now(transport: tcp.Server) -> None:
    """
    Read what a raw TCP client sent with its connect, in the turn that accepted it, as
    the reactor would in the next one: a client that speaks first (HTTP, most protocols)
    has its first bytes sent with the stream's OPEN, a reactor turn sooner. Nothing there
    costs one ``recv`` that finds nothing. An end of input or an error found so is handled
    as the reactor handles it.
    """
    why = transport.doRead()
    if why:
        transport.reactor._disconnectSelectable(transport, why, True)  # type: ignore[attr-defined]


#: Stream reset codes meaning that the agent could not reach the tunnel's target: nothing was
#: sent on the stream, so the public client is closed cleanly rather than reset.
_TARGET_UNREACHABLE = frozenset({ErrorCode.CONNECT_FAILED, ErrorCode.CONNECT_TIMEOUT})


class _Activity(SpliceProtocol):
    """
    The stream's side of a public connection: forwards to the public transport, counts as
    activity for the idle timeout, and charges the tunnel's download rate limit (through
    `gate`, if it has one).
    """

    def __init__(self, public: PublicProtocol, transport: Any, gate: _StreamGate | None) -> None:
        super().__init__(transport)
        self.public = public
        self.gate = gate

    def connectionMade(self) -> None:
        if self.gate is None:
            super().connectionMade()
            return
        set_nodelay(self.transport)
        # The public transport pauses the gate, which pauses the stream for that reason too.
        self.other.registerProducer(self.gate, True)

    def dataReceived(self, data: bytes) -> None:
        public = self.public
        if public.relay.config.idle_timeout:
            public._touch()  # guarded here: this runs for every chunk the target sends
        if not public._answered:
            public.answered()
        write_now(self.other, data)
        gate = self.gate
        if gate is not None:
            gate.throttle.down.sent(gate, len(data))

    def closeOther(self, reason: Failure) -> None:
        code = reason.value.code if isinstance(reason.value, StreamResetError) else None
        if code in _TARGET_UNREACHABLE:
            self.public.target_unreachable()
        elif code == ErrorCode.REFUSED_STREAM and self.public.retry():
            return
        else:
            super().closeOther(reason)


@implementer(IPushProducer)
class _StreamGate:
    """
    The producer registered on a rate-limited tunnel's public transport in place of its
    stream: the stream is paused while the public client cannot take more *or* the
    tunnel's download is over its rate (a paused stream returns no credit, so the agent
    stops sending), and resumes when neither holds.
    """

    def __init__(self, stream: Stream, throttle: Throttle) -> None:
        self.stream = stream
        self.throttle = throttle
        self._holds: set[str] = set()

    def pauseProducing(self) -> None:
        self._hold("client")

    def resumeProducing(self) -> None:
        self._release("client")

    def stopProducing(self) -> None:
        self.stream.stopProducing()

    def throttled(self) -> None:
        self._hold("rate")

    def unthrottled(self) -> None:
        self._release("rate")

    def _hold(self, reason: str) -> None:
        first = not self._holds
        self._holds.add(reason)
        if first:
            self.stream.pauseProducing()

    def _release(self, reason: str) -> None:
        if reason not in self._holds:
            return
        self._holds.discard(reason)
        if not self._holds:
            self.stream.resumeProducing()


class _PublicFactory(Factory):
    """
    Builds the protocols of public connections to one tunnel (TLS-terminated or raw TCP),
    for the clients its deny and allow lists admit.
    """

    noisy = False

    def __init__(self, relay: Relay, tunnel_id: str, tls: bool) -> None:
        self.relay = relay
        self.tunnel_id = tunnel_id
        self.tls = tls
        #: The own address of every connection it builds for, when they all have the same
        #: (a raw TCP listener bound to one address: `_accept.local_address`); None: each
        #: connection's is asked of its socket.
        self.here: Any = None

    def buildProtocol(self, addr: Any) -> Protocol | None:
        """
        @raise AccessDenied: a TLS client the deny or allow list refuses, or whose source is
            blocked for resetting its connections too fast (it gets an ``access_denied``
            alert). A raw TCP one gets None: its connection is closed.
        """
        relay = self.relay
        guard = relay.reset_guard
        if guard.blocking and not guard.admits(source := source_of(addr)):
            # Before any stream: the agent and its local server never see the connection.
            relay.refused["resets_per_source"] += 1
            relay.ratelog.warn(
                "resets-per-source-refused",
                "refusing a connection to tunnel {id} from {source}: it resets too many",
                id=self.tunnel_id,
                source=source,
            )
            if self.tls:
                raise AccessDenied(f"{source} resets too many connections")
            return None
        record = relay.registry.get(self.tunnel_id)
        host = getattr(addr, "host", "")
        why = None
        if record is not None and record.deny is not None and not record.deny.admits(host):
            why = "is on the deny list"
        elif record is not None and record.allow is not None and not record.allow.admits(host):
            why = "is not on the allow list"
        if why is not None:
            self.relay.denied_connections += 1
            if self.tls:
                raise AccessDenied(f"{host or '?'} {why}")
            return None
        return PublicProtocol(
            self.relay,
            self.tunnel_id,
            addr,
            read_at_once=not self.tls,
            here=self.here,
            # A raw TCP connection's stream opens in this same call (`connectionMade`).
            record=None if self.tls else record,
        )
