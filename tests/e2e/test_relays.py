"""
Several relays: the agent ranks them by connect time, uses the nearest, and fails over.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.e2e.harness import (
    LOOPBACK,
    Agent,
    Proc,
    Procs,
    curl,
    free_port,
)

pytestmark = pytest.mark.e2e


def _relay(procs: Procs, state: Path) -> tuple[Proc, int]:
    relay = procs.relay(state=state)
    return relay.proc, relay.port


def _agent(procs: Procs, relays: str, ca: Path, forward: str) -> Agent:
    return procs.agent(relays, [forward], ca=ca, wait=False)


def test_a_relay_that_does_not_answer_is_ranked_last(procs: Procs, tmp_path: Path) -> None:
    web = procs.backend("http")
    relay, port = _relay(procs, tmp_path / "state")
    dead = free_port()
    agent = _agent(
        procs, f"localhost:{dead},localhost:{port}", tmp_path / "state/ca.pem", str(web.port)
    )
    agent.proc.wait_log(
        rf"relays by connect time: localhost:{port} \([\d.]+ ms\), localhost:{dead}"
    )
    tunnel = agent.ready(str(web.port))
    assert curl_ok(relay, port, tunnel, tmp_path)
    # It never had to fail over: the dead relay was not dialled for the link.
    assert f"cannot connect to localhost:{dead}" not in agent.proc.text()


def test_the_nearest_relay_is_used(procs: Procs, tmp_path: Path) -> None:
    """
    Two relays sharing a state directory (the same certificate); the first listed sits behind
    a 25 ms-each-way delay proxy: the agent links to the second.
    """
    web = procs.backend("http")
    state = tmp_path / "state"
    far_relay, far_port = _relay(procs, state)
    near_relay, near_port = _relay(procs, state)
    delayed = free_port()
    delay = procs.start(
        "delay",
        [sys.executable, "-m", "bench.delayproxy", "--delay-ms=25", f"{delayed}:{far_port}"],
    )
    _wait_port(delay, delayed)
    agent = _agent(
        procs, f"localhost:{delayed},localhost:{near_port}", state / "ca.pem", str(web.port)
    )
    agent.proc.wait_log(rf"relays by connect time: localhost:{near_port} ")
    tunnel = agent.ready(str(web.port))
    near_relay.wait_log(r"agent 127\.0\.0\.1:\d+ connected")
    assert "connected (tunnels/" not in far_relay.text()
    assert curl_ok(near_relay, near_port, tunnel, tmp_path)


def curl_ok(relay: Proc, port: int, tunnel: object, tmp_path: Path) -> bool:
    from tests.e2e.harness import Relay

    result = curl(Relay(relay, port, tmp_path / "state/ca.pem"), tunnel, tunnel.url + "/hello")  # type: ignore[attr-defined]
    return bool(result.returncode == 0)


def _wait_port(proc: Proc, port: int) -> None:
    import socket

    from tests.e2e.harness import wait_for

    def check() -> bool | None:
        assert proc.alive(), proc.text()
        with socket.socket() as s:
            s.settimeout(0.5)
            return True if s.connect_ex((LOOPBACK, port)) == 0 else None

    wait_for(check, f"the delay proxy on {port}")
