"""
The relay's admin endpoint: Prometheus metrics at ``/metrics``, a JSON summary at
``/status``, and ``/ready`` for readiness probes (200 while the relay listens for public
clients with a certificate and is not draining, else 503). Bind it to loopback
(``--admin tcp:9090:interface=127.0.0.1``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.web.server import Site

from tunnel._admin import JSONResource, ReadyResource, gauges
from tunnel._admin import admin_site as _site
from tunnel.relay._status import relay_status, relay_status_document

if TYPE_CHECKING:
    from tunnel.relay._state import Relay

__all__ = ["admin_site", "relay_status", "relay_status_document"]


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
