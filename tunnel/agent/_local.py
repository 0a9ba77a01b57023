"""
The local data path: for each stream the relay opens, a connection to the forward's local
target (with a PROXY protocol header first if asked), spliced to the stream both ways.

Each connection has its `Connection` record (`_events.py`): the two splice protocols add
the octets they pass on to it (one integer addition per read, nothing else), and say when
their side finished sending or ended, and why.
"""

from __future__ import annotations

import _socket
import errno
import os
import socket
from typing import Any

from twisted.internet import abstract, address, error, posixbase, tcp
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from tunnel._splice import ConnectedTCP
from tunnel.agent._dial import describe_failure
from tunnel.agent._events import Connection, ConnectionState, EventLog, Side
from tunnel.agent._proxyheader import proxy_header
from tunnel.agent.settings import ForwardSpec
from tunnel.link import SpliceProtocol, Stream, StreamResetError, write_now
from tunnel.wire import ErrorCode
from tunnel.wire.control import StreamInfo
from tunnel.wire.errors import describe

__all__ = ["LocalFactory", "connect_local", "refusal", "stream_end"]

_log = Logger()

#: Why the relay resets a stream, by code, for people (the relay resets with CANCEL when
#: the public client reset its connection or went away).
_RELAY_RESETS: dict[int, tuple[str, str]] = {
    ErrorCode.CANCEL: (Side.CLIENT, "reset by the client"),
    ErrorCode.IDLE_TIMEOUT: (Side.RELAY, "idle timeout at the relay"),
    ErrorCode.SHUTDOWN: (Side.RELAY, "the relay is shutting down"),
    ErrorCode.ENHANCE_YOUR_CALM: (Side.RELAY, "a limit of the relay"),
    ErrorCode.REFUSED_STREAM: (Side.RELAY, "refused by the relay (a limit)"),
}


def refusal(target: str, reason: Failure, timeout: float) -> str:
    """
    Why a connection to the local `target` failed, for people.
    """
    if reason.check(error.ConnectionRefusedError):
        return f"nothing is listening on {target}"
    if reason.check(error.TimeoutError, error.UserError):
        return f"{target} did not accept the connection within {timeout:g} s"
    return f"cannot connect to {target}: {describe_failure(reason)}"


def stream_end(reason: Failure) -> tuple[str, str, str | None]:
    """
    How a connection ended, from its stream's end `reason`: (state, by, why).
    """
    value = reason.value
    if isinstance(value, error.ConnectionDone):
        return ConnectionState.CLOSED, Side.CLIENT, None
    if isinstance(value, StreamResetError):
        remote = "by the peer" in str(value)
        if not remote:
            return ConnectionState.RESET, Side.AGENT, f"reset by the agent ({describe(value.code)})"
        by, why = _RELAY_RESETS.get(
            value.code, (Side.RELAY, f"reset by the relay ({describe(value.code)})")
        )
        return ConnectionState.RESET, by, why
    return ConnectionState.RESET, Side.AGENT, describe_failure(reason)


class LocalFactory(ClientFactory):
    """
    Connects one stream to the local target.
    """

    noisy = False

    def __init__(
        self,
        stream: Stream,
        spec: ForwardSpec,
        info: StreamInfo,
        events: EventLog | None = None,
        connection: Connection | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.stream = stream
        self.spec = spec
        self.info = info
        self.events = events
        self.connection = connection
        self.timeout = timeout

    def buildProtocol(self, addr: Any) -> Protocol:
        header = b""
        if self.spec.proxy_protocol:
            info = self.info
            header = proxy_header(
                self.spec.proxy_protocol,
                (info.client_host, info.client_port),
                (info.server_host, info.server_port),
            )
        return _LocalProtocol(
            self.stream, header, self.events, self.connection, not self.spec.unencrypted
        )

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        timed_out = reason.check(error.TimeoutError, error.UserError) is not None
        code = ErrorCode.CONNECT_TIMEOUT if timed_out else ErrorCode.CONNECT_FAILED
        _log.warn(
            "cannot connect to {target}: {reason}",
            target=self.spec.target,
            reason=describe_failure(reason),
            event_type="target_refused",
            tunnel_id=self.info.tunnel_id,
            client=f"{self.info.client_host}:{self.info.client_port}",
        )
        if self.events is not None and self.connection is not None:
            why = refusal(self.spec.target, reason, self.timeout)
            self.events.ended(self.connection, ConnectionState.FAILED, Side.TARGET, why)
        self.stream.abortConnection(code)


_IN_PROGRESS = frozenset({errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY})

#: The address family of each target host seen, 0 for a host name (`_family`): the
#: targets are the forwards', a few, so each is worked out once.
_FAMILIES: dict[str, int] = {}
#: Hosts `_FAMILIES` keeps at most (beyond, the family is worked out each time).
_FAMILIES_KEPT = 256


def _family(host: str) -> int:
    """
    The address family of `host` as an IP address (``AF_INET``, ``AF_INET6``), or 0 for a
    host name; remembered in `_FAMILIES` while it has room.
    """
    family = 0
    if abstract.isIPAddress(host):
        family = int(socket.AF_INET)
    elif abstract.isIPv6Address(host):
        family = int(socket.AF_INET6)
    if len(_FAMILIES) < _FAMILIES_KEPT:
        _FAMILIES[host] = family
    return family


def connect_local(
    reactor: Any, host: str, port: int, factory: LocalFactory, timeout: float
) -> None:
    """
    Connect to ``host:port`` and give the connection a protocol from `factory`, as
    ``reactor.connectTCP(host, port, factory, timeout=timeout)`` does: `factory`'s
    ``buildProtocol`` and the protocol's ``makeConnection`` once connected, or its
    ``clientConnectionFailed`` with Twisted's error (``ConnectionRefusedError``, another
    ``ConnectError``, or ``TimeoutError`` after `timeout` seconds).

    For an IP address on a POSIX reactor the socket is connected here, without Twisted's
    connector (its delayed call, Deferred and four epoll updates): a loopback connect is
    complete as soon as ``connect`` returns, so a second ``connect`` says so (or says why it
    failed), and the protocol is connected at once, in the caller's reactor turn. A connect
    still in progress waits for the socket to be writable. Host names go through
    ``connectTCP`` (they need a resolver). A failure is reported within this call when it
    is known at once.
    """
    family = _FAMILIES.get(host)
    if family is None:
        family = _family(host)
    if not family or not isinstance(reactor, posixbase.PosixReactorBase):
        reactor.connectTCP(host, port, factory, timeout=timeout)
        return
    if family == socket.AF_INET6:
        target: tuple[Any, ...] = tcp._resolveIPv6(host, port)
    else:
        target = (host, port)
    try:
        # Non-blocking from its creation: no ioctl to make it so. The C socket type:
        # everything a transport asks of a socket, without the Python layer of
        # `socket.socket` over it (three Python calls per connection, to make and close).
        sock = _socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    except OSError as e:
        factory.clientConnectionFailed(None, Failure(error.getConnectError(e)))
        return
    code = sock.connect_ex(target)
    if code in _IN_PROGRESS:
        # Asking again says how it ended, with no poll object: 0 (or EISCONN) once
        # connected, the error (ECONNREFUSED, ...) once it failed, EALREADY while it is
        # still in progress.
        code = sock.connect_ex(target)
        if code in _IN_PROGRESS:
            _Connecting(reactor, sock, target, factory, timeout, family)
            return
    _connected(reactor, sock, target, factory, code, family)


def _connected(
    reactor: Any,
    sock: _socket.socket,
    target: tuple[Any, ...],
    factory: LocalFactory,
    code: int,
    family: int,
) -> None:
    """The connect of `sock` ended with `code` (0: connected): connect a protocol, or fail."""
    if code and code != errno.EISCONN:
        sock.close()
        failure = error.getConnectError((code, os.strerror(code)))
        factory.clientConnectionFailed(None, Failure(failure))
        return
    peer_type = address.IPv6Address if family == socket.AF_INET6 else address.IPv4Address
    protocol = factory.buildProtocol(peer_type("TCP", *target[:2]))
    transport = ConnectedTCP(sock, protocol, reactor, target, family)
    protocol.makeConnection(transport)


class _Connecting:
    """
    A connect in progress: waits (an epoll writer) until the socket is writable, or
    `timeout` seconds, whichever comes first, then hands over to `_connected`.
    """

    def __init__(
        self,
        reactor: Any,
        sock: _socket.socket,
        target: tuple[Any, ...],
        factory: LocalFactory,
        timeout: float,
        family: int,
    ) -> None:
        self.reactor = reactor
        self.sock = sock
        self.target = target
        self.factory = factory
        self.family = family
        self._fd = sock.fileno()
        self._timer: Any = reactor.callLater(timeout, self._timed_out)
        reactor.addWriter(self)

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "LocalConnect"

    def doWrite(self) -> None:
        self._finish(self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))

    def connectionLost(self, reason: Failure) -> None:
        # The reactor saw an error or hang-up on the socket before it was writable.
        code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self._finish(code or errno.ECONNREFUSED)

    def _stop(self) -> None:
        self.reactor.removeWriter(self)
        self._fd = -1
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _finish(self, code: int) -> None:
        if self._fd == -1:
            return
        self._stop()
        _connected(self.reactor, self.sock, self.target, self.factory, code, self.family)

    def _timed_out(self) -> None:
        self._timer = None
        if self._fd == -1:
            return
        self._stop()
        self.sock.close()
        self.factory.clientConnectionFailed(None, Failure(error.TimeoutError()))


class _LocalProtocol(SpliceProtocol):
    """
    The local target's connection, joined to its stream.
    """

    def __init__(
        self,
        stream: Stream,
        header: bytes = b"",
        events: EventLog | None = None,
        connection: Connection | None = None,
        tls: bool = True,
    ) -> None:
        super().__init__(stream)
        #: Written to the target before anything from the stream (a PROXY header).
        self.header = header
        self.events = events
        self.connection = connection
        self.tls = tls

    def connectionMade(self) -> None:
        stream: Stream = self.other
        transport = self.transport
        assert transport is not None
        if stream._closed:
            if self.events is not None and self.connection is not None:
                why = "the client left before the target answered"
                self.events.ended(self.connection, ConnectionState.RESET, Side.CLIENT, why)
            transport.abortConnection()  # type: ignore[attr-defined]
            return
        if self.header:
            transport.write(self.header)
        super().connectionMade()
        if self.events is not None and self.connection is not None:
            self.events.connected(self.connection)
            stream.attach(_StreamSide(transport, self.events, self.connection, self.tls))
        else:
            stream.attach(SpliceProtocol(transport))

    def dataReceived(self, data: bytes) -> None:
        connection = self.connection
        if connection is not None:
            connection.to_client += len(data)
        # The other side is a stream, whose write never waits: `write_now` has nothing
        # to add to it.
        self.other.write(data)

    def readConnectionLost(self) -> None:
        if self.events is not None and self.connection is not None:
            self.events.half_closed(self.connection, Side.TARGET)
        super().readConnectionLost()

    def connectionLost(self, reason: Failure = error.ConnectionDone) -> None:  # type: ignore[assignment]
        events, connection = self.events, self.connection
        ended = connection is None or connection.state in ConnectionState.ENDED
        if events is not None and connection is not None and not ended:
            if isinstance(reason.value, error.ConnectionDone):
                events.ended(connection, ConnectionState.CLOSED, Side.TARGET)
            else:
                events.ended(connection, ConnectionState.RESET, Side.TARGET, "reset by the target")
        super().connectionLost(reason)


class _StreamSide(SpliceProtocol):
    """
    The stream's side of the splice: what the public client sends, to the target.
    """

    def __init__(self, other: Any, events: EventLog, connection: Connection, tls: bool) -> None:
        super().__init__(other)
        self.events = events
        self.connection = connection
        #: The public client speaks TLS to the relay (not a raw TCP tunnel).
        self.tls = tls

    def dataReceived(self, data: bytes) -> None:
        self.connection.from_client += len(data)
        write_now(self.other, data)

    def readConnectionLost(self) -> None:
        self.events.half_closed(self.connection, Side.CLIENT)
        super().readConnectionLost()

    def connectionLost(self, reason: Failure = error.ConnectionDone) -> None:  # type: ignore[assignment]
        if self.connection.state not in ConnectionState.ENDED:
            state, by, why = stream_end(reason)
            link = getattr(self.transport, "link", None)
            if state == ConnectionState.RESET and link is not None and link.terminated:
                # The whole link ended (every stream with it), not this connection alone.
                by = Side.RELAY if link.terminated[2] else Side.AGENT
                why = f"the link to the relay ended ({describe(link.terminated[0])})"
            elif state == ConnectionState.RESET and link is not None and link._lost:
                by, why = Side.AGENT, "the link to the relay was lost"
            elif state == ConnectionState.RESET and by == Side.CLIENT and self.tls:
                # Most TLS clients (curl, browsers) close their socket without a close_notify,
                # which reaches the agent as a reset, as a TCP reset does: the relay cannot
                # tell them apart. Most are a normal end, so say closed, and say how.
                state, why = ConnectionState.CLOSED, "the client closed abruptly"
            self.events.ended(self.connection, state, by, why)
        super().connectionLost(reason)
