"""
An incremental, sans-IO parser for the TLS ClientHello: enough to route a connection.

The relay reads the first flight of a public client's TLS connection, learns the SNI server
name and the ALPN offer, and only then picks the certificate/context and the tunnel that will
terminate it.  Bytes in, a `ClientHello` (or "need more", or a `ClientHelloError`) out; no
I/O and no Twisted here, so the parser is fuzzed and property-tested directly.

Handles a ClientHello split across several TLS records (RFC 8446 section 5.1 allows it) and
across arbitrary TCP chunks.  Everything is bounded: a record is at most 2**14 bytes of
payload and the handshake message at most ``max_size`` bytes, and every error names the TLS
alert that the server should answer with.
"""

from __future__ import annotations

from dataclasses import dataclass
from struct import unpack_from as _unpack_from

import idna

__all__ = [
    "ALERT_ACCESS_DENIED",
    "ALERT_DECODE_ERROR",
    "ALERT_HANDSHAKE_FAILURE",
    "ALERT_ILLEGAL_PARAMETER",
    "ALERT_INTERNAL_ERROR",
    "ALERT_PROTOCOL_VERSION",
    "ALERT_UNEXPECTED_MESSAGE",
    "ALERT_UNRECOGNIZED_NAME",
    "ClientHello",
    "ClientHelloError",
    "ClientHelloParser",
    "ClientHelloTooLarge",
    "InvalidServerName",
    "MalformedClientHello",
    "NotTLS",
    "UnexpectedMessage",
    "UnsupportedVersion",
    "alert_record",
]

# TLS alert descriptions (RFC 8446 section 6).
ALERT_UNEXPECTED_MESSAGE = 10
ALERT_HANDSHAKE_FAILURE = 40
ALERT_ILLEGAL_PARAMETER = 47
ALERT_ACCESS_DENIED = 49
ALERT_DECODE_ERROR = 50
ALERT_PROTOCOL_VERSION = 70
ALERT_INTERNAL_ERROR = 80
ALERT_UNRECOGNIZED_NAME = 112

_CONTENT_ALERT = 21
_CONTENT_HANDSHAKE = 22
_HANDSHAKE_CLIENT_HELLO = 1
_MAX_RECORD_PAYLOAD = 2**14
_RECORD_HEADER = 5
_HANDSHAKE_HEADER = 4

_EXT_SERVER_NAME = 0
_EXT_ALPN = 16
_EXT_SUPPORTED_VERSIONS = 43

#: The octets of a plain LDH host name (``bytes.translate`` deletes them: none left, plain).
_HOSTNAME_CHARS = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._"


def alert_record(description: int, version: int = 0x0303) -> bytes:
    """The bytes of a plaintext fatal TLS alert record with ``description``."""
    return bytes([_CONTENT_ALERT, version >> 8, version & 0xFF, 0, 2, 2, description & 0xFF])


class ClientHelloError(Exception):
    """The peer's first bytes are not an acceptable TLS ClientHello."""

    def __init__(self, alert: int, message: str) -> None:
        super().__init__(message)
        self.alert = alert
        """The TLS alert description the server should answer with."""
        self.message = message


class NotTLS(ClientHelloError):
    """The first bytes are not a TLS handshake record at all (e.g. plain HTTP, SSLv2)."""

    def __init__(self, message: str) -> None:
        super().__init__(ALERT_DECODE_ERROR, message)


class MalformedClientHello(ClientHelloError):
    """A length, field or extension in the ClientHello does not decode."""

    def __init__(self, message: str, alert: int = ALERT_DECODE_ERROR) -> None:
        super().__init__(alert, message)


class ClientHelloTooLarge(ClientHelloError):
    """A record or the ClientHello exceeds its size bound."""

    def __init__(self, message: str) -> None:
        super().__init__(ALERT_DECODE_ERROR, message)


class UnexpectedMessage(ClientHelloError):
    """A record or handshake message other than a ClientHello came first."""

    def __init__(self, message: str) -> None:
        super().__init__(ALERT_UNEXPECTED_MESSAGE, message)


class UnsupportedVersion(ClientHelloError):
    """The client speaks a protocol older than TLS 1.0 (SSL 3.0 or earlier)."""

    def __init__(self, message: str) -> None:
        super().__init__(ALERT_PROTOCOL_VERSION, message)


class InvalidServerName(ClientHelloError):
    """The SNI extension names something that is not a host name."""

    def __init__(self, message: str) -> None:
        super().__init__(ALERT_UNRECOGNIZED_NAME, message)


@dataclass(frozen=True)
class ClientHello:
    """What the relay needs from a ClientHello to route the connection."""

    server_name: str | None
    """SNI host name: lowercase, IDNA A-labels, no trailing dot; None when not sent."""
    alpn: tuple[bytes, ...]
    """ALPN protocol names offered, in the client's order; empty when no ALPN extension."""
    legacy_version: int
    """The ClientHello's legacy_version field (0x0303 for TLS 1.2 and 1.3 clients)."""
    supported_versions: tuple[int, ...]
    """The supported_versions extension (TLS 1.3 clients), in order; empty when absent."""


_TRUNCATED = "truncated ClientHello"


def _vector_end(data: bytes, pos: int, end: int, width: int, minimum: int = 0) -> int:
    """
    Where the vector at ``data[pos:end]`` (a `width`-byte big-endian length, 1 or 2, then
    that many bytes) ends; its contents start at ``pos + width``.

    @raise MalformedClientHello: it overruns `end`, or is shorter than `minimum`.
    """
    start = pos + width
    if start > end:
        raise MalformedClientHello(_TRUNCATED)
    n = data[pos] if width == 1 else (data[pos] << 8) | data[pos + 1]
    if n < minimum:
        raise MalformedClientHello("short vector in ClientHello")
    stop = start + n
    if stop > end:
        raise MalformedClientHello(_TRUNCATED)
    return stop


def _normalize_server_name(raw: bytes) -> str:
    """Lowercase A-label form of an SNI host name, without a trailing dot."""
    if not raw:
        raise InvalidServerName("empty SNI host name")
    if not raw.translate(None, _HOSTNAME_CHARS):
        name = raw.decode("ascii").lower().rstrip(".")
        if not name or ".." in name or name.startswith("."):
            raise InvalidServerName(f"invalid SNI host name {raw[:80]!r}")
        return name
    # Not plain LDH: some clients send U-labels; convert them, or refuse.
    try:
        text = raw.decode("utf-8").rstrip(".")
        return idna.encode(text, uts46=True).decode("ascii").lower()
    except (UnicodeError, idna.IDNAError, ValueError):
        raise InvalidServerName(f"invalid SNI host name {raw[:80]!r}") from None


def _parse_hello_body(body: bytes) -> ClientHello:
    # Offsets into `body` rather than a reader object per vector: this runs once per public
    # TLS connection, and a call per field was most of its cost.
    end = len(body)
    if end < 2:
        raise MalformedClientHello(_TRUNCATED)
    legacy_version = (body[0] << 8) | body[1]
    if legacy_version >> 8 != 3:
        raise MalformedClientHello(f"unknown ClientHello version 0x{legacy_version:04x}")
    if legacy_version < 0x0301:
        raise UnsupportedVersion(f"SSL/TLS version 0x{legacy_version:04x} is not supported")
    pos = 2 + 32  # random
    if pos > end:
        raise MalformedClientHello(_TRUNCATED)
    stop = _vector_end(body, pos, end, 1)  # session_id
    if stop - pos - 1 > 32:
        raise MalformedClientHello("session_id longer than 32 bytes", ALERT_ILLEGAL_PARAMETER)
    pos = stop
    stop = _vector_end(body, pos, end, 2, minimum=2)  # cipher_suites
    if (stop - pos) % 2:  # the 2-byte length plus an odd count of bytes
        raise MalformedClientHello("odd-length cipher_suites")
    pos = _vector_end(body, stop, end, 1, minimum=1)  # compression methods

    server_name: str | None = None
    alpn: tuple[bytes, ...] = ()
    supported_versions: tuple[int, ...] = ()
    if pos < end:
        extensions_end = _vector_end(body, pos, end, 2)
        if extensions_end != end:
            raise MalformedClientHello("trailing bytes after ClientHello extensions")
        pos += 2
        seen: dict[int, None] = {}
        while pos < extensions_end:
            # Each extension: a 2-byte type, then a vector with a 2-byte length (inline:
            # a ClientHello has a dozen or more extensions).
            start = pos + 4
            if start > extensions_end:
                raise MalformedClientHello(_TRUNCATED)
            ext_type = (body[pos] << 8) | body[pos + 1]
            stop = start + ((body[pos + 2] << 8) | body[pos + 3])
            if stop > extensions_end:
                raise MalformedClientHello(_TRUNCATED)
            if ext_type in seen:
                raise MalformedClientHello(
                    f"duplicate extension {ext_type}", ALERT_ILLEGAL_PARAMETER
                )
            seen[ext_type] = None
            if ext_type == _EXT_SERVER_NAME:
                server_name = _parse_sni(body, start, stop)
            elif ext_type == _EXT_ALPN:
                alpn = _parse_alpn(body, start, stop)
            elif ext_type == _EXT_SUPPORTED_VERSIONS:
                supported_versions = _parse_supported_versions(body, start, stop)
            pos = stop
    return ClientHello(
        server_name=server_name,
        alpn=alpn,
        legacy_version=legacy_version,
        supported_versions=supported_versions,
    )


def _parse_sni(data: bytes, pos: int, end: int) -> str | None:
    """The server_name extension's contents, ``data[pos:end]``."""
    names_end = _vector_end(data, pos, end, 2, minimum=1)
    if names_end != end:
        raise MalformedClientHello("trailing bytes in server_name extension")
    pos += 2
    host: str | None = None
    while pos < names_end:
        name_type = data[pos]
        stop = _vector_end(data, pos + 1, names_end, 2, minimum=1)
        if name_type == 0:
            if host is not None:
                raise MalformedClientHello("two host names in SNI", ALERT_ILLEGAL_PARAMETER)
            host = _normalize_server_name(data[pos + 3 : stop])
        pos = stop
    return host


def _parse_alpn(data: bytes, pos: int, end: int) -> tuple[bytes, ...]:
    """The ALPN extension's contents, ``data[pos:end]``."""
    protocols_end = _vector_end(data, pos, end, 2, minimum=2)
    if protocols_end != end:
        raise MalformedClientHello("trailing bytes in ALPN extension")
    pos += 2
    out: list[bytes] = []
    while pos < protocols_end:
        stop = _vector_end(data, pos, protocols_end, 1, minimum=1)
        out.append(data[pos + 1 : stop])
        pos = stop
    return tuple(out)


def _parse_supported_versions(data: bytes, pos: int, end: int) -> tuple[int, ...]:
    """The supported_versions extension's contents, ``data[pos:end]``."""
    versions_end = _vector_end(data, pos, end, 1, minimum=2)
    if versions_end != end or (versions_end - pos - 1) % 2:
        raise MalformedClientHello("malformed supported_versions extension")
    return _unpack_from(f">{(versions_end - pos - 1) // 2}H", data, pos + 1)


class ClientHelloParser:
    """
    Feed the bytes a TLS client sends first; get its `ClientHello` once it is complete.

    ``max_size`` bounds the ClientHello handshake message (header included).  The parser
    holds at most one partial record plus the partial message, so its memory is bounded by
    ``max_size + 2**14 + 5`` whatever the peer sends.
    """

    def __init__(self, max_size: int = 16384) -> None:
        if max_size < 64:
            raise ValueError("max_size must be at least 64 bytes")
        self.max_size = max_size
        self._buffer = bytearray()  # unparsed record bytes
        self._message = bytearray()  # handshake bytes reassembled from record payloads
        self._message_length: int | None = None
        self._result: ClientHello | None = None
        self._error: ClientHelloError | None = None
        self.records = 0
        """How many TLS records have been consumed so far."""

    @property
    def done(self) -> bool:
        """True once a ClientHello has been returned or an error raised."""
        return self._result is not None or self._error is not None

    def feed(self, data: bytes) -> ClientHello | None:
        """
        Consume ``data``; return the `ClientHello` once complete, else None (need more).

        Raises a `ClientHelloError` subclass when the bytes cannot be a ClientHello; after
        that every call raises the same error.  After a ClientHello is returned, further
        calls return it again without looking at the data (whatever follows the hello is the
        TLS stack's business).
        """
        if self._result is not None:
            return self._result
        if self._error is not None:
            raise self._error
        try:
            return self._feed(data)
        except ClientHelloError as e:
            self._error = e
            self._buffer.clear()
            self._message.clear()
            raise

    def _feed(self, data: bytes) -> ClientHello | None:
        buf = self._buffer
        buf += data
        pos = 0
        try:
            while len(buf) - pos >= _RECORD_HEADER:
                content_type = buf[pos]
                if self.records == 0 and content_type != _CONTENT_HANDSHAKE:
                    raise NotTLS(f"not a TLS handshake record (first byte 0x{content_type:02x})")
                if buf[pos + 1] != 3:
                    if self.records == 0:
                        raise NotTLS(f"not a TLS record (version byte 0x{buf[pos + 1]:02x})")
                    raise MalformedClientHello("bad record version")
                if content_type != _CONTENT_HANDSHAKE:
                    raise UnexpectedMessage(
                        f"record type {content_type} before the ClientHello was complete"
                    )
                length = (buf[pos + 3] << 8) | buf[pos + 4]
                if length == 0:
                    raise MalformedClientHello("empty handshake record")
                if length > _MAX_RECORD_PAYLOAD:
                    raise ClientHelloTooLarge(f"record of {length} bytes exceeds 2**14")
                if len(buf) - pos < _RECORD_HEADER + length:
                    # Check what we can early, so a bogus first record fails fast.
                    if self.records == 0 and len(buf) - pos > _RECORD_HEADER:
                        self._check_message_start(
                            buf[pos + _RECORD_HEADER : pos + _RECORD_HEADER + _HANDSHAKE_HEADER]
                        )
                    break
                payload = buf[pos + _RECORD_HEADER : pos + _RECORD_HEADER + length]
                pos += _RECORD_HEADER + length
                self.records += 1
                hello = self._add_payload(payload)
                if hello is not None:
                    self._result = hello
                    buf.clear()
                    return hello
        finally:
            if pos and self._result is None:
                del buf[:pos]
        if self.records == 0 and buf:
            # Reject obvious non-TLS (e.g. "GET / HTTP/1.1") without waiting for 5 bytes.
            if buf[0] != _CONTENT_HANDSHAKE:
                raise NotTLS(f"not a TLS handshake record (first byte 0x{buf[0]:02x})")
            if len(buf) > 1 and buf[1] != 3:
                raise NotTLS(f"not a TLS record (version byte 0x{buf[1]:02x})")
        return None

    def _check_message_start(self, head: bytes | bytearray) -> None:
        if head and head[0] != _HANDSHAKE_CLIENT_HELLO:
            raise UnexpectedMessage(f"handshake message type {head[0]} is not ClientHello")
        if len(head) >= _HANDSHAKE_HEADER:
            total = _HANDSHAKE_HEADER + int.from_bytes(head[1:4], "big")
            if total > self.max_size:
                raise ClientHelloTooLarge(
                    f"ClientHello of {total} bytes exceeds the {self.max_size}-byte bound"
                )

    def _add_payload(self, payload: bytes | bytearray) -> ClientHello | None:
        message = self._message
        message += payload
        if self._message_length is None:
            self._check_message_start(message[:_HANDSHAKE_HEADER])
            if len(message) < _HANDSHAKE_HEADER:
                return None
            self._message_length = _HANDSHAKE_HEADER + int.from_bytes(message[1:4], "big")
        if len(message) < self._message_length:
            return None
        # Bytes after the ClientHello in the same record would be a second handshake
        # message in the client's first flight, which TLS does not allow.
        if len(message) > self._message_length:
            raise UnexpectedMessage("data after the ClientHello in its record")
        return _parse_hello_body(bytes(message[_HANDSHAKE_HEADER:]))
