"""
The relay's admin endpoint: Prometheus metrics at ``/metrics``, a JSON summary at
``/status``, and ``/ready`` for readiness probes (200 while the relay listens for public
clients with a certificate and is not draining, else 503). Bind it to loopback
(``--admin tcp:9090:interface=127.0.0.1``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.web.server import Site

from tunnel._admin import JSONResource, ReadyResource, gauges
from tunnel._admin import admin_site as _site
from tunnel.relay.service import Relay

__all__ = ["admin_site", "relay_status", "relay_status_document"]


def relay_status(relay: Relay, front: Any = None) -> dict[str, int]:
    """
    Counts of what the relay holds now (numbers only: each becomes a gauge).
    """
    pair = relay.tls.pair
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
    }


def relay_status_document(relay: Relay, front: Any = None) -> dict[str, Any]:
    """
    The ``/status`` document: `relay_status` (numbers, each also a gauge) and the
    certificate in service (its names, issuer, validity and serial; null before the first).
    """
    pair = relay.tls.pair
    return {**relay_status(relay, front), "certificate": pair.status() if pair else None}


def admin_site(
    relay: Relay, front: Any = None, listening: Callable[[], bool] = lambda: True
) -> Site:
    """
    The admin web site of `relay` (`front` is its SNI-dispatching factory, for handshake
    counts; `listening` tells whether the public listener is up, for ``/ready``).
    """
    values = {
        key: (f"Relay {key.replace('_', ' ')}", lambda key=key: relay_status(relay, front)[key])
        for key in relay_status(relay, front)
    }
    return _site(
        gauges("tunnels_relay", values),
        {
            b"status": JSONResource(lambda: relay_status_document(relay, front)),
            # Not ready without a certificate (ACME mode, before the first is issued).
            b"ready": ReadyResource(
                lambda: listening() and not relay.draining and relay.tls.pair is not None
            ),
        },
    )
