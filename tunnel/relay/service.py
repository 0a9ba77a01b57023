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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from OpenSSL import SSL, crypto
from twisted.application import service
from twisted.internet import defer, error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IHandshakeListener, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel
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
    half_close,
    set_nodelay,
    write_now,
)
from tunnel.relay import _memory
from tunnel.relay._clienthello import ClientHello
from tunnel.relay._info import info_factory
from tunnel.relay._peerwatch import PausedWatch, set_keepalive, socket_of
from tunnel.relay._ratelog import RateLog, shorten
from tunnel.relay._shares import Buckets, Holdings, TokenBucket
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

#: Seconds a link holding a tunnel that another link reclaims has to answer a ping before it
#: loses the tunnel (a stale session: the agent reconnected before the old link was found
#: dead). A holder that answers keeps it, and the reclaim is refused.
RECLAIM_PROBE_TIMEOUT = 1.0

#: Octets a public TLS connection may deliver before its stream opens (TLS delivers none
#: before the handshake completes; this only bounds what a TLS layer might let through).
_EARLY_DATA_LIMIT = 256 * 1024

#: What this relay supports beyond the first release (`RelayWelcome.features`).
FEATURES = ("allow", "client_ca")

#: Reasons of refusals counted in `Relay.refused` (and shown as ``refused_<reason>``).
REFUSALS = (
    "connections_per_tunnel",
    "connections_per_source",
    "streams_per_link",
    "streams_per_token",
    "tunnel_requests_rate",
    "links_per_token",
)

#: A link refused this many tunnel requests for their rate (refilled at one per second)
#: that goes on asking is ended with GOAWAY ENHANCE_YOUR_CALM.
RATE_STRIKES = 32

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
    #: Seconds from accept until the whole ClientHello has arrived (at most the above).
    client_hello_timeout: float = 3.0
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
    #: Of those, from one source (an IPv4 address or an IPv6 /64).
    max_connections_per_source: int = 256
    #: Authenticated links of one principal (a token, or a source without tokens).
    max_links_per_token: int = 256
    #: Streams open at once over all the links of one principal.
    max_streams_per_token: int = 16384
    #: Tunnel requests of one link: per second, and the burst allowed at once.
    tunnel_request_rate: float = 10.0
    tunnel_request_burst: int = 128
    #: Tunnel requests of one principal over all its links: per second, and burst.
    token_request_rate: float = 50.0
    token_request_burst: int = 1024
    #: The fraction of the TCP range one principal may have in quarantine.
    port_quarantine_share: float = 0.1
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
            config.tcp_ports[0],
            config.tcp_ports[1],
            reactor.seconds,
            config.port_quarantine,
            config.port_quarantine_share,
        )
        self.links: set[RelayLink] = set()
        #: The authenticated links of each principal.
        self.principal_links: Holdings[str, RelayLink] = Holdings()
        #: Tunnel requests per principal, over all its links.
        self.principal_requests: Buckets[str] = Buckets(
            config.token_request_rate, config.token_request_burst, reactor.seconds
        )
        self.public_connections: set[Protocol] = set()
        #: Each public connection with a stream: its tunnel and its source.
        self._public_sources: dict[Protocol, tuple[TunnelRecord, str]] = {}
        #: Paused public connections, checked for clients that went away.
        self.paused_watch = PausedWatch(reactor)
        #: Public connections refused by a tunnel's allow list, since start.
        self.denied_connections = 0
        #: Refusals since start by reason (one `/status` key each, see `REFUSALS`).
        self.refused: dict[str, int] = dict.fromkeys(REFUSALS, 0)
        #: Per-connection and per-message warnings go through here: a flood costs a few
        #: lines and a summary, not a disk.
        self.ratelog = RateLog(_log, reactor)
        self.draining = False
        self.domain = config.domain.lower().rstrip(".")
        self._suffix = "." + self.domain
        self.link_factory = Factory.forProtocol(lambda: RelayLink(self))
        self.link_factory.noisy = False
        self.info_factory = info_factory()

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
            return Route(self.tls.context_for(HTTP1), self.info_factory, local=True)
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

    def tunnel_request(self, link: RelayLink, request: TunnelRequest) -> None:
        """
        Answer a tunnel request of `link` (`grant`), unless the link or its principal asks
        faster than its rate: then ``limit``, and a link that keeps on asking after
        `RATE_STRIKES` such refusals is ended with GOAWAY ENHANCE_YOUR_CALM.
        """
        config = self.config
        ours = link.requests
        theirs = self.principal_requests
        if ours.tokens >= 1 and theirs.take(link.principal):
            ours.take()
            link.answer(self.grant(link, request))
            return
        self.refused["tunnel_requests_rate"] += 1
        per_link = ours.tokens < 1
        self.ratelog.warn(
            "tunnel-request-rate",
            "refused a tunnel request of {peer}: over the rate of its {whose}",
            peer=link.peer_name,
            whose="link" if per_link else "token",
        )
        rate, burst = (
            (config.tunnel_request_rate, config.tunnel_request_burst)
            if per_link
            else (config.token_request_rate, config.token_request_burst)
        )
        link.send(
            TunnelRefused(
                request.request_id,
                "limit",
                f"too many tunnel requests: slow down (at most {rate:g} a second, "
                f"{burst} at once, per {'link' if per_link else 'token'})",
            )
        )
        if not link.strikes.take():
            link.goAway(ErrorCode.ENHANCE_YOUR_CALM, "tunnel requests refused for their rate")

    def grant(
        self, link: RelayLink, request: TunnelRequest
    ) -> ControlMessage | defer.Deferred[ControlMessage | None]:
        """
        Grant a tunnel to `link`, or say why not.

        A reclaim is verified against the identity `link` was accepted with (the reclaim
        secret binds its token). Of an id that another link still holds, the answer comes
        later, as a Deferred: the holder is pinged, keeps its tunnel (and the reclaim is
        refused) if it answers within `RECLAIM_PROBE_TIMEOUT`, and loses it otherwise; the
        Deferred fires None if `link` itself is gone by then.
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
                or not self.reclaim_key.verify(
                    kind, tunnel_id, request.reclaim_secret, link.reclaim_owner
                )
            ):
                self.ratelog.warn(
                    "reclaim-refused",
                    "refused a reclaim of {id} with a wrong secret from {peer}",
                    id=tunnel_id,
                    peer=link.peer_name,
                )
                return refuse(
                    "reclaim_refused",
                    "the reclaim secret does not match the tunnel (or another token's)",
                )
            existing = self.registry.get(tunnel_id)
            if existing is not None:
                if existing.owner is link:
                    return self._granted(request, existing)
                return self._reclaim_held(link, request, existing)
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

    def _reclaim_held(
        self, link: RelayLink, request: TunnelRequest, existing: TunnelRecord
    ) -> ControlMessage | defer.Deferred[ControlMessage | None]:
        """
        A verified reclaim of a tunnel another link holds: ask the holder whether it is
        alive (`RelayLink.probe`), then decide again.
        """
        tunnel_id = existing.tunnel_id
        if link.pending_reclaims >= self.config.max_tunnels_per_agent:
            return TunnelRefused(
                request.request_id,
                "limit",
                f"at most {self.config.max_tunnels_per_agent} reclaims may wait at once",
            )
        holder: RelayLink = existing.owner
        link.pending_reclaims += 1
        _log.info("tunnel {id} is held by another link: checking that it is alive", id=tunnel_id)

        def decide(alive: bool) -> ControlMessage | defer.Deferred[ControlMessage | None] | None:
            link.pending_reclaims -= 1
            if link.lost or link not in self.links:
                # The reclaiming link went away meanwhile: nobody to answer.
                return None
            if self.registry.get(tunnel_id) is existing and existing.owner is holder:
                if alive:
                    _log.warn(
                        "refused a reclaim of {id}: the link holding it is alive", id=tunnel_id
                    )
                    return TunnelRefused(
                        request.request_id,
                        "reclaim_refused",
                        "the tunnel is held by another link, which is alive",
                    )
                _log.info("tunnel {id} reclaimed from an older link", id=tunnel_id)
                self.close_tunnel(existing, "reclaimed by another link")
            # Whatever changed meanwhile (the holder gone, the relay draining, a third link
            # holding it now), the request is decided afresh.
            return self.grant(link, request)

        return holder.probe(RECLAIM_PROBE_TIMEOUT).addCallback(decide)

    def _granted(self, request: TunnelRequest, record: TunnelRecord) -> TunnelGranted:
        return TunnelGranted(
            request_id=request.request_id,
            tunnel_id=record.tunnel_id,
            host=self.host_of(record.tunnel_id),
            port=self.config.public_port,
            tcp_host=self.domain if record.kind == "tcp" else None,
            tcp_port=record.tcp_port,
            secret=self.reclaim_key.secret(
                record.kind, record.tunnel_id, record.owner.reclaim_owner
            ),
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
        owner: RelayLink = record.owner
        if record.tcp_port is not None:
            self.ports.release(record.tcp_port, record.tunnel_id, owner.principal)
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
        self.principal_links.discard(link.principal, link)
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
        config = self.config
        if record.connections >= config.max_connections_per_tunnel:
            self.refused["connections_per_tunnel"] += 1
            self.ratelog.warn(
                "connections-per-tunnel",
                "tunnel {id}: {n} connections open, refusing another",
                id=tunnel_id,
                n=record.connections,
            )
            return None
        transport = protocol.transport
        assert transport is not None
        peer = transport.getPeer()
        here = transport.getHost()
        source = source_of(peer)
        from_source = record.sources.get(source, 0)
        if from_source >= config.max_connections_per_source:
            self.refused["connections_per_source"] += 1
            self.ratelog.warn(
                "connections-per-source",
                "tunnel {id}: {n} connections open from {source}, refusing another",
                id=tunnel_id,
                n=from_source,
                source=source,
            )
            return None
        info = StreamInfo(
            tunnel_id,
            getattr(peer, "host", ""),
            getattr(peer, "port", 0),
            getattr(here, "host", ""),
            getattr(here, "port", 0),
        )
        link: RelayLink = record.owner
        if len(link.streams) >= config.max_streams_per_link:
            self.refused["streams_per_link"] += 1
            self.ratelog.warn(
                "streams-per-link",
                "link of {peer}: {n} streams open, refusing another",
                peer=link.peer_name,
                n=len(link.streams),
            )
            return None
        of_principal = sum(len(other.streams) for other in self.principal_links.of(link.principal))
        if of_principal >= config.max_streams_per_token:
            self.refused["streams_per_token"] += 1
            self.ratelog.warn(
                "streams-per-token",
                "links of {peer}'s token: {n} streams open, refusing another",
                peer=link.peer_name,
                n=of_principal,
            )
            return None
        try:
            stream = link.openStream(
                info.encode(), peer if isinstance(peer, IPv4Address | IPv6Address) else None
            )
        except LocalProtocolError as e:
            self.ratelog.warn(
                "open-stream", "tunnel {id}: cannot open a stream: {e}", id=tunnel_id, e=e
            )
            return None
        stream.tunnel_id = tunnel_id
        record.connections += 1
        record.sources[source] = from_source + 1
        self._public_sources[protocol] = (record, source)
        return stream

    def public_closed(self, tunnel_id: str, protocol: Protocol | None = None) -> None:
        """
        A public connection through `tunnel_id` (`protocol`, the one given to
        `open_public_stream`) ended.
        """
        held = self._public_sources.pop(protocol, None) if protocol is not None else None
        if held is None:
            record = self.registry.get(tunnel_id)
            if record is not None and record.connections > 0:
                record.connections -= 1
            return
        # The record the connection was counted in, even if the tunnel was since closed
        # and reclaimed under the same id.
        record, source = held
        if record.connections > 0:
            record.connections -= 1
        left = record.sources.get(source, 1) - 1
        if left > 0:
            record.sources[source] = left
        else:
            record.sources.pop(source, None)

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
                self.paused_watch.stop()
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
            # Until its hello is accepted, an agent may send a few KiB of HELLO, PING and
            # CONTROL only: nothing it does before then costs the relay more than that.
            gated=True,
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
        #: Reclaims by this link waiting for the link that holds their tunnel to answer.
        self.pending_reclaims = 0
        self._hello_timer: Any = None
        #: Its tunnel requests, and its refusals for their rate (see `Relay.tunnel_request`).
        self.requests = TokenBucket(
            config.tunnel_request_rate, config.tunnel_request_burst, relay.reactor.seconds
        )
        self.strikes = TokenBucket(1.0, RATE_STRIKES, relay.reactor.seconds)
        #: Refused, its GOAWAY about to follow: control messages are ignored.
        self._ending = False

    @property
    def reclaim_owner(self) -> str:
        """
        What the reclaim secrets of this link's tunnels bind: its token's identity, or ""
        on a relay that takes no tokens (an address would not do: an agent's may change
        between links).
        """
        return self.principal if self.principal.startswith("token:") else ""

    @property
    def lost(self) -> bool:
        """
        Whether the link's connection has ended.
        """
        return self._lost

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
            self.relay.ratelog.warn(
                "hello-timeout", "agent link from {peer} sent no hello in time", peer=self.peer_name
            )
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
        if self._ending:
            return
        try:
            message = decode_message(payload)
        except ControlError as e:
            self.relay.ratelog.warn(
                "malformed-control",
                "malformed control message from {peer}: {e}",
                peer=self.peer_name,
                e=shorten(str(e)),
            )
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
            self.relay.tunnel_request(self, message)
        elif isinstance(message, TunnelClose):
            record = self.relay.registry.get(message.tunnel_id)
            if record is not None and record.owner is self:
                self.relay.close_tunnel(record, "closed by the agent")
                _log.info("tunnel {id} closed by its agent", id=message.tunnel_id)
            else:
                self.send(TunnelClosed(message.tunnel_id, "not held by this agent"))

    def answer(self, answer: ControlMessage | defer.Deferred[ControlMessage | None] | None) -> None:
        """
        Send the answer to a request, now or when it is decided (None: nothing to send).
        """
        if isinstance(answer, defer.Deferred):
            answer.addCallback(self.answer).addErrback(
                lambda f: _log.failure("error answering a tunnel request", f)
            )
        elif answer is not None:
            self.send(answer)

    def _hello(self, hello: AgentHello) -> None:
        if self.authenticated:
            return
        if self._hello_timer is not None and self._hello_timer.active():
            self._hello_timer.cancel()
        self._hello_timer = None
        relay = self.relay
        if not relay.authenticate(hello.token):
            relay.ratelog.warn(
                "wrong-token", "refused agent {peer}: wrong token", peer=self.peer_name
            )
            self.refuse(
                "unauthorized", "the relay does not accept this token", ErrorCode.UNAUTHORIZED
            )
            return
        config = relay.config
        principal = self.principal
        if hello.token:
            principal = "token:" + hashlib.sha256(hello.token.encode()).hexdigest()[:32]
        if relay.principal_links.count(principal) >= config.max_links_per_token:
            relay.refused["links_per_token"] += 1
            relay.ratelog.warn(
                "links-per-token",
                "refused agent {peer}: its {whose} has {n} links, the limit",
                peer=self.peer_name,
                whose="token" if hello.token else "address",
                n=config.max_links_per_token,
            )
            message = (
                f"too many links with this {'token' if hello.token else 'address'}: "
                f"at most {config.max_links_per_token}"
            )
            self.send(ErrorMessage("limit", message))
            # ENHANCE_YOUR_CALM drops what is queued, so it follows once the error is
            # written (the end of this turn); nothing more is read from the link meanwhile.
            self._ending = True
            self.reactor.callLater(0, self.goAway, ErrorCode.ENHANCE_YOUR_CALM, message)
            return
        self.authenticated = True
        self.acceptPeer()
        self.token = hello.token
        self.principal = principal
        relay.principal_links.add(principal, self)
        relay.ratelog.emit(
            "agent-connected",
            LogLevel.info,
            "agent {peer} connected ({agent})",
            limit=100,
            peer=self.peer_name,
            agent=shorten(hello.agent),
        )
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
            self.relay.ratelog.emit(
                "agent-disconnected",
                LogLevel.info,
                "agent {peer} disconnected",
                limit=100,
                peer=self.peer_name,
            )
        self.relay.link_lost(self)


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

    def __init__(self, relay: Relay, tunnel_id: str) -> None:
        super().__init__(None)
        self.relay = relay
        self.tunnel_id = tunnel_id
        self._counted = False
        self._idle: Any = None
        self._tls = False
        self._paused = False
        #: What arrived before the stream opened, and whether the client's input ended.
        self._early: list[bytes] = []
        self._early_size = 0
        self._early_end = False

    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None
        self._tls = isinstance(transport, TLSMemoryBIOProtocol)
        set_nodelay(transport)
        set_keepalive(socket_of(transport))
        if not self._tls:
            self._open()
        # A TLS connection's stream opens in handshakeCompleted; the relay's handshake
        # timeout bounds the wait.

    def handshakeCompleted(self) -> None:
        if self.other is None and not self.lost and self.transport is not None:
            self._open()

    def _open(self) -> None:
        transport = self.transport
        assert transport is not None
        stream = self.relay.open_public_stream(self.tunnel_id, self)
        if stream is None:
            transport.abortConnection()  # type: ignore[attr-defined]
            return
        self._counted = True
        self.relay.public_connections.add(self)
        self.other = stream
        stream.registerProducer(self, True)
        stream.attach(_Activity(self, transport))
        if self.relay.config.idle_timeout:
            self._touch()
        early, self._early = self._early, []
        if early:
            write_now(stream, b"".join(early))
        if self._early_end:
            half_close(stream)

    # -- IPushProducer, for the stream: it pauses us when the agent has no credit left -----

    def pauseProducing(self) -> None:
        self._paused = True
        if self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]
            self.relay.paused_watch.add(self)

    def resumeProducing(self) -> None:
        self._paused = False
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
        """
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
        self._touch()
        write_now(self.other, data)

    def readConnectionLost(self) -> None:
        if self.other is None:
            self._early_end = True
            return
        super().readConnectionLost()

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
        self._early = []
        self.relay.paused_watch.discard(self)
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        if not self._counted:
            return
        self._counted = False
        self.relay.public_connections.discard(self)
        self.relay.public_closed(self.tunnel_id, self)
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
            client_hello_timeout=relay.config.client_hello_timeout,
            max_pending_handshakes=relay.config.max_pending_handshakes,
            max_pending_per_source=relay.config.max_pending_per_source,
        )
        self.endpoint = serverFromString(reactor, listen)
        self.port: Any = None
        self.admin_port: Any = None
        self._collector: LoopingCall | None = None
        self._token_watch: LoopingCall | None = None
        #: Called on SIGHUP, before the tokens file is checked (the certificate's reload).
        self.reload_hooks: list[Callable[[], None]] = []

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
        for hook in self.reload_hooks:
            hook()
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
