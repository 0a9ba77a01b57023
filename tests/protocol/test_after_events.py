"""
`tunnel._reactor.after_events` on a real epoll reactor driven one iteration at a time: what
a handler queues runs once every event of that poll is handled, once, before the next poll;
outside a handler (or on another reactor) nothing is queued; an error is logged and the
others still run. And the link's writes of one turn still go out together, in that turn.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet import epollreactor
from twisted.internet.abstract import FileDescriptor
from twisted.python import log

from tunnel._reactor import after_events, lean_dispatch


class _Reader(FileDescriptor):
    def __init__(self, reactor: Any, sock: socket.socket, order: list[str], name: str) -> None:
        super().__init__(reactor)
        self.sock = sock
        self.order = order
        self.name = name
        self.connected = 1

    def fileno(self) -> int:
        return self.sock.fileno()

    def doRead(self) -> Any:
        self.sock.recv(100)
        self.order.append(f"read {self.name}")
        assert after_events(self.reactor, lambda: self.order.append(f"after {self.name}"))
        return None


@pytest.fixture
def reactor() -> Iterator[Any]:
    r = epollreactor.EPollReactor()
    assert lean_dispatch(r)
    yield r
    r._poller.close()


def test_queued_calls_run_after_all_events_of_the_poll(reactor: Any) -> None:
    order: list[str] = []
    pairs = [socket.socketpair() for _ in range(2)]
    try:
        readers = [_Reader(reactor, b, order, str(i)) for i, (_, b) in enumerate(pairs)]
        for reader in readers:
            reader.startReading()
        for a, _ in pairs:
            a.send(b"x")
        reactor.doIteration(1.0)
        assert sorted(order[:2]) == ["read 0", "read 1"]
        assert sorted(order[2:]) == ["after 0", "after 1"]
        order.clear()
        reactor.doIteration(0)  # nothing ready: nothing runs again
        assert order == []
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_nothing_is_queued_outside_a_handler_or_on_another_reactor(reactor: Any) -> None:
    assert not after_events(reactor, lambda: None)
    other = epollreactor.EPollReactor()
    try:
        assert not after_events(other, lambda: None)
    finally:
        other._poller.close()


def test_an_error_is_logged_and_the_others_still_run(reactor: Any) -> None:
    order: list[str] = []
    logged: list[dict[str, Any]] = []
    a, b = socket.socketpair()

    class _Failing(_Reader):
        def doRead(self) -> Any:
            self.sock.recv(100)
            after_events(self.reactor, lambda: 1 / 0)
            after_events(self.reactor, lambda: order.append("second"))
            return None

    log.addObserver(logged.append)
    try:
        _Failing(reactor, b, order, "f").startReading()
        a.send(b"x")
        reactor.doIteration(1.0)
    finally:
        log.removeObserver(logged.append)
        a.close()
        b.close()
    assert order == ["second"]
    assert any(e.get("isError") and "ZeroDivisionError" in str(e.get("failure")) for e in logged)
