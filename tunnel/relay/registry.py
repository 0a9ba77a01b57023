"""
The relay's tunnel registry: ids and names, who serves them (one owner for a random id, a
pool of members for a name), reclaim secrets and the raw TCP port pool.

Sans-IO apart from reading and writing the reclaim key file: the registry only records who
owns what; the service opens and closes listeners.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from tunnel._allow import AllowList, DenyList
from tunnel.wire.names import ID_ALPHABET, ID_LENGTH, is_random_id

__all__ = [
    "ID_ALPHABET",
    "Member",
    "PortPool",
    "ReclaimKey",
    "TunnelRecord",
    "TunnelRegistry",
    "new_tunnel_id",
    "usable_link",
    "valid_tunnel_id",
]


def new_tunnel_id() -> str:
    """
    A fresh tunnel id: 80 random bits from `secrets`, as 16 lowercase DNS-safe characters.
    """
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(ID_LENGTH))


def valid_tunnel_id(tunnel_id: str) -> bool:
    """
    Whether `tunnel_id` has the form of an id this relay hands out.
    """
    return is_random_id(tunnel_id)


class ReclaimKey:
    """
    The key that makes reclaim secrets verifiable after a restart, with no database.

    The secret for a tunnel is HMAC-SHA256(key, "tunnel:" + kind + ":" + id + ":" + owner),
    where `owner` is who the tunnel was granted to: the identity of the agent's token
    (``token:<digest>``), or "" on a relay that takes no tokens (nothing to bind: an agent's
    address may change between links). A token's secrets therefore prove nothing for another
    token, nor for the same id after the token is revoked and another one presents them. The
    key lives in the relay's state directory (created once, mode 0600).

    Secrets made before the owner was bound (the message without ":" + owner) no longer
    verify on a relay with tokens: agents holding one get a fresh id once.
    """

    def __init__(self, key: bytes) -> None:
        if len(key) < 32:
            raise ValueError("a reclaim key has at least 32 octets")
        self._key = key

    @classmethod
    def load_or_create(cls, path: str) -> ReclaimKey:
        """
        Read the key at `path`, creating it (atomically, 0600) on first use.
        """
        try:
            with open(path, "rb") as f:
                return cls(base64.b64decode(f.read().strip()))
        except FileNotFoundError:
            pass
        key = secrets.token_bytes(32)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        temporary = f"{path}.{os.getpid()}.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(base64.b64encode(key) + b"\n")
        try:
            os.link(temporary, path)
        except FileExistsError:
            # Another process created it first: use theirs.
            os.unlink(temporary)
            return cls.load_or_create(path)
        os.unlink(temporary)
        return cls(key)

    def secret(self, kind: str, tunnel_id: str, owner: str = "") -> str:
        """
        The reclaim secret of a tunnel granted to `owner` ("" for none).
        """
        message = f"tunnel:{kind}:{tunnel_id}" + (f":{owner}" if owner else "")
        digest = hmac.new(self._key, message.encode(), hashlib.sha256)
        return base64.urlsafe_b64encode(digest.digest()).decode().rstrip("=")

    def preferred_port(self, name: str, low: int, high: int) -> int:
        """
        The raw TCP port a named tunnel asks for first: derived from its name with the key,
        so the same on every start of the relay (and not guessable from the name alone).
        """
        digest = hmac.new(self._key, f"port:{name}".encode(), hashlib.sha256).digest()
        return low + int.from_bytes(digest[:8], "big") % (high - low + 1)

    def verify(self, kind: str, tunnel_id: str, secret: str, owner: str = "") -> bool:
        """
        Whether `secret` proves that `owner` was granted `tunnel_id`, compared in constant
        time.
        """
        return hmac.compare_digest(self.secret(kind, tunnel_id, owner).encode(), secret.encode())


class PortPool:
    """
    Ports for raw TCP tunnels, from a range. A released port rests in quarantine before it is
    handed out again, so a client of an old tunnel does not reach a new one; during that time
    only a reclaim of the same tunnel may take it back.

    Quarantined ports are charged to the party (principal) that released them, and one
    party may have at most `share` of the range (at least one port) in quarantine: past it,
    its own oldest quarantined port is released early. So a party that opens and closes
    tunnels in a loop shortens its own quarantine, never anyone else's, and cannot leave
    the others without ports. (Refusing it instead would break an agent that merely restarts
    often; the early release only weakens the protection of that party's own old tunnels.)
    """

    def __init__(
        self,
        low: int,
        high: int,
        clock: Callable[[], float],
        quarantine: float = 300.0,
        share: float = 0.1,
    ) -> None:
        if not 1 <= low <= high <= 65535:
            raise ValueError(f"bad port range {low}-{high}")
        if not 0 < share <= 1:
            raise ValueError("a quarantine share is a fraction of the range, in (0, 1]")
        self.low = low
        self.high = high
        self._clock = clock
        self.quarantine = quarantine
        #: Ports one principal may have in quarantine at once.
        self.max_quarantined = max(1, int((high - low + 1) * share))
        self._in_use: set[int] = set()
        #: port -> (released at, tunnel id that had it, principal charged), oldest first.
        self._resting: OrderedDict[int, tuple[float, str, str]] = OrderedDict()
        #: principal -> its quarantined ports, oldest first.
        self._charged: dict[str, OrderedDict[int, None]] = {}
        #: Ports released early because their principal was over its share, since start.
        self.released_early = 0

    def _unrest(self, port: int) -> None:
        resting = self._resting.pop(port, None)
        if resting is None:
            return
        principal = resting[2]
        charged = self._charged.get(principal)
        if charged is not None:
            charged.pop(port, None)
            if not charged:
                del self._charged[principal]

    def _expire(self) -> None:
        now = self._clock()
        while self._resting:
            port, (released, _, _) = next(iter(self._resting.items()))
            if now - released < self.quarantine:
                break
            self._unrest(port)

    def candidates(
        self, tunnel_id: str, wanted: int | tuple[int | None, ...] | None = None
    ) -> list[int]:
        """
        Ports to try, in order, for `tunnel_id`: the wanted ones first (in order) if free or
        resting after this same tunnel, then up to 64 random free ones.
        """
        self._expire()
        out: list[int] = []
        for port in wanted if isinstance(wanted, tuple) else (wanted,):
            if (
                port is not None
                and self.low <= port <= self.high
                and port not in self._in_use
                and port not in out
            ):
                resting = self._resting.get(port)
                if resting is None or resting[1] == tunnel_id:
                    out.append(port)
        rng = secrets.SystemRandom()
        for _ in range(64):
            port = rng.randint(self.low, self.high)
            if port not in self._in_use and port not in self._resting and port not in out:
                out.append(port)
        return out

    def take(self, port: int) -> None:
        """
        Mark `port` in use.
        """
        self._in_use.add(port)
        self._unrest(port)

    def release(self, port: int, tunnel_id: str, principal: str = "") -> None:
        """
        Return `port`; it rests in quarantine, reserved for `tunnel_id` and charged to
        `principal`, whose oldest quarantined port is freed if it is over its share.
        """
        self._in_use.discard(port)
        self._unrest(port)
        self._expire()
        self._resting[port] = (self._clock(), tunnel_id, principal)
        charged = self._charged.setdefault(principal, OrderedDict())
        charged[port] = None
        while len(charged) > self.max_quarantined:
            oldest = next(iter(charged))
            self._unrest(oldest)
            self.released_early += 1

    @property
    def in_use(self) -> int:
        """
        How many ports are taken.
        """
        return len(self._in_use)

    @property
    def quarantined(self) -> int:
        """
        How many ports rest in quarantine.
        """
        self._expire()
        return len(self._resting)

    def quarantined_by(self, principal: str) -> int:
        """
        How many quarantined ports are charged to `principal`.
        """
        self._expire()
        return len(self._charged.get(principal, ()))


def usable_link(link: Any) -> bool:
    """
    Whether new public connections may go to `link`: not lost, and not draining (its agent
    sent a GOAWAY). Stand-ins without those attributes are usable.
    """
    return not getattr(link, "lost", False) and not getattr(link, "draining", False)


@dataclass(eq=False)
class Member:
    """
    One link serving a tunnel: the owner of a random id, or one agent of a name's pool.
    """

    #: The agent link (a `RelayLink`).
    link: Any
    #: Public connections open through it to this tunnel.
    streams: int = 0
    #: When its target last refused a connection (it is out of rotation for a while
    #: then, unless a connection through it succeeds); None: not since its last success.
    refused_at: float | None = None

    def resting(self, now: float, pause: float) -> bool:
        """
        Whether it is out of rotation at `now`: its target refused a connection less than
        `pause` seconds ago, and none has succeeded since.
        """
        return self.refused_at is not None and now - self.refused_at < pause


@dataclass(eq=False)
class TunnelRecord:
    """
    A live tunnel.
    """

    tunnel_id: str
    #: "tls" or "tcp".
    kind: str
    #: The agent link that owns it (a `RelayLink`); for a named tunnel, its first member.
    owner: Any
    #: Options from the request, such as {"h2": True}.
    options: dict[str, Any] = field(default_factory=dict)
    #: The clients that may connect; None: everyone.
    allow: AllowList | None = None
    #: The clients that may not connect (it wins over `allow`); None: nobody refused.
    deny: DenyList | None = None
    #: For a tunnel demanding client certificates: its own TLS server context.
    context: Any = None
    #: Its rate limit (a `tunnel.relay._ratelimit.Throttle`), or None: no limit.
    throttle: Any = None
    #: For raw TCP tunnels: the listening port and its `IListeningPort`.
    tcp_port: int | None = None
    listener: Any = None
    #: Public connections currently open through it.
    connections: int = 0
    #: Of those, how many from each source (an IPv4 address or an IPv6 /64).
    sources: dict[str, int] = field(default_factory=dict)
    #: A name (its id is the name; any member may serve it) rather than a random id.
    named: bool = False
    #: What every member must ask for alike: the kind and the options but the name.
    signature: str = ""
    #: The links serving it; a random id's has one, its owner.
    members: list[Member] = field(default_factory=list)
    #: Advanced on each choice, so that members with as few streams take turns.
    turn: int = 0

    def __post_init__(self) -> None:
        if not self.members and self.owner is not None:
            self.members.append(Member(self.owner))

    def member(self, link: Any) -> Member | None:
        """
        The member that `link` is, or None.
        """
        return next((m for m in self.members if m.link is link), None)

    def join(self, link: Any) -> Member:
        """
        Add `link` to those serving this (named) tunnel.
        """
        member = Member(link)
        self.members.append(member)
        self.owner = self.members[0].link
        return member

    def leave(self, link: Any) -> Member | None:
        """
        Remove `link` from those serving this tunnel; the member it was, or None.
        """
        member = self.member(link)
        if member is not None:
            self.members.remove(member)
            self.owner = self.members[0].link if self.members else None
        return member

    def choose(
        self,
        now: float,
        usable: Callable[[Any], bool],
        pause: float,
        skip: Collection[Member] = (),
    ) -> Member | None:
        """
        The member a new public connection goes to: among those whose link is `usable` (not
        lost, not draining) and not in `skip`, the one with the fewest open streams, ties in
        turn. Members whose target refused their last connection less than `pause` seconds
        ago are out of rotation, unless no other is left.
        """
        members = self.members
        if len(members) == 1 and not skip:
            # One member (a random id's owner, a pool of one): it, whatever its rest.
            if not usable(members[0].link):
                return None
            self.turn += 1
            return members[0]
        live = [m for m in members if m not in skip and usable(m.link)]
        in_rotation = [m for m in live if not m.resting(now, pause)] or live
        if not in_rotation:
            return None
        fewest = min(m.streams for m in in_rotation)
        tied = [m for m in in_rotation if m.streams == fewest]
        self.turn += 1
        return tied[self.turn % len(tied)]


class TunnelRegistry:
    """
    Which link owns which tunnel id.
    """

    def __init__(self) -> None:
        self._tunnels: dict[str, TunnelRecord] = {}
        #: The tunnels each link holds or serves, by the link's id(): what `owned_by` reads,
        #: so that its cost follows that link's tunnels, not every tunnel of the relay. A
        #: link in it is referenced by its records, so its id is not reused meanwhile.
        self._by_link: dict[int, dict[str, TunnelRecord]] = {}
        #: For each live tunnel, the links it is indexed under in `_by_link` (removed with
        #: it, whatever became of its members).
        self._indexed: dict[str, dict[int, Any]] = {}
        #: Told of every member that joins (True) or leaves (False) a tunnel, with the
        #: record and the member's link (the relay's workers report them; None: nobody).
        self.on_member: Callable[[TunnelRecord, Any, bool], None] | None = None

    def _told(self, record: TunnelRecord, link: Any, joined: bool) -> None:
        if self.on_member is not None:
            self.on_member(record, link, joined)

    def __len__(self) -> int:
        return len(self._tunnels)

    def get(self, tunnel_id: str) -> TunnelRecord | None:
        """
        The live tunnel with this id, if any.
        """
        return self._tunnels.get(tunnel_id)

    def fresh_id(self) -> str:
        """
        An id that no live tunnel has.
        """
        while True:
            tunnel_id = new_tunnel_id()
            if tunnel_id not in self._tunnels:
                return tunnel_id

    def add(self, record: TunnelRecord) -> None:
        """
        Register a tunnel.

        @raise KeyError: the id is live.
        """
        if record.tunnel_id in self._tunnels:
            raise KeyError(record.tunnel_id)
        self._tunnels[record.tunnel_id] = record
        self._indexed[record.tunnel_id] = {}
        if record.owner is not None:
            self._index(record, record.owner)
        for member in record.members:
            self._index(record, member.link)
        for member in record.members:
            self._told(record, member.link, True)

    def _index(self, record: TunnelRecord, link: Any) -> None:
        links = self._indexed[record.tunnel_id]
        if id(link) not in links:
            links[id(link)] = link
            self._by_link.setdefault(id(link), {})[record.tunnel_id] = record

    def _unindex(self, tunnel_id: str, key: int) -> None:
        held = self._by_link.get(key)
        if held is not None:
            held.pop(tunnel_id, None)
            if not held:
                del self._by_link[key]

    def join(self, record: TunnelRecord, link: Any) -> Member:
        """
        Add `link` to those serving live tunnel `record` (`TunnelRecord.join`).
        """
        member = record.join(link)
        if self._tunnels.get(record.tunnel_id) is record:
            self._index(record, link)
        self._told(record, link, True)
        return member

    def leave(self, record: TunnelRecord, link: Any) -> Member | None:
        """
        Remove `link` from those serving live tunnel `record` (`TunnelRecord.leave`).
        """
        member = record.leave(link)
        links = self._indexed.get(record.tunnel_id)
        if (
            self._tunnels.get(record.tunnel_id) is record
            and links is not None
            and id(link) in links
            and record.owner is not link
            and record.member(link) is None
        ):
            del links[id(link)]
            self._unindex(record.tunnel_id, id(link))
        if member is not None:
            self._told(record, link, False)
        return member

    def remove(self, tunnel_id: str) -> TunnelRecord | None:
        """
        Forget a tunnel; returns it, or None when it was not live.
        """
        record = self._tunnels.pop(tunnel_id, None)
        if record is not None:
            for key in self._indexed.pop(tunnel_id, {}):
                self._unindex(tunnel_id, key)
            for member in record.members:
                self._told(record, member.link, False)
        return record

    def owned_by(self, owner: Any) -> list[TunnelRecord]:
        """
        The tunnels `owner` holds or serves (as a member of a name's pool), in the order it
        came to hold them.

        Its cost follows the tunnels `owner` holds, not the relay's: members join and leave
        through `join` and `leave` (or come with `add`) for it to see them.
        """
        return [
            t
            for t in self._by_link.get(id(owner), {}).values()
            if t.owner is owner or t.member(owner) is not None
        ]

    def pools(self) -> list[TunnelRecord]:
        """
        Every live named tunnel.
        """
        return [t for t in self._tunnels.values() if t.named]

    def all(self) -> list[TunnelRecord]:
        """
        Every live tunnel.
        """
        return list(self._tunnels.values())
