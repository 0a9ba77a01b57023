"""
Dialling a relay: the trust root, the TCP (or HTTP CONNECT) endpoint, the TLS on top, the
round-trip probe that ranks several relays, and the endpoint that fails over between them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet import defer, interfaces
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import (
    Certificate,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from tunnel._fasttls import fast_client_tls
from tunnel.agent.settings import RelayAddress
from tunnel.wire import LINK_ALPN

if TYPE_CHECKING:
    from tunnel.agent.session import Agent

__all__ = ["FailoverEndpoint", "connect_time", "describe_failure", "trust_root"]


def describe_failure(reason: Failure) -> str:
    value = reason.value
    text = str(value) or type(value).__name__
    if "certificate verify failed" in text or "CERTIFICATE_VERIFY_FAILED" in text:
        return f"the relay's certificate is not trusted ({text}); pass --ca / TUNNEL_CA"
    return text


def trust_root(ca: str | None) -> Any:
    if ca is None:
        return platformTrust()
    with open(ca, "rb") as f:
        pem = f.read()
    blocks = [
        b"-----BEGIN CERTIFICATE-----" + part
        for part in pem.split(b"-----BEGIN CERTIFICATE-----")[1:]
    ]
    if not blocks:
        raise ValueError(f"{ca} holds no PEM certificate")
    return trustRootFromCertificates([Certificate.loadPEM(block) for block in blocks])


def _tcp_endpoint(reactor: Any, relay: RelayAddress, timeout: float) -> Any:
    """
    A TCP endpoint for `relay`; ``*.localhost`` names are loopback (RFC 6761), as curl and
    browsers treat them.
    """
    host = relay.host
    dial = "127.0.0.1" if host == "localhost" or host.endswith(".localhost") else host
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
        creator = optionsForClientTLS(
            relay.host, trustRoot=agent._trust, acceptableProtocols=[LINK_ALPN]
        )
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
        d: defer.Deferred[Any] = fast_client_tls(creator, inner).connect(factory)

        def failed(reason: Failure) -> Failure:
            agent._dial_failed(f"cannot connect to {relay}: {describe_failure(reason)}")
            return reason

        d.addErrback(failed)
        return d
