"""
Several relays: the agent ranks them by connect time, uses the nearest, and fails over.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
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
    The first relay listed answers a TCP connection a second late (a listener whose accept
    queue is full drops the SYN, which the agent's kernel sends again after its 1 s
    retransmission timeout: a far relay's round trip, which no user-space delay proxy can
    give, since the kernel completes a handshake before the proxy accepts); the agent
    links to the second, listed after it.
    """
    web = procs.backend("http")
    state = tmp_path / "state"
    near_relay, near_port = _relay(procs, state)
    with _full_listener() as far_port:
        agent = _agent(
            procs, f"127.0.0.1:{far_port},localhost:{near_port}", state / "ca.pem", str(web.port)
        )
        agent.proc.wait_log(rf"relays by connect time: localhost:{near_port} ")
        tunnel = agent.ready(str(web.port))
        near_relay.wait_log(r"agent 127\.0\.0\.1:\d+ connected")
        assert curl_ok(near_relay, near_port, tunnel, tmp_path)


@contextlib.contextmanager
def _full_listener() -> Iterator[int]:
    """A loopback port whose listener never accepts and whose accept queue is already full,
    so that the kernel drops new SYNs (the client retransmits them after ~1 s)."""
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind((LOOPBACK, 0))
        listener.listen(0)
        port: int = listener.getsockname()[1]
        # A backlog of 0 queues one connection; the next ones fill the queue of SYNs answered.
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex((LOOPBACK, port))
            fillers.append(filler)
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def curl_ok(relay: Proc, port: int, tunnel: object, tmp_path: Path) -> bool:
    from tests.e2e.harness import Relay

    result = curl(Relay(relay, port, tmp_path / "state/ca.pem"), tunnel, tunnel.url + "/hello")  # type: ignore[attr-defined]
    return bool(result.returncode == 0)
