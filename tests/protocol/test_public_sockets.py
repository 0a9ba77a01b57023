"""
The relay's public sockets of a raw TCP tunnel, in this process: every accepted connection,
the first of a listener and the later ones (which may inherit the options from the
listening socket), has TCP_NODELAY and the keepalive options that let the relay notice a
client gone while its connection is paused; and a client's first bytes, sent with its
connect, reach the target whatever the turn they are read in.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest_twisted
from twisted.internet import abstract, interfaces, protocol, threads
from zope.interface import implementer

from tests.protocol.inprocess import Echo, agent_for, connect, get_reactor, wait_until
from tunnel._splice import SOCKET_READ
from tunnel.agent.session import parse_forward
from tunnel.relay._peerwatch import KEEPALIVE_IDLE, USER_TIMEOUT, socket_of
from tunnel.relay.service import RelayService


def assert_public_options(transport: object) -> None:
    """A public connection's socket: TCP_NODELAY, keepalive, the user timeout."""
    sock = socket_of(transport)
    assert sock is not None
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == KEEPALIVE_IDLE
    user_timeout = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
    assert user_timeout == USER_TIMEOUT * 1000


@implementer(interfaces.IHalfCloseableProtocol)
class _EchoToEnd(Echo):
    """Echoes, and closes once the peer has finished sending (after the echo is out)."""

    def readConnectionLost(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


@pytest_twisted.ensureDeferred
async def test_every_public_socket_has_nodelay_and_keepalive(
    relay: RelayService, tmp_path: Path
) -> None:
    reactor = get_reactor()
    echo = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
    agent = agent_for(relay, tmp_path / "state")
    clients = []
    try:
        tunnel = await agent.forward(parse_forward(f"{echo.getHost().port}:tcp"))
        assert tunnel.unencrypted_port is not None
        for i in range(3):
            client = await connect(tunnel.unencrypted_port)
            clients.append(client)
            assert client.transport is not None
            client.transport.write(b"%d" % i)
            await wait_until(lambda c=client, i=i: c.received == b"%d" % i, "the echo")
        public = list(relay.relay.public_connections)
        assert len(public) == 3
        for conn in public:
            assert_public_options(conn.transport)
            assert conn.transport.bufferSize == 256 * 1024
    finally:
        for client in clients:
            if client.transport is not None:
                client.transport.loseConnection()
        await agent.stop()
        await echo.stopListening()


@pytest_twisted.ensureDeferred
async def test_bytes_and_end_sent_with_the_connect_reach_the_target(
    relay: RelayService, tmp_path: Path
) -> None:
    """A client that sends its request and its FIN at once (both may be read in the turn
    that accepts it): the target gets all of it and the end, and the answer comes back."""
    reactor = get_reactor()
    factory = protocol.Factory.forProtocol(_EchoToEnd)
    echo = reactor.listenTCP(0, factory, interface="127.0.0.1")
    agent = agent_for(relay, tmp_path / "state")
    try:
        tunnel = await agent.forward(parse_forward(f"{echo.getHost().port}:tcp"))
        port = tunnel.unencrypted_port
        assert port is not None

        def exchange() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(b"request and end")
                sock.shutdown(socket.SHUT_WR)
                got = b""
                while chunk := sock.recv(65536):
                    got += chunk
                return got

        for _ in range(3):
            assert await threads.deferToThread(exchange) == b"request and end"
    finally:
        await agent.stop()
        await echo.stopListening()


@pytest_twisted.ensureDeferred
async def test_public_tls_sockets_have_the_options_and_the_link_does_not(
    relay: RelayService, tmp_path: Path
) -> None:
    """
    On the TLS port, whose listening socket carries the public options after its first
    connection: every public connection (the first of the listener and the later ones) has
    TCP_NODELAY, keepalive and the user timeout; the agent's link, accepted on the same
    port, has TCP_NODELAY but neither keepalive nor the user timeout.
    """
    reactor = get_reactor()
    echo = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
    agent = agent_for(relay, tmp_path / "state")
    socks: list[ssl.SSLSocket] = []
    try:
        tunnel = await agent.forward(parse_forward(f"{echo.getHost().port}"))
        port = relay.port.getHost().port
        ctx = ssl.create_default_context(cafile=str(tmp_path / "state" / "ca.pem"))

        def open_one(i: int) -> ssl.SSLSocket:
            raw = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock = ctx.wrap_socket(raw, server_hostname=tunnel.host)
            sock.sendall(b"%d" % i)
            assert sock.recv(16) == b"%d" % i
            return sock

        for i in range(3):
            socks.append(await threads.deferToThread(open_one, i))
        public = list(relay.relay.public_connections)
        assert len(public) == 3
        for conn in public:
            assert_public_options(conn.transport)
        (link,) = relay.relay.links
        sock = socket_of(link.transport)
        assert sock is not None
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 0
        # Both ends of the link read 256 KiB at a time: the read size is the TCP
        # transport's, under the TLS layer (which would take the attribute and not use it).
        assert agent.link is not None
        for tls in (link.transport, agent.link.transport):
            tcp_transport = tls.transport  # type: ignore[union-attr]
            assert isinstance(tcp_transport, abstract.FileDescriptor)
            assert tcp_transport.bufferSize == SOCKET_READ
    finally:
        for sock in socks:
            sock.close()
        await agent.stop()
        await echo.stopListening()
