"""
The agent's admin endpoint: ``/ready`` for readiness probes, ``/status`` and ``/metrics``.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from tests.e2e.harness import LOOPBACK, Procs, wait_for

pytestmark = pytest.mark.e2e


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{port}{path}", timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_ready_status_and_metrics_follow_the_link(procs: Procs) -> None:
    relay = procs.relay()
    backend = procs.backend("http")
    agent = procs.agent(relay, [str(backend.port)])  # with an admin endpoint on a free port
    admin = agent.proc.admin_port
    tunnel = agent.ready(str(backend.port))
    wait_for(lambda: get(admin, "/ready") == (200, b"ready\n"), "/ready to say ready")
    status = json.loads(get(admin, "/status")[1])
    assert status["link_up"] is True and status["links_made"] == 1
    assert status["tunnels"] == [
        {"target": f"127.0.0.1:{backend.port}", "url": tunnel.url, "tcp": None, "ready": True}
    ]
    metrics = get(admin, "/metrics")[1].decode()
    assert "tunnels_agent_link_up 1.0" in metrics
    assert "tunnels_agent_tunnels_ready 1.0" in metrics

    relay.proc.stop()  # the relay goes away: not ready, and it says why
    wait_for(lambda: get(admin, "/ready")[0] == 503, "/ready to say not ready")
    status = json.loads(get(admin, "/status")[1])
    assert status["link_up"] is False and status["tunnels"][0]["ready"] is False
    assert "tunnels_agent_link_up 0.0" in get(admin, "/metrics")[1].decode()
