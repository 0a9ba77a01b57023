"""
The frame that goes with a handed connection's socket between workers (``--workers N``),
sans-IO.

The sender has accepted the connection and parsed its ClientHello; it sends the socket
(``SCM_RIGHTS``, attached to the frame's first octet) with one frame that carries what the
owner would otherwise ask the kernel or the parser for again: the client's address, the
parsed ClientHello, when it was sent, and the bytes read so far (replayed into the owner's
TLS or passthrough unchanged). Layout, big-endian::

    length   u32   octets after this field (at most MAX_FRAME)
    version  u8    1
    family   u8    4 (AF_INET) or 6 (AF_INET6)
    port     u16   the client's port
    host     u8 n, n octets (ASCII): the client's address
    sent     f64   CLOCK_MONOTONIC seconds when it was sent (one clock for every process
                   of the machine)
    name     u16 n, n octets (ASCII; 0xFFFF: no SNI)
    alpn     u8 count, then count times: u8 n, n octets
    legacy   u16   the ClientHello's legacy_version
    versions u8 count, then count times: u16
    data     the rest: the bytes read from the connection

`decode` checks every field (a frame that breaks the layout is `HandoffFrameError`): the peer
is a worker of the same relay, but a broken one is cut off rather than believed.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from tunnel.relay._clienthello import ClientHello

__all__ = ["MAX_FRAME", "FrameDecoder", "HandedConnection", "HandoffFrameError", "encode"]

#: Octets of one frame after its length field.
MAX_FRAME = 65536

_LENGTH = struct.Struct(">I")
_HEAD = struct.Struct(">BBH")
_SENT = struct.Struct(">d")
_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_VERSION = 1
_NO_NAME = 0xFFFF
_FAMILIES = (4, 6)


class HandoffFrameError(ValueError):
    """A frame that breaks the layout (or is longer than `MAX_FRAME`)."""


@dataclass(frozen=True)
class HandedConnection:
    """What comes with one handed socket."""

    family: int
    """4 or 6: the socket's address family."""
    host: str
    """The client's address (as the sender's ``accept`` gave it)."""
    port: int
    """The client's port."""
    sent: float
    """``time.monotonic()`` in the sender when it sent the socket."""
    hello: ClientHello
    """The ClientHello the sender parsed from `data`."""
    data: bytes
    """Every byte read from the connection so far, the ClientHello's included."""


def encode(handed: HandedConnection) -> bytes:
    """
    The frame of `handed`, its length field included.

    @raise HandoffFrameError: a field does not fit the layout (a frame over `MAX_FRAME`, a
        name or an ALPN entry too long, a family other than 4 or 6).
    """
    hello = handed.hello
    try:
        host = handed.host.encode("ascii")
        name = b"" if hello.server_name is None else hello.server_name.encode("ascii")
        if handed.family not in _FAMILIES or len(host) > 255 or len(name) >= _NO_NAME:
            raise HandoffFrameError("a field does not fit the hand-off frame")
        parts = [
            _HEAD.pack(_VERSION, handed.family, handed.port),
            _U8.pack(len(host)),
            host,
            _SENT.pack(handed.sent),
            _U16.pack(_NO_NAME if hello.server_name is None else len(name)),
            name,
            _U8.pack(len(hello.alpn)),
        ]
        for proto in hello.alpn:
            parts += (_U8.pack(len(proto)), proto)
        parts += (_U16.pack(hello.legacy_version), _U8.pack(len(hello.supported_versions)))
        parts += [_U16.pack(v) for v in hello.supported_versions]
    except (struct.error, UnicodeEncodeError) as e:
        raise HandoffFrameError(f"a field does not fit the hand-off frame: {e}") from None
    parts.append(handed.data)
    body = b"".join(parts)
    if len(body) > MAX_FRAME:
        raise HandoffFrameError(f"a frame of {len(body)} octets, over {MAX_FRAME}")
    return _LENGTH.pack(len(body)) + body


class _Reader:
    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def take(self, n: int) -> bytes:
        end = self._pos + n
        if end > len(self._data):
            raise HandoffFrameError("a truncated hand-off frame")
        out = self._data[self._pos : end]
        self._pos = end
        return out

    def unpack(self, shape: struct.Struct) -> tuple[int | float, ...]:
        return shape.unpack(self.take(shape.size))

    def u8(self) -> int:
        return int(self.unpack(_U8)[0])

    def u16(self) -> int:
        return int(self.unpack(_U16)[0])

    def rest(self) -> bytes:
        out = self._data[self._pos :]
        self._pos = len(self._data)
        return out


def _decode_body(body: bytes) -> HandedConnection:
    r = _Reader(body)
    version, family, port = (int(x) for x in r.unpack(_HEAD))
    if version != _VERSION:
        raise HandoffFrameError(f"hand-off frame version {version}")
    if family not in _FAMILIES:
        raise HandoffFrameError(f"address family {family}")
    try:
        host = r.take(r.u8()).decode("ascii")
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except (UnicodeDecodeError, ValueError):
        raise HandoffFrameError("a client address that is not one") from None
    if address.version != family:
        raise HandoffFrameError("a client address of another family")
    (sent,) = r.unpack(_SENT)
    n = r.u16()
    try:
        name = None if n == _NO_NAME else r.take(n).decode("ascii")
    except UnicodeDecodeError:
        raise HandoffFrameError("a server name that is not ASCII") from None
    alpn = tuple(r.take(r.u8()) for _ in range(r.u8()))
    legacy = r.u16()
    versions = tuple(r.u16() for _ in range(r.u8()))
    hello = ClientHello(
        server_name=name, alpn=alpn, legacy_version=legacy, supported_versions=versions
    )
    return HandedConnection(family, host, port, float(sent), hello, r.rest())


class FrameDecoder:
    """Octets in, hand-off frames out. Holds at most one frame's octets."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[HandedConnection]:
        """
        The frames completed by `data`, in order.

        @raise HandoffFrameError: a frame too long or malformed (the stream is then
            unusable).
        """
        self._buffer += data
        out: list[HandedConnection] = []
        while len(self._buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buffer)
            if length > MAX_FRAME:
                raise HandoffFrameError(f"a frame of {length} octets, over {MAX_FRAME}")
            end = _LENGTH.size + length
            if len(self._buffer) < end:
                break
            body = bytes(self._buffer[_LENGTH.size : end])
            del self._buffer[:end]
            out.append(_decode_body(body))
        return out
