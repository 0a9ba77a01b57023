"""
The SNI front's side of a hand-off between workers: a connection whose ClientHello another
worker parsed is routed with that ClientHello (`replay`), its bytes passed on untouched, and
a socket that arrives with ``TCP_NODELAY`` set is not set again.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import protocol
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from tunnel.relay._clienthello import ALERT_DECODE_ERROR, ClientHello, alert_record
from tunnel.relay._sni import Route, SNIDispatchFactory

HELLO = ClientHello("abc.tunnel.localhost", (b"h2",), 0x0303, (0x0304,))


@implementer(ITCPTransport)
class TCPTransport(StringTransport):
    def __init__(self) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "127.0.0.3", 1234))
        self.nodelay: list[bool] = []

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.nodelay.append(enabled)

    def abortConnection(self) -> None:
        self.disconnecting = True


class Recorder(protocol.Protocol):
    def __init__(self) -> None:
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data


def front(**kwargs: Any) -> tuple[SNIDispatchFactory, list[ClientHello], list[Recorder]]:
    hellos: list[ClientHello] = []
    built: list[Recorder] = []

    class Passed(protocol.Factory):
        def buildProtocol(self, addr: Any) -> Recorder:
            built.append(Recorder())
            return built[-1]

    def route(hello: ClientHello) -> Route:
        hellos.append(hello)
        return Route(None, Passed(), passthrough=True)

    return SNIDispatchFactory(route, Clock(), **kwargs), hellos, built


def test_a_replayed_connection_is_routed_with_the_hello_it_came_with() -> None:
    factory, hellos, built = front(set_nodelay=False)
    proto: Any = factory.buildProtocol(None)
    transport = TCPTransport()
    proto.makeConnection(transport)
    # Bytes the parser would refuse (not TLS): given with their hello, they are not parsed.
    proto.replay(b"not a ClientHello", HELLO)
    assert hellos == [HELLO]
    assert built[0].data == b"not a ClientHello" and not transport.disconnecting
    assert transport.nodelay == []  # set by the worker that accepted it
    assert factory.pending == 0  # passthrough: its slot is given back


def test_a_connection_accepted_here_gets_nodelay_and_is_parsed() -> None:
    factory, hellos, _ = front()
    proto: Any = factory.buildProtocol(None)
    transport = TCPTransport()
    proto.makeConnection(transport)
    assert transport.nodelay == [True]
    proto.dataReceived(b"not TLS at all, not a hello")
    assert hellos == [] and transport.disconnecting


def test_a_replay_is_bounded_like_what_is_read() -> None:
    factory, hellos, _ = front()
    proto: Any = factory.buildProtocol(None)
    transport = TCPTransport()
    proto.makeConnection(transport)
    proto.replay(b"x" * (factory.max_buffer + 1), HELLO)
    assert hellos == [] and transport.value() == alert_record(ALERT_DECODE_ERROR)
