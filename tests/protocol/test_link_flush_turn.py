"""
The link's `flush_soon` on the daemons' lean epoll reactor, driven one iteration at a time:
the writes of every stream made while the poll's events are handled go out together, in
one write to the transport, once those events are handled (in the same turn, with no
timer); outside a handler it falls back to a delayed call.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet import epollreactor
from twisted.internet.abstract import FileDescriptor
from twisted.internet.testing import StringTransport

from tests.protocol.linkpair import decode_frames
from tunnel._reactor import lean_dispatch
from tunnel.link import LinkProtocol
from tunnel.wire import Multiplexer
from tunnel.wire import frames as f


class _Writes(StringTransport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        super().write(data)


class _Handler(FileDescriptor):
    """Writes on the given streams when its socket is readable, noting what the link's
    transport had received by then."""

    def __init__(self, reactor: Any, sock: socket.socket, act: Any) -> None:
        super().__init__(reactor)
        self.sock = sock
        self.act = act
        self.connected = 1

    def fileno(self) -> int:
        return self.sock.fileno()

    def doRead(self) -> Any:
        self.sock.recv(100)
        self.act()
        return None


@pytest.fixture
def reactor() -> Iterator[Any]:
    r = epollreactor.EPollReactor()
    assert lean_dispatch(r)
    yield r
    r._poller.close()


def _open_link(reactor: Any) -> tuple[LinkProtocol, _Writes]:
    link = LinkProtocol(reactor, client=True)
    transport = _Writes()
    link.makeConnection(transport)
    peer = Multiplexer(client=False)
    link.dataReceived(peer.data_to_send())
    transport.writes.clear()
    return link, transport


def test_writes_of_one_turn_share_one_transport_write_after_the_events(reactor: Any) -> None:
    link, transport = _open_link(reactor)
    try:
        streams = [link.openStream(b""), link.openStream(b"")]
        # Outside a handler: a delayed call (the OPENs), not the reactor's list.
        assert link._flush_call is not None
        reactor.runUntilCurrent()
        assert link._flush_call is None and len(transport.writes) == 1
        transport.writes.clear()
        seen_inside: list[int] = []

        def act() -> None:
            streams[0].write(b"first")
            streams[1].write(b"second")
            seen_inside.append(len(transport.writes))

        a, b = socket.socketpair()
        try:
            _Handler(reactor, b, act).startReading()
            a.send(b"x")
            reactor.doIteration(1.0)
        finally:
            a.close()
            b.close()
        assert seen_inside == [0]  # nothing written while the events were handled
        assert len(transport.writes) == 1  # then both streams' DATA in one write
        frames = decode_frames(transport.writes[0])
        data = [(fr.stream_id, fr.payload) for fr in frames if fr.type == f.FrameType.DATA]
        assert data == [(streams[0].stream_id, b"first"), (streams[1].stream_id, b"second")]
        assert not link._flush_queued
    finally:
        link._cancel_timers()
