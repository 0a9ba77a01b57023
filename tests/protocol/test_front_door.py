"""
The TLS front's door: the bare-domain info page, the first-bytes (ClientHello) deadline, and
the pending-handshake slots, with eviction of the oldest silent connection when they are full.

The dispatcher runs on `MemoryReactorClock` with `StringTransport` (one per connection, with
its own peer address) or, for real TLS to the info page, joined to a TLS client by iosim.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
from OpenSSL import SSL
from twisted.internet import protocol
from twisted.internet.address import IPv4Address
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test import iosim

from tunnel.relay._certs import DevCertificates
from tunnel.relay._clienthello import ClientHello
from tunnel.relay._info import MAX_REQUEST, InfoPage, info_factory
from tunnel.relay._sni import Route, SNIDispatchFactory, _SNIDispatchProtocol
from tunnel.relay._tls import ALPN_HTTP1, RelayTLS

DOMAIN = "tunnel.localhost"
REQUEST = b"GET / HTTP/1.1\r\nHost: tunnel.localhost\r\n\r\n"

_ports = itertools.count(40000)


def client_hello(server_name: bytes = b"a.tunnel.localhost") -> bytes:
    """The first flight of a real TLS client (pyOpenSSL) for `server_name`."""
    conn = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
    conn.set_connect_state()
    conn.set_tlsext_host_name(server_name)
    try:
        conn.do_handshake()
    except SSL.WantReadError:
        pass
    return conn.bio_read(65536)


@dataclass
class Conn:
    """One accepted connection: the dispatcher's protocol and its in-memory transport."""

    proto: _SNIDispatchProtocol
    transport: StringTransport

    @property
    def aborted(self) -> bool:
        return bool(self.transport.disconnected)

    def send(self, data: bytes) -> None:
        self.proto.dataReceived(data)

    def lost(self) -> None:
        """What the reactor does after an abort: the connection is gone."""
        self.proto.connectionLost(Failure(Exception("closed")))


class Front:
    """A dispatcher on a memory clock: ``a.<domain>`` is a tunnel, ``<domain>`` the page."""

    def __init__(self, dev_certs: DevCertificates, **kwargs: float) -> None:
        self.clock = MemoryReactorClock()
        self.tls = RelayTLS(dev_certs.cert_path, dev_certs.key_path)
        self.tunnel = protocol.Factory.forProtocol(protocol.Protocol)
        self.info = info_factory()
        self.factory = SNIDispatchFactory(self.route, self.clock, **kwargs)  # type: ignore[arg-type]

    def route(self, hello: ClientHello) -> Route | None:
        if hello.server_name == DOMAIN:
            return Route(self.tls.context_for(ALPN_HTTP1), self.info, local=True)
        if hello.server_name == "a." + DOMAIN:
            return Route(self.tls.context_for(ALPN_HTTP1), self.tunnel)
        return None

    def connect(self, source: str = "127.0.0.2") -> Conn:
        peer = IPv4Address("TCP", source, next(_ports))
        proto = self.factory.buildProtocol(peer)
        assert isinstance(proto, _SNIDispatchProtocol)
        transport = StringTransport(peerAddress=peer)
        proto.makeConnection(transport)
        return Conn(proto, transport)


@pytest.fixture
def front(dev_certs: DevCertificates) -> Front:
    return Front(
        dev_certs,
        handshake_timeout=10.0,
        client_hello_timeout=3.0,
        max_pending_handshakes=64,
        max_pending_per_source=16,
    )


# ---------------------------------------------------------------------------------------------
# The info page on its own


def test_info_page_answers_one_request_and_closes() -> None:
    page = InfoPage()
    transport = StringTransport()
    page.makeConnection(transport)
    # The end of the head straddles two chunks.
    page.dataReceived(REQUEST[:-3])
    assert transport.value() == b""
    page.dataReceived(REQUEST[-3:] + b"GET /again HTTP/1.1\r\n\r\n")
    answer = transport.value()
    assert answer.startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert answer.count(b"HTTP/1.1 ") == 1
    assert b"Connection: close\r\n" in answer
    assert transport.disconnecting
    page.dataReceived(REQUEST)  # a second request gets nothing
    assert transport.value() == answer


def test_info_page_refuses_an_overlong_request() -> None:
    page = InfoPage()
    transport = StringTransport()
    page.makeConnection(transport)
    for _ in range(MAX_REQUEST // 100):
        page.dataReceived(b"x" * 100)
    assert transport.value() == b""
    page.dataReceived(b"x" * 100)
    assert transport.value().startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert transport.disconnecting


# ---------------------------------------------------------------------------------------------
# The info page behind the front, over real TLS


class Browser(protocol.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.lost = True


def settle(front: Front, pump: iosim.IOPump) -> None:
    """Move bytes both ways, running what is due now (TLS writes wait for the end of the
    reactor turn), without moving the clock on."""
    for _ in range(1000):
        moved = pump.pump(advanceClock=False)
        front.clock.advance(0)
        if not moved and not pump.pump(advanceClock=False):
            return
    raise AssertionError("traffic did not settle")


def tls_to_page(
    front: Front, dev_certs: DevCertificates, source: str = "127.0.0.2"
) -> tuple[Browser, _SNIDispatchProtocol, iosim.FakeTransport, iosim.IOPump]:
    """A TLS client for ``<domain>`` (ALPN http/1.1) joined to the front; handshake done."""
    with open(dev_certs.ca_path, "rb") as f:
        ca = Certificate.loadPEM(f.read())
    options = optionsForClientTLS(DOMAIN, trustRoot=ca, acceptableProtocols=[b"http/1.1"])
    browser = Browser()
    client = TLSMemoryBIOFactory(
        options, True, protocol.Factory.forProtocol(lambda: browser), clock=front.clock
    ).buildProtocol(None)
    peer = IPv4Address("TCP", source, next(_ports))
    server = front.factory.buildProtocol(peer)
    assert isinstance(server, _SNIDispatchProtocol)
    server_io = iosim.FakeTransport(server, isServer=True, peerAddress=peer)
    client_io = iosim.FakeTransport(client, isServer=False)
    pump = iosim.connect(server, server_io, client, client_io, greet=False)
    settle(front, pump)
    assert client.negotiatedProtocol == b"http/1.1"
    return browser, server, server_io, pump


def test_info_page_over_tls_answers_and_frees_its_slot(
    front: Front, dev_certs: DevCertificates
) -> None:
    browser, _, _, pump = tls_to_page(front, dev_certs)
    # Handshake done, no request yet: still counted against the pending limits.
    assert front.factory.pending == 1
    assert front.factory._pending_by_source == {"127.0.0.2": 1}
    assert browser.transport is not None
    browser.transport.write(REQUEST)
    settle(front, pump)
    assert browser.data.startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert browser.lost
    assert front.factory.pending == 0 and front.factory._pending_by_source == {}
    assert front.clock.getDelayedCalls() == []


def test_info_connection_that_sends_nothing_is_closed_at_the_deadline(
    front: Front, dev_certs: DevCertificates
) -> None:
    browser, _, server_io, pump = tls_to_page(front, dev_certs)
    front.clock.advance(9.9)
    settle(front, pump)
    assert not server_io.disconnecting and not browser.lost
    front.clock.advance(0.1)  # 10 s after accept: the handshake timeout
    assert server_io.disconnecting
    settle(front, pump)
    assert browser.lost
    assert front.factory.pending == 0


def test_info_connections_count_against_the_global_limit(dev_certs: DevCertificates) -> None:
    front = Front(dev_certs, max_pending_handshakes=2, max_pending_per_source=16)
    for source in ("127.0.0.2", "127.0.0.3"):
        tls_to_page(front, dev_certs, source)
    assert front.factory.pending == 2
    # Both slots are held by info connections, which are never evicted: a newcomer is refused.
    late = front.connect("127.0.0.4")
    assert late.aborted
    assert front.factory.refused_overload == 1 and front.factory.evicted_silent == 0


def test_info_connections_count_against_the_per_source_limit(dev_certs: DevCertificates) -> None:
    front = Front(dev_certs, max_pending_handshakes=64, max_pending_per_source=2)
    tls_to_page(front, dev_certs, "127.0.0.2")
    tls_to_page(front, dev_certs, "127.0.0.2")
    late = front.connect("127.0.0.2")
    assert late.aborted
    assert front.factory.refused_source_overload == 1
    other = front.connect("127.0.0.3")
    assert not other.aborted


# ---------------------------------------------------------------------------------------------
# The first-bytes deadline


def test_silent_and_half_hello_connections_end_at_the_client_hello_deadline(
    front: Front,
) -> None:
    silent = front.connect()
    half = front.connect()
    half.send(client_hello()[:60])
    whole = front.connect()
    whole.send(client_hello())  # the handshake then stalls: the 10 s deadline applies
    front.clock.advance(2.9)
    assert not (silent.aborted or half.aborted or whole.aborted)
    front.clock.advance(0.1)
    assert silent.aborted and half.aborted and not whole.aborted
    assert half.transport.value() == b""  # aborted without a reply
    assert front.factory.pending == 1
    front.clock.advance(6.9)
    assert not whole.aborted
    front.clock.advance(0.1)
    assert whole.aborted
    assert front.factory.pending == 0 and front.factory._pending_by_source == {}


def test_client_hello_deadline_is_never_beyond_the_handshake_timeout(
    dev_certs: DevCertificates,
) -> None:
    front = Front(dev_certs, handshake_timeout=2.0, client_hello_timeout=5.0)
    assert front.factory.client_hello_timeout == 2.0
    silent = front.connect()
    front.clock.advance(2.0)
    assert silent.aborted


def test_timeouts_must_be_positive() -> None:
    with pytest.raises(ValueError):
        SNIDispatchFactory(lambda hello: None, MemoryReactorClock(), client_hello_timeout=0)


# ---------------------------------------------------------------------------------------------
# Eviction of the oldest silent connection when the slots are full


def test_full_slots_evict_the_oldest_silent_connection(dev_certs: DevCertificates) -> None:
    front = Front(dev_certs, max_pending_handshakes=3, max_pending_per_source=16)
    spoke = front.connect("127.0.0.2")
    spoke.send(client_hello())  # oldest, but it sent its ClientHello: never evicted
    silent_old = front.connect("127.0.0.3")
    silent_new = front.connect("127.0.0.4")
    front.clock.advance(1.0)
    newcomer = front.connect("127.0.0.5")
    assert silent_old.aborted
    assert not (spoke.aborted or silent_new.aborted or newcomer.aborted)
    assert front.factory.evicted_silent == 1 and front.factory.refused_overload == 0
    assert front.factory.pending == 3
    silent_old.lost()  # the reactor's later connectionLost changes no count
    assert front.factory.pending == 3
    front.clock.advance(1.9)
    assert not (spoke.aborted or silent_new.aborted or newcomer.aborted)
    # With no silent connection left, a newcomer is refused as before.
    silent_new.send(client_hello())
    newcomer.send(client_hello())
    refused = front.connect("127.0.0.6")
    assert refused.aborted
    assert front.factory.refused_overload == 1 and front.factory.evicted_silent == 1
    assert not (spoke.aborted or silent_new.aborted or newcomer.aborted)


def test_full_source_evicts_its_own_oldest_silent_connection(dev_certs: DevCertificates) -> None:
    front = Front(dev_certs, max_pending_handshakes=64, max_pending_per_source=2)
    a1 = front.connect("127.0.0.2")
    b1 = front.connect("127.0.0.3")  # older than a2, but another source's
    a2 = front.connect("127.0.0.2")
    a3 = front.connect("127.0.0.2")
    assert a1.aborted and not (b1.aborted or a2.aborted or a3.aborted)
    assert front.factory.evicted_silent == 1
    assert front.factory._pending_by_source == {"127.0.0.2": 2, "127.0.0.3": 1}
    # A source whose pending connections all sent their ClientHello is refused.
    a2.send(client_hello())
    a3.send(client_hello())
    a4 = front.connect("127.0.0.2")
    assert a4.aborted and not (a2.aborted or a3.aborted or b1.aborted)
    assert front.factory.refused_source_overload == front.factory.refused_overload == 1
    assert front.factory.evicted_silent == 1


def test_a_connection_that_closed_is_no_eviction_candidate(dev_certs: DevCertificates) -> None:
    front = Front(dev_certs, max_pending_handshakes=2, max_pending_per_source=16)
    gone = front.connect("127.0.0.2")
    gone.transport.loseConnection()
    gone.lost()
    kept = front.connect("127.0.0.3")
    also = front.connect("127.0.0.4")
    assert front.factory.evicted_silent == 0
    assert not (kept.aborted or also.aborted)
    assert len(front.factory._silent) == 2
    kept.lost()
    also.lost()
    assert front.factory._silent == {} and front.factory._silent_by_source == {}
    assert front.factory.pending == 0 and front.clock.getDelayedCalls() == []
