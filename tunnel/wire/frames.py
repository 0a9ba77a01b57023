"""
Frame layout of the link protocol: encoders and an incremental decoder.

Every frame is a 9-byte header followed by a payload (docs/protocol.md, "Frames")::

    +-----------------------------------------------+
    |                 Length (24)                   |
    +---------------+---------------+---------------+
    |   Type (8)    |   Flags (8)   |
    +-+-------------+---------------+-------------------------------+
    |                     Stream Identifier (32)                    |
    +---------------------------------------------------------------+
    |                   Payload (Length octets)                     |
    +---------------------------------------------------------------+

This module is sans-IO: it converts between bytes and `Frame` values and knows nothing of
streams, windows or sockets. The decoder never buffers more than one frame of the size the
caller allows: a larger length is a `ProtocolError` before its payload is read.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from tunnel.wire.errors import ErrorCode, ProtocolError

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "FLAG_ACK",
    "FLAG_FIN",
    "HEADER_SIZE",
    "HELLO_MAGIC",
    "MAX_FRAME_SIZE_LIMIT",
    "MIN_MAX_FRAME_SIZE",
    "Frame",
    "FrameDecoder",
    "FrameType",
    "Setting",
    "decode_goaway",
    "decode_hello",
    "encode_data",
    "encode_frame",
    "encode_goaway",
    "encode_hello",
    "encode_ping",
    "encode_reset",
    "encode_window",
]

#: Size of the fixed frame header.
HEADER_SIZE = 9
#: The largest payload a receiver may advertise (the 24-bit length field).
MAX_FRAME_SIZE_LIMIT = (1 << 24) - 1
#: The smallest MAX_FRAME_SIZE a receiver may advertise.
MIN_MAX_FRAME_SIZE = 16384
#: MAX_FRAME_SIZE assumed until the peer's HELLO says otherwise, and our default.
DEFAULT_MAX_FRAME_SIZE = 65536
#: The first four payload bytes of every HELLO.
HELLO_MAGIC = b"TUNL"

#: DATA: the sender will send no more data on this stream (half-close).
FLAG_FIN = 0x1
#: PING: this is the echo of a ping.
FLAG_ACK = 0x1

_HEADER = struct.Struct(">IBI")
_U32 = struct.Struct(">I")
_U32U32 = struct.Struct(">II")
_SETTING = struct.Struct(">HI")
_MAX_STREAM_ID = (1 << 32) - 1
_MAX_WINDOW_INCREMENT = (1 << 31) - 1


class FrameType(enum.IntEnum):
    """
    Frame types of protocol version 1. A receiver ignores types it does not know.
    """

    HELLO = 0x0
    DATA = 0x1
    OPEN = 0x2
    WINDOW = 0x3
    RESET = 0x4
    PING = 0x5
    GOAWAY = 0x6
    CONTROL = 0x7


class Setting(enum.IntEnum):
    """
    Identifiers of the settings a HELLO carries. A receiver ignores identifiers it does not know.
    """

    #: The largest frame payload the sender of the HELLO accepts.
    MAX_FRAME_SIZE = 0x1
    #: How many streams the receiver of the HELLO may have open, that it opened, at once.
    MAX_STREAMS = 0x2
    #: The receive window the sender of the HELLO gives each new stream, in octets.
    INITIAL_WINDOW = 0x3


@dataclass(frozen=True, slots=True)
class Frame:
    """
    One decoded frame. `type` is an `int` so that unknown types survive decoding.
    """

    #: The frame type; a `FrameType` value for the known ones.
    type: int
    #: The flag bits; meanings depend on the type.
    flags: int
    #: The stream the frame belongs to; 0 for link-level frames.
    stream_id: int
    #: The payload octets.
    payload: bytes


def encode_frame(frame_type: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """
    Encode one frame. The caller guarantees that the payload fits the peer's MAX_FRAME_SIZE.

    @raise ValueError: the payload is longer than the 24-bit length field or the stream id does
        not fit 32 bits.
    """
    length = len(payload)
    if length > MAX_FRAME_SIZE_LIMIT:
        raise ValueError(f"payload of {length} octets does not fit a frame")
    if not 0 <= stream_id <= _MAX_STREAM_ID:
        raise ValueError(f"stream id {stream_id} out of range")
    return _HEADER.pack((length << 8) | frame_type, flags, stream_id) + payload


def encode_data(stream_id: int, payload: bytes, fin: bool = False) -> bytes:
    """
    Encode a DATA frame, with FIN when this is the last data of the stream.
    """
    return encode_frame(FrameType.DATA, FLAG_FIN if fin else 0, stream_id, payload)


def encode_window(stream_id: int, increment: int) -> bytes:
    """
    Encode a WINDOW frame granting `increment` more octets of credit on `stream_id`.
    """
    if not 0 < increment <= _MAX_WINDOW_INCREMENT:
        raise ValueError(f"window increment {increment} out of range")
    return encode_frame(FrameType.WINDOW, 0, stream_id, _U32.pack(increment))


def encode_reset(stream_id: int, code: int) -> bytes:
    """
    Encode a RESET frame that aborts `stream_id` with `code`.
    """
    return encode_frame(FrameType.RESET, 0, stream_id, _U32.pack(code))


def encode_ping(opaque: bytes, ack: bool = False) -> bytes:
    """
    Encode a PING (or its echo, with `ack`) carrying exactly 8 opaque octets.
    """
    if len(opaque) != 8:
        raise ValueError("a ping carries exactly 8 octets")
    return encode_frame(FrameType.PING, FLAG_ACK if ack else 0, 0, opaque)


def encode_goaway(last_stream_id: int, code: int, message: str = "") -> bytes:
    """
    Encode a GOAWAY: the sender processed peer streams up to `last_stream_id` and will accept
    no new ones; `code` says why.
    """
    debug = message.encode("utf-8", "replace")[:1024]
    return encode_frame(FrameType.GOAWAY, 0, 0, _U32U32.pack(last_stream_id, code) + debug)


def decode_goaway(payload: bytes) -> tuple[int, int, str]:
    """
    Decode a GOAWAY payload into (last stream id, code, message).

    @raise ProtocolError: FRAME_SIZE_ERROR when the payload is shorter than 8 octets.
    """
    if len(payload) < 8:
        raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "GOAWAY shorter than 8 octets")
    last_stream_id, code = _U32U32.unpack_from(payload)
    return last_stream_id, code, payload[8:].decode("utf-8", "replace")


def encode_hello(min_version: int, max_version: int, settings: dict[int, int]) -> bytes:
    """
    Encode a HELLO frame: magic, the range of versions spoken, and settings.
    """
    body = [HELLO_MAGIC, bytes([min_version, max_version])]
    body.extend(_SETTING.pack(key, value) for key, value in sorted(settings.items()))
    return encode_frame(FrameType.HELLO, 0, 0, b"".join(body))


def decode_hello(payload: bytes) -> tuple[int, int, dict[int, int]]:
    """
    Decode a HELLO payload into (minimum version, maximum version, settings).

    Unknown setting identifiers are kept; the caller ignores the ones it does not know.

    @raise ProtocolError: PROTOCOL_ERROR for a wrong magic, FRAME_SIZE_ERROR for a payload
        whose settings are not whole 6-octet entries.
    """
    if len(payload) < 6 or payload[:4] != HELLO_MAGIC:
        raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "first frame is not a Tunnels HELLO")
    min_version, max_version = payload[4], payload[5]
    rest = payload[6:]
    if len(rest) % _SETTING.size:
        raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "HELLO settings are not 6-octet entries")
    settings = {key: value for key, value in _SETTING.iter_unpack(rest)}
    return min_version, max_version, settings


class FrameDecoder:
    """
    Turns a byte stream into frames, one chunk at a time.

    The decoder keeps at most one partial frame. It checks each frame's length against
    `max_frame_size` as soon as the header is complete, so an oversized frame is refused
    before its payload arrives.
    """

    __slots__ = ("_buffer", "_error", "failed", "max_frame_size")

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        #: The largest payload accepted; set it to the MAX_FRAME_SIZE this side advertised.
        self.max_frame_size = max_frame_size
        self._buffer = bytearray()
        self._error: ProtocolError | None = None
        #: Whether the input held a frame over the size limit (the next `feed` raises). An
        #: attribute, not a property: the multiplexer asks on every read of the link.
        self.failed = False

    @property
    def buffered(self) -> int:
        """
        How many octets of an incomplete frame are held.
        """
        return len(self._buffer)

    @property
    def pending_size(self) -> int:
        """
        The full size (header and payload) of the incomplete frame held, once its header is
        in; until then, the octets held.
        """
        buffer = self._buffer
        if len(buffer) < HEADER_SIZE:
            return len(buffer)
        return HEADER_SIZE + (int.from_bytes(buffer[:3], "big"))

    def feed(self, data: bytes) -> list[Frame]:
        """
        Add `data` and return every frame it completes, in order.

        @raise ProtocolError: FRAME_SIZE_ERROR when a frame header announces a payload larger
            than `max_frame_size`. Complete frames before it in the same chunk are returned
            first; the error is raised by the next call. The decoder is unusable afterwards.
        """
        if self._error is not None:
            raise self._error
        buffer = self._buffer
        buffered = bool(buffer)
        if buffered:
            buffer += data
            view = memoryview(buffer)
        else:
            view = memoryview(data)
        frames: list[Frame] = []
        append = frames.append
        unpack = _HEADER.unpack_from
        limit = self.max_frame_size
        end = len(view)
        offset = 0
        try:
            while end - offset >= HEADER_SIZE:
                word, flags, stream_id = unpack(view, offset)
                length = word >> 8
                if length > limit:
                    self._error = ProtocolError(
                        ErrorCode.FRAME_SIZE_ERROR,
                        f"frame of {length} octets exceeds the maximum of {limit}",
                    )
                    self.failed = True
                    break
                start = offset + HEADER_SIZE
                stop = start + length
                if stop > end:
                    break
                append(Frame(word & 0xFF, flags, stream_id, bytes(view[start:stop])))
                offset = stop
            if not buffered and offset < end and self._error is None:
                # Keep only the incomplete tail of a caller's chunk.
                buffer += view[offset:]
        finally:
            view.release()
        if self._error is not None:
            # Nothing after an oversized frame will be read: hold none of it.
            buffer.clear()
            if not frames:
                raise self._error
            return frames
        if buffered and offset:
            # Deleting a bytearray's head is O(1) in CPython: it moves the start pointer.
            del buffer[:offset]
        return frames


def parse_u32(payload: bytes, what: str) -> int:
    """
    Decode a payload that must be exactly one 32-bit unsigned integer.

    @raise ProtocolError: FRAME_SIZE_ERROR for any other length.
    """
    if len(payload) != 4:
        raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, f"{what} payload must be 4 octets")
    value: int = _U32.unpack(payload)[0]
    return value
