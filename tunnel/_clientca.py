"""
A tunnel's client certificate authorities (mutual TLS): the PEM bundle an agent sends and
the relay turns into a TLS context. Shared by both; no I/O.
"""

from __future__ import annotations

from cryptography import x509

__all__ = ["MAX_CLIENT_CAS", "parse_client_cas"]

#: Certificates a tunnel's client CA bundle may hold.
MAX_CLIENT_CAS = 16


def parse_client_cas(pem: object) -> tuple[x509.Certificate, ...]:
    """
    A tunnel's client CA bundle: PEM text of 1 to `MAX_CLIENT_CAS` certificates.

    @raise ValueError: not such text; the message says why.
    """
    if not isinstance(pem, str):
        raise ValueError("client_ca is PEM text")
    try:
        cas = x509.load_pem_x509_certificates(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise ValueError("client_ca holds no PEM certificate") from None
    if len(cas) > MAX_CLIENT_CAS:
        raise ValueError(f"client_ca holds more than {MAX_CLIENT_CAS} certificates")
    return tuple(cas)
