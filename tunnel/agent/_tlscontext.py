"""
The TLS client context of the agent's links, and how a failure to reach a relay reads;
standard library only (the plain API's first link is made before Twisted is imported).
"""

from __future__ import annotations

import ssl

from tunnel.wire import LINK_ALPN

__all__ = ["client_context", "describe_error"]


def client_context(ca: str | None) -> ssl.SSLContext:
    """
    The TLS client context of the agent's links: trust `ca` (a PEM bundle) or, with None,
    the platform's trust store; verify the relay's host name; offer ALPN ``LINK_ALPN``.

    @raise ValueError: `ca` holds no usable PEM certificate.
    @raise OSError: `ca` cannot be read.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca is None:
        context.set_default_verify_paths()
    else:
        with open(ca, "rb") as f:
            pem = f.read()
        if b"-----BEGIN CERTIFICATE-----" not in pem:
            raise ValueError(f"{ca} holds no PEM certificate")
        try:
            context.load_verify_locations(cadata=pem.decode("ascii", "replace"))
        except ssl.SSLError as e:
            raise ValueError(f"{ca}: not a usable PEM CA bundle ({e})") from None
    context.set_alpn_protocols([LINK_ALPN.decode("ascii")])
    context.options &= ~ssl.OP_IGNORE_UNEXPECTED_EOF
    return context


def describe_error(error: object) -> str:
    """
    A failure to reach a relay, as the agent reports it: its text, and for a certificate
    that does not verify, what to do about it.
    """
    text = str(error) or type(error).__name__
    if "certificate verify failed" in text or "CERTIFICATE_VERIFY_FAILED" in text:
        return f"the relay's certificate is not trusted ({text}); pass --ca / TUNNEL_CA"
    return text
