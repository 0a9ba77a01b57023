"""
What the agent's control core (`_control.py`) asks its adapter to do: frozen values, one
class each, carried out by `tunnel.agent.session.Agent`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tunnel.wire.control import ControlMessage, RelayWelcome, TunnelGranted

if TYPE_CHECKING:
    from tunnel.agent._control import ForwardRecord

__all__ = [
    "AbortStreams",
    "CertificateAnswered",
    "CloseConfirmed",
    "Dial",
    "Drain",
    "Effect",
    "Failed",
    "Granted",
    "LinkReady",
    "Log",
    "Send",
    "StopDialing",
    "StopRetrying",
    "Violation",
]


class Effect:
    """
    Base class of what the adapter must do.
    """


@dataclass(frozen=True)
class Dial(Effect):
    """
    Start connecting (and keep reconnecting) to the current relay.
    """


@dataclass(frozen=True)
class StopDialing(Effect):
    """
    Stop connecting and reconnecting; close the link if there is one.
    """


@dataclass(frozen=True)
class Send(Effect):
    """
    Send `message` on the link.
    """

    message: ControlMessage


@dataclass(frozen=True)
class LinkReady(Effect):
    """
    The relay welcomed us on this link.
    """

    welcome: RelayWelcome


@dataclass(frozen=True)
class Granted(Effect):
    """
    A forward has its tunnel (the first time, or again after a reconnect).
    """

    forward: ForwardRecord
    grant: TunnelGranted
    #: The grant before this one (a reconnect), or None (the first).
    previous: TunnelGranted | None


@dataclass(frozen=True)
class Failed(Effect):
    """
    A forward waiting for its tunnel will not get one; it is no longer the agent's.
    """

    forward: ForwardRecord
    error: Exception


@dataclass(frozen=True)
class AbortStreams(Effect):
    """
    Reset the streams of tunnel `tunnel_id` (closed by us).
    """

    tunnel_id: str


@dataclass(frozen=True)
class CertificateAnswered(Effect):
    """
    A certificate asked for with `waiter` came (`chain`, PEM) or will not (`error`).
    """

    waiter: Any
    chain: str | None
    error: Exception | None = None


@dataclass(frozen=True)
class CloseConfirmed(Effect):
    """
    The relay confirmed (or can no longer deny) that `tunnel_id` is closed.
    """

    tunnel_id: str


@dataclass(frozen=True)
class Drain(Effect):
    """
    Close the link as soon as no stream is left on it.
    """


@dataclass(frozen=True)
class StopRetrying(Effect):
    """
    The relay refused the token: retrying cannot help. Tell the observers.
    """

    reason: str


@dataclass(frozen=True)
class Violation(Effect):
    """
    The relay broke the protocol: end the link with PROTOCOL_ERROR.
    """

    message: str


@dataclass(frozen=True)
class Log(Effect):
    """
    Something worth a log line, and worth telling whoever watches the agent (the `tunnel`
    command, the inspector): `kind` names what happened (`tunnel.agent._events.Event`).
    """

    level: str  # "info", "warn", "error"
    text: str
    kind: str = "log"
    #: Only worth showing when asked for more (each failed attempt, each closed tunnel).
    detail: bool = False
    #: The tunnel it is about, if one.
    tunnel_id: str | None = None
