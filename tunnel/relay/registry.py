"""
The relay's tunnel registry: ids, ownership, reclaim secrets and the raw TCP port pool.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tunnel._allow import AllowList, DenyList

__all__ = [
    "ID_ALPHABET",
    "PortPool",
    "ReclaimKey",
    "TunnelRecord",
    "TunnelRegistry",
    "new_tunnel_id",
    "valid_tunnel_id",
]

#: Lowercase, DNS-safe, without the look-alikes i, l, o, u.
ID_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
#: 16 characters of 5 bits each: 80 bits from the CSPRNG.
ID_LENGTH = 16


def new_tunnel_id() -> str:
    """
    A fresh tunnel id: 80 random bits from `secrets`, as 16 lowercase DNS-safe characters.
    """
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(ID_LENGTH))


def valid_tunnel_id(tunnel_id: str) -> bool:
    """
    Whether `tunnel_id` has the form of an id this relay hands out.
    """
    return len(tunnel_id) == ID_LENGTH and all(c in ID_ALPHABET for c in tunnel_id)


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

    def candidates(self, tunnel_id: str, wanted: int | None = None) -> list[int]:
        """
        Ports to try, in order, for `tunnel_id`: the wanted one first if it is free or rests
        after this same tunnel, then up to 64 random free ones.
        """
        self._expire()
        out: list[int] = []
        if wanted is not None and self.low <= wanted <= self.high and wanted not in self._in_use:
            resting = self._resting.get(wanted)
            if resting is None or resting[1] == tunnel_id:
                out.append(wanted)
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


@dataclass(eq=False)
class TunnelRecord:
    """
    A live tunnel.
    """

    tunnel_id: str
    #: "tls" or "tcp".
    kind: str
    #: The agent link that owns it (a `RelayLink`).
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


class TunnelRegistry:
    """
    Which link owns which tunnel id.
    """

    def __init__(self) -> None:
        self._tunnels: dict[str, TunnelRecord] = {}

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

    def remove(self, tunnel_id: str) -> TunnelRecord | None:
        """
        Forget a tunnel; returns it, or None when it was not live.
        """
        return self._tunnels.pop(tunnel_id, None)

    def owned_by(self, owner: Any) -> list[TunnelRecord]:
        """
        The tunnels `owner` holds.
        """
        return [t for t in self._tunnels.values() if t.owner is owner]

    def all(self) -> list[TunnelRecord]:
        """
        Every live tunnel.
        """
        return list(self._tunnels.values())
