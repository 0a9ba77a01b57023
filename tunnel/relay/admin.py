"""
The relay's admin endpoint: Prometheus metrics at ``/metrics`` and a JSON summary at
``/status``. Bind it to loopback (``--admin tcp:9090:interface=127.0.0.1``).
"""

from __future__ import annotations

import json
import os
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.process_collector import ProcessCollector
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from tunnel.relay.service import Relay

__all__ = ["admin_site", "relay_status"]


def relay_status(relay: Relay, front: Any = None) -> dict[str, int]:
    """
    Counts of what the relay holds now.
    """
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
        "denied_connections": relay.denied_connections,
        "open_fds": fds,
        "draining": int(relay.draining),
    }


class _Metrics(Resource):
    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self.registry)


class _Status(Resource):
    isLeaf = True

    def __init__(self, relay: Relay, front: Any) -> None:
        super().__init__()
        self.relay = relay
        self.front = front

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(relay_status(self.relay, self.front)).encode() + b"\n"


def admin_site(relay: Relay, front: Any = None) -> Site:
    """
    The admin web site of `relay` (`front` is its SNI-dispatching factory, for handshake
    counts).
    """
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    for key in relay_status(relay, front):
        gauge = Gauge(f"tunnels_relay_{key}", f"Relay {key.replace('_', ' ')}", registry=registry)
        gauge.set_function(lambda key=key: relay_status(relay, front)[key])  # type: ignore[misc]
    root = Resource()
    root.putChild(b"metrics", _Metrics(registry))
    root.putChild(b"status", _Status(relay, front))
    site = Site(root)
    site.noisy = False
    return site
