"""
The agent's end of its link: a thin adapter that decodes control messages and link events
and hands them to the `Agent` (whose `AgentControl` decides).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.logger import Logger
from twisted.python.failure import Failure

from tunnel.link import LinkProtocol, Stream
from tunnel.wire import ErrorCode
from tunnel.wire.control import (
    ControlError,
    ControlMessage,
    TunnelGranted,
    decode_message,
    encode_message,
)
from tunnel.wire.control import TunnelRefused as TunnelRefusedMessage

if TYPE_CHECKING:
    from tunnel.agent.session import Agent

__all__ = ["AgentLink"]

_log = Logger()


class AgentLink(LinkProtocol):
    """
    The agent's end of its link.
    """

    def __init__(self, agent: Agent) -> None:
        super().__init__(agent.reactor, client=True, settings=agent.settings)
        self.agent = agent
        self.draining = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self.agent._connected(self)

    def send(self, message: ControlMessage) -> None:
        """
        Send a control message to the relay.
        """
        self.sendControl(encode_message(message))

    def controlReceived(self, payload: bytes) -> None:
        try:
            message = decode_message(payload)
        except ControlError as e:
            _log.warn("malformed control message from the relay: {e}", e=e)
            self.goAway(ErrorCode.PROTOCOL_ERROR, str(e))
            return
        if message is None:
            return
        if isinstance(message, TunnelGranted | TunnelRefusedMessage):
            self.agent._answered(message)
        else:
            self.agent._received(self, message)

    def streamOpened(self, stream: Stream, metadata: bytes) -> None:
        self.agent._stream_opened(self, stream, metadata)

    def goAwayReceived(self, code: int, message: str) -> None:
        if code != ErrorCode.NO_ERROR:
            return
        # The relay is draining: streams in flight finish here; the link closes as soon as
        # none is left, so the ClientService reconnects (to the next relay, if there are
        # several) while nothing is lost.
        self.agent._drain(self, message)

    def drainWhenIdle(self) -> None:
        """
        Close as soon as no stream is left.
        """
        self.draining = True
        self.streamForgotten()

    def streamForgotten(self) -> None:
        if self.draining and not self.streams and self.transport is not None:
            self.abort()

    def linkLost(self, reason: Failure) -> None:
        self.agent._link_lost(self, reason)
