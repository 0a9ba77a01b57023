"""
How `FastTLSProtocol` (the relay's public TLS layer) reports a peer's end to the protocol it
wraps, on the relay's own server context (which ignores an EOF without close_notify): a
close_notify is a clean end even when the TCP connection resets afterwards, as it does when
a client closes its socket right after its close_notify and our close_notify reaches a
closed socket; a FIN without close_notify is a clean end; a reset without close_notify is a
loss.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from OpenSSL import SSL
from twisted.internet import error, protocol
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer

from tunnel._fasttls import FastTLSFactory
from tunnel.relay._certs import DevCertificates
from tunnel.relay._tls import server_context


class _Ends(protocol.Protocol):
    """Records what it received and why its connection ended."""

    def __init__(self) -> None:
        self.received = b""
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.reason = reason


def _pair(dev_certs: DevCertificates) -> tuple[Any, _Ends, Any, _Ends, iosim.IOPump]:
    """A relay-side FastTLSProtocol and a client TLS layer, connected in memory, after the
    handshake and one byte each way."""
    chain = x509.load_pem_x509_certificates(Path(dev_certs.cert_path).read_bytes())
    key = load_pem_private_key(Path(dev_certs.key_path).read_bytes(), None)
    server_ctx = server_context(chain, key)
    # set_options returns the options the context holds.
    assert server_ctx.set_options(0) & getattr(SSL, "OP_IGNORE_UNEXPECTED_EOF", 0)
    client_ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)

    @implementer(IOpenSSLServerConnectionCreator, IOpenSSLClientConnectionCreator)
    class _Creator:
        def serverConnectionForTLS(self, tls: Any) -> SSL.Connection:
            return SSL.Connection(server_ctx, None)

        def clientConnectionForTLS(self, tls: Any) -> SSL.Connection:
            conn = SSL.Connection(client_ctx, None)
            conn.set_tlsext_host_name(b"x.tunnel.localhost")
            conn.set_connect_state()
            return conn

    server_app, client_app = _Ends(), _Ends()
    server_factory = FastTLSFactory(_Creator(), False, protocol.Factory.forProtocol(_Ends))
    # The client's layer writes at once too (Twisted's own would wait for a reactor turn).
    client_factory = FastTLSFactory(_Creator(), True, protocol.Factory.forProtocol(_Ends))
    server = server_factory.protocol(server_factory, server_app)
    client = client_factory.protocol(client_factory, client_app)
    server_transport = iosim.FakeTransport(server, isServer=True)
    client_transport = iosim.FakeTransport(client, isServer=False)
    pump = iosim.connect(server, server_transport, client, client_transport, greet=True)
    client.write(b"c")
    server.write(b"s")
    pump.flush()
    assert server_app.received == b"c" and client_app.received == b"s"
    return server, server_app, client, client_app, pump


def _tcp_ends(tls: Any, reason: Failure) -> None:
    """The TCP transport under `tls` ends for `reason` (what the reactor would report)."""
    tls.transport.disconnecting = True
    tls.connectionLost(reason)


def test_a_close_notify_then_a_reset_is_a_clean_end(dev_certs: DevCertificates) -> None:
    server, server_app, client, _client_app, pump = _pair(dev_certs)
    client._shutdownTLS()  # the client's close_notify, and its socket closes next
    pump.pump()  # the close_notify reaches the relay, which answers with its own
    # That close_notify reached a closed socket: the TCP connection resets.
    _tcp_ends(server, Failure(error.ConnectionLost("Connection reset by peer")))
    assert server_app.reason is not None
    assert server_app.reason.check(error.ConnectionDone), server_app.reason


def test_a_fin_without_close_notify_is_a_clean_end(dev_certs: DevCertificates) -> None:
    server, server_app, *_ = _pair(dev_certs)
    _tcp_ends(server, Failure(error.ConnectionDone()))
    assert server_app.reason is not None
    assert server_app.reason.check(error.ConnectionDone), server_app.reason


def test_a_reset_without_close_notify_is_a_loss(dev_certs: DevCertificates) -> None:
    server, server_app, *_ = _pair(dev_certs)
    _tcp_ends(server, Failure(error.ConnectionLost("Connection reset by peer")))
    assert server_app.reason is not None
    assert server_app.reason.check(error.ConnectionLost), server_app.reason
