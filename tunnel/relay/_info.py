"""
The relay's own page at ``https://<domain>/``: what a browser (or a probe) gets from the
bare domain when it is not an agent.

One request, one answer, then the connection closes.  The request is buffered up to
`MAX_REQUEST` octets at most; the TLS front (`Route.local`) keeps the connection under its
handshake deadline and counted against the pending-handshake limits until it closes, so a
client that never finishes its request is aborted at that deadline.
"""

from __future__ import annotations

from twisted.internet.protocol import Factory, Protocol

__all__ = ["MAX_REQUEST", "InfoPage", "info_factory"]

#: Octets of request head read before answering anyway (an over-long request is refused).
MAX_REQUEST = 8192

_BODY = b"This is a Tunnels relay. Tunnels live at https://<id>.<this host>/.\n"


def _response(status: bytes, body: bytes) -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
    )


class InfoPage(Protocol):
    """
    Answers the first request (a 404 with a one-line page, or a 400 when the request head
    is longer than `MAX_REQUEST`) and closes; anything after it is ignored.
    """

    def __init__(self) -> None:
        self._head = b""
        self._answered = False

    def dataReceived(self, data: bytes) -> None:
        if self._answered:
            return
        # Keep only what can still matter: the end of the head may straddle two chunks.
        self._head = (self._head + data)[: MAX_REQUEST + 4]
        if b"\r\n\r\n" in self._head:
            self._answer(_response(b"404 Not Found", _BODY))
        elif len(self._head) >= MAX_REQUEST:
            self._answer(_response(b"400 Bad Request", b"Request too long.\n"))

    def _answer(self, response: bytes) -> None:
        self._answered = True
        self._head = b""
        transport = self.transport
        assert transport is not None
        transport.write(response)
        transport.loseConnection()


def info_factory() -> Factory[InfoPage]:
    """The factory of `InfoPage` protocols."""
    factory = Factory.forProtocol(InfoPage)
    factory.noisy = False
    return factory
