"""
TLS passthrough between a real agent and relay in this process, over loopback: the relay
routes by SNI without terminating, the local server's TLS (with a certificate the relay's
development CA issued through `Tunnel.issue_certificate`) is what the client sees, the
ClientHello arrives untouched (after a PROXY header when asked), and deny lists still
refuse before anything reaches the agent.
"""

from __future__ import annotations

import ssl as stdlib_ssl
from pathlib import Path

import pytest
import pytest_twisted
from cryptography import x509
from OpenSSL import crypto
from twisted.internet import protocol, ssl
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS

from tests.protocol.inprocess import Echo, Recorder, agent_for, connect, get_reactor, wait_until
from tunnel import make_csr
from tunnel.agent.session import ForwardSpec
from tunnel.errors import TunnelClosedError, TunnelRefused
from tunnel.relay.service import RelayService


def client_hello(host: str) -> bytes:
    """The first flight of a TLS client for `host`, as bytes."""
    incoming, outgoing = stdlib_ssl.MemoryBIO(), stdlib_ssl.MemoryBIO()
    context = stdlib_ssl.create_default_context()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=host)
    with pytest.raises(stdlib_ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def tls_server_options(key_pem: str, chain_pem: str) -> ssl.CertificateOptions:
    certs = x509.load_pem_x509_certificates(chain_pem.encode())
    leaf, *rest = (crypto.X509.from_cryptography(c) for c in certs)
    key = crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem.encode())
    return ssl.CertificateOptions(privateKey=key, certificate=leaf, extraCertChain=rest)


@pytest_twisted.ensureDeferred
async def test_the_client_sees_the_local_servers_certificate(
    relay: RelayService, tmp_path: Path
) -> None:
    reactor = get_reactor()
    state = tmp_path / "state"
    agent = agent_for(relay, state)
    server = None
    try:
        # The port is known before the server listens: a placeholder until then.
        placeholder = reactor.listenTCP(
            0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1"
        )
        port = placeholder.getHost().port
        await placeholder.stopListening()
        tunnel = await agent.forward(ForwardSpec(port, passthrough=True))
        key_pem, csr_pem = make_csr(tunnel.host)
        chain = await tunnel.issue_certificate(csr_pem)
        leaf = x509.load_pem_x509_certificate(chain.encode())
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [tunnel.host]
        server = reactor.listenSSL(
            port,
            protocol.Factory.forProtocol(Echo),
            tls_server_options(key_pem, chain),
            interface="127.0.0.1",
        )

        ca = ssl.Certificate.loadPEM((state / "ca.pem").read_bytes())
        endpoint = wrapClientTLS(
            ssl.optionsForClientTLS(tunnel.host, trustRoot=ca),
            TCP4ClientEndpoint(reactor, "127.0.0.1", relay.port.getHost().port),
        )
        client = Recorder()
        await connectProtocol(endpoint, client)
        assert client.transport is not None
        client.transport.write(b"through\n")
        await wait_until(lambda: client.received == b"through\n", "the echo")
        seen = client.transport.getPeerCertificate().to_cryptography()
        assert seen == leaf  # the local server's, not the relay's wildcard
        assert seen != relay.relay.tls.certificate
        client.transport.loseConnection()

        # A CSR for another name, and one for a tunnel that is not passthrough, are refused.
        with pytest.raises(TunnelRefused, match="common name must be"):
            await tunnel.issue_certificate(make_csr("evil.tunnel.localhost")[1])
        plain = await agent.forward(ForwardSpec(port + 1 if port < 65535 else 1))
        with pytest.raises(ValueError, match="passthrough tunnels only"):
            plain.issue_certificate(make_csr(plain.host)[1])
        # Once closed, a tunnel gets no certificate: the error says it is closed.
        await tunnel.close()
        with pytest.raises(TunnelClosedError, match="closed"):
            await tunnel.issue_certificate(csr_pem)
    finally:
        await agent.stop()
        if server is not None:
            await server.stopListening()


@pytest_twisted.ensureDeferred
async def test_the_client_hello_arrives_untouched_after_a_proxy_header_and_deny_refuses(
    relay: RelayService, tmp_path: Path
) -> None:
    reactor = get_reactor()
    received: list[Recorder] = []

    def record() -> Recorder:
        r = Recorder()
        received.append(r)
        return r

    target = reactor.listenTCP(0, protocol.Factory.forProtocol(record), interface="127.0.0.1")
    target2 = reactor.listenTCP(0, protocol.Factory.forProtocol(record), interface="127.0.0.1")
    agent = agent_for(relay, tmp_path / "state")
    try:
        tunnel = await agent.forward(
            ForwardSpec(target.getHost().port, passthrough=True, proxy_protocol=1)
        )
        hello = client_hello(tunnel.host)
        client = await connect(relay.port.getHost().port)
        assert client.transport is not None
        client.transport.write(hello)
        await wait_until(lambda: received and received[0].received.endswith(hello), "the hello")
        header, rest = received[0].received.split(b"\r\n", 1)
        assert header.startswith(b"PROXY TCP4 127.0.0.1 127.0.0.1 ")
        assert rest == hello
        client.transport.loseConnection()

        denied = await agent.forward(
            ForwardSpec(target2.getHost().port, passthrough=True, deny=("127.0.0.0/8",))
        )
        before = relay.relay.denied_connections
        client = await connect(relay.port.getHost().port)
        assert client.transport is not None
        client.transport.write(client_hello(denied.host))
        await client.lost
        # A fatal access_denied alert (level 2, description 49), and nothing to the agent.
        assert client.received == b"\x15\x03\x03\x00\x02\x02\x31"
        assert relay.relay.denied_connections == before + 1
        assert len(received) == 1
    finally:
        await agent.stop()
        await target.stopListening()
        await target2.stopListening()
