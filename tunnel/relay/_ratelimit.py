"""
Per-tunnel rate limits: a token bucket for each direction of a tunnel, shared by all its
public connections, that pauses whoever sends when it runs dry.

Nothing is buffered to enforce a limit. Each chunk that crosses the relay is charged to its
direction's bucket *after* it was passed on (the bucket may go into debt by one chunk);
when the bucket is below zero the sender's side is held (`Gate.throttled`): the public
transport stops reading (upload), or the stream stops delivering and so stops returning
credit, which stops the agent (download). Once the debt is paid back at the rate, every held
gate is released (`Gate.unthrottled`). Over time a direction carries at most
``rate * seconds + burst`` octets plus one chunk per connection.

Sans-IO: no Twisted here (the relay's control core creates a tunnel's `Throttle`); the
caller gives an object with the reactor's ``seconds`` and ``callLater``.
"""

from __future__ import annotations

from typing import Any, Protocol

__all__ = ["BURST_SECONDS", "MIN_BURST", "Direction", "Gate", "RateBucket", "Throttle"]

#: A bucket holds this many seconds of its rate ...
BURST_SECONDS = 0.1
#: ... and at least this many octets.
MIN_BURST = 16 * 1024


class Gate(Protocol):
    """
    The sending side of one connection in one direction, which a `Direction` holds while
    its bucket is in debt.
    """

    def throttled(self) -> None:
        """Stop sending (pause the producer), until `unthrottled`."""

    def unthrottled(self) -> None:
        """Sending may go on."""


class RateBucket:
    """
    A token bucket of `rate` tokens (octets) per second, holding at most `burst`, initially
    full, that may go below zero: a charge is never refused, the debt is waited off.
    """

    def __init__(self, rate: int, burst: int, clock: Any) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("a rate bucket needs a positive rate and burst")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()

    @property
    def tokens(self) -> float:
        """The tokens now (negative: a debt)."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        return self._tokens

    def charge(self, octets: int) -> float:
        """
        Take `octets`; return the seconds until the bucket is out of debt (0: it is not).
        """
        self._tokens = self.tokens - octets
        return self.wait()

    def wait(self) -> float:
        """The seconds until the bucket is out of debt (0: it is not)."""
        tokens = self.tokens
        return -tokens / self.rate if tokens < 0 else 0.0


class Direction:
    """
    One direction of one tunnel: its bucket, and the gates held until it is out of debt.
    """

    def __init__(self, rate: int, reactor: Any) -> None:
        self.bucket = RateBucket(rate, max(int(rate * BURST_SECONDS), MIN_BURST), reactor.seconds)
        self._reactor = reactor
        #: Held gates, in the order they were held (dicts keep it): released in that order.
        self._held: dict[Gate, None] = {}
        self._timer: Any = None
        #: Times a gate was held, since the tunnel was granted (for tests and metrics).
        self.holds = 0

    def sent(self, gate: Gate, octets: int) -> None:
        """
        `gate` passed `octets` on: charge them, and hold it while the bucket is in debt.
        """
        wait = self.bucket.charge(octets)
        if wait <= 0:
            return
        if gate not in self._held:
            self._held[gate] = None
            self.holds += 1
            gate.throttled()
        if self._timer is None:
            self._timer = self._reactor.callLater(wait, self._refilled)

    def _refilled(self) -> None:
        self._timer = None
        wait = self.bucket.wait()
        if wait > 0:  # charged again meanwhile (a gate that was still delivering)
            self._timer = self._reactor.callLater(wait, self._refilled)
            return
        held, self._held = self._held, {}
        for gate in held:
            # A released gate may send at once, and be held again (in the new dict).
            gate.unthrottled()

    def forget(self, gate: Gate) -> None:
        """`gate`'s connection ended: it is no longer held."""
        self._held.pop(gate, None)

    @property
    def held(self) -> int:
        """Gates held now."""
        return len(self._held)

    def stop(self) -> None:
        """The tunnel is gone: no more timers, nobody held."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._held.clear()


class Throttle:
    """
    A tunnel's rate limit: `rate` octets per second from public clients to the agent
    (`up`) and, separately, from the agent to public clients (`down`).
    """

    def __init__(self, rate: int, reactor: Any) -> None:
        self.rate = rate
        self.up = Direction(rate, reactor)
        self.down = Direction(rate, reactor)

    def stop(self) -> None:
        self.up.stop()
        self.down.stop()
