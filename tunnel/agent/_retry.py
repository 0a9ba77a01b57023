"""
When the agent dials its relay again: the delay before each connection attempt.

`ReconnectPolicy` is the `retryPolicy` of the agent's `ClientService`, without I/O: the
service asks it for the delay before retry number `attempt` (1 for the first retry after a
connection ended, counting up while attempts fail), and the agent tells it when the relay
welcomed a link and when a link ended, with the clock's time.

- **A cut link comes back at once.** When a link the relay had welcomed, and that had been
  up for at least `settled` seconds, ends without either side asking (a reset, a path that
  dropped, the keepalive timing out: no GOAWAY), the first retry waits only
  `quick` x U(0, 1) seconds (0-50 ms by default): the link was working, so the likeliest
  cause is the path, and the relay is probably still there.
- **Everything else backs off** as Twisted's `backoffPolicy` does:
  `min(initial * factor^attempt, max_delay) + U(0, 1)` seconds (0.2-1.2 s for the first
  retry, then 0.4-1.4 s, 0.8-1.8 s, ... up to 10-11 s).

So that a relay's agents do not all arrive at once:

- A relay that drains or restarts gracefully sends GOAWAY first: its agents back off with
  the full second of jitter, as before.
- When a relay dies, every agent's quick retry finds no listener (or a relay that refuses
  it before welcoming it), and the retries after that back off as above.
- A link that keeps failing gets a quick retry at most once per `settled` seconds of
  uptime: one that ends sooner, or is never welcomed, backs off.
"""

from __future__ import annotations

import random
from collections.abc import Callable

__all__ = ["ReconnectPolicy"]


class ReconnectPolicy:
    """
    The agent's delays between connection attempts (see the module docstring).

    @param initial: the back-off's base, in seconds (the first retry's is twice that).
    @param factor: how much the back-off grows per failed attempt.
    @param max_delay: the back-off's ceiling before jitter.
    @param quick: the most a cut link's first retry waits, in seconds.
    @param settled: how long a link must have been up for its cut to earn a quick retry.
    @param jitter: a uniform random number in [0, 1) per call.
    @raise ValueError: a negative or inconsistent parameter.
    """

    def __init__(
        self,
        *,
        initial: float = 0.1,
        factor: float = 2.0,
        max_delay: float = 10.0,
        quick: float = 0.05,
        settled: float = 1.0,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        if initial < 0 or factor < 1 or max_delay < initial or quick < 0 or settled < 0:
            raise ValueError("reconnect delays must be non-negative, with factor >= 1")
        self.initial = initial
        self.factor = factor
        self.max_delay = max_delay
        self.quick = quick
        self.settled = settled
        self._jitter = jitter
        #: When the relay welcomed the current link; None while there is none.
        self._up_since: float | None = None
        #: The next retry is a cut link's first: quick.
        self._quick_next = False

    def link_up(self, now: float) -> None:
        """
        The relay welcomed a link at `now`.
        """
        self._up_since = now
        self._quick_next = False

    def link_down(self, now: float, *, cut: bool) -> None:
        """
        The link (or a connection not yet welcomed) ended at `now`.

        @param cut: it ended without a GOAWAY from either side (reset, dropped path,
            keepalive timeout), as opposed to a drain, a refusal or a stop.
        """
        up_since, self._up_since = self._up_since, None
        self._quick_next = cut and up_since is not None and now - up_since >= self.settled

    def __call__(self, attempt: int) -> float:
        """
        Seconds to wait before retry number `attempt` (1 or more).
        """
        if self._quick_next:
            self._quick_next = False
            if attempt <= 1:
                return self.quick * self._jitter()
        try:
            delay = min(self.initial * self.factor ** min(100, attempt), self.max_delay)
        except OverflowError:
            delay = self.max_delay
        return delay + self._jitter()
