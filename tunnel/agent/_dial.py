"""
Dialling a relay: the trust root, the TCP (or HTTP CONNECT) endpoint, the TLS on top, the
round-trip probe that ranks several relays, and the endpoint that fails over between them.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, interfaces
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from tunnel.agent._bootstrap import dial_address
from tunnel.agent._stdtls import std_client_tls
from tunnel.agent._tlscontext import client_context, describe_error
from tunnel.agent.settings import RelayAddress

if TYPE_CHECKING:
    from tunnel.agent.session import Agent

__all__ = ["FailoverEndpoint", "connect_time", "describe_failure", "rank_times", "trust_root"]


def describe_failure(reason: Failure) -> str:
    return describe_error(reason.value)


def trust_root(ca: str | None) -> ssl.SSLContext:
    """
    The TLS client context of the agent's links (`tunnel.agent._tlscontext.client_context`).

    @raise ValueError: `ca` holds no PEM certificate.
    """
    return client_context(ca)


def _tcp_endpoint(reactor: Any, relay: RelayAddress, timeout: float) -> Any:
    """
    A TCP endpoint for `relay`; ``*.localhost`` names are loopback (RFC 6761), as curl and
    browsers treat them.
    """
    dial = dial_address(relay)
    if isIPAddress(dial):
        # No resolver round trip (and no thread pool start) for an address.
        return TCP4ClientEndpoint(reactor, dial, relay.port, timeout=timeout)
    if isIPv6Address(dial):
        return TCP6ClientEndpoint(reactor, dial, relay.port, timeout=timeout)
    return HostnameEndpoint(reactor, dial, relay.port, timeout=timeout)


def connect_time(reactor: Any, relay: RelayAddress, timeout: float) -> defer.Deferred[float]:
    """
    Seconds a TCP connection to `relay` takes (infinity if it fails): about one round trip.
    """
    started = reactor.seconds()
    d: defer.Deferred[Any] = _tcp_endpoint(reactor, relay, timeout).connect(
        Factory.forProtocol(Protocol)
    )

    def connected(protocol: Protocol) -> float:
        if protocol.transport is not None:
            protocol.transport.loseConnection()
        return float(reactor.seconds() - started)

    return d.addCallbacks(connected, lambda _: float("inf"))


#: Once one relay has answered, how long the others have, as a multiple of its time...
RANK_PATIENCE = 4.0
#: ...plus this many seconds: a relay slower than that is not the nearest, and one that
#: drops the probe's packets does not hold the first link up for the whole connect timeout.
RANK_SLACK = 0.05


def rank_times(
    reactor: Any, relays: list[RelayAddress], timeout: float
) -> defer.Deferred[list[float]]:
    """
    The connect time of each of `relays` (`connect_time`), in their order; infinity for one
    that failed, or that had not answered within ``RANK_PATIENCE`` times the first answer
    plus ``RANK_SLACK`` (its probe is then cancelled).
    """
    times = [float("inf")] * len(relays)
    pending = set(range(len(relays)))
    done: defer.Deferred[list[float]] = defer.Deferred()
    probes: list[defer.Deferred[float]] = []
    deadline: list[Any] = []
    finished: list[bool] = []

    def finish() -> None:
        if finished:
            return
        finished.append(True)
        for call in deadline:
            if call.active():
                call.cancel()
        for i in list(pending):
            probes[i].cancel()
        done.callback(times)

    def answered(seconds: float, i: int) -> None:
        if finished:
            return
        pending.discard(i)
        times[i] = seconds
        if not pending:
            finish()
        elif seconds != float("inf") and not deadline:
            deadline.append(reactor.callLater(seconds * RANK_PATIENCE + RANK_SLACK, finish))

    probes.extend(connect_time(reactor, relay, timeout) for relay in relays)
    for i, probe in enumerate(probes):
        # A cancelled probe ends in a failure that `connect_time` turns into infinity.
        probe.addCallback(answered, i)
    return done


@implementer(interfaces.IStreamClientEndpoint)
class FailoverEndpoint:
    """
    Dials the agent's relays in turn: the current one until an attempt fails, then the next.
    """

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def __repr__(self) -> str:
        # ClientService logs the endpoint ("Scheduling retry 2 to connect ..."): say which.
        agent = self.agent
        return f"relay {agent.relays[agent._relay_index % len(agent.relays)]}"

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        agent = self.agent
        relay = agent.relays[agent._relay_index % len(agent.relays)]
        if agent.proxy is None:
            inner = _tcp_endpoint(agent.reactor, relay, agent.connect_timeout)
        else:
            from tunnel.agent._httpconnect import HTTPConnectEndpoint

            proxy = agent.proxy
            inner = HTTPConnectEndpoint(
                agent.reactor,
                _tcp_endpoint(
                    agent.reactor, RelayAddress(proxy.host, proxy.port), agent.connect_timeout
                ),
                proxy,
                relay.host,
                relay.port,
                agent.connect_timeout,
            )
        d: defer.Deferred[Any] = std_client_tls(agent._trust, relay.host, inner).connect(factory)

        def failed(reason: Failure) -> Failure:
            agent._dial_failed(f"cannot connect to {relay}: {describe_failure(reason)}")
            return reason

        d.addErrback(failed)
        return d
