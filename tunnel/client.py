"""
The Twisted API: ``forward(reactor, port)`` returns a Deferred that fires with a `Tunnel`.

    from tunnel.client import forward
    t = await forward(reactor, 8000)
    print(t.url)
    await t.close()

    async with forward(reactor, 8000) as t:
        ...

One agent (one link) is shared by every tunnel made with the same reactor, relay, token and
CA, so a second `forward` costs one round trip on a link that is already up.
"""

from __future__ import annotations

from typing import Any, Unpack

from twisted.internet import defer

from tunnel._tunnel import Tunnel
from tunnel.agent._httpconnect import ProxyAddress
from tunnel.agent.session import Agent
from tunnel.agent.settings import ForwardArgs, RelayAddress, connection_settings, forward_spec
from tunnel.errors import (
    AuthenticationError,
    RelayUnavailable,
    TunnelClosedError,
    TunnelError,
    TunnelRefused,
)

__all__ = [
    "AuthenticationError",
    "RelayUnavailable",
    "Tunnel",
    "TunnelClosedError",
    "TunnelError",
    "TunnelRefused",
    "agent_for",
    "forward",
    "shutdown",
]

_agents: dict[
    tuple[int, tuple[RelayAddress, ...], str | None, str | None, ProxyAddress | None], Agent
] = {}


class ForwardDeferred(defer.Deferred[Tunnel]):
    """
    The Deferred `forward` returns; it also works as ``async with forward(...) as t``,
    closing the tunnel when the block ends.
    """

    _tunnel: Tunnel | None = None

    async def __aenter__(self) -> Tunnel:
        self._tunnel = await self
        return self._tunnel

    async def __aexit__(self, *exc: Any) -> None:
        if self._tunnel is not None:
            await self._tunnel.close()


def agent_for(
    reactor: Any,
    relay: str | None = None,
    token: str | None = None,
    ca: str | None = None,
    proxy: str | None = None,
) -> Agent:
    """
    The shared agent for these settings (arguments, else ``TUNNEL_RELAY``, ``TUNNEL_TOKEN``,
    ``TUNNEL_CA``, ``TUNNEL_PROXY``), created on first use.

    @raise ValueError: no relay, a malformed relay or proxy address, or a missing CA file.
    """
    settings = connection_settings(relay, token, ca, proxy)
    key = (id(reactor), settings.relays, settings.token, settings.ca, settings.proxy)
    agent = _agents.get(key)
    if agent is None:
        agent = Agent(
            reactor, settings.relays, token=settings.token, ca=settings.ca, proxy=settings.proxy
        )
        _agents[key] = agent
    return agent


def forward(reactor: Any, port: int, **kwargs: Unpack[ForwardArgs]) -> ForwardDeferred:
    """
    Forward a local port through the relay.

    The keyword arguments (all optional) are `tunnel.agent.settings.ForwardArgs`; each
    tunnel option is a row of `tunnel.wire.options`.

    @param port: the local port to expose.
    @param name: a kept name instead of a random id: ``https://<name>.<domain>``, the same
        across reconnects and relay restarts. A lowercase DNS label not of the form of a
        random id (else `ValueError`); the token must allow it (else `TunnelRefused`
        ``name_not_allowed``). Agents asking for the same name serve it together.
    @param unencrypted: also give the tunnel a raw TCP port at the relay (`Tunnel.tcp_socket`).
    @param h2: advertise HTTP/2 in ALPN (the local server speaks HTTP/2 in the clear).
    @param proxy_protocol: 1 or 2: the local server gets a PROXY protocol header of that
        version, with the public client's address, before each connection's first byte
        (nginx ``proxy_protocol``, HAProxy ``accept-proxy``); 0 (the default): none.
    @param allow: only clients from these networks or addresses (``"203.0.113.0/24"``,
        ``"2001:db8::1"``) may connect, enforced by the relay: others get a TLS
        ``access_denied`` alert, or their raw TCP connection closed. Default: everyone.
    @param client_ca: path of a PEM file of certificate authorities: public TLS clients
        must present a certificate from one of them (mutual TLS), checked by the relay.
        Not with ``unencrypted=True``.
    @param host: the local host to connect to (default 127.0.0.1).
    @param relay: ``host:port`` of the relay, or several separated by commas;
        default ``TUNNEL_RELAY``.
    @param token: the agent token; default ``TUNNEL_TOKEN``.
    @param ca: a PEM CA bundle to trust for the relay; default ``TUNNEL_CA``, else the
        system's trust store.
    @param proxy: ``http://[user:password@]host:port`` of an HTTP proxy to reach the relay
        through (``CONNECT``); default ``TUNNEL_PROXY``, else none.
    @raise ValueError: at once, before any I/O, for a bad argument or a port already forwarded.
    @return: a Deferred firing with the `Tunnel`, or failing with `RelayUnavailable`,
        `AuthenticationError` or `TunnelRefused` (never hanging: the relay must answer within
        the agent's connect timeout).
    """
    unknown = sorted(set(kwargs) - set(ForwardArgs.__annotations__))
    if unknown:
        raise TypeError(f"forward() got an unexpected keyword argument {unknown[0]!r}")
    spec = forward_spec(port, kwargs)
    agent = agent_for(
        reactor, kwargs.get("relay"), kwargs.get("token"), kwargs.get("ca"), kwargs.get("proxy")
    )
    result = ForwardDeferred()
    agent.forward(spec).chainDeferred(result)
    return result


def shutdown(reactor: Any) -> defer.Deferred[None]:
    """
    Close every tunnel and link made with `reactor`.
    """
    stops = []
    for key, agent in list(_agents.items()):
        if key[0] == id(reactor):
            del _agents[key]
            stops.append(agent.stop())
    d: defer.Deferred[Any] = defer.gatherResults(stops, consumeErrors=True)
    return d.addCallback(lambda _: None)
