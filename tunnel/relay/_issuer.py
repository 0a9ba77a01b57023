"""
Certificates for passthrough tunnels: the relay signs an agent's CSR for the host name of a
passthrough tunnel that the agent's link holds, so that the local server, which terminates
TLS itself, can show public clients a certificate they trust. The key never leaves the
agent: only the CSR comes, and the chain goes back.

`CertificateIssuer` is the seam: anything that turns a checked CSR into a PEM chain,
synchronously or through a Deferred. `DevCAIssuer` is the development relay's (its local CA,
in the state directory); `tunnel.relay._acme.AcmeCSRIssuer` (DNS-01 through the relay's
hook) implements the same method. `check_csr` is the one check of what an agent sent,
whichever issuer signs; the decision on one ``certificate_request`` (`requested`) is
sans-IO, for the link's control core: the adapter carries out the `IssueCertificate` effect
it returns.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tunnel.relay._effects import Effect, Send, log
from tunnel.wire.codes import RefusalCode
from tunnel.wire.control import CertificateRefused, CertificateRequest

if TYPE_CHECKING:
    from tunnel.relay._control import RelaySession

__all__ = [
    "LEAF_VALIDITY",
    "CertificateIssuer",
    "DevCAIssuer",
    "IssueCertificate",
    "check_csr",
    "requested",
]

#: How long a certificate the development CA signs is valid.
LEAF_VALIDITY = datetime.timedelta(days=90)

_CURVES = (ec.SECP256R1, ec.SECP384R1)
_RSA_BITS = range(2048, 8193)


class CertificateIssuer(Protocol):
    """
    What signs the certificates of passthrough tunnels.
    """

    def issue(self, csr: x509.CertificateSigningRequest, host: str) -> Any:
        """
        A certificate for `host` with the key of `csr` (already checked by `check_csr`: its
        only name is `host`).

        @return: the PEM chain (leaf first), or a Deferred firing with it.
        @raise Exception: (or fail the Deferred) when it cannot be had; the message goes to
            the agent.
        """


def sign_server_leaf(
    public: Any,
    common_name: str,
    names: list[x509.GeneralName],
    ca_cert: x509.Certificate,
    ca_key: Any,
    now: datetime.datetime,
    not_after: datetime.datetime,
) -> x509.Certificate:
    """
    A server certificate for `names` with the key `public`, signed by the development CA:
    valid from five minutes before `now` (clocks differ) to `not_after`, for server
    authentication only, never a CA.
    """
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=isinstance(public, rsa.RSAPublicKey),
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


def check_csr(pem: str, host: str) -> x509.CertificateSigningRequest:
    """
    The CSR of an agent's ``certificate_request``, if it asks for `host` and nothing else.

    @raise ValueError: not one PEM CSR, a bad signature, a weak or unknown key, or names
        other than exactly `host` (the subject's common name, if any, and the DNS names of
        its subject alternative names; no other kind of name); the message says which.
    """
    try:
        csr = x509.load_pem_x509_csr(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise ValueError("csr is not a PEM certificate signing request") from None
    if not csr.is_signature_valid:
        raise ValueError("the CSR's signature does not verify")
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, _CURVES):
            raise ValueError(f"the CSR's key is on {key.curve.name}: use P-256 or P-384")
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size not in _RSA_BITS:
            raise ValueError(f"the CSR's RSA key has {key.key_size} bits: use 2048 to 8192")
    elif not isinstance(key, ed25519.Ed25519PublicKey):
        raise ValueError("the CSR's key is not EC (P-256, P-384), RSA or Ed25519")
    names = [a.value for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if any(str(name).lower() != host for name in names):
        raise ValueError(f"the CSR's common name must be {host} (or none)")
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise ValueError(f"the CSR has no subject alternative name: it must name {host}") from None
    dns = [name.lower() for name in san.get_values_for_type(x509.DNSName)]
    if dns != [host] or len(list(san)) != 1:
        raise ValueError(f"the CSR must name {host} and nothing else (it names {len(list(san))})")
    return csr


@dataclass(frozen=True)
class IssueCertificate(Effect):
    """
    Have the relay's issuer sign `csr` for `host`, then answer request `request_id` with
    ``certificate_issued`` (or ``certificate_refused`` ``issue_failed``).
    """

    request_id: int
    csr: x509.CertificateSigningRequest
    host: str
    tunnel_id: str


def requested(session: RelaySession, request: CertificateRequest) -> list[Effect]:
    """
    Answer a ``certificate_request``: within the link's (and its principal's) request
    rate, from a relay with an issuer, for a passthrough tunnel this link holds, with a CSR
    that names its host and nothing else.
    """
    relay = session.relay

    def refuse(code: RefusalCode, message: str) -> list[Effect]:
        return [Send(CertificateRefused(request.request_id, code, message))]

    if not (session.requests.tokens >= 1 and relay.principal_requests.take(session.principal)):
        relay.refused["tunnel_requests_rate"] += 1
        return refuse(RefusalCode.LIMIT, "too many requests: slow down")
    session.requests.take()
    issuer = relay.issuer
    if issuer is None:
        return refuse(
            RefusalCode.NO_ISSUER,
            "this relay issues no certificates: give the local server its own for the "
            "tunnel's host name",
        )
    record = relay.registry.get(request.tunnel_id)
    if record is None or record.owner is not session.owner or record.kind != "passthrough":
        return refuse(
            RefusalCode.NOT_HELD,
            f"{request.tunnel_id} is not a passthrough tunnel of this agent",
        )
    host = relay.host_of(request.tunnel_id)
    try:
        csr = check_csr(request.csr, host)
    except ValueError as e:
        return refuse(RefusalCode.BAD_REQUEST, str(e))
    return [
        log(
            "info",
            "issuing a certificate for {host} to {peer}",
            key="certificate-issued",
            host=host,
            peer=session.peer_name,
        ),
        IssueCertificate(request.request_id, csr, host, request.tunnel_id),
    ]


class DevCAIssuer:
    """
    The development relay's issuer: its local CA (``ca.pem`` and ``ca-key.pem`` in the state
    directory) signs certificates of `LEAF_VALIDITY` (at most the CA's own), for the name of
    the CSR only, for server authentication only.
    """

    def __init__(self, ca_cert: x509.Certificate, ca_key: Any) -> None:
        self.ca_cert = ca_cert
        self.ca_key = ca_key
        self._ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM).decode("ascii")

    @classmethod
    def from_state_dir(cls, state_dir: str) -> DevCAIssuer:
        """
        The issuer of the development CA in `state_dir` (made by the relay's start-up).

        @raise OSError: it cannot be read. @raise ValueError: it is not a CA and its key.
        """
        from tunnel.relay._certs import CA_CERT_FILE, CA_KEY_FILE

        with open(os.path.join(state_dir, CA_CERT_FILE), "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        with open(os.path.join(state_dir, CA_KEY_FILE), "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
        if cert.public_key() != key.public_key():
            raise ValueError("the development CA's key does not match its certificate")
        return cls(cert, key)

    def issue(self, csr: x509.CertificateSigningRequest, host: str) -> str:
        now = datetime.datetime.now(datetime.UTC)
        not_after = min(now + LEAF_VALIDITY, self.ca_cert.not_valid_after_utc)
        public = csr.public_key()
        cert = sign_server_leaf(
            public, host, [x509.DNSName(host)], self.ca_cert, self.ca_key, now, not_after
        )
        return cert.public_bytes(serialization.Encoding.PEM).decode("ascii") + self._ca_pem
