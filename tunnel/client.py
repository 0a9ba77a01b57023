"""
The Twisted API: ``forward(reactor, port)`` returns a Deferred that fires with a `Tunnel`.

    from tunnel.client import forward
    t = await forward(reactor, 8000)
    print(t.url)
    await t.close()

    async with forward(reactor, 8000) as t:
        ...

    tunnels = await forward_many(reactor, [8000, "22:tcp"])   # {8000: Tunnel, 22: Tunnel}

One agent (one link) is shared by every tunnel made with the same reactor, relay, token and
CA, so a second `forward` costs one round trip on a link that is already up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Unpack

from twisted.internet import defer

from tunnel._tunnel import Tunnel
from tunnel.agent.session import Agent
from tunnel.agent.settings import (
    ForwardArgs,
    ForwardSpec,
    RelayAddress,
    connection_settings,
    forward_spec,
    forward_specs,
)
from tunnel.errors import (
    AuthenticationError,
    RelayUnavailable,
    TunnelClosedError,
    TunnelError,
    TunnelRefused,
)

if TYPE_CHECKING:
    from tunnel.agent._httpconnect import ProxyAddress

__all__ = [
    "AuthenticationError",
    "RelayUnavailable",
    "Tunnel",
    "TunnelClosedError",
    "TunnelError",
    "TunnelRefused",
    "agent_for",
    "close_all",
    "forward",
    "forward_many",
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


class ForwardManyDeferred(defer.Deferred[dict[int, Tunnel]]):
    """
    The Deferred `forward_many` returns; it also works as
    ``async with forward_many(...) as tunnels``, closing them all when the block ends.
    """

    _tunnels: dict[int, Tunnel] | None = None

    async def __aenter__(self) -> dict[int, Tunnel]:
        self._tunnels = await self
        return self._tunnels

    async def __aexit__(self, *exc: Any) -> None:
        if self._tunnels is not None:
            await close_all(self._tunnels)


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
        Not with ``unencrypted=True``.
    @param h2_enabled: Modal's spelling of `h2` (giving both, with different values, is a
        `ValueError`).
    @param proxy_protocol: 1 or 2: the local server gets a PROXY protocol header of that
        version, with the public client's address, before each connection's first byte
        (nginx ``proxy_protocol``, HAProxy ``accept-proxy``); 0 (the default): none.
    @param allow: only clients from these networks or addresses (``"203.0.113.0/24"``,
        ``"2001:db8::1"``) may connect, enforced by the relay: others get a TLS
        ``access_denied`` alert, or their raw TCP connection closed. Default: everyone.
    @param deny: clients from these networks or addresses may not connect, even when
        `allow` lists them; refused as for `allow`. Default: nobody.
    @param client_ca: path of a PEM file of certificate authorities: public TLS clients
        must present a certificate from one of them (mutual TLS), checked by the relay.
        Not with ``unencrypted=True``.
    @param rate_limit: at most this many bytes per second in each direction, over all
        the tunnel's connections, enforced by the relay: ``"10MB/s"``, ``"500KB/s"``,
        ``"1GB/s"``, ``"8MiB/s"``, or an integer. Default: none but the relay's ceiling
        (``--max-rate``), which also lowers a higher one.
    @param passthrough: the relay routes public TLS connections by their SNI name and passes
        the TLS bytes on untouched: the local server terminates TLS, with a certificate for
        `Tunnel.host` (`Tunnel.issue_certificate` gets one from a development relay). Not with
        ``unencrypted``, ``h2`` or ``client_ca`` (those need the relay to terminate TLS).
    @param host: the local host to connect to (default 127.0.0.1).
    @param relay: ``host:port`` of the relay, or several separated by commas;
        default ``TUNNEL_RELAY``.
    @param token: the agent token; default ``TUNNEL_TOKEN``.
    @param ca: a PEM CA bundle to trust for the relay; default ``TUNNEL_CA``, else the
        system's trust store.
    @param proxy: ``http://[user:password@]host:port`` of an HTTP proxy to reach the relay
        through (``CONNECT``); default ``TUNNEL_PROXY``, else none.
    @param inspect: serve the agent's inspector page (its tunnels, live connections): True
        for 127.0.0.1:4040 or the next free port, or ``"[HOST:]PORT"``; the URL is
        `Tunnel.inspector_url`.
    @raise ValueError: at once, before any I/O, for a bad argument or a port already forwarded.
    @return: a Deferred firing with the `Tunnel`, or failing with `RelayUnavailable`,
        `AuthenticationError` or `TunnelRefused` (never hanging: the relay must answer within
        the agent's connect timeout).
    """
    _check_keywords(kwargs, "forward")
    spec = forward_spec(port, kwargs)
    agent = agent_for(
        reactor, kwargs.get("relay"), kwargs.get("token"), kwargs.get("ca"), kwargs.get("proxy")
    )
    address = kwargs.get("inspect")
    if address:
        # The inspector is Twisted's web server: imported only for a forward that asks for it.
        from tunnel.agent import _inspect

        _inspect.inspect(agent, address)
    result = ForwardDeferred()
    agent.forward(spec).chainDeferred(result)
    return result


def _check_keywords(kwargs: ForwardArgs, api: str) -> None:
    unknown = sorted(set(kwargs) - set(ForwardArgs.__annotations__))
    if unknown:
        raise TypeError(f"{api}() got an unexpected keyword argument {unknown[0]!r}")


def forward_many(
    reactor: Any, ports: Iterable[int | str | ForwardSpec], **kwargs: Unpack[ForwardArgs]
) -> ForwardManyDeferred:
    """
    Forward several local ports at once, on one link: the counterpart of Modal's
    ``Sandbox.tunnels()``.

        tunnels = await forward_many(reactor, [8000, "22:tcp"])
        tunnels[8000].url, tunnels[22].tcp_socket

    @param ports: each a local port, or a ``--forward`` value such as ``"22:tcp"`` or
        ``"8000:h2"`` (its suffixes choose that tunnel's options, as on the command line),
        or a `tunnel.agent.settings.ForwardSpec`.
    @param kwargs: as for `forward`; the tunnel options apply to every port.
    @raise ValueError: at once, before any I/O, for a bad entry or argument, a port given
        twice, or a port already forwarded; then nothing has been asked of the relay.
    @return: a Deferred firing with ``{port: Tunnel}`` once every tunnel is granted. If one
        cannot be had, the others are closed and it fails with that error (as `forward`).
    """
    _check_keywords(kwargs, "forward_many")
    specs = forward_specs(list(ports), kwargs)
    agent = agent_for(
        reactor, kwargs.get("relay"), kwargs.get("token"), kwargs.get("ca"), kwargs.get("proxy")
    )
    for spec in specs:
        agent.check_forward(spec)
    asked = [agent.forward(spec) for spec in specs]

    def settled(results: list[tuple[bool, Any]]) -> Any:
        tunnels = {spec.port: value for spec, (ok, value) in zip(specs, results, strict=True) if ok}
        failures = [value for ok, value in results if not ok]
        if not failures:
            return tunnels
        # All or nothing: a caller told of a failure has no tunnels to close.
        return close_all(tunnels).addBoth(lambda _: failures[0])

    result = ForwardManyDeferred()
    defer.DeferredList(asked, consumeErrors=True).addCallback(settled).chainDeferred(result)
    return result


def close_all(tunnels: dict[int, Tunnel]) -> defer.Deferred[None]:
    """
    Close every tunnel of a `forward_many` result; fires when all are closed.
    """
    d: defer.Deferred[Any] = defer.gatherResults(
        [t.close() for t in tunnels.values()], consumeErrors=True
    )
    return d.addBoth(lambda _: None)


def shutdown(reactor: Any) -> defer.Deferred[None]:
    """
    Close every tunnel and link made with `reactor`.
    """
    return _shutdown_where(reactor, lambda ca: True)


def _shutdown_where(reactor: Any, trusts: Callable[[str | None], bool]) -> defer.Deferred[None]:
    """
    Close the tunnels and links made with `reactor` by agents whose CA setting `trusts`
    accepts (`tunnel.testing` closes those of one test relay so).
    """
    stops = []
    for key, agent in list(_agents.items()):
        if key[0] == id(reactor) and trusts(key[3]):
            del _agents[key]
            stops.append(agent.stop())
    d: defer.Deferred[Any] = defer.gatherResults(stops, consumeErrors=True)
    return d.addCallback(lambda _: None)
