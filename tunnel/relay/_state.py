"""
The relay's state and its relay-wide decisions: the tunnel registry, the TCP port pool, the
links and their per-principal shares, the tokens, the routing of public TLS connections,
public streams, and drain.

The control plane of each link (`_control.RelaySession`) consults it; it holds what one
link cannot decide alone (who holds an id, how many links a token has, whether the relay
is draining). Only what needs the reactor is done here (listeners, TLS contexts, streams).
All methods run on the reactor thread.
"""

from __future__ import annotations

import weakref
from collections.abc import Collection
from typing import Any

from OpenSSL import SSL, crypto
from twisted.internet import defer, error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from tunnel.link import Stream
from tunnel.relay._accept import listen_tcp, local_address
from tunnel.relay._auth import Permit, authenticate
from tunnel.relay._clienthello import ClientHello
from tunnel.relay._directory import Elsewhere
from tunnel.relay._info import info_factory
from tunnel.relay._issuer import CertificateIssuer
from tunnel.relay._link import RelayLink
from tunnel.relay._peerwatch import PausedWatch
from tunnel.relay._public import _PublicFactory
from tunnel.relay._ratelog import RateLog
from tunnel.relay._shares import Buckets, Holdings, ResetGuard
from tunnel.relay._sni import Route, source_of
from tunnel.relay._tls import LINK_ALPN, RelayTLS
from tunnel.relay.config import POOL_REFUSED_PAUSE, REFUSALS, RESET_HOLD, RelayConfig
from tunnel.relay.registry import (
    Member,
    PortPool,
    ReclaimKey,
    TunnelRecord,
    TunnelRegistry,
    usable_link,
)
from tunnel.wire import ErrorCode, LocalProtocolError
from tunnel.wire.control import StreamInfo, TunnelClosed

__all__ = ["Relay"]

_log = Logger()

HTTP1 = (b"http/1.1",)
H2 = (b"h2", b"http/1.1")


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
        #: Each live tunnel's public TLS route, made on its first connection: the same
        #: until its context changes (a certificate put into service); gone with its record.
        self._routes: weakref.WeakKeyDictionary[TunnelRecord, Route] = weakref.WeakKeyDictionary()
        #: Each public connection with a stream: its tunnel, its source and the member
        #: serving it.
        self._public_sources: dict[Protocol, tuple[TunnelRecord, str, Member]] = {}
        #: Paused public connections, checked for clients that went away.
        self.paused_watch = PausedWatch(reactor)
        #: Public sources whose connections end in resets too fast: refused for a while.
        self.reset_guard: ResetGuard[str] = ResetGuard(
            config.source_reset_rate, config.source_reset_burst, RESET_HOLD, reactor.seconds
        )
        #: Public connections refused by a tunnel's deny or allow list, since start.
        self.denied_connections = 0
        #: Refusals since start by reason (one `/status` key each, see `REFUSALS`).
        self.refused: dict[str, int] = dict.fromkeys(REFUSALS, 0)
        #: Per-connection and per-message warnings go through here: a flood costs a few
        #: lines and a summary, not a disk.
        self.ratelog = RateLog(_log, reactor)
        self.draining = False
        #: Signs certificates for passthrough tunnels (`_issuer.CertificateIssuer`): the
        #: development CA's, or None (a relay with its own certificate and no ACME).
        self.issuer: CertificateIssuer | None = None
        self.domain = config.domain.lower().rstrip(".")
        self._suffix = "." + self.domain
        self.link_factory = Factory.forProtocol(lambda: RelayLink(self))
        self.link_factory.noisy = False
        self.info_factory = info_factory()
        #: What the other workers hold (``--workers N``): nothing, in a relay of one process.
        self.elsewhere = Elsewhere()
        #: A worker's own ``/status`` fields (its index, its hand-off counts), or None.
        self.worker_status: Any = None

    # -- routing of public TLS connections ----------------------------------------------------

    def route(self, hello: ClientHello) -> Route | None:
        """
        Where a public TLS connection goes: the agent-link endpoint for ``<domain>`` with the
        link's ALPN, a small page for ``<domain>`` otherwise, a live tunnel for
        ``<id>.<domain>`` (handed on untouched for a passthrough tunnel), and nowhere (an
        ``unrecognized_name`` alert) for anything else. An unknown id and an offline one are
        refused alike.
        """
        name = hello.server_name
        if self.draining:
            return None
        tunnel_id = name[: -len(self._suffix)] if name and name.endswith(self._suffix) else None
        if tunnel_id is None and LINK_ALPN in hello.alpn:
            # An agent may dial the relay by any name its certificate covers.
            return Route(self.tls.context_for((LINK_ALPN,)), self.link_factory, link=True)
        if name == self.domain:
            return Route(self.tls.context_for(HTTP1), self.info_factory, local=True)
        if tunnel_id is None:
            return None
        record = self.registry.get(tunnel_id)
        if record is None:
            return None
        passthrough = record.kind == "passthrough"
        # Not terminated here when passthrough: the ClientHello and all that follows go to
        # the agent.
        context = (
            None
            if passthrough
            else record.context or self.tls.context_for(self._alpn(record.options))
        )
        route = self._routes.get(record)
        if route is None or route.context is not context:
            factory = _PublicFactory(self, tunnel_id, tls=True)
            route = Route(context, factory, passthrough=passthrough)
            self._routes[record] = route
        return route

    @staticmethod
    def _alpn(options: dict[str, Any]) -> tuple[bytes, ...]:
        return H2 if options.get("h2") else HTTP1

    def host_of(self, tunnel_id: str) -> str:
        """
        The public host name of a tunnel.
        """
        return f"{tunnel_id}.{self.domain}"

    # -- agent authentication ------------------------------------------------------------------

    def authenticate(self, token: str | None) -> Permit | str:
        """
        The permit of `token` (`tunnel.relay._auth.authenticate`), or why it is refused.
        """
        config = self.config
        return authenticate(
            token,
            self.reactor.seconds(),
            tokens=config.tokens,
            verifier=config.token_verifier,
            revoked=config.revoked,
        )

    def set_tokens(self, tokens: Collection[str]) -> None:
        """
        Accept `tokens` from now on (`recheck_links`).
        """
        self.config.tokens = tokens
        self.recheck_links()

    def set_revoked(self, revoked: frozenset[str]) -> None:
        """
        Refuse signed tokens of these subjects and ids from now on (`recheck_links`).
        """
        self.config.revoked = revoked
        self.recheck_links()

    def recheck_links(self) -> None:
        """
        Check every accepted link's token again: links whose token is no longer accepted
        (removed, revoked, expired) are told (``unauthorized``) and closed, with their
        tunnels; the others hold what their token allows now, and leave the names it no
        longer allows.
        """
        for link in list(self.links):
            if not link.authenticated:
                continue
            answer = self.authenticate(link.token)
            if isinstance(answer, str):
                link.perform(link.session.token_revoked(answer))
                continue
            link.session.permit = answer
            for record in self.registry.owned_by(link):
                if record.named and not answer.allows(record.tunnel_id):
                    self.leave_tunnel(record, link, "the token no longer allows this name")

    def expire_links(self) -> None:
        """
        Close the links whose token has expired (``unauthorized``), with their tunnels.
        """
        now = self.reactor.seconds()
        for link in list(self.links):
            permit = link.session.permit
            if link.authenticated and permit.expires is not None and now >= permit.expires:
                link.perform(link.session.token_revoked("the token expired"))

    def check_credentials(self) -> None:
        """
        Read the tokens and revoked files again if they changed, and close the links whose
        token expired: what the relay does every `TOKENS_CHECK_INTERVAL` and on SIGHUP.
        """
        self.reload_tokens()
        self.reload_revoked()
        self.expire_links()

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

    def reload_revoked(self) -> None:
        """
        Read the revoked file again if it changed (`set_revoked`); an unreadable file keeps
        the list as it was.
        """
        revoked_file = self.config.revoked_file
        if revoked_file is None or not revoked_file.changed():
            return
        try:
            revoked = revoked_file.read()
        except (OSError, ValueError) as e:
            _log.error("revoked list not reloaded, keeping the previous one: {e}", e=e)
            return
        if revoked != self.config.revoked:
            _log.info(
                "revoked list reloaded from {path}: {n}", path=revoked_file.path, n=len(revoked)
            )
            self.set_revoked(revoked)

    # -- tunnels (for the control core) -------------------------------------------------------

    def client_context(self, options: dict[str, Any], cas: Any) -> Any:
        """
        The TLS server context of a tunnel whose public clients must show a certificate
        from one of `cas` (its ALPN from `options`).

        @raise ValueError: the authorities are not usable (a ``bad_request``).
        """
        try:
            return self.tls.client_verifying_context(self._alpn(options), cas)
        except (SSL.Error, crypto.Error) as e:
            raise ValueError(f"client_ca is not usable: {e}") from None

    def listen_tcp(self, record: TunnelRecord, wanted: int | tuple[int | None, ...] | None) -> bool:
        """
        Open `record`'s raw TCP listener on a port of the pool (`wanted` first, if given),
        recording the port in `record`; False when none is free.
        """
        factory = _PublicFactory(self, record.tunnel_id, tls=False)
        for port in self.ports.candidates(record.tunnel_id, wanted):
            try:
                listener = listen_tcp(self.reactor, port, factory, 128, self.config.tcp_interface)
            except error.CannotListenError:
                continue
            # Bound to one address, every connection's own address is the listener's: it
            # is not asked of each connection's socket (`PublicProtocol.here`).
            factory.here = local_address(listener)
            self.ports.take(port)
            record.tcp_port = port
            record.listener = listener
            return True
        return False

    def preferred_port(self, name: str) -> int:
        """
        The raw TCP port named tunnel `name` asks for first (the same on every start).
        """
        low, high = self.config.tcp_ports
        return self.reclaim_key.preferred_port(name, low, high)

    def close_tunnel(self, record: TunnelRecord, reason: str, notify: bool = True) -> None:
        """
        Remove a tunnel: stop its listener, free its port, and tell every link serving it.
        """
        if self.registry.get(record.tunnel_id) is not record:
            return
        self.registry.remove(record.tunnel_id)
        if record.throttle is not None:
            record.throttle.stop()
        stopped: defer.Deferred[Any] = defer.succeed(None)
        if record.listener is not None:
            stopped = defer.maybeDeferred(record.listener.stopListening)
            record.listener = None
        links: list[RelayLink] = [m.link for m in record.members] or [record.owner]
        if record.tcp_port is not None:
            self.ports.release(record.tcp_port, record.tunnel_id, links[0].principal)
        for link in links:
            self._abort_streams(link, record.tunnel_id)
        if notify:
            # Confirmed once the port is really closed, so the agent's close() means it.
            closed = TunnelClosed(record.tunnel_id, reason)

            def tell(_: object) -> None:
                for link in links:
                    link.send(closed)

            stopped.addBoth(tell)

    def leave_tunnel(
        self, record: TunnelRecord, link: RelayLink, reason: str, notify: bool = True
    ) -> None:
        """
        `link` no longer serves `record`: the tunnel closes if it was the last (or only)
        one serving it; otherwise it leaves the name's pool, its own connections to it are
        reset, and the others serve the name on.
        """
        if self.registry.get(record.tunnel_id) is not record or record.member(link) is None:
            return
        if len(record.members) <= 1:
            self.close_tunnel(record, reason, notify)
            return
        self.registry.leave(record, link)
        self._abort_streams(link, record.tunnel_id)
        _log.info(
            "{peer} left the pool of {name} ({n} left)",
            peer=link.peer_name,
            name=record.tunnel_id,
            n=len(record.members),
        )
        if notify:
            link.send(TunnelClosed(record.tunnel_id, reason))

    @staticmethod
    def _abort_streams(link: RelayLink, tunnel_id: str) -> None:
        for stream in list(link.streams.values()):
            if stream.tunnel_id == tunnel_id:
                stream.abortConnection(ErrorCode.SHUTDOWN)

    # -- public connections --------------------------------------------------------------------

    def open_public_stream(
        self, tunnel_id: str, protocol: Protocol, record: TunnelRecord | None = None
    ) -> Stream | None:
        """
        Open a stream to the agent owning `tunnel_id` for a new public connection.

        @param record: `tunnel_id`'s live record, when the caller looked it up in this
            same call (a raw TCP connection's factory, in the turn that accepted it);
            None: it is looked up here.
        @return: the stream, or None when the tunnel is gone or over a limit (the caller
            closes the public connection).
        """
        if record is None:
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
        # The addresses its factory gave it, when it did (`PublicProtocol.peer`, `here`).
        peer = getattr(protocol, "peer", None) or transport.getPeer()
        here = getattr(protocol, "here", None) or transport.getHost()
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
        now = self.reactor.seconds()
        tried: list[Member] = []
        while True:
            member = record.choose(now, usable_link, POOL_REFUSED_PAUSE, tried)
            if member is None:
                return None
            tried.append(member)
            stream = self._open_on(member.link, tunnel_id, info, peer)
            if stream is not None:
                break
        member.streams += 1
        record.connections += 1
        record.sources[source] = from_source + 1
        self._public_sources[protocol] = (record, source, member)
        return stream

    def reopen_public_stream(self, protocol: Protocol) -> Stream | None:
        """
        A new stream for public connection `protocol`, whose stream the agent refused
        unprocessed: on another member of its tunnel's pool (never the one that refused),
        or None.
        """
        held = self._public_sources.get(protocol)
        if held is None or self.draining:
            return None
        record, source, refused = held
        if self.registry.get(record.tunnel_id) is not record:
            return None
        transport = protocol.transport
        assert transport is not None
        peer, here = transport.getPeer(), transport.getHost()
        info = StreamInfo(
            record.tunnel_id,
            getattr(peer, "host", ""),
            getattr(peer, "port", 0),
            getattr(here, "host", ""),
            getattr(here, "port", 0),
        )
        now = self.reactor.seconds()
        tried = [refused]
        while True:
            member = record.choose(now, usable_link, POOL_REFUSED_PAUSE, tried)
            if member is None:
                return None
            tried.append(member)
            stream = self._open_on(member.link, record.tunnel_id, info, peer)
            if stream is not None:
                break
        if refused.streams > 0:
            refused.streams -= 1
        member.streams += 1
        self._public_sources[protocol] = (record, source, member)
        _log.info(
            "a connection to {name} refused by draining {old} moved to {new}",
            name=record.tunnel_id,
            old=refused.link.peer_name,
            new=member.link.peer_name,
        )
        return stream

    def _open_on(
        self, link: RelayLink, tunnel_id: str, info: StreamInfo, peer: Any
    ) -> Stream | None:
        """
        A stream on `link` for a public connection to `tunnel_id`, or None when the link
        (or its principal) is at its bound of streams, or can open none.
        """
        config = self.config
        if len(link.streams) >= config.max_streams_per_link:
            self.refused["streams_per_link"] += 1
            self.ratelog.warn(
                "streams-per-link",
                "link of {peer}: {n} streams open, refusing another",
                peer=link.peer_name,
                n=len(link.streams),
            )
            return None
        of_principal = 0
        for other in self.principal_links.live(link.principal):
            of_principal += len(other.streams)
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
        return stream

    def target_refused(self, protocol: Protocol) -> None:
        """
        The agent could not connect public connection `protocol` to its target: the member
        that served it is out of its pool's rotation for `POOL_REFUSED_PAUSE` seconds
        (unless a connection through it succeeds sooner).
        """
        held = self._public_sources.get(protocol)
        if held is None:
            return
        record, _, member = held
        if member.refused_at is None and len(record.members) > 1:
            _log.info(
                "the target of {peer} refused a connection to {name}: out of rotation",
                peer=member.link.peer_name,
                name=record.tunnel_id,
            )
        member.refused_at = self.reactor.seconds()

    def target_answered(self, protocol: Protocol) -> None:
        """
        The target of public connection `protocol` sent its first bytes: its member is in
        rotation again.
        """
        held = self._public_sources.get(protocol)
        if held is not None:
            held[2].refused_at = None

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
        record, source, member = held
        if record.connections > 0:
            record.connections -= 1
        if member.streams > 0:
            member.streams -= 1
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
            link.perform(link.session.drain())
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
