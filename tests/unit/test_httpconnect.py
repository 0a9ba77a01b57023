"""HTTP CONNECT to reach the relay through a proxy: the sans-IO parts and the endpoint,
driven with in-memory transports and a fake clock."""

from __future__ import annotations

import base64
import itertools
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from tunnel.agent._httpconnect import (
    MAX_RESPONSE_HEAD,
    ConnectResponse,
    ConnectResponseParser,
    HTTPConnectEndpoint,
    ProxyAddress,
    ProxyError,
    connect_request,
    parse_proxy_url,
)


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("http://proxy.example:3128", ProxyAddress("proxy.example", 3128)),
        ("http://proxy.example", ProxyAddress("proxy.example", 80)),
        ("http://10.0.0.1:8080/", ProxyAddress("10.0.0.1", 8080)),
        ("http://[::1]:3128", ProxyAddress("::1", 3128)),
        ("http://me:s%40cret@p:1", ProxyAddress("p", 1, "me:s@cret")),
        ("http://me@p:1", ProxyAddress("p", 1, "me:")),
    ],
)
def test_proxy_urls(url: str, address: ProxyAddress) -> None:
    parsed = parse_proxy_url(url)
    assert parsed == address and parsed.credentials == address.credentials


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("https://p:1", "only http://"),
        ("socks5://p:1", "only http://"),
        ("p:3128", "only http://"),
        ("http://:3128", "is not http://"),
        ("http://p:99999", "bad port"),
        ("http://p:1/path", "is not http://"),
    ],
)
def test_bad_proxy_urls(url: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_proxy_url(url)


def test_credentials_are_not_in_the_address_repr() -> None:
    address = parse_proxy_url("http://me:secret@p:1")
    assert "secret" not in repr(address) and "secret" not in str(address)


def test_connect_request() -> None:
    assert connect_request("relay.example", 443) == (
        b"CONNECT relay.example:443 HTTP/1.1\r\nHost: relay.example:443\r\n\r\n"
    )
    with_auth = connect_request("::1", 8443, "me:pw")
    token = base64.b64encode(b"me:pw")
    assert with_auth == (
        b"CONNECT [::1]:8443 HTTP/1.1\r\nHost: [::1]:8443\r\n"
        b"Proxy-Authorization: Basic " + token + b"\r\n\r\n"
    )


RESPONSE = b"HTTP/1.1 200 Connection established\r\nVia: test\r\n\r\n"


@given(cuts=st.lists(st.integers(0, len(RESPONSE) + 5), max_size=6), extra=st.binary(max_size=40))
def test_response_in_any_chunking(cuts: list[int], extra: bytes) -> None:
    data = RESPONSE + extra
    bounds = sorted({0, len(data), *(min(c, len(data)) for c in cuts)})
    parser = ConnectResponseParser()
    chunks = [data[a:b] for a, b in itertools.pairwise(bounds)]
    index, answer = 0, parser.feed(chunks[0])
    while answer is None:
        index += 1
        assert index < len(chunks), "never complete"
        answer = parser.feed(chunks[index])
    response, rest = answer
    assert response == ConnectResponse(200, "Connection established") and response.ok
    # What follows the head is the tunnel's: the rest of this chunk, then the later ones.
    assert rest + b"".join(chunks[index + 1 :]) == extra


@pytest.mark.parametrize(
    ("data", "status", "reason"),
    [
        (b"HTTP/1.0 200\r\n\r\n", 200, ""),
        (
            b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n",
            407,
            "Proxy Authentication Required",
        ),
        (b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n", 403, "Forbidden"),
    ],
)
def test_statuses(data: bytes, status: int, reason: str) -> None:
    answer = ConnectResponseParser().feed(data)
    assert answer is not None
    assert answer[0] == ConnectResponse(status, reason)
    assert answer[0].ok == (status == 200)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"SSH-2.0-OpenSSH_9.2\r\n", "did not answer in HTTP"),
        (b"\x16\x03\x01\x00", "did not answer in HTTP"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", "status line is not HTTP"),
        (b"HTTP/1.1 OK\r\n\r\n", "status line is not HTTP"),
        (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * (MAX_RESPONSE_HEAD // 6), "over"),
    ],
)
def test_bad_responses(data: bytes, why: str) -> None:
    with pytest.raises(ProxyError, match=why):
        ConnectResponseParser().feed(data)


# -- the endpoint, over memory ---------------------------------------------------------------


class _Inner(protocol.Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.lost = reason


class _ProxyEndpoint:
    """Connects the proxy factory's protocol to a StringTransport at once."""

    def __init__(self) -> None:
        self.transport = StringTransport()
        self.protocol: Any = None

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        self.protocol = factory.buildProtocol(None)
        self.protocol.makeConnection(self.transport)
        return defer.succeed(self.protocol)


def _endpoint(credentials: str | None = None) -> tuple[Any, _ProxyEndpoint, MemoryReactorClock]:
    clock = MemoryReactorClock()
    proxy = _ProxyEndpoint()
    address = ProxyAddress("proxy.example", 3128, credentials)
    return HTTPConnectEndpoint(clock, proxy, address, "relay.example", 443, 10.0), proxy, clock


def _result(d: defer.Deferred[Any]) -> list[Any]:
    out: list[Any] = []
    d.addBoth(out.append)
    return out


def test_tunnel_opened_then_bytes_pass_both_ways() -> None:
    endpoint, proxy, _ = _endpoint("me:pw")
    inner = _Inner()
    out = _result(endpoint.connect(protocol.Factory.forProtocol(lambda: inner)))
    assert proxy.transport.value().startswith(b"CONNECT relay.example:443 HTTP/1.1\r\n")
    assert b"Proxy-Authorization: Basic " in proxy.transport.value()
    assert out == []
    proxy.transport.clear()
    proxy.protocol.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nfirst")
    assert out == [inner] and inner.received == b"first"
    assert inner.transport is proxy.transport
    proxy.protocol.dataReceived(b" more")
    assert inner.received == b"first more"
    inner.transport.write(b"up")
    assert proxy.transport.value() == b"up"
    proxy.protocol.connectionLost(Failure(ConnectionResetError()))
    assert inner.lost is not None


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n", "407 .*give credentials"),
        (b"HTTP/1.1 403 Forbidden\r\n\r\n", "refused CONNECT: 403 Forbidden"),
        (b"garbage\r\n\r\n", "did not answer in HTTP"),
    ],
)
def test_refusals_fail_the_connect_and_close(answer: bytes, why: str) -> None:
    endpoint, proxy, _ = _endpoint()
    out = _result(endpoint.connect(protocol.Factory.forProtocol(_Inner)))
    proxy.protocol.dataReceived(answer)
    assert len(out) == 1 and isinstance(out[0], Failure)
    assert out[0].check(ProxyError) and re.search(why, str(out[0].value))
    assert proxy.transport.disconnecting or proxy.transport.disconnected


def test_a_silent_proxy_times_out() -> None:
    endpoint, _, clock = _endpoint()
    out = _result(endpoint.connect(protocol.Factory.forProtocol(_Inner)))
    clock.advance(9.9)
    assert out == []
    clock.advance(0.2)
    assert len(out) == 1 and out[0].check(ProxyError)
    assert "did not answer in time" in str(out[0].value)


def test_a_proxy_that_closes_before_answering() -> None:
    endpoint, proxy, clock = _endpoint()
    out = _result(endpoint.connect(protocol.Factory.forProtocol(_Inner)))
    proxy.protocol.connectionLost(Failure(ConnectionResetError()))
    assert len(out) == 1 and out[0].check(ProxyError)
    assert "closed the connection before answering" in str(out[0].value)
    assert not clock.getDelayedCalls()


def test_cancelling_closes_the_proxy_connection() -> None:
    endpoint, proxy, clock = _endpoint()
    d = endpoint.connect(protocol.Factory.forProtocol(_Inner))
    out = _result(d)
    d.cancel()
    assert len(out) == 1 and out[0].check(defer.CancelledError)
    assert proxy.transport.disconnecting or proxy.transport.disconnected
    assert not clock.getDelayedCalls()
