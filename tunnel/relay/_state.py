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

import hmac
from typing import Any

from OpenSSL import SSL, crypto
from twisted.internet import defer, error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from tunnel.link import Stream
from tunnel.relay._clienthello import ClientHello
from tunnel.relay._info import info_factory
from tunnel.relay._issuer import CertificateIssuer
from tunnel.relay._link import RelayLink
from tunnel.relay._peerwatch import PausedWatch
from tunnel.relay._public import _PublicFactory
from tunnel.relay._ratelog import RateLog
from tunnel.relay._shares import Buckets, Holdings
from tunnel.relay._sni import Route, source_of
from tunnel.relay._tls import LINK_ALPN, RelayTLS
from tunnel.relay.config import REFUSALS, RelayConfig
from tunnel.relay.registry import PortPool, ReclaimKey, TunnelRecord, TunnelRegistry
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
        #: Each public connection with a stream: its tunnel and its source.
        self._public_sources: dict[Protocol, tuple[TunnelRecord, str]] = {}
        #: Paused public connections, checked for clients that went away.
        self.paused_watch = PausedWatch(reactor)
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
            return Route(self.tls.context_for((LINK_ALPN,)), self.link_factory)
        if name == self.domain:
            return Route(self.tls.context_for(HTTP1), self.info_factory, local=True)
        if tunnel_id is None:
            return None
        record = self.registry.get(tunnel_id)
        if record is None:
            return None
        if record.kind == "passthrough":
            # Not terminated here: the ClientHello and all that follows go to the agent.
            return Route(None, _PublicFactory(self, tunnel_id, tls=True), passthrough=True)
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
                link.perform(link.session.token_revoked())

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

    def listen_tcp(self, record: TunnelRecord, wanted: int | None) -> bool:
        """
        Open `record`'s raw TCP listener on a port of the pool (`wanted` first, if given),
        recording the port in `record`; False when none is free.
        """
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
        if record.throttle is not None:
            record.throttle.stop()
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
