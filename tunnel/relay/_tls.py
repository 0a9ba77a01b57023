"""
pyOpenSSL server contexts for the relay: one certificate, one context per ALPN preference.

Settings follow Mozilla's "intermediate" profile: TLS 1.2 and 1.3 only, AEAD ciphers with
AES-GCM first, no compression, no renegotiation; session tickets stay on (a returning client
resumes its session with the context that made it, and only with that one).

A peer that closes its TCP connection (FIN) without a TLS close_notify, as most clients do
(curl, browsers, Python's `ssl`), has closed cleanly, as HAProxy and nginx take it: its
stream ends with a FIN, not a reset (a reset counts against the agent's rapid-reset bound,
so clients that close so, many a second, would otherwise end the agent's link). A TCP
reset is still a reset.

ALPN: the select callback picks the first of *our* protocols that the client offered.  When
the client offered ALPN but nothing overlaps it answers "no overlap" (the server sends no
ALPN extension, the client falls back), never an empty selection: Twisted's own callback
returns ``b""`` there, which OpenSSL 3 turns into an ``internal_error`` alert.  The callback
never raises; an exception inside an OpenSSL callback aborts the handshake.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from OpenSSL import SSL, crypto
from twisted.logger import Logger

from tunnel.relay._certificate import CertificatePair
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
    | getattr(SSL, "OP_IGNORE_UNEXPECTED_EOF", 0)
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
    The relay's certificate and key, and one cached context per ALPN preference.

    ``RelayTLS(cert_path, key_path).context_for((b"h2", b"http/1.1"))`` returns the same
    `SSL.Context` on every call with the same tuple, until `install` puts another certificate
    into service: from then on new handshakes get contexts with the new one, while
    connections already established keep the context (and certificate) they started with.

    Construction with paths reads and checks the files (blocking; do it at start-up) and
    raises ``OSError``, ``ValueError`` or ``SSL.Error`` when they are missing, unreadable, or
    do not match.  Without paths it holds no certificate until `install` (ACME mode, before
    the first certificate is issued): every context it hands out then has no certificate,
    so handshakes fail (a ``handshake_failure`` alert) rather than be served with anything
    else.
    """

    def __init__(self, cert_path: str | None = None, key_path: str | None = None) -> None:
        self.cert_path = cert_path
        self.key_path = key_path
        self._pair: CertificatePair | None = None
        self._contexts: dict[tuple[bytes, ...], SSL.Context] = {}
        #: Each client-verifying context handed out: what `refresh` rebuilds it from, and
        #: the certificate it has.
        self._verifying: weakref.WeakKeyDictionary[SSL.Context, _Verifying] = (
            weakref.WeakKeyDictionary()
        )
        if cert_path is not None:
            if key_path is None:
                raise ValueError("a certificate needs its key")
            with open(cert_path, "rb") as f:
                chain = x509.load_pem_x509_certificates(f.read())
            with open(key_path, "rb") as f:
                key = serialization.load_pem_private_key(f.read(), password=None)
            if not chain:
                raise ValueError(f"{cert_path} holds no certificate")
            self.install(CertificatePair(tuple(chain), key, cert_path))

    @property
    def pair(self) -> CertificatePair | None:
        """The certificate in service (None before the first one)."""
        return self._pair

    @property
    def certificate(self) -> x509.Certificate:
        """The leaf certificate in service.

        @raise LookupError: there is none yet.
        """
        if self._pair is None:
            raise LookupError("the relay has no certificate yet")
        return self._pair.leaf

    def install(self, pair: CertificatePair) -> None:
        """
        Serve `pair` to every new handshake from now on.

        The contexts are built before anything changes: when OpenSSL refuses the pair
        (``SSL.Error``) the certificate in service stays.  Contexts handed out before keep
        the old certificate; `refresh` gives the replacement of a client-verifying one.
        """
        first = server_context(pair.chain, pair.key, ())
        self._pair = pair
        self._contexts = {(): first}

    def context_for(self, alpn: tuple[bytes, ...]) -> SSL.Context:
        """The server context preferring the ALPN protocols ``alpn``, in order."""
        ctx = self._contexts.get(alpn)
        if ctx is None:
            ctx = self._new_context(alpn)
            self._contexts[alpn] = ctx
        return ctx

    def _new_context(self, alpn: tuple[bytes, ...]) -> SSL.Context:
        if self._pair is None:
            return _without_certificate(alpn)
        return server_context(self._pair.chain, self._pair.key, alpn)

    def client_verifying_context(
        self, alpn: tuple[bytes, ...], cas: Sequence[x509.Certificate]
    ) -> SSL.Context:
        """
        A new context like ``context_for(alpn)`` that also demands a client certificate from
        one of `cas` (not cached: its owner, a tunnel, keeps it as long as it lives).
        """
        ctx = self._new_context(alpn)
        require_client_certificates(ctx, cas)
        self._verifying[ctx] = _Verifying(alpn, tuple(cas), self._pair)
        return ctx

    def refresh(self, ctx: SSL.Context) -> SSL.Context | None:
        """
        For a context from `client_verifying_context`: a new one with the same ALPN
        preference and authorities and the certificate in service now (None for a context
        that did not come from there, or when it already has the current certificate).
        """
        made = self._verifying.get(ctx)
        if made is None or made.pair is self._pair:
            return None
        return self.client_verifying_context(made.alpn, made.cas)


@dataclass(frozen=True)
class _Verifying:
    alpn: tuple[bytes, ...]
    cas: tuple[x509.Certificate, ...]
    pair: CertificatePair | None


def _without_certificate(alpn: tuple[bytes, ...]) -> SSL.Context:
    """A server context with no certificate: every handshake with it fails."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(_OPTIONS)
    ctx.set_cipher_list(CIPHERS.encode("ascii"))
    if alpn:
        ctx.set_alpn_select_callback(make_alpn_selector(alpn))
    return ctx
