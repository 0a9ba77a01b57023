"""
What the relay's control core (`_control.py`) asks its adapter to do: frozen values, one
class each, carried out by `tunnel.relay._link.RelayLink`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tunnel.wire.control import ControlMessage

__all__ = ["AcceptPeer", "Effect", "GoAway", "Log", "ProbeHolder", "Send", "log"]


class Effect:
    """
    Base class of what the adapter must do.
    """


@dataclass(frozen=True)
class Send(Effect):
    """
    Send `message` to the agent.
    """

    message: ControlMessage


@dataclass(frozen=True)
class GoAway(Effect):
    """
    Send GOAWAY `code` (NO_ERROR: drain; otherwise the link ends once it is written).
    """

    code: int
    message: str
    #: Only once what is queued now is written (the end of the reactor's turn): a GOAWAY
    #: other than NO_ERROR drops what is queued, such as the ``error`` that says why.
    after_turn: bool = False


@dataclass(frozen=True)
class AcceptPeer(Effect):
    """
    The agent's hello checked out: the link lets it do more than say hello.
    """


@dataclass(frozen=True)
class ProbeHolder(Effect):
    """
    Ask `holder` (the link that holds a tunnel this link reclaims) whether it is alive: a
    ping answered within `timeout` seconds. Answer the core with
    `RelaySession.probe_answered` or `RelaySession.probe_timed_out`, with `probe`.
    """

    probe: int
    holder: Any
    timeout: float


@dataclass(frozen=True)
class Log(Effect):
    """
    A log line: `format` with `fields`, in Twisted's logger's style. With a `key`, it goes
    through the relay's rate-limited log (at most `limit` lines per window, if given).
    The `peer_fields` hold what the agent sent: they are cut short before they are logged.
    """

    level: str  # "info", "warn", "error"
    format: str
    fields: dict[str, Any] = field(default_factory=dict)
    key: str | None = None
    limit: int | None = None
    peer_fields: tuple[str, ...] = ()


def log(
    level: str,
    format: str,
    *,
    key: str | None = None,
    limit: int | None = None,
    peer_fields: tuple[str, ...] = (),
    **fields: Any,
) -> Log:
    """
    A `Log` effect, its fields given as keywords.
    """
    return Log(level, format, fields, key=key, limit=limit, peer_fields=peer_fields)
