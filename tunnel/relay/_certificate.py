"""
The relay's certificate as a checked value: a chain and its key that parse, match, and cover
the relay's domain.

Every certificate the relay puts into service goes through `check_pair` first, whether it
comes from ``--cert``/``--key`` at start, from a changed file, from SIGHUP, or from an ACME
order: a pair that fails is refused with a `CertificateRefused` that says why, and whatever
was serving before goes on serving.  The checks are pure (bytes, a domain and a time in,
a `CertificatePair` or an exception out), so they are tested directly.
"""

from __future__ import annotations

import datetime
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import NameOID

__all__ = [
    "CertificatePair",
    "CertificateRefused",
    "check_pair",
    "covers",
    "read_pair",
    "required_names",
]


class CertificateRefused(ValueError):
    """
    A certificate and key that the relay will not serve; the message says why (for the log).
    """


@dataclass(frozen=True)
class CertificatePair:
    """A certificate chain (leaf first) and the private key of its leaf, checked."""

    chain: tuple[x509.Certificate, ...]
    """The leaf certificate, then the intermediates, as served."""
    key: PrivateKeyTypes
    """The private key of ``chain[0]``."""
    source: str = ""
    """Where it came from, for the log: a file name, ``ACME``, ``development CA``."""

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def names(self) -> list[str]:
        """The DNS names of the leaf's subjectAltName (lower case, in certificate order)."""
        return dns_names(self.leaf)

    @property
    def issuer(self) -> str:
        """The issuer's common name (or the whole issuer name when it has none)."""
        cns = self.leaf.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(cns[0].value) if cns else self.leaf.issuer.rfc4514_string()

    @property
    def not_before(self) -> datetime.datetime:
        return self.leaf.not_valid_before_utc

    @property
    def not_after(self) -> datetime.datetime:
        return self.leaf.not_valid_after_utc

    @property
    def serial(self) -> str:
        """The leaf's serial number in hex (as ``openssl x509 -serial`` shows it)."""
        return f"{self.leaf.serial_number:X}"

    def describe(self) -> str:
        """One line for the log: names, issuer, expiry, serial, source."""
        return (
            f"{', '.join(self.names)} issued by {self.issuer!r}, expires "
            f"{self.not_after.isoformat()} (serial {self.serial})"
            + (f", from {self.source}" if self.source else "")
        )

    def status(self) -> dict[str, object]:
        """The ``certificate`` member of the admin ``/status`` document."""
        return {
            "names": self.names,
            "issuer": self.issuer,
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
            "serial": self.serial,
            "source": self.source,
        }


def dns_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [n.lower() for n in san.get_values_for_type(x509.DNSName)]


def required_names(domain: str) -> tuple[str, str]:
    """The names the relay's certificate must cover: ``<domain>`` and ``*.<domain>``."""
    domain = domain.lower().rstrip(".")
    return domain, "*." + domain


def covers(names: Sequence[str], domain: str) -> bool:
    """
    Whether a certificate with DNS `names` serves both the relay's own name ``<domain>``
    (agents, the info page) and every tunnel name ``<id>.<domain>`` (only a wildcard
    ``*.<domain>`` does: ids are random).
    """
    have = {n.lower().rstrip(".") for n in names}
    return set(required_names(domain)) <= have


def check_pair(
    chain: Sequence[x509.Certificate],
    key: PrivateKeyTypes,
    domain: str,
    now: datetime.datetime,
    source: str = "",
) -> CertificatePair:
    """
    `chain` and `key` as a `CertificatePair`, when the relay may serve them for `domain`
    at `now`.

    @raise CertificateRefused: the chain is empty, the key is not the leaf's, the leaf does
        not name ``<domain>`` and ``*.<domain>``, a certificate of the chain is not issued
        by the next one, or the leaf has expired.
    """
    what = f"{source}: " if source else ""
    if not chain:
        raise CertificateRefused(f"{what}no certificate in the file")
    leaf = chain[0]
    if leaf.public_key() != key.public_key():
        raise CertificateRefused(
            f"{what}the private key does not belong to the certificate "
            f"(serial {leaf.serial_number:X})"
        )
    names = dns_names(leaf)
    if not covers(names, domain):
        missing = [n for n in required_names(domain) if n not in names]
        raise CertificateRefused(
            f"{what}the certificate does not cover {' and '.join(missing)} "
            f"(it names {', '.join(names) or 'no DNS name'})"
        )
    for i, (cert, issuer) in enumerate(itertools.pairwise(chain)):
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            raise CertificateRefused(
                f"{what}the chain is out of order: certificate {i + 1} is not issued by "
                f"certificate {i + 2} (leaf first, then its issuer, and so on)"
            ) from None
    if leaf.not_valid_after_utc <= now:
        raise CertificateRefused(
            f"{what}the certificate expired on {leaf.not_valid_after_utc.isoformat()}"
        )
    return CertificatePair(tuple(chain), key, source)


def parse_pair(cert_pem: bytes, key_pem: bytes) -> tuple[list[x509.Certificate], PrivateKeyTypes]:
    """
    The certificates and the key in PEM `cert_pem` and `key_pem`.

    @raise CertificateRefused: either does not parse (or the key is encrypted).
    """
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError as e:
        raise CertificateRefused(f"the certificate file does not parse: {e}") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise CertificateRefused(f"the key file does not parse: {e}") from None
    return chain, key


def read_pair(
    cert_path: str, key_path: str, domain: str, now: datetime.datetime
) -> CertificatePair:
    """
    Read, parse and check the pair in `cert_path` and `key_path` (blocking file I/O).

    @raise CertificateRefused: a file cannot be read or does not parse, or `check_pair`
        refuses the pair.
    """
    try:
        with open(cert_path, "rb") as f:
            cert_pem = f.read()
        with open(key_path, "rb") as f:
            key_pem = f.read()
    except OSError as e:
        raise CertificateRefused(f"cannot read {e.filename}: {e.strerror}") from None
    try:
        chain, key = parse_pair(cert_pem, key_pem)
    except CertificateRefused as e:
        raise CertificateRefused(f"{cert_path}: {e}") from None
    return check_pair(chain, key, domain, now, cert_path)
