"""
The agent's admin endpoint (``--admin tcp:9091:interface=127.0.0.1``): the inspector page at
``/`` (its tunnels and a live table of connections, from ``/events``; see `_inspect`),
Prometheus metrics at ``/metrics``, a JSON summary at ``/status``, and ``/ready`` for
readiness probes (200 once the link is up and every tunnel is granted, 503 otherwise).
Bind it to loopback.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.web.server import Site

from tunnel._admin import JSONResource, ReadyResource, gauges
from tunnel._admin import admin_site as _site
from tunnel.agent._inspect import inspector_children
from tunnel.agent.session import Agent

__all__ = ["admin_site", "agent_status"]


def agent_status(agent: Agent) -> dict[str, Any]:
    """
    What the agent holds now: its link, its tunnels (with their URLs) and open streams.
    """
    link = agent.link
    tunnels = [
        {
            "target": f.spec.target,
            "url": f.tunnel.url if f.tunnel is not None else None,
            "tcp": (
                f"{f.tunnel.unencrypted_host}:{f.tunnel.unencrypted_port}"
                if f.tunnel is not None and f.tunnel.unencrypted_port is not None
                else None
            ),
            "ready": f.tunnel is not None and link is not None,
        }
        for f in agent.forwards
    ]
    return {
        "link_up": link is not None,
        "relay": str(agent.relays[agent._relay_index % len(agent.relays)]),
        "links_made": agent.links_made,
        "tunnels": tunnels,
        "streams": len(link.streams) if link is not None else 0,
        "last_error": agent.last_error,
    }


def agent_ready(agent: Agent) -> bool:
    """
    Whether the link is up and every tunnel asked for is granted.
    """
    status = agent_status(agent)
    return bool(
        status["link_up"] and status["tunnels"] and all(t["ready"] for t in status["tunnels"])
    )


def admin_site(agent: Agent) -> Site:
    """
    The admin web site of `agent`.
    """
    reads: dict[str, tuple[str, Callable[[dict[str, Any]], float]]] = {
        "link_up": ("Whether the link to the relay is up", lambda s: int(s["link_up"])),
        "links_made": ("Links made to relays since start", lambda s: s["links_made"]),
        "tunnels": ("Tunnels asked for", lambda s: len(s["tunnels"])),
        "tunnels_ready": (
            "Tunnels granted on the current link",
            lambda s: sum(1 for t in s["tunnels"] if t["ready"]),
        ),
        "streams": ("Public connections open through the agent", lambda s: s["streams"]),
    }
    values = {
        name: (text, lambda read=read: read(agent_status(agent)))
        for name, (text, read) in reads.items()
    }
    return _site(
        gauges("tunnels_agent", values),
        {
            **inspector_children(agent),
            b"status": JSONResource(lambda: agent_status(agent)),
            b"ready": ReadyResource(lambda: agent_ready(agent)),
        },
    )
