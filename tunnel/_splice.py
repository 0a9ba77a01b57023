"""
Moving bytes between a stream and a socket: the transport helpers of the data path
(`set_nodelay`, `write_now`, `half_close`, `close_now`, `release_connector`),
`ConnectedTCP` (Twisted's TCP transport over a socket connected without its connector) and
`SpliceProtocol`, which joins one transport to another with producers registered both ways
and half-close passed on.
"""

from __future__ import annotations

import _socket
import errno
import socket
import struct
from typing import Any

from twisted.internet import abstract, address, error, interfaces, main, tcp
from twisted.internet.protocol import Protocol
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python import log
from twisted.python.failure import Failure
from zope.interface import implementer

from tunnel._stream import Stream

__all__ = [
    "SOCKET_READ",
    "ConnectedTCP",
    "SpliceProtocol",
    "close_now",
    "half_close",
    "release_connector",
    "set_nodelay",
    "splice",
    "write_now",
]

#: Octets read from a socket per call on the data path.
SOCKET_READ = 256 * 1024

#: ``SO_LINGER`` on, 0 seconds: ``close`` resets the connection (an abort).
_LINGER_RESET = struct.pack("ii", 1, 0)


def set_nodelay(transport: Any) -> None:
    """
    Tune a TCP transport (or the TCP transport under a TLS one) for the data path: Nagle's
    algorithm off, and reads of up to `SOCKET_READ` octets per call, so that a busy stream
    costs fewer reactor turns (Twisted reads 64 KiB at a time by default; the same figure
    is its write-buffer threshold for pausing producers). A stream has neither: nothing
    is done.
    """
    if type(transport) in _TUNED:
        return
    # A TLS layer (a `ProtocolWrapper`) forwards the attributes it lacks to its transport, so
    # `setTcpNoDelay` answers on it too; the read size must be set on the socket's own
    # transport, which is the one that reads.
    candidate: Any = transport.transport if isinstance(transport, ProtocolWrapper) else transport
    setter = getattr(candidate, "setTcpNoDelay", None)
    if setter is None:
        return
    try:
        setter(True)
    except OSError:
        pass
    if hasattr(candidate, "bufferSize"):
        candidate.bufferSize = SOCKET_READ


class ConnectedTCP(tcp.Connection):
    """
    Twisted's TCP transport (`tcp.Connection`: reads, buffered writes, producers, close,
    half-close, abort) over a non-blocking socket that is already connected, for
    connections made without Twisted's connector (`tunnel.agent._local.connect_local`).
    It reads from construction on; its protocol's `makeConnection` is the caller's to call.
    It is tuned for the data path from the start (Nagle's algorithm off, reads of
    `SOCKET_READ` octets: what `set_nodelay` does to other transports).

    Its close costs fewer calls than Twisted's: it knows whether the reactor watches it
    for reading and for writing, so that stopping either when it does not (three of the
    four times on a close) asks the reactor nothing; and a connection whose both
    directions have ended already (a FIN sent, the peer's FIN read) is closed without the
    ``shutdown`` Twisted issues before ``close``, which then has nothing left to do.
    """

    bufferSize = SOCKET_READ
    #: Whether this transport asked the reactor to watch it for reading (writing) and has
    #: not asked it to stop since. The reactor's own removal on a disconnect
    #: (`readConnectionLost`) clears `_reading` as well.
    _reading = False
    _writing = False
    #: The peer's FIN was read (`readConnectionLost`).
    _read_ended = False

    def __init__(
        self,
        skt: socket.socket | _socket.socket,
        protocol: Any,
        reactor: Any,
        peer: tuple[Any, ...],
        family: int | None = None,
    ):
        # tcp.Connection.__init__, less its setblocking(False) (an ioctl): `skt` is
        # non-blocking already (and must be). `family` is the socket's, when the caller
        # knows it (the socket's own `family` property builds an enum member per call).
        abstract.FileDescriptor.__init__(self, reactor=reactor)
        # A `socket.socket` or the C type under it (`connect_local`'s): the transport uses
        # only what both have.
        self.socket = skt  # type: ignore[assignment]
        self.fileno = skt.fileno
        self.protocol = protocol
        self._peer = peer
        if family is None:
            family = skt.family
        self._address_type = (
            address.IPv6Address if family == socket.AF_INET6 else address.IPv4Address
        )
        self.logstr = f"{type(protocol).__name__},client"
        self.connected = 1
        try:
            skt.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self.startReading()

    # -- what the reactor watches ------------------------------------------------------------

    def startReading(self) -> None:
        self._reading = True
        self.reactor.addReader(self)

    def stopReading(self) -> None:
        if self._reading:
            self._reading = False
            self.reactor.removeReader(self)

    def startWriting(self) -> None:
        self._writing = True
        self.reactor.addWriter(self)

    def stopWriting(self) -> None:
        if self._writing:
            self._writing = False
            self.reactor.removeWriter(self)

    # -- producers, without TLS (`startTLS` is not for this transport) ----------------------

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        """`FileDescriptor.registerProducer`, without the TLS mixin's call around it."""
        if self.TLS:
            super().registerProducer(producer, streaming)
            return
        if self.producer is not None:
            raise RuntimeError(
                f"Cannot register producer {producer}, because producer {self.producer} "
                "was never unregistered."
            )
        if self.disconnected:
            producer.stopProducing()
            return
        self.producer = producer
        self.streamingProducer = streaming
        if not streaming:
            producer.resumeProducing()

    def unregisterProducer(self) -> None:
        """`FileDescriptor.unregisterProducer`, without the TLS mixin's call around it."""
        if self.TLS:
            super().unregisterProducer()
            return
        self.producer = None
        if self.connected and self.disconnecting:
            self.startWriting()

    # -- the end -----------------------------------------------------------------------------

    def readConnectionLost(self, reason: Failure) -> None:
        """
        The peer's FIN: `tcp.Connection.readConnectionLost`. The reactor has stopped
        watching this transport for reading before calling it.
        """
        self._reading = False
        self._read_ended = True
        half_closeable: Any = interfaces.IHalfCloseableProtocol(self.protocol, None)
        if half_closeable is None:
            self.connectionLost(reason)
            return
        try:
            half_closeable.readConnectionLost()
        except BaseException:
            log.err()
            self.connectionLost(Failure())

    def connectionLost(self, reason: Failure) -> None:
        """
        `tcp.Connection.connectionLost` (with `FileDescriptor.connectionLost` and
        `_closeSocket`): the producer is stopped, the reactor stops watching, the socket
        is closed (reset by ``SO_LINGER`` after an abort; after a ``shutdown`` unless both
        directions have ended already), and the protocol is told. A second call does
        nothing.
        """
        if not hasattr(self, "socket"):
            return
        self.disconnected = 1
        self.connected = 0
        producer = self.producer
        if producer is not None:
            producer.stopProducing()
            self.producer = None
        reactor = self.reactor
        if self._reading:
            self._reading = False
            reactor.removeReader(self)
        if self._writing:
            self._writing = False
            reactor.removeWriter(self)
        skt = self.socket
        try:
            if isinstance(reason.value, error.ConnectionAborted):
                skt.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            elif self._shouldShutdown and not (self._read_ended and self._writeDisconnected):
                skt.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            skt.close()
        except OSError:
            pass
        protocol = self.protocol
        del self.protocol
        del self.socket
        del self.fileno
        protocol.connectionLost(reason)

    def doRead(self) -> Any:
        """`tcp.Connection.doRead` with its `_dataReceived` inline (one call less per read)."""
        try:
            data = self.socket.recv(self.bufferSize)
        except OSError as se:
            if se.args[0] == errno.EWOULDBLOCK:
                return None
            return main.CONNECTION_LOST
        if not data:
            return main.CONNECTION_DONE
        self.protocol.dataReceived(data)
        return None

    def getPeer(self) -> Any:
        return self._address_type("TCP", *self._peer[:2])

    def getHost(self) -> Any:
        return self._address_type("TCP", *self.socket.getsockname()[:2])

    def __repr__(self) -> str:
        return f"<ConnectedTCP to {self._peer[:2]} at {id(self):x}>"


_TCP_TYPES = (tcp.Server, tcp.Client, ConnectedTCP)
#: The reason given to a TCP transport that `close_now` closes: one shared Failure, as the
#: reactor shares its own for the connections it finds closed.
_CONNECTION_DONE = Failure(main.CONNECTION_DONE)
#: Transports that never have a connector (accepted, or connected without one).
_NO_CONNECTOR = (tcp.Server, ConnectedTCP, Stream)
#: Transports that `set_nodelay` has nothing to do to: a stream, and a `ConnectedTCP`
#: (tuned as it is made).
_TUNED = (Stream, ConnectedTCP)


def _done_writing_now(transport: Any) -> bool:
    """
    Half-close an idle TCP transport (one of Twisted's, connected, with nothing buffered,
    no close or half-close under way and no producer) now, as its `doWrite` would once the
    reactor found the socket writable: the FIN goes out without a reactor turn, two epoll
    updates and an empty send. False (nothing done) for any other.
    """
    if not (
        type(transport) in _TCP_TYPES
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnecting
        and not transport._writeDisconnected
        and not transport._tempDataLen
        and transport.offset == len(transport.dataBuffer)
        and transport.producer is None
    ):
        return False
    transport.stopWriting()
    transport._writeDisconnecting = True
    transport._writeDisconnected = True
    transport._closeWriteConnection()
    return True


def close_now(transport: Any) -> None:
    """
    `transport.loseConnection()`, except that an idle TCP transport (as `_done_writing_now`
    says) closes at once, as Twisted's does when its writing side is already shut down,
    instead of one reactor turn later through an empty write. A TCP transport whose
    writing side is shut down (a half-close) closes at once too, as Twisted's would.
    """
    kind = type(transport)
    if kind is Stream:
        if not transport._closed:  # its loseConnection's own first check
            transport.loseConnection()
        return
    if (
        kind in _TCP_TYPES
        and transport.connected
        and not transport.disconnecting
        and (
            # Its sending side is shut down already (a half-close): what Twisted's
            # loseConnection does then, with the shared Failure instead of a new one.
            transport._writeDisconnected
            # Idle, no producer.
            or (
                not transport._writeDisconnecting
                and not transport._tempDataLen
                and transport.offset == len(transport.dataBuffer)
                and transport.producer is None
            )
        )
    ):
        # Its connectionLost stops reading and writing (the reactor's epoll updates).
        transport.connectionLost(_CONNECTION_DONE)
        return
    transport.loseConnection()


def write_now(transport: Any, data: bytes) -> None:
    """
    `transport.write(data)`, except that a TCP transport with nothing buffered sends at once.

    Twisted's TCP transports always buffer a write and send it when the reactor next finds
    the socket writable: two epoll updates and a reactor turn per message. A relayed request
    crosses several sockets, so that is most of its latency and much of its CPU. What the
    socket does not take now is buffered as usual, and an error is left to the reactor,
    which meets it again on its next write attempt.
    """
    # The idle check (as `_done_writing_now`'s) and Twisted's `writeSomeData`, inline: this
    # runs for every chunk relayed to a socket, and each Python call it saves is a few per
    # cent of a small request.
    if (
        type(transport) in _TCP_TYPES
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnecting
        and not transport._writeDisconnected
        and not transport._tempDataLen
        and transport.offset == len(transport.dataBuffer)
    ):
        try:
            # Python's send retries on EINTR itself; what the socket does not take (its
            # buffer is full) is buffered below, and an error is left to the reactor,
            # which meets it again on its next write attempt.
            sent = transport.socket.send(data)
        except OSError:
            sent = 0
        if sent == len(data):
            return
        if sent:
            data = data[sent:]
    transport.write(data)


def half_close(transport: Any) -> None:
    """
    Shut down the sending direction of `transport` after its buffered data: a FIN on a
    stream or a TCP socket. TLS has no half-close, so a TLS transport closes entirely (its
    `loseWriteConnection`, inherited from the TCP transport below it, would cut off
    data still inside the TLS layer).

    The producer registered on `transport` (the side whose input just ended) is
    unregistered first: it will produce nothing more, and Twisted's transports do not
    shut down while a paused producer is registered, they resume it instead.
    """
    try:
        transport.unregisterProducer()
    except Exception:
        pass
    kind = type(transport)
    if kind is Stream or (kind not in _TCP_TYPES and isinstance(transport, Stream)):
        transport.loseWriteConnection()
    elif kind in _TCP_TYPES:
        # Twisted's TCP transports, known without asking zope for ITCPTransport.
        if not _done_writing_now(transport):
            transport.loseWriteConnection()
    elif isinstance(transport, TLSMemoryBIOProtocol):
        transport.loseConnection()
    elif interfaces.ITCPTransport.providedBy(transport):
        if not _done_writing_now(transport):
            transport.loseWriteConnection()
    else:
        transport.loseConnection()


def release_connector(transport: Any) -> None:
    """
    Break the reference cycle between a closed outgoing TCP connection (`transport`, or the
    TCP transport under a TLS one) and its connector, which Twisted leaves to the cyclic
    collector, so that the connection and everything it holds are freed at once.

    Call it from the protocol's ``connectionLost``: the connector is finished with its
    transport by then (it is told of the loss next and needs only its factory).
    """
    if type(transport) in _NO_CONNECTOR:
        return
    for candidate in (transport, getattr(transport, "transport", None)):
        connector = getattr(candidate, "connector", None)
        if connector is not None and getattr(connector, "transport", None) is candidate:
            connector.transport = None


@implementer(interfaces.IHalfCloseableProtocol)
class SpliceProtocol(Protocol):
    """
    Forwards what one transport receives to another, with backpressure both ways and
    half-close carried across (it receives half-closes: a FIN on a TCP socket or a stream).
    """

    #: This side's transport is no longer the other's producer (`half_close` or
    #: `connectionLost` unregistered it).
    _unregistered = False

    def __init__(self, other: Any) -> None:
        self.other = other
        self.lost = False

    def connectionMade(self) -> None:
        transport = self.transport
        if type(transport) not in _TUNED:
            set_nodelay(transport)
        # When the other side cannot take more, it pauses our transport, and vice versa.
        self.other.registerProducer(transport, True)

    def dataReceived(self, data: bytes) -> None:
        write_now(self.other, data)

    def readConnectionLost(self) -> None:
        # half_close unregisters this side's transport as the other's producer.
        self._unregistered = True
        half_close(self.other)

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = error.ConnectionDone) -> None:  # type: ignore[assignment]
        self.lost = True
        transport = self.transport
        if type(transport) not in _NO_CONNECTOR:
            release_connector(transport)
        if not self._unregistered:
            self._unregistered = True
            try:
                self.other.unregisterProducer()
            except Exception:
                pass
        self.closeOther(reason)

    def closeOther(self, reason: Failure) -> None:
        """
        This side ended for `reason`; close the other: gracefully after a clean close,
        at once otherwise (a reset tells its peer that what it received may be cut short).
        """
        # isinstance, not reason.check: the same answer without the class names of the
        # exception's ancestry, which check computes on every call.
        if isinstance(reason.value, error.ConnectionDone):
            close_now(self.other)
        else:
            self.other.abortConnection()


def splice(stream: Stream, connected: Any) -> SpliceProtocol:
    """
    Join a stream and a connected transport (whose protocol is the returned object's
    partner): bytes flow both ways until either side ends.

    @return: the protocol to attach to the stream.
    """
    stream_side = SpliceProtocol(connected)
    stream.attach(stream_side)
    return stream_side
