"""
The admin endpoint of a relay run as two workers (``twistd tunnelrelay --workers 2``): the
supervisor's ``/status``, ``/links``, ``/metrics``, ``/ready`` and ``/events`` merge both
workers' (real worker processes, real agents, curl through the tunnels); a worker that stops
answering is marked and left out while the other is still served, and one that is killed is
restarted and counted. The status page shows both workers in a real browser.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.harness import LOOPBACK, Procs, Relay, curl, wait_for
from tunnel.testing._daemons import admin_get

pytestmark = pytest.mark.e2e

AGENTS = 4


def admin_port(relay: Relay) -> int:
    port: int = relay.proc.admin_port  # type: ignore[attr-defined]
    return port


def status(relay: Relay) -> dict[str, Any]:
    code, body = admin_get(admin_port(relay), "/status", 10.0)
    assert code == 200, body
    doc: dict[str, Any] = json.loads(body)
    return doc


def samples(relay: Relay, name: str) -> dict[str, float]:
    """The samples of `name` in the supervisor's ``/metrics``, by their ``worker`` label."""
    code, body = admin_get(admin_port(relay), "/metrics", 10.0)
    assert code == 200
    found = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            if s.name == name:
                found[s.labels.get("worker", s.labels.get("state", ""))] = s.value
    return found


def first_snapshot(relay: Relay) -> dict[str, Any]:
    """The first ``snapshot`` of the supervisor's ``/events``."""
    conn = http.client.HTTPConnection(LOOPBACK, admin_port(relay), timeout=20)
    try:
        conn.request("GET", "/events")
        response = conn.getresponse()
        assert response.status == 200
        event = None
        while True:
            line = response.readline()
            assert line, "the events ended before a snapshot"
            if line.startswith(b"event: "):
                event = line[7:].strip()
            elif line.startswith(b"data: ") and event == b"snapshot":
                doc: dict[str, Any] = json.loads(line[6:])
                return doc
    finally:
        conn.close()


@pytest.fixture
def two_workers(procs: Procs) -> Iterator[tuple[Relay, list[Any]]]:
    web = procs.backend("http")
    relay = procs.relay(extra=["--workers", "2"])
    agents = [procs.agent(relay, [str(web.port)]) for _ in range(AGENTS)]
    tunnels = [agent.ready(str(web.port)) for agent in agents]
    wait_for(
        lambda: (
            status(relay)["links"] == AGENTS
            and all(w["answered"] for w in status(relay)["workers"])
        ),
        "every link in the merged /status",
    )
    yield relay, tunnels


def test_the_supervisor_serves_both_workers_merged(two_workers: tuple[Relay, list[Any]]) -> None:
    relay, tunnels = two_workers
    for tunnel in tunnels:  # public connections, handed to their owner when need be
        for _ in range(3):
            out = curl(relay, tunnel, tunnel.url + "/hello")
            assert out.stdout == b"hello /hello\n", out.stderr
    doc = status(relay)
    workers = doc["workers"]
    assert [w["index"] for w in workers] == [0, 1]
    assert all(w["state"] == "running" and w["answered"] for w in workers), workers
    pids = {w["pid"] for w in workers}
    assert len(pids) == 2 and relay.proc.pid not in pids  # type: ignore[attr-defined]
    assert sum(w["links"] for w in workers) == doc["links"] == AGENTS
    assert sum(w["tunnels"] for w in workers) == doc["tunnels"] == AGENTS
    assert doc["certificate"] and "*.tunnel.localhost" in doc["certificate"]["names"]
    assert "worker" not in doc  # each worker's own place is in the workers list instead

    # /metrics: each worker's gauges under its label; the counts agree with /status.
    links = samples(relay, "tunnels_relay_links")
    assert set(links) == {"0", "1"} and sum(links.values()) == AGENTS
    sent = samples(relay, "tunnels_relay_handoffs_sent")
    assert sum(sent.values()) == status(relay)["handoffs_sent"]
    assert samples(relay, "tunnels_relay_workers")["running"] == 2
    assert samples(relay, "tunnels_relay_worker_up") == {"0": 1.0, "1": 1.0}

    code, body = admin_get(admin_port(relay), "/links", 10.0)
    assert code == 200
    page = json.loads(body)
    assert sorted(link["worker"] for link in page["links"]) == sorted(
        i for w in workers for i in [w["index"]] * w["links"]
    )
    assert admin_get(admin_port(relay), "/ready", 10.0) == (200, b"ready\n")

    snapshot = first_snapshot(relay)
    assert [w["index"] for w in snapshot["workers"]] == [0, 1]
    assert snapshot["counts"]["links"] == AGENTS


def test_a_stopped_worker_is_left_out_and_a_killed_one_restarted(
    two_workers: tuple[Relay, list[Any]],
) -> None:
    relay, _ = two_workers
    before = {w["index"]: w for w in status(relay)["workers"]}
    pid = before[1]["pid"]
    os.kill(pid, signal.SIGSTOP)  # a worker of the relay this test started, by its PID
    try:
        code, body = admin_get(admin_port(relay), "/ready", 10.0)
        assert code == 503 and b"worker 1: no answer within 1 s" in body, body
        doc = status(relay)
        assert doc["links"] == before[0]["links"]  # worker 0's alone
        row = doc["workers"][1]
        assert not row["answered"] and row["error"] == "no answer within 1 s"
        assert samples(relay, "tunnels_relay_worker_up") == {"0": 1.0, "1": 0.0}
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: admin_get(admin_port(relay), "/ready", 10.0)[0] == 200, "ready again")

    os.kill(pid, signal.SIGKILL)
    again = wait_for(
        lambda: (
            (w := status(relay)["workers"][1])["restarts"] == 1
            and w["state"] == "running"
            and w["answered"]
            and w
        ),
        "worker 1 restarted",
    )
    assert again["pid"] != pid
    wait_for(lambda: admin_get(admin_port(relay), "/ready", 10.0)[0] == 200, "ready again")
    assert samples(relay, "tunnels_relay_worker_restarts") == {"0": 0.0, "1": 1.0}
    # The agents of the killed worker link again, to one worker or the other.
    wait_for(lambda: status(relay)["links"] == AGENTS, "every agent linked again")


def test_the_status_page_shows_both_workers(
    two_workers: tuple[Relay, list[Any]], procs: Procs, tmp_path: Path
) -> None:
    from tests.e2e.browser import start_chromium

    relay, _ = two_workers
    browser = start_chromium(procs, tmp_path / "chromium-profile")
    try:
        browser.call("Page.enable")
        browser.call("Page.navigate", url=f"http://{LOOPBACK}:{admin_port(relay)}/")
        rows = wait_for(
            lambda: (
                browser.evaluate(
                    "Array.from(document.querySelectorAll('#workers tr[data-worker]'))"
                    ".map(r => r.innerText)"
                )
                or None
            ),
            "the workers in the page",
        )
        assert len(rows) == 2 and all("running" in r for r in rows), rows
        assert not browser.evaluate("$('workers-section').hidden")
        assert browser.evaluate("$('c-links').textContent") == str(AGENTS)
        links = browser.evaluate("document.querySelectorAll('#links tr[data-agent]').length")
        assert links == AGENTS
    finally:
        browser.close()
