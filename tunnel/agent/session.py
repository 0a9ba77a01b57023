"""
The agent: one link to a relay (kept up by a `ClientService`), the tunnels asked of it, and
a connection to the local target for every stream the relay opens.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer, error, interfaces
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
)
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.ssl import (
    Certificate,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tunnel import __version__
from tunnel._fasttls import fast_client_tls
from tunnel._tunnel import Tunnel
from tunnel.agent._httpconnect import HTTPConnectEndpoint, ProxyAddress
from tunnel.agent._proxyheader import proxy_header
from tunnel.agent.settings import ForwardSpec, RelayAddress, parse_forward, parse_relays
from tunnel.errors import AuthenticationError, RelayUnavailable, TunnelRefused
from tunnel.link import LinkProtocol, SpliceProtocol, Stream
from tunnel.wire import LINK_ALPN, PROTOCOL_VERSION, ErrorCode, LinkSettings
from tunnel.wire import options as tunnel_options
from tunnel.wire.codes import ErrorReason, RefusalCode
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
    TunnelRequest,
    decode_message,
    encode_message,
)
from tunnel.wire.control import (
    TunnelRefused as TunnelRefusedMessage,
)

__all__ = ["Agent", "AgentLink", "ForwardSpec", "RelayAddress", "parse_forward", "parse_relays"]

_log = Logger()


class _Forward:
    """
    The agent's record of one forward: what was asked, and what the relay granted.
    """

    def __init__(self, spec: ForwardSpec) -> None:
        self.spec = spec
        self.tunnel: Tunnel | None = None
        self.tunnel_id: str | None = None
        self.secret: str | None = None
        self.tcp_port: int | None = None
        self.waiting: defer.Deferred[Tunnel] | None = None
        self.timeout: Any = None
        self.closed = False


class Agent:
    """
    Keeps one link to a relay and the tunnels on it.

    @param relays: relays to use; with several, the agent times a TCP connection to each,
        uses the nearest and fails over to the next in that order when an attempt fails.
    @param fail_fast: fail a `forward` as soon as a connection attempt fails (the API);
        otherwise keep retrying until `connect_timeout` (the daemon retries forever).
    """

    def __init__(
        self,
        reactor: Any,
        relays: Sequence[RelayAddress],
        *,
        token: str | None = None,
        ca: str | None = None,
        connect_timeout: float = 10.0,
        local_connect_timeout: float = 10.0,
        fail_fast: bool = True,
        settings: LinkSettings | None = None,
        retry_policy: Callable[[int], float] | None = None,
        proxy: ProxyAddress | None = None,
    ) -> None:
        if not relays:
            raise ValueError("no relay given")
        #: An HTTP proxy to reach the relays through (``CONNECT``), or None.
        self.proxy = proxy
        self.reactor = reactor
        self.relays = list(relays)
        self.token = token
        self.ca = ca
        self.connect_timeout = connect_timeout
        self.local_connect_timeout = local_connect_timeout
        self.fail_fast = fail_fast
        # The relay opens one stream per public connection: allow many.
        self.settings = settings or LinkSettings(max_streams=16384)
        self.link: AgentLink | None = None
        self.welcome: RelayWelcome | None = None
        self.forwards: list[_Forward] = []
        self._requests: dict[int, _Forward] = {}
        self._request_ids = itertools.count(1)
        self._closing: dict[str, list[defer.Deferred[None]]] = {}
        self._relay_index = 0
        self.last_error: str | None = None
        self._trust = _trust_root(ca)
        factory = Factory.forProtocol(lambda: AgentLink(self))
        factory.noisy = False
        self._service = ClientService(
            _FailoverEndpoint(self),
            factory,
            retryPolicy=retry_policy
            or backoffPolicy(initialDelay=0.1, maxDelay=10.0, factor=2.0, jitter=random.random),
            clock=reactor,
        )
        self._started = False
        self._ranked = False
        #: Called with the reason when the relay refuses this agent's token.
        self.on_refused: list[Callable[[str], object]] = []
        #: Links the relay accepted (the first one, then one per reconnect).
        self.links_made = 0

    # -- life cycle --------------------------------------------------------------------------

    def start(self) -> None:
        """
        Start connecting (idempotent).
        """
        if self._started:
            return
        self._started = True
        if len(self.relays) > 1 and not self._ranked and self.proxy is None:
            # The nearest relay first: connect to each (TCP only) and sort by the time it
            # took; one that does not answer goes last. Failover then follows this order.
            self._ranked = True
            probes = [_connect_time(self.reactor, r, self.connect_timeout) for r in self.relays]
            d = defer.gatherResults(probes, consumeErrors=True)

            def ranked(times: list[float]) -> None:
                order = sorted(range(len(self.relays)), key=lambda i: times[i])
                self.relays = [self.relays[i] for i in order]
                _log.info(
                    "relays by connect time: {order}",
                    order=", ".join(
                        f"{self.relays[n]} ({times[i] * 1e3:.1f} ms)" for n, i in enumerate(order)
                    ),
                )
                if self._started:
                    self._service.startService()

            d.addCallback(ranked)
            return
        self._service.startService()

    def stop(self) -> defer.Deferred[None]:
        """
        Close every tunnel (telling the relay, so their names stop answering at once) and the
        link; stop reconnecting. Fires once the link is closed (within about a second).
        """
        link = self.link
        closing: defer.Deferred[Any] = defer.succeed(None)
        if link is not None and link.transport is not None:
            for forward in self.forwards:
                if forward.tunnel_id is not None and not forward.closed:
                    link.send(TunnelClose(forward.tunnel_id))
            closing = link.close("agent stopping")
        for forward in list(self.forwards):
            forward.closed = True
            self._fail(forward, RelayUnavailable("the agent is stopping"))
        if not self._started:
            return closing
        self._started = False
        if not self._service.running:
            return closing
        stopped = defer.maybeDeferred(self._service.stopService)
        d: defer.Deferred[Any] = defer.gatherResults([closing, stopped], consumeErrors=True)
        return d.addBoth(lambda _: None)

    # -- the API -----------------------------------------------------------------------------

    def forward(self, spec: ForwardSpec) -> defer.Deferred[Tunnel]:
        """
        Ask for a tunnel to `spec`'s target.

        @raise ValueError: the same target is already forwarded by this agent.
        @return: fires with the `Tunnel` once granted; fails with `RelayUnavailable`,
            `AuthenticationError` or `TunnelRefused`.
        """
        for existing in self.forwards:
            if (existing.spec.host, existing.spec.port) == (spec.host, spec.port):
                raise ValueError(f"port {spec.port} is already forwarded ({existing.spec.target})")
        forward = _Forward(spec)
        d: defer.Deferred[Tunnel] = defer.Deferred()
        forward.waiting = d
        self.forwards.append(forward)
        forward.timeout = self.reactor.callLater(self.connect_timeout, self._timed_out, forward)
        self.start()
        if self.link is not None:
            self._request(self.link, forward)
        return d

    def _close(self, forward: _Forward) -> defer.Deferred[None]:
        if forward.closed:
            return defer.succeed(None)
        forward.closed = True
        if forward in self.forwards:
            self.forwards.remove(forward)
        link = self.link
        _log.info("tunnel {url} closed", url=forward.tunnel.url if forward.tunnel else "?")
        if link is None or forward.tunnel_id is None:
            return defer.succeed(None)
        tunnel_id = forward.tunnel_id
        link.send(TunnelClose(tunnel_id))
        for stream in list(link.streams.values()):
            if stream.tunnel_id == tunnel_id:
                stream.abortConnection(ErrorCode.CANCEL)
        # Fires when the relay confirms (its TCP port is closed by then), when the link is
        # lost (the relay drops the tunnel with it), or after a bound.
        confirmed: defer.Deferred[None] = defer.Deferred()
        self._closing.setdefault(tunnel_id, []).append(confirmed)
        timer = self.reactor.callLater(self.connect_timeout, self._close_confirmed, tunnel_id)
        confirmed.addBoth(lambda result: (timer.cancel() if timer.active() else None, result)[1])
        return confirmed

    def _close_confirmed(self, tunnel_id: str) -> None:
        for waiting in self._closing.pop(tunnel_id, []):
            waiting.callback(None)

    # -- link events -------------------------------------------------------------------------

    def _welcomed(self, link: AgentLink, welcome: RelayWelcome) -> None:
        self.link = link
        self.welcome = welcome
        self.links_made += 1
        self.last_error = None
        link.keepalive_interval = welcome.keepalive_interval
        link.keepalive_timeout = welcome.keepalive_timeout
        for forward in list(self.forwards):
            self._request(link, forward)

    def _request(self, link: AgentLink, forward: _Forward) -> None:
        spec = forward.spec
        kind, options = tunnel_options.request_options(spec.option_values())
        # An older relay would ignore a restricting option and let everyone in: refuse.
        features = self.welcome.features if self.welcome is not None else []
        missing = tunnel_options.missing_features(options, features)
        if missing:
            what = " and ".join(missing)
            _log.error(
                "the relay does not support {what}; not opening {target} to everyone",
                what=what,
                target=spec.target,
            )
            self._fail(
                forward,
                TunnelRefused(RefusalCode.UNSUPPORTED, f"the relay does not support {what}"),
            )
            return
        request_id = next(self._request_ids)
        self._requests[request_id] = forward
        link.send(
            TunnelRequest(
                request_id=request_id,
                kind=kind,
                options=options,
                reclaim_id=forward.tunnel_id,
                reclaim_secret=forward.secret,
                reclaim_port=forward.tcp_port,
            )
        )

    def _answered(self, message: TunnelGranted | TunnelRefusedMessage) -> None:
        forward = self._requests.pop(message.request_id, None)
        if forward is None or forward.closed:
            if forward is not None and isinstance(message, TunnelGranted) and self.link:
                self.link.send(TunnelClose(message.tunnel_id))
            return
        if isinstance(message, TunnelRefusedMessage):
            if message.code == RefusalCode.RECLAIM_REFUSED and forward.tunnel_id is not None:
                _log.warn(
                    "the relay no longer knows tunnel {id}; asking for a new one",
                    id=forward.tunnel_id,
                )
                forward.tunnel_id = forward.secret = None
                forward.tcp_port = None
                if self.link is not None:
                    self._request(self.link, forward)
                return
            self._fail(forward, TunnelRefused(message.code, message.message))
            return
        previous = forward.tunnel
        forward.tunnel_id = message.tunnel_id
        forward.secret = message.secret
        forward.tcp_port = message.tcp_port
        tunnel = Tunnel(
            host=message.host,
            port=message.port,
            unencrypted_host=message.tcp_host,
            unencrypted_port=message.tcp_port,
            _close=lambda: self._close(forward),
        )
        forward.tunnel = tunnel
        if previous is None:
            where = f"{tunnel.url}"
            if tunnel.unencrypted_port is not None:
                where += f" tcp://{tunnel.unencrypted_host}:{tunnel.unencrypted_port}"
            _log.info("tunnel ready: {where} -> {target}", where=where, target=forward.spec.target)
        elif previous != tunnel:
            _log.warn("tunnel {old} came back as {new}", old=previous.url, new=tunnel.url)
        else:
            _log.info("tunnel {url} is back", url=tunnel.url)
        waiting, forward.waiting = forward.waiting, None
        if forward.timeout is not None and forward.timeout.active():
            forward.timeout.cancel()
        forward.timeout = None
        if waiting is not None:
            waiting.callback(tunnel)

    def _closed_by_relay(self, message: TunnelClosed) -> None:
        if message.tunnel_id in self._closing:
            self._close_confirmed(message.tunnel_id)
            return
        for forward in list(self.forwards):
            if forward.tunnel_id == message.tunnel_id:
                _log.warn(
                    "relay closed tunnel {id}: {reason}",
                    id=message.tunnel_id,
                    reason=message.reason,
                )
                forward.closed = True
                self.forwards.remove(forward)

    def _fail(self, forward: _Forward, reason: Exception) -> None:
        if forward in self.forwards:
            self.forwards.remove(forward)
        forward.closed = True
        if forward.timeout is not None and forward.timeout.active():
            forward.timeout.cancel()
        forward.timeout = None
        waiting, forward.waiting = forward.waiting, None
        if waiting is not None:
            waiting.errback(Failure(reason))

    def _timed_out(self, forward: _Forward) -> None:
        forward.timeout = None
        if forward.waiting is None:
            return
        detail = f": {self.last_error}" if self.last_error else ""
        self._fail(
            forward,
            RelayUnavailable(
                f"no tunnel from relay {self._relay_names()} within "
                f"{self.connect_timeout:g}s{detail}"
            ),
        )

    def _attempt_failed(self, reason: str, error_type: type[Exception] = RelayUnavailable) -> None:
        """
        A connection attempt (or the handshake on it) failed.
        """
        self.last_error = reason
        _log.warn("relay {relay}: {reason}", relay=self._relay_names(), reason=reason)
        if error_type is AuthenticationError:
            self._refused(reason)
        elif self.fail_fast:
            for forward in list(self.forwards):
                if forward.waiting is not None:
                    self._fail(forward, error_type(reason))

    def _refused(self, reason: str) -> None:
        """
        The relay refused the token (at the handshake, or later when it was revoked):
        retrying cannot help. Every forward fails or closes, reconnecting stops (until the
        next `forward`), and the `on_refused` observers are told.
        """
        for forward in list(self.forwards):
            if forward.waiting is None and forward.tunnel is not None:
                _log.error("tunnel {url} closed: {reason}", url=forward.tunnel.url, reason=reason)
            self._fail(forward, AuthenticationError(reason))
        if self._started:
            self._started = False
            if self._service.running:
                self._service.stopService().addErrback(lambda _: None)
        for observer in list(self.on_refused):
            observer(reason)

    def _link_lost(self, link: AgentLink, reason: Failure) -> None:
        if self.link is link:
            for tunnel_id in list(self._closing):
                self._close_confirmed(tunnel_id)
        if link.draining and self.link is link:
            self.link = None
            self._requests.clear()
        elif self.link is link:
            self.link = None
            self._requests.clear()
            if self._started and self.forwards:
                _log.warn("link to relay lost; reconnecting")
        elif link.error_message is None and not link.welcomed:
            self._attempt_failed(_describe(reason))

    def _relay_names(self) -> str:
        return ",".join(str(r) for r in self.relays)

    # -- streams -----------------------------------------------------------------------------

    def _stream_opened(self, link: AgentLink, stream: Stream, metadata: bytes) -> None:
        try:
            info = StreamInfo.decode(metadata)
        except ControlError:
            stream.abortConnection(ErrorCode.PROTOCOL_ERROR)
            return
        forward = next((f for f in self.forwards if f.tunnel_id == info.tunnel_id), None)
        if forward is None:
            stream.abortConnection(ErrorCode.REFUSED_STREAM)
            return
        stream.tunnel_id = info.tunnel_id
        spec = forward.spec
        self.reactor.connectTCP(
            spec.host,
            spec.port,
            _LocalFactory(stream, spec, info),
            timeout=self.local_connect_timeout,
        )


def _describe(reason: Failure) -> str:
    value = reason.value
    text = str(value) or type(value).__name__
    if "certificate verify failed" in text or "CERTIFICATE_VERIFY_FAILED" in text:
        return f"the relay's certificate is not trusted ({text}); pass --ca / TUNNEL_CA"
    return text


def _trust_root(ca: str | None) -> Any:
    if ca is None:
        return platformTrust()
    with open(ca, "rb") as f:
        pem = f.read()
    blocks = [
        b"-----BEGIN CERTIFICATE-----" + part
        for part in pem.split(b"-----BEGIN CERTIFICATE-----")[1:]
    ]
    if not blocks:
        raise ValueError(f"{ca} holds no PEM certificate")
    return trustRootFromCertificates([Certificate.loadPEM(block) for block in blocks])


def _tcp_endpoint(reactor: Any, relay: RelayAddress, timeout: float) -> Any:
    """
    A TCP endpoint for `relay`; ``*.localhost`` names are loopback (RFC 6761), as curl and
    browsers treat them.
    """
    host = relay.host
    dial = "127.0.0.1" if host == "localhost" or host.endswith(".localhost") else host
    if isIPAddress(dial):
        # No resolver round trip (and no thread pool start) for an address.
        return TCP4ClientEndpoint(reactor, dial, relay.port, timeout=timeout)
    if isIPv6Address(dial):
        return TCP6ClientEndpoint(reactor, dial, relay.port, timeout=timeout)
    return HostnameEndpoint(reactor, dial, relay.port, timeout=timeout)


def _connect_time(reactor: Any, relay: RelayAddress, timeout: float) -> defer.Deferred[float]:
    """
    Seconds a TCP connection to `relay` takes (infinity if it fails): about one round trip.
    """
    started = reactor.seconds()
    d: defer.Deferred[Any] = _tcp_endpoint(reactor, relay, timeout).connect(
        Factory.forProtocol(Protocol)
    )

    def connected(protocol: Protocol) -> float:
        if protocol.transport is not None:
            protocol.transport.loseConnection()
        return float(reactor.seconds() - started)

    return d.addCallbacks(connected, lambda _: float("inf"))


@implementer(interfaces.IStreamClientEndpoint)
class _FailoverEndpoint:
    """
    Dials the agent's relays in turn: the current one until an attempt fails, then the next.
    """

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        agent = self.agent
        relay = agent.relays[agent._relay_index % len(agent.relays)]
        creator = optionsForClientTLS(
            relay.host, trustRoot=agent._trust, acceptableProtocols=[LINK_ALPN]
        )
        if agent.proxy is None:
            inner = _tcp_endpoint(agent.reactor, relay, agent.connect_timeout)
        else:
            proxy = agent.proxy
            inner = HTTPConnectEndpoint(
                agent.reactor,
                _tcp_endpoint(
                    agent.reactor, RelayAddress(proxy.host, proxy.port), agent.connect_timeout
                ),
                proxy,
                relay.host,
                relay.port,
                agent.connect_timeout,
            )
        d: defer.Deferred[Any] = fast_client_tls(creator, inner).connect(factory)

        def failed(reason: Failure) -> Failure:
            agent._relay_index += 1
            agent._attempt_failed(f"cannot connect to {relay}: {_describe(reason)}")
            return reason

        d.addErrback(failed)
        return d


class AgentLink(LinkProtocol):
    """
    The agent's end of its link.
    """

    def __init__(self, agent: Agent) -> None:
        super().__init__(agent.reactor, client=True, settings=agent.settings)
        self.agent = agent
        self.welcomed = False
        self.draining = False
        self.error_message: ErrorMessage | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self.send(
            AgentHello(
                version=PROTOCOL_VERSION, token=self.agent.token, agent=f"tunnels/{__version__}"
            )
        )

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
        agent = self.agent
        if isinstance(message, RelayWelcome):
            self.welcomed = True
            agent._welcomed(self, message)
        elif isinstance(message, TunnelGranted | TunnelRefusedMessage):
            agent._answered(message)
        elif isinstance(message, TunnelClosed):
            agent._closed_by_relay(message)
        elif isinstance(message, ErrorMessage):
            self.error_message = message
            kind = (
                AuthenticationError
                if message.code == ErrorReason.UNAUTHORIZED
                else RelayUnavailable
            )
            agent._attempt_failed(f"the relay refused the agent: {message.message}", kind)

    def streamOpened(self, stream: Stream, metadata: bytes) -> None:
        self.agent._stream_opened(self, stream, metadata)

    def goAwayReceived(self, code: int, message: str) -> None:
        if code != ErrorCode.NO_ERROR:
            return
        # The relay is draining: streams in flight finish here; the link closes as soon as
        # none is left, so the ClientService reconnects (to the next relay, if there are
        # several) while nothing is lost.
        _log.info(
            "relay is draining ({message}); reconnecting once streams finish", message=message
        )
        self.draining = True
        self.agent._relay_index += 1
        self.streamForgotten()

    def streamForgotten(self) -> None:
        if self.draining and not self.streams and self.transport is not None:
            self.abort()

    def linkLost(self, reason: Failure) -> None:
        self.agent._link_lost(self, reason)


class _LocalFactory(ClientFactory):
    """
    Connects one stream to the local target.
    """

    noisy = False

    def __init__(self, stream: Stream, spec: ForwardSpec, info: StreamInfo) -> None:
        self.stream = stream
        self.spec = spec
        self.info = info

    def buildProtocol(self, addr: Any) -> Protocol:
        header = b""
        if self.spec.proxy_protocol:
            info = self.info
            header = proxy_header(
                self.spec.proxy_protocol,
                (info.client_host, info.client_port),
                (info.server_host, info.server_port),
            )
        return _LocalProtocol(self.stream, header)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        timed_out = reason.check(error.TimeoutError, error.UserError) is not None
        code = ErrorCode.CONNECT_TIMEOUT if timed_out else ErrorCode.CONNECT_FAILED
        _log.warn(
            "cannot connect to {target}: {reason}",
            target=self.spec.target,
            reason=_describe(reason),
        )
        self.stream.abortConnection(code)


class _LocalProtocol(SpliceProtocol):
    """
    The local target's connection, joined to its stream.
    """

    def __init__(self, stream: Stream, header: bytes = b"") -> None:
        super().__init__(stream)
        #: Written to the target before anything from the stream (a PROXY header).
        self.header = header

    def connectionMade(self) -> None:
        stream: Stream = self.other
        transport = self.transport
        assert transport is not None
        if stream._closed:
            transport.abortConnection()  # type: ignore[attr-defined]
            return
        if self.header:
            transport.write(self.header)
        super().connectionMade()
        stream.attach(SpliceProtocol(transport))
