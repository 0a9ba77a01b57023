"""
The `Tunnel` value that `forward` yields.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tunnel.errors import TunnelError

if TYPE_CHECKING:
    from twisted.internet import defer

__all__ = ["Tunnel"]


@dataclass(frozen=True)
class Tunnel:
    """
    A forwarded port: where the public reaches it.

    The shape of Modal's tunnel: four fields, and three properties derived from them.
    """

    #: The public TLS host name, ``<id>.<domain>``.
    host: str
    #: The public TLS port.
    port: int
    #: For ``unencrypted=True`` tunnels: the raw TCP host and port; else None.
    unencrypted_host: str | None = None
    unencrypted_port: int | None = None
    #: The agent's inspector page (``forward(..., inspect=True)``), or None.
    inspector_url: str | None = field(default=None, compare=False)
    _close: Callable[[], defer.Deferred[None]] | None = field(
        default=None, compare=False, repr=False
    )
    _issue: Callable[[str | bytes], Any] | None = field(default=None, compare=False, repr=False)

    @property
    def url(self) -> str:
        """
        ``https://<host>``, with ``:<port>`` only when the port is not 443.
        """
        if self.port == 443:
            return f"https://{self.host}"
        return f"https://{self.host}:{self.port}"

    @property
    def tls_socket(self) -> tuple[str, int]:
        """
        The (host, port) a TLS client connects to.
        """
        return (self.host, self.port)

    @property
    def tcp_socket(self) -> tuple[str, int]:
        """
        The (host, port) of the raw TCP port.

        @raise TunnelError: the tunnel was not made with ``unencrypted=True``.
        """
        if self.unencrypted_host is None or self.unencrypted_port is None:
            raise TunnelError(
                "this tunnel has no raw TCP socket: forward the port with unencrypted=True"
            )
        return (self.unencrypted_host, self.unencrypted_port)

    def issue_certificate(self, csr_pem: str | bytes) -> Any:
        """
        A certificate for this passthrough tunnel's host name, signed by the relay (its
        development CA; a relay with a certificate of its own needs ACME for this), for the
        key of `csr_pem`: a PEM certificate signing request whose only name (common name
        and subject alternative name) is `host`. The key stays here; only the CSR travels.
        `tunnel.make_csr` makes a key and such a CSR.

        From `tunnel.client.forward` (Twisted): a Deferred firing with the PEM chain, leaf
        first. From `tunnel.forward` (plain Python): the PEM chain (it blocks).

        @raise ValueError: not a passthrough tunnel, or not a PEM CSR.
        @raise TunnelRefused: (or the Deferred fails with it) the relay will not: it has no
            issuer (``no_issuer``), or the CSR names something else (``bad_request``).
        @raise RelayUnavailable: the link is down, or went down before the answer.
        """
        if self._issue is None:
            raise TunnelError("this tunnel cannot ask for certificates")
        return self._issue(csr_pem)

    def close(self) -> defer.Deferred[None]:
        """
        Close the tunnel; the Deferred fires when the relay has been told.
        """
        if self._close is None:
            # Imported here: a `Tunnel` is made before Twisted is (the plain API's first).
            from twisted.internet import defer

            return defer.succeed(None)
        return self._close()

    async def __aenter__(self) -> Tunnel:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
