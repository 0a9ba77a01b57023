"""
Who an agent is and what it may hold: the relay's check of a hello's token, sans-IO.

A token is accepted if it is in the tokens file (``--tokens``; compared in constant time with
every entry) or is a JWT signed by a token key (``--token-key``; `tunnel._signedtokens`)
whose subject and id are not revoked (``--revoked``). The answer is a `Permit`: the link's
principal (the key of per-party bounds and of reclaim secrets: ``token:<digest>`` for a
token of the file, ``sub:<subject>`` for a signed one, so that one subject's many tokens
count as one), the tunnel names it may hold, its expiry and its claims.

A relay with neither accepts any agent, which may hold any name (development only).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase

from tunnel._signedtokens import InvalidToken, TokenVerifier, looks_signed

__all__ = ["ANYONE", "Permit", "authenticate"]


@dataclass(frozen=True)
class Permit:
    """
    What an accepted credential allows.
    """

    #: ``token:<digest>`` or ``sub:<subject>``; "" for a relay that takes no tokens (the
    #: link's address is its principal then).
    principal: str
    #: The tunnel names (shell-style globs) it may hold; empty: random ids only; None: any.
    names: tuple[str, ...] | None = ()
    #: Seconds since the epoch at which it expires (the link is closed then), or None.
    expires: float | None = None
    #: At most this many tunnels at once over all the links of its principal, or None.
    max_tunnels: int | None = None
    #: For a signed token: its subject and id, which ``--revoked`` may name.
    subject: str | None = None
    token_id: str | None = None

    def allows(self, name: str) -> bool:
        """
        Whether a tunnel named `name` may be held with this credential.
        """
        if self.names is None:
            return True
        return any(fnmatchcase(name, glob) for glob in self.names)

    def revoked(self, revoked: Collection[str]) -> bool:
        """
        Whether `revoked` names this credential's subject or id.
        """
        return (self.subject is not None and self.subject in revoked) or (
            bool(self.token_id) and self.token_id in revoked
        )


#: The permit of every agent of a relay that takes no tokens.
ANYONE = Permit("", names=None)


def _static(token: str, tokens: Collection[str]) -> tuple[str, ...] | None:
    """
    The names of `token` if it is among `tokens` (every entry compared in constant time, so
    the timing does not tell which one nearly matched), else None.
    """
    given = token.encode()
    found: str | None = None
    for candidate in tokens:
        if hmac.compare_digest(candidate.encode(), given):
            found = candidate
    if found is None:
        return None
    return tuple(tokens[found]) if isinstance(tokens, Mapping) else ()


def authenticate(
    token: str | None,
    now: float,
    *,
    tokens: Collection[str] | None,
    verifier: TokenVerifier | None,
    revoked: Collection[str] = (),
) -> Permit | str:
    """
    The permit of `token` at time `now` (seconds since the epoch), or why it is refused
    (for the relay's log; the agent is told ``unauthorized`` whatever the reason).

    @param tokens: the tokens of the file (a mapping gives each one's names), or None.
    @param verifier: the keys of signed tokens, or None.
    @param revoked: revoked subjects and token ids of signed tokens.
    """
    if tokens is None and verifier is None:
        return ANYONE
    if not token:
        return "no token"
    if tokens is not None:
        names = _static(token, tokens)
        if names is not None:
            digest = hashlib.sha256(token.encode()).hexdigest()[:32]
            return Permit("token:" + digest, names=names)
    if verifier is None or not looks_signed(token):
        return "wrong token"
    try:
        claims = verifier.verify(token, now)
    except InvalidToken as e:
        return f"signed token refused: {e}"
    permit = Permit(
        "sub:" + claims.subject,
        names=claims.names,
        expires=claims.expires,
        max_tunnels=claims.max_tunnels,
        subject=claims.subject,
        token_id=claims.token_id,
    )
    if permit.revoked(revoked):
        return f"signed token of {claims.subject} revoked"
    return permit
