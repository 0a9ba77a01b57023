"""TLS passthrough without I/O: the option (a kind of its own, with the exclusions of the
table), certificates for passthrough tunnels (the CSR check, the development CA's issuer),
and the certificate request in the relay's and the agent's control cores."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet.task import Clock

from tests.unit.test_agent_control import core, grant, welcomed
from tests.unit.test_agent_control import sent as agent_sent
from tests.unit.test_relay_control import Link, ask, hello, make_relay, sent
from tunnel import make_csr
from tunnel.agent import _control as c
from tunnel.agent.settings import ForwardSpec, parse_forward
from tunnel.errors import RelayUnavailable, TunnelRefused
from tunnel.relay._certs import ensure_dev_certificates
from tunnel.relay._issuer import DevCAIssuer, IssueCertificate, check_csr
from tunnel.wire.codes import RefusalCode
from tunnel.wire.control import (
    AgentHello,
    CertificateIssued,
    CertificateRefused,
    CertificateRequest,
    TunnelGranted,
    TunnelRequest,
)
from tunnel.wire.control import (
    TunnelRefused as Refused,
)
from tunnel.wire.options import (
    check_values,
    missing_features,
    parse_request_options,
    request_options,
)

HOST = "abc.tunnel.localhost"

# -- the option ---------------------------------------------------------------------------------


def test_passthrough_is_a_kind_of_its_own() -> None:
    values = check_values({"passthrough": True, "proxy_protocol": 2, "allow": ["10.0.0.0/8"]})
    assert request_options(values) == ("passthrough", {"allow": ["10.0.0.0/8"]})
    assert parse_forward("8443:passthrough").passthrough
    assert parse_forward("8443:passthrough:proxy1:rate=1MB").proxy_protocol == 1


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"passthrough": True, "unencrypted": True}, "not with unencrypted"),
        ({"passthrough": True, "h2": True}, "h2 applies to TLS tunnels only"),
        ({"passthrough": True, "client_ca": "PEM"}, "the local server checks them"),
    ],
)
def test_what_needs_the_relay_to_terminate_is_refused(
    values: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        check_values(values)


def test_suffixes_of_the_kind_group_exclude_each_other() -> None:
    with pytest.raises(ValueError, match="tcp and passthrough together"):
        parse_forward("8443:tcp:passthrough")
    with pytest.raises(ValueError, match="h2 and passthrough together"):
        parse_forward("8443:h2:passthrough")


def test_the_relay_refuses_what_needs_termination_on_a_passthrough_tunnel() -> None:
    with pytest.raises(ValueError, match="h2 applies"):
        parse_request_options("passthrough", {"h2": True})
    with pytest.raises(ValueError, match="the local server checks them"):
        parse_request_options("passthrough", {"client_ca": "x"})
    assert parse_request_options("passthrough", {"deny": ["::1"], "rate_limit": 5000})


def test_an_agent_asks_for_passthrough_only_of_a_relay_that_knows_it() -> None:
    assert missing_features({}, [], "passthrough") == ["TLS passthrough"]
    assert missing_features({}, ["passthrough"], "passthrough") == []
    assert missing_features({}, [], "tls") == []
    agent = core()
    record = c.ForwardRecord(ForwardSpec(8443, passthrough=True))
    agent.forward(record, now=0.0)
    effects = welcomed(agent, ("allow",))
    assert agent_sent(effects) == []
    failed = [e for e in effects if isinstance(e, c.Failed)]
    assert failed and "does not support TLS passthrough" in str(failed[0].error)


def test_a_passthrough_tunnel_is_granted_without_a_tcp_port() -> None:
    relay = make_relay()
    link = hello(relay)
    answer = ask(link, TunnelRequest(1, "passthrough", {"allow": ["127.0.0.0/8"]}))
    assert isinstance(answer, TunnelGranted) and answer.tcp_port is None
    record = relay.registry.get(answer.tunnel_id)
    assert record is not None and record.kind == "passthrough" and record.allow is not None
    refused = ask(link, TunnelRequest(2, "passthrough", {"h2": True}))
    assert isinstance(refused, Refused) and refused.code == RefusalCode.BAD_REQUEST


# -- CSRs ----------------------------------------------------------------------------------------


def csr_for(*names: str, cn: str | None = None, key: object = None) -> str:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else [])
    )
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
        )
    csr = builder.sign(key, hashes.SHA256())  # type: ignore[arg-type]
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def test_make_csr_makes_a_csr_the_relay_accepts() -> None:
    key_pem, csr_pem = make_csr(HOST)
    assert "PRIVATE KEY" in key_pem
    csr = check_csr(csr_pem, HOST)
    key = serialization.load_pem_private_key(key_pem.encode(), None)
    assert csr.public_key() == key.public_key()


@pytest.mark.parametrize(
    ("csr", "message"),
    [
        (lambda: "-----BEGIN CERTIFICATE REQUEST-----\nnope\n", "not a PEM"),
        (lambda: csr_for(cn=HOST), "no subject alternative name"),
        (lambda: csr_for("other.tunnel.localhost"), "must name abc.tunnel.localhost"),
        (lambda: csr_for(HOST, "*.tunnel.localhost"), "and nothing else"),
        (lambda: csr_for(HOST, cn="tunnel.localhost"), "common name must be"),
        (
            lambda: csr_for(HOST, key=ec.generate_private_key(ec.SECP256K1())),
            "use P-256 or P-384",
        ),
        (
            lambda: csr_for(HOST, key=rsa.generate_private_key(65537, 1024)),
            "use 2048 to 8192",
        ),
    ],
)
def test_bad_csrs_say_why(csr: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_csr(csr(), HOST)  # type: ignore[operator]


def test_the_development_ca_signs_for_the_name_only(tmp_path: object) -> None:
    ensure_dev_certificates(str(tmp_path), "tunnel.localhost")
    issuer = DevCAIssuer.from_state_dir(str(tmp_path))
    _, csr_pem = make_csr(HOST)
    chain = x509.load_pem_x509_certificates(issuer.issue(check_csr(csr_pem, HOST), HOST).encode())
    leaf, ca = chain
    assert ca == issuer.ca_cert
    leaf.verify_directly_issued_by(ca)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [HOST]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert lifetime <= datetime.timedelta(days=91)


# -- the relay's control core ---------------------------------------------------------------------


class FakeIssuer:
    def issue(self, csr: x509.CertificateSigningRequest, host: str) -> str:
        return "-----BEGIN CERTIFICATE-----\n"


def test_certificate_requests_in_the_relay_core() -> None:
    relay = make_relay()
    link = hello(relay)
    tls = ask(link, TunnelRequest(1, "tls"))
    passthrough = ask(link, TunnelRequest(2, "passthrough"))
    host = passthrough.host
    _, csr = make_csr(host)

    def answer(request: CertificateRequest) -> list[object]:
        return link.session.received(request)  # type: ignore[return-value]

    (refused,) = sent(answer(CertificateRequest(3, passthrough.tunnel_id, csr)))
    assert isinstance(refused, CertificateRefused) and refused.code == RefusalCode.NO_ISSUER
    relay.issuer = FakeIssuer()
    (refused,) = sent(answer(CertificateRequest(4, tls.tunnel_id, make_csr(tls.host)[1])))
    assert refused.code == RefusalCode.NOT_HELD
    other = hello(relay, "token-b")
    effects = other.session.received(CertificateRequest(5, passthrough.tunnel_id, csr))
    assert sent(effects)[0].code == RefusalCode.NOT_HELD  # another link's tunnel
    (refused,) = sent(answer(CertificateRequest(6, passthrough.tunnel_id, make_csr("x.y")[1])))
    assert refused.code == RefusalCode.BAD_REQUEST and host in refused.message
    effects = answer(CertificateRequest(7, passthrough.tunnel_id, csr))
    (issue,) = [e for e in effects if isinstance(e, IssueCertificate)]
    assert issue.request_id == 7 and issue.host == host


def test_the_feature_is_announced_with_an_issuer_and_requests_before_hello_end_the_link() -> None:
    relay = make_relay()
    (welcome,) = sent(Link(relay).session.received(AgentHello(1, "token-a", "t")))
    assert "certificates" not in welcome.features and "passthrough" in welcome.features
    relay.issuer = FakeIssuer()
    (welcome,) = sent(Link(relay).session.received(AgentHello(1, "token-a", "t")))
    assert "certificates" in welcome.features
    effects = Link(relay).session.received(CertificateRequest(1, "abc", make_csr(HOST)[1]))
    assert sent(effects)[0].code == "unauthorized"


def test_certificate_requests_count_against_the_request_rate() -> None:
    relay = make_relay(tunnel_request_rate=1.0, tunnel_request_burst=2)
    relay.issuer = FakeIssuer()
    link = hello(relay)
    granted = ask(link, TunnelRequest(1, "passthrough"))
    _, csr = make_csr(granted.host)
    answers = [
        sent(link.session.received(CertificateRequest(n, granted.tunnel_id, csr))) for n in (2, 3)
    ]
    assert answers[0] == []  # issued (an effect, no message yet)
    assert answers[1][0].code == RefusalCode.LIMIT


# -- the agent's control core ---------------------------------------------------------------------


def passthrough_agent(features: tuple[str, ...]) -> tuple[c.AgentControl, c.ForwardRecord]:
    agent = core()
    record = c.ForwardRecord(ForwardSpec(8443, passthrough=True))
    agent.forward(record, now=0.0)
    (request,) = agent_sent(welcomed(agent, features))
    assert isinstance(request, TunnelRequest) and request.kind == "passthrough"
    agent.received(grant(request))
    return agent, record


def test_the_agent_asks_and_hands_the_answer_to_its_waiter() -> None:
    agent, record = passthrough_agent(("passthrough", "certificates"))
    _, csr = make_csr("abc.d")
    (request,) = agent_sent(agent.issue_certificate(record, csr, "w1"))
    assert isinstance(request, CertificateRequest) and request.tunnel_id == "abc"
    effects = agent.received(CertificateIssued(request.request_id, "-----BEGIN CERTIFICATE-----"))
    assert effects == [c.CertificateAnswered("w1", "-----BEGIN CERTIFICATE-----")]
    (again,) = agent_sent(agent.issue_certificate(record, csr, "w2"))
    (answer,) = agent.received(CertificateRefused(again.request_id, "bad_request", "no"))
    assert isinstance(answer, c.CertificateAnswered) and isinstance(answer.error, TunnelRefused)
    assert agent.received(CertificateIssued(99, "-----BEGIN CERTIFICATE-----")) == []
    agent_sent(agent.issue_certificate(record, csr, "w3"))
    (lost,) = [e for e in agent.link_lost("gone") if isinstance(e, c.CertificateAnswered)]
    assert lost.waiter == "w3" and isinstance(lost.error, RelayUnavailable)


def test_the_agent_does_not_ask_what_cannot_be_answered() -> None:
    agent, record = passthrough_agent(("passthrough",))
    (answer,) = agent.issue_certificate(record, make_csr("abc.d")[1], "w")
    assert isinstance(answer, c.CertificateAnswered) and isinstance(answer.error, TunnelRefused)
    with pytest.raises(ValueError, match="not PEM"):
        agent.issue_certificate(record, "garbage", "w")
    plain = c.ForwardRecord(ForwardSpec(8000))
    with pytest.raises(ValueError, match="passthrough tunnels only"):
        agent.issue_certificate(plain, make_csr("abc.d")[1], "w")


# -- the SNI front's hand-off ------------------------------------------------------------------


def test_a_passthrough_route_gets_the_connection_and_the_buffered_hello() -> None:
    from twisted.internet import protocol
    from twisted.internet.testing import StringTransport

    from tests.protocol.test_passthrough import client_hello
    from tunnel.relay._sni import Route, SNIDispatchFactory

    class Inner(protocol.Protocol):
        def __init__(self) -> None:
            self.data = b""
            self.made = False

        def connectionMade(self) -> None:
            self.made = True

        def dataReceived(self, data: bytes) -> None:
            self.data += data

    inner = Inner()
    factory = protocol.Factory.forProtocol(lambda: inner)
    clock = Clock()
    front = SNIDispatchFactory(lambda hello: Route(None, factory, passthrough=True), clock)
    conn = front.buildProtocol(None)
    transport = StringTransport()
    conn.makeConnection(transport)
    assert front.pending == 1
    hello = client_hello(HOST)
    conn.dataReceived(hello[:10])
    assert not inner.made
    conn.dataReceived(hello[10:])
    assert inner.made and inner.data == hello and transport.value() == b""
    # No longer a pending handshake of the relay's, and no deadline.
    assert front.pending == 0 and not clock.getDelayedCalls()
    conn.dataReceived(b"more")  # StringTransport has no protocol to swap: forwarded
    assert inner.data == hello + b"more"


def test_acme_issuer_reuses_a_fresh_chain_and_bounds_its_orders(tmp_path: object) -> None:
    """
    With ACME the CA's rate limits matter: a chain issued for the same host and key is handed
    out again while two thirds of its validity remain, and at most `max_orders` orders run at
    once; a failed order frees its place.
    """
    from pathlib import Path

    from twisted.internet import defer

    from tunnel.relay._acme import AcmeCSRIssuer

    state = str(Path(str(tmp_path)) / "ca")
    ensure_dev_certificates(state, "tunnel.localhost")
    dev = DevCAIssuer.from_state_dir(state)
    host = "abc.tunnel.localhost"
    key = ec.generate_private_key(ec.SECP256R1())
    csr = check_csr(csr_for(host, key=key), host)
    other = check_csr(csr_for(host), host)
    orders: list[tuple[defer.Deferred[str], list[str]]] = []

    def order(pem: bytes, names: list[str]) -> defer.Deferred[str]:
        assert x509.load_pem_x509_csr(pem).public_key() is not None
        d: defer.Deferred[str] = defer.Deferred()
        orders.append((d, names))
        return d

    now = [datetime.datetime.now(datetime.UTC).timestamp()]
    issuer = AcmeCSRIssuer(order, clock=lambda: now[0], max_orders=2)
    first = issuer.issue(csr, host)
    second = issuer.issue(other, host)
    busy = issuer.issue(csr, host)  # a third order while two run
    assert len(orders) == 2 and orders[0][1] == [host]
    failures: list[object] = []
    busy.addErrback(failures.append)
    assert failures and "busy" in str(failures[0])
    chain = dev.issue(csr, host)
    orders[0][0].callback(chain)
    orders[1][0].errback(RuntimeError("the CA said no"))
    second.addErrback(lambda f: None)
    got: list[str] = []
    first.addCallback(got.append)
    assert got == [chain]
    issuer.issue(csr, host).addCallback(got.append)  # the same key again: no new order
    assert got == [chain, chain] and len(orders) == 2
    now[0] += 40 * 86400  # past a third of a 90-day validity: a new order
    issuer.issue(csr, host)
    assert len(orders) == 3
