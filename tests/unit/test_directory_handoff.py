"""
Handing public connections between the relay's workers (`tunnel.relay._handoff`): the
sender's bounds (connections waiting per owner, the acknowledgement's deadline) and the
receiver's (frame size, descriptors without bytes, bytes without descriptors, sockets that
are not TCP), with fake transports and a `Clock`.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Any

import pytest
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock

from tunnel.relay._clienthello import ALERT_UNRECOGNIZED_NAME, alert_record
from tunnel.relay._handoff import (
    HANDOFF_TIMEOUT,
    MAX_FRAME,
    MAX_WAITING,
    HandoffCounts,
    HandoffReceiverFactory,
    HandoffSender,
)


class FakeClient:
    """A public connection's TCP transport, as the sender sees it."""

    def __init__(self, fd: int = 99) -> None:
        self.fd = fd
        self.written = b""
        self.connected = True
        self.disconnecting = False
        self.aborted = False
        self._shouldShutdown = True

    def fileno(self) -> int:
        return self.fd

    def write(self, data: bytes) -> None:
        self.written += data

    def loseConnection(self) -> None:
        self.disconnecting = True

    def abortConnection(self) -> None:
        self.aborted = True
        self.disconnecting = True


class FakeUNIX:
    """The transport of the connection to an owner."""

    def __init__(self, proto: Protocol) -> None:
        self.proto = proto
        self.fds: list[int] = []
        self.written = b""
        self.aborted = False

    def sendFileDescriptor(self, fd: int) -> None:
        self.fds.append(fd)

    def write(self, data: bytes) -> None:
        self.written += data

    def loseConnection(self) -> None:
        self.abortConnection()

    def abortConnection(self) -> None:
        if not self.aborted:
            self.aborted = True
            self.proto.connectionLost(None)  # type: ignore[arg-type]


class Reactor(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.connects: list[tuple[str, Any]] = []
        self.adopted: list[tuple[int, int]] = []

    def connectUNIX(self, path: str, factory: Any, timeout: float = 30) -> None:
        self.connects.append((path, factory))


def sender() -> tuple[Reactor, HandoffSender]:
    reactor = Reactor()
    logged: list[str] = []
    return reactor, HandoffSender(
        reactor, lambda w: f"/w/{w}.sock", HandoffCounts(), lambda f, **k: logged.append(f)
    )


def connect(reactor: Reactor) -> tuple[Protocol, FakeUNIX]:
    _, factory = reactor.connects[-1]
    proto = factory.buildProtocol(None)
    transport = FakeUNIX(proto)
    proto.makeConnection(transport)
    return proto, transport


ALERT = alert_record(ALERT_UNRECOGNIZED_NAME)


def test_a_handed_connection_is_let_go_without_a_shutdown_once_taken() -> None:
    reactor, s = sender()
    taken, refused = FakeClient(7), FakeClient(8)
    s.hand(1, taken, b"hello-1")
    s.hand(1, refused, b"hello-2")
    assert [path for path, _ in reactor.connects] == ["/w/1.sock"]  # one connection
    proto, owner = connect(reactor)
    assert owner.fds == [7, 8]
    assert owner.written == struct.pack(">I", 7) + b"hello-1" + struct.pack(">I", 7) + b"hello-2"
    proto.dataReceived(b"\x01\x00")
    assert taken.disconnecting and not taken._shouldShutdown and taken.written == b""
    assert refused.written == ALERT and refused._shouldShutdown
    assert (s.counts.sent, s.counts.failed) == (1, 1)
    assert reactor.getDelayedCalls() == []


def test_at_most_max_waiting_hand_offs_wait_for_one_owner() -> None:
    _, s = sender()
    waiting = [FakeClient(i) for i in range(MAX_WAITING)]
    for client in waiting:
        s.hand(0, client, b"x")
    late = FakeClient()
    s.hand(0, late, b"x")
    assert late.written == ALERT and late.disconnecting
    assert s.counts.failed == 1
    assert not any(c.disconnecting for c in waiting)
    # Another owner has its own bound.
    other = FakeClient()
    s.hand(1, other, b"x")
    assert not other.disconnecting


def test_an_owner_that_does_not_answer_in_time_fails_its_hand_offs() -> None:
    reactor, s = sender()
    queued = FakeClient(3)
    s.hand(0, queued, b"x")
    # Never connected: refused like an unknown name once the deadline passes.
    reactor.advance(HANDOFF_TIMEOUT - 0.01)
    assert not queued.disconnecting
    reactor.advance(0.02)
    assert queued.written == ALERT and s.counts.failed == 1
    # Connected, sent, never acknowledged: the socket may be the owner's too, so it is
    # aborted (no alert into it), and the connection to the slow owner dropped.
    sent = FakeClient(4)
    s.hand(0, sent, b"x")
    assert len(reactor.connects) == 1  # still "connecting" from before: nothing new yet
    s._peers[0].connecting = False
    s.hand(0, FakeClient(5), b"x")
    _, owner = connect(reactor)
    reactor.advance(HANDOFF_TIMEOUT + 0.01)
    assert owner.aborted and sent.aborted and sent.written == b""
    assert s.counts.failed == 3 and s.counts.sent == 0


def test_more_acknowledgements_than_hand_offs_drop_the_owner() -> None:
    reactor, s = sender()
    s.hand(0, FakeClient(), b"x")
    proto, owner = connect(reactor)
    proto.dataReceived(b"\x01\x01")
    assert owner.aborted and s.counts.sent == 1


# -- the receiving side ---------------------------------------------------------------------------


class AdoptingReactor(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.adopted: list[tuple[int, int, Protocol]] = []

    def adoptStreamConnection(self, fd: int, family: int, factory: Factory) -> None:
        proto = factory.buildProtocol(None)
        assert proto is not None
        transport = FakeClient(os.dup(fd))
        proto.makeConnection(transport)  # type: ignore[arg-type]
        self.adopted.append((transport.fd, family, proto))


class Recorder(Protocol):
    def __init__(self) -> None:
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data


class Ack:
    def __init__(self) -> None:
        self.written = b""
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.written += data

    def abortConnection(self) -> None:
        self.aborted = True


def receiver() -> tuple[AdoptingReactor, Any, Ack, HandoffCounts]:
    reactor = AdoptingReactor()
    counts = HandoffCounts()
    factory = HandoffReceiverFactory(reactor, Factory.forProtocol(Recorder), counts)
    proto = factory.buildProtocol(None)
    ack = Ack()
    proto.makeConnection(ack)
    return reactor, proto, ack, counts


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def tcp_pair() -> Any:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    with client, server:
        yield client, server


def test_a_tcp_socket_is_adopted_and_its_bytes_replayed(tcp_pair: Any) -> None:
    _, server = tcp_pair
    reactor, proto, ack, counts = receiver()
    before = open_fds()
    proto.fileDescriptorReceived(os.dup(server.fileno()))
    proto.dataReceived(struct.pack(">I", 5) + b"hel")
    assert ack.written == b""  # the frame is not whole yet
    proto.dataReceived(b"lo")
    assert ack.written == b"\x01" and counts.received == 1
    fd, family, adopted = reactor.adopted[0]
    assert family == socket.AF_INET and adopted.data == b"hello"
    os.close(fd)
    assert open_fds() == before  # the received descriptor was closed


def test_a_socket_that_is_not_tcp_is_refused_and_closed() -> None:
    a, b = socket.socketpair()
    with a, b:
        reactor, proto, ack, counts = receiver()
        before = open_fds()
        proto.fileDescriptorReceived(os.dup(a.fileno()))
        proto.dataReceived(struct.pack(">I", 1) + b"x")
        assert ack.written == b"\x00" and reactor.adopted == [] and counts.received == 0
        assert open_fds() == before  # the received descriptor was closed


def test_receiver_bounds(tcp_pair: Any) -> None:
    _, server = tcp_pair
    # A frame over MAX_FRAME: cut off, and the descriptors it held closed.
    _, proto, ack, _ = receiver()
    before = open_fds()
    proto.fileDescriptorReceived(os.dup(server.fileno()))
    proto.dataReceived(struct.pack(">I", MAX_FRAME + 1))
    assert ack.aborted
    proto.connectionLost(None)
    assert open_fds() == before
    # Bytes without a descriptor: cut off.
    _, proto, ack, _ = receiver()
    proto.dataReceived(struct.pack(">I", 1) + b"x")
    assert ack.aborted
    # More than MAX_WAITING descriptors without their bytes: cut off, none kept.
    _, proto, ack, _ = receiver()
    for _ in range(MAX_WAITING):
        proto.fileDescriptorReceived(os.dup(server.fileno()))
    assert not ack.aborted
    proto.fileDescriptorReceived(os.dup(server.fileno()))
    assert ack.aborted
    proto.connectionLost(None)
    assert open_fds() == before
