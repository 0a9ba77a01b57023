"""
The link adapter's share of the bounds: frames this side queues for a peer that does not
read, the gate before the peer is accepted, and a control handler that fails.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import globalLogPublisher

from tests.protocol.linkpair import RawPeer
from tunnel.wire import ErrorCode, LinkSettings
from tunnel.wire import frames as f


def _control(payload: bytes) -> bytes:
    return f.encode_frame(f.FrameType.CONTROL, 0, 0, payload)


def test_control_messages_to_a_peer_that_does_not_read_end_the_link() -> None:
    peer = RawPeer(client=False, settings=LinkSettings(max_control_backlog=10_000))
    peer.hello()
    peer.link.pauseProducing()  # the peer does not read
    for _ in range(10_000 // 1009 + 1):
        peer.link.sendControl(b"x" * 1000)
    assert peer.link.terminated is not None
    assert peer.link.terminated[0] == ErrorCode.ENHANCE_YOUR_CALM
    peer.link.resumeProducing()
    codes = peer.goaway_codes()
    assert codes == [ErrorCode.ENHANCE_YOUR_CALM]
    # The backlog was dropped, not written.
    assert not [fr for fr in peer.frames() if fr.type == f.FrameType.CONTROL]


def test_gated_link_processes_pipelined_input_once_accepted() -> None:
    peer = RawPeer(client=False, gated=True)
    link = peer.link
    accepted: list[bytes] = []

    def control(payload: bytes) -> None:
        accepted.append(payload)
        if payload == b"hello":
            link.acceptPeer()

    link.controlReceived = control  # type: ignore[method-assign]
    requests = b"".join(_control(b"r" * 3000) for _ in range(4))
    peer.feed(f.encode_hello(1, 1, {}) + _control(b"hello") + requests)
    assert accepted == [b"hello"] + [b"r" * 3000] * 4
    assert link.terminated is None


def test_gated_link_refuses_streams_before_acceptance() -> None:
    peer = RawPeer(client=False, gated=True)
    peer.feed(f.encode_hello(1, 1, {}) + f.encode_frame(f.FrameType.OPEN, 0, 1))
    assert peer.link.terminated is not None
    assert peer.link.terminated[0] == ErrorCode.PROTOCOL_ERROR
    assert peer.link.opened == []
    assert peer.goaway_codes() == [ErrorCode.PROTOCOL_ERROR]


def test_a_failing_control_handler_ends_its_link_with_internal_error() -> None:
    peer = RawPeer(client=False)
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)

    def broken(payload: bytes) -> None:
        raise RuntimeError("a bug")

    peer.link.controlReceived = broken  # type: ignore[method-assign]
    try:
        peer.feed(f.encode_hello(1, 1, {}) + _control(b"{}") + _control(b"{}"))
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert peer.link.terminated == (ErrorCode.INTERNAL_ERROR, "internal error", False)
    assert peer.goaway_codes() == [ErrorCode.INTERNAL_ERROR]
    failures = [e for e in seen if "log_failure" in e]
    assert len(failures) == 1
    assert failures[0]["log_failure"].check(RuntimeError)
