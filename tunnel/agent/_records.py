"""
The agent adapter's record of one forward; free of Twisted, so that the plain API's first
link (made before Twisted is imported) keeps the records the `Agent` then adopts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tunnel.agent._control import ForwardRecord
from tunnel.agent.settings import ForwardSpec

if TYPE_CHECKING:
    from tunnel._tunnel import Tunnel

__all__ = ["AgentForward"]


class AgentForward(ForwardRecord):
    """
    The core's record of one forward, with the adapter's objects: the caller's Deferred
    and the `Tunnel` value.
    """

    def __init__(self, spec: ForwardSpec) -> None:
        super().__init__(spec)
        self.tunnel: Tunnel | None = None
        #: A Deferred firing with the `Tunnel` at its first grant, or None.
        self.deferred: Any = None
        #: The rate limit the relay last said it enforces (octets per second), or None.
        self.granted_rate: int | None = None
