"""
The relay's ``/status`` document: the one list of its keys. The admin endpoint serves it as
JSON, and its Prometheus gauges are derived from it: one per count, and for ``pools`` (each
named tunnel and its members) gauges labelled by name.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any

from tunnel import __version__
from tunnel.relay.config import POOL_REFUSED_PAUSE
from tunnel.relay.registry import usable_link

if TYPE_CHECKING:
    from tunnel.relay._state import Relay

__all__ = [
    "PAGE_NOTE",
    "limits_in_force",
    "links_status",
    "pool_status",
    "relay_status",
    "relay_status_document",
    "status_page_document",
    "tunnels_status",
]

#: What the status page never shows, said on the page.
PAGE_NOTE = (
    "Public clients' addresses are never shown here, and no option shows them. Tokens are "
    "never shown: a link is named by its principal (a token's short digest, a signed "
    "token's subject, or the agent's address on a relay without tokens)."
)

#: Fields of `RelayConfig` that are not limits (credentials and where they came from).
_NOT_LIMITS = frozenset(
    {"domain", "tokens", "tokens_file", "token_verifier", "revoked", "revoked_file", "link"}
)


def pool_status(relay: Relay) -> dict[str, dict[str, Any]]:
    """
    Each named tunnel: its kind, its TCP port, and its members (the agents serving it), each
    with its open connections to it and whether new ones may go to it.
    """
    now = relay.reactor.seconds()
    return {
        record.tunnel_id: {
            "kind": record.kind,
            "tcp_port": record.tcp_port,
            "connections": record.connections,
            "members": [
                {
                    "agent": member.link.peer_name,
                    "streams": member.streams,
                    "in_rotation": usable_link(member.link)
                    and not member.resting(now, POOL_REFUSED_PAUSE),
                }
                for member in record.members
            ],
        }
        for record in relay.registry.pools()
    }


def relay_status(relay: Relay, front: Any = None) -> dict[str, Any]:
    """
    Counts of what the relay holds now (`front` is its SNI-dispatching factory, for the
    handshake counts), and its named tunnels' pools (`pool_status`, under ``pools``).
    """
    pair = relay.tls.pair if relay.tls is not None else None
    pools = pool_status(relay)
    try:
        fds = len(os.listdir("/proc/self/fd"))
    except OSError:
        fds = -1
    return {
        "links": len(relay.links),
        "agents": sum(1 for link in relay.links if link.authenticated),
        "tunnels": len(relay.registry),
        "streams": sum(len(link.streams) for link in relay.links),
        "public_connections": len(relay.public_connections),
        "tcp_listeners": sum(1 for t in relay.registry.all() if t.listener is not None),
        "tcp_ports_in_use": relay.ports.in_use,
        "pending_handshakes": getattr(front, "pending", 0),
        "refused_handshakes_overload": getattr(front, "refused_overload", 0),
        "refused_handshakes_per_source": getattr(front, "refused_source_overload", 0),
        "evicted_silent_handshakes": getattr(front, "evicted_silent", 0),
        "denied_connections": relay.denied_connections,
        # Refusals by the per-party bounds, since start, one key per reason.
        **{f"refused_{reason}": n for reason, n in relay.refused.items()},
        "tcp_ports_quarantined": relay.ports.quarantined,
        "tcp_ports_released_early": relay.ports.released_early,
        "log_lines_dropped": relay.ratelog.dropped
        + getattr(getattr(front, "ratelog", None), "dropped", 0),
        "open_fds": fds,
        "draining": int(relay.draining),
        # Of the certificate in service, in seconds since the epoch (0: none yet).
        "certificate_expiry_timestamp_seconds": int(pair.not_after.timestamp()) if pair else 0,
        "named_tunnels": len(pools),
        "pool_members": sum(len(p["members"]) for p in pools.values()),
        "pool_members_in_rotation": sum(
            1 for p in pools.values() for m in p["members"] if m["in_rotation"]
        ),
        "pools": pools,
        # A worker of several (``--workers N``): its connections handed to and taken from
        # the others (`tunnel.relay._worker`).
        **(relay.worker_status.counts() if relay.worker_status is not None else {}),
    }


def relay_status_document(relay: Relay, front: Any = None) -> dict[str, Any]:
    """
    The ``/status`` document: `relay_status` (numbers, each also a gauge) and the
    certificate in service (its names, issuer, validity and serial; null before the first).
    """
    pair = relay.tls.pair
    document = {**relay_status(relay, front), "certificate": pair.status() if pair else None}
    if relay.worker_status is not None:
        document["worker"] = relay.worker_status.identity()
    return document


def _shown_principal(principal: str) -> str:
    """
    A principal for the page: a token's digest shortened to 12 hex digits (a name for it,
    not something to test guesses of the token against).
    """
    kind, _, value = principal.partition(":")
    if kind == "token":
        return f"token:{value[:12]}"
    return principal


def links_status(relay: Relay) -> list[dict[str, Any]]:
    """
    Each agent link: the agent's address, its principal (never its token), its signed
    token's subject, the smoothed RTT of its keepalive pings, its tunnels and open streams.
    """
    result = []
    for link in sorted(relay.links, key=lambda link: link.peer_name):
        mux = getattr(link, "mux", None)
        rtt = getattr(mux, "rtt", None)
        session = getattr(link, "session", None)
        permit = getattr(session, "permit", None)
        result.append(
            {
                "agent": link.peer_name,
                "authenticated": bool(link.authenticated),
                "principal": _shown_principal(link.principal) if link.authenticated else None,
                "subject": getattr(permit, "subject", None),
                "rtt_ms": round(rtt * 1000, 2) if rtt is not None else None,
                "tunnels": sorted(t.tunnel_id for t in relay.registry.owned_by(link)),
                "streams": len(link.streams),
                "draining": bool(getattr(link, "draining", False)),
            }
        )
    return result


def tunnels_status(relay: Relay) -> list[dict[str, Any]]:
    """
    Each live tunnel: its host, kind, TCP port, open connections, and its agents (for a
    named tunnel, the pool's members with their streams and whether they are in rotation).
    """
    now = relay.reactor.seconds()
    result = []
    for record in sorted(relay.registry.all(), key=lambda r: r.tunnel_id):
        result.append(
            {
                "tunnel_id": record.tunnel_id,
                "host": relay.host_of(record.tunnel_id),
                "kind": record.kind,
                "tcp_port": record.tcp_port,
                "named": record.named,
                "connections": record.connections,
                "members": [
                    {
                        "agent": member.link.peer_name,
                        "streams": member.streams,
                        "in_rotation": usable_link(member.link)
                        and not member.resting(now, POOL_REFUSED_PAUSE),
                    }
                    for member in record.members
                ],
            }
        )
    return result


def limits_in_force(relay: Relay) -> dict[str, Any]:
    """
    The bounds of `RelayConfig` (numbers and ranges, no credential), the link settings
    (``link_<name>``), and whether agents need a token.
    """
    config = relay.config
    limits: dict[str, Any] = {
        "tokens_required": config.tokens is not None or config.token_verifier is not None,
    }
    for f in dataclasses.fields(config):
        if f.name in _NOT_LIMITS:
            continue
        value = getattr(config, f.name)
        if value is None or isinstance(value, (int, float, str)):
            limits[f.name] = value
        elif isinstance(value, tuple) and all(isinstance(v, int) for v in value):
            limits[f.name] = list(value)
    for f in dataclasses.fields(config.link):
        value = getattr(config.link, f.name)
        if isinstance(value, (int, float)):
            limits[f"link_{f.name}"] = value
    return limits


def status_page_document(relay: Relay, front: Any = None) -> dict[str, Any]:
    """
    What the status page shows (``/links``, and each snapshot of ``/events``): the counts
    of `relay_status`, the links, the tunnels, refusals by reason, the certificate and
    the limits in force. No token, secret, or public client's address is in it.
    """
    counts = relay_status(relay, front)
    pools = counts.pop("pools")
    pair = relay.tls.pair if relay.tls is not None else None
    refusals = {
        key: value
        for key, value in counts.items()
        if key.startswith(("refused_", "denied_", "evicted_"))
    }
    return {
        "version": __version__,
        "domain": relay.domain,
        "now": round(relay.reactor.seconds(), 3),
        "counts": counts,
        "links": links_status(relay),
        "tunnels": tunnels_status(relay),
        "pools": pools,
        "refusals": refusals,
        "certificate": pair.status() if pair else None,
        "limits": limits_in_force(relay),
        "note": PAGE_NOTE,
    }
