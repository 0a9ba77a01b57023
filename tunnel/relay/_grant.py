"""
The relay's decision on one tunnel request of a link, sans-IO: the request rates of the link
and of its principal, then the grant: drain, reclaim (verified against the link's identity,
and of an id another link holds, decided once that holder is probed), tunnels per agent and
per principal, every option through the options table (`tunnel.wire.options`), the raw TCP
port; for a name, the token's permission and the pool it joins (`grant_named`).

Functions of the link's `RelaySession` (`_control`), which calls them in the states the
table allows; the relay-wide answers come from its state (`tunnel.relay._state.Relay`).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from tunnel._rate import format_rate
from tunnel.relay._effects import Effect, GoAway, ProbeHolder, Send, log
from tunnel.relay._ratelimit import Throttle
from tunnel.relay.config import RECLAIM_PROBE_TIMEOUT
from tunnel.relay.registry import TunnelRecord, valid_tunnel_id
from tunnel.wire import options as tunnel_options
from tunnel.wire.codes import RefusalCode
from tunnel.wire.control import TunnelGranted, TunnelRefused, TunnelRequest
from tunnel.wire.errors import ErrorCode

if TYPE_CHECKING:
    from tunnel.relay._control import RelaySession

__all__ = ["decide_reclaim", "effective_rate", "grant", "grant_named", "reclaim_held", "requested"]


def requested(session: RelaySession, request: TunnelRequest) -> list[Effect]:
    """
    Answer a tunnel request (`grant`), unless the link or its principal asks faster
    than its rate: then ``limit``, and a link that keeps on asking after `RATE_STRIKES`
    such refusals is ended with GOAWAY ENHANCE_YOUR_CALM.
    """
    relay = session.relay
    config = relay.config
    if session.requests.tokens >= 1 and relay.principal_requests.take(session.principal):
        session.requests.take()
        return grant(session, request)
    relay.refused["tunnel_requests_rate"] += 1
    per_link = session.requests.tokens < 1
    whose = "link" if per_link else "token"
    rate, burst = (
        (config.tunnel_request_rate, config.tunnel_request_burst)
        if per_link
        else (config.token_request_rate, config.token_request_burst)
    )
    effects: list[Effect] = [
        log(
            "warn",
            "refused a tunnel request of {peer}: over the rate of its {whose}",
            key="tunnel-request-rate",
            peer=session.peer_name,
            whose=whose,
        ),
        Send(
            TunnelRefused(
                request.request_id,
                RefusalCode.LIMIT,
                f"too many tunnel requests: slow down (at most {rate:g} a second, "
                f"{burst} at once, per {whose})",
            )
        ),
    ]
    if not session.strikes.take():
        effects.append(
            GoAway(ErrorCode.ENHANCE_YOUR_CALM, "tunnel requests refused for their rate")
        )
    return effects


def grant(
    session: RelaySession, request: TunnelRequest, probed_elsewhere: bool = False
) -> list[Effect]:
    """
    Grant a tunnel, or say why not. A reclaim is verified against the identity this link
    was accepted with (the reclaim secret binds its token); of an id another link still
    holds (here, or on another worker unless its holder was `probed_elsewhere` already),
    the answer comes later (`reclaim_held`).
    """
    relay = session.relay

    def refuse(code: RefusalCode, message: str) -> list[Effect]:
        return [Send(TunnelRefused(request.request_id, code, message))]

    if relay.draining:
        return refuse(RefusalCode.DRAINING, "the relay is shutting down")
    if request.options.get("name") is not None:
        return grant_named(session, request)
    kind = request.kind
    if request.reclaim_id is not None:
        tunnel_id = request.reclaim_id
        if (
            not valid_tunnel_id(tunnel_id)
            or request.reclaim_secret is None
            or not relay.reclaim_key.verify(
                kind, tunnel_id, request.reclaim_secret, session.reclaim_owner
            )
        ):
            return [
                log(
                    "warn",
                    "refused a reclaim of {id} with a wrong secret from {peer}",
                    key="reclaim-refused",
                    id=tunnel_id,
                    peer=session.peer_name,
                ),
                *refuse(
                    RefusalCode.RECLAIM_REFUSED,
                    "the reclaim secret does not match the tunnel (or another token's)",
                ),
            ]
        existing = relay.registry.get(tunnel_id)
        if existing is not None:
            if existing.owner is session.owner:
                return [Send(granted(session, request, existing))]
            return reclaim_held(session, request, existing)
        holder = None if probed_elsewhere else relay.elsewhere.holder(tunnel_id)
        if holder is not None:
            return reclaim_held(session, request, TunnelRecord(tunnel_id, kind, holder))
    else:
        tunnel_id = relay.registry.fresh_id()
    over = _over_limits(session)
    if over is not None:
        return refuse(RefusalCode.LIMIT, over)
    # Every option through the one table: typed values, or why not.
    try:
        options = tunnel_options.parse_request_options(kind, request.options)
        options.pop("name", None)
        record = _record(session, tunnel_id, kind, options)
    except ValueError as e:
        return refuse(RefusalCode.BAD_REQUEST, str(e))
    if kind == "tcp" and not relay.listen_tcp(record, request.reclaim_port):
        return refuse(RefusalCode.NO_PORTS, "no free port in the relay's TCP range")
    relay.registry.add(record)
    return [_granted_log(session, record), Send(granted(session, request, record))]


def _record(
    session: RelaySession, tunnel_id: str, kind: str, options: dict[str, Any], **named: Any
) -> TunnelRecord:
    """
    The record of a tunnel granted with `options` (typed by the options table): its access
    rules, its client-certificate context and its rate limit (at most the relay's ceiling)
    taken out of `options`, what is left kept as the tunnel's options.

    @raise ValueError: the client CAs cannot make a TLS context.
    """
    relay = session.relay
    allow = options.pop("allow", None)
    deny = options.pop("deny", None)
    rate = effective_rate(options.pop("rate_limit", None), relay.config.max_rate)
    cas = options.pop("client_ca", None)
    context = relay.client_context(options, cas) if cas is not None else None
    return TunnelRecord(
        tunnel_id,
        kind,
        session.owner,
        options,
        allow,
        deny=deny,
        context=context,
        throttle=Throttle(rate, relay.reactor) if rate is not None else None,
        **named,
    )


def _over_limits(session: RelaySession) -> str | None:
    """
    Why `session` may hold no more tunnels (tunnels per agent; its token's ``max_tunnels``
    over all the links of its principal), or None.
    """
    relay = session.relay
    limit = relay.config.max_tunnels_per_agent
    if len(relay.registry.owned_by(session.owner)) >= limit:
        return f"an agent may hold at most {limit} tunnels"
    most = session.permit.max_tunnels
    if most is not None:
        held = relay.elsewhere.tunnels(session.principal) + sum(
            len(relay.registry.owned_by(link))
            for link in relay.principal_links.of(session.principal)
        )
        if held >= most:
            return f"this token's subject may hold at most {most} tunnels at once"
    return None


def _granted_log(session: RelaySession, record: TunnelRecord, joined: bool = False) -> Effect:
    relay = session.relay
    allow, deny, context = record.allow, record.deny, record.context
    rate = record.throttle.rate if record.throttle is not None else None
    restrictions = (
        (f", clients from {', '.join(allow.entries())} only" if allow else "")
        + (f", none from {', '.join(deny.entries())}" if deny else "")
        + (", client certificates required" if context is not None else "")
        + (f", at most {format_rate(rate)} each way" if rate is not None else "")
    )
    return log(
        "info",
        "granted {kind} tunnel {host}{port} to {peer}{restrictions}{pool}",
        kind=record.kind,
        host=relay.host_of(record.tunnel_id),
        port=f" (tcp port {record.tcp_port})" if record.tcp_port else "",
        peer=session.peer_name,
        restrictions=restrictions,
        pool=f" (member {len(record.members)} of its pool)" if joined else "",
    )


def _signature(kind: str, options: dict[str, Any]) -> str:
    """
    What the members of a name's pool must ask for alike: the kind and every known option
    but the name, as canonical JSON.
    """
    placed = tunnel_options.Placement.OPTIONS
    known = {o.name for o in tunnel_options.OPTIONS if o.placement is placed}
    same = {k: v for k, v in options.items() if k in known and k != "name"}
    return json.dumps([kind, same], sort_keys=True, separators=(",", ":"))


def grant_named(session: RelaySession, request: TunnelRequest) -> list[Effect]:
    """
    Grant a named tunnel, or say why not: a valid name (never of the form of a random id),
    that the link's token allows (``name_not_allowed``), within the link's limits. The
    first link to ask for a name creates it; the others that ask while it is live join its
    pool, with the same kind and options (``bad_request`` otherwise), and share its public
    connections. No reclaim secret: the name is the identity, and the token's permission
    is what counts; a raw TCP name asks first for a port derived from it (then the one it
    had, as the agent remembers), so that it keeps its port while that is free.
    """
    relay = session.relay

    def refuse(code: RefusalCode, message: str) -> list[Effect]:
        return [Send(TunnelRefused(request.request_id, code, message))]

    kind = request.kind
    try:
        options = tunnel_options.parse_request_options(kind, request.options)
    except ValueError as e:
        return refuse(RefusalCode.BAD_REQUEST, str(e))
    name: str = options.pop("name")
    if not session.permit.allows(name):
        return [
            log(
                "warn",
                "refused tunnel name {name} to {peer}: its token does not allow it",
                key="name-not-allowed",
                name=name,
                peer=session.peer_name,
            ),
            *refuse(
                RefusalCode.NAME_NOT_ALLOWED,
                f"the token does not allow the tunnel name {name!r}",
            ),
        ]
    over = _over_limits(session)
    if over is not None:
        return refuse(RefusalCode.LIMIT, over)
    signature = _signature(kind, request.options)
    existing = relay.registry.get(name)
    served_elsewhere = relay.elsewhere.signature(name)
    if served_elsewhere is not None and served_elsewhere != signature:
        return refuse(RefusalCode.BAD_REQUEST, _other_options(name))
    if existing is not None:
        if existing.member(session.owner) is not None:
            return refuse(RefusalCode.BAD_REQUEST, f"this agent already serves {name!r}")
        if existing.signature != signature:
            return refuse(RefusalCode.BAD_REQUEST, _other_options(name))
        relay.registry.join(existing, session.owner)
        return [
            _granted_log(session, existing, joined=True),
            Send(granted(session, request, existing)),
        ]
    try:
        record = _record(session, name, kind, options, named=True, signature=signature)
    except ValueError as e:
        return refuse(RefusalCode.BAD_REQUEST, str(e))
    wanted = (relay.preferred_port(name), request.reclaim_port)
    if kind == "tcp" and not relay.listen_tcp(record, wanted):
        return refuse(RefusalCode.NO_PORTS, "no free port in the relay's TCP range")
    relay.registry.add(record)
    return [_granted_log(session, record), Send(granted(session, request, record))]


def _other_options(name: str) -> str:
    return (
        f"{name!r} is served with other options: every agent serving a name must ask "
        "for the same kind (tcp, h2, passthrough), restrictions (allow, deny, "
        "client_ca) and rate limit"
    )


def reclaim_held(
    session: RelaySession, request: TunnelRequest, existing: TunnelRecord
) -> list[Effect]:
    """
    A verified reclaim of a tunnel another link holds: ask the holder whether it is
    alive (`ProbeHolder`), then decide again (`decide_reclaim`).
    """
    limit = session.relay.config.max_tunnels_per_agent
    if session.pending_reclaims >= limit:
        return [
            Send(
                TunnelRefused(
                    request.request_id,
                    RefusalCode.LIMIT,
                    f"at most {limit} reclaims may wait at once",
                )
            )
        ]
    probe = session.await_probe(request, existing)
    return [
        log(
            "info",
            "tunnel {id} is held by another link: checking that it is alive",
            id=existing.tunnel_id,
        ),
        ProbeHolder(probe, existing.owner, RECLAIM_PROBE_TIMEOUT),
    ]


def decide_reclaim(
    session: RelaySession,
    request: TunnelRequest,
    existing: TunnelRecord,
    holder: Any,
    alive: bool,
) -> list[Effect]:
    """
    The holder of the tunnel that `request` reclaims answered its probe (`alive`) or did
    not: an alive holder keeps it (``reclaim_refused``); a silent one loses it, and the
    request is granted afresh. A holder on another worker (``holder.remote``) was probed
    there, and a silent one closed there.
    """
    relay = session.relay
    tunnel_id = existing.tunnel_id
    remote = getattr(holder, "remote", False)
    if alive and (
        remote or (relay.registry.get(tunnel_id) is existing and existing.owner is holder)
    ):
        return [
            log("warn", "refused a reclaim of {id}: the link holding it is alive", id=tunnel_id),
            Send(
                TunnelRefused(
                    request.request_id,
                    RefusalCode.RECLAIM_REFUSED,
                    "the tunnel is held by another link, which is alive",
                )
            ),
        ]
    if remote:
        # Held on another worker, whose silent link lost it there: decided here without
        # asking again (a claim the supervisor still finds in conflict is closed then).
        reclaimed = log("info", "tunnel {id} reclaimed from another worker's link", id=tunnel_id)
        return [reclaimed, *grant(session, request, probed_elsewhere=True)]
    effects: list[Effect] = []
    if relay.registry.get(tunnel_id) is existing and existing.owner is holder:
        effects.append(log("info", "tunnel {id} reclaimed from an older link", id=tunnel_id))
        relay.close_tunnel(existing, "reclaimed by another link")
    # Whatever changed meanwhile (the holder gone, the relay draining, a third link
    # holding it now), the request is decided afresh.
    return effects + grant(session, request)


def effective_rate(asked: int | None, ceiling: int | None) -> int | None:
    """
    The rate limit a tunnel gets: the one it `asked` for, lowered to the relay's
    `ceiling`; the ceiling when it asked for none; None when there is neither.
    """
    limits = [r for r in (asked, ceiling) if r is not None]
    return min(limits) if limits else None


def granted(session: RelaySession, request: TunnelRequest, record: TunnelRecord) -> TunnelGranted:
    relay = session.relay
    return TunnelGranted(
        request_id=request.request_id,
        tunnel_id=record.tunnel_id,
        host=relay.host_of(record.tunnel_id),
        port=relay.config.public_port,
        tcp_host=relay.domain if record.kind == "tcp" else None,
        tcp_port=record.tcp_port,
        # A name needs no secret: it is the identity, and the token's permission counts.
        secret=""
        if record.named
        else relay.reclaim_key.secret(record.kind, record.tunnel_id, session.reclaim_owner),
        rate_limit=record.throttle.rate if record.throttle is not None else None,
    )
