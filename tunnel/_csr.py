"""
A key and a certificate signing request for a passthrough tunnel's host name, made where
the local server runs (the key never leaves it): what `Tunnel.issue_certificate` takes.
"""

from __future__ import annotations

__all__ = ["make_csr"]


def make_csr(host: str) -> tuple[str, str]:
    """
    A new EC P-256 private key and a CSR for `host` alone (common name and subject
    alternative name), both PEM; the key is PKCS#8 and unencrypted: keep it private
    (mode 0600 if written to a file).

    @raise ValueError: `host` is empty.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    if not host:
        raise ValueError("no host name given")
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem.decode("ascii"), csr.public_bytes(serialization.Encoding.PEM).decode("ascii")
