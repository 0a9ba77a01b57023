"""Tests for tunnel.wire.control: control messages and OPEN metadata."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel.wire import control as C

text = st.text(max_size=30)
opt_text = st.none() | text
ints = st.integers(-(1 << 40), 1 << 40)
opt_int = st.none() | ints
floats = st.floats(allow_nan=False, allow_infinity=False)
options = st.dictionaries(st.text(max_size=8), st.booleans() | ints | text, max_size=4)

messages: st.SearchStrategy[C.ControlMessage] = st.one_of(
    st.builds(C.AgentHello, version=ints, token=opt_text, agent=text),
    st.builds(
        C.RelayWelcome,
        domain=text,
        public_port=ints,
        keepalive_interval=floats,
        keepalive_timeout=floats,
        relay=text,
    ),
    st.builds(C.ErrorMessage, code=text, message=text),
    st.builds(
        C.TunnelRequest,
        request_id=ints,
        kind=st.sampled_from(["tls", "tcp"]),
        options=options,
        reclaim_id=opt_text,
        reclaim_secret=opt_text,
        reclaim_port=opt_int,
    ),
    st.builds(
        C.TunnelGranted,
        request_id=ints,
        tunnel_id=text,
        host=text,
        port=ints,
        tcp_host=opt_text,
        tcp_port=opt_int,
        secret=text,
    ),
    st.builds(C.TunnelRefused, request_id=ints, code=text, message=text),
    st.builds(C.TunnelClose, tunnel_id=text),
    st.builds(C.TunnelClosed, tunnel_id=text, reason=text),
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


@given(text, text, st.integers(0, 65535), text, st.integers(0, 65535))
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
