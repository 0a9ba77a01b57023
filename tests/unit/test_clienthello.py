"""Tests for tunnel.relay._clienthello: the sans-IO ClientHello parser."""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
from collections.abc import Iterator, Sequence

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from OpenSSL import SSL

from tunnel.relay import _clienthello
from tunnel.relay._clienthello import (
    ALERT_DECODE_ERROR,
    ALERT_PROTOCOL_VERSION,
    ALERT_UNEXPECTED_MESSAGE,
    ALERT_UNRECOGNIZED_NAME,
    ClientHello,
    ClientHelloError,
    ClientHelloParser,
    ClientHelloTooLarge,
    InvalidServerName,
    NotTLS,
    UnexpectedMessage,
    UnsupportedVersion,
    alert_record,
)

# ---------------------------------------------------------------------------------------------
# Building ClientHellos


def _vec(width: int, data: bytes) -> bytes:
    return len(data).to_bytes(width, "big") + data


def _ext(ext_type: int, body: bytes) -> bytes:
    return struct.pack("!H", ext_type) + _vec(2, body)


def build_hello_body(
    *,
    server_name: bytes | None = None,
    alpn: Sequence[bytes] = (),
    versions: Sequence[int] = (),
    legacy_version: int = 0x0303,
    extra_extensions: Sequence[tuple[int, bytes]] = (),
    no_extensions: bool = False,
) -> bytes:
    body = struct.pack("!H", legacy_version) + bytes(range(32))
    body += _vec(1, b"\x11" * 32)
    body += _vec(2, b"\x13\x01\x13\x02\xc0\x2b")
    body += _vec(1, b"\x00")
    if no_extensions:
        return body
    exts = b""
    for t, b in extra_extensions:
        exts += _ext(t, b)
    if server_name is not None:
        exts += _ext(0, _vec(2, b"\x00" + _vec(2, server_name)))
    if alpn:
        exts += _ext(16, _vec(2, b"".join(_vec(1, p) for p in alpn)))
    if versions:
        exts += _ext(43, _vec(1, b"".join(struct.pack("!H", v) for v in versions)))
    return body + _vec(2, exts)


def handshake(body: bytes) -> bytes:
    return b"\x01" + len(body).to_bytes(3, "big") + body


def records(message: bytes, sizes: Sequence[int] = (), version: int = 0x0301) -> bytes:
    """Split ``message`` into TLS handshake records of the given payload sizes (then 2**14)."""
    out = b""
    pos = 0
    sizes_iter = iter(sizes)
    while pos < len(message):
        n = max(1, min(next(sizes_iter, 2**14), 2**14))
        chunk = message[pos : pos + n]
        out += struct.pack("!BHH", 22, version, len(chunk)) + chunk
        pos += n
    return out


def chunked(data: bytes, cuts: Sequence[int]) -> Iterator[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    prev = 0
    for p in [*points, len(data)]:
        yield data[prev:p]
        prev = p


def parse_all(data: bytes, cuts: Sequence[int] = (), max_size: int = 16384) -> ClientHello | None:
    parser = ClientHelloParser(max_size=max_size)
    result = None
    for chunk in chunked(data, cuts):
        result = parser.feed(chunk)
        if result is not None:
            break
    return result


# ---------------------------------------------------------------------------------------------
# Real ClientHellos, captured from real clients on loopback


def _read_hello(conn: socket.socket) -> bytes:
    """Read exactly the records that carry the first handshake message."""
    conn.settimeout(20)
    data = b""

    def need(n: int) -> None:
        nonlocal data
        while len(data) < n:
            chunk = conn.recv(65536)
            if not chunk:
                raise EOFError(f"client closed after {len(data)} bytes")
            data += chunk

    pos = 0
    message = b""
    while True:
        need(pos + 5)
        length = struct.unpack("!H", data[pos + 3 : pos + 5])[0]
        need(pos + 5 + length)
        message += data[pos + 5 : pos + 5 + length]
        pos += 5 + length
        if len(message) >= 4 and len(message) >= 4 + int.from_bytes(message[1:4], "big"):
            return data[:pos]


def capture(argv: list[str]) -> bytes:
    """Run a TLS client against a loopback socket that records its first flight."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        listener.settimeout(20)
        argv = [a.replace("{PORT}", str(port)) for a in argv]
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            conn, _ = listener.accept()
            with conn:
                return _read_hello(conn)
        finally:
            proc.kill()
            proc.wait(timeout=10)


def pyopenssl_hello(server_name: bytes | None, alpn: list[bytes], tls13: bool = True) -> bytes:
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    if not tls13:
        ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    if alpn:
        ctx.set_alpn_protos(alpn)
    conn = SSL.Connection(ctx, None)
    conn.set_connect_state()
    if server_name is not None:
        conn.set_tlsext_host_name(server_name)
    with pytest.raises(SSL.WantReadError):
        conn.do_handshake()
    return conn.bio_read(65536)


needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl CLI")
needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")

OPENSSL_CASES = [
    (
        ["-servername", "a.tunnel.localhost", "-alpn", "h2,http/1.1"],
        ClientHello("a.tunnel.localhost", (b"h2", b"http/1.1"), 0x0303, ()),
    ),
    (["-noservername"], ClientHello(None, (), 0x0303, ())),
    (
        ["-servername", "X.Tunnel.LOCALHOST", "-tls1_2"],
        ClientHello("x.tunnel.localhost", (), 0x0303, ()),
    ),
    (
        ["-servername", "b.tunnel.localhost", "-tls1_3"],
        ClientHello("b.tunnel.localhost", (), 0x0303, ()),
    ),
    (["-servername", "c.example", "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"], None),
]


@needs_openssl
@pytest.mark.parametrize(("args", "expected"), OPENSSL_CASES)
def test_openssl_s_client_hellos(args: list[str], expected: ClientHello | None) -> None:
    raw = capture(["openssl", "s_client", "-connect", "127.0.0.1:{PORT}", *args])
    hello = parse_all(raw)
    assert hello is not None
    if expected is None:  # TLS 1.1 only: old-style hello
        assert hello.server_name == "c.example"
        assert hello.legacy_version == 0x0302
        assert hello.supported_versions == ()
        return
    assert hello.server_name == expected.server_name
    assert hello.alpn == expected.alpn
    assert hello.legacy_version == expected.legacy_version
    if "-tls1_2" in args:
        assert 0x0304 not in hello.supported_versions
    else:
        assert 0x0304 in hello.supported_versions


@needs_curl
@pytest.mark.parametrize(
    ("args", "alpn"),
    [([], (b"h2", b"http/1.1")), (["--http1.1"], (b"http/1.1",)), (["--no-alpn"], ())],
)
def test_curl_hellos(args: list[str], alpn: tuple[bytes, ...]) -> None:
    # curl 7.88 offers h2 only when built with nghttp2; accept either form of the default.
    raw = capture(
        [
            "curl",
            "-s",
            "--max-time",
            "20",
            "--resolve",
            "a.tunnel.localhost:{PORT}:127.0.0.1",
            *args,
            "https://a.tunnel.localhost:{PORT}/",
        ]
    )
    hello = parse_all(raw)
    assert hello is not None
    assert hello.server_name == "a.tunnel.localhost"
    if args:
        assert hello.alpn == alpn
    else:
        assert hello.alpn in {alpn, (b"http/1.1",)}


@pytest.mark.parametrize("tls13", [True, False])
def test_pyopenssl_hello(tls13: bool) -> None:
    raw = pyopenssl_hello(b"k3j5h2g7d9q1xwzp.tunnel.localhost", [b"tunnel/1"], tls13)
    hello = parse_all(raw)
    assert hello == ClientHello(
        "k3j5h2g7d9q1xwzp.tunnel.localhost",
        (b"tunnel/1",),
        0x0303,
        hello.supported_versions if hello else (),
    )
    assert hello is not None
    assert (0x0304 in hello.supported_versions) == tls13


@pytest.fixture(scope="module")
def real_hellos() -> list[bytes]:
    hellos = [
        pyopenssl_hello(b"a.tunnel.localhost", [b"h2", b"http/1.1"]),
        pyopenssl_hello(None, []),
    ]
    if shutil.which("openssl"):
        hellos.append(
            capture(
                [
                    "openssl",
                    "s_client",
                    "-connect",
                    "127.0.0.1:{PORT}",
                    "-servername",
                    "z.tunnel.localhost",
                    "-alpn",
                    "http/1.1",
                ]
            )
        )
    return hellos


# ---------------------------------------------------------------------------------------------
# Properties

SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@SETTINGS
@given(
    which=st.integers(0, 10),
    record_sizes=st.lists(st.integers(1, 600), max_size=20),
    cuts=st.lists(st.integers(0, 10_000), max_size=30),
)
def test_any_chunking_same_result(
    real_hellos: list[bytes], which: int, record_sizes: list[int], cuts: list[int]
) -> None:
    raw = real_hellos[which % len(real_hellos)]
    expected = parse_all(raw)
    assert expected is not None
    # Re-split the handshake message into records of arbitrary sizes.
    message = _message_of(raw)
    resplit = records(message, record_sizes)
    assert parse_all(resplit, cuts) == expected
    assert parse_all(raw, cuts) == expected


def _message_of(raw: bytes) -> bytes:
    out = b""
    pos = 0
    while pos < len(raw):
        length = struct.unpack("!H", raw[pos + 3 : pos + 5])[0]
        out += raw[pos + 5 : pos + 5 + length]
        pos += 5 + length
    return out


hostnames = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]{1,10}){0,4}\Z")
protocols = st.binary(min_size=1, max_size=20)


@SETTINGS
@given(
    name=st.none() | hostnames,
    alpn=st.lists(protocols, max_size=5),
    versions=st.lists(st.integers(0, 0xFFFF), max_size=5),
    extra=st.lists(
        st.tuples(
            st.integers(1, 0xFFFF).filter(lambda t: t not in (16, 43)), st.binary(max_size=50)
        ),
        max_size=4,
        unique_by=lambda t: t[0],
    ),
    record_sizes=st.lists(st.integers(1, 300), max_size=10),
    cuts=st.lists(st.integers(0, 2000), max_size=10),
)
def test_generated_hellos_roundtrip(
    name: str | None,
    alpn: list[bytes],
    versions: list[int],
    extra: list[tuple[int, bytes]],
    record_sizes: list[int],
    cuts: list[int],
) -> None:
    body = build_hello_body(
        server_name=name.encode() if name is not None else None,
        alpn=alpn,
        versions=versions,
        extra_extensions=[(t, b) for t, b in extra if t != 0],
    )
    hello = parse_all(records(handshake(body), record_sizes), cuts)
    assert hello == ClientHello(name, tuple(alpn), 0x0303, tuple(versions))


@SETTINGS
@given(data=st.binary(max_size=3000), cuts=st.lists(st.integers(0, 3000), max_size=10))
@example(data=b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", cuts=[])
@example(data=b"\x16\x03\x01\x00\x00", cuts=[])
@example(data=b"\x16\x03\x01\xff\xff", cuts=[])
def test_random_bytes_only_clienthello_errors(data: bytes, cuts: list[int]) -> None:
    try:
        parse_all(data, cuts)
    except ClientHelloError as e:
        assert 0 < e.alert < 256


@SETTINGS
@given(
    which=st.integers(0, 10),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.integers(0, 10_000),
)
def test_mutated_real_hellos(
    real_hellos: list[bytes], which: int, flips: list[tuple[int, int]], cut: int
) -> None:
    raw = bytearray(real_hellos[which % len(real_hellos)])
    for pos, value in flips:
        raw[pos % len(raw)] = value
    truncated = bytes(raw[: cut % (len(raw) + 1)])
    for data in (bytes(raw), truncated):
        try:
            hello = parse_all(data, [cut])
        except ClientHelloError:
            continue
        if hello is not None:
            assert hello.server_name is None or hello.server_name == hello.server_name.lower()


@SETTINGS
@given(prefix=st.binary(max_size=40), filler=st.integers(0, 255))
def test_bounded_input_always_decides(prefix: bytes, filler: int) -> None:
    """Past the worst-case bound, the parser has a hello or an error: it never waits forever."""
    max_size = 256
    parser = ClientHelloParser(max_size=max_size)
    bound = 6 * max_size + 2**14 + 5
    data = (b"\x16\x03\x01" + prefix + bytes([filler]) * bound)[: bound + 1]
    try:
        result = None
        for i in range(0, len(data), 97):
            result = parser.feed(data[i : i + 97])
            if result is not None:
                break
        assert result is not None
    except ClientHelloError:
        pass


# ---------------------------------------------------------------------------------------------
# Specific cases


def test_size_bound_enforced_from_the_header() -> None:
    body = build_hello_body(server_name=b"a.b", extra_extensions=[(21, b"\x00" * 5000)])
    raw = records(handshake(body))
    assert parse_all(raw, max_size=8192) is not None
    parser = ClientHelloParser(max_size=4096)
    with pytest.raises(ClientHelloTooLarge) as info:
        parser.feed(raw[:9])  # record header + handshake header is enough to know
    assert info.value.alert == ALERT_DECODE_ERROR
    with pytest.raises(ClientHelloTooLarge):
        parser.feed(b"more")  # the error is sticky


def test_record_too_large() -> None:
    with pytest.raises(ClientHelloTooLarge):
        ClientHelloParser().feed(b"\x16\x03\x01\x40\x01")


def test_not_tls_is_detected_on_the_first_byte() -> None:
    with pytest.raises(NotTLS):
        ClientHelloParser().feed(b"G")
    with pytest.raises(NotTLS):
        ClientHelloParser().feed(b"\x16\x04")
    # SSLv2-compatible hello
    with pytest.raises(NotTLS):
        ClientHelloParser().feed(b"\x80\x2e\x01\x00\x02")


def test_sslv3_rejected_with_protocol_version() -> None:
    raw = records(handshake(build_hello_body(legacy_version=0x0300, no_extensions=True)))
    with pytest.raises(UnsupportedVersion) as info:
        parse_all(raw)
    assert info.value.alert == ALERT_PROTOCOL_VERSION


def test_hello_without_extensions() -> None:
    raw = records(handshake(build_hello_body(legacy_version=0x0301, no_extensions=True)))
    assert parse_all(raw) == ClientHello(None, (), 0x0301, ())


def test_interleaved_non_handshake_record() -> None:
    message = handshake(build_hello_body(server_name=b"a.b"))
    raw = records(message[:10]) + alert_record(0) + records(message[10:])
    with pytest.raises(UnexpectedMessage) as info:
        parse_all(raw)
    assert info.value.alert == ALERT_UNEXPECTED_MESSAGE


def test_other_handshake_message_first() -> None:
    with pytest.raises(UnexpectedMessage):
        ClientHelloParser().feed(b"\x16\x03\x01\x00\x04\x02\x00\x00\x00")


def test_trailing_handshake_bytes_rejected() -> None:
    message = handshake(build_hello_body(server_name=b"a.b")) + b"\x14"
    with pytest.raises(UnexpectedMessage):
        parse_all(records(message))


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"A.Tunnel.LocalHost.", "a.tunnel.localhost"),
        ("bücher.test".encode(), "xn--bcher-kva.test"),
        (b"xn--bcher-kva.test", "xn--bcher-kva.test"),
        (b"under_score.test", "under_score.test"),
    ],
)
def test_server_name_normalized(raw: bytes, expected: str) -> None:
    hello = parse_all(records(handshake(build_hello_body(server_name=raw))))
    assert hello is not None
    assert hello.server_name == expected


@pytest.mark.parametrize("raw", [b".", b"a..b", b"a b", b"\xff\xfe", b"."])
def test_bad_server_names(raw: bytes) -> None:
    with pytest.raises(InvalidServerName) as info:
        parse_all(records(handshake(build_hello_body(server_name=raw))))
    assert info.value.alert == ALERT_UNRECOGNIZED_NAME


def test_result_is_sticky() -> None:
    raw = records(handshake(build_hello_body(server_name=b"a.b")))
    parser = ClientHelloParser()
    hello = parser.feed(raw)
    assert hello is not None
    assert parser.done
    assert parser.feed(b"\x17\x03\x03 anything") is hello


def test_alert_record() -> None:
    assert alert_record(112) == b"\x15\x03\x03\x00\x02\x02\x70"
    assert alert_record(50, version=0x0301) == b"\x15\x03\x01\x00\x02\x02\x32"


def test_exports() -> None:
    for name in _clienthello.__all__:
        assert hasattr(_clienthello, name)
