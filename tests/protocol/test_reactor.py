"""
`tunnel._reactor.lean_dispatch`: a real epoll reactor, driven one iteration at a time, still
dispatches reads, writes and disconnections, and logs a failing handler under its prefix.
"""

from __future__ import annotations

import socket
import threading
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


def _run(reactor: Any, deadline: float = 10.0) -> None:
    """Run `reactor` until something stops it, or `deadline` seconds (then fail)."""
    guard = reactor.callLater(deadline, reactor.stop)
    reactor.run(installSignalHandlers=False)
    assert guard.active(), "the reactor ran until its deadline"
    guard.cancel()


def test_the_main_loop_runs_timed_calls_thread_calls_and_events_in_order(reactor: Any) -> None:
    assert lean_dispatch(reactor)
    assert "mainLoop" in vars(reactor)
    seen: list[str] = []
    a, b = socket.socketpair()

    class Reader(_Reader):
        def doRead(self) -> Any:
            result = super().doRead()
            seen.append("read")
            # A timed call made by a handler, and one due at once: both run.
            reactor.callLater(0, seen.append, "from the handler")
            reactor.callLater(0.05, finish)
            return result

    def finish() -> None:
        seen.append("later")
        reactor.stop()

    def start() -> None:
        reactor.addReader(Reader(reactor, a))
        # While the reactor waits in its poll, a thread's call must wake it and run.
        threading.Thread(target=reactor.callFromThread, args=(from_thread,)).start()

    def from_thread() -> None:
        seen.append("from a thread")
        b.send(b"x")

    reactor.callWhenRunning(start)
    try:
        _run(reactor)
    finally:
        a.close()
        b.close()
    assert seen == ["from a thread", "read", "from the handler", "later"]


def test_the_main_loop_waits_for_the_first_timed_call_only(reactor: Any) -> None:
    lean_dispatch(reactor)
    waits: list[float | None] = []
    poll = reactor.doIteration

    def recording(timeout: float | None) -> None:
        waits.append(timeout)
        poll(timeout)

    reactor.doIteration = recording
    fired: list[float] = []
    reactor.callLater(3600, fired.append, 0.0)  # far away: only bounds the waits

    def tick(n: int) -> None:
        fired.append(reactor.seconds())
        if n:
            reactor.callLater(0.02, tick, n - 1)
        else:
            reactor.stop()

    reactor.callWhenRunning(tick, 3)
    _run(reactor)
    assert len(fired) == 4
    # Every wait was bounded by the next call due (20 ms), never by the hour-long one, and
    # the reactor did not spin: a handful of polls per tick.
    assert all(w is not None and w <= 0.021 for w in waits), waits
    assert len(waits) < 40, waits


def test_an_error_in_the_loop_is_logged_and_the_loop_goes_on(reactor: Any) -> None:
    lean_dispatch(reactor)
    events: list[dict[str, Any]] = []
    log.addObserver(events.append)
    poll = reactor.doIteration
    failed: list[bool] = []

    def failing_once(timeout: float | None) -> None:
        if not failed:
            failed.append(True)
            raise RuntimeError("an iteration failed")
        poll(timeout)

    reactor.doIteration = failing_once
    reactor.callLater(0.01, reactor.stop)
    try:
        _run(reactor)
    finally:
        log.removeObserver(events.append)
    assert failed
    assert any(e.get("isError") and e["failure"].check(RuntimeError) for e in events)
