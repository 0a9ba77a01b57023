"""
Per-party shares of the relay: token buckets for rates, and who holds which links.

A party is a link's principal (``token:<digest>``, or ``addr:<source>`` on a relay without
tokens): what one party may take is bounded, so that the others always keep the rest.
Sans-IO: the clock is a function.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable
from typing import Generic, TypeVar

__all__ = ["Buckets", "Holdings", "ResetGuard", "TokenBucket"]

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class TokenBucket:
    """
    Capacity `burst`, initially full, refilled continuously at `rate` tokens per second.
    """

    def __init__(self, rate: float, burst: float, clock: Callable[[], float]) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs a positive rate and a burst of at least 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()

    def _refill(self) -> float:
        now = self._clock()
        if now > self._at:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        return self._tokens

    def take(self, n: float = 1.0) -> bool:
        """Spend `n` tokens if there are that many; whether they were spent."""
        if self._refill() < n:
            return False
        self._tokens -= n
        return True

    @property
    def tokens(self) -> float:
        """Tokens now in the bucket."""
        return self._refill()

    def full(self) -> bool:
        """Whether the bucket is full again (it then carries no state worth keeping)."""
        return self._refill() >= self.burst


class Buckets(Generic[K]):
    """
    One `TokenBucket` per key, created full on first use. A full bucket is the same as none,
    so full ones are dropped now and then: memory follows the keys active lately, not every
    key ever seen.
    """

    def __init__(
        self, rate: float, burst: float, clock: Callable[[], float], sweep_at: int = 1024
    ) -> None:
        TokenBucket(rate, burst, clock)  # Validates the arguments now.
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: dict[K, TokenBucket] = {}
        self._sweep_base = self._sweep_at = sweep_at

    def take(self, key: K, n: float = 1.0) -> bool:
        """Spend `n` tokens of `key`'s bucket if it has them; whether they were spent."""
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._sweep_at:
                self._sweep()
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, self._clock)
        return bucket.take(n)

    def _sweep(self) -> None:
        for key in [k for k, b in self._buckets.items() if b.full()]:
            del self._buckets[key]
        # Amortised: the next sweep comes after as many new keys as are left now.
        self._sweep_at = max(self._sweep_base, 2 * len(self._buckets))

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, key: object) -> bool:
        return key in self._buckets


class Holdings(Generic[K, T]):
    """What each party holds now (e.g. its links): a set per key, no empty sets kept."""

    def __init__(self) -> None:
        self._held: dict[K, set[T]] = {}

    def add(self, key: K, item: T) -> None:
        self._held.setdefault(key, set()).add(item)

    def discard(self, key: K, item: T) -> None:
        held = self._held.get(key)
        if held is None:
            return
        held.discard(item)
        if not held:
            del self._held[key]

    def of(self, key: K) -> frozenset[T]:
        """What `key` holds."""
        return frozenset(self._held.get(key, ()))

    def live(self, key: K) -> Collection[T]:
        """What `key` holds, not copied: to be read at once, never kept or changed."""
        return self._held.get(key, ())

    def count(self, key: K) -> int:
        return len(self._held.get(key, ()))

    def __len__(self) -> int:
        return len(self._held)


class ResetGuard(Generic[K]):
    """
    Which public sources may open connections, from how many of theirs ended in a reset.

    Each source (an IPv4 address or an IPv6 /64) has a bucket of `burst` resets refilled at
    `rate` a second (`Buckets`). A reset past it blocks the source for `hold` seconds: its
    new connections are refused before any stream is opened, so an agent and its local
    server never see them. Clean closes cost nothing, however many: browsers, NATed offices
    and benchmarks open and close many connections a second from one address, and rarely
    reset them.

    Sans-IO: the clock is a function. Memory follows the sources active lately: full buckets
    are swept (`Buckets`) and expired blocks dropped as new ones come.
    """

    def __init__(self, rate: float, burst: float, hold: float, clock: Callable[[], float]) -> None:
        if hold <= 0:
            raise ValueError("a reset guard needs a positive hold")
        self._buckets: Buckets[K] = Buckets(rate, burst, clock)
        self.hold = hold
        self._clock = clock
        self._blocked: dict[K, float] = {}
        self._prune_at = 1024

    @property
    def blocking(self) -> bool:
        """Whether any source may be blocked now (when not, `admits` need not be asked)."""
        return bool(self._blocked)

    def admits(self, source: K) -> bool:
        """Whether a new connection from `source` may be opened now."""
        until = self._blocked.get(source)
        if until is None:
            return True
        if self._clock() < until:
            return False
        del self._blocked[source]
        return True

    def reset(self, source: K) -> bool:
        """
        Count a connection of `source` that ended in a reset.

        @return: True when this reset blocked the source (it was over its rate just now).
        """
        if self._buckets.take(source):
            return False
        now = self._clock()
        if self._blocked.get(source, now) > now:
            return False  # Already blocked: its connections still open end as they may.
        if len(self._blocked) >= self._prune_at:
            for key in [k for k, until in self._blocked.items() if until <= now]:
                del self._blocked[key]
            self._prune_at = max(1024, 2 * len(self._blocked))
        self._blocked[source] = now + self.hold
        return True

    def __len__(self) -> int:
        """Sources blocked or not yet expired."""
        return len(self._blocked)
