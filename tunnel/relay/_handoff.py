"""
Handing a public connection to the worker that owns its tunnel (``--workers N``).

A worker that accepted a public TLS connection for a tunnel held by another worker sends the
connection's socket to that worker over a UNIX connection (``SCM_RIGHTS``, Twisted's
``sendFileDescriptor``), with the bytes it already read (the ClientHello) in a frame of its
own: a 4-octet big-endian length, then the bytes. The owner adopts the socket
(``adoptStreamConnection``), replays the bytes into its own SNI dispatch, and acknowledges
each hand-off in order with one octet: 1 (taken) or 0 (refused). Until the acknowledgement
the sender does not read from the socket; then it closes its own copy without a shutdown
(``_shouldShutdown = False``), so no FIN or RST reaches the client: the owner's copy is the
connection now.

Bounds: at most `MAX_WAITING` hand-offs wait for one owner's acknowledgement (or for the
connection to it), each at most `HANDOFF_TIMEOUT` seconds; past either, or when the owner is
gone, the connection is refused like an unknown name (or aborted, once its socket went) and
counted as failed. The receiving side holds at most `MAX_WAITING` received descriptors that
have no frame yet, and frames of at most `MAX_FRAME` octets: a peer that sends more is cut
off.
"""

from __future__ import annotations

import os
import socket
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import protocol
from twisted.internet.interfaces import IDelayedCall, IFileDescriptorReceiver
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tunnel.relay._clienthello import ALERT_UNRECOGNIZED_NAME, alert_record

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

#: Seconds a hand-off may wait for the owner's acknowledgement (or for the connection).
HANDOFF_TIMEOUT = 2.0
#: Hand-offs waiting at once for one owner.
MAX_WAITING = 256
#: Octets of one frame of already-read bytes.
MAX_FRAME = 65536

_LENGTH = struct.Struct(">I")
_TAKEN = b"\x01"
_REFUSED = b"\x00"


@dataclass
class HandoffCounts:
    """Hand-offs of one worker since start."""

    sent: int = 0
    received: int = 0
    failed: int = 0


@dataclass
class _Waiting:
    transport: Any
    data: bytes
    timer: IDelayedCall


def _refuse(transport: Any) -> None:
    """Refuse a public connection whose socket is still ours alone: the alert of an
    unknown name, then close."""
    if getattr(transport, "disconnecting", False) or not getattr(transport, "connected", True):
        return
    transport.write(alert_record(ALERT_UNRECOGNIZED_NAME))
    transport.loseConnection()


def _let_go(transport: Any) -> None:
    """Close our copy of a socket another process has taken: no shutdown, so no FIN."""
    transport._shouldShutdown = False
    transport.loseConnection()


class _ToOwner(protocol.Protocol):
    """The connection to one owner: sends descriptors and frames, reads acknowledgements."""

    def __init__(self, peer: _Peer) -> None:
        self.peer = peer

    def connectionMade(self) -> None:
        self.peer.connected(self)

    def dataReceived(self, data: bytes) -> None:
        for octet in data:
            self.peer.acknowledged(octet == _TAKEN[0])

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.peer.lost()


class _Peer(protocol.ClientFactory):
    """Hand-offs to one owner: its connection (made on first use) and what waits on it."""

    noisy = False

    def __init__(self, sender: HandoffSender, worker: int) -> None:
        self.sender = sender
        self.worker = worker
        self.proto: _ToOwner | None = None
        self.connecting = False
        #: Not yet sent (no connection yet).
        self.queued: deque[_Waiting] = deque()
        #: Sent, waiting for their acknowledgement, in order.
        self.sent: deque[_Waiting] = deque()

    def buildProtocol(self, addr: Any) -> _ToOwner:
        return _ToOwner(self)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.connecting = False
        self.sender.ratelog(
            "cannot reach worker {worker} to hand it a connection: {why}",
            worker=self.worker,
            why=reason.getErrorMessage(),
        )
        self._fail_all()

    def hand(self, transport: Any, data: bytes) -> None:
        if len(self.queued) + len(self.sent) >= MAX_WAITING:
            self.sender.counts.failed += 1
            _refuse(transport)
            return
        timer = self.sender.reactor.callLater(HANDOFF_TIMEOUT, self._timed_out)
        waiting = _Waiting(transport, data, timer)
        if self.proto is not None:
            self._send(waiting)
            return
        self.queued.append(waiting)
        if not self.connecting:
            self.connecting = True
            self.sender.reactor.connectUNIX(
                self.sender.path_of(self.worker), self, timeout=HANDOFF_TIMEOUT
            )

    def connected(self, proto: _ToOwner) -> None:
        self.connecting = False
        self.proto = proto
        while self.queued:
            self._send(self.queued.popleft())

    def _send(self, waiting: _Waiting) -> None:
        assert self.proto is not None
        transport = waiting.transport
        if getattr(transport, "disconnecting", False) or not getattr(transport, "connected", True):
            waiting.timer.cancel()
            return
        owner = self.proto.transport
        assert owner is not None
        owner.sendFileDescriptor(transport.fileno())  # type: ignore[attr-defined]
        owner.write(_LENGTH.pack(len(waiting.data)) + waiting.data)
        self.sent.append(waiting)

    def acknowledged(self, taken: bool) -> None:
        if not self.sent:
            # More acknowledgements than hand-offs: the owner is broken.
            if self.proto is not None and self.proto.transport is not None:
                self.proto.transport.loseConnection()
            return
        waiting = self.sent.popleft()
        if waiting.timer.active():
            waiting.timer.cancel()
        if taken:
            self.sender.counts.sent += 1
            _let_go(waiting.transport)
        else:
            self.sender.counts.failed += 1
            _refuse(waiting.transport)

    def _timed_out(self) -> None:
        # The oldest waits longest: every hand-off that timed out is failed, and the
        # connection to an owner this slow is dropped (what it acknowledges later is lost).
        self.sender.ratelog("worker {worker} did not take a connection in time", worker=self.worker)
        if self.proto is not None and self.proto.transport is not None:
            self.proto.transport.abortConnection()  # type: ignore[attr-defined]
        else:
            self._fail_all()

    def lost(self) -> None:
        self.proto = None
        self._fail_all()

    def _fail_all(self) -> None:
        for waiting in (*self.sent, *self.queued):
            if waiting.timer.active():
                waiting.timer.cancel()
            self.sender.counts.failed += 1
            # Sent: the owner may hold the socket too, so no alert into it: abort.
            if waiting in self.sent:
                waiting.transport.abortConnection()
            else:
                _refuse(waiting.transport)
        self.sent.clear()
        self.queued.clear()


class HandoffSender:
    """
    Hands public connections to other workers: `hand` (the socket, with what was read).

    `path_of(worker)` is the UNIX socket that worker takes connections on.
    """

    def __init__(
        self,
        reactor: Any,
        path_of: Callable[[int], str],
        counts: HandoffCounts,
        ratelog: Callable[..., object],
    ) -> None:
        self.reactor = reactor
        self.path_of = path_of
        self.counts = counts
        self.ratelog = ratelog
        self._peers: dict[int, _Peer] = {}

    def hand(self, worker: int, transport: Any, data: bytes) -> None:
        """
        Hand the connection of `transport` (which must not read meanwhile) and `data`, the
        bytes read from it so far, to `worker`.
        """
        peer = self._peers.get(worker)
        if peer is None:
            peer = self._peers[worker] = _Peer(self, worker)
        peer.hand(transport, data)


class _Handoff(protocol.Protocol):
    """A public connection a route gives away: it stops reading, then hands itself off."""

    def __init__(self, sender: HandoffSender, worker: int) -> None:
        self.sender = sender
        self.worker = worker
        self._handed = False

    def makeConnection(self, transport: Any) -> None:
        transport.stopReading()
        super().makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        # The buffered ClientHello, once: nothing else is read (the transport is stopped).
        if self._handed:
            return
        self._handed = True
        self.sender.hand(self.worker, self.transport, data)


class HandoffFactory(protocol.Factory):
    """The factory of a passthrough `Route` that hands the connection to `worker`."""

    noisy = False

    def __init__(self, sender: HandoffSender, worker: int) -> None:
        self.sender = sender
        self.worker = worker

    def buildProtocol(self, addr: Any) -> _Handoff:
        return _Handoff(self.sender, self.worker)


@implementer(IFileDescriptorReceiver)
class _FromWorker(protocol.Protocol):
    """One other worker's hand-offs: descriptors and frames in, acknowledgements out."""

    def __init__(self, factory: HandoffReceiverFactory) -> None:
        self.factory = factory
        self._fds: deque[int] = deque()
        self._buffer = bytearray()

    def fileDescriptorReceived(self, descriptor: int) -> None:
        if len(self._fds) >= MAX_WAITING:
            os.close(descriptor)
            self._cut("too many descriptors without their bytes")
            return
        self._fds.append(descriptor)

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buffer)
            if length > MAX_FRAME:
                self._cut(f"a frame of {length} octets")
                return
            end = _LENGTH.size + length
            if len(self._buffer) < end:
                return
            data = bytes(self._buffer[_LENGTH.size : end])
            del self._buffer[:end]
            if not self._fds:
                self._cut("bytes without a descriptor")
                return
            taken = self.factory.take(self._fds.popleft(), data)
            if self.transport is not None:
                self.transport.write(_TAKEN if taken else _REFUSED)

    def _cut(self, why: str) -> None:
        _log.warn("dropping a hand-off connection: {why}", why=why)
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        while self._fds:
            os.close(self._fds.popleft())


class HandoffReceiverFactory(protocol.Factory):
    """
    Takes the connections other workers hand over: each socket is adopted by the reactor
    with `front` (an SNI-dispatching factory that serves only what this worker holds) and
    the bytes already read are replayed into it.
    """

    noisy = False

    def __init__(self, reactor: Any, front: protocol.Factory, counts: HandoffCounts) -> None:
        self.reactor = reactor
        self.front = front
        self.counts = counts

    def buildProtocol(self, addr: Any) -> _FromWorker:
        return _FromWorker(self)

    def take(self, fd: int, data: bytes) -> bool:
        """Adopt the TCP connection `fd` (ours to close) and replay `data` into it."""
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)
            return False
        with sock:
            if sock.type != socket.SOCK_STREAM or sock.family not in (
                socket.AF_INET,
                socket.AF_INET6,
            ):
                return False
            built: list[Any] = []
            front = self.front

            class _Replay(protocol.Factory):
                def buildProtocol(self, addr: Any) -> Any:
                    proto = front.buildProtocol(addr)
                    if proto is not None:
                        built.append(proto)
                    return proto

            try:
                self.reactor.adoptStreamConnection(sock.fileno(), sock.family, _Replay())
            except OSError as e:
                _log.warn("cannot adopt a handed connection: {e}", e=e)
                return False
        self.counts.received += 1
        if built:
            proto = built[0]
            transport = proto.transport
            if (
                transport is not None
                and getattr(transport, "connected", False)
                and not getattr(transport, "disconnecting", False)
            ):
                proto.dataReceived(data)
        return True
