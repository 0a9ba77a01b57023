"""
Leaner event dispatch for the epoll reactor of a process that runs the data path.

For every ready descriptor, Twisted's `EPollReactor.doPoll` calls the handler through
`log.callWithLogger`: the descriptor's `logPrefix()`, a copy of the log context with that
prefix as ``system``, and four more Python frames, only so that a legacy
(`twisted.python.log`) message emitted by the handler carries the prefix. On a relayed
request that is a fifth of the Python work of an event. `lean_dispatch` replaces the loop
of one reactor instance with one that calls the handler directly. What changes:

- legacy log messages emitted inside a handler (Twisted's own "... starting on PORT") are
  labelled ``-`` instead of the connection's prefix; new-style `twisted.logger` events, all
  of this project's, never used it;
- an exception raised by a handler is still caught, logged under the prefix, and the
  descriptor disconnected, as before (`_do_read_or_write` is Twisted's, but for that).

It also runs what a handler asked for with `after_events` once every event of the poll has
been handled: the link's one write per turn, without a delayed call (its allocation, heap
insertion and run) per turn.

And its main loop (`ReactorBase.mainLoop`) skips the timed-call bookkeeping of an iteration
(`runUntilCurrent`, `timeout` and their checks: five Python calls per turn) when no timed
call is due, none was added, no thread queued a call and the reactor is not stopping;
otherwise it runs Twisted's own, as before.

It is applied only where this project owns the reactor (the daemons, and the background
reactor of the plain-Python API), never to a reactor passed in by a caller.
"""

from __future__ import annotations

import errno
import sys
import types
from collections.abc import Callable
from typing import Any

from twisted.internet.base import ReactorBase
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST
from twisted.internet.posixbase import _NO_FILEDESC
from twisted.logger import Logger
from twisted.python import log

__all__ = ["after_events", "lean_dispatch"]

_log = Logger()


def after_events(reactor: Any, fn: Callable[[], object]) -> bool:
    """
    Call `fn` once the events of the reactor's current poll have all been handled, if this
    is called from the handler of one of them on a `lean_dispatch` reactor (it runs before
    the reactor's timed calls of this iteration, as ``callLater(0, fn)`` would run among
    them). An exception from `fn` is logged.

    @return: whether `fn` was queued so; False (nothing done) anywhere else: the caller
        falls back to ``reactor.callLater(0, fn)``.
    """
    pending: list[Callable[[], object]] | None = getattr(reactor, "_tunnel_after_events", None)
    if pending is None:
        return False
    pending.append(fn)
    return True


def lean_dispatch(reactor: Any) -> bool:
    """
    Make `reactor` (if it is Twisted's epoll reactor, unmodified) dispatch events without
    the per-event log context, and run its main loop without a turn's timed-call
    bookkeeping when nothing is due. Call it before the reactor runs.

    @return: whether the reactor was changed.
    """
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:  # pragma: no cover - no epoll on this platform
        return False
    if not isinstance(reactor, EPollReactor):
        return False
    if type(reactor).doPoll is not EPollReactor.doPoll or "doPoll" in vars(reactor):
        return False  # a subclass with its own loop, or already done
    poll = types.MethodType(_lean_do_poll, reactor)
    # An instance attribute shadows the class's method for this reactor alone.
    setattr(reactor, "doPoll", poll)  # noqa: B010
    setattr(reactor, "doIteration", poll)  # noqa: B010
    if type(reactor).mainLoop is ReactorBase.mainLoop:
        setattr(reactor, "mainLoop", types.MethodType(_lean_main_loop, reactor))  # noqa: B010
    return True


#: `ReactorBase.timeout`'s longest wait (seconds): what epoll_wait's int milliseconds hold.
_LONGEST_WAIT = 2147483


def _lean_main_loop(self: Any) -> None:
    """
    `ReactorBase.mainLoop`, but an iteration with no timed call due, none new, no call
    from a thread and no stop under way goes straight to the poll, with the wait until the
    first timed call that `timeout` would compute.
    """
    seconds = self.seconds
    while self._started:
        try:
            while self._started:
                pending = self._pendingTimedCalls
                if pending:
                    now = seconds()
                    first = pending[0].time
                if (
                    self.threadCallQueue
                    or self._newTimedCalls
                    or self._justStopped
                    or (pending and first <= now)
                ):
                    self.runUntilCurrent()
                    wait = self.timeout()
                elif pending:
                    wait = min(_LONGEST_WAIT, first - now)
                else:
                    wait = None
                self.doIteration(self.running and wait)
        except BaseException:
            # As Twisted's loop: whatever escapes an iteration is logged, and it goes on.
            _log.failure("Unexpected error in main loop")
    _log.info("Main loop terminated.")


def _lean_do_poll(self: Any, timeout: float | None) -> None:
    """
    `EPollReactor.doPoll` without `log.callWithLogger` around each handler.
    """
    if timeout is None:
        timeout = -1  # wait indefinitely
    try:
        events = self._poller.poll(timeout, len(self._selectables))
    except OSError as err:
        if err.errno == errno.EINTR:
            return
        raise
    selectables = self._selectables
    readable = self._POLL_IN
    pending: list[Callable[[], object]] = []
    self._tunnel_after_events = pending
    try:
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            try:
                if event == readable and selectable.fileno() != -1:
                    # The usual event, readable and nothing else: `_do_read_or_write`'s
                    # path for it, inline (a Python call less per event).
                    try:
                        why = selectable.doRead()
                    except BaseException:
                        why = sys.exc_info()[1]
                        _log_failure(selectable)
                    if why:
                        self._disconnectSelectable(selectable, why, True)
                else:
                    _do_read_or_write(self, selectable, fd, event)
            except KeyboardInterrupt:
                raise
            except BaseException:
                _log_failure(selectable)
    finally:
        self._tunnel_after_events = None
    for fn in pending:
        try:
            fn()
        except KeyboardInterrupt:
            raise
        except BaseException:
            log.err(None, "error in a call after the reactor's events")


def _do_read_or_write(reactor: Any, selectable: Any, fd: int, event: int) -> None:
    """
    `_PollLikeMixin._doReadOrWrite`, logging a handler's exception under the selectable's
    log prefix (which Twisted's gets from the context that `callWithLogger` set).
    """
    why: Any = None
    in_read = False
    if event & reactor._POLL_DISCONNECTED and not (event & reactor._POLL_IN):
        # Disconnected, with all pending input processed: a clean shutdown (perhaps a
        # half-close) if we were reading, an error otherwise.
        if fd in reactor._reads:
            in_read = True
            why = CONNECTION_DONE
        else:
            why = CONNECTION_LOST
    else:
        try:
            if selectable.fileno() == -1:
                why = _NO_FILEDESC
            else:
                if event & reactor._POLL_IN:
                    why = selectable.doRead()
                    in_read = True
                if not why and event & reactor._POLL_OUT:
                    why = selectable.doWrite()
                    in_read = False
        except BaseException:
            # Logged, and the selectable is disconnected.
            why = sys.exc_info()[1]
            _log_failure(selectable)
    if why:
        reactor._disconnectSelectable(selectable, why, in_read)


def _log_failure(selectable: Any) -> None:
    """
    Log the exception being handled as `log.callWithLogger` would: under the selectable's
    log prefix.
    """
    log.callWithLogger(selectable, log.err)
