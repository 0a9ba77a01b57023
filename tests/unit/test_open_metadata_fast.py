"""OPEN metadata's fast paths (`StreamInfo.encode`/`decode` for the common shape: a DNS
label and IP addresses) give exactly what the JSON paths give: the same octets, the same
StreamInfo, the same errors."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import astuple

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel.wire import control as C

label = st.from_regex(r"\A[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
plain = st.from_regex(r"\A[A-Za-z0-9._:-]{0,40}\Z")
hosts = ipv4 | ipv6 | plain | st.just("") | st.text(max_size=20)
ports = st.integers(0, 65535) | st.integers(65536, 10**6) | st.integers(-5, -1)
ids = label | st.text(max_size=10)


@contextmanager
def _json_path_only() -> Iterator[None]:
    """The decoder with its fast path unable to match: the JSON path alone."""
    saved = C._OPEN_SHAPE
    C._OPEN_SHAPE = re.compile(rb"(?!)")
    try:
        yield
    finally:
        C._OPEN_SHAPE = saved


def _json_encode(info: C.StreamInfo) -> bytes:
    body = {
        "tunnel": info.tunnel_id,
        "client": [info.client_host, info.client_port],
        "server": [info.server_host, info.server_port],
    }
    return json.dumps(body, separators=(",", ":")).encode()


def _outcome(payload: bytes) -> tuple[object, ...] | str:
    try:
        return astuple(C.StreamInfo.decode(payload))
    except C.ControlError as e:
        return f"ControlError: {e}"


@given(ids, hosts, ports, hosts, ports)
def test_encode_is_the_json_encoding(
    tunnel_id: str, client_host: str, client_port: int, server_host: str, server_port: int
) -> None:
    info = C.StreamInfo(tunnel_id, client_host, client_port, server_host, server_port)
    assert info.encode() == _json_encode(info)


@given(ids, hosts, ports, hosts, ports)
def test_decode_is_the_json_decoding(
    tunnel_id: str, client_host: str, client_port: int, server_host: str, server_port: int
) -> None:
    payload = _json_encode(
        C.StreamInfo(tunnel_id, client_host, client_port, server_host, server_port)
    )
    fast = _outcome(payload)
    with _json_path_only():
        slow = _outcome(payload)
    assert fast == slow


@given(st.binary(max_size=120) | st.from_regex(C._OPEN_SHAPE.pattern, fullmatch=True))
def test_any_bytes_decode_as_on_the_json_path(payload: bytes) -> None:
    fast = _outcome(payload)
    with _json_path_only():
        slow = _outcome(payload)
    assert fast == slow


def test_the_common_shape_takes_the_fast_path() -> None:
    payload = C.StreamInfo("k3j5h2g7d9q1xwzp", "127.0.0.1", 40123, "::1", 21000).encode()
    assert payload == (
        b'{"tunnel":"k3j5h2g7d9q1xwzp","client":["127.0.0.1",40123],"server":["::1",21000]}'
    )
    assert C._OPEN_SHAPE.fullmatch(payload) is not None
    assert C.StreamInfo.decode(payload) == C.StreamInfo(
        "k3j5h2g7d9q1xwzp", "127.0.0.1", 40123, "::1", 21000
    )


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        # A port out of range is read as no address, as on the JSON path.
        (b'{"tunnel":"t","client":["h",65536],"server":["s",1]}', ("t", "", 0, "s", 1)),
        (b'{"tunnel":"t","client":["h",99999],"server":["s",65535]}', ("t", "", 0, "s", 65535)),
        # A leading zero is not JSON: an error, not port 1.
        (b'{"tunnel":"t","client":["h",01],"server":["s",1]}', "error"),
        (b'{"tunnel":"-t","client":["h",1],"server":["s",1]}', "error"),
        (b'{"tunnel":"T","client":["h",1],"server":["s",1]}', "error"),
    ],
)
def test_edges_of_the_shape(payload: bytes, expected: object) -> None:
    if expected == "error":
        with pytest.raises(C.ControlError):
            C.StreamInfo.decode(payload)
    else:
        assert astuple(C.StreamInfo.decode(payload)) == expected
