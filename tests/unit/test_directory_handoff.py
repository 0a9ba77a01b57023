"""
Handing connections between the relay's workers (`tunnel.relay._handoff`, frames of
`tunnel.relay._handoffwire`): the sender (one ``sendmsg`` with the descriptor, its copy let
go at once, the bound on waiting hand-offs and their deadline, the fallback when the owner is
gone), the receiver (frame size, descriptors without bytes, bytes without descriptors,
sockets that are not TCP, hand-offs too old) and the choice of the worker a new link goes to,
with real UNIX and TCP sockets and a `Clock`.
"""

from __future__ import annotations

import array
import os
import socket
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from tunnel.relay._clienthello import ALERT_UNRECOGNIZED_NAME, ClientHello, alert_record
from tunnel.relay._directory import Directory, Replica, spread_to
from tunnel.relay._handoff import (
    HANDOFF_TIMEOUT,
    MAX_FRAME,
    MAX_WAITING,
    HandoffCounts,
    HandoffReceiverFactory,
    HandoffSender,
)
from tunnel.relay._handoffwire import (
    FrameDecoder,
    HandedConnection,
    HandoffFrameError,
    encode,
)
from tunnel.wire.mux import LINK_ALPN

ALERT = alert_record(ALERT_UNRECOGNIZED_NAME)
HELLO = ClientHello("abc.tunnel.localhost", (b"h2", b"http/1.1"), 0x0303, (0x0304, 0x0303))


class FakeClient:
    """A public connection's TCP transport, as the sender sees it (its descriptor real)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.written = b""
        self.connected = True
        self.disconnecting = False
        self._shouldShutdown = True
        self.lost = False

    def fileno(self) -> int:
        return self.fd

    def getPeer(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.7", 4321)

    def write(self, data: bytes) -> None:
        self.written += data

    def loseConnection(self) -> None:
        self.disconnecting = True

    def connectionLost(self, reason: Any) -> None:
        self.lost = True
        self.connected = False


class Reactor(Clock):
    """A `Clock` that records the descriptors watched."""

    def __init__(self) -> None:
        super().__init__()
        self.readers: set[Any] = set()
        self.writers: set[Any] = set()

    def addReader(self, r: Any) -> None:
        self.readers.add(r)

    def addWriter(self, w: Any) -> None:
        self.writers.add(w)

    def removeReader(self, r: Any) -> None:
        self.readers.discard(r)

    def removeWriter(self, w: Any) -> None:
        self.writers.discard(w)


@pytest.fixture
def owner(tmp_path: Path) -> Any:
    """A listening UNIX socket standing for the owner's hand-off socket."""
    path = str(tmp_path / "h.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(4)
        yield path, listener


def sender(path: str, clock: float = 100.0) -> tuple[Reactor, HandoffSender]:
    reactor = Reactor()
    return reactor, HandoffSender(
        reactor, lambda w: path, HandoffCounts(), lambda f, **k: None, clock=lambda: clock
    )


def receive(conn: socket.socket) -> tuple[list[int], bytes]:
    data, ancillary, _, _ = conn.recvmsg(MAX_FRAME, socket.CMSG_SPACE(16 * 4))
    fds = array.array("i")
    for _, _, payload in ancillary:
        fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return list(fds), data


def test_a_handed_connection_goes_in_one_sendmsg_and_is_let_go_at_once(owner: Any) -> None:
    path, listener = owner
    reactor, s = sender(path)
    a, b = socket.socketpair()
    with a, b:
        client = FakeClient(a.fileno())
        s.hand(1, client, b"hello-bytes", HELLO)
        # Sent before any reactor turn, our copy closed without a shutdown, no timer left.
        assert client.lost and not client._shouldShutdown and client.written == b""
        assert s.counts.sent == 1 and reactor.getDelayedCalls() == [] and not reactor.writers
        conn, _ = listener.accept()
        with conn:
            fds, data = receive(conn)
            assert len(fds) == 1
            (handed,) = FrameDecoder().feed(data)
            assert handed.data == b"hello-bytes" and handed.hello == HELLO
            assert (handed.host, handed.port, handed.sent) == ("127.0.0.7", 4321, 100.0)
            os.close(fds[0])


def test_an_owner_gone_fails_the_hand_off_into_its_fallback(tmp_path: Path) -> None:
    _, s = sender(str(tmp_path / "nobody.sock"))
    a, b = socket.socketpair()
    with a, b:
        refused = FakeClient(a.fileno())
        s.hand(0, refused, b"x", HELLO)
        assert refused.written == ALERT and refused.disconnecting and not refused.lost
        served: list[bytes] = []
        link = FakeClient(a.fileno())
        s.hand(0, link, b"y", HELLO, lambda: served.append(b"here"))
        assert served == [b"here"] and link.written == b""
        assert (s.counts.sent, s.counts.failed) == (0, 2)


def test_at_most_max_waiting_hand_offs_wait_each_until_the_deadline(owner: Any) -> None:
    path, listener = owner
    reactor, s = sender(path)
    a, b = socket.socketpair()
    with a, b:
        # The owner does not read: fill what the kernel takes, then the queue.
        sent_before_full = 0
        while not reactor.writers:
            blocker = FakeClient(a.fileno())
            s.hand(0, blocker, b"x" * 4096, HELLO)
            sent_before_full += 1
            assert sent_before_full < 100_000
        # The one that found the socket full waits too, unless part of it went (then the
        # descriptor is the owner's).
        blocked = 0 if blocker.lost else 1
        waiting = [FakeClient(a.fileno()) for _ in range(MAX_WAITING - 1)]
        for client in waiting:
            s.hand(0, client, b"x" * 4096, HELLO)
        late = FakeClient(a.fileno())
        s.hand(0, late, b"x", HELLO)
        assert late.written == ALERT and s.counts.failed == 1
        assert not any(c.disconnecting or c.lost for c in waiting)
        reactor.advance(HANDOFF_TIMEOUT - 0.01)
        assert not any(c.disconnecting for c in waiting)
        reactor.advance(0.02)
        assert all(c.written == ALERT for c in waiting)
        assert s.counts.failed == 1 + len(waiting) + blocked
        listener.close()


def test_the_connection_to_an_owner_that_goes_away_fails_what_waits(owner: Any) -> None:
    path, _ = owner
    reactor, s = sender(path)
    a, b = socket.socketpair()
    with a, b:
        while not reactor.writers:
            s.hand(0, FakeClient(a.fileno()), b"x" * 4096, HELLO)
        queued = FakeClient(a.fileno())
        s.hand(0, queued, b"x", HELLO)
        (reader,) = reactor.readers
        reader.connectionLost(None)
        assert queued.written == ALERT
        # The next hand-off connects again.
        again = FakeClient(a.fileno())
        s.hand(0, again, b"x", HELLO)
        assert again.lost and s.counts.sent >= 1


# -- the frame ------------------------------------------------------------------------------------

hellos = st.builds(
    ClientHello,
    st.one_of(st.none(), st.from_regex(r"[a-z0-9.-]{0,200}", fullmatch=True)),
    st.lists(st.binary(min_size=1, max_size=20), max_size=5).map(tuple),
    st.integers(0, 0xFFFF),
    st.lists(st.integers(0, 0xFFFF), max_size=5).map(tuple),
)


@given(hellos, st.binary(max_size=2000), st.integers(0, 0xFFFF), st.integers(1, 400))
def test_frames_round_trip_split_anywhere(
    hello: ClientHello, data: bytes, port: int, cut: int
) -> None:
    handed = HandedConnection(6, "::1", port, 12.5, hello, data)
    frame = encode(handed) + encode(HandedConnection(4, "127.0.0.1", 1, 0.0, hello, b""))
    decoder = FrameDecoder()
    got = decoder.feed(frame[:cut]) + decoder.feed(frame[cut:])
    assert got[0] == handed and got[1].host == "127.0.0.1" and len(got) == 2


def test_malformed_frames_are_refused() -> None:
    good = encode(HandedConnection(4, "127.0.0.1", 80, 1.0, HELLO, b"x"))
    with pytest.raises(HandoffFrameError):
        FrameDecoder().feed(struct.pack(">I", MAX_FRAME + 1))
    with pytest.raises(HandoffFrameError):  # truncated inside the body
        body = good[4:20]
        FrameDecoder().feed(struct.pack(">I", len(body)) + body)
    with pytest.raises(HandoffFrameError):  # another version
        FrameDecoder().feed(good[:4] + b"\x02" + good[5:])
    with pytest.raises(HandoffFrameError):  # an address of the other family
        FrameDecoder().feed(good[:5] + b"\x06" + good[6:])
    with pytest.raises(HandoffFrameError):
        encode(HandedConnection(4, "127.0.0.1", 80, 1.0, HELLO, b"x" * MAX_FRAME))


# -- the receiving side ---------------------------------------------------------------------------


class Recorder(Protocol):
    def __init__(self) -> None:
        self.replayed: list[tuple[bytes, ClientHello]] = []

    def replay(self, data: bytes, hello: ClientHello) -> None:
        self.replayed.append((data, hello))


class Cut:
    def __init__(self) -> None:
        self.aborted = False

    def write(self, data: bytes) -> None:
        raise AssertionError("the receiver answers nothing")

    def abortConnection(self) -> None:
        self.aborted = True


def receiver(now: float = 100.0) -> tuple[Reactor, Any, Cut, HandoffCounts, list[Recorder]]:
    reactor = Reactor()
    counts = HandoffCounts()
    built: list[Recorder] = []

    class Front(Factory):
        def buildProtocol(self, addr: Any) -> Recorder:
            proto = Recorder()
            proto.addr = addr  # type: ignore[attr-defined]
            built.append(proto)
            return proto

    factory = HandoffReceiverFactory(reactor, Front(), counts, clock=lambda: now)
    proto = factory.buildProtocol(None)
    cut = Cut()
    proto.makeConnection(cut)
    return reactor, proto, cut, counts, built


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
        server.setblocking(False)
        yield client, server


def frame(data: bytes = b"hello", sent: float = 99.0) -> bytes:
    return encode(HandedConnection(4, "127.0.0.9", 5555, sent, HELLO, data))


def test_a_tcp_socket_is_taken_with_the_address_and_hello_it_came_with(tcp_pair: Any) -> None:
    client, server = tcp_pair
    reactor, proto, _, counts, built = receiver()
    before = open_fds()
    proto.fileDescriptorReceived(os.dup(server.fileno()))
    whole = frame()
    proto.dataReceived(whole[:7])
    assert built == []  # the frame is not whole yet
    proto.dataReceived(whole[7:])
    (adopted,) = built
    assert counts.received == 1 and adopted.replayed == [(b"hello", HELLO)]
    assert adopted.addr == IPv4Address("TCP", "127.0.0.9", 5555)  # type: ignore[attr-defined]
    assert adopted.transport.getPeer() == IPv4Address("TCP", "127.0.0.9", 5555)  # type: ignore[union-attr]
    assert adopted.transport in reactor.readers  # read by the reactor from now on
    adopted.transport.write(b"from the owner")  # type: ignore[union-attr]
    adopted.transport.doWrite()  # type: ignore[union-attr]
    assert client.recv(100) == b"from the owner"
    adopted.transport.connectionLost(Failure(ConnectionDone()))  # type: ignore[union-attr]
    assert open_fds() == before  # no duplicate kept


def test_a_hand_off_older_than_the_deadline_is_refused_by_the_owner(tcp_pair: Any) -> None:
    client, server = tcp_pair
    _, proto, _, counts, built = receiver(now=100.0)
    proto.fileDescriptorReceived(os.dup(server.fileno()))
    proto.dataReceived(frame(sent=100.0 - HANDOFF_TIMEOUT - 0.1))
    assert built == [] and counts.failed == 1 and counts.received == 0
    assert client.recv(100) == ALERT


def test_an_agents_link_handed_over_late_is_served_all_the_same(tcp_pair: Any) -> None:
    """Only public connections are shed for a late hand-off: a link (offering the link's
    ALPN) is adopted however long it waited, or its agent would only come back later."""
    _, server = tcp_pair
    link_hello = ClientHello("relay.tunnel.localhost", (LINK_ALPN,), 0x0303, (0x0304,))
    _, proto, _, counts, built = receiver(now=100.0)
    proto.fileDescriptorReceived(os.dup(server.fileno()))
    late = 100.0 - HANDOFF_TIMEOUT - 5.0
    proto.dataReceived(encode(HandedConnection(4, "127.0.0.9", 5555, late, link_hello, b"x")))
    (adopted,) = built
    assert counts.received == 1 and counts.failed == 0
    assert adopted.replayed == [(b"x", link_hello)]
    adopted.transport.connectionLost(Failure(ConnectionDone()))  # type: ignore[union-attr]


def test_a_socket_that_is_not_tcp_is_refused_and_closed() -> None:
    a, b = socket.socketpair()
    with a, b:
        _, proto, _, counts, built = receiver()
        before = open_fds()
        proto.fileDescriptorReceived(os.dup(a.fileno()))
        proto.dataReceived(frame())
        assert built == [] and counts.received == 0 and counts.failed == 1
        assert open_fds() == before  # the received descriptor was closed


def test_receiver_bounds(tcp_pair: Any) -> None:
    _, server = tcp_pair
    # A frame over MAX_FRAME: cut off, and the descriptors it held closed.
    _, proto, cut, _, _ = receiver()
    before = open_fds()
    proto.fileDescriptorReceived(os.dup(server.fileno()))
    proto.dataReceived(struct.pack(">I", MAX_FRAME + 1))
    assert cut.aborted
    proto.connectionLost(None)
    assert open_fds() == before
    # Bytes without a descriptor: cut off.
    _, proto, cut, _, _ = receiver()
    proto.dataReceived(frame())
    assert cut.aborted
    # More than MAX_WAITING descriptors without their bytes: cut off, none kept.
    _, proto, cut, _, _ = receiver()
    for _ in range(MAX_WAITING):
        proto.fileDescriptorReceived(os.dup(server.fileno()))
    assert not cut.aborted
    proto.fileDescriptorReceived(os.dup(server.fileno()))
    assert cut.aborted
    proto.connectionLost(None)
    assert open_fds() == before


# -- where a new link goes ------------------------------------------------------------------------


def test_a_link_stays_where_it_landed_unless_another_worker_has_fewer() -> None:
    assert spread_to(0, {0: 0, 1: 0}) is None  # a tie keeps it
    assert spread_to(0, {0: 3, 1: 3, 2: 3}) is None
    assert spread_to(1, {0: 2, 1: 3, 2: 2}) == 0  # the fewest, lowest index of a tie
    assert spread_to(0, {0: 1, 1: 0}) == 1  # with it, worker 0 would hold two more
    assert spread_to(0, {0: 5}) is None  # no other worker running


@given(st.integers(1, 8), st.lists(st.integers(0, 7), min_size=1, max_size=200))
def test_links_added_one_at_a_time_stay_within_one_whatever_the_hash(
    workers: int, landings: list[int]
) -> None:
    links = dict.fromkeys(range(workers), 0)
    for landed in landings:
        here = landed % workers
        target = spread_to(here, links)
        links[here if target is None else target] += 1
    assert max(links.values()) - min(links.values()) <= 1


def test_the_replica_counts_a_handed_link_until_the_next_spread() -> None:
    replica = Replica(0)
    assert replica.link_target(3) is None  # told nothing yet: keep it
    replica.update({"t": "spread", "up": [0, 1], "links": [2, 0]})
    assert replica.link_target(2) == 1
    assert replica.link_target(2) == 1  # 2 against 1 now
    assert replica.link_target(2) is None  # 2 against 2
    # A worker that is not running gets none.
    replica.update({"t": "spread", "up": [0], "links": [2, 0]})
    assert replica.link_target(2) is None


def test_the_directory_tells_running_workers_every_workers_links() -> None:
    d = Directory(2)
    assert d.links(0, "p", 1) == [
        (0, {"t": "counts", "principal": "p", "links": 0, "tunnels": 0}),
        (1, {"t": "counts", "principal": "p", "links": 1, "tunnels": 0}),
    ]
    # Running workers (from their snapshot on) are told, with each worker's total.
    assert (0, {"t": "spread", "up": [0], "links": [1, 0]}) in d.snapshot(0)
    d.snapshot(1)
    out = d.links(1, "q", 2)
    spread = {"t": "spread", "up": [0, 1], "links": [1, 2]}
    assert (0, spread) in out and (1, spread) in out
    assert d.links(1, "q", 2) == []  # unchanged: nothing to tell
    # A worker gone: the others learn it holds nothing and is not running.
    assert (0, {"t": "spread", "up": [0], "links": [1, 0]}) in d.worker_gone(1)
    assert d.links_on(1) == 0 and d.links_on(0) == 1
