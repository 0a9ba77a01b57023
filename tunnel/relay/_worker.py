"""
One worker of a relay run as several processes (``twistd tunnelrelay --workers N``).

A worker is today's relay (`tunnel.relay.service.RelayService`) with four changes, made by
`attach_worker`:

- its public listener is opened with ``SO_REUSEPORT`` (`ReusePortEndpoint`), as every other
  worker's on the same address, so the kernel spreads the connections among them;
- it reports each tunnel member it grants or loses (``claim``/``release``) and its links per
  principal (``links``) to the supervisor over its control socket, and keeps the
  supervisor's answers in a `tunnel.relay._directory.Replica`: which workers hold which
  tunnels, and what each principal holds on the others (the grant's limits add those);
- its router hands a public connection for a tunnel that it does not serve (or serves with
  no usable member) but another worker does to that worker (`tunnel.relay._handoff`), and
  an agent's link, before its TLS handshake, to the worker with the fewest links when this
  one holds more (`tunnel.relay._directory.spread_to`; a link that cannot be handed is
  served here); it takes the connections other workers hand to it on its own UNIX socket;
- a verified reclaim of an id that another worker's link holds probes that link through the
  supervisor (`RemoteHolder`); a silent holder loses it there.

A claim that the supervisor finds in conflict (``lost``) closes the tunnel here with the
reason. When the supervisor goes away, the worker drains and exits.
"""

from __future__ import annotations

import itertools
import os
import socket
import weakref
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, serverFromString
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from tunnel.relay._accept import adopt_stream_port
from tunnel.relay._clienthello import ClientHello
from tunnel.relay._directory import Elsewhere, Replica
from tunnel.relay._handoff import (
    HandoffCounts,
    HandoffFactory,
    HandoffReceiverFactory,
    HandoffSender,
    replay,
)
from tunnel.relay._link import RelayLink
from tunnel.relay._shares import Holdings
from tunnel.relay._sni import Route, SNIDispatchFactory
from tunnel.relay._state import Relay
from tunnel.relay._tls import LINK_ALPN
from tunnel.relay._workermsg import MessageDecoder, MessageError, encode
from tunnel.relay.config import RECLAIM_PROBE_TIMEOUT
from tunnel.relay.registry import TunnelRecord, usable_link

__all__ = [
    "WORKER_ENV",
    "ReusePortEndpoint",
    "Worker",
    "admin_path",
    "attach_worker",
    "control_path",
    "handoff_path",
    "listen_reuseport",
    "parse_worker_env",
    "probe_listen",
    "worker_dir",
]

_log = Logger()

#: The environment variable that makes ``twistd tunnelrelay`` a worker: ``<index>/<count>``
#: (set by the supervisor for the processes it starts).
WORKER_ENV = "TUNNEL_RELAY_WORKER"


def worker_dir(state_dir: str, index: int) -> str:
    """The directory of worker `index`'s sockets."""
    return os.path.join(state_dir, "workers", str(index))


def control_path(state_dir: str, index: int) -> str:
    """The UNIX socket on which the supervisor talks to worker `index`."""
    return os.path.join(worker_dir(state_dir, index), "control.sock")


def handoff_path(state_dir: str, index: int) -> str:
    """The UNIX socket on which worker `index` takes connections handed to it."""
    return os.path.join(worker_dir(state_dir, index), "handoff.sock")


def admin_path(state_dir: str, index: int) -> str:
    """The UNIX socket of worker `index`'s own admin site."""
    return os.path.join(worker_dir(state_dir, index), "admin.sock")


def parse_worker_env(value: str) -> tuple[int, int]:
    """
    ``<index>/<count>`` as two integers.

    @raise ValueError: it is not that, or the index is out of range.
    """
    index_text, _, count_text = value.partition("/")
    index, count = int(index_text), int(count_text)
    if not 0 <= index < count:
        raise ValueError(f"{WORKER_ENV}={value!r}: no such worker")
    return index, count


def _listen_address(reactor: Any, description: str) -> tuple[int, str, int, int]:
    endpoint = serverFromString(reactor, description)
    if isinstance(endpoint, TCP6ServerEndpoint):
        family = socket.AF_INET6
    elif isinstance(endpoint, TCP4ServerEndpoint):
        family = socket.AF_INET
    else:
        raise ValueError(f"{description!r}: several workers listen on tcp: or tcp6: endpoints")
    port: int = endpoint._port
    interface: str = endpoint._interface
    backlog: int = endpoint._backlog
    if not port:
        raise ValueError(f"{description!r}: several workers need a fixed port, not 0")
    return family, interface, port, backlog


def check_listen(description: str) -> None:
    """
    Whether workers can share endpoint string `description` (`listen_reuseport`).

    @raise ValueError: they cannot, and why.
    """
    _listen_address(None, description)


def probe_listen(description: str) -> None:
    """
    Bind the address of endpoint string `description` as the workers will (with
    ``SO_REUSEPORT``), and let it go: so that an address another program holds is said at
    start, not found by every worker in turn.

    @raise ValueError: it is another kind of endpoint, or has no port.
    @raise OSError: the address cannot be had.
    """
    family, interface, port, _ = _listen_address(None, description)
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((interface or ("::" if family == socket.AF_INET6 else ""), port))


def listen_reuseport(reactor: Any, description: str, factory: Factory) -> IListeningPort:
    """
    Listen as endpoint string `description` says (``tcp:`` or ``tcp6:``, with its port,
    ``interface`` and ``backlog``), with ``SO_REUSEPORT`` set, so that several processes
    listen on the same address.

    @raise ValueError: it is another kind of endpoint, or has no port.
    @raise OSError: the address cannot be had.
    """
    family, interface, port, backlog = _listen_address(reactor, description)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((interface or ("::" if family == socket.AF_INET6 else ""), port))
        sock.listen(backlog)
        sock.setblocking(False)
        # The reactor takes its own copy of the descriptor.
        listening: IListeningPort = adopt_stream_port(reactor, sock.fileno(), family, factory)
    finally:
        sock.close()
    return listening


class ReusePortEndpoint:
    """A server endpoint (its ``listen``) for `listen_reuseport`."""

    def __init__(self, reactor: Any, description: str) -> None:
        self.reactor = reactor
        self.description = description

    def listen(self, factory: Factory) -> defer.Deferred[IListeningPort]:
        return defer.maybeDeferred(listen_reuseport, self.reactor, self.description, factory)


class RemoteHolder:
    """The link of another worker that holds a tunnel a link here reclaims."""

    remote = True

    def __init__(self, worker: Worker, tunnel_id: str, index: int) -> None:
        self.worker = worker
        self.tunnel_id = tunnel_id
        self.index = index
        self.peer_name = f"a link of worker {index}"

    def probe(self, timeout: float) -> defer.Deferred[bool]:
        """Whether that link answers a ping within `timeout` (through its worker)."""
        return self.worker.ask_probe(self.tunnel_id, self.index, timeout)


class _ReportedHoldings(Holdings[str, Any]):
    """The links of each principal, each change told to `changed(principal, count)`."""

    def __init__(self, changed: Any) -> None:
        super().__init__()
        self._changed = changed
        #: The links of every principal.
        self.total = 0

    def add(self, key: str, item: Any) -> None:
        before = self.count(key)
        super().add(key, item)
        if self.count(key) != before:
            self.total += self.count(key) - before
            self._changed(key, self.count(key))

    def discard(self, key: str, item: Any) -> None:
        before = self.count(key)
        super().discard(key, item)
        if self.count(key) != before:
            self.total += self.count(key) - before
            self._changed(key, self.count(key))


class _Control(Protocol):
    """The worker's end of its control socket."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.decoder = MessageDecoder()

    def connectionMade(self) -> None:
        self.worker.control_up(self)

    def dataReceived(self, data: bytes) -> None:
        try:
            messages = self.decoder.feed(data)
        except MessageError as e:
            _log.error("malformed message from the supervisor: {e}", e=e)
            if self.transport is not None:
                self.transport.loseConnection()
            return
        for message in messages:
            self.worker.received(message)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.worker.control_down()


class Worker(Elsewhere, service.Service):
    """
    What makes a relay one worker of `count`: see the module. A child service of the
    relay's: started before its public listener (it connects to the supervisor and listens
    for hand-offs), stopped with it.
    """

    def __init__(self, reactor: Any, relay: Relay, index: int, count: int, state_dir: str) -> None:
        self.reactor = reactor
        self.relay = relay
        self.index = index
        self.count = count
        self.state_dir = state_dir
        self.replica = Replica(index)
        self.handoffs = HandoffCounts()
        self.sender = HandoffSender(
            reactor,
            lambda w: handoff_path(state_dir, w),
            self.handoffs,
            lambda format, **fields: relay.ratelog.warn("hand-off", format, **fields),
        )
        self.control: _Control | None = None
        self._outbox: list[bytes] = []
        self._probe_ids = itertools.count(1)
        self._probes: dict[int, tuple[defer.Deferred[bool], IDelayedCall]] = {}
        self._handoff_port: Any = None
        self._stopping = False
        relay.elsewhere = self
        relay.worker_status = self
        relay.registry.on_member = self._member
        self.links_here = _ReportedHoldings(self._links_changed)
        relay.principal_links = self.links_here
        #: Links made here (accepted or handed here) that may not be authenticated yet.
        self._linking: weakref.WeakSet[Any] = weakref.WeakSet()

    # -- setting up ------------------------------------------------------------------------

    def attach(self, relay_service: Any, listen: str) -> None:
        """Make `relay_service` (the relay's service) this worker's: listener, router."""
        config = self.relay.config
        relay_service.endpoint = ReusePortEndpoint(self.reactor, listen)
        relay_service.front.router = self.route
        links, linking = self.relay.link_factory, self._linking

        class _Linking(Factory[RelayLink]):
            """The relay's link factory, noting each link it builds."""

            noisy = False

            def buildProtocol(inner, addr: Any) -> RelayLink | None:
                proto = links.buildProtocol(addr)
                if proto is not None:
                    linking.add(proto)
                return proto

        self.relay.link_factory = _Linking()
        # Connections handed here are served from what this worker holds, never handed on.
        self.handed_front = SNIDispatchFactory(
            self.relay.route,
            self.reactor,
            handshake_timeout=config.handshake_timeout,
            client_hello_timeout=config.client_hello_timeout,
            max_pending_handshakes=config.max_pending_handshakes,
            max_pending_per_source=config.max_pending_per_source,
            set_nodelay=False,
        )
        self.setServiceParent(relay_service)

    def startService(self) -> None:
        super().startService()
        path = handoff_path(self.state_dir, self.index)
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        if os.path.exists(path):
            os.unlink(path)
        receiver = HandoffReceiverFactory(self.reactor, self.handed_front, self.handoffs)
        self._handoff_port = self.reactor.listenUNIX(path, receiver, mode=0o600)

        class _Connect(ClientFactory):
            noisy = False

            def buildProtocol(inner, addr: Any) -> Protocol:
                return _Control(self)

            def clientConnectionFailed(inner, connector: Any, reason: Failure) -> None:
                _log.error(
                    "worker {i}: cannot reach the supervisor: {why}",
                    i=self.index,
                    why=reason.getErrorMessage(),
                )
                self.reactor.stop()

        self.reactor.connectUNIX(control_path(self.state_dir, self.index), _Connect(), timeout=5)

    def stopService(self) -> defer.Deferred[None] | None:
        self._stopping = True
        super().stopService()
        port, self._handoff_port = self._handoff_port, None
        if port is not None:
            return defer.maybeDeferred(port.stopListening)
        return None

    # -- the control socket ----------------------------------------------------------------

    def control_up(self, control: _Control) -> None:
        self.control = control
        outbox, self._outbox = self._outbox, []
        assert control.transport is not None
        for frame in outbox:
            control.transport.write(frame)
        _log.info("worker {i} of {n} (pid {pid})", i=self.index, n=self.count, pid=os.getpid())

    def control_down(self) -> None:
        self.control = None
        if not self._stopping:
            _log.error("worker {i}: the supervisor went away: draining", i=self.index)
            self._stopping = True
            self.reactor.stop()

    def send(self, message: dict[str, Any]) -> None:
        frame = encode(message)
        control = self.control
        if control is not None and control.transport is not None:
            control.transport.write(frame)
        else:
            self._outbox.append(frame)

    def received(self, message: dict[str, Any]) -> None:
        kind = message["t"]
        if kind in ("owners", "counts", "spread"):
            self.replica.update(message)
        elif kind == "lost":
            record = self.relay.registry.get(message["id"])
            if record is not None:
                _log.warn(
                    "tunnel {id} closed here: {reason}", id=message["id"], reason=message["reason"]
                )
                self.relay.close_tunnel(record, message["reason"])
        elif kind == "probe":
            self._probe_here(message["id"], message["probe"], message["to"])
        elif kind == "probed":
            pending = self._probes.pop(message["probe"], None)
            if pending is not None:
                d, timer = pending
                if timer.active():
                    timer.cancel()
                d.callback(message["alive"])
        else:
            _log.warn("unexpected {kind} message from the supervisor", kind=kind)

    # -- reports ---------------------------------------------------------------------------

    def _member(self, record: TunnelRecord, link: Any, joined: bool) -> None:
        principal = getattr(link, "principal", "") or ""
        if joined:
            self.send(
                {
                    "t": "claim",
                    "id": record.tunnel_id,
                    "named": record.named,
                    "sig": record.signature,
                    "principal": principal,
                }
            )
        else:
            self.send({"t": "release", "id": record.tunnel_id, "principal": principal})

    def _links_changed(self, principal: str, n: int) -> None:
        self.send({"t": "links", "principal": principal, "n": n})

    # -- reclaims of what another worker holds ---------------------------------------------

    def ask_probe(self, tunnel_id: str, holder: int, timeout: float) -> defer.Deferred[bool]:
        """Whether the link of worker `holder` holding `tunnel_id` is alive (False after
        `timeout` and a second more without an answer)."""
        probe = next(self._probe_ids)
        d: defer.Deferred[bool] = defer.Deferred()

        def timed_out() -> None:
            if self._probes.pop(probe, None) is not None:
                d.callback(False)

        timer = self.reactor.callLater(timeout + 1.0, timed_out)
        self._probes[probe] = (d, timer)
        self.send({"t": "probe", "id": tunnel_id, "probe": probe, "to": holder})
        return d

    def _probe_here(self, tunnel_id: str, probe: int, to: int) -> None:
        """Another worker reclaims `tunnel_id`: is its holder here alive? A silent one
        loses it (the release goes out before the answer)."""
        relay = self.relay
        record = relay.registry.get(tunnel_id)
        if record is None or record.named or record.owner is None:
            self.send({"t": "probed", "probe": probe, "to": to, "alive": False})
            return

        def answered(alive: bool) -> None:
            if not alive and relay.registry.get(tunnel_id) is record:
                _log.info("tunnel {id} reclaimed by a link of another worker", id=tunnel_id)
                relay.close_tunnel(record, "reclaimed by another link")
            self.send({"t": "probed", "probe": probe, "to": to, "alive": alive})

        d: defer.Deferred[bool] = record.owner.probe(RECLAIM_PROBE_TIMEOUT)
        d.addCallback(answered).addErrback(lambda f: _log.failure("probing a holder", f))

    # -- Elsewhere: what the grant asks -----------------------------------------------------

    def links(self, principal: str) -> int:
        return self.replica.links(principal)

    def tunnels(self, principal: str) -> int:
        return self.replica.tunnels(principal)

    def holder(self, tunnel_id: str) -> Any:
        others = self.replica.elsewhere(tunnel_id)
        return RemoteHolder(self, tunnel_id, others[0]) if others else None

    def signature(self, name: str) -> str | None:
        return self.replica.signature(name)

    # -- routing -----------------------------------------------------------------------------

    def route(self, hello: ClientHello) -> Route | None:
        """
        `Relay.route`, but a tunnel that no usable member here serves and another worker
        holds is handed to that worker, and an agent's link goes to the worker with the
        fewest links unless this one ties with it.
        """
        relay = self.relay
        name = hello.server_name
        if not relay.draining:
            suffix = "." + relay.domain
            tunnel_id = name[: -len(suffix)] if name and name.endswith(suffix) else None
            if tunnel_id:
                record = relay.registry.get(tunnel_id)
                if record is None or not any(usable_link(m.link) for m in record.members):
                    target = self.replica.pick(tunnel_id)
                    if target is not None:
                        factory = HandoffFactory(self.sender, target, hello)
                        return Route(None, factory, passthrough=True)
            elif tunnel_id is None and LINK_ALPN in hello.alpn:
                target = self.replica.link_target(self.links_here.total + self._unauthenticated())
                if target is not None:
                    factory = HandoffFactory(self.sender, target, hello, self._serve_here)
                    return Route(None, factory, passthrough=True)
        return relay.route(hello)

    def _unauthenticated(self) -> int:
        """Links here whose hello is not accepted yet (and not lost): they count among this
        worker's links already, so that links arriving at once are spread too.

        A link leaves `_linking` once it is authenticated or lost, so each call costs the
        links still waiting for their hello, not every link this worker holds."""
        linking = self._linking
        settled = [
            link
            for link in linking
            if getattr(link, "authenticated", True) or getattr(link, "lost", True)
        ]
        for link in settled:
            linking.discard(link)
        return len(linking)

    def _serve_here(self, transport: Any, data: bytes, hello: ClientHello) -> None:
        """A link that could not be handed over: served here after all, as one handed
        here would be (its ClientHello is not parsed again)."""
        proto = self.handed_front.buildProtocol(transport.getPeer())
        transport.protocol = proto
        proto.makeConnection(transport)
        if transport.connected and not transport.disconnecting:
            transport.startReading()
            replay(proto, data, hello)

    # -- status ------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """The hand-off counters, for ``/status`` and ``/metrics``."""
        return {
            "handoffs_sent": self.handoffs.sent,
            "handoffs_received": self.handoffs.received,
            "handoffs_failed": self.handoffs.failed,
        }

    def identity(self) -> dict[str, int]:
        """This worker's place, for ``/status``."""
        return {"index": self.index, "of": self.count, "pid": os.getpid()}


def attach_worker(
    reactor: Any, relay_service: Any, index: int, count: int, state_dir: str, listen: str
) -> Worker:
    """Make `relay_service` worker `index` of `count` (see the module)."""
    worker = Worker(reactor, relay_service.relay, index, count, state_dir)
    worker.attach(relay_service, listen)
    return worker
