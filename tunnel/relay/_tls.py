"""
pyOpenSSL server contexts for the relay: one certificate, one context per ALPN preference.

Settings follow Mozilla's "intermediate" profile: TLS 1.2 and 1.3 only, AEAD ciphers with
AES-GCM first, no compression, no renegotiation; session tickets stay on.

ALPN: the select callback picks the first of *our* protocols that the client offered.  When
the client offered ALPN but nothing overlaps it answers "no overlap" (the server sends no
ALPN extension, the client falls back), never an empty selection: Twisted's own callback
returns ``b""`` there, which OpenSSL 3 turns into an ``internal_error`` alert.  The callback
never raises; an exception inside an OpenSSL callback aborts the handshake.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from OpenSSL import SSL, crypto
from twisted.logger import Logger

from tunnel.wire.mux import LINK_ALPN  # the link's ALPN id, re-exported here

__all__ = [
    "ALPN_H2",
    "ALPN_HTTP1",
    "CIPHERS",
    "LINK_ALPN",
    "RelayTLS",
    "make_alpn_selector",
    "require_client_certificates",
    "server_context",
]


"""ALPN protocol id of the agent <-> relay link."""
ALPN_HTTP1: tuple[bytes, ...] = (b"http/1.1",)
"""ALPN preference for HTTP/1.1 tunnels and the relay's root-domain info page."""
ALPN_H2: tuple[bytes, ...] = (b"h2", b"http/1.1")
"""ALPN preference for tunnels whose local server speaks HTTP/2."""

CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384"
)
"""Mozilla "intermediate" TLS 1.2 cipher list (TLS 1.3 suites are OpenSSL's defaults)."""

_log = Logger()

_OPTIONS = (
    SSL.OP_NO_COMPRESSION
    | SSL.OP_NO_RENEGOTIATION
    | SSL.OP_SINGLE_ECDH_USE
    | getattr(SSL, "OP_NO_CLIENT_RENEGOTIATION", 0)
)


def make_alpn_selector(
    preference: Sequence[bytes],
) -> SSL._ALPNSelectCallback:
    """
    An ALPN select callback choosing the first protocol in ``preference`` the client offered.

    Returns ``SSL.NO_OVERLAPPING_PROTOCOLS`` when nothing overlaps (the handshake goes on
    without ALPN).  Never raises.
    """
    ours = tuple(preference)

    def select(conn: SSL.Connection, offered: list[bytes]) -> bytes | object:
        try:
            for proto in ours:
                if proto in offered:
                    return proto
        except Exception:  # pragma: no cover - defensive: never raise into OpenSSL
            _log.failure("ALPN selection failed")
        return SSL.NO_OVERLAPPING_PROTOCOLS

    return select  # type: ignore[return-value]


def server_context(
    cert_chain: Sequence[x509.Certificate],
    key: PrivateKeyTypes,
    alpn: Sequence[bytes] = (),
) -> SSL.Context:
    """
    A new server `SSL.Context` for ``cert_chain`` (leaf first) and ``key``.

    With a non-empty ``alpn`` preference an ALPN select callback is installed (see module
    docstring); with an empty one the server ignores ALPN.  Raises ``SSL.Error`` when the key
    does not match the certificate.
    """
    if not cert_chain:
        raise ValueError("empty certificate chain")
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(_OPTIONS)
    ctx.set_cipher_list(CIPHERS.encode("ascii"))
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    ctx.use_certificate(cert_chain[0])
    for extra in cert_chain[1:]:
        ctx.add_extra_chain_cert(extra)
    ctx.use_privatekey(key)  # type: ignore[arg-type]
    ctx.check_privatekey()
    # A session id context lets OpenSSL resume sessions it cached itself (tickets need none).
    ctx.set_session_id(b"tunnels-relay")
    if alpn:
        ctx.set_alpn_select_callback(make_alpn_selector(alpn))
    return ctx


def _verified(conn: SSL.Connection, cert: object, errnum: int, depth: int, ok: int) -> bool:
    # OpenSSL's verdict stands; never raise inside an OpenSSL callback.
    return bool(ok)


def require_client_certificates(ctx: SSL.Context, cas: Sequence[x509.Certificate]) -> None:
    """
    Make `ctx` demand a client certificate that chains to one of `cas`: a client without
    one gets a ``certificate_required`` (TLS 1.3) or ``handshake_failure`` alert, one from
    another authority ``unknown_ca``.
    """
    store = ctx.get_cert_store()
    assert store is not None
    for ca in cas:
        store.add_cert(crypto.X509.from_cryptography(ca))
    ctx.set_client_ca_list([crypto.X509.from_cryptography(ca).get_subject() for ca in cas])
    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, _verified)
    ctx.set_verify_depth(4)
    # Sessions are resumable only with this same set of authorities.
    digest = hashlib.sha256(b"".join(ca.fingerprint(hashes.SHA256()) for ca in cas)).digest()
    ctx.set_session_id(b"tunnels-mtls-" + digest[:16])


class RelayTLS:
    """
    The relay's certificate and key, loaded once, and one cached context per ALPN preference.

    ``RelayTLS(cert_path, key_path).context_for((b"h2", b"http/1.1"))`` returns the same
    `SSL.Context` on every call with the same tuple.  Construction reads and checks the files
    (blocking; do it at start-up) and raises ``OSError``, ``ValueError`` or ``SSL.Error``
    when they are missing, unreadable, or do not match.
    """

    def __init__(self, cert_path: str, key_path: str) -> None:
        self.cert_path = cert_path
        self.key_path = key_path
        with open(cert_path, "rb") as f:
            chain = x509.load_pem_x509_certificates(f.read())
        with open(key_path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
        self._chain: tuple[x509.Certificate, ...] = tuple(chain)
        self._key = key
        self._contexts: dict[tuple[bytes, ...], SSL.Context] = {}
        # Fail at start-up, not on the first connection, if the pair is unusable.
        self.context_for(())

    @property
    def certificate(self) -> x509.Certificate:
        """The leaf certificate."""
        return self._chain[0]

    def context_for(self, alpn: tuple[bytes, ...]) -> SSL.Context:
        """The server context preferring the ALPN protocols ``alpn``, in order."""
        ctx = self._contexts.get(alpn)
        if ctx is None:
            ctx = server_context(self._chain, self._key, alpn)
            self._contexts[alpn] = ctx
        return ctx

    def client_verifying_context(
        self, alpn: tuple[bytes, ...], cas: Sequence[x509.Certificate]
    ) -> SSL.Context:
        """
        A new context like ``context_for(alpn)`` that also demands a client certificate from
        one of `cas` (not cached: its owner, a tunnel, keeps it as long as it lives).
        """
        ctx = server_context(self._chain, self._key, alpn)
        require_client_certificates(ctx, cas)
        return ctx
