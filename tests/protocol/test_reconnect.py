"""
The agent's first retry after its link is cut comes within tens of milliseconds; after the
relay drained the link (GOAWAY), it backs off with the full second of jitter.

A relay and an agent run in this process over real loopback TLS; the delays are the ones
the agent's `ClientService` schedules (its "Scheduling retry" log events).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import protocol
from twisted.logger import globalLogPublisher

from tests.protocol.inprocess import Echo, agent_for, get_reactor, wait_until
from tunnel.agent.session import ForwardSpec
from tunnel.relay.service import RelayService
from tunnel.wire import ErrorCode


class Retries:
    """The retry delays the agent's `ClientService` schedules, in order."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, event: dict[str, Any]) -> None:
        if "Scheduling retry" in str(event.get("log_format", "")):
            self.delays.append(float(event["delay"]))


@pytest_twisted.ensureDeferred
async def test_a_cut_link_retries_at_once_and_a_drained_one_backs_off(
    relay: RelayService, tmp_path: Path
) -> None:
    reactor = get_reactor()
    echo = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
    agent = agent_for(relay, tmp_path / "state")
    retries = Retries()
    globalLogPublisher.addObserver(retries)
    try:
        assert agent.reconnect is not None
        # The link need not have been up for a while here (that bound is the policy's own
        # unit test): any welcomed link that is cut earns the quick retry.
        agent.reconnect.settled = 0.0
        await agent.forward(ForwardSpec(echo.getHost().port, unencrypted=True))
        state = relay.relay

        # A cut: the relay's end of the link is reset, no GOAWAY.
        (link,) = state.links
        link.transport.abortConnection()
        await wait_until(lambda: len(retries.delays) == 1, "the retry after the cut")
        assert retries.delays[0] < 0.05
        await wait_until(lambda: agent.links_made == 2, "the link to come back")
        await wait_until(lambda: len(state.links) == 1, "the relay to see one link")

        # A drain: the relay says GOAWAY; the agent closes once idle and backs off.
        (link,) = state.links
        link.goAway(ErrorCode.NO_ERROR, "relay draining")
        await wait_until(lambda: len(retries.delays) == 2, "the retry after the drain")
        assert 0.2 <= retries.delays[1] <= 1.2
    finally:
        globalLogPublisher.removeObserver(retries)
        await agent.stop()
        await echo.stopListening()
