"""
`tunnel.relay._accept.LeanPort`, the raw TCP tunnels' listening port, on a real epoll reactor
driven by hand (its ``doRead`` called as the reactor would): the transports it makes are
Twisted's `tcp.Server`, with what Twisted's port gives them; it accepts every connection
waiting in one turn, scaled as Twisted scales it; ``EMFILE`` is recovered from as Twisted
recovers; IPv6 peers keep their address; a factory's refusal or failure closes the socket
(the failure logged) and the port goes on. The relay's TLS front listens with it too (one
process, or workers sharing the address); with a relay in this process, so does a raw TCP
tunnel.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import epollreactor, error, tcp
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor
from twisted.python import log
from twisted.python.failure import Failure

from tests.protocol.inprocess import Echo, agent_for, connect, get_reactor, wait_until
from tunnel.agent.session import parse_forward
from tunnel.relay._accept import (
    LeanPort,
    listen_tcp,
    local_address,
    server_endpoint,
    server_transport,
)
from tunnel.relay._worker import listen_reuseport
from tunnel.relay.service import RelayService


class _Made(Protocol):
    """Notes the protocols its factory connected."""

    made: list[_Made]

    def connectionMade(self) -> None:
        self.made.append(self)


class _Factory(Factory):
    """Builds `_Made` protocols, records the addresses it is given; None or an error on
    demand."""

    noisy = False

    def __init__(self, answer: str = "protocol") -> None:
        self.answer = answer
        self.made: list[_Made] = []
        self.addresses: list[Any] = []

    def buildProtocol(self, addr: Any) -> Protocol | None:
        self.addresses.append(addr)
        if self.answer == "none":
            return None
        if self.answer == "raise":
            raise ValueError("no protocol for you")
        p = _Made()
        p.made = self.made
        p.factory = self
        return p


@pytest.fixture
def reactor() -> Iterator[Any]:
    r = epollreactor.EPollReactor()
    yield r
    r._poller.close()


@contextlib.contextmanager
def listening(port: tcp.Port) -> Iterator[tcp.Port]:
    port.startListening()
    try:
        yield port
    finally:
        port.connectionLost(None)


def clients(port: tcp.Port, n: int, host: str = "127.0.0.1") -> list[socket.socket]:
    """`n` connected client sockets (the kernel completes them; none is accepted yet)."""
    socks = []
    for _ in range(n):
        s = socket.create_connection((host, port.getHost().port), timeout=5)
        socks.append(s)
    return socks


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def _transport_view(transport: tcp.Server) -> dict[str, Any]:
    """What a transport holds, in terms independent of its own socket and port number."""
    view: dict[str, Any] = {k: type(v) for k, v in vars(transport).items() if k != "server"}
    number = transport.server._realPortNumber
    view.update(
        logstr=transport.logstr,
        repstr=transport.repstr.replace(f"on {number}>", "on PORT>"),
        logPrefix=transport.logPrefix(),
        peer=(type(transport.getPeer()), transport.getPeer().host),
        host=(type(transport.getHost()), transport.getHost().host),
        client_host=transport.client[0],
        hostname=transport.hostname,
        sessionno=transport.sessionno,
        timeout=transport.socket.gettimeout(),
        blocking=os.get_blocking(transport.fileno()),
        connected=transport.connected,
        reading=transport in transport.reactor.getReaders(),
        writing=transport in transport.reactor.getWriters(),
        temp=(transport._tempDataBuffer, transport._tempDataLen),
        address_type=transport._addressType,
        protocol_transport=transport.protocol.transport is transport,  # type: ignore[attr-defined]
    )
    return view


def drop(made: list[_Made]) -> None:
    """Close the accepted connections now (the reactor is not run)."""
    for p in made:
        p.transport.connectionLost(Failure(error.ConnectionDone()))  # type: ignore[union-attr]


def test_its_transport_is_the_one_twisted_makes(reactor: Any) -> None:
    theirs, ours = _Factory(), _Factory()
    with (
        listening(tcp.Port(0, theirs, 50, "127.0.0.1", reactor)) as twisted_port,
        listening(LeanPort(0, ours, 50, "127.0.0.1", reactor)) as lean_port,
    ):
        socks = clients(twisted_port, 1) + clients(lean_port, 1)
        twisted_port.doRead()
        lean_port.doRead()
        [a], [b] = theirs.made, ours.made
        assert type(b.transport) is tcp.Server
        assert _transport_view(b.transport) == _transport_view(a.transport)  # type: ignore[arg-type]
        assert b.transport.logstr == "_Made,0,127.0.0.1"  # type: ignore[union-attr]
        assert b.transport.getPeer() == ours.addresses[0]  # type: ignore[union-attr]
        assert b.transport.getPeer().port == socks[1].getsockname()[1]  # type: ignore[union-attr]
        assert b.transport.getHost() == lean_port.getHost()  # type: ignore[union-attr]
        assert repr(b.transport) == f"<_Made #0 on {lean_port.getHost().port}>"
        drop([a, b])
        for s in socks:
            s.close()


def test_every_connection_waiting_is_accepted_in_one_turn_scaled_as_twisted(
    reactor: Any,
) -> None:
    factory = _Factory()
    with listening(LeanPort(0, factory, 200, "127.0.0.1", reactor)) as port:
        assert port.numberAccepts == 100
        socks = clients(port, 120)
        port.doRead()
        # Up to the limit in one turn; a turn that reached it raises it by 20, as Twisted.
        assert len(factory.made) == 100
        assert port.numberAccepts == 120
        port.doRead()
        assert len(factory.made) == 120
        # Fewer than the limit: the next turn's limit is what this one accepted.
        assert port.numberAccepts == 20
        port.doRead()  # nothing waiting: no error, at least one accept next time
        assert port.numberAccepts == 1
        assert [p.transport.sessionno for p in factory.made] == list(range(120))  # type: ignore[union-attr]
        peers = {p.transport.getPeer().port for p in factory.made}  # type: ignore[union-attr]
        assert peers == {s.getsockname()[1] for s in socks}
        drop(factory.made)
        for s in socks:
            s.close()


def test_emfile_is_recovered_from_as_twisted_does(reactor: Any) -> None:
    factory = _Factory()
    events: list[dict[str, Any]] = []
    log.addObserver(events.append)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        with listening(LeanPort(0, factory, 50, "127.0.0.1", reactor)) as port:
            socks = clients(port, 3)
            lowest_free = os.dup(0)
            os.close(lowest_free)
            # No descriptor can be had now but the reserved one Twisted keeps for this.
            resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
            try:
                with pytest.raises(OSError) as e:
                    os.dup(0)
                assert e.value.errno == errno.EMFILE
                port.doRead()
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            assert factory.made == []
            assert all(closed_by_server(s) for s in socks)
            # Recovered: the next connection is accepted.
            late = clients(port, 1)
            port.doRead()
            assert len(factory.made) == 1
            drop(factory.made)
            for s in socks + late:
                s.close()
    finally:
        log.removeObserver(events.append)
    text = [log.textFromEventDict(e) or "" for e in events]
    assert any("EMFILE encountered" in t for t in text)
    assert sum("EMFILE recovery: Closed socket" in t for t in text) == 3


def test_an_ipv6_peer_keeps_its_address(reactor: Any) -> None:
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("no IPv6 loopback")
    factory = _Factory()
    with listening(LeanPort(0, factory, 50, "::1", reactor)) as port:
        [sock] = clients(port, 1, "::1")
        port.doRead()
        [made] = factory.made
        transport: Any = made.transport
        assert isinstance(factory.addresses[0], IPv6Address)
        assert factory.addresses[0].host == "::1"
        assert transport.getPeer() == factory.addresses[0]
        assert transport.getPeer().port == sock.getsockname()[1]
        assert isinstance(transport.getHost(), IPv6Address)
        assert transport.getHost().host == "::1"
        assert transport.getHost().port == port.getHost().port
        assert transport.logstr == "_Made,0,::1"
        assert local_address(port) == transport.getHost()
        drop(factory.made)
        sock.close()


def test_a_refused_connection_is_closed(reactor: Any) -> None:
    factory = _Factory("none")
    with listening(LeanPort(0, factory, 50, "127.0.0.1", reactor)) as port:
        socks = clients(port, 2)
        with warnings.catch_warnings(record=True) as unclosed:
            warnings.simplefilter("always", ResourceWarning)
            port.doRead()
        # Closed by the port, not left to the collector.
        assert not [w for w in unclosed if issubclass(w.category, ResourceWarning)]
        assert len(factory.addresses) == 2 and factory.made == []
        assert all(closed_by_server(s) for s in socks)
        assert not [r for r in reactor.getReaders() if isinstance(r, tcp.Server)]
        for s in socks:
            s.close()


def test_a_failing_factory_is_logged_its_socket_closed_and_the_port_goes_on(
    reactor: Any,
) -> None:
    factory = _Factory("raise")
    events: list[dict[str, Any]] = []
    log.addObserver(events.append)
    try:
        with listening(LeanPort(0, factory, 50, "127.0.0.1", reactor)) as port:
            [first] = clients(port, 1)
            with warnings.catch_warnings(record=True) as unclosed:
                warnings.simplefilter("always", ResourceWarning)
                port.doRead()
            assert not [w for w in unclosed if issubclass(w.category, ResourceWarning)]
            assert closed_by_server(first)
            factory.answer = "protocol"
            [second] = clients(port, 1)
            port.doRead()
            assert len(factory.made) == 1
            drop(factory.made)
            first.close()
            second.close()
    finally:
        log.removeObserver(events.append)
    errors = [e for e in events if e.get("isError")]
    assert len(errors) == 1 and errors[0]["failure"].check(ValueError)


def test_the_connections_own_address_comes_from_a_listener_bound_to_one(reactor: Any) -> None:
    with (
        listening(LeanPort(0, _Factory(), 50, "127.0.0.1", reactor)) as one,
        listening(LeanPort(0, _Factory(), 50, "0.0.0.0", reactor)) as every,
    ):
        assert local_address(one) == IPv4Address("TCP", "127.0.0.1", one.getHost().port)
        assert local_address(every) is None


def test_other_reactors_listen_as_they_do() -> None:
    memory = MemoryReactor()
    factory = _Factory()
    listen_tcp(memory, 1234, factory, 10, "127.0.0.1")
    assert memory.tcpServers == [(1234, factory, 10, "127.0.0.1")]


def test_a_reactor_other_than_epoll_is_asked_to_read() -> None:
    class _Reactor:
        def __init__(self) -> None:
            self.readers: list[Any] = []

        def addReader(self, reader: Any) -> None:
            self.readers.append(reader)

    class _Port:
        reactor = _Reactor()
        _realPortNumber = 80

    a, b = socket.socketpair()
    try:
        a.setblocking(False)
        made = _Made()
        made.made = []
        transport = server_transport(a, made, ("127.0.0.1", 5), _Port(), 7)  # type: ignore[arg-type]
        assert _Port.reactor.readers == [transport]
        assert transport.logstr == "_Made,7,127.0.0.1" and repr(transport) == "<_Made #7 on 80>"
    finally:
        a.close()
        b.close()


@pytest_twisted.ensureDeferred
async def test_a_raw_tcp_tunnel_listens_with_it_and_knows_its_address(
    relay: RelayService, tmp_path: Path
) -> None:
    """A raw TCP tunnel's public connections: accepted by a `LeanPort`, Twisted's
    `tcp.Server` transports, their own address (sent to the agent) the listener's, as
    their socket has it."""
    reactor = get_reactor()
    echo = reactor.listenTCP(0, Factory.forProtocol(Echo), interface="127.0.0.1")
    agent = agent_for(relay, tmp_path / "state")
    client = None
    try:
        tunnel = await agent.forward(parse_forward(f"{echo.getHost().port}:tcp"))
        assert tunnel.unencrypted_port is not None
        [record] = relay.relay.registry.all()
        assert type(record.listener) is LeanPort
        client = await connect(tunnel.unencrypted_port)
        assert client.transport is not None
        client.transport.write(b"ping")
        await wait_until(lambda: client.received == b"ping", "the echo")
        [public] = relay.relay.public_connections
        transport: Any = public.transport
        assert type(transport) is tcp.Server
        assert public.here == transport.getHost()  # type: ignore[attr-defined]
        assert public.here.port == tunnel.unencrypted_port  # type: ignore[attr-defined]
        assert transport.getPeer().port == client.transport.getHost().port
    finally:
        if client is not None and client.transport is not None:
            client.transport.loseConnection()
        await agent.stop()
        await echo.stopListening()


def test_tcp_endpoints_listen_with_it_and_others_as_they_are(reactor: Any, tmp_path: Path) -> None:
    listened: list[Any] = []
    server_endpoint(reactor, "tcp:0:interface=127.0.0.1").listen(_Factory()).addCallback(
        listened.append
    )
    [port] = listened
    try:
        assert type(port) is LeanPort and port.getHost().host == "127.0.0.1"
    finally:
        port.connectionLost(None)
    unix = server_endpoint(reactor, f"unix:{tmp_path / 'sock'}")
    assert type(unix) is UNIXServerEndpoint


def test_workers_adopt_their_shared_listener_as_one(reactor: Any) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    factory = _Factory()
    port = listen_reuseport(reactor, f"tcp:{free}:interface=127.0.0.1", factory)
    try:
        assert type(port) is LeanPort and port.getHost().port == free
        [sock] = clients(port, 1)
        port.doRead()
        assert len(factory.made) == 1
        drop(factory.made)
        sock.close()
    finally:
        port.connectionLost(None)


def test_the_relays_tls_front_listens_with_it(relay: RelayService) -> None:
    assert type(relay.port) is LeanPort


class _Failing:
    """A listening socket whose next accepts fail with `errors` (then accept for real)."""

    def __init__(self, real: socket.socket, *errors: int) -> None:
        self.real = real
        self.errors = list(errors)

    def _accept(self) -> Any:
        if self.errors:
            code = self.errors.pop(0)
            raise OSError(code, os.strerror(code))
        return self.real._accept()  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


@contextlib.contextmanager
def logged() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    log.addObserver(events.append)
    try:
        yield events
    finally:
        log.removeObserver(events.append)


def test_accept_errors_are_skipped_said_or_logged_as_twisted_does(reactor: Any) -> None:
    factory = _Factory()
    with listening(LeanPort(0, factory, 50, "127.0.0.1", reactor)) as port:
        real = port.socket
        socks = clients(port, 1)
        # EPERM (netfilter): the next accept, in the same turn.
        port.socket = _Failing(real, errno.EPERM)  # type: ignore[assignment]
        port.doRead()
        assert len(factory.made) == 1
        # ECONNABORTED (and the like): said, and the turn ends; the next turn accepts.
        socks += clients(port, 1)
        port.socket = _Failing(real, errno.ECONNABORTED)  # type: ignore[assignment]
        with logged() as events:
            port.doRead()
        assert len(factory.made) == 1
        text = [log.textFromEventDict(e) or "" for e in events]
        assert any("Could not accept new connection (ECONNABORTED)" in t for t in text)
        port.doRead()
        assert len(factory.made) == 2
        # Anything else: an error logged, the port still there.
        socks += clients(port, 1)
        port.socket = _Failing(real, errno.EINVAL)  # type: ignore[assignment]
        with logged() as events:
            port.doRead()
        errors = [e for e in events if e.get("isError")]
        assert len(errors) == 1 and errors[0]["failure"].check(OSError)
        port.socket = real
        port.doRead()
        assert len(factory.made) == 3
        drop(factory.made)
        for s in socks:
            s.close()
