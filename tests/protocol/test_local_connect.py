"""
`connect_local`, the agent's connect to a local target without Twisted's connector, in this
process's reactor against loopback servers: connected within the call, the same errors as
``connectTCP`` (refused, timed out), a connect still in progress waited for, host names
through ``connectTCP``.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import error, protocol, tcp
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from tests.e2e.harness import recv_all
from tests.protocol.inprocess import Echo, get_reactor, wait_until
from tunnel._splice import ConnectedTCP
from tunnel.agent._local import connect_local


class _Received(protocol.Protocol):
    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class _Factory(protocol.ClientFactory):
    def __init__(self) -> None:
        self.protocol_made: _Received | None = None
        self.failure: Failure | None = None

    def buildProtocol(self, addr: Any) -> protocol.Protocol:
        self.protocol_made = _Received()
        return self.protocol_made

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.failure = reason


@pytest_twisted.ensureDeferred
async def test_a_loopback_target_is_connected_within_the_call() -> None:
    reactor = get_reactor()
    port = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
    try:
        factory = _Factory()
        number = port.getHost().port
        connect_local(reactor, "127.0.0.1", number, factory, 5.0)
        # No reactor turn has run: the connection is already up.
        made = factory.protocol_made
        assert made is not None and made.transport is not None
        assert type(made.transport) is ConnectedTCP
        assert made.transport.getPeer().port == number
        assert made.transport.getHost().host == "127.0.0.1"
        made.transport.write(b"there and back")
        await wait_until(lambda: made.received == b"there and back", "the echo")
        made.transport.loseConnection()
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_nothing_listening_fails_as_connect_tcp_does() -> None:
    reactor = get_reactor()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    factory = _Factory()
    connect_local(reactor, "127.0.0.1", free, factory, 5.0)
    await wait_until(lambda: factory.failure is not None, "the refusal")
    assert factory.failure is not None and factory.failure.check(error.ConnectionRefusedError)
    assert factory.protocol_made is None


@pytest_twisted.ensureDeferred
async def test_a_connect_still_in_progress_times_out() -> None:
    """A listener that accepts nothing, its queue full: the kernel drops further SYNs, so
    a connect stays in progress until the timeout."""
    reactor = get_reactor()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(listener.getsockname())
            fillers.append(filler)
        factory = _Factory()
        connect_local(reactor, "127.0.0.1", listener.getsockname()[1], factory, 0.3)
        assert factory.failure is None and factory.protocol_made is None
        await wait_until(lambda: factory.failure is not None, "the timeout")
        assert factory.failure is not None and factory.failure.check(error.TimeoutError)
        assert factory.protocol_made is None
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


@pytest_twisted.ensureDeferred
async def test_a_host_name_goes_through_connect_tcp() -> None:
    reactor = get_reactor()
    port = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
    try:
        factory = _Factory()
        connect_local(reactor, "localhost", port.getHost().port, factory, 5.0)
        await wait_until(lambda: factory.protocol_made is not None, "the connection")
        made = factory.protocol_made
        assert made is not None and isinstance(made.transport, tcp.Client)
        made.transport.write(b"by name")
        await wait_until(lambda: made.received == b"by name", "the echo")
        made.transport.loseConnection()
    finally:
        await port.stopListening()


class _Lost(_Received):
    def __init__(self) -> None:
        super().__init__()
        self.reasons: list[Failure] = []

    def connectionLost(self, reason: Failure = error.ConnectionDone) -> None:  # type: ignore[assignment]
        self.reasons.append(reason)


@pytest_twisted.ensureDeferred
async def test_write_now_half_close_and_close_now_on_a_real_connection() -> None:
    """The data path's shortcuts on a real TCP transport: `write_now` sends at once,
    `half_close` sends the FIN at once, and `close_now` on the half-closed transport closes
    it at once (a clean close, no reactor turn), the peer reading everything, then EOF."""
    from tunnel._splice import close_now, half_close, write_now

    reactor = get_reactor()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    try:
        made = _Lost()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        sock.connect_ex(listener.getsockname())
        peer, _ = listener.accept()
        transport = ConnectedTCP(sock, made, reactor, listener.getsockname())
        made.makeConnection(transport)
        write_now(transport, b"sent at once")
        assert not transport.dataBuffer and not transport._tempDataLen
        half_close(transport)
        assert transport._writeDisconnected
        close_now(transport)
        # Closed within the call, cleanly, and no longer in the reactor.
        assert len(made.reasons) == 1 and made.reasons[0].check(error.ConnectionDone)
        assert transport not in reactor.getReaders()
        assert transport not in reactor.getWriters()
        peer.settimeout(5)
        assert recv_all(peer) == b"sent at once"
        peer.close()
    finally:
        listener.close()


@implementer(IHalfCloseableProtocol)
class _HalfCloseable(_Lost):
    """Records the peer's FIN as well as the end."""

    def __init__(self) -> None:
        super().__init__()
        self.read_ended = False

    def readConnectionLost(self) -> None:
        self.read_ended = True

    def writeConnectionLost(self) -> None:
        pass


class _RecordingReactor:
    """The real reactor, noting what a transport asks it to watch or stop watching."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self.asked: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._reactor, name)
        if name in ("addReader", "removeReader", "addWriter", "removeWriter"):

            def recorded(selectable: Any) -> Any:
                self.asked.append(name)
                return attribute(selectable)

            return recorded
        return attribute


class _CountingSocket(socket.socket):
    """A socket that notes its shutdown calls."""

    shutdowns: list[int]

    def shutdown(self, how: int) -> None:
        self.shutdowns.append(how)
        super().shutdown(how)


def _pair(
    listener: socket.socket, made: protocol.Protocol, reactor: Any
) -> tuple[ConnectedTCP, _CountingSocket, socket.socket]:
    sock = _CountingSocket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    sock.shutdowns = []
    sock.connect_ex(listener.getsockname())
    peer, _ = listener.accept()
    peer.settimeout(5)
    transport = ConnectedTCP(sock, made, reactor, listener.getsockname())
    made.makeConnection(transport)
    return transport, sock, peer


def _listener() -> socket.socket:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    return listener


@pytest_twisted.ensureDeferred
async def test_a_close_after_both_fins_asks_the_reactor_nothing_more() -> None:
    """The peer's FIN first, then ours, then the close: the reactor is asked to watch the
    transport once and never to stop (it stopped reading by itself at the FIN, and the
    transport never wrote through it); the socket is closed without a second shutdown,
    as both directions had ended; the peer gets everything, then EOF."""
    from tunnel._splice import close_now, half_close, write_now

    reactor = _RecordingReactor(get_reactor())
    listener = _listener()
    try:
        made = _HalfCloseable()
        transport, sock, peer = _pair(listener, made, reactor)
        peer.sendall(b"from the peer")
        peer.shutdown(socket.SHUT_WR)
        await wait_until(lambda: made.read_ended, "the peer's FIN")
        assert made.received == b"from the peer" and not made.reasons
        assert transport not in get_reactor().getReaders()
        write_now(transport, b"the answer")
        half_close(transport)
        close_now(transport)
        assert len(made.reasons) == 1 and made.reasons[0].check(error.ConnectionDone)
        assert reactor.asked == ["addReader"]
        assert sock.shutdowns == [socket.SHUT_WR]
        assert sock.fileno() == -1
        assert recv_all(peer) == b"the answer"
        peer.close()
    finally:
        listener.close()


@pytest_twisted.ensureDeferred
async def test_a_close_with_the_peer_still_sending_shuts_down_first() -> None:
    """A close while the peer's direction is open: stopped reading through the reactor,
    and ``shutdown`` before ``close``, as Twisted's transport does; the peer sees EOF."""
    from tunnel._splice import close_now

    reactor = _RecordingReactor(get_reactor())
    listener = _listener()
    try:
        made = _HalfCloseable()
        transport, sock, peer = _pair(listener, made, reactor)
        close_now(transport)
        assert len(made.reasons) == 1 and made.reasons[0].check(error.ConnectionDone)
        assert reactor.asked == ["addReader", "removeReader"]
        assert sock.shutdowns == [socket.SHUT_RDWR]
        assert transport not in get_reactor().getReaders()
        assert peer.recv(100) == b""
        peer.close()
    finally:
        listener.close()


@pytest_twisted.ensureDeferred
async def test_an_abort_resets_the_connection() -> None:
    """`abortConnection`: the protocol is told ConnectionAborted, the peer gets a reset
    (``SO_LINGER`` 0), not a FIN."""
    reactor = get_reactor()
    listener = _listener()
    try:
        made = _HalfCloseable()
        transport, sock, peer = _pair(listener, made, reactor)
        transport.abortConnection()
        await wait_until(lambda: bool(made.reasons), "the abort")
        assert made.reasons[0].check(error.ConnectionAborted)
        assert sock.shutdowns == []
        assert transport not in reactor.getReaders()
        with pytest.raises(ConnectionResetError):
            peer.recv(100)
        peer.close()
    finally:
        listener.close()


@pytest_twisted.ensureDeferred
async def test_a_refusal_known_at_the_second_connect_is_reported_within_the_call() -> None:
    """Loopback refuses within the first ``connect``: the second one says so, and the
    factory hears it before `connect_local` returns."""
    reactor = get_reactor()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    factory = _Factory()
    connect_local(reactor, "127.0.0.1", free, factory, 5.0)
    assert factory.failure is not None and factory.failure.check(error.ConnectionRefusedError)


def test_the_families_of_target_hosts_are_kept_within_a_bound() -> None:
    """Each host's family is worked out once (IPv4, IPv6, 0 for a name), and at most
    `_FAMILIES_KEPT` hosts are kept: beyond, the answer is the same, not remembered."""
    from tunnel.agent import _local

    _local._FAMILIES.clear()
    try:
        assert _local._family("127.0.0.1") == socket.AF_INET
        assert _local._family("::1") == socket.AF_INET6
        assert _local._family("localhost") == 0
        assert _local._FAMILIES == {
            "127.0.0.1": socket.AF_INET,
            "::1": socket.AF_INET6,
            "localhost": 0,
        }
        for n in range(_local._FAMILIES_KEPT + 10):
            assert _local._family(f"10.0.{n // 256}.{n % 256}") == socket.AF_INET
        assert len(_local._FAMILIES) == _local._FAMILIES_KEPT
    finally:
        _local._FAMILIES.clear()


@pytest_twisted.ensureDeferred
async def test_an_ipv6_loopback_target_is_connected_within_the_call() -> None:
    reactor = get_reactor()
    try:
        port = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="::1")
    except error.CannotListenError:
        pytest.skip("no IPv6 loopback here")
    try:
        factory = _Factory()
        connect_local(reactor, "::1", port.getHost().port, factory, 5.0)
        made = factory.protocol_made
        assert made is not None and type(made.transport) is ConnectedTCP
        assert made.transport.getPeer().host == "::1"
        made.transport.write(b"six")
        await wait_until(lambda: made.received == b"six", "the echo")
        made.transport.loseConnection()
    finally:
        await port.stopListening()
