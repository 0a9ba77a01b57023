"""
An agent's link under the resets its relay sends on behalf of public clients: a client's
TCP reset reaches the agent as a RESET of a relay-opened stream, and no number of them may
end the link (and with it every tunnel on it).
"""

from __future__ import annotations

from tests.protocol.linkpair import RawPeer
from tunnel.wire import ErrorCode, LinkSettings
from tunnel.wire import frames as f

#: Five times the rapid-reset burst, all at one instant of the clock.
_RESETS = 10_000


def _open_reset(sid: int) -> bytes:
    return f.encode_frame(f.FrameType.OPEN, 0, sid, b"m") + f.encode_reset(sid, ErrorCode.CANCEL)


def test_the_agents_link_survives_many_relay_sent_resets() -> None:
    # The agent's end (it dials: client=True), with the settings the agent uses; the raw
    # peer is the relay, opening even streams.
    peer = RawPeer(client=True, settings=LinkSettings(max_streams=16384))
    peer.hello()
    settings = peer.link.mux.settings
    assert settings.reset_burst * 4 < _RESETS
    for start in range(0, _RESETS, 500):
        peer.feed(b"".join(_open_reset(2 * (start + i) + 2) for i in range(500)))
    assert peer.link.terminated is None
    assert peer.goaway_codes() == []
    assert len(peer.link.opened) == _RESETS
    assert all(recorder.lost for _s, _m, recorder in peer.link.opened)  # type: ignore[union-attr]
    # The link still carries new streams.
    peer.feed(f.encode_frame(f.FrameType.OPEN, 0, 2 * _RESETS + 2, b"m"))
    assert len(peer.link.opened) == _RESETS + 1
    assert peer.link.mux.stream_count == 1


def test_the_relays_link_still_ends_an_agent_that_opens_and_resets_in_a_loop() -> None:
    peer = RawPeer(client=False)
    peer.hello()
    burst = peer.link.mux.settings.reset_burst
    peer.feed(b"".join(_open_reset(2 * i + 1) for i in range(burst + 1)))
    assert peer.link.terminated is not None
    assert peer.link.terminated[0] == ErrorCode.ENHANCE_YOUR_CALM
