"""Tests for tunnel.wire.frames: encoders, decoders and the incremental FrameDecoder."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel.wire import frames as F
from tunnel.wire.errors import ErrorCode, ProtocolError

stream_ids = st.integers(0, (1 << 32) - 1)
u32 = st.integers(0, (1 << 32) - 1)
payloads = st.binary(max_size=2048)


def _header(length: int, frame_type: int, flags: int, stream_id: int) -> bytes:
    return (
        ((length << 8) | frame_type).to_bytes(4, "big")
        + bytes([flags])
        + stream_id.to_bytes(4, "big")
    )


@st.composite
def frames(draw: st.DrawFn) -> tuple[bytes, F.Frame]:
    """One encoded frame of any known type (or an unknown one) and the frame it decodes to."""
    kind = draw(st.sampled_from([*F.FrameType, 0x42]))
    if kind == F.FrameType.DATA:
        sid, data, fin = draw(stream_ids), draw(payloads), draw(st.booleans())
        return F.encode_data(sid, data, fin), F.Frame(kind, F.FLAG_FIN if fin else 0, sid, data)
    if kind == F.FrameType.WINDOW:
        sid, inc = draw(stream_ids), draw(st.integers(1, (1 << 31) - 1))
        return F.encode_window(sid, inc), F.Frame(kind, 0, sid, inc.to_bytes(4, "big"))
    if kind == F.FrameType.RESET:
        sid, code = draw(stream_ids), draw(u32)
        return F.encode_reset(sid, code), F.Frame(kind, 0, sid, code.to_bytes(4, "big"))
    if kind == F.FrameType.PING:
        opaque, ack = draw(st.binary(min_size=8, max_size=8)), draw(st.booleans())
        return F.encode_ping(opaque, ack), F.Frame(kind, F.FLAG_ACK if ack else 0, 0, opaque)
    if kind == F.FrameType.GOAWAY:
        last, code, msg = draw(u32), draw(u32), draw(st.text(max_size=50))
        encoded = F.encode_goaway(last, code, msg)
        frame = F.FrameDecoder().feed(encoded)[0]
        assert F.decode_goaway(frame.payload) == (last, code, msg)
        return encoded, frame
    if kind == F.FrameType.HELLO:
        lo, hi = draw(st.integers(0, 255)), draw(st.integers(0, 255))
        sets = draw(st.dictionaries(st.integers(0, 0xFFFF), u32, max_size=6))
        encoded = F.encode_hello(lo, hi, sets)
        frame = F.FrameDecoder().feed(encoded)[0]
        assert F.decode_hello(frame.payload) == (lo, hi, sets)
        return encoded, frame
    flags, sid, data = draw(st.integers(0, 255)), draw(stream_ids), draw(payloads)
    return F.encode_frame(kind, flags, sid, data), F.Frame(kind, flags, sid, data)


@given(frames())
def test_round_trip(pair: tuple[bytes, F.Frame]) -> None:
    encoded, frame = pair
    decoder = F.FrameDecoder()
    assert decoder.feed(encoded) == [frame]
    assert decoder.buffered == 0
    assert len(encoded) == F.HEADER_SIZE + len(frame.payload)


@settings(max_examples=200)
@given(st.lists(frames(), max_size=12), st.data())
def test_any_chunking_yields_same_frames(
    pairs: list[tuple[bytes, F.Frame]], data: st.DataObject
) -> None:
    stream = b"".join(e for e, _ in pairs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    decoder = F.FrameDecoder()
    out: list[F.Frame] = []
    last = 0
    for cut in [*cuts, len(stream)]:
        out += decoder.feed(stream[last:cut])
        last = cut
    assert out == [f for _, f in pairs]
    assert decoder.buffered == 0


def test_byte_at_a_time() -> None:
    stream = F.encode_data(1, b"x" * 100) + F.encode_ping(b"12345678") + F.encode_data(3, b"")
    decoder = F.FrameDecoder()
    out: list[F.Frame] = []
    for i in range(len(stream)):
        out += decoder.feed(stream[i : i + 1])
    assert [f.type for f in out] == [F.FrameType.DATA, F.FrameType.PING, F.FrameType.DATA]


def test_oversized_frame_refused_before_payload() -> None:
    decoder = F.FrameDecoder(max_frame_size=F.MIN_MAX_FRAME_SIZE)
    header = _header(F.MIN_MAX_FRAME_SIZE + 1, F.FrameType.DATA, 0, 1)
    with pytest.raises(ProtocolError) as info:
        decoder.feed(header)  # header only: no payload needed to refuse it
    assert info.value.code is ErrorCode.FRAME_SIZE_ERROR


def test_oversized_frame_refused_when_header_split() -> None:
    decoder = F.FrameDecoder(max_frame_size=F.MIN_MAX_FRAME_SIZE)
    header = _header(F.MAX_FRAME_SIZE_LIMIT, F.FrameType.DATA, 0, 1)
    assert decoder.feed(header[:5]) == []
    with pytest.raises(ProtocolError) as info:
        decoder.feed(header[5:])
    assert info.value.code is ErrorCode.FRAME_SIZE_ERROR


def test_frame_of_exactly_max_size_accepted() -> None:
    decoder = F.FrameDecoder(max_frame_size=F.MIN_MAX_FRAME_SIZE)
    data = b"a" * F.MIN_MAX_FRAME_SIZE
    assert decoder.feed(F.encode_data(1, data)) == [F.Frame(F.FrameType.DATA, 0, 1, data)]


def test_decoder_buffers_only_partial_frame() -> None:
    decoder = F.FrameDecoder()
    encoded = F.encode_data(1, b"abc") + F.encode_data(3, b"defg")
    assert len(decoder.feed(encoded[:-2])) == 1
    assert decoder.buffered == F.HEADER_SIZE + 2


def test_encoder_limits() -> None:
    with pytest.raises(ValueError):
        F.encode_frame(F.FrameType.DATA, 0, 1 << 32)
    with pytest.raises(ValueError):
        F.encode_frame(F.FrameType.DATA, 0, -1)
    with pytest.raises(ValueError):
        F.encode_window(1, 0)
    with pytest.raises(ValueError):
        F.encode_window(1, 1 << 31)
    with pytest.raises(ValueError):
        F.encode_ping(b"short")


def test_decode_hello_errors() -> None:
    with pytest.raises(ProtocolError) as info:
        F.decode_hello(b"XXXX\x01\x01")
    assert info.value.code is ErrorCode.PROTOCOL_ERROR
    with pytest.raises(ProtocolError) as info:
        F.decode_hello(b"TUN")
    assert info.value.code is ErrorCode.PROTOCOL_ERROR
    with pytest.raises(ProtocolError) as info:
        F.decode_hello(F.HELLO_MAGIC + b"\x01\x01" + b"\x00\x01\x00")
    assert info.value.code is ErrorCode.FRAME_SIZE_ERROR


def test_decode_goaway_short() -> None:
    with pytest.raises(ProtocolError) as info:
        F.decode_goaway(b"\x00" * 7)
    assert info.value.code is ErrorCode.FRAME_SIZE_ERROR


def test_goaway_message_truncated_and_lossy_utf8() -> None:
    frame = F.FrameDecoder().feed(F.encode_goaway(1, 2, "é" * 2000))[0]
    last, code, msg = F.decode_goaway(frame.payload)
    assert (last, code) == (1, 2)
    assert len(frame.payload) == 8 + 1024
    assert msg.startswith("é" * 500)


def test_parse_u32() -> None:
    assert F.parse_u32(b"\x00\x00\x01\x00", "X") == 256
    for bad in (b"", b"\x00" * 3, b"\x00" * 5):
        with pytest.raises(ProtocolError) as info:
            F.parse_u32(bad, "X")
        assert info.value.code is ErrorCode.FRAME_SIZE_ERROR
