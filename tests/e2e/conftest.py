"""
Fixtures of the end-to-end tests.

``relay``: one relay process for the whole session (no tokens). ``world``: that relay plus a
set of local servers and one agent forwarding each of them, shared by the tests that only
need working tunnels. ``procs``: a per-test process group (own relays, agents, servers),
stopped at teardown.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.harness import Agent, Backend, Endpoint, Procs, Relay, random_file

BIG = 64 * 1024 * 1024


@pytest.fixture(scope="session")
def session_procs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Procs]:
    procs = Procs(tmp_path_factory.mktemp("e2e-session"))
    try:
        yield procs
    finally:
        procs.stop_all()


@pytest.fixture(scope="session")
def relay(session_procs: Procs) -> Relay:
    return session_procs.relay()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    group = Procs(tmp_path)
    try:
        yield group
    finally:
        group.stop_all()


@dataclass
class World:
    relay: Relay
    agent: Agent
    #: HTTP/1.1 server (``/hello``, ``/file/big``, ``POST /sha256``, ``/ws``), TLS tunnel.
    http: Endpoint
    #: Echo server, TLS tunnel.
    echo: Endpoint
    #: Echo server, raw TCP tunnel.
    echo_tcp: Endpoint
    #: Reads to EOF, replies sha256 + 8 MiB, raw TCP tunnel.
    sink_tcp: Endpoint
    #: Reads an 8-byte length, then that many bytes; replies sha256 + 8 MiB; raw TCP tunnel.
    counted_sink_tcp: Endpoint
    #: Like sink, but a slow reader (1 ms between 64 KiB reads); raw TCP tunnel.
    slow_sink_tcp: Endpoint
    #: Sends the big file on connect, raw TCP tunnel.
    send_tcp: Endpoint
    #: The big file (64 MiB) and its sha256.
    big: Path
    big_sha: str
    backends: dict[str, Backend]


SINK_REPLY = 8 * 1024 * 1024


@pytest.fixture(scope="session")
def world(relay: Relay, session_procs: Procs) -> World:
    root = session_procs.dir / "files"
    root.mkdir()
    big = root / "big"
    big_sha = random_file(big, BIG, seed=64)
    backends = {
        "http": session_procs.backend("http", "--root", str(root)),
        "echo": session_procs.backend("echo"),
        "echo_tcp": session_procs.backend("echo"),
        "sink": session_procs.backend("sink", "--reply", str(SINK_REPLY)),
        "counted_sink": session_procs.backend(
            "sink", "--reply", str(SINK_REPLY), "--length-prefixed"
        ),
        "slow_sink": session_procs.backend(
            "sink", "--reply", str(SINK_REPLY), "--read-delay", "0.001"
        ),
        "send": session_procs.backend("send", "--file", str(big)),
    }
    forwards = {
        "http": f"{backends['http'].port}",
        "echo": f"{backends['echo'].port}",
        "echo_tcp": f"{backends['echo_tcp'].port}:tcp",
        "sink": f"{backends['sink'].port}:tcp",
        "counted_sink": f"{backends['counted_sink'].port}:tcp",
        "slow_sink": f"{backends['slow_sink'].port}:tcp",
        "send": f"{backends['send'].port}:tcp",
    }
    agent = session_procs.agent(relay, list(forwards.values()))
    return World(
        relay=relay,
        agent=agent,
        http=agent.ready(forwards["http"]),
        echo=agent.ready(forwards["echo"]),
        echo_tcp=agent.ready(forwards["echo_tcp"]),
        sink_tcp=agent.ready(forwards["sink"]),
        counted_sink_tcp=agent.ready(forwards["counted_sink"]),
        slow_sink_tcp=agent.ready(forwards["slow_sink"]),
        send_tcp=agent.ready(forwards["send"]),
        big=big,
        big_sha=big_sha,
        backends=backends,
    )
