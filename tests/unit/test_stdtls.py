"""
The agent's link TLS on `ssl.SSLObject` (`tunnel.agent._stdtls`), against the relay's TLS
server layer (`tunnel._fasttls`, pyOpenSSL) in memory (`twisted.test.iosim`): verification,
ALPN, octets held until the handshake, and how each kind of end is reported.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from twisted.internet import error
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions, PrivateCertificate
from twisted.python.failure import Failure
from twisted.test import iosim

from tests.servercerts import TestCA, key_pem
from tunnel._fasttls import FastTLSFactory
from tunnel.agent._stdtls import StdTLSFactory, eof_error
from tunnel.agent._tlscontext import client_context
from tunnel.wire import LINK_ALPN

HOST = "relay.test"


class Recorder(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.lost: Failure | None = None
        self.made = False

    def connectionMade(self) -> None:
        self.made = True

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = error.ConnectionDone) -> None:  # type: ignore[assignment]
        self.lost = reason


class Echo(Recorder):
    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        assert self.transport is not None
        self.transport.write(data)


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA()


@pytest.fixture
def ca_file(ca: TestCA, tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    path.write_bytes(ca.pem())
    return path


def _server(ca: TestCA) -> FastTLSFactory:
    cert, key = ca.leaf([HOST])
    private = PrivateCertificate.loadPEM(
        (cert.public_bytes(serialization.Encoding.PEM) + key_pem(key)).decode()
    )
    options = CertificateOptions(
        privateKey=private.privateKey.original,
        certificate=private.original,
        acceptableProtocols=[LINK_ALPN],
    )
    # The relay's layer: it writes at once (Twisted's own waits for a reactor turn).
    return FastTLSFactory(options, False, Factory.forProtocol(Echo))


def _pair(ca: TestCA, ca_file: Path | None, host: str = HOST) -> tuple[Any, Any, Any]:
    """(client TLS protocol, server TLS protocol, pump), connected, the handshake not run."""
    context = client_context(str(ca_file) if ca_file else None)
    client = StdTLSFactory(context, host, Factory.forProtocol(Recorder)).buildProtocol(None)
    server = _server(ca).buildProtocol(None)
    pump = iosim.connect(
        server,
        iosim.FakeTransport(server, isServer=True),
        client,
        iosim.FakeTransport(client, isServer=False),
        greet=False,
    )
    return client, server, pump


def test_octets_written_before_the_handshake_arrive_and_are_echoed(
    ca: TestCA, ca_file: Path
) -> None:
    client, server, pump = _pair(ca, ca_file)
    app: Recorder = client.wrappedProtocol
    assert app.made  # connected at once, as Twisted's TLS connects its wrapped protocol
    app.transport.write(b"hello, ")  # type: ignore[union-attr]
    app.transport.writeSequence([b"relay"])  # type: ignore[union-attr]
    pump.flush()
    assert server.wrappedProtocol.data == b"hello, relay"
    assert app.data == b"hello, relay"
    assert client._tls.selected_alpn_protocol() == LINK_ALPN.decode()
    big = bytes(range(256)) * 4096  # 1 MiB: many records each way
    app.transport.write(big)  # type: ignore[union-attr]
    pump.flush()
    assert app.data == b"hello, relay" + big


def test_lose_connection_exchanges_close_notify_and_is_clean(ca: TestCA, ca_file: Path) -> None:
    client, server, pump = _pair(ca, ca_file)
    pump.flush()
    app: Recorder = client.wrappedProtocol
    peer: Echo = server.wrappedProtocol
    app.transport.write(b"last words")  # type: ignore[union-attr]
    app.transport.loseConnection()  # type: ignore[union-attr]
    app.transport.write(b"ignored after the close")  # type: ignore[union-attr]
    pump.flush()
    assert peer.data == b"last words"
    assert app.lost is not None and app.lost.check(error.ConnectionDone), app.lost
    assert peer.lost is not None and peer.lost.check(error.ConnectionDone), peer.lost


def test_the_relays_close_notify_is_answered_and_clean(ca: TestCA, ca_file: Path) -> None:
    client, server, pump = _pair(ca, ca_file)
    pump.flush()
    app: Recorder = client.wrappedProtocol
    peer: Echo = server.wrappedProtocol
    assert peer.transport is not None
    peer.transport.loseConnection()
    pump.flush()
    assert app.lost is not None and app.lost.check(error.ConnectionDone), app.lost
    assert peer.lost is not None and peer.lost.check(error.ConnectionDone), peer.lost


def test_a_tcp_close_without_close_notify_is_an_eof_error(ca: TestCA, ca_file: Path) -> None:
    client, _server_protocol, pump = _pair(ca, ca_file)
    pump.flush()
    app: Recorder = client.wrappedProtocol
    client.connectionLost(Failure(error.ConnectionDone()))
    assert app.lost is not None and app.lost.check(ssl.SSLEOFError), app.lost


@pytest.mark.parametrize("case", ["other CA", "other name"])
def test_verification_failures_end_the_connection_with_the_ssl_error(
    ca: TestCA, tmp_path: Path, ca_file: Path, case: str
) -> None:
    if case == "other CA":
        other = tmp_path / "other.pem"
        other.write_bytes(TestCA("another CA").pem())
        client, server, pump = _pair(ca, other)
    else:
        client, server, pump = _pair(ca, ca_file, host="elsewhere.test")
    app: Recorder = client.wrappedProtocol
    peer: Echo = server.wrappedProtocol
    app.transport.write(b"never sent")  # type: ignore[union-attr]
    pump.flush()
    assert app.lost is not None and app.lost.check(ssl.SSLCertVerificationError), app.lost
    assert "certificate verify failed" in str(app.lost.value)
    assert peer.data == b""


def test_abort_drops_at_once(ca: TestCA, ca_file: Path) -> None:
    client, server, pump = _pair(ca, ca_file)
    pump.flush()
    app: Recorder = client.wrappedProtocol
    peer: Echo = server.wrappedProtocol
    app.transport.abortConnection()  # type: ignore[union-attr]
    app.transport.write(b"ignored")  # type: ignore[union-attr]
    assert client.transport.disconnecting  # the TCP connection is dropped, nothing sent
    pump.flush()
    assert app.lost is not None
    assert peer.data == b""
    # No close_notify went: the relay sees the TCP connection lost, not a TLS close.
    assert peer.lost is not None and not peer.lost.check(error.ConnectionDone), peer.lost


def test_a_ca_file_without_a_certificate_is_a_value_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pem"
    empty.write_text("not a certificate\n")
    with pytest.raises(ValueError, match="holds no PEM certificate"):
        client_context(str(empty))


def test_the_link_context_reports_a_missing_close_notify() -> None:
    # Some CPython 3.11 releases set the option on every new context: a truncated link
    # would then read as a clean close.
    assert not client_context(None).options & ssl.OP_IGNORE_UNEXPECTED_EOF


def test_openssls_unexpected_eof_is_an_eof_error_whatever_the_python() -> None:
    plain = ssl.SSLError(1, "[SSL: UNEXPECTED_EOF_WHILE_READING] unexpected eof while reading")
    plain.reason = "UNEXPECTED_EOF_WHILE_READING"
    mapped = eof_error(plain)
    assert isinstance(mapped, ssl.SSLEOFError) and mapped.args == plain.args
    other = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    other.reason = "WRONG_VERSION_NUMBER"
    assert eof_error(other) is other
    bare = ssl.SSLError(1, "made in Python: no reason attribute")
    assert eof_error(bare) is bare
    already = ssl.SSLEOFError(8, "EOF occurred in violation of protocol")
    assert eof_error(already) is already


def test_the_data_path_is_the_objects_own_or_the_object() -> None:
    """`_data_path`: CPython's inner object when it has the three methods the SSLObject's
    forward to, else the SSLObject itself."""
    import ssl as _ssl

    from tunnel.agent._stdtls import _data_path

    context = _ssl.SSLContext(_ssl.PROTOCOL_TLS_CLIENT)
    tls = context.wrap_bio(_ssl.MemoryBIO(), _ssl.MemoryBIO(), server_hostname="example.test")
    inner = _data_path(tls)
    assert inner is getattr(tls, "_sslobj", tls)
    assert inner.pending() == tls.pending() == 0

    class _Bare:
        def read(self, n: int) -> bytes:
            return b""

    assert type(_data_path(_Bare())) is _Bare  # type: ignore[arg-type]
