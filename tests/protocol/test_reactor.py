"""
`tunnel._reactor.lean_dispatch`: a real epoll reactor, driven one iteration at a time, still
dispatches reads, writes and disconnections, and logs a failing handler under its prefix.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet import epollreactor, error
from twisted.internet.abstract import FileDescriptor
from twisted.python import log
from twisted.python.failure import Failure

from tunnel._reactor import lean_dispatch


class _Reader(FileDescriptor):
    def __init__(self, reactor: Any, sock: socket.socket, fail: bool = False) -> None:
        super().__init__(reactor)
        self.sock = sock
        self.fail = fail
        self.data: list[bytes] = []
        self.lost: list[Failure] = []
        self.connected = 1

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "ReaderPrefix"

    def doRead(self) -> Any:
        if self.fail:
            raise ValueError("handler failed")
        chunk = self.sock.recv(100)
        if not chunk:
            return error.ConnectionDone()
        self.data.append(chunk)
        return None

    def connectionLost(self, reason: Failure) -> None:
        self.lost.append(reason)


@pytest.fixture
def reactor() -> Iterator[Any]:
    r = epollreactor.EPollReactor()
    yield r
    r._poller.close()


def test_applies_once_to_an_epoll_reactor(reactor: Any) -> None:
    assert lean_dispatch(reactor)
    assert not lean_dispatch(reactor)
    assert reactor.doIteration == reactor.doPoll
    assert not lean_dispatch(object())


def test_reads_and_disconnections_are_dispatched(reactor: Any) -> None:
    lean_dispatch(reactor)
    a, b = socket.socketpair()
    reader = _Reader(reactor, a)
    reactor.addReader(reader)
    b.send(b"hello")
    reactor.doIteration(1)
    assert reader.data == [b"hello"]
    b.close()
    reactor.doIteration(1)
    assert len(reader.lost) == 1 and reader.lost[0].check(error.ConnectionDone)
    assert reader not in reactor.getReaders()
    a.close()


def test_a_failing_handler_is_logged_under_its_prefix_and_disconnected(reactor: Any) -> None:
    lean_dispatch(reactor)
    events: list[dict[str, Any]] = []
    log.addObserver(events.append)
    a, b = socket.socketpair()
    try:
        reader = _Reader(reactor, a, fail=True)
        reactor.addReader(reader)
        b.send(b"x")
        reactor.doIteration(1)
    finally:
        log.removeObserver(events.append)
        a.close()
        b.close()
    errors = [e for e in events if e.get("isError")]
    assert errors and errors[0]["system"] == "ReaderPrefix"
    assert errors[0]["failure"].check(ValueError)
    assert len(reader.lost) == 1 and reader.lost[0].check(ValueError)
