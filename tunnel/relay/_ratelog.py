"""
Rate-limited logging: a flood of refused connections costs a few lines, not a disk.

Each kind of message has a key. `RateLog` writes at most `limit` lines of a key per
`interval`; the rest of that interval are counted, and one summary line per interval says how
many were left out (``… and 9,214 more in the last 10 s``). Memory is one small record per
key, and keys name kinds of message (never a peer), so it is bounded by the code.

Values that come from a peer (SNI names, agent names) are cut with `shorten` before they are
logged, so a line stays short whatever the peer sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger, LogLevel

__all__ = ["RateLog", "shorten"]

#: Characters of a peer-supplied value kept in a log line.
SHORTEN_TO = 80


def shorten(value: object, limit: int = SHORTEN_TO) -> str:
    """
    `value` as text of at most `limit` characters (plus an ellipsis and the original length
    when it was longer). None stays ``None``.
    """
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text):,} characters)"


@dataclass
class _Window:
    #: When the current interval began.
    start: float
    #: Lines written in it.
    written: int = 0
    #: Lines left out in it.
    dropped: int = 0
    #: The call that writes the summary at the end of the interval.
    summary: IDelayedCall | None = None


class RateLog:
    """
    A `Logger` that writes at most `limit` lines per key per `interval` seconds, then one
    summary line per interval for the rest.
    """

    def __init__(
        self,
        log: Logger,
        clock: IReactorTime,
        limit: int = 10,
        interval: float = 10.0,
    ) -> None:
        if limit < 1 or interval <= 0:
            raise ValueError("limit must be >= 1 and interval positive")
        self._log = log
        self._clock = clock
        self.limit = limit
        self.interval = interval
        self._windows: dict[str, _Window] = {}
        #: Lines left out since start, all keys.
        self.dropped = 0

    def emit(
        self,
        key: str,
        level: LogLevel,
        format: str,
        *,
        limit: int | None = None,
        **fields: Any,
    ) -> bool:
        """
        Log `format` with `fields` at `level`, unless key `key` already had its `limit`
        (default: the log's) lines in this interval. Returns whether it was written.
        """
        now = self._clock.seconds()
        window = self._windows.get(key)
        if window is None or now - window.start >= self.interval:
            if window is not None and window.dropped:
                self._summarise(key, window, level)
            window = _Window(now)
            self._windows[key] = window
        if window.written < (limit or self.limit):
            window.written += 1
            self._log.emit(level, format, **fields)
            return True
        window.dropped += 1
        self.dropped += 1
        if window.summary is None:
            delay = max(0.0, window.start + self.interval - now)
            window.summary = self._clock.callLater(delay, self._due, key, window, level)
        return False

    def warn(self, key: str, format: str, **fields: Any) -> bool:
        """`emit` at warning level."""
        return self.emit(key, LogLevel.warn, format, **fields)

    def info(self, key: str, format: str, **fields: Any) -> bool:
        """`emit` at info level."""
        return self.emit(key, LogLevel.info, format, **fields)

    def _due(self, key: str, window: _Window, level: LogLevel) -> None:
        window.summary = None
        if self._windows.get(key) is window:
            # The interval is over: the next line of this key starts a new one.
            del self._windows[key]
        self._summarise(key, window, level)

    def _summarise(self, key: str, window: _Window, level: LogLevel) -> None:
        if window.summary is not None and window.summary.active():
            window.summary.cancel()
        window.summary = None
        if not window.dropped:
            return
        self._log.emit(
            level,
            "{key}: … and {count} more in the last {interval} s",
            key=key,
            count=f"{window.dropped:,}",
            interval=f"{self.interval:g}",
        )
        window.dropped = 0

    def flush(self) -> None:
        """Write the pending summaries now (at stop)."""
        for key, window in list(self._windows.items()):
            self._summarise(key, window, LogLevel.info)
        self._windows.clear()
