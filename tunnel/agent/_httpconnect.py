"""
Reaching the relay through an HTTP proxy (``CONNECT``), for agents on networks whose only
way out is one (``--proxy http://proxy.example:3128``, ``TUNNEL_PROXY``).

The proxy sees only the relay's host name and port: the link's TLS runs inside the tunnel it
opens, and the agent still verifies the relay's certificate, so the proxy can neither read
the link nor stand in for the relay.

`ConnectResponseParser` and `connect_request` are sans-IO; `HTTPConnectEndpoint` is the thin
Twisted adapter: an endpoint that dials the proxy, asks it for the tunnel, and then hands the
connection to the caller's protocol.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

__all__ = [
    "ConnectResponse",
    "ConnectResponseParser",
    "HTTPConnectEndpoint",
    "ProxyAddress",
    "ProxyError",
    "connect_request",
    "parse_proxy_url",
]

#: Octets of response head (status line and headers) a proxy may send.
MAX_RESPONSE_HEAD = 16384

_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: ([^\r\n]*))?")


class ProxyError(Exception):
    """
    The proxy refused the tunnel, or is not an HTTP proxy; the message says which.
    """


@dataclass(frozen=True)
class ProxyAddress:
    """
    An HTTP proxy: where it is, and the credentials to send it (``user:password``) if any.
    """

    host: str
    port: int
    credentials: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def parse_proxy_url(text: str) -> ProxyAddress:
    """
    Parse ``http://[user:password@]host[:port]`` (port 80 when absent; percent-escapes in the
    credentials are decoded).

    @raise ValueError: not such a URL (another scheme, no host, a bad port).
    """
    url = urlsplit(text.strip())
    if url.scheme != "http":
        raise ValueError(f"proxy {text!r}: only http:// proxies (HTTP CONNECT) are supported")
    try:
        port = url.port or 80
    except ValueError:
        raise ValueError(f"proxy {text!r}: bad port") from None
    if not url.hostname or url.path not in ("", "/") or url.query or url.fragment:
        raise ValueError(f"proxy {text!r} is not http://[user:password@]host[:port]")
    credentials = None
    if url.username is not None:
        credentials = f"{unquote(url.username)}:{unquote(url.password or '')}"
    return ProxyAddress(url.hostname, port, credentials)


def connect_request(host: str, port: int, credentials: str | None = None) -> bytes:
    """
    The ``CONNECT`` request for `host`:`port`, with Basic proxy authentication when
    `credentials` (``user:password``) are given.
    """
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
    if credentials is not None:
        token = base64.b64encode(credentials.encode()).decode("ascii")
        lines.append(f"Proxy-Authorization: Basic {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@dataclass(frozen=True)
class ConnectResponse:
    """
    The proxy's answer to ``CONNECT``.
    """

    status: int
    reason: str

    @property
    def ok(self) -> bool:
        """
        Whether the tunnel is open (any 2xx).
        """
        return 200 <= self.status < 300


class ConnectResponseParser:
    """
    Reads the proxy's response head, in any chunking; what follows it belongs to the tunnel.
    """

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> tuple[ConnectResponse, bytes] | None:
        """
        @return: the response and the bytes after its head, or None until the head is
            complete.
        @raise ProxyError: the head is not HTTP, or longer than `MAX_RESPONSE_HEAD`.
        """
        self._buffer += data
        if not b"HTTP/1.".startswith(self._buffer[:7]):
            raise ProxyError("the proxy did not answer in HTTP: is it an HTTP proxy?")
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_RESPONSE_HEAD:
                raise ProxyError(f"the proxy's response head is over {MAX_RESPONSE_HEAD} octets")
            return None
        if end > MAX_RESPONSE_HEAD:
            raise ProxyError(f"the proxy's response head is over {MAX_RESPONSE_HEAD} octets")
        head, rest = self._buffer[:end], self._buffer[end + 4 :]
        self._buffer = b""
        status_line = head.split(b"\r\n", 1)[0]
        m = _STATUS_LINE.fullmatch(status_line)
        if m is None:
            raise ProxyError("the proxy's status line is not HTTP: is it an HTTP proxy?")
        reason = (m.group(2) or b"").decode("latin-1").strip()
        return ConnectResponse(int(m.group(1)), reason), rest


class _Connecting(Protocol):
    """
    The connection to the proxy while it is asked for the tunnel; afterwards it passes
    everything between the transport and the caller's protocol.
    """

    def __init__(self, endpoint: HTTPConnectEndpoint, factory: Any) -> None:
        self.endpoint = endpoint
        # Not `factory`: Factory.buildProtocol sets that attribute to the proxy's factory.
        self.target_factory = factory
        self.parser: ConnectResponseParser | None = ConnectResponseParser()
        self.inner: Any = None
        # Cancelled (the caller gave up, e.g. a stopping agent): the proxy connection closes.
        self.result: defer.Deferred[Any] = defer.Deferred(lambda _: self._stop())
        self._timer: Any = None

    def connectionMade(self) -> None:
        e = self.endpoint
        assert self.transport is not None
        self._timer = e.reactor.callLater(e.timeout, self._timed_out)
        self.transport.write(connect_request(e.host, e.port, e.proxy.credentials))

    def _timed_out(self) -> None:
        self._timer = None
        self._fail(ProxyError(f"the proxy {self.endpoint.proxy} did not answer in time"))

    def _stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.parser = None
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def _fail(self, error: Exception) -> None:
        self._stop()
        if not self.result.called:
            self.result.errback(Failure(error))

    def dataReceived(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.dataReceived(data)
            return
        if self.parser is None:
            return
        try:
            answer = self.parser.feed(data)
        except ProxyError as e:
            self._fail(ProxyError(f"{self.endpoint.proxy}: {e}"))
            return
        if answer is None:
            return
        response, rest = answer
        proxy = self.endpoint.proxy
        if not response.ok:
            hint = ""
            if response.status == 407:
                hint = " (give credentials: http://user:password@host:port)"
            self._fail(
                ProxyError(
                    f"the proxy {proxy} refused CONNECT: {response.status} {response.reason}{hint}"
                )
            )
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.parser = None
        assert self.transport is not None
        inner = self.target_factory.buildProtocol(self.transport.getPeer())
        if inner is None:
            self._fail(ProxyError("the connection was refused by its own factory"))
            return
        self.inner = inner
        inner.makeConnection(self.transport)
        self.result.callback(inner)
        if rest:
            inner.dataReceived(rest)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.inner is not None:
            self.inner.connectionLost(reason)
        elif not self.result.called:
            self.result.errback(
                Failure(
                    ProxyError(
                        f"the proxy {self.endpoint.proxy} closed the connection before "
                        "answering CONNECT"
                    )
                )
            )


class HTTPConnectEndpoint:
    """
    A client endpoint for `host`:`port` through the HTTP proxy `proxy`, reached with
    `proxy_endpoint`. ``connect`` fires with the factory's protocol once the proxy has opened
    the tunnel, or fails with `ProxyError` (or the proxy connection's own error) within
    `timeout` seconds.
    """

    def __init__(
        self,
        reactor: Any,
        proxy_endpoint: Any,
        proxy: ProxyAddress,
        host: str,
        port: int,
        timeout: float,
    ) -> None:
        self.reactor = reactor
        self.proxy_endpoint = proxy_endpoint
        self.proxy = proxy
        self.host = host
        self.port = port
        self.timeout = timeout

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        holder: list[_Connecting] = []

        def build() -> _Connecting:
            connecting = _Connecting(self, factory)
            holder.append(connecting)
            return connecting

        proxy_factory = Factory.forProtocol(build)
        proxy_factory.noisy = False
        d: defer.Deferred[Any] = self.proxy_endpoint.connect(proxy_factory)
        # Popped: the factory (kept by the connection's connector) must not keep the
        # protocol, or a closed link would wait in a reference cycle.
        return d.addCallback(lambda _: holder.pop().result)
