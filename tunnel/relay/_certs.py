"""Development certificates: a local CA and a wildcard certificate for the relay's domain.

With no certificate configured the relay runs in development mode: it creates (once) an
EC P-256 CA called "Tunnels development CA" and a leaf certificate for ``<domain>`` and
``*.<domain>`` signed by it, in its state directory, and reuses them on later starts.
Clients trust the CA file (``curl --cacert``, ``TUNNEL_CA``).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import tempfile
from dataclasses import dataclass

import idna
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.python.filepath import FilePath

from tunnel.relay._issuer import sign_server_leaf

__all__ = ["DevCertificates", "ensure_dev_certificates"]

CA_NAME = "Tunnels development CA"
CA_VALIDITY = datetime.timedelta(days=3650)
LEAF_VALIDITY = datetime.timedelta(days=365)
RENEW_BEFORE = datetime.timedelta(days=7)

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
CERT_FILE = "fullchain.pem"
KEY_FILE = "privkey.pem"


@dataclass(frozen=True)
class DevCertificates:
    """Paths of the development certificate files."""

    ca_path: str
    """PEM file of the development CA certificate: what clients should trust."""
    cert_path: str
    """PEM chain: the leaf certificate for ``<domain>``/``*.<domain>``, then the CA."""
    key_path: str
    """PEM (PKCS#8, unencrypted, mode 0600) private key of the leaf certificate."""
    created: bool
    """True when this call (re)created the leaf certificate, False when it reused one."""


def _ascii_domain(domain: str) -> str:
    domain = domain.strip().rstrip(".").lower()
    if not domain:
        raise ValueError("domain must not be empty")
    return idna.encode(domain, uts46=True).decode("ascii")


def _atomic_write(path: FilePath[str], data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same directory, rename)."""
    fd, tmp = tempfile.mkstemp(dir=path.dirname(), prefix="." + path.basename(), suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path.path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _make_ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tunnels"),
        ]
    )
    now = _now()
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _make_leaf(
    domain: str, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key()
    now = _now()
    not_after = min(now + LEAF_VALIDITY, ca_cert.not_valid_after_utc)
    names: list[x509.GeneralName] = [
        x509.DNSName(domain),
        x509.DNSName("*." + domain),
        # So that an agent on the same machine may dial the development relay as localhost
        # or by its loopback address.
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
        x509.IPAddress(ipaddress.IPv6Address("::1")),
    ]
    cert = sign_server_leaf(public, domain, names, ca_cert, ca_key, now, not_after)
    return cert, key


def _load_ca(
    cert_file: FilePath[str], key_file: FilePath[str]
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    """Load the existing CA, or None when it is missing, unreadable or expiring."""
    try:
        cert = x509.load_pem_x509_certificate(cert_file.getContent())
        key = serialization.load_pem_private_key(key_file.getContent(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return None
    if cert.public_key() != key.public_key():
        return None
    if cert.not_valid_after_utc - _now() < LEAF_VALIDITY:
        # Too close to expiry to sign a full-length leaf: start a fresh CA.
        return None
    return cert, key


def _leaf_usable(
    cert_file: FilePath[str], key_file: FilePath[str], domain: str, ca_cert: x509.Certificate
) -> bool:
    """True when the existing leaf covers ``domain``, is signed by ``ca_cert`` and is fresh."""
    try:
        certs = x509.load_pem_x509_certificates(cert_file.getContent())
        key = serialization.load_pem_private_key(key_file.getContent(), password=None)
    except (OSError, ValueError, TypeError):
        return False
    if not certs:
        return False
    leaf = certs[0]
    if leaf.public_key() != key.public_key():
        return False
    try:
        leaf.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    now = _now()
    if leaf.not_valid_before_utc > now or leaf.not_valid_after_utc - now < RENEW_BEFORE:
        return False
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    names = {n.lower() for n in san.get_values_for_type(x509.DNSName)}
    return {domain, "*." + domain, "localhost"} <= names


def ensure_dev_certificates(state_dir: FilePath[str] | str, domain: str) -> DevCertificates:
    """
    Make sure ``state_dir`` holds a development CA and a certificate for ``domain``.

    Creates the state directory, the CA (10 years) and the leaf certificate (1 year, SANs
    ``domain`` and ``*.domain``) when missing; reuses them otherwise, unless the leaf does not
    cover ``domain``, does not match its key, or expires within 7 days, in which case a new
    leaf is issued (by the same CA while it is valid).  Files are written atomically; private
    keys get mode 0600.  ``domain`` may be an IDN; it is stored in its ASCII form.

    Raises ``ValueError`` for an empty or invalid domain and ``OSError`` when the directory
    cannot be written.  Blocking (file I/O and key generation, a few milliseconds): call it at
    start-up, before the reactor runs, or in a thread.
    """
    ascii_domain = _ascii_domain(domain)
    directory = state_dir if isinstance(state_dir, FilePath) else FilePath(state_dir)
    directory.makedirs(ignoreExistingDirectory=True)

    ca_file = directory.child(CA_CERT_FILE)
    ca_key_file = directory.child(CA_KEY_FILE)
    cert_file = directory.child(CERT_FILE)
    key_file = directory.child(KEY_FILE)

    created = False
    ca = _load_ca(ca_file, ca_key_file)
    if ca is None:
        ca = _make_ca()
        # Key first: a cert without its key on disk would be unusable after a crash.
        _atomic_write(ca_key_file, _key_pem(ca[1]), 0o600)
        _atomic_write(ca_file, ca[0].public_bytes(serialization.Encoding.PEM), 0o644)
        created = True
    ca_cert, ca_key = ca

    if created or not _leaf_usable(cert_file, key_file, ascii_domain, ca_cert):
        leaf, leaf_key = _make_leaf(ascii_domain, ca_cert, ca_key)
        chain = leaf.public_bytes(serialization.Encoding.PEM) + ca_cert.public_bytes(
            serialization.Encoding.PEM
        )
        _atomic_write(key_file, _key_pem(leaf_key), 0o600)
        _atomic_write(cert_file, chain, 0o644)
        created = True

    return DevCertificates(
        ca_path=ca_file.path,
        cert_path=cert_file.path,
        key_path=key_file.path,
        created=created,
    )
