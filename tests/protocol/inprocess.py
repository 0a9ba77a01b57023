"""
A relay and agents in the test process, over real loopback TLS (for what needs the real
objects of both ends: memory release, option negotiation).
"""

from __future__ import annotations

import gc
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from twisted.internet import defer, protocol, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from tunnel.agent.session import Agent, RelayAddress
from tunnel.relay import tap as relay_tap
from tunnel.relay.service import RelayService

DEADLINE = 20.0


def get_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


async def wait_until(check: Callable[[], bool], what: str) -> None:
    """Poll `check` every 10 ms until it holds; fail after `DEADLINE`."""
    reactor = get_reactor()
    deadline = time.monotonic() + DEADLINE
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await task.deferLater(reactor, 0.01, lambda: None)


class Echo(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


class Recorder(protocol.Protocol):
    """A client that keeps what it receives and notes when its connection ends."""

    def __init__(self) -> None:
        self.received = b""
        self.closed = False
        self.lost: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object = None) -> None:
        self.closed = True
        self.lost.callback(None)


async def connect(port: int) -> Recorder:
    """A `Recorder` connected to 127.0.0.1:`port`."""
    client = Recorder()
    await connectProtocol(TCP4ClientEndpoint(get_reactor(), "127.0.0.1", port), client)
    assert client.transport is not None
    return client


async def running_relay(state: Path) -> AsyncIterator[RelayService]:
    """A development relay listening on a free loopback port, stopped afterwards."""
    reactor = get_reactor()
    options = relay_tap.Options()
    options.parseOptions(
        [
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "--state-dir",
            str(state),
            "--tcp-ports",
            "24000-24999",
            "--tcp-interface",
            "127.0.0.1",
            "--workers",
            "1",
        ]
    )
    service = relay_tap.makeService(options, reactor)
    assert isinstance(service, RelayService)
    service.startService()
    # The relay freezes what exists at start-up out of collections; in a test process that
    # is the test run itself.
    gc.unfreeze()
    try:
        await wait_until(lambda: service.port is not None, "the relay to listen")
        yield service
    finally:
        await service.stopService()


def agent_for(relay: RelayService, state: Path) -> Agent:
    """An agent of `relay` (whose state directory is `state`), failing fast."""
    return Agent(
        get_reactor(),
        [RelayAddress("localhost", relay.port.getHost().port)],
        ca=str(state / "ca.pem"),
        fail_fast=True,
    )
