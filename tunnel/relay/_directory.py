"""
Who holds what across the relay's workers (``--workers N``), sans-IO.

`Directory` is the supervisor's: the owner map of tunnel ids and names to the workers that
hold members of them, and what each principal holds on each worker (links, tunnel members).
It is kept by the workers' messages (`tunnel.relay._workermsg`), serialises their claims (a
conflicting claim loses: the same random id on another worker, the same name with another
pool signature) and says what to send to whom: each call returns ``(worker, message)``
pairs.

`Replica` is a worker's copy, kept by the supervisor's messages: where to hand a public
connection for a tunnel held elsewhere, the counts of the other workers that the grant's
limits add to this worker's own, and every running worker's links (``spread``), from which
`spread_to` picks the worker a new agent link goes to.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Directory", "Elsewhere", "Outgoing", "Replica", "spread_to"]

#: A message for a worker: (its index, the message).
Outgoing = tuple[int, dict[str, Any]]


@dataclass
class _Entry:
    named: bool
    signature: str
    #: worker -> members it holds.
    holders: dict[int, int] = field(default_factory=dict)


class Directory:
    """
    The supervisor's owner map and per-principal counts over `workers` workers.
    """

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError("a directory of no workers")
        self.workers = workers
        self._tunnels: dict[str, _Entry] = {}
        #: principal -> worker -> links there.
        self._links: dict[str, dict[int, int]] = {}
        #: principal -> worker -> tunnel members there.
        self._members: dict[str, dict[int, int]] = {}
        #: Claims that lost to another worker's, since start.
        self.conflicts = 0
        #: Workers connected now (from their snapshot until they are gone).
        self._up: set[int] = set()

    # -- queries -----------------------------------------------------------------------------

    def holders(self, tunnel_id: str) -> list[int]:
        """The workers holding members of `tunnel_id`, in order."""
        entry = self._tunnels.get(tunnel_id)
        return sorted(entry.holders) if entry is not None else []

    def tunnel_ids(self) -> list[str]:
        """Every tunnel id or name held anywhere."""
        return list(self._tunnels)

    def links_on(self, worker: int) -> int:
        """The links (of every principal) on `worker`."""
        return sum(of.get(worker, 0) for of in self._links.values())

    def links_of(self, principal: str) -> int:
        """The links of `principal` on all workers."""
        return sum(self._links.get(principal, {}).values())

    def members_of(self, principal: str) -> int:
        """The tunnel members of `principal` on all workers."""
        return sum(self._members.get(principal, {}).values())

    # -- messages from workers ---------------------------------------------------------------

    def _check_worker(self, worker: int) -> None:
        if not 0 <= worker < self.workers:
            raise ValueError(f"no worker {worker}")

    def claim(
        self, worker: int, tunnel_id: str, named: bool, signature: str, principal: str
    ) -> list[Outgoing]:
        """
        `worker` granted a member of `tunnel_id`: recorded, or (when another worker holds
        the same random id, or the same name with another signature) refused with ``lost``.
        """
        self._check_worker(worker)
        entry = self._tunnels.get(tunnel_id)
        if entry is not None and set(entry.holders) - {worker}:
            if not named or not entry.named:
                return self._lose(worker, tunnel_id, "the tunnel is held on another worker")
            if entry.signature != signature:
                return self._lose(
                    worker,
                    tunnel_id,
                    f"{tunnel_id!r} is served with other options: every agent serving a "
                    "name must ask for the same kind, restrictions and rate limit",
                )
        if entry is None:
            entry = self._tunnels[tunnel_id] = _Entry(named, signature)
        before = sorted(entry.holders)
        entry.holders[worker] = entry.holders.get(worker, 0) + 1
        out = self._count(self._members, principal, worker, +1)
        if sorted(entry.holders) != before:
            out += self._owners(tunnel_id)
        return out

    def _lose(self, worker: int, tunnel_id: str, reason: str) -> list[Outgoing]:
        self.conflicts += 1
        return [(worker, {"t": "lost", "id": tunnel_id, "reason": reason})]

    def release(self, worker: int, tunnel_id: str, principal: str) -> list[Outgoing]:
        """
        One member of `tunnel_id` on `worker` left (a release of what it does not hold,
        such as a lost claim's, changes nothing).
        """
        self._check_worker(worker)
        entry = self._tunnels.get(tunnel_id)
        if entry is None or worker not in entry.holders:
            return []
        out = self._count(self._members, principal, worker, -1)
        left = entry.holders[worker] - 1
        if left > 0:
            entry.holders[worker] = left
            return out
        del entry.holders[worker]
        if not entry.holders:
            del self._tunnels[tunnel_id]
        return out + self._owners(tunnel_id)

    def links(self, worker: int, principal: str, n: int) -> list[Outgoing]:
        """`principal` has `n` links on `worker` now."""
        self._check_worker(worker)
        of = self._links.setdefault(principal, {})
        if of.get(worker, 0) == n:
            if not of:
                del self._links[principal]
            return []
        if n:
            of[worker] = n
        else:
            of.pop(worker, None)
            if not of:
                del self._links[principal]
        return self._counts(principal) + self._spread()

    def worker_gone(self, worker: int) -> list[Outgoing]:
        """
        `worker` exited: whatever it held is gone (its links went with it).
        """
        self._check_worker(worker)
        self._up.discard(worker)
        out: list[Outgoing] = []
        for tunnel_id, entry in list(self._tunnels.items()):
            if entry.holders.pop(worker, None) is not None:
                if not entry.holders:
                    del self._tunnels[tunnel_id]
                out += self._owners(tunnel_id)
        touched = set()
        for table in (self._links, self._members):
            for principal, of in list(table.items()):
                if of.pop(worker, None) is not None:
                    touched.add(principal)
                    if not of:
                        del table[principal]
        for principal in sorted(touched):
            out += self._counts(principal)
        out += self._spread()
        return [(w, m) for w, m in out if w != worker]

    def snapshot(self, worker: int) -> list[Outgoing]:
        """Everything a (re)started `worker` must know of the others (and, for the others,
        that it is up)."""
        self._check_worker(worker)
        self._up.add(worker)
        out: list[Outgoing] = self._spread()
        for tunnel_id in self._tunnels:
            out.append((worker, self._owners_message(tunnel_id)))
        for principal in sorted(set(self._links) | set(self._members)):
            out.append((worker, self._counts_for(principal, worker)))
        return out

    def handle(
        self, worker: int, message: dict[str, Any], connected: Callable[[int], bool]
    ) -> list[Outgoing]:
        """
        A checked message (`tunnel.relay._workermsg`) from `worker`: what to send to whom.
        A probe goes to the holder's worker if it is `connected` and holds the id, else it
        is answered at once: not alive.

        @raise ValueError: `worker` may not send it (a type of the supervisor's, or an
            answer to a worker that does not exist).
        """
        kind = message["t"]
        if kind == "claim":
            return self.claim(
                worker, message["id"], message["named"], message["sig"], message["principal"]
            )
        if kind == "release":
            return self.release(worker, message["id"], message["principal"])
        if kind == "links":
            return self.links(worker, message["principal"], message["n"])
        if kind == "probe":
            holder, probe = message["to"], message["probe"]
            if holder != worker and holder in self.holders(message["id"]) and connected(holder):
                return [(holder, {"t": "probe", "id": message["id"], "probe": probe, "to": worker})]
            return [(worker, {"t": "probed", "probe": probe, "to": worker, "alive": False})]
        if kind == "probed":
            asker = message["to"]
            self._check_worker(asker)
            answer = {"t": "probed", "probe": message["probe"], "to": asker}
            return [(asker, {**answer, "alive": message["alive"]})]
        raise ValueError(f"a worker does not send {kind!r}")

    # -- what to tell ------------------------------------------------------------------------

    def _spread(self) -> list[Outgoing]:
        """Every running worker's links, for every running worker."""
        up = sorted(self._up)
        message = {
            "t": "spread",
            "up": up,
            "links": [self.links_on(w) for w in range(self.workers)],
        }
        return [(w, message) for w in up]

    def _owners(self, tunnel_id: str) -> list[Outgoing]:
        return [(w, self._owners_message(tunnel_id)) for w in range(self.workers)]

    def _owners_message(self, tunnel_id: str) -> dict[str, Any]:
        entry = self._tunnels.get(tunnel_id)
        return {
            "t": "owners",
            "id": tunnel_id,
            "workers": self.holders(tunnel_id),
            "sig": entry.signature if entry is not None and entry.named else "",
        }

    def _count(
        self, table: dict[str, dict[int, int]], principal: str, worker: int, delta: int
    ) -> list[Outgoing]:
        of = table.setdefault(principal, {})
        n = of.get(worker, 0) + delta
        if n > 0:
            of[worker] = n
        else:
            of.pop(worker, None)
            if not of:
                del table[principal]
        return self._counts(principal)

    def _counts_for(self, principal: str, worker: int) -> dict[str, Any]:
        def others(table: dict[str, dict[int, int]]) -> int:
            return sum(n for w, n in table.get(principal, {}).items() if w != worker)

        return {
            "t": "counts",
            "principal": principal,
            "links": others(self._links),
            "tunnels": others(self._members),
        }

    def _counts(self, principal: str) -> list[Outgoing]:
        return [(w, self._counts_for(principal, w)) for w in range(self.workers)]


class Replica:
    """
    A worker's copy of the directory: the holders of each tunnel, and what each principal
    holds on the other workers.
    """

    def __init__(self, index: int) -> None:
        self.index = index
        self._holders: dict[str, tuple[int, ...]] = {}
        self._signatures: dict[str, str] = {}
        self._links: dict[str, int] = {}
        self._tunnels: dict[str, int] = {}
        self._turn = 0
        #: Every worker's links, as last told, and the workers running then.
        self._spread: list[int] = []
        self._up: tuple[int, ...] = ()

    def update(self, message: dict[str, Any]) -> None:
        """Apply an ``owners``, ``counts`` or ``spread`` message (others are not the
        replica's)."""
        if message["t"] == "spread":
            self._spread = list(message["links"])
            self._up = tuple(message["up"])
        elif message["t"] == "owners":
            workers = tuple(message["workers"])
            if workers:
                self._holders[message["id"]] = workers
                self._signatures[message["id"]] = message["sig"]
            else:
                self._holders.pop(message["id"], None)
                self._signatures.pop(message["id"], None)
        elif message["t"] == "counts":
            principal = message["principal"]
            for table, n in ((self._links, message["links"]), (self._tunnels, message["tunnels"])):
                if n:
                    table[principal] = n
                else:
                    table.pop(principal, None)

    def holders(self, tunnel_id: str) -> tuple[int, ...]:
        """The workers holding members of `tunnel_id` (this one included, if it does)."""
        return self._holders.get(tunnel_id, ())

    def signature(self, tunnel_id: str) -> str | None:
        """The pool signature of named tunnel `tunnel_id` held on some worker, or None."""
        return self._signatures.get(tunnel_id) or None

    def elsewhere(self, tunnel_id: str) -> list[int]:
        """The other workers holding members of `tunnel_id`."""
        return [w for w in self.holders(tunnel_id) if w != self.index]

    def pick(self, tunnel_id: str, skip: Iterable[int] = ()) -> int | None:
        """A worker other than this one to hand a connection to `tunnel_id` to, in turn."""
        skipped = set(skip)
        others = [w for w in self.elsewhere(tunnel_id) if w not in skipped]
        if not others:
            return None
        self._turn += 1
        return others[self._turn % len(others)]

    def links(self, principal: str) -> int:
        """The links of `principal` on the other workers."""
        return self._links.get(principal, 0)

    def tunnels(self, principal: str) -> int:
        """The tunnel members of `principal` on the other workers."""
        return self._tunnels.get(principal, 0)

    def link_target(self, here: int) -> int | None:
        """
        The worker a new agent link that landed here should go to (`spread_to`), given
        `here`, this worker's own links now (the replica's figure for it lags); None: keep
        it. Counts a link handed to another worker there until the supervisor's next
        ``spread`` says otherwise.
        """
        links = {w: self._spread[w] for w in self._up if w < len(self._spread)}
        links[self.index] = here
        target = spread_to(self.index, links)
        if target is not None:
            self._spread[target] += 1
        return target


def spread_to(here: int, links: dict[int, int]) -> int | None:
    """
    Where a new link that landed on worker `here` goes, given the links of each running
    worker (`here` included): None (it stays) when `here` holds the fewest, or ties with
    them, so that with it `here` is within one of the fewest; else the worker with the
    fewest (the lowest index of a tie). Added one at a time, links stay within one of each
    other on every worker.
    """
    fewest = min(links.values(), default=0)
    if links.get(here, 0) <= fewest:
        return None
    return min(w for w, n in links.items() if n == fewest)


class Elsewhere:
    """
    What a relay's grant asks about the other workers: here, in a relay of one process,
    nothing is held elsewhere. A worker's subclass answers from its `Replica`.
    """

    def links(self, principal: str) -> int:
        """The links of `principal` on the other workers."""
        return 0

    def tunnels(self, principal: str) -> int:
        """The tunnel members of `principal` on the other workers."""
        return 0

    def holder(self, tunnel_id: str) -> Any:
        """
        A stand-in for the link of another worker that holds random id `tunnel_id` (its
        ``probe(timeout)`` asks that worker whether the link is alive, its ``remote`` is
        True), or None.
        """
        return None

    def signature(self, name: str) -> str | None:
        """The pool signature of `name` when another worker serves it, or None."""
        return None
