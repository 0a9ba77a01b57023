"""
Handing a connection to another worker (``--workers N``): a public connection to the worker
that owns its tunnel, an agent's link to the worker with the fewest links.

A worker that accepted a connection and parsed its ClientHello sends the connection's socket
to the other worker over a UNIX connection: one ``sendmsg`` with the descriptor
(``SCM_RIGHTS``) and one frame (`tunnel.relay._handoffwire`) holding the client's address,
the parsed ClientHello and the bytes already read. Once ``sendmsg`` has returned, the kernel
holds the descriptor in flight, so the sender closes its own copy at once, without a
shutdown (no FIN or RST reaches the client) and without waiting for an answer: the owner's
copy is the connection now. The owner takes the socket as a TCP transport with the address
from the frame (no ``getpeername``, no duplicate descriptor), and dispatches the
ClientHello it was given without parsing it again: its own router decides (its own
tunnels, allow/deny lists, PROXY headers with the client's address, shares) exactly as for
a connection it accepted. What the owner cannot take (not a TCP socket, or sent more than
`HANDOFF_TIMEOUT` seconds ago, unless it is an agent's link) it refuses itself, like an
unknown name.

There is no acknowledgement: nothing the sender would do with one is left (the owner
refuses on the socket it holds, the kernel bounds what is in flight), and it cost a write,
a read and two reactor turns per hand-off.

Bounds: the descriptors in flight to one owner are bounded by the UNIX socket's buffer;
past that, at most `MAX_WAITING` hand-offs wait for one owner, each at most
`HANDOFF_TIMEOUT` seconds. A hand-off that cannot be sent (the queue full, the owner gone or
not reachable, the deadline passed) is failed and counted, and its connection goes to its
fallback: refused like an unknown name for a public connection, served where it landed for
an agent's link. A public connection's hand-off sent more than `HANDOFF_TIMEOUT` seconds
before the owner reads it is refused there (the owner is behind: the client is shed); an
agent's link is served however late it is read. The receiving side holds at most
`MAX_WAITING` received descriptors that have no frame yet, and frames of at most
`MAX_FRAME` octets: a peer that sends more is cut off.
"""

from __future__ import annotations

import array
import errno
import itertools
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import address, protocol, tcp
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IDelayedCall,
    IFileDescriptorReceiver,
    IReadDescriptor,
    IWriteDescriptor,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tunnel.relay._clienthello import ALERT_UNRECOGNIZED_NAME, ClientHello, alert_record
from tunnel.relay._handoffwire import (
    MAX_FRAME,
    FrameDecoder,
    HandedConnection,
    HandoffFrameError,
    encode,
)
from tunnel.wire.mux import LINK_ALPN

__all__ = [
    "HANDOFF_TIMEOUT",
    "MAX_FRAME",
    "MAX_WAITING",
    "HandoffCounts",
    "HandoffFactory",
    "HandoffReceiverFactory",
    "HandoffSender",
]

_log = Logger()

#: Seconds a hand-off may take, from the sender's decision until the owner reads it.
HANDOFF_TIMEOUT = 2.0
#: Hand-offs waiting at once for one owner (past what the kernel holds in flight).
MAX_WAITING = 256

_BLOCKED = (errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS)

#: What a hand-off that cannot be made does with its connection.
Fallback = Callable[[], None]


@dataclass
class HandoffCounts:
    """Hand-offs of one worker since start."""

    sent: int = 0
    received: int = 0
    failed: int = 0


def _gone(transport: Any) -> bool:
    return bool(getattr(transport, "disconnecting", False)) or not getattr(
        transport, "connected", True
    )


def refuse(transport: Any) -> None:
    """Refuse a public connection whose socket is still ours alone: the alert of an
    unknown name, then close."""
    if _gone(transport):
        return
    transport.write(alert_record(ALERT_UNRECOGNIZED_NAME))
    transport.loseConnection()


def _let_go(transport: Any) -> None:
    """
    Close our copy of a socket another process has taken: no shutdown (so no FIN), no
    reactor turn (the transport is not reading, and nothing was written to it).
    """
    transport._shouldShutdown = False
    transport.connectionLost(Failure(ConnectionDone("handed to another worker")))


@dataclass
class _Waiting:
    transport: Any
    frame: bytes
    fallback: Fallback
    timer: IDelayedCall | None = None
    #: Octets of `frame` sent (the descriptor goes with the first).
    offset: int = 0


@implementer(IReadDescriptor, IWriteDescriptor)
class _OwnerSocket:
    """
    The connection to one owner, a plain non-blocking UNIX socket in the reactor: written
    with ``sendmsg`` at once when it can take a hand-off, watched for writing only while
    hand-offs wait, and for reading only to learn that the owner went away (it sends
    nothing).
    """

    def __init__(self, peer: _Peer, sock: socket.socket) -> None:
        self.peer = peer
        self.sock = sock
        self._fileno = sock.fileno()

    def fileno(self) -> int:
        return self._fileno

    def logPrefix(self) -> str:
        return f"hand-off to worker {self.peer.worker}"

    def doRead(self) -> Any:
        try:
            data = self.sock.recv(4096)
        except OSError as e:
            if e.errno in _BLOCKED:
                return None
            return ConnectionLost(str(e))
        # The owner sends nothing: end of file, or a broken owner.
        return ConnectionDone() if not data else ConnectionLost("the owner sent bytes")

    def doWrite(self) -> Any:
        return self.peer.flush()

    def connectionLost(self, reason: Failure) -> None:
        self.peer.lost(self)


class _Peer:
    """Hand-offs to one owner: its connection (made on first use) and what waits on it."""

    def __init__(self, sender: HandoffSender, worker: int) -> None:
        self.sender = sender
        self.worker = worker
        self.owner: _OwnerSocket | None = None
        #: Not (wholly) sent yet, in order; only the first may be partly sent.
        self.queue: deque[_Waiting] = deque()

    def hand(self, waiting: _Waiting) -> None:
        if len(self.queue) >= MAX_WAITING:
            self._fail(waiting)
            return
        if self.owner is None and not self._connect():
            self._fail(waiting)
            return
        if not self.queue:
            try:
                if self._send(waiting):
                    return
            except OSError as e:
                self._broken(e)
                self._fail(waiting)
                return
        if waiting.offset == 0:
            # (Partly sent, it is the owner's already: no deadline of ours.)
            waiting.timer = self.sender.reactor.callLater(HANDOFF_TIMEOUT, self._timed_out, waiting)
        self.queue.append(waiting)
        if len(self.queue) == 1 and self.owner is not None:
            self.sender.reactor.addWriter(self.owner)

    def _connect(self) -> bool:
        path = self.sender.path_of(self.worker)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(path)
        except OSError as e:
            sock.close()
            self.sender.ratelog(
                "cannot reach worker {worker} to hand it a connection: {why}",
                worker=self.worker,
                why=e.strerror or str(e),
            )
            return False
        self.owner = _OwnerSocket(self, sock)
        self.sender.reactor.addReader(self.owner)
        return True

    def _send(self, waiting: _Waiting) -> bool:
        """
        Send what is left of `waiting`: True once wholly sent, False when the socket is
        full. The descriptor goes with the first octet, and our copy is let go then.

        @raise OSError: the connection to the owner broke.
        """
        assert self.owner is not None
        sock = self.owner.sock
        frame = waiting.frame
        if waiting.offset == 0:
            transport = waiting.transport
            if _gone(transport):
                self._cancel(waiting)
                return True
            fds = array.array("i", [transport.fileno()])
            try:
                n = sock.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            except OSError as e:
                if e.errno in _BLOCKED:
                    return False
                raise
            self._cancel(waiting)
            self.sender.counts.sent += 1
            _let_go(transport)
        else:
            try:
                n = sock.send(frame[waiting.offset :])
            except OSError as e:
                if e.errno in _BLOCKED:
                    return False
                raise
        waiting.offset += n
        return waiting.offset >= len(frame)

    def flush(self) -> Any:
        """Send what waits, in order, as far as the socket takes it (the reactor's
        ``doWrite``)."""
        try:
            while self.queue:
                if not self._send(self.queue[0]):
                    return None
                self.queue.popleft()
        except OSError as e:
            return ConnectionLost(str(e))
        if self.owner is not None:
            self.sender.reactor.removeWriter(self.owner)
        return None

    def _cancel(self, waiting: _Waiting) -> None:
        if waiting.timer is not None and waiting.timer.active():
            waiting.timer.cancel()
        waiting.timer = None

    def _fail(self, waiting: _Waiting) -> None:
        self._cancel(waiting)
        self.sender.counts.failed += 1
        waiting.fallback()

    def _timed_out(self, waiting: _Waiting) -> None:
        waiting.timer = None
        if waiting.offset or waiting not in self.queue:
            return
        self.sender.ratelog("worker {worker} did not take a connection in time", worker=self.worker)
        self.queue.remove(waiting)
        self._fail(waiting)

    def _broken(self, e: OSError) -> None:
        owner = self.owner
        if owner is not None:
            self.sender.ratelog(
                "the connection to worker {worker} broke: {why}",
                worker=self.worker,
                why=e.strerror or str(e),
            )
            self.sender.reactor.removeReader(owner)
            self.sender.reactor.removeWriter(owner)
            self.lost(owner)

    def lost(self, owner: _OwnerSocket) -> None:
        """The connection to the owner is gone: what waits fails (what was partly sent is
        the owner's already)."""
        if owner is not self.owner:
            return
        self.owner = None
        owner.sock.close()
        waiting = list(self.queue)
        self.queue.clear()
        for w in waiting:
            if w.offset == 0:
                self._fail(w)


class HandoffSender:
    """
    Hands connections to other workers: `hand` (the socket, with what was read and parsed).

    `path_of(worker)` is the UNIX socket that worker takes connections on; `clock` is the
    machine-wide monotonic clock the owner compares with.
    """

    def __init__(
        self,
        reactor: Any,
        path_of: Callable[[int], str],
        counts: HandoffCounts,
        ratelog: Callable[..., object],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.reactor = reactor
        self.path_of = path_of
        self.counts = counts
        self.ratelog = ratelog
        self.clock = clock
        self._peers: dict[int, _Peer] = {}

    def hand(
        self,
        worker: int,
        transport: Any,
        data: bytes,
        hello: ClientHello,
        fallback: Fallback | None = None,
    ) -> None:
        """
        Hand the connection of `transport` (a TCP transport that does not read meanwhile)
        to `worker`, with `data`, the bytes read from it so far, and `hello`, their
        ClientHello. Once sent, `transport` is closed here (not shut down). When it cannot
        be sent, `fallback()` (default: refuse it like an unknown name) is called instead.
        """
        peer = self._peers.get(worker)
        if peer is None:
            peer = self._peers[worker] = _Peer(self, worker)
        if fallback is None:
            fallback = lambda: refuse(transport)  # noqa: E731
        client = transport.getPeer()
        family = 6 if isinstance(client, address.IPv6Address) else 4
        try:
            frame = encode(
                HandedConnection(family, client.host, client.port, self.clock(), hello, data)
            )
        except HandoffFrameError as e:
            _log.warn("cannot hand a connection over: {e}", e=e)
            self.counts.failed += 1
            fallback()
            return
        peer.hand(_Waiting(transport, frame, fallback))


class _Handoff(protocol.Protocol):
    """A connection a route gives away: it stops reading, then hands itself off."""

    def __init__(self, factory: HandoffFactory) -> None:
        self.factory = factory
        self._handed = False

    def makeConnection(self, transport: Any) -> None:
        transport.stopReading()
        super().makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        # The buffered ClientHello, once: nothing else is read (the transport is stopped).
        if self._handed:
            return
        self._handed = True
        f = self.factory
        transport = self.transport
        serve = f.fallback
        fallback = None if serve is None else (lambda: serve(transport, data, f.hello))
        f.sender.hand(f.worker, transport, data, f.hello, fallback)


class HandoffFactory(protocol.Factory):
    """
    The factory of a passthrough `Route` that hands the connection whose ClientHello is
    `hello` to `worker`. `fallback(transport, data, hello)`, if given, serves a connection
    that cannot be handed (default: refused like an unknown name).
    """

    noisy = False

    def __init__(
        self,
        sender: HandoffSender,
        worker: int,
        hello: ClientHello,
        fallback: Callable[[Any, bytes, ClientHello], None] | None = None,
    ) -> None:
        self.sender = sender
        self.worker = worker
        self.hello = hello
        self.fallback = fallback

    def buildProtocol(self, addr: Any) -> _Handoff:
        return _Handoff(self)


def replay(proto: Any, data: bytes, hello: ClientHello) -> None:
    """Give `proto` (an SNI-dispatching protocol, or any protocol) the bytes `data` whose
    ClientHello is `hello`, without parsing them again where it can take that."""
    take = getattr(proto, "replay", None)
    if take is not None:
        take(data, hello)
    else:
        proto.dataReceived(data)


@implementer(IFileDescriptorReceiver)
class _FromWorker(protocol.Protocol):
    """One other worker's hand-offs: descriptors and frames in."""

    def __init__(self, factory: HandoffReceiverFactory) -> None:
        self.factory = factory
        self._fds: deque[int] = deque()
        self._decoder = FrameDecoder()

    def fileDescriptorReceived(self, descriptor: int) -> None:
        if len(self._fds) >= MAX_WAITING:
            os.close(descriptor)
            self._cut("too many descriptors without their bytes")
            return
        self._fds.append(descriptor)

    def dataReceived(self, data: bytes) -> None:
        try:
            frames = self._decoder.feed(data)
        except HandoffFrameError as e:
            self._cut(str(e))
            return
        for handed in frames:
            if not self._fds:
                self._cut("bytes without a descriptor")
                return
            self.factory.take(self._fds.popleft(), handed)

    def _cut(self, why: str) -> None:
        _log.warn("dropping a hand-off connection: {why}", why=why)
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        while self._fds:
            os.close(self._fds.popleft())


class HandoffReceiverFactory(protocol.Factory):
    """
    Takes the connections other workers hand over: each socket becomes a TCP transport of
    the reactor with a protocol of `front` (an SNI-dispatching factory that serves only
    what this worker holds), which is given the bytes already read and their ClientHello.
    """

    noisy = False

    def __init__(
        self,
        reactor: Any,
        front: protocol.Factory,
        counts: HandoffCounts,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.reactor = reactor
        self.front = front
        self.counts = counts
        self.clock = clock
        self._sessions = itertools.count(1)

    def buildProtocol(self, addr: Any) -> _FromWorker:
        return _FromWorker(self)

    def take(self, fd: int, handed: HandedConnection) -> bool:
        """
        Take the TCP connection `fd` (ours to close) described by `handed`: True when it is
        served here, False when it was refused (not TCP, or too old) or could not be had.
        """
        family = socket.AF_INET6 if handed.family == 6 else socket.AF_INET
        try:
            # The family, type and protocol given: nothing asked of the kernel.
            sock = socket.socket(family, socket.SOCK_STREAM, 0, fileno=fd)
        except OSError:
            os.close(fd)
            self.counts.failed += 1
            return False
        try:
            tcp_ok = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL) == socket.IPPROTO_TCP
        except OSError:
            tcp_ok = False
        if not tcp_ok:
            sock.close()
            self.counts.failed += 1
            return False
        age = self.clock() - handed.sent
        if age > HANDOFF_TIMEOUT and LINK_ALPN not in handed.hello.alpn:
            # A public client kept waiting that long is shed (the owner is behind); an
            # agent's link is served whatever the wait (its TLS handshake timeout still
            # bounds it): refusing it would only bring the agent back later, and a link is
            # never refused for being handed.
            _log.warn("refusing a connection handed over {s:.1f}s ago", s=age)
            try:
                sock.setblocking(False)
                sock.send(alert_record(ALERT_UNRECOGNIZED_NAME))
            except OSError:
                pass
            sock.close()
            self.counts.failed += 1
            return False
        client: tuple[Any, ...]
        if family == socket.AF_INET6:
            client = (handed.host, handed.port, 0, 0)
            peer: Any = address.IPv6Address("TCP", handed.host, handed.port)
        else:
            client = (handed.host, handed.port)
            peer = address.IPv4Address("TCP", handed.host, handed.port)
        proto = self.front.buildProtocol(peer)
        if proto is None:
            sock.close()
            self.counts.failed += 1
            return False
        session = next(self._sessions)
        transport = tcp.Server(sock, proto, client, None, session, self.reactor)  # type: ignore[arg-type]
        transport.repstr = f"<{proto.__class__.__name__} #{session} handed over>"
        self.counts.received += 1
        proto.makeConnection(transport)
        if not _gone(transport):
            replay(proto, handed.data, handed.hello)
        return True
