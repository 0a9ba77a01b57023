"""
Per-party shares of the relay: token buckets for rates, and who holds which links.

A party is a link's principal (``token:<digest>``, or ``addr:<source>`` on a relay without
tokens): what one party may take is bounded, so that the others always keep the rest.
Sans-IO: the clock is a function.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["Buckets", "Holdings", "TokenBucket"]

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

    def count(self, key: K) -> int:
        return len(self._held.get(key, ()))

    def __len__(self) -> int:
        return len(self._held)
