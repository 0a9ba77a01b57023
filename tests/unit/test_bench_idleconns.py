"""The pieces of ``bench.idleconns`` its figures depend on: the relay's shares cover each
tunnel's part, the hold server and a client process hold what they say, the report."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench import idleconns
from bench.util import free_port, json_line
from tunnel.testing._daemons import wait_for

ROOT = Path(__file__).resolve().parents[2]


def _option(argv: list[str], name: str) -> int:
    return int(argv[argv.index(name) + 1])


@pytest.mark.parametrize(("conns", "workers"), [(100_000, 7), (100_000, 6), (2_000, 3)])
def test_the_relay_and_agent_shares_cover_each_tunnels_part(conns: int, workers: int) -> None:
    part = math.ceil(conns / workers)
    relay = idleconns.limits(conns, workers)
    for name in ("--max-connections-per-tunnel", "--max-streams-per-link"):
        assert part < _option(relay, name) < conns
    for name in ("--max-connections-per-source", "--max-streams-per-token"):
        assert _option(relay, name) >= conns
    assert part < _option(idleconns.agent_limits(conns, workers), "--max-streams")


def _spawn(*argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.idleconns", *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=str(ROOT),
    )


def test_a_client_process_holds_its_share_at_the_hold_server(tmp_path: Path) -> None:
    hold = _spawn("hold")
    client = None
    try:
        port = json_line(hold, "hold", 20)["port"]
        targets = tmp_path / "targets.json"
        targets.write_text(json.dumps([["unused", port]]))
        client = _spawn(
            "clients", "--port", "1", "--ca", "unused", "--kind", "tcp",
            "--targets", str(targets), "--sources", "127.0.0.2,127.0.0.3",
            "--count", "300", "--in-flight", "50",
        )  # fmt: skip
        report = json_line(client, "client", 30)
        assert report["held"] == 300 and report["errors"] == 0
        wait_for(lambda: idleconns._ask(hold, "hold")["held"] == 300, "300 held", 20)
        idleconns._end(client)
        client = None
        # The client's exit closes them; the server sees each EOF and lets it go.
        wait_for(lambda: idleconns._ask(hold, "hold")["held"] == 0, "none held", 20)
    finally:
        if client is not None:
            idleconns._end(client, 5)
        idleconns._end(hold, 5)


@pytest.mark.parametrize("retries", [0, 3])
def test_a_refused_connection_is_an_error_tried_again_a_bounded_number_of_times(
    tmp_path: Path, retries: int
) -> None:
    targets = tmp_path / "targets.json"
    targets.write_text(json.dumps([["unused", free_port()]]))
    client = _spawn(
        "clients", "--port", "1", "--ca", "unused", "--kind", "tcp",
        "--targets", str(targets), "--sources", "127.0.0.2", "--count", "5",
        "--retries", str(retries),
    )  # fmt: skip
    try:
        report = json_line(client, "client", 30)
        assert report["held"] == 0 and report["errors"] == 5 + retries
        assert "ECONNREFUSED" in report["error"][0] or "refused" in report["error"][0]
    finally:
        idleconns._end(client, 5)


def test_the_report_names_the_runs_options_and_counts() -> None:
    r = {
        "connections": 100_000, "kind": "tls", "agents": 7, "workers": 7, "clients": 7,
        "sources": 14, "in_flight": 32, "nofile": 20_000,
        "relay_limits": " ".join(idleconns.limits(100_000, 7)),
        "agent_limits": "--max-streams 17243", "connections_held_by_clients": 100_000,
        "public_connections_per_worker": [14_286, 14_285], "relay_rss_per_connection_KiB": 30.25,
        "handoffs": {"tunnels_relay_handoffs_sent": 85_000.0},
    }  # fmt: skip
    text = idleconns.markdown(r)
    assert "`--workers 7`" in text and "--max-connections-per-tunnel 17243" in text
    assert "| idle public connections held (the clients' count) | 100,000 |" in text
    assert "| of which per worker | 14,286 / 14,285 |" in text
    assert "| 30.2 |" in text and "85,000" in text
