"""
The SNI-dispatching TLS front on a real loopback port, driven by real clients.

openssl s_client and curl run as child processes through ``reactor.spawnProcess`` so the
reactor (and the server under test) keeps running.  Every wait has a deadline; none sleeps.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from OpenSSL import SSL
from twisted.internet import defer, protocol, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IListeningPort, IReactorCore
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.python.failure import Failure

from tunnel.relay._certs import DevCertificates
from tunnel.relay._clienthello import ClientHello
from tunnel.relay._sni import Route, SNIDispatchFactory
from tunnel.relay._tls import ALPN_H2, ALPN_HTTP1, RelayTLS

DEADLINE = 20.0


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (run `make deps`)")
    return path


def get_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


# ---------------------------------------------------------------------------------------------
# Servers behind the front


class EchoOrHTTP(protocol.Protocol):
    """Echoes bytes; answers an HTTP/1.1 request with a tiny response and closes."""

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        if data.startswith((b"GET ", b"HEAD ")):
            proto = getattr(self.transport, "negotiatedProtocol", None)
            body = b"hello from the tunnel; alpn=" + (proto or b"none") + b"\n"
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            self.transport.loseConnection()
        else:
            self.transport.write(data)


class Front:
    def __init__(self, dev_certs: DevCertificates, **kwargs: Any) -> None:
        self.tls = RelayTLS(dev_certs.cert_path, dev_certs.key_path)
        self.inner = protocol.Factory.forProtocol(EchoOrHTTP)
        self.hellos: list[ClientHello] = []
        self.factory = SNIDispatchFactory(self.route, get_reactor(), **kwargs)
        self.port: IListeningPort | None = None

    def route(self, hello: ClientHello) -> Route | None:
        self.hellos.append(hello)
        name = hello.server_name
        if name == "a.tunnel.localhost":
            return Route(self.tls.context_for(ALPN_HTTP1), self.inner)
        if name == "h2.tunnel.localhost":
            return Route(self.tls.context_for(ALPN_H2), self.inner)
        if name == "noalpn.tunnel.localhost":
            return Route(self.tls.context_for(()), self.inner)
        if name == "boom.tunnel.localhost":
            raise RuntimeError("router bug")
        return None

    def listen(self) -> int:
        self.port = get_reactor().listenTCP(0, self.factory, interface="127.0.0.1")
        return int(self.port.getHost().port)

    async def close(self) -> None:
        if self.port is not None:
            await self.port.stopListening()


@pytest.fixture
def front_factory(dev_certs: DevCertificates) -> Callable[..., Front]:
    def make(**kwargs: Any) -> Front:
        return Front(dev_certs, **kwargs)

    return make


# ---------------------------------------------------------------------------------------------
# Clients


class ProcessResult(protocol.ProcessProtocol):
    def __init__(self, until: bytes | None) -> None:
        self.out = b""
        self.err = b""
        self.until = until
        self.code: int | None = None
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.seen: defer.Deferred[None] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data
        if self.until is not None and self.until in self.out and not self.seen.called:
            self.seen.callback(None)

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        self.code = getattr(reason.value, "exitCode", None)
        if not self.seen.called:
            self.seen.callback(None)
        self.ended.callback(None)


async def run(
    argv: list[str], stdin: bytes = b"", until: bytes | None = None, keep_stdin: bool = False
) -> ProcessResult:
    """
    Run ``argv``; return once it exits or (with ``until``) once its stdout shows ``until``,
    killing it then.  Fails the test past the deadline.
    """
    reactor = get_reactor()
    result = ProcessResult(until)
    proc = reactor.spawnProcess(result, argv[0], argv, env=dict(os.environ))
    if stdin:
        proc.write(stdin)
    if not keep_stdin:
        proc.closeStdin()
    killer = reactor.callLater(DEADLINE, lambda: proc.signalProcess("KILL"))
    try:
        await (result.seen if until is not None else result.ended)
        if not result.ended.called:
            proc.signalProcess("KILL")
        await result.ended
    finally:
        if killer.active():
            killer.cancel()
    return result


def s_client(openssl: str, port: int, ca: str, *args: str) -> list[str]:
    return [openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", ca, *args]


def curl(curl_bin: str, port: int, ca: str, name: str, *args: str) -> list[str]:
    return [
        curl_bin,
        "-sS",
        "--max-time",
        "15",
        "--cacert",
        ca,
        "--resolve",
        f"{name}:{port}:127.0.0.1",
        *args,
        f"https://{name}:{port}/",
    ]


class Recorder(protocol.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.lost_at: float | None = None
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.lost_at = time.monotonic()
        self.reason = reason
        self.lost.callback(None)


async def raw_connect(port: int, send: bytes = b"", source: str | None = None) -> Recorder:
    reactor = get_reactor()
    rec = Recorder()
    bind = (source, 0) if source is not None else None
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=bind), rec)
    if send:
        assert rec.transport is not None
        rec.transport.write(send)
    return rec


async def wait_lost(rec: Recorder, timeout: float = DEADLINE) -> None:
    reactor = get_reactor()
    await rec.lost.addTimeout(timeout, reactor)


async def wait_until(predicate: Callable[[], bool], timeout: float = DEADLINE) -> None:
    reactor: IReactorCore = get_reactor()
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached before the deadline")
        await task.deferLater(reactor, 0.01, lambda: None)


def pyopenssl_hello(server_name: bytes) -> bytes:
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    conn = SSL.Connection(ctx, None)
    conn.set_connect_state()
    conn.set_tlsext_host_name(server_name)
    try:
        conn.do_handshake()
    except SSL.WantReadError:
        pass
    return conn.bio_read(65536)


# ---------------------------------------------------------------------------------------------
# (a) s_client with SNI: handshake, certificate verifies, bytes echo


@pytest_twisted.ensureDeferred
async def test_s_client_handshake_and_echo(
    front_factory: Callable[..., Front], dev_certs: DevCertificates
) -> None:
    openssl = require_tool("openssl")
    front = front_factory()
    port = front.listen()
    try:
        result = await run(
            s_client(
                openssl,
                port,
                dev_certs.ca_path,
                "-servername",
                "a.tunnel.localhost",
                "-verify_hostname",
                "a.tunnel.localhost",
                "-verify_return_error",
                "-ign_eof",
            ),
            stdin=b"ping-7c1f\n",
            until=b"ping-7c1f",
            keep_stdin=True,
        )
    finally:
        await front.close()
    assert b"Verify return code: 0 (ok)" in result.out, result.out + result.err
    assert b"ping-7c1f" in result.out.split(b"---")[-1]
    assert front.hellos[0].server_name == "a.tunnel.localhost"
    await wait_until(lambda: front.factory.pending == 0)


# ---------------------------------------------------------------------------------------------
# (b), (c) unknown SNI and no SNI: unrecognized_name alert


@pytest.mark.parametrize(
    "args",
    [
        ["-servername", "unknown.tunnel.localhost"],
        ["-noservername"],
        ["-servername", "boom.tunnel.localhost"],  # the router raises: same answer
    ],
)
@pytest_twisted.ensureDeferred
async def test_unrouted_gets_unrecognized_name(
    front_factory: Callable[..., Front],
    dev_certs: DevCertificates,
    args: list[str],
    logged_failures: list[dict[str, Any]],
) -> None:
    openssl = require_tool("openssl")
    front = front_factory()
    port = front.listen()
    try:
        result = await run(s_client(openssl, port, dev_certs.ca_path, *args))
    finally:
        await front.close()
    output = result.out + result.err
    assert result.code != 0
    assert b"alert number 112" in output or b"unrecognized name" in output, output
    await wait_until(lambda: front.factory.pending == 0)
    if "boom.tunnel.localhost" in args:
        assert len(logged_failures) == 1  # the router's exception, logged once
    else:
        assert logged_failures == []


# ---------------------------------------------------------------------------------------------
# (d) TLS 1.1: protocol_version alert from the TLS layer


@pytest_twisted.ensureDeferred
async def test_tls_1_1_refused(
    front_factory: Callable[..., Front], dev_certs: DevCertificates
) -> None:
    openssl = require_tool("openssl")
    front = front_factory()
    port = front.listen()
    try:
        result = await run(
            s_client(
                openssl,
                port,
                dev_certs.ca_path,
                "-servername",
                "a.tunnel.localhost",
                "-tls1_1",
                "-cipher",
                "DEFAULT@SECLEVEL=0",
            )
        )
    finally:
        await front.close()
    output = result.out + result.err
    assert result.code != 0
    assert b"protocol version" in output or b"alert number 70" in output, output
    await wait_until(lambda: front.factory.pending == 0)


# ---------------------------------------------------------------------------------------------
# (e) curl: with ALPN (h2,http/1.1 offered), --http1.1, --no-alpn; contexts with and without
# an ALPN preference


@pytest.mark.parametrize(
    ("name", "args", "alpn"),
    [
        ("a.tunnel.localhost", [], b"http/1.1"),
        ("a.tunnel.localhost", ["--http1.1"], b"http/1.1"),
        ("a.tunnel.localhost", ["--no-alpn"], b"none"),
        # No ALPN preference on the server: an ALPN-offering client must still get through.
        ("noalpn.tunnel.localhost", [], b"none"),
        ("noalpn.tunnel.localhost", ["--http1.1"], b"none"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_curl(
    front_factory: Callable[..., Front],
    dev_certs: DevCertificates,
    name: str,
    args: list[str],
    alpn: bytes,
) -> None:
    curl_bin = require_tool("curl")
    front = front_factory()
    port = front.listen()
    try:
        result = await run(curl(curl_bin, port, dev_certs.ca_path, name, *args))
    finally:
        await front.close()
    assert result.code == 0, result.err
    assert result.out == b"hello from the tunnel; alpn=" + alpn + b"\n"


# ---------------------------------------------------------------------------------------------
# ALPN selection against Twisted's own TLS client (in-process)


class ALPNClient(protocol.Protocol):
    def __init__(self) -> None:
        self.done: defer.Deferred[bytes | None] = defer.Deferred()
        self.data = b""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"GET / HTTP/1.1\r\n\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.done.callback(self.data)


@pytest.mark.parametrize(
    ("name", "offered", "expected"),
    [
        ("h2.tunnel.localhost", [b"h2", b"http/1.1"], b"h2"),
        ("h2.tunnel.localhost", [b"http/1.1", b"h2"], b"h2"),  # our preference wins
        ("h2.tunnel.localhost", [b"http/1.1"], b"http/1.1"),
        ("h2.tunnel.localhost", [b"spdy/3", b"foo"], b"none"),  # no overlap: no ALPN, no alert
        ("a.tunnel.localhost", [b"h2"], b"none"),
        ("noalpn.tunnel.localhost", [b"h2", b"http/1.1"], b"none"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_alpn_selection(
    front_factory: Callable[..., Front],
    dev_certs: DevCertificates,
    name: str,
    offered: list[bytes],
    expected: bytes,
) -> None:
    reactor = get_reactor()
    front = front_factory()
    port = front.listen()
    try:
        with open(dev_certs.ca_path, "rb") as f:
            ca = Certificate.loadPEM(f.read())
        options = optionsForClientTLS(name, trustRoot=ca, acceptableProtocols=offered)
        client = ALPNClient()
        from twisted.internet.endpoints import wrapClientTLS

        endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", port))
        await connectProtocol(endpoint, client)
        data = await client.done.addTimeout(DEADLINE, reactor)
    finally:
        await front.close()
    assert data.endswith(b"alpn=" + expected + b"\n"), data


# ---------------------------------------------------------------------------------------------
# (f) handshake timeout: silent and half-hello sockets are aborted; real handshakes still work


@pytest_twisted.ensureDeferred
async def test_handshake_timeout(
    front_factory: Callable[..., Front], dev_certs: DevCertificates
) -> None:
    curl_bin = require_tool("curl")
    front = front_factory(handshake_timeout=0.5)
    port = front.listen()
    try:
        started = time.monotonic()
        silent = await raw_connect(port)
        half = await raw_connect(port, pyopenssl_hello(b"a.tunnel.localhost")[:60])
        # Data but still not a complete TLS handshake: the hello arrives, the handshake stalls.
        hello_only = await raw_connect(port, pyopenssl_hello(b"a.tunnel.localhost"))
        good = await run(curl(curl_bin, port, dev_certs.ca_path, "a.tunnel.localhost"))
        assert good.code == 0, good.err
        for rec in (silent, half, hello_only):
            await wait_lost(rec, timeout=5)
            assert rec.lost_at is not None
            assert rec.lost_at - started >= 0.45
        assert half.data == b""  # aborted without a reply
        await wait_until(lambda: front.factory.pending == 0)
    finally:
        await front.close()


# ---------------------------------------------------------------------------------------------
# Pending-handshake bound


@pytest_twisted.ensureDeferred
async def test_max_pending_handshakes(
    front_factory: Callable[..., Front], dev_certs: DevCertificates
) -> None:
    curl_bin = require_tool("curl")
    front = front_factory(max_pending_handshakes=2, handshake_timeout=30, client_hello_timeout=30)
    port = front.listen()
    try:
        # Stalled after a complete ClientHello: not silent, so never evicted for a newcomer.
        hello = pyopenssl_hello(b"a.tunnel.localhost")
        idle = [await raw_connect(port, hello), await raw_connect(port, hello)]
        await wait_until(lambda: len(front.hellos) == 2)
        await wait_until(lambda: front.factory.pending == 2)
        extra = await raw_connect(port)
        await wait_lost(extra, timeout=5)
        assert front.factory.refused_overload == 1
        for rec in idle:
            assert rec.transport is not None
            rec.transport.loseConnection()
            await wait_lost(rec)
        await wait_until(lambda: front.factory.pending == 0)
        good = await run(curl(curl_bin, port, dev_certs.ca_path, "a.tunnel.localhost"))
        assert good.code == 0, good.err
    finally:
        await front.close()


@pytest_twisted.ensureDeferred
async def test_max_pending_per_source(
    front_factory: Callable[..., Front], dev_certs: DevCertificates
) -> None:
    """One source's silent connections take only its own share of handshake slots."""
    curl_bin = require_tool("curl")
    front = front_factory(
        max_pending_handshakes=10,
        max_pending_per_source=2,
        handshake_timeout=30,
        client_hello_timeout=30,
    )
    port = front.listen()
    try:
        # Stalled after a complete ClientHello: not silent, so never evicted for a newcomer.
        hello = pyopenssl_hello(b"a.tunnel.localhost")
        flood = [await raw_connect(port, hello, source="127.0.0.2") for _ in range(2)]
        await wait_until(lambda: front.factory.pending == 2 and len(front.hellos) == 2)
        extra = await raw_connect(port, source="127.0.0.2")
        await wait_lost(extra, timeout=5)
        assert front.factory.refused_overload == front.factory.refused_source_overload == 1
        # Another source still gets its handshakes, silent or real.
        other = await raw_connect(port, source="127.0.0.3")
        await wait_until(lambda: front.factory.pending == 3)
        good = await run(curl(curl_bin, port, dev_certs.ca_path, "a.tunnel.localhost"))
        assert good.code == 0, good.err
        assert other.lost_at is None and all(rec.lost_at is None for rec in flood)
        for rec in [*flood, other]:
            assert rec.transport is not None
            rec.transport.loseConnection()
            await wait_lost(rec)
        await wait_until(lambda: front.factory.pending == 0)
        assert front.factory._pending_by_source == {}
        # The source's slots are free again.
        again = await raw_connect(port, source="127.0.0.2")
        await wait_until(lambda: front.factory.pending == 1)
        assert again.transport is not None
        again.transport.loseConnection()
        await wait_lost(again)
    finally:
        await front.close()


def test_sources_are_ipv4_addresses_and_ipv6_slash_64s() -> None:
    from twisted.internet.address import IPv4Address, IPv6Address

    from tunnel.relay._sni import source_of

    assert source_of(IPv4Address("TCP", "192.0.2.7", 1)) == "192.0.2.7"
    assert source_of(IPv6Address("TCP", "::ffff:192.0.2.7", 1)) == "192.0.2.7"
    assert source_of(IPv6Address("TCP", "2001:db8:1:2:3:4:5:6", 1)) == "2001:db8:1:2::/64"
    assert source_of(IPv6Address("TCP", "2001:db8:1:2::9", 1)) == "2001:db8:1:2::/64"
    assert source_of(object()) == ""


# ---------------------------------------------------------------------------------------------
# (g) garbage


@pytest.mark.parametrize(
    ("payload", "expect_alert"),
    [
        (b"GET / HTTP/1.1\r\nHost: a.tunnel.localhost\r\n\r\n", False),
        (b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00", True),  # ServerHello first: alert
        (b"\x16\x03\x01\xff\xff" + b"\x00" * 10, True),  # record too large: alert
    ],
)
@pytest_twisted.ensureDeferred
async def test_garbage_closed(
    front_factory: Callable[..., Front],
    payload: bytes,
    expect_alert: bool,
    logged_failures: list[dict[str, Any]],
) -> None:
    front = front_factory()
    port = front.listen()
    try:
        rec = await raw_connect(port, payload)
        await wait_lost(rec, timeout=5)
    finally:
        await front.close()
    if expect_alert:
        assert rec.data[:1] == b"\x15" and len(rec.data) == 7
    else:
        assert rec.data == b""
    assert front.factory.pending == 0
    assert logged_failures == []
