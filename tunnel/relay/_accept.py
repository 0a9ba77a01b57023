"""
A TCP listening port that accepts a connection with less work than Twisted's own.

Twisted's `tcp.Port.doRead` spends some forty Python calls on each accepted connection
before its protocol sees it: a log-buffering context manager and three `Logger` objects
per turn, a generator around ``socket.accept()`` (whose ``family`` and ``type`` go
through enum converters), the address built by a method, and `tcp.Server.__init__`
(three constructors, the log prefix asked of the protocol, two formatted strings, the
reactor's registration through three more calls). `LeanPort.doRead` accepts with the
listening socket's own ``_accept`` (``accept4``), builds the `tcp.Server` transport by
setting what its constructor would set, and registers it with the reactor in one call.

What stays as it was:

- the transport is a `tcp.Server`, with the same attributes and the same values
  (``logstr``, ``repstr``, what `getHost`, `getPeer` and `logPrefix` return), so that
  everything that looks at its type (`tunnel._splice`'s fast paths) still recognises it;
- the accept loop's size, scaled as Twisted scales it (``numberAccepts``);
- IPv6 peers carry their scope, as Twisted gives it;
- the accept errors are Twisted's: ``EMFILE`` is handed to Twisted's own
  `tcp.Port.doRead`, which meets it again and recovers with its reserved descriptor as
  it always did; ``ENFILE``, ``ENOBUFS``, ``ENOMEM`` and ``ECONNABORTED`` are logged as
  Twisted logs them and end the turn; ``EPERM`` (netfilter) is skipped; any other is
  logged as an error;
- a factory that returns None has the socket closed; an exception raised by
  ``buildProtocol`` or by the protocol's ``connectionMade`` is logged (as Twisted's
  ``log.deferr()`` logs it) and the socket of a connection without a protocol is closed.
"""

from __future__ import annotations

import ipaddress
import socket
from errno import (
    EAGAIN,
    ECONNABORTED,
    EMFILE,
    ENFILE,
    ENOBUFS,
    ENOMEM,
    EPERM,
    EWOULDBLOCK,
    errorcode,
)
from typing import Any

from twisted.internet import defer, tcp
from twisted.internet.address import IPv6Address
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import Protocol
from twisted.python import log
from zope.interface import implementer

__all__ = [
    "LeanPort",
    "adopt_stream_port",
    "listen_tcp",
    "local_address",
    "server_endpoint",
    "server_transport",
]

_NUMERIC = socket.NI_NUMERICHOST | socket.NI_NUMERICSERV
_NOTHING_LEFT = (EAGAIN, EWOULDBLOCK)
#: What Twisted's accept loop says and stops at (`tcp._ACCEPT_ERRORS`).
_ACCEPT_ERRORS = (EMFILE, ENOBUFS, ENFILE, ENOMEM, ECONNABORTED)
_new_server = tcp.Server.__new__
_Server = tcp.Server
_Socket = socket.socket
_STREAM = socket.SOCK_STREAM
_class_log_prefix = Protocol.logPrefix

try:
    from twisted.internet.epollreactor import EPOLLIN as _EPOLLIN
    from twisted.internet.epollreactor import EPOLLOUT as _EPOLLOUT
    from twisted.internet.epollreactor import EPollReactor
except ImportError:  # pragma: no cover - no epoll on this platform
    _epoll_add_reader: Any = None
else:
    _epoll_add_reader = EPollReactor.addReader

#: The protocol classes whose log prefix is their name (Twisted's `Protocol.logPrefix`),
#: each with its prefix; the prefix of any other is asked of each instance.
_PREFIXES: dict[type, str] = {}


def _log_prefix(port: tcp.Port, protocol: Any) -> str:
    """
    What `tcp.Server.__init__` puts in front of a connection's ``logstr`` (the protocol's
    `logPrefix`), remembered for a class whose prefix is its name.
    """
    cls = type(protocol)
    if getattr(cls, "logPrefix", None) is _class_log_prefix:
        _PREFIXES[cls] = cls.__name__
        return cls.__name__
    return port._getLogPrefix(protocol)


def _add_reader(reactor: Any, transport: Any, fd: int) -> None:
    """
    ``reactor.addReader(transport)``: `EPollReactor`'s, inline, for the epoll reactor
    (what its ``_add`` does for a descriptor it does not read yet); any other reactor's own.
    """
    if type(reactor).addReader is not _epoll_add_reader:
        reactor.addReader(transport)
        return
    reads = reactor._reads
    if fd in reads:
        return
    if fd in reactor._writes:
        reactor._poller.modify(fd, _EPOLLIN | _EPOLLOUT)
    else:
        reactor._poller.register(fd, _EPOLLIN)
    reads.add(fd)
    reactor._selectables[fd] = transport


def server_transport(
    sock: socket.socket, protocol: Any, client: tuple[Any, ...], port: tcp.Port, sessionno: int
) -> tcp.Server:
    """
    The `tcp.Server` that ``tcp.Server(sock, protocol, client, port, sessionno,
    port.reactor)`` makes, reading from the reactor, for a non-blocking `sock`: its
    constructor's assignments, without its calls.
    """
    transport: Any = _new_server(_Server)
    host = client[0]
    # abstract.FileDescriptor.__init__
    transport.reactor = reactor = port.reactor
    transport._tempDataBuffer = []
    transport._tempDataLen = 0
    # tcp.Connection.__init__ (the caller made `sock` non-blocking)
    transport.socket = sock
    transport.fileno = sock.fileno
    transport.protocol = protocol
    # tcp.Server.__init__
    if len(client) != 2:
        transport._addressType = IPv6Address
    transport.server = port
    transport.client = client
    transport.sessionno = sessionno
    transport.hostname = host
    prefix = _PREFIXES.get(type(protocol)) or _log_prefix(port, protocol)
    transport.logstr = f"{prefix},{sessionno},{host}"
    transport.repstr = f"<{type(protocol).__name__} #{sessionno} on {port._realPortNumber}>"
    # abstract.FileDescriptor.startReading
    _add_reader(reactor, transport, sock.fileno())
    transport.connected = 1
    return transport  # type: ignore[no-any-return]


class LeanPort(tcp.Port):
    """
    `tcp.Port` with a leaner accept loop (see the module's docstring); all else is
    Twisted's.
    """

    def doRead(self) -> None:
        """
        Accept the connections waiting, up to ``numberAccepts`` (scaled as Twisted
        scales it), and connect each to a protocol from the factory.
        """
        try:
            self._accept_some()
        except BaseException:
            # As Twisted's `tcp.Port.doRead`: whatever escapes is logged, the port stays.
            log.deferr()

    def _accept_some(self) -> None:
        accept = self.socket._accept  # type: ignore[union-attr]
        family = self.addressFamily
        build = self.factory.buildProtocol  # type: ignore[union-attr]
        address_type = self._addressType
        limit = self.numberAccepts
        accepted = 0
        for _ in range(limit):
            try:
                fd, addr = accept()
            except OSError as e:
                err = e.errno
                if err in _NOTHING_LEFT:
                    break
                if err == EPERM:
                    # Netfilter may have refused the connection: try the next, as Twisted.
                    continue
                if err == EMFILE:
                    # Twisted's own loop meets it again and recovers with its reserved
                    # descriptor (or says it cannot), as it always did.
                    tcp.Port.doRead(self)
                    return
                if err in _ACCEPT_ERRORS:
                    # Said, and the turn ends, as Twisted's loop does.
                    self._logger.info(
                        "Could not accept new connection ({acceptError})",
                        acceptError=errorcode[err],
                    )
                    break
                raise
            try:
                sock = _Socket(family, _STREAM, 0, fd)
            except BaseException:
                socket.close(fd)
                raise
            try:
                sock.setblocking(False)
                if len(addr) == 4:
                    # IPv6: the host with its scope id, as Twisted gives it.
                    addr = (socket.getnameinfo(addr, _NUMERIC)[0], *addr[1:])
                protocol = build(address_type("TCP", *addr))
            except BaseException:
                sock.close()
                raise
            accepted += 1
            if protocol is None:
                sock.close()
                continue
            s = self.sessionno
            self.sessionno = s + 1
            protocol.makeConnection(server_transport(sock, protocol, addr, self, s))
        if accepted == limit:
            self.numberAccepts = limit + 20
        else:
            self.numberAccepts = accepted or 1


def listen_tcp(
    reactor: Any, port: int, factory: Any, backlog: int = 50, interface: str = ""
) -> Any:
    """
    ``reactor.listenTCP(port, factory, backlog, interface)``, with a `LeanPort` where the
    reactor is one of Twisted's POSIX reactors (elsewhere, a test's reactor for instance,
    the reactor's own).

    @raise twisted.internet.error.CannotListenError: as ``listenTCP`` raises it.
    """
    if not isinstance(reactor, PosixReactorBase):
        return reactor.listenTCP(port, factory, backlog=backlog, interface=interface)
    listening = LeanPort(port, factory, backlog, interface, reactor)
    listening.startListening()
    return listening


def adopt_stream_port(reactor: Any, fd: int, family: int, factory: Any) -> Any:
    """
    ``reactor.adoptStreamPort(fd, family, factory)``, with a `LeanPort` for a TCP socket on
    one of Twisted's POSIX reactors (elsewhere, the reactor's own).
    """
    if not isinstance(reactor, PosixReactorBase) or family not in (
        socket.AF_INET,
        socket.AF_INET6,
    ):
        return reactor.adoptStreamPort(fd, family, factory)
    listening = LeanPort._fromListeningDescriptor(reactor, fd, family, factory)
    listening.startListening()
    return listening


@implementer(IStreamServerEndpoint)
class _LeanTCPEndpoint:
    """`TCP4ServerEndpoint` / `TCP6ServerEndpoint`, listening with `listen_tcp`."""

    def __init__(self, reactor: Any, port: int, backlog: int, interface: str) -> None:
        self._reactor = reactor
        self._port = port
        self._backlog = backlog
        self._interface = interface

    def listen(self, protocolFactory: Any) -> defer.Deferred[Any]:
        return defer.execute(
            listen_tcp, self._reactor, self._port, protocolFactory, self._backlog, self._interface
        )


def server_endpoint(reactor: Any, description: str) -> Any:
    """
    ``serverFromString(reactor, description)``, except that a ``tcp:`` or ``tcp6:``
    endpoint listens with `listen_tcp` (a `LeanPort`).

    @raise ValueError: as ``serverFromString`` raises it.
    """
    endpoint = serverFromString(reactor, description)
    if type(endpoint) in (TCP4ServerEndpoint, TCP6ServerEndpoint):
        return _LeanTCPEndpoint(reactor, endpoint._port, endpoint._backlog, endpoint._interface)
    return endpoint


def local_address(listener: Any) -> Any:
    """
    The address every connection accepted by `listener` has as its own (what their
    ``getHost()`` returns): the listener's, when it is bound to one address; None when it
    is bound to all of them (a connection's own is the one its client reached).
    """
    get_host = getattr(listener, "getHost", None)
    address = get_host() if get_host is not None else None
    host = getattr(address, "host", None)
    if not isinstance(host, str):
        return None
    try:
        if ipaddress.ip_address(host.split("%", 1)[0]).is_unspecified:
            return None
    except ValueError:
        return None
    return address
