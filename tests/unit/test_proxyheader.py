"""PROXY protocol headers, checked against Twisted's own PROXY protocol parsers."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser

from tunnel.agent._proxyheader import proxy_header

ports = st.integers(0, 65535)
v4 = st.ip_addresses(v=4).map(str)
v6 = st.ip_addresses(v=6).map(str)


def parse(version: int, header: bytes) -> tuple[tuple[str, int] | None, tuple[str, int] | None]:
    if version == 1:
        assert header.endswith(b"\r\n") and header.count(b"\r\n") == 1
        assert len(header) <= 107  # the specification's longest line
        parser = V1Parser()
        info, rest = parser.feed(header)
    else:
        parser2 = V2Parser()
        info, rest = parser2.feed(header)
    assert info is not None and rest == b""
    if info.source is None:
        assert info.destination is None
        return None, None
    assert info.destination is not None
    return (info.source.host, info.source.port), (info.destination.host, info.destination.port)


def canonical(host: str) -> str:
    return str(ipaddress.ip_address(host))


versions = st.sampled_from([1, 2])


@given(version=versions, data=st.data())
def test_same_family_round_trips(version: int, data: st.DataObject) -> None:
    family = data.draw(st.sampled_from([v4, v6]))
    src, dst = data.draw(family), data.draw(family)
    sport, dport = data.draw(ports), data.draw(ports)
    source, dest = parse(version, proxy_header(version, (src, sport), (dst, dport)))
    assert source is not None and dest is not None
    assert (canonical(source[0]), source[1]) == (canonical(src), sport)
    assert (canonical(dest[0]), dest[1]) == (canonical(dst), dport)


@given(version=versions, src=v4, dst=v6, sport=ports, dport=ports)
def test_mixed_families_are_sent_as_ipv6_with_the_ipv4_address_mapped(
    version: int, src: str, dst: str, sport: int, dport: int
) -> None:
    source, dest = parse(version, proxy_header(version, (src, sport), (dst, dport)))
    assert source is not None and dest is not None
    mapped = ipaddress.IPv6Address(canonical(source[0])).ipv4_mapped
    assert str(mapped) == src and source[1] == sport
    assert canonical(dest[0]) == canonical(dst) and dest[1] == dport


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize(
    ("source", "dest"),
    [
        (None, None),
        (("", 0), ("127.0.0.1", 443)),
        (("a.host.name", 1), ("127.0.0.1", 443)),
        (("127.0.0.1", 70000), ("127.0.0.1", 443)),
        (("127.0.0.1", 1234), None),
    ],
)
def test_unknown_addresses_say_so(
    version: int, source: tuple[str, int] | None, dest: tuple[str, int] | None
) -> None:
    header = proxy_header(version, source, dest)
    if version == 1:
        # As HAProxy writes it (Twisted's parser wants more after UNKNOWN, which the
        # specification does not require).
        assert header == b"PROXY UNKNOWN\r\n"
    else:
        assert parse(version, header) == (None, None)


def test_known_bytes() -> None:
    assert (
        proxy_header(1, ("192.0.2.7", 51000), ("127.0.0.1", 443))
        == b"PROXY TCP4 192.0.2.7 127.0.0.1 51000 443\r\n"
    )
    assert proxy_header(2, ("192.0.2.7", 51000), ("127.0.0.1", 443)) == (
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c\xc0\x00\x02\x07\x7f\x00\x00\x01\xc7\x38\x01\xbb"
    )
    assert proxy_header(1, ("::1", 2), ("::1", 3)) == b"PROXY TCP6 ::1 ::1 2 3\r\n"


@pytest.mark.parametrize("version", [0, 3, "2"])
def test_other_versions_are_refused(version: object) -> None:
    with pytest.raises(ValueError, match="not 1 or 2"):
        proxy_header(version, None, None)  # type: ignore[arg-type]
