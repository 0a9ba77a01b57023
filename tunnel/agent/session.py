"""
The agent: one link to a relay (kept up by a `ClientService`), the tunnels asked of it, and
a connection to the local target for every stream the relay opens.

`Agent` is the Twisted adapter around the sans-IO `AgentControl` (`_control.py`): it feeds
it link events, control messages and the clock, and carries out the effects (sending,
Deferreds, timers, the `ClientService`). Dialling is `_dial.py`, the link `_link.py`, the
local data path `_local.py`, and the configuration `settings.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from twisted.application.internet import ClientService
from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from tunnel import __version__
from tunnel._rate import format_rate
from tunnel._tunnel import Tunnel
from tunnel.agent import _control as control
from tunnel.agent._bootstrap import link_settings
from tunnel.agent._dial import FailoverEndpoint, describe_failure, rank_times, trust_root
from tunnel.agent._events import EventLog
from tunnel.agent._link import AgentLink
from tunnel.agent._local import LocalFactory, connect_local
from tunnel.agent._records import AgentForward
from tunnel.agent._retry import ReconnectPolicy
from tunnel.agent._stdtls import StdTLSFactory
from tunnel.agent.settings import ForwardSpec, RelayAddress, parse_forward, parse_relays
from tunnel.errors import TunnelClosedError
from tunnel.link import Stream
from tunnel.wire import PROTOCOL_VERSION, ErrorCode, LinkSettings
from tunnel.wire.control import (
    ControlError,
    ControlMessage,
    RelayWelcome,
    StreamInfo,
    TunnelGranted,
)
from tunnel.wire.control import TunnelRefused as TunnelRefusedMessage

if TYPE_CHECKING:
    from tunnel.agent._bootstrap import Bootstrapped
    from tunnel.agent._httpconnect import ProxyAddress

__all__ = ["Agent", "AgentLink", "ForwardSpec", "RelayAddress", "parse_forward", "parse_relays"]

_log = Logger()


#: The record of one forward (`tunnel.agent._records.AgentForward`).
_Forward = AgentForward


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
        stop_grace: float = 0.0,
    ) -> None:
        if not relays:
            raise ValueError("no relay given")
        #: An HTTP proxy to reach the relays through (``CONNECT``), or None.
        self.proxy = proxy
        #: Seconds `stop` lets connections in flight finish (after a GOAWAY that makes the
        #: relay send new ones elsewhere, such as the other members of a name's pool).
        self.stop_grace = stop_grace
        self._stopping = False
        self.reactor = reactor
        self.relays = list(relays)
        self.token = token
        self.ca = ca
        self.connect_timeout = connect_timeout
        self.local_connect_timeout = local_connect_timeout
        self.fail_fast = fail_fast
        # The relay opens one stream per public connection: allow many.
        self.settings = settings or link_settings()
        self.control = control.AgentControl(
            token=token,
            agent_name=f"tunnels/{__version__}",
            version=PROTOCOL_VERSION,
            connect_timeout=connect_timeout,
            fail_fast=fail_fast,
            describe_relays=self._relay_names,
        )
        #: The link the relay welcomed, or None.
        self.link: AgentLink | None = None
        self._connecting: AgentLink | None = None
        self._closing: dict[str, list[defer.Deferred[None]]] = {}
        self._deadline: Any = None
        self._trust = trust_root(ca)
        factory = Factory.forProtocol(lambda: AgentLink(self))
        factory.noisy = False
        #: The delays between connection attempts: quick after a cut, else back-off
        #: (`ReconnectPolicy`), unless the caller gave its own `retry_policy`.
        self.reconnect = ReconnectPolicy() if retry_policy is None else None
        policy = retry_policy or self.reconnect
        assert policy is not None
        self._service = ClientService(
            FailoverEndpoint(self),
            factory,
            # Milliseconds: ClientService logs the delay ("in 0.037 seconds").
            retryPolicy=lambda attempt: round(policy(attempt), 3),
            clock=reactor,
        )
        self._ranked = False
        self._ranking = False
        #: A link made elsewhere, being adopted (`adopt`).
        self._boot: Bootstrapped | None = None
        #: Called with the reason when the relay refuses this agent's token.
        self.on_refused: list[Callable[[str], object]] = []
        #: Links the relay accepted (the first one, then one per reconnect).
        self.links_made = 0
        #: What happened, for the `tunnel` command and the inspector; the connections.
        self.events = EventLog(reactor.seconds)
        #: After a reconnect: the forwards not granted again yet (then one line says so).
        self._regranting: list[_Forward] | None = None
        #: The URL of the inspector page serving this agent, if one does (`_inspect.inspect`).
        self.inspector_url: str | None = None
        #: Called when the agent stops (the inspector stops listening); `stop` waits for
        #: the Deferreds they return.
        self.on_stop: list[Callable[[], object]] = []

    # -- the core's state, as the admin page and tests read it -------------------------------

    @property
    def forwards(self) -> list[_Forward]:
        return self.control.forwards  # type: ignore[return-value]

    @property
    def welcome(self) -> RelayWelcome | None:
        return self.control.welcome

    @property
    def last_error(self) -> str | None:
        return self.control.last_error

    @property
    def _relay_index(self) -> int:
        return self.control.relay_index

    def _relay_names(self) -> str:
        return ",".join(str(r) for r in self.relays)

    # -- life cycle --------------------------------------------------------------------------

    def start(self) -> None:
        """
        Start connecting (idempotent).
        """
        self._apply(self.control.start())

    def _dial(self) -> None:
        if self._service.running or self._ranking:
            return
        if len(self.relays) > 1 and not self._ranked and self.proxy is None:
            # The nearest relay first: connect to each (TCP only) and sort by the time it
            # took; one that does not answer (soon after the first did) goes last. Failover
            # then follows this order.
            self._ranked = self._ranking = True
            d = rank_times(self.reactor, self.relays, self.connect_timeout)

            def ranked(times: list[float]) -> None:
                self._ranking = False
                order = sorted(range(len(self.relays)), key=lambda i: times[i])
                self.relays = [self.relays[i] for i in order]
                _log.info(
                    "relays by connect time: {order}",
                    order=", ".join(
                        f"{self.relays[n]} ({times[i] * 1e3:.1f} ms)" for n, i in enumerate(order)
                    ),
                )
                if self.control.state is not control.SessionState.IDLE:
                    self._service.startService()

            d.addCallback(ranked)
            return
        self._service.startService()

    def stop(self) -> defer.Deferred[None]:
        """
        Close every tunnel (telling the relay, so their names stop answering at once) and the
        link; stop reconnecting. Fires once the link is closed (within about a second).

        With a `stop_grace`, the link drains first: a GOAWAY tells the relay to send no new
        connections here (a name's pool sends them to its other members, and those the
        relay had opened meanwhile are refused unprocessed, so it moves them too), and the
        connections in flight finish, for at most `stop_grace` seconds.
        """
        link = self.link
        if (
            self.stop_grace > 0
            and not self._stopping
            and link is not None
            and link.transport is not None
        ):
            self._stopping = True
            link.goAway(ErrorCode.NO_ERROR, "agent stopping")
            if link.streams:
                _log.info(
                    "stopping: {n} connections in flight may finish, for at most {grace}s",
                    n=len(link.streams),
                    grace=self.stop_grace,
                )
            drained = link.idle(self.stop_grace)
            return drained.addCallback(lambda _: self._stop_now())
        return self._stop_now()

    def _stop_now(self) -> defer.Deferred[None]:
        link = self.link
        waits: list[defer.Deferred[Any]] = [defer.maybeDeferred(f) for f in self.on_stop]
        self.on_stop.clear()
        self._apply(self.control.stop(), stopping=True)
        if link is not None and link.transport is not None:
            waits.append(link.close("agent stopping"))
        if self._service.running:
            waits.append(defer.maybeDeferred(self._service.stopService))
        d: defer.Deferred[Any] = defer.gatherResults(waits, consumeErrors=True)
        return d.addBoth(lambda _: None)

    # -- the API -----------------------------------------------------------------------------

    def forward(self, spec: ForwardSpec) -> defer.Deferred[Tunnel]:
        """
        Ask for a tunnel to `spec`'s target.

        @raise ValueError: the same target is already forwarded by this agent.
        @return: fires with the `Tunnel` once granted; fails with `RelayUnavailable`,
            `AuthenticationError` or `TunnelRefused`.
        """
        record = _Forward(spec)
        d: defer.Deferred[Tunnel] = defer.Deferred()
        record.deferred = d
        self._apply(self.control.forward(record, self.reactor.seconds()))
        return d

    def check_forward(self, spec: ForwardSpec) -> None:
        """
        Raise now what `forward` would raise for `spec`, asking for nothing.

        @raise ValueError: the same target is already forwarded by this agent.
        """
        self.control.check_forward(spec)

    def issue_certificate(self, record: _Forward, csr: str | bytes) -> defer.Deferred[str]:
        """
        Have the relay sign `csr` (a PEM CSR naming the tunnel's host only) for `record`'s
        passthrough tunnel.

        @raise ValueError: not a passthrough forward, or not a PEM CSR.
        @return: fires with the PEM chain; fails with `TunnelRefused` (the relay's reason),
            `RelayUnavailable` (no link, or it was lost before the answer) or
            `TunnelClosedError` (the tunnel was closed).
        """
        if record.closed:
            return defer.fail(TunnelClosedError("the tunnel is closed: no certificate for it"))
        if isinstance(csr, bytes):
            try:
                csr = csr.decode("ascii")
            except UnicodeDecodeError:
                raise ValueError("the CSR is not PEM text") from None
        d: defer.Deferred[str] = defer.Deferred()
        self._apply(self.control.issue_certificate(record, csr, d))
        return d

    def _close(self, record: _Forward) -> defer.Deferred[None]:
        if record.closed:
            return defer.succeed(None)
        self._apply(self.control.close(record))
        tunnel_id = record.tunnel_id
        if tunnel_id is None or not self.control.closing(tunnel_id):
            return defer.succeed(None)
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

    # -- adopting a link made elsewhere ------------------------------------------------------

    def adopt(self, boot: Bootstrapped) -> AgentLink:
        """
        Take over a link made without Twisted (`tunnel.agent._bootstrap`), welcomed and
        answered: its socket, TLS session, multiplexer and control core (with its forwards)
        continue here, and the core's effects it kept (the welcome, the grants, log lines)
        are carried out. Streams the relay opened meanwhile are served. When this link is
        lost, the agent reconnects as usual.

        @raise RuntimeError: the agent has started a link of its own already.
        """
        if self.control.state is not control.SessionState.IDLE:
            raise RuntimeError("the agent is connecting already: it cannot adopt a link")
        self.control = boot.control
        self.control.describe_relays = self._relay_names
        self._boot = boot
        link = AgentLink(self, boot.mux)
        factory = StdTLSFactory(
            self._trust,
            boot.relay.host,
            Factory.forProtocol(lambda: link),
            (boot.tls, boot.incoming, boot.outgoing),
        )
        sock = boot.sock
        try:
            # Twisted duplicates the descriptor: ours is closed, the connection stays.
            self.reactor.adoptStreamConnection(sock.fileno(), sock.family, factory)
        finally:
            sock.close()
        return link

    def _adopted(self, link: AgentLink) -> None:
        boot, self._boot = self._boot, None
        assert boot is not None
        self._connecting = link
        self._apply(boot.effects, link)
        link._dispatch(boot.leftover)

    # -- inputs from the link adapter --------------------------------------------------------

    def _connected(self, link: AgentLink) -> None:
        self._connecting = link
        self._apply(self.control.connected(), link)

    def _dial_failed(self, reason: str) -> None:
        self._apply(self.control.dial_failed(reason))

    def _received(self, link: AgentLink, message: ControlMessage) -> None:
        self._apply(self.control.received(message), link)

    def _answered(self, message: TunnelGranted | TunnelRefusedMessage) -> None:
        self._apply(self.control.received(message))

    def _drain(self, link: AgentLink, message: str) -> None:
        self._apply(self.control.drain(message), link)

    def _link_lost(self, link: AgentLink, reason: Failure) -> None:
        if link is not self.link and link is not self._connecting:
            return  # an old link, already replaced
        self.link = None
        self._connecting = None
        if self.reconnect is not None:
            # Only a cut (no GOAWAY either way) earns the quick retry: not the relay
            # draining or refusing us, nor this side ending the link.
            self.reconnect.link_down(self.reactor.seconds(), cut=link.cut)
        self._apply(self.control.link_lost(describe_failure(reason)))
        if link.adopted and self.control.state is control.SessionState.CONNECTING:
            # The adopted link was not the ClientService's: it reconnects from now on.
            self._dial()

    def _tick(self) -> None:
        self._deadline = None
        self._apply(self.control.tick(self.reactor.seconds()))

    # -- effects -----------------------------------------------------------------------------

    def _apply(
        self, effects: list[control.Effect], link: AgentLink | None = None, stopping: bool = False
    ) -> None:
        link = link or self.link or self._connecting
        for effect in effects:
            if isinstance(effect, control.Send):
                if link is not None and link.transport is not None:
                    link.send(effect.message)
            elif isinstance(effect, control.Dial):
                self._dial()
            elif isinstance(effect, control.StopDialing):
                if not stopping and self._service.running:
                    self._service.stopService().addErrback(lambda _: None)
            elif isinstance(effect, control.LinkReady):
                assert link is not None
                self.link = link
                self.links_made += 1
                if self.reconnect is not None:
                    self.reconnect.link_up(self.reactor.seconds())
                link.keepalive_interval = effect.welcome.keepalive_interval
                link.keepalive_timeout = effect.welcome.keepalive_timeout
                relay = self._relay_names() if len(self.relays) == 1 else self._current_relay()
                if self.links_made == 1:
                    self._say("link_up", f"connected to relay {relay}", detail=True, relay=relay)
                else:
                    self._say("link_up", f"reconnected to relay {relay}", detail=True, relay=relay)
                    self._regranting = [f for f in self.forwards if f.tunnel is not None]
            elif isinstance(effect, control.Granted):
                self._granted(effect)
            elif isinstance(effect, control.Failed):
                record = effect.forward
                assert isinstance(record, _Forward)
                waiting, record.deferred = record.deferred, None
                if waiting is not None:
                    waiting.errback(Failure(effect.error))
            elif isinstance(effect, control.AbortStreams):
                if self.link is not None:
                    for stream in list(self.link.streams.values()):
                        if stream.tunnel_id == effect.tunnel_id:
                            stream.abortConnection(ErrorCode.CANCEL)
            elif isinstance(effect, control.CertificateAnswered):
                waiter: defer.Deferred[str] = effect.waiter
                if effect.error is not None:
                    waiter.errback(Failure(effect.error))
                else:
                    assert effect.chain is not None
                    waiter.callback(effect.chain)
            elif isinstance(effect, control.CloseConfirmed):
                self._close_confirmed(effect.tunnel_id)
            elif isinstance(effect, control.Drain):
                if link is not None:
                    link.drainWhenIdle()
            elif isinstance(effect, control.StopRetrying):
                for observer in list(self.on_refused):
                    observer(effect.reason)
            elif isinstance(effect, control.Violation):
                self._say("protocol_error", f"relay broke the protocol: {effect.message}", "warn")
                if link is not None:
                    link.goAway(ErrorCode.PROTOCOL_ERROR, effect.message)
            elif isinstance(effect, control.Log):
                fields = {} if effect.tunnel_id is None else {"tunnel_id": effect.tunnel_id}
                self._say(effect.kind, effect.text, effect.level, detail=effect.detail, **fields)
        self._schedule()

    def _say(
        self, kind: str, text: str, level: str = "info", *, detail: bool = False, **fields: Any
    ) -> None:
        """
        Log `text` (with `kind` as ``event_type`` and `fields`, for structured logs) and tell
        the event log's observers.
        """
        getattr(_log, level)("{text}", text=text, event_type=kind, **fields)
        self.events.say(kind, text, level, detail=detail, **fields)

    def _current_relay(self) -> str:
        return str(self.relays[self._relay_index % len(self.relays)])

    def _schedule(self) -> None:
        deadline = self.control.next_deadline()
        if self._deadline is not None and self._deadline.active():
            if deadline is not None and self._deadline.getTime() <= deadline:
                return
            self._deadline.cancel()
        self._deadline = None
        if deadline is not None:
            delay = max(0.0, deadline - self.reactor.seconds())
            self._deadline = self.reactor.callLater(delay, self._tick)

    def _granted(self, effect: control.Granted) -> None:
        record = effect.forward
        assert isinstance(record, _Forward)
        grant = effect.grant
        previous = record.tunnel
        tunnel = Tunnel(
            host=grant.host,
            port=grant.port,
            unencrypted_host=grant.tcp_host,
            unencrypted_port=grant.tcp_port,
            inspector_url=self.inspector_url,
            _close=lambda: self._close(record),
            _issue=lambda csr: self.issue_certificate(record, csr),
        )
        record.tunnel = tunnel
        if grant.rate_limit is not None and (
            record.granted_rate != grant.rate_limit or previous is None
        ):
            asked = record.spec.rate_limit
            lowered = asked is not None and grant.rate_limit < asked
            _log.info(
                "tunnel {url}: at most {rate} each way{why}",
                url=tunnel.url,
                rate=format_rate(grant.rate_limit),
                why=" (lowered to the relay's ceiling)"
                if lowered
                else (" (the relay's ceiling)" if asked is None else ""),
            )
        record.granted_rate = grant.rate_limit
        fields: dict[str, Any] = {
            "tunnel_id": grant.tunnel_id,
            "url": tunnel.url,
            "target": record.spec.target,
        }
        if previous is None:
            where = f"{tunnel.url}"
            if tunnel.unencrypted_port is not None:
                where += f" tcp://{tunnel.unencrypted_host}:{tunnel.unencrypted_port}"
            self._say("tunnel_ready", f"tunnel ready: {where} -> {record.spec.target}", **fields)
        elif previous != tunnel:
            where = tunnel.url
            if tunnel.unencrypted_port is not None:
                where += f" tcp://{tunnel.unencrypted_host}:{tunnel.unencrypted_port}"
            self._say(
                "tunnel_moved",
                f"tunnel {previous.url} came back as {where}",
                "warn",
                old=previous.url,
                **fields,
            )
        else:
            self._say("tunnel_back", f"tunnel {tunnel.url} is back", detail=True, **fields)
        regranting = self._regranting
        if regranting is not None and record in regranting:
            regranting.remove(record)
            if not regranting:
                self._regranting = None
                self._say("link_back", "reconnected to the relay: tunnels back")
        waiting, record.deferred = record.deferred, None
        if waiting is not None:
            waiting.callback(tunnel)

    # -- streams -----------------------------------------------------------------------------

    def _stream_opened(self, link: AgentLink, stream: Stream, metadata: bytes) -> None:
        try:
            info = StreamInfo.decode(metadata)
        except ControlError:
            stream.abortConnection(ErrorCode.PROTOCOL_ERROR)
            return
        tunnel_id = info.tunnel_id
        # A loop, not a generator: this runs for every public connection.
        for record in self.control.forwards:
            if record.tunnel_id == tunnel_id:
                break
        else:
            stream.abortConnection(ErrorCode.REFUSED_STREAM)
            return
        stream.tunnel_id = tunnel_id
        spec = record.spec
        connection = self.events.opened(
            info.tunnel_id, spec.target, info.client_host, info.client_port
        )
        connect_local(
            self.reactor,
            spec.host,
            spec.port,
            LocalFactory(
                stream, spec, info, self.events, connection, timeout=self.local_connect_timeout
            ),
            self.local_connect_timeout,
        )
