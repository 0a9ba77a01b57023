"""
Per-stream receive windows, with credit returned on consumption and auto-tuned size.

A receive window is the credit this side has granted the peer on one stream. Its
accounting is exact: at every moment

    size == available + unconsumed + unacknowledged

where `available` is what the peer may still send, `unconsumed` is data that arrived and the
application has not consumed, and `unacknowledged` is data consumed but not yet returned to
the peer in a WINDOW frame.

Credit goes back only for *consumed* data, in one WINDOW frame per quarter window consumed.
When the reader consumed at least a quarter of the window per round trip since the last
grant (a quarter in under one round trip, or half in under two), the window, not the
reader, is what limits the stream, so the window doubles (up to `max_size`), as QUIC
implementations auto-tune theirs. A stream whose reader is slow never grows: it never
consumes that fast.

Granting every quarter rather than every half window lets a window that limits its stream
double about twice per round trip instead of once, since each grant is a chance to grow,
while the rate a reader must keep up to grow stays the same: over a 100 ms path a stream
reaches a 5 MB bandwidth-delay product from the 256 KiB start in about three round trips
instead of six.
"""

from __future__ import annotations

__all__ = ["GRANT_FRACTION", "ReceiveWindow"]

#: Credit goes back once `1 / GRANT_FRACTION` of the window has been consumed.
GRANT_FRACTION = 4


class ReceiveWindow:
    """
    The receive side of one stream's flow control.
    """

    __slots__ = ("available", "last_update", "max_size", "size", "unacknowledged", "unconsumed")

    def __init__(self, size: int, max_size: int, now: float) -> None:
        #: The current window size: the most octets the peer may have in flight to us.
        self.size = size
        #: The ceiling auto-tuning never passes.
        self.max_size = max(size, max_size)
        #: Credit the peer still holds.
        self.available = size
        #: Octets received and not yet consumed by the application.
        self.unconsumed = 0
        #: Octets consumed and not yet granted back to the peer.
        self.unacknowledged = 0
        #: When credit was last granted (or the stream opened).
        self.last_update = now

    def received(self, length: int) -> bool:
        """
        Account for `length` octets of DATA from the peer.

        @return: False when the data overran the window (a flow-control error by the peer);
            the accounting is unchanged then.
        """
        if length > self.available:
            return False
        self.available -= length
        self.unconsumed += length
        return True

    def consumed(
        self,
        length: int,
        now: float,
        rtt: float | None,
        final: bool,
        growth_budget: int | None = None,
    ) -> int:
        """
        Account for `length` octets that the application has consumed.

        @param final: the peer has ended the stream, so no credit needs to go back.
        @param rtt: the link's smoothed round-trip time, or None before it is measured.
        @param growth_budget: how much more the window may grow (the link's budget); None
            for no limit beyond `max_size`.
        @return: the increment to grant in a WINDOW frame now, or 0 for none.
        @raise ValueError: more was consumed than had arrived.
        """
        if length > self.unconsumed:
            raise ValueError(f"consumed {length} octets but only {self.unconsumed} are held")
        self.unconsumed -= length
        self.unacknowledged += length
        if final or self.unacknowledged * GRANT_FRACTION < self.size:
            return 0
        growth = 0
        # Grow when the reader kept up a quarter of the window per round trip since the
        # last grant: unacknowledged / elapsed > size / (4 * rtt), without dividing.
        if (
            rtt is not None
            and 4 * rtt * self.unacknowledged > (now - self.last_update) * self.size
            and self.size < self.max_size
        ):
            growth = min(self.size, self.max_size - self.size)
            if growth_budget is not None:
                growth = max(0, min(growth, growth_budget))
        increment = self.unacknowledged + growth
        self.size += growth
        self.available += increment
        self.unacknowledged = 0
        self.last_update = now
        return increment
