"""
The relay's ``/status`` document: the one list of its keys. The admin endpoint serves it as
JSON, and its Prometheus gauges are derived from it: one per count, and for ``pools`` (each
named tunnel and its members) gauges labelled by name.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from tunnel.relay.config import POOL_REFUSED_PAUSE
from tunnel.relay.registry import usable_link

if TYPE_CHECKING:
    from tunnel.relay._state import Relay

__all__ = ["pool_status", "relay_status", "relay_status_document"]


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
    pair = relay.tls.pair
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
    }


def relay_status_document(relay: Relay, front: Any = None) -> dict[str, Any]:
    """
    The ``/status`` document: `relay_status` (numbers, each also a gauge) and the
    certificate in service (its names, issuer, validity and serial; null before the first).
    """
    pair = relay.tls.pair
    return {**relay_status(relay, front), "certificate": pair.status() if pair else None}
