"""
PROXY protocol headers (HAProxy's, versions 1 and 2), which the agent writes to a local
target before a stream's first byte so that the target learns the public client's address.

Sans-IO: addresses in, bytes out. The specification is HAProxy's ``proxy-protocol.txt``;
nginx (``listen ... proxy_protocol``), HAProxy (``accept-proxy``), Caddy, Postgres poolers
and Twisted (``twisted.protocols.haproxy``) read both versions.
"""

from __future__ import annotations

import ipaddress
import struct

__all__ = ["VERSIONS", "proxy_header"]

#: The versions `proxy_header` writes.
VERSIONS = (1, 2)

_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_PROXY = 0x21  # version 2, command PROXY
_V2_TCP4 = 0x11  # AF_INET, STREAM
_V2_TCP6 = 0x21  # AF_INET6, STREAM
_V2_UNSPEC = 0x00

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _ip(host: str) -> _Address | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


def _same_family(source: _Address, dest: _Address) -> tuple[_Address, _Address]:
    """
    Both as IPv6 when they differ (an IPv4 address mapped, ``::ffff:a.b.c.d``); a header
    carries one family.
    """
    if source.version == dest.version:
        return source, dest

    def six(a: _Address) -> ipaddress.IPv6Address:
        if isinstance(a, ipaddress.IPv6Address):
            return a
        return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + a.packed)

    return six(source), six(dest)


def _valid_port(port: int) -> bool:
    return 0 <= port <= 65535


def proxy_header(
    version: int, source: tuple[str, int] | None, dest: tuple[str, int] | None
) -> bytes:
    """
    The PROXY header announcing a TCP connection from `source` to `dest` (each
    ``(ip, port)``, as the relay saw the public client and its own listening address).

    When either is missing or not an IP address and port (an older relay sends none), the
    header says so (``PROXY UNKNOWN`` in version 1, an unspecified family in version 2), and
    the target uses the connection's own addresses.

    @raise ValueError: `version` is not in `VERSIONS`.
    """
    if version not in VERSIONS:
        raise ValueError(f"PROXY protocol version {version!r} is not 1 or 2")
    addresses = None
    if source is not None and dest is not None:
        src, dst = _ip(source[0]), _ip(dest[0])
        if src is not None and dst is not None and _valid_port(source[1]) and _valid_port(dest[1]):
            addresses = (*_same_family(src, dst), source[1], dest[1])
    if version == 1:
        if addresses is None:
            return b"PROXY UNKNOWN\r\n"
        src, dst, sport, dport = addresses
        name = "TCP4" if src.version == 4 else "TCP6"
        return f"PROXY {name} {src} {dst} {sport} {dport}\r\n".encode("ascii")
    if addresses is None:
        return _V2_SIGNATURE + struct.pack("!BBH", _V2_PROXY, _V2_UNSPEC, 0)
    src, dst, sport, dport = addresses
    body = src.packed + dst.packed + struct.pack("!HH", sport, dport)
    family = _V2_TCP4 if src.version == 4 else _V2_TCP6
    return _V2_SIGNATURE + struct.pack("!BBH", _V2_PROXY, family, len(body)) + body
