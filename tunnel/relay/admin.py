"""
The relay's admin endpoint: a status page at ``/`` (``status.html``, shipped in the package:
links, tunnels, refusals, the certificate and the limits, live from the server-sent events
at ``/events``, a snapshot a second; ``/links`` is the same document as JSON), Prometheus
metrics at ``/metrics``, a JSON summary at ``/status``, and ``/ready`` for readiness probes
(200 while the relay listens for public clients with a certificate and is not draining,
else 503). Bind it to loopback (``--admin tcp:9090:interface=127.0.0.1``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from twisted.web.server import Site

from tunnel._admin import JSONResource, PageResource, ReadyResource, SnapshotStream, gauges
from tunnel._admin import admin_site as _site
from tunnel.relay._status import relay_status, relay_status_document, status_page_document

if TYPE_CHECKING:
    from tunnel.relay._state import Relay

__all__ = ["admin_site", "relay_status", "relay_status_document", "status_page_document"]


def admin_site(
    relay: Relay, front: Any = None, listening: Callable[[], bool] = lambda: True
) -> Site:
    """
    The admin web site of `relay` (`front` is its SNI-dispatching factory, for handshake
    counts; `listening` tells whether the public listener is up, for ``/ready``).
    """
    values = {
        key: (f"Relay {key.replace('_', ' ')}", lambda key=key: relay_status(relay, front)[key])
        for key, value in relay_status(relay, front).items()
        if isinstance(value, int)
    }
    registry = gauges("tunnels_relay", values)
    registry.register(_Pools(relay, front))
    return _site(
        registry,
        {
            b"": PageResource("tunnel.relay", "status.html"),
            b"events": SnapshotStream(lambda: status_page_document(relay, front), relay.reactor),
            b"links": JSONResource(lambda: status_page_document(relay, front)),
            b"status": JSONResource(lambda: relay_status_document(relay, front)),
            # Not ready without a certificate (ACME mode, before the first is issued).
            b"ready": ReadyResource(
                lambda: listening() and not relay.draining and relay.tls.pair is not None
            ),
        },
    )


class _Pools(Collector):
    """
    The ``pools`` of the status document as gauges labelled by tunnel name: members, members
    in rotation, and open connections.
    """

    def __init__(self, relay: Relay, front: Any) -> None:
        self.relay = relay
        self.front = front

    def collect(self) -> Iterator[GaugeMetricFamily]:
        members = GaugeMetricFamily(
            "tunnels_relay_pool_members", "Agents serving a named tunnel", labels=["name"]
        )
        rotation = GaugeMetricFamily(
            "tunnels_relay_pool_members_in_rotation",
            "Agents of a named tunnel that new connections may go to",
            labels=["name"],
        )
        connections = GaugeMetricFamily(
            "tunnels_relay_pool_connections",
            "Public connections open through a named tunnel",
            labels=["name"],
        )
        pools = relay_status(self.relay, self.front)["pools"]
        for name, pool in pools.items():
            members.add_metric([name], len(pool["members"]))
            rotation.add_metric([name], sum(1 for m in pool["members"] if m["in_rotation"]))
            connections.add_metric([name], pool["connections"])
        yield from (members, rotation, connections)
