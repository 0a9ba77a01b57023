"""Tests for tunnel.wire.control: control messages and OPEN metadata."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel.wire import control as C

# Valid values of each kind of member (every string encodes to UTF-8 and is in bounds).
text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
printable = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=30)
opt_text = st.none() | text
label = st.from_regex(r"\A[a-z0-9](?:[a-z0-9-]{0,14}[a-z0-9])?\Z")
host = st.from_regex(r"\A[A-Za-z0-9.-]{1,40}\Z")
code = st.from_regex(r"\A[A-Za-z0-9_.-]{1,20}\Z")
ints = st.integers(0, C.MAX_REQUEST_ID)
ports = st.integers(0, 65535)
opt_port = st.none() | ports
seconds = st.floats(min_value=0.001, max_value=86400)
options = st.dictionaries(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=8),
    st.booleans() | ints | text,
    max_size=4,
)

pem = st.from_regex(r"\A-----BEGIN [A-Z ]{1,20}-----\n[A-Za-z0-9+/=\n]{0,200}\Z")

messages: st.SearchStrategy[C.ControlMessage] = st.one_of(
    st.builds(C.AgentHello, version=st.integers(0, 255), token=opt_text, agent=printable),
    st.builds(
        C.RelayWelcome,
        domain=host,
        public_port=ports,
        keepalive_interval=seconds,
        keepalive_timeout=seconds,
        relay=printable,
        features=st.lists(code, max_size=5),
    ),
    st.builds(C.ErrorMessage, code=code, message=text),
    st.builds(
        C.TunnelRequest,
        request_id=ints,
        kind=st.sampled_from(["tls", "tcp", "passthrough"]),
        options=options,
        reclaim_id=st.none() | label,
        reclaim_secret=opt_text,
        reclaim_port=opt_port,
    ),
    st.builds(
        C.TunnelGranted,
        request_id=ints,
        tunnel_id=label,
        host=host,
        port=ports,
        tcp_host=st.none() | host,
        tcp_port=opt_port,
        secret=text,
        rate_limit=st.none() | st.integers(1, 10**15),
    ),
    st.builds(C.TunnelRefused, request_id=ints, code=code, message=text),
    st.builds(C.TunnelClose, tunnel_id=label),
    st.builds(C.TunnelClosed, tunnel_id=label, reason=text),
    st.builds(C.CertificateRequest, request_id=ints, tunnel_id=label, csr=pem),
    st.builds(C.CertificateIssued, request_id=ints, chain=pem),
    st.builds(C.CertificateRefused, request_id=ints, code=code, message=text),
)


@given(messages)
def test_round_trip(message: C.ControlMessage) -> None:
    assert C.decode_message(C.encode_message(message)) == message


def test_every_message_type_covered() -> None:
    types: set[type[C.ControlMessage]] = {
        C.AgentHello,
        C.RelayWelcome,
        C.ErrorMessage,
        C.TunnelRequest,
        C.TunnelGranted,
        C.TunnelRefused,
        C.TunnelClose,
        C.TunnelClosed,
        C.CertificateRequest,
        C.CertificateIssued,
        C.CertificateRefused,
    }
    assert {cls.TYPE for cls in types} == set(C._MESSAGES)


def test_unknown_type_is_none() -> None:
    assert C.decode_message(b'{"type":"frobnicate","x":1}') is None
    assert C.decode_message(b'{"no_type":1}') is None
    assert C.decode_message(b'{"type":7}') is None


@given(messages, st.dictionaries(st.text(min_size=1, max_size=10).map("x_".__add__), ints))
def test_unknown_members_ignored(message: C.ControlMessage, extra: dict[str, int]) -> None:
    body = json.loads(C.encode_message(message))
    body.update(extra)
    assert C.decode_message(json.dumps(body).encode()) == message


@pytest.mark.parametrize(
    "body",
    [
        {"type": "hello", "version": "1"},
        {"type": "hello", "version": True},
        {"type": "hello", "version": 1.0},
        {"type": "hello", "version": 1, "token": 5},
        {"type": "welcome", "domain": "d", "public_port": "443"},
        {"type": "welcome", "domain": "d", "public_port": 443, "keepalive_interval": "5"},
        {"type": "welcome", "domain": "d", "public_port": 443, "keepalive_timeout": False},
        {"type": "error", "code": 1, "message": "m"},
        {"type": "tunnel_request", "request_id": 1, "kind": "udp"},
        {"type": "tunnel_request", "request_id": 1, "kind": "tls", "options": []},
        {"type": "tunnel_request", "request_id": 1, "kind": "tls", "reclaim_port": "1"},
        {"type": "tunnel_granted", "request_id": 1, "tunnel_id": "t", "host": "h", "port": None},
        {"type": "tunnel_refused", "request_id": None, "code": "c", "message": "m"},
        {"type": "tunnel_close", "tunnel_id": 3},
        {"type": "tunnel_closed", "tunnel_id": "t", "reason": None},
        # missing required members
        {"type": "hello"},
        {"type": "tunnel_close"},
    ],
)
def test_wrong_member_types(body: dict[str, Any]) -> None:
    with pytest.raises(C.ControlError):
        C.decode_message(json.dumps(body).encode())


@pytest.mark.parametrize(
    "payload",
    [b"", b"not json", b"[1,2]", b'"s"', b"\xff\xfe\x00", b"{" + b" " * C.MAX_CONTROL_SIZE],
)
def test_malformed_payloads(payload: bytes) -> None:
    with pytest.raises(C.ControlError):
        C.decode_message(payload)


@given(label, printable, st.integers(0, 65535), printable, st.integers(0, 65535))
def test_stream_info_round_trip(
    tunnel_id: str, host: str, port: int, server_host: str, server_port: int
) -> None:
    info = C.StreamInfo(tunnel_id, host, port, server_host, server_port)
    assert C.StreamInfo.decode(info.encode()) == info


def test_stream_info_lenient_client_and_strict_tunnel() -> None:
    assert C.StreamInfo.decode(b'{"tunnel":"t"}') == C.StreamInfo("t")
    assert C.StreamInfo.decode(b'{"tunnel":"t","client":"bad"}') == C.StreamInfo("t")
    assert C.StreamInfo.decode(b'{"tunnel":"t","client":[1,2]}') == C.StreamInfo("t")
    # Metadata without the server's address (as the first relays sent it) still decodes.
    assert C.StreamInfo.decode(b'{"tunnel":"t","client":["h",1]}') == C.StreamInfo("t", "h", 1)
    assert C.StreamInfo.decode(
        b'{"tunnel":"t","client":["h",1],"server":["s",true]}'
    ) == C.StreamInfo("t", "h", 1)
    for bad in (b'{"client":["h",1]}', b'{"tunnel":1}', b"[]", b"nope"):
        with pytest.raises(C.ControlError):
            C.StreamInfo.decode(bad)


@pytest.mark.parametrize("decode", [C.decode_message, C.StreamInfo.decode])
def test_deep_nesting_is_control_error(decode: Any) -> None:
    with pytest.raises(C.ControlError):
        decode(b"[" * 5000)


def test_welcome_features() -> None:
    welcome = C.RelayWelcome("d", 443, features=["allow"])
    assert C.decode_message(C.encode_message(welcome)) == welcome
    # A first-release welcome has none; a malformed list is an error.
    assert C.decode_message(b'{"type":"welcome","domain":"d","public_port":1}') == (
        C.RelayWelcome("d", 1)
    )
    with pytest.raises(C.ControlError, match="features"):
        C.decode_message(b'{"type":"welcome","domain":"d","public_port":1,"features":[1]}')
    with pytest.raises(C.ControlError, match="features"):
        C.decode_message(b'{"type":"welcome","domain":"d","public_port":1,"features":"allow"}')


# -- validation on decode: every member within its rule, every string UTF-8 -------------------

_HELLO = {"type": "hello", "version": 1, "token": None, "agent": "a"}
_REQUEST = {"type": "tunnel_request", "request_id": 1, "kind": "tls", "options": {}}


def _raw(body: dict[str, Any]) -> bytes:
    # ensure_ascii keeps a lone surrogate as the JSON escape a hostile peer would send.
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    "body",
    [
        {**_HELLO, "token": "\ud800"},
        {**_HELLO, "token": "ok\udfffok"},
        {**_HELLO, "agent": "\ud800"},
        {**_HELLO, "token": "t" * (C.MAX_TOKEN + 1)},
        {**_HELLO, "token": "é" * (C.MAX_TOKEN // 2 + 1)},  # the bound is in octets
        {**_HELLO, "agent": "a" * (C.MAX_NAME + 1)},
        {**_HELLO, "agent": "forged\nlog line"},
        {**_HELLO, "version": 256},
        {**_HELLO, "version": -1},
        {**_REQUEST, "reclaim_id": "abc", "reclaim_secret": "\ud800"},
        {**_REQUEST, "reclaim_secret": "s" * (C.MAX_SECRET + 1)},
        {**_REQUEST, "reclaim_id": "\ud800"},
        {**_REQUEST, "reclaim_id": "UPPER"},
        {**_REQUEST, "reclaim_id": "../etc"},
        {**_REQUEST, "reclaim_id": "a" * 64},
        {**_REQUEST, "reclaim_port": 65536},
        {**_REQUEST, "request_id": -1},
        {**_REQUEST, "request_id": 1 << 60},
        {**_REQUEST, "options": {"client_ca": "\ud800"}},
        {**_REQUEST, "options": {"allow": ["10.0.0.0/8", "\udc00"]}},
        {**_REQUEST, "options": {"\ud800": True}},
        {**_REQUEST, "options": {"deep": [[[[["x"]]]]]}},
        {**_REQUEST, "options": {f"o{i}": 1 for i in range(C.MAX_OPTIONS + 1)}},
        {**_REQUEST, "options": {"allow": [0] * (C.MAX_OPTION_ITEMS + 1)}},
        {**_REQUEST, "options": {"x": 1e999}},
        {"type": "welcome", "domain": "d", "public_port": 1, "keepalive_interval": 0},
        {"type": "welcome", "domain": "d", "public_port": 1, "keepalive_timeout": -5},
        {"type": "welcome", "domain": "d", "public_port": 1, "keepalive_timeout": 1e999},
        {"type": "welcome", "domain": "d\ud800", "public_port": 1},
        {"type": "welcome", "domain": "d", "public_port": 70000},
        {"type": "welcome", "domain": "d", "public_port": 1, "features": ["x"] * 65},
        {"type": "welcome", "domain": "d", "public_port": 1, "features": ["\ud800"]},
        {"type": "error", "code": "\ud800", "message": "m"},
        {"type": "error", "code": "c", "message": "m" * (C.MAX_TEXT + 1)},
        {
            "type": "tunnel_granted",
            "request_id": 1,
            "tunnel_id": "t",
            "host": "h",
            "port": 1,
            "secret": "\ud800",
        },
        {
            "type": "tunnel_granted",
            "request_id": 1,
            "tunnel_id": "t",
            "host": "h",
            "port": 1,
            "tcp_host": "a b",
        },
        {"type": "tunnel_close", "tunnel_id": "\ud800"},
        {"type": "tunnel_closed", "tunnel_id": "t", "reason": "\ud800"},
    ],
)
def test_members_out_of_bounds_are_control_errors(body: dict[str, Any]) -> None:
    with pytest.raises(C.ControlError):
        C.decode_message(_raw(body))


def test_bounds_are_inclusive() -> None:
    hello = C.decode_message(_raw({**_HELLO, "token": "t" * C.MAX_TOKEN, "agent": "a" * 256}))
    assert isinstance(hello, C.AgentHello) and hello.token == "t" * C.MAX_TOKEN
    request = C.decode_message(
        _raw({**_REQUEST, "reclaim_id": "a" * 63, "reclaim_secret": "s" * C.MAX_SECRET})
    )
    assert isinstance(request, C.TunnelRequest) and request.reclaim_id == "a" * 63


def test_refusal_does_not_echo_the_value() -> None:
    # The reason goes back to the peer and into the relay's log: it names the rule only.
    with pytest.raises(C.ControlError) as info:
        C.decode_message(_raw({**_HELLO, "token": "secret-\ud800-" + "x" * 900}))
    assert "secret-" not in str(info.value) and "'token'" in str(info.value)
    assert len(str(info.value)) < 200


def test_stream_info_addresses_out_of_bounds_are_blank() -> None:
    for client in (["\ud800", 1], ["h", 65536], ["h", -1], ["h" * 256, 1], ["a\nb", 1]):
        raw = json.dumps({"tunnel": "t", "client": client, "server": client}).encode()
        assert C.StreamInfo.decode(raw) == C.StreamInfo("t")
    for tunnel in ("\ud800", "T", "", "a" * 64, "a.b"):
        with pytest.raises(C.ControlError):
            C.StreamInfo.decode(json.dumps({"tunnel": tunnel}).encode())


# Any JSON-ish value, with the strings a hostile peer likes: lone surrogates, huge ones.
_hostile_text = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["\ud800", "a\udfffb", "x" * 5000, "é" * 600, "tls", "tcp", "t", "a\n"]),
)
_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(1 << 70), 1 << 70),
    st.floats(allow_nan=False),
    _hostile_text,
)
_json_value = st.recursive(
    _json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_hostile_text, inner, max_size=4),
    max_leaves=12,
)
_member_names = st.sampled_from(sorted({*C._FIELDS, "tunnel", "client", "server"}))
_json_message = st.builds(
    lambda kind, members: {"type": kind, **members},
    st.sampled_from(sorted(C._MESSAGES)),
    st.dictionaries(_member_names | _hostile_text, _json_value, max_size=8),
)


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _strings(v)]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*_strings(k), *_strings(v))]
    return []


def _assert_within_bounds(message: C.ControlMessage) -> None:
    for name, value in vars(message).items():
        valid, rule = C._FIELDS[name]
        assert valid(value), (name, rule)
        for s in _strings(value):
            s.encode("utf-8")  # never raises
    if isinstance(message, C.AgentHello) and message.token is not None:
        assert len(message.token.encode()) <= C.MAX_TOKEN
    if isinstance(message, C.TunnelRequest) and message.reclaim_secret is not None:
        assert len(message.reclaim_secret.encode()) <= C.MAX_SECRET


@given(_json_message | _json_value.map(lambda v: {"type": "hello", "version": 1, "token": v}))
def test_any_json_is_a_valid_message_or_control_error(body: Any) -> None:
    raw = json.dumps(body).encode()
    try:
        message = C.decode_message(raw)
    except C.ControlError:
        return
    if message is not None:
        _assert_within_bounds(message)
        # What was accepted encodes again without error.
        C.encode_message(message).decode("utf-8")


@given(_json_value | st.dictionaries(_member_names, _json_value, max_size=4))
def test_any_json_is_stream_info_or_control_error(body: Any) -> None:
    try:
        info = C.StreamInfo.decode(json.dumps(body).encode())
    except C.ControlError:
        return
    for s in (info.tunnel_id, info.client_host, info.server_host):
        assert len(s.encode("utf-8")) <= C.MAX_ADDRESS
    assert 0 <= info.client_port <= 65535 and 0 <= info.server_port <= 65535


@given(st.binary(max_size=200))
def test_any_bytes_are_a_message_or_control_error(raw: bytes) -> None:
    try:
        message = C.decode_message(raw)
    except C.ControlError:
        return
    if message is not None:
        _assert_within_bounds(message)


def test_fuzz_smoke_control_messages() -> None:
    # A short slice of `make fuzz`'s control-message targets (it runs 1e6 inputs).
    from tests import fuzz

    report = fuzz.run(iterations=4000, seed=4321, targets=("control", "message"))
    assert report.failure_count == 0, [f.error for f in report.failures[:3]]
    assert report.per_target == {"control": 2000, "message": 2000}


def test_pem_members_are_bounded_ascii_pem() -> None:
    import pytest

    def request(csr: str) -> bytes:
        return C.encode_message(C.CertificateRequest(1, "abc", csr))

    ok = "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"
    assert C.decode_message(request(ok)) == C.CertificateRequest(1, "abc", ok)
    for bad in ("no pem here", "-----BEGIN X-----" + "A" * C.MAX_CSR, "-----BEGIN é-----"):
        with pytest.raises(C.ControlError, match="csr"):
            C.decode_message(request(bad))
