"""
The relay: agent links, tunnel grants, and public connections dispatched to streams.

`Relay` holds the state (registry, links, TCP listeners) and the routing decision for each
public TLS connection; `RelayLink` is the relay's end of an agent's link; `PublicProtocol`
joins one public connection to one stream. `RelayService` wires them into a Twisted
`MultiService` with graceful drain on stop.
"""

from __future__ import annotations

import gc
import hashlib
import hmac
import signal
from dataclasses import dataclass, field
from typing import Any

from OpenSSL import SSL, crypto
from twisted.application import service
from twisted.internet import defer, error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from tunnel import __version__
from tunnel._allow import AllowList
from tunnel._clientca import parse_client_cas
from tunnel.link import (
    LinkProtocol,
    SpliceProtocol,
    Stream,
    StreamResetError,
    set_nodelay,
    write_now,
)
from tunnel.relay import _memory
from tunnel.relay._clienthello import ClientHello
from tunnel.relay._sni import AccessDenied, Route, SNIDispatchFactory, source_of
from tunnel.relay._tls import LINK_ALPN, RelayTLS
from tunnel.relay._tokens import TokenFile
from tunnel.relay.registry import (
    PortPool,
    ReclaimKey,
    TunnelRecord,
    TunnelRegistry,
    valid_tunnel_id,
)
from tunnel.wire import ErrorCode, LinkSettings, LocalProtocolError
from tunnel.wire.control import (
    AgentHello,
    ControlError,
    ControlMessage,
    ErrorMessage,
    RelayWelcome,
    StreamInfo,
    TunnelClose,
    TunnelClosed,
    TunnelGranted,
    TunnelRefused,
    TunnelRequest,
    decode_message,
    encode_message,
)

__all__ = ["PublicProtocol", "Relay", "RelayConfig", "RelayLink", "RelayService"]

_log = Logger()

#: Seconds between checks of the tokens file for changes.
TOKENS_CHECK_INTERVAL = 2.0

#: What this relay supports beyond the first release (`RelayWelcome.features`).
FEATURES = ("allow", "client_ca")

HTTP1 = (b"http/1.1",)
H2 = (b"h2", b"http/1.1")


@dataclass
class RelayConfig:
    """
    Everything the relay is told at start.
    """

    #: Tunnels are ``<id>.<domain>``; agents connect to ``<domain>``.
    domain: str
    #: The port public clients use for TLS, written into URLs (0: the listening port).
    public_port: int = 443
    #: The range raw TCP tunnels take their ports from, inclusive.
    tcp_ports: tuple[int, int] = (20000, 29999)
    #: The address raw TCP listeners bind to ("" for all).
    tcp_interface: str = ""
    #: Accepted agent tokens; None accepts any agent.
    tokens: frozenset[str] | None = None
    #: The file `tokens` came from, watched for changes (None: they never change).
    tokens_file: TokenFile | None = None
    #: Seconds a public TLS handshake (or an agent's hello) may take.
    handshake_timeout: float = 10.0
    #: TLS handshakes in progress at once; more are refused at accept.
    max_pending_handshakes: int = 1024
    #: Of those, from one source (an IPv4 address or an IPv6 /64).
    max_pending_per_source: int = 256
    #: Tunnels one agent link may hold.
    max_tunnels_per_agent: int = 64
    #: Streams open on one link at once (public connections through one agent).
    max_streams_per_link: int = 4096
    #: Public connections open through one tunnel at once.
    max_connections_per_tunnel: int = 1024
    #: Seconds a public connection may go without traffic in either direction; None = never.
    idle_timeout: float | None = None
    #: Keepalive of agent links.
    keepalive_interval: float = 5.0
    keepalive_timeout: float = 15.0
    #: Seconds in-flight streams may run on after a stop signal.
    drain_grace: float = 30.0
    #: Seconds a released TCP port waits before a different tunnel may take it.
    port_quarantine: float = 300.0
    #: Link settings of the relay's end.
    link: LinkSettings = field(default_factory=LinkSettings)


class Relay:
    """
    The relay's state and decisions. All methods run on the reactor thread.
    """

    def __init__(
        self,
        reactor: Any,
        config: RelayConfig,
        tls: RelayTLS,
        reclaim_key: ReclaimKey,
    ) -> None:
        self.reactor = reactor
        self.config = config
        self.tls = tls
        self.reclaim_key = reclaim_key
        self.registry = TunnelRegistry()
        self.ports = PortPool(
            config.tcp_ports[0], config.tcp_ports[1], reactor.seconds, config.port_quarantine
        )
        self.links: set[RelayLink] = set()
        self.public_connections: set[Protocol] = set()
        #: Public connections refused by a tunnel's allow list, since start.
        self.denied_connections = 0
        self.draining = False
        self.domain = config.domain.lower().rstrip(".")
        self._suffix = "." + self.domain
        self.link_factory = Factory.forProtocol(lambda: RelayLink(self))
        self.link_factory.noisy = False
        self.info_factory = Factory.forProtocol(_InfoPage)
        self.info_factory.noisy = False

    # -- routing of public TLS connections ----------------------------------------------------

    def route(self, hello: ClientHello) -> Route | None:
        """
        Where a public TLS connection goes: the agent-link endpoint for ``<domain>`` with the
        link's ALPN, a small page for ``<domain>`` otherwise, a live tunnel for
        ``<id>.<domain>``, and nowhere (an ``unrecognized_name`` alert) for anything else.
        An unknown id and an offline one are refused alike.
        """
        name = hello.server_name
        if self.draining:
            return None
        tunnel_id = name[: -len(self._suffix)] if name and name.endswith(self._suffix) else None
        if tunnel_id is None and LINK_ALPN in hello.alpn:
            # An agent may dial the relay by any name its certificate covers.
            return Route(self.tls.context_for((LINK_ALPN,)), self.link_factory)
        if name == self.domain:
            return Route(self.tls.context_for(HTTP1), self.info_factory)
        if tunnel_id is None:
            return None
        record = self.registry.get(tunnel_id)
        if record is None:
            return None
        context = record.context or self.tls.context_for(self._alpn(record.options))
        return Route(context, _PublicFactory(self, tunnel_id, tls=True))

    @staticmethod
    def _alpn(options: dict[str, Any]) -> tuple[bytes, ...]:
        return H2 if options.get("h2") else HTTP1

    def host_of(self, tunnel_id: str) -> str:
        """
        The public host name of a tunnel.
        """
        return f"{tunnel_id}.{self.domain}"

    # -- agent authentication ------------------------------------------------------------------

    def authenticate(self, token: str | None) -> bool:
        """
        Whether `token` is accepted; every configured token is compared in constant time.
        """
        tokens = self.config.tokens
        if tokens is None:
            return True
        if not token:
            return False
        given = token.encode()
        ok = False
        for candidate in tokens:
            ok |= hmac.compare_digest(candidate.encode(), given)
        return ok

    def set_tokens(self, tokens: frozenset[str]) -> None:
        """
        Accept `tokens` from now on; links accepted with a token no longer among them are
        told (``unauthorized``) and closed, with their tunnels.
        """
        self.config.tokens = tokens
        for link in list(self.links):
            if link.authenticated and not self.authenticate(link.token):
                _log.warn("token of agent {peer} revoked; closing its link", peer=link.peer_name)
                link.refuse(
                    "unauthorized", "the relay no longer accepts this token", ErrorCode.UNAUTHORIZED
                )

    def reload_tokens(self) -> None:
        """
        Read the tokens file again if it changed (`set_tokens`); an unreadable or empty file
        keeps the tokens as they were.
        """
        tokens_file = self.config.tokens_file
        if tokens_file is None or not tokens_file.changed():
            return
        try:
            tokens = tokens_file.read()
        except (OSError, ValueError) as e:
            _log.error("tokens not reloaded, keeping the previous ones: {e}", e=e)
            return
        if tokens != self.config.tokens:
            _log.info("tokens reloaded from {path}: {n}", path=tokens_file.path, n=len(tokens))
            self.set_tokens(tokens)

    # -- tunnels -------------------------------------------------------------------------------

    def grant(self, link: RelayLink, request: TunnelRequest) -> ControlMessage:
        """
        Grant a tunnel to `link`, or say why not.
        """
        refuse = lambda code, message: TunnelRefused(request.request_id, code, message)  # noqa: E731
        if self.draining:
            return refuse("draining", "the relay is shutting down")
        kind = request.kind
        if request.reclaim_id is not None:
            tunnel_id = request.reclaim_id
            if (
                not valid_tunnel_id(tunnel_id)
                or request.reclaim_secret is None
                or not self.reclaim_key.verify(kind, tunnel_id, request.reclaim_secret)
            ):
                _log.warn("refused a reclaim of {id} with a wrong secret", id=tunnel_id)
                return refuse("reclaim_refused", "the reclaim secret does not match the tunnel")
            existing = self.registry.get(tunnel_id)
            if existing is not None:
                if existing.owner is link:
                    return self._granted(request, existing)
                # An authenticated reclaim wins over a stale session still holding the id.
                _log.info("tunnel {id} reclaimed from an older link", id=tunnel_id)
                self.close_tunnel(existing, "reclaimed by another link")
        else:
            tunnel_id = self.registry.fresh_id()
        if len(self.registry.owned_by(link)) >= self.config.max_tunnels_per_agent:
            return refuse(
                "limit", f"an agent may hold at most {self.config.max_tunnels_per_agent} tunnels"
            )
        options = {k: v for k, v in request.options.items() if k in ("h2",)}
        allow = context = None
        try:
            if "allow" in request.options:
                allow = AllowList.parse(request.options["allow"])
            if "client_ca" in request.options:
                if kind == "tcp":
                    raise ValueError(
                        "client certificates need a TLS tunnel: its raw TCP port would let "
                        "clients without one in"
                    )
                cas = parse_client_cas(request.options["client_ca"])
                try:
                    context = self.tls.client_verifying_context(self._alpn(options), cas)
                except (SSL.Error, crypto.Error) as e:
                    raise ValueError(f"client_ca is not usable: {e}") from None
        except ValueError as e:
            return refuse("bad_request", str(e))
        record = TunnelRecord(tunnel_id, kind, link, options, allow, context=context)
        if kind == "tcp" and not self._listen_tcp(record, request.reclaim_port):
            return refuse("no_ports", "no free port in the relay's TCP range")
        self.registry.add(record)
        _log.info(
            "granted {kind} tunnel {host}{port} to {peer}{restrictions}",
            kind=kind,
            host=self.host_of(tunnel_id),
            port=f" (tcp port {record.tcp_port})" if record.tcp_port else "",
            peer=link.peer_name,
            restrictions=(f", clients from {', '.join(allow.entries())} only" if allow else "")
            + (", client certificates required" if context is not None else ""),
        )
        return self._granted(request, record)

    def _granted(self, request: TunnelRequest, record: TunnelRecord) -> TunnelGranted:
        return TunnelGranted(
            request_id=request.request_id,
            tunnel_id=record.tunnel_id,
            host=self.host_of(record.tunnel_id),
            port=self.config.public_port,
            tcp_host=self.domain if record.kind == "tcp" else None,
            tcp_port=record.tcp_port,
            secret=self.reclaim_key.secret(record.kind, record.tunnel_id),
        )

    def _listen_tcp(self, record: TunnelRecord, wanted: int | None) -> bool:
        factory = _PublicFactory(self, record.tunnel_id, tls=False)
        for port in self.ports.candidates(record.tunnel_id, wanted):
            try:
                listener = self.reactor.listenTCP(
                    port, factory, backlog=128, interface=self.config.tcp_interface
                )
            except error.CannotListenError:
                continue
            self.ports.take(port)
            record.tcp_port = port
            record.listener = listener
            return True
        return False

    def close_tunnel(self, record: TunnelRecord, reason: str, notify: bool = True) -> None:
        """
        Remove a tunnel: stop its listener, free its port, and tell its owner.
        """
        if self.registry.get(record.tunnel_id) is not record:
            return
        self.registry.remove(record.tunnel_id)
        stopped: defer.Deferred[Any] = defer.succeed(None)
        if record.listener is not None:
            stopped = defer.maybeDeferred(record.listener.stopListening)
            record.listener = None
        if record.tcp_port is not None:
            self.ports.release(record.tcp_port, record.tunnel_id)
        owner: RelayLink = record.owner
        for stream in list(owner.streams.values()):
            if stream.tunnel_id == record.tunnel_id:
                stream.abortConnection(ErrorCode.SHUTDOWN)
        if notify:
            # Confirmed once the port is really closed, so the agent's close() means it.
            stopped.addBoth(lambda _: owner.send(TunnelClosed(record.tunnel_id, reason)))

    def link_lost(self, link: RelayLink) -> None:
        """
        An agent's link ended: its tunnels go offline (and can be reclaimed).
        """
        self.links.discard(link)
        for record in self.registry.owned_by(link):
            self.close_tunnel(record, "link lost", notify=False)

    # -- public connections --------------------------------------------------------------------

    def open_public_stream(self, tunnel_id: str, protocol: Protocol) -> Stream | None:
        """
        Open a stream to the agent owning `tunnel_id` for a new public connection.

        @return: the stream, or None when the tunnel is gone or over a limit (the caller
            closes the public connection).
        """
        record = self.registry.get(tunnel_id)
        if record is None or self.draining:
            return None
        if record.connections >= self.config.max_connections_per_tunnel:
            _log.warn(
                "tunnel {id}: {n} connections open, refusing another",
                id=tunnel_id,
                n=record.connections,
            )
            return None
        transport = protocol.transport
        assert transport is not None
        peer = transport.getPeer()
        here = transport.getHost()
        info = StreamInfo(
            tunnel_id,
            getattr(peer, "host", ""),
            getattr(peer, "port", 0),
            getattr(here, "host", ""),
            getattr(here, "port", 0),
        )
        link: RelayLink = record.owner
        if len(link.streams) >= self.config.max_streams_per_link:
            _log.warn(
                "link of {peer}: {n} streams open, refusing another",
                peer=link.peer_name,
                n=len(link.streams),
            )
            return None
        try:
            stream = link.openStream(
                info.encode(), peer if isinstance(peer, IPv4Address | IPv6Address) else None
            )
        except LocalProtocolError as e:
            _log.warn("tunnel {id}: cannot open a stream: {e}", id=tunnel_id, e=e)
            return None
        stream.tunnel_id = tunnel_id
        record.connections += 1
        return stream

    def public_closed(self, tunnel_id: str) -> None:
        """
        A public connection through `tunnel_id` ended.
        """
        record = self.registry.get(tunnel_id)
        if record is not None and record.connections > 0:
            record.connections -= 1

    # -- drain ---------------------------------------------------------------------------------

    def drain(self) -> defer.Deferred[None]:
        """
        Stop taking new public connections and links, tell agents we are going away, let
        streams in flight finish for `drain_grace` seconds, then close everything.
        """
        self.draining = True
        for record in list(self.registry.all()):
            if record.listener is not None:
                record.listener.stopListening()
                record.listener = None
        for link in list(self.links):
            link.goAway(ErrorCode.NO_ERROR, "relay shutting down")
        done: defer.Deferred[None] = defer.Deferred()
        deadline = self.reactor.seconds() + self.config.drain_grace

        def check() -> None:
            busy = any(link.streams for link in self.links)
            if not busy or self.reactor.seconds() >= deadline:
                for link in list(self.links):
                    link.goAway(ErrorCode.SHUTDOWN, "relay shut down")
                    link.abort()
                for protocol in list(self.public_connections):
                    if protocol.transport is not None:
                        protocol.transport.abortConnection()  # type: ignore[attr-defined]
                done.callback(None)
                return
            self.reactor.callLater(0.1, check)

        check()
        return done


class RelayLink(LinkProtocol):
    """
    The relay's end of one agent's link.
    """

    def __init__(self, relay: Relay) -> None:
        config = relay.config
        super().__init__(
            relay.reactor,
            client=False,
            settings=config.link,
            keepalive_interval=config.keepalive_interval,
            keepalive_timeout=config.keepalive_timeout,
        )
        self.relay = relay
        self.authenticated = False
        #: The token it was accepted with (checked again when the tokens change).
        self.token: str | None = None
        self.peer_name = "?"
        #: Who the link acts for, the key of per-party bounds and of reclaim secrets:
        #: ``token:<digest>`` once accepted with a token, else ``addr:<source>`` (an IPv4
        #: address or an IPv6 /64) of a relay that needs no token.
        self.principal = "?"
        self._hello_timer: Any = None

    def connectionMade(self) -> None:
        super().connectionMade()
        transport = self.transport
        assert transport is not None
        peer = transport.getPeer()
        self.peer_name = f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"
        self.principal = "addr:" + source_of(peer)
        self.relay.links.add(self)
        self._hello_timer = self.reactor.callLater(
            self.relay.config.handshake_timeout, self._hello_timeout
        )

    def _hello_timeout(self) -> None:
        self._hello_timer = None
        if not self.authenticated:
            _log.warn("agent link from {peer} sent no hello in time", peer=self.peer_name)
            self.refuse("timeout", "no hello in time", ErrorCode.TIMEOUT)

    def send(self, message: ControlMessage) -> None:
        """
        Send a control message to the agent.
        """
        self.sendControl(encode_message(message))

    def refuse(self, code: str, message: str, error_code: int) -> None:
        """
        Tell the agent why, then end the link.
        """
        self.send(ErrorMessage(code, message))
        self.goAway(error_code, message)

    def controlReceived(self, payload: bytes) -> None:
        try:
            message = decode_message(payload)
        except ControlError as e:
            _log.warn("malformed control message from {peer}: {e}", peer=self.peer_name, e=e)
            self.refuse("bad_message", str(e), ErrorCode.PROTOCOL_ERROR)
            return
        if message is None:
            return
        if isinstance(message, AgentHello):
            self._hello(message)
        elif not self.authenticated:
            self.refuse(
                "unauthorized", "the first control message must be hello", ErrorCode.UNAUTHORIZED
            )
        elif isinstance(message, TunnelRequest):
            self.send(self.relay.grant(self, message))
        elif isinstance(message, TunnelClose):
            record = self.relay.registry.get(message.tunnel_id)
            if record is not None and record.owner is self:
                self.relay.close_tunnel(record, "closed by the agent")
                _log.info("tunnel {id} closed by its agent", id=message.tunnel_id)
            else:
                self.send(TunnelClosed(message.tunnel_id, "not held by this agent"))

    def _hello(self, hello: AgentHello) -> None:
        if self.authenticated:
            return
        if self._hello_timer is not None and self._hello_timer.active():
            self._hello_timer.cancel()
        self._hello_timer = None
        if not self.relay.authenticate(hello.token):
            _log.warn("refused agent {peer}: wrong token", peer=self.peer_name)
            self.refuse(
                "unauthorized", "the relay does not accept this token", ErrorCode.UNAUTHORIZED
            )
            return
        self.authenticated = True
        self.token = hello.token
        if hello.token:
            self.principal = "token:" + hashlib.sha256(hello.token.encode()).hexdigest()[:32]
        _log.info("agent {peer} connected ({agent})", peer=self.peer_name, agent=hello.agent)
        config = self.relay.config
        self.send(
            RelayWelcome(
                domain=self.relay.domain,
                public_port=config.public_port,
                keepalive_interval=config.keepalive_interval,
                keepalive_timeout=config.keepalive_timeout,
                relay=f"tunnels/{__version__}",
                features=list(FEATURES),
            )
        )

    def streamOpened(self, stream: Stream, metadata: bytes) -> None:
        # Agents do not open streams.
        stream.abortConnection(ErrorCode.REFUSED_STREAM)

    def linkLost(self, reason: Failure) -> None:
        if self._hello_timer is not None and self._hello_timer.active():
            self._hello_timer.cancel()
        if self.authenticated:
            _log.info("agent {peer} disconnected", peer=self.peer_name)
        self.relay.link_lost(self)


@implementer(IHandshakeListener)
class PublicProtocol(SpliceProtocol):
    """
    A public client's connection (TLS-terminated, or raw TCP), joined to a new stream.
    """

    def __init__(self, relay: Relay, tunnel_id: str) -> None:
        super().__init__(None)
        self.relay = relay
        self.tunnel_id = tunnel_id
        self._counted = False
        self._idle: Any = None
        self._handshaking = False
        self._close_when_ready = False

    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None
        self._handshaking = isinstance(transport, TLSMemoryBIOProtocol)
        set_nodelay(transport)
        stream = self.relay.open_public_stream(self.tunnel_id, self)
        if stream is None:
            transport.abortConnection()  # type: ignore[attr-defined]
            return
        self._counted = True
        self.relay.public_connections.add(self)
        self.other = stream
        stream.registerProducer(transport, True)
        stream.attach(_Activity(self, transport))
        if self.relay.config.idle_timeout:
            self._touch()

    def handshakeCompleted(self) -> None:
        self._handshaking = False
        if self._close_when_ready and self.transport is not None:
            self.transport.loseConnection()

    def target_unreachable(self) -> None:
        """
        The agent could not connect to the tunnel's target, so nothing was sent. Close
        cleanly, after the TLS handshake if it is still going (the relay's handshake timeout
        bounds that): the client sees an empty reply, not a TLS error that would look like
        a problem with the relay's certificate.
        """
        if self._handshaking:
            self._close_when_ready = True
        elif self.transport is not None:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        self._touch()
        write_now(self.other, data)

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
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        if not self._counted:
            return
        self._counted = False
        self.relay.public_connections.discard(self)
        self.relay.public_closed(self.tunnel_id)
        super().connectionLost(reason)


#: Stream reset codes meaning that the agent could not reach the tunnel's target: nothing was
#: sent on the stream, so the public client is closed cleanly rather than reset.
_TARGET_UNREACHABLE = frozenset({ErrorCode.CONNECT_FAILED, ErrorCode.CONNECT_TIMEOUT})


class _Activity(SpliceProtocol):
    """
    The stream's side of a public connection: forwards to the public transport and counts
    as activity for the idle timeout.
    """

    def __init__(self, public: PublicProtocol, transport: Any) -> None:
        super().__init__(transport)
        self.public = public

    def dataReceived(self, data: bytes) -> None:
        self.public._touch()
        write_now(self.other, data)

    def closeOther(self, reason: Failure) -> None:
        if reason.check(StreamResetError) and reason.value.code in _TARGET_UNREACHABLE:  # type: ignore[union-attr]
            self.public.target_unreachable()
        else:
            super().closeOther(reason)


class _PublicFactory(Factory):
    """
    Builds the protocols of public connections to one tunnel (TLS-terminated or raw TCP),
    for the clients its allow list admits.
    """

    noisy = False

    def __init__(self, relay: Relay, tunnel_id: str, tls: bool) -> None:
        self.relay = relay
        self.tunnel_id = tunnel_id
        self.tls = tls

    def buildProtocol(self, addr: Any) -> Protocol | None:
        """
        @raise AccessDenied: a TLS client the allow list refuses (it gets an
            ``access_denied`` alert). A raw TCP one gets None: its connection is closed.
        """
        record = self.relay.registry.get(self.tunnel_id)
        allow = record.allow if record is not None else None
        if allow is not None and not allow.admits(getattr(addr, "host", "")):
            self.relay.denied_connections += 1
            if self.tls:
                raise AccessDenied(f"{getattr(addr, 'host', '?')} is not on the allow list")
            return None
        return PublicProtocol(self.relay, self.tunnel_id)


class _InfoPage(Protocol):
    """
    What a browser sees at ``https://<domain>/``: a one-line page, then the connection
    closes.
    """

    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" not in data and len(data) < 8192:
            return
        body = b"This is a Tunnels relay. Tunnels live at https://<id>.<this host>/.\n"
        transport = self.transport
        assert transport is not None
        transport.write(
            b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
        )
        transport.loseConnection()


class RelayService(service.MultiService):
    """
    The relay as a Twisted service: the public TLS listener plus drain on stop.
    """

    def __init__(self, reactor: Any, relay: Relay, listen: str, admin: str | None = None) -> None:
        super().__init__()
        self.admin = admin
        self.reactor = reactor
        self.relay = relay
        self.front = SNIDispatchFactory(
            relay.route,
            reactor,
            handshake_timeout=relay.config.handshake_timeout,
            max_pending_handshakes=relay.config.max_pending_handshakes,
            max_pending_per_source=relay.config.max_pending_per_source,
        )
        self.endpoint = serverFromString(reactor, listen)
        self.port: Any = None
        self.admin_port: Any = None
        self._collector: LoopingCall | None = None
        self._token_watch: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        # Memory freed under churn goes back to the system every 30 s (see `_memory`); the
        # start-up objects are frozen out of the collector's scans.
        gc.freeze()
        self._collector = LoopingCall(_memory.collect)
        self._collector.clock = self.reactor
        self._collector.start(_memory.INTERVAL, now=False)
        if self.relay.config.tokens_file is not None:
            # Token changes (added, revoked) apply within TOKENS_CHECK_INTERVAL, or at once on
            # SIGHUP; no restart.
            self._token_watch = LoopingCall(self.relay.reload_tokens)
            self._token_watch.clock = self.reactor
            self._token_watch.start(TOKENS_CHECK_INTERVAL, now=False)
        # SIGHUP means "reload" to operators; by default it would end the process.
        signal.signal(
            signal.SIGHUP, lambda signum, frame: self.reactor.callFromThread(self._sighup)
        )
        if self.admin:
            from tunnel.relay.admin import admin_site

            def admin_listening(port: Any) -> None:
                self.admin_port = port
                address = port.getHost()
                _log.info(
                    "admin on http://{host}:{port}/metrics", host=address.host, port=address.port
                )

            serverFromString(self.reactor, self.admin).listen(
                admin_site(self.relay, self.front, lambda: self.port is not None)
            ).addCallbacks(admin_listening, lambda f: _log.failure("cannot listen for admin", f))
        d = self.endpoint.listen(self.front)

        def listening(port: Any) -> None:
            self.port = port
            address = port.getHost()
            if not self.relay.config.public_port:
                self.relay.config.public_port = address.port
            _log.info(
                "relay listening on {host}:{port} for *.{domain}",
                host=address.host,
                port=address.port,
                domain=self.relay.domain,
            )

        def failed(reason: Failure) -> None:
            _log.failure("cannot listen on the public port", reason)
            self.reactor.stop()

        d.addCallbacks(listening, failed)

    def _sighup(self) -> None:
        if self.relay.config.tokens_file is None:
            _log.info("SIGHUP: nothing to reload (no --tokens file)")
            return
        _log.info("SIGHUP: checking {path}", path=self.relay.config.tokens_file.path)
        self.relay.reload_tokens()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        _log.info(
            "relay draining: no new connections, {grace}s grace",
            grace=self.relay.config.drain_grace,
        )
        port = self.port
        self.port = None
        for loop in (self._collector, self._token_watch):
            if loop is not None and loop.running:
                loop.stop()
        if self.admin_port is not None:
            self.admin_port.stopListening()
            self.admin_port = None
        stopped: defer.Deferred[Any] = (
            defer.maybeDeferred(port.stopListening) if port is not None else defer.succeed(None)
        )
        stopped.addCallback(lambda _: self.relay.drain())
        return stopped


def parse_port_range(text: str) -> tuple[int, int]:
    """
    Parse ``LOW-HIGH`` (or a single port).

    @raise ValueError: not a valid range.
    """
    low, _, high = text.partition("-")
    lo, hi = int(low), int(high or low)
    if not 1 <= lo <= hi <= 65535:
        raise ValueError(f"bad port range {text!r}")
    return lo, hi
