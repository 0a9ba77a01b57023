"""
The plain API's first link is made before Twisted is imported (`tunnel.agent._bootstrap`),
then adopted by the agent once the reactor runs: a fresh process gets its URL with no
Twisted module loaded (a count of `sys.modules`, not a time), a public connection made
right after is served, the link is the agent's afterwards, and a failing first link reports
what the Twisted path reports.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import LOOPBACK, Procs, Relay, free_port, require_tool, run
from tunnel.testing._daemons import DEADLINE

#: Top-level packages that only the reactor brings in.
HEAVY = ("twisted", "zope", "OpenSSL", "cryptography", "service_identity", "automat")

#: argv: relay, CA ('' for none), local port, mode ("first": as a fresh program does;
#: "twisted": the reactor imported first, so the Twisted path), token ('' for none).
#: Prints a JSON line when it has its URL (or its error), waits for a line on stdin, then
#: prints the agent's state. An import hook holds the first import of Twisted until the
#: URL is had (the background thread imports it right after the link is up): had the URL
#: needed Twisted, the hold would time out, and "held_too_long" says so.
CHILD = r"""
import json, sys, threading
url_had = threading.Event()
held_too_long = []
class Hold:
    def find_spec(self, name, path=None, target=None):
        if name == "twisted" and not url_had.is_set():
            if not url_had.wait(20):
                held_too_long.append(name)
        return None
if sys.argv[4] == "first":
    sys.meta_path.insert(0, Hold())
import tunnel
relay, ca, port, mode = sys.argv[1], sys.argv[2] or None, int(sys.argv[3]), sys.argv[4]
token, HEAVY = sys.argv[5] or None, json.loads(sys.argv[6])
if mode == "twisted":
    from twisted.internet import reactor
def heavy():
    return sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)
def say(**fields):
    print(json.dumps(fields), flush=True)
try:
    with tunnel.forward(port, relay=relay, ca=ca, token=token) as t:
        loaded = heavy()
        url_had.set()
        say(url=t.url, host=t.host, port=t.port, heavy=loaded, held_too_long=held_too_long)
        sys.stdin.readline()
        from tunnel import client
        agents = list(client._agents.values())
        link = agents[0].link if agents else None
        say(
            agents=len(agents),
            adopted=bool(link is not None and link.adopted),
            links_made=agents[0].links_made if agents else 0,
            tunnels=[f.tunnel.url for f in agents[0].forwards if f.tunnel] if agents else [],
        )
except Exception as e:
    loaded = heavy()
    url_had.set()
    say(error=type(e).__name__, message=str(e), heavy=loaded, held_too_long=held_too_long)
"""


HEAVY_JSON = json.dumps(HEAVY)


def _child(relay: str, ca: Path | str | None, port: int, mode: str, token: str = "") -> Any:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNNEL_")}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, relay, str(ca or ""), str(port), mode, token, HEAVY_JSON],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _line(proc: Any) -> dict[str, Any]:
    line = proc.stdout.readline()
    if not line:
        proc.wait(DEADLINE)
        raise AssertionError(f"no output; stderr: {proc.stderr.read()[-3000:]}")
    result: dict[str, Any] = json.loads(line)
    return result


def _error(relay: str, ca: Path | str | None, mode: str, token: str = "") -> dict[str, Any]:
    proc = _child(relay, ca, free_port(), mode, token)
    try:
        out, err = proc.communicate(timeout=DEADLINE * 2)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert out, err[-3000:]
    result: dict[str, Any] = json.loads(out.splitlines()[0])
    assert "error" in result, result
    return result


def test_url_before_twisted_then_served_and_adopted(procs: Procs, relay: Relay) -> None:
    backend = procs.backend("http")
    proc = _child(f"localhost:{relay.port}", relay.ca, backend.port, "first")
    try:
        first = _line(proc)
        # At the moment forward() returned: not one module of Twisted or its TLS stack.
        assert first["heavy"] == [] and first["held_too_long"] == [], first
        # A public request made at once (the reactor is still being imported) is served.
        result = run(
            [
                require_tool("curl"),
                "-sS",
                "--max-time",
                str(DEADLINE),
                "--cacert",
                str(relay.ca),
                "--resolve",
                f"{first['host']}:{first['port']}:{LOOPBACK}",
                first["url"] + "/hello",
            ],
            timeout=DEADLINE * 2,
        )
        assert result.returncode == 0 and result.stdout.startswith(b"hello"), (
            result.stdout,
            result.stderr,
        )
        proc.stdin.write("\n")
        proc.stdin.flush()
        state = _line(proc)
        # The same link, now the agent's: one agent, one link made, the tunnel on it.
        assert state == {
            "agents": 1,
            "adopted": True,
            "links_made": 1,
            "tunnels": [first["url"]],
        }, state
        proc.stdin.close()
        assert proc.wait(DEADLINE) == 0, proc.stderr.read()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def other_ca(tmp_path: Path) -> Path:
    """A CA certificate that did not sign the relay's."""
    ca = tmp_path / "other-ca.pem"
    run(
        [
            require_tool("openssl"),
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=another CA",
            "-days",
            "1",
            "-keyout",
            str(tmp_path / "other-ca.key"),
            "-out",
            str(ca),
        ],
        timeout=DEADLINE,
    )
    return ca


@pytest.fixture
def dropper() -> Iterator[int]:
    """A port that accepts TCP connections and closes them at once (a relay that drops)."""
    server = socket.create_server((LOOPBACK, 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        server.close()


def _same_as_twisted(relay: str, ca: Path | str | None, token: str = "") -> dict[str, Any]:
    first = _error(relay, ca, "first", token)
    twisted = _error(relay, ca, "twisted", token)
    # The first link failed before Twisted was imported (so it was the bootstrap's), with
    # the error type the Twisted path gives.
    assert first["heavy"] == [] and first["held_too_long"] == [], first
    assert twisted["heavy"] != []
    assert first["error"] == twisted["error"], (first, twisted)
    return {"first": first["message"], "twisted": twisted["message"], "error": first["error"]}


def test_wrong_ca(relay: Relay, other_ca: Path) -> None:
    got = _same_as_twisted(f"localhost:{relay.port}", other_ca)
    assert got["error"] == "RelayUnavailable"
    for message in (got["first"], got["twisted"]):
        assert "the relay's certificate is not trusted" in message, got
        assert "pass --ca / TUNNEL_CA" in message, got


def test_wrong_name(relay: Relay) -> None:
    # other.localhost dials loopback too, but the relay's certificate does not name it.
    got = _same_as_twisted(f"other.localhost:{relay.port}", relay.ca)
    assert got["error"] == "RelayUnavailable"
    assert "the relay's certificate is not trusted" in got["first"], got
    assert "other.localhost" in got["first"], got


def test_refused_token(procs: Procs) -> None:
    relay = procs.relay(tokens=["right-token-1234"])
    got = _same_as_twisted(f"localhost:{relay.port}", relay.ca, "wrong-token-5678")
    assert got["error"] == "AuthenticationError"
    assert got["first"] == got["twisted"], got
    assert "does not accept this token" in got["first"], got


def test_nothing_listening() -> None:
    port = free_port()
    got = _same_as_twisted(f"localhost:{port}", None)
    assert got["error"] == "RelayUnavailable"
    for message in (got["first"], got["twisted"]):
        assert f"localhost:{port}" in message, got
        assert "refused" in message.lower(), got


def test_relay_drops_during_the_handshake(relay: Relay, dropper: int) -> None:
    got = _same_as_twisted(f"localhost:{dropper}", relay.ca)
    assert got["error"] == "RelayUnavailable"
    # Twisted's words for a TCP connection that ended (with or without a reset).
    words = {
        "Connection was closed cleanly.",
        "Connection to the other side was lost in a non-clean fashion.",
    }
    assert got["first"] in words and got["twisted"] in words, got


#: argv: relay, CA, local port. Prints the URL; after a line on stdin, waits (with a
#: deadline) for the agent's second link and prints its state.
RECONNECT_CHILD = r"""
import json, sys, time
import tunnel
from tunnel import client
with tunnel.forward(int(sys.argv[3]), relay=sys.argv[1], ca=sys.argv[2]) as t:
    print(json.dumps({"url": t.url, "host": t.host, "port": t.port}), flush=True)
    sys.stdin.readline()
    deadline = time.monotonic() + 20
    agent = None
    while time.monotonic() < deadline:
        agents = list(client._agents.values())
        agent = agents[0] if agents else None
        if agent is not None and agent.links_made >= 2 and agent._regranting is None:
            break
        time.sleep(0.05)
    print(json.dumps({
        "links_made": agent.links_made if agent else 0,
        "adopted": bool(agent and agent.link and agent.link.adopted),
        "urls": [f.tunnel.url for f in agent.forwards if f.tunnel] if agent else [],
    }), flush=True)
    sys.stdin.readline()
"""


def _curl_hello(relay_ca: Path, info: dict[str, Any]) -> Any:
    return run(
        [
            require_tool("curl"),
            "-sS",
            "--max-time",
            str(DEADLINE),
            "--cacert",
            str(relay_ca),
            "--resolve",
            f"{info['host']}:{info['port']}:{LOOPBACK}",
            info["url"] + "/hello",
        ],
        timeout=DEADLINE * 2,
    )


def test_the_adopted_link_reconnects_after_a_relay_restart(procs: Procs, tmp_path: Path) -> None:
    from tunnel.testing import RelayProcess

    backend = procs.backend("http")
    state = tmp_path / "relay-state"
    relay = RelayProcess.start(tmp_path / "relay-1.log", state_dir=state)
    port, admin = relay.port, relay.admin_port
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNNEL_")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            RECONNECT_CHILD,
            f"localhost:{port}",
            str(relay.ca),
            str(backend.port),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    again = None
    try:
        first = _line(proc)
        assert _curl_hello(relay.ca, first).stdout.startswith(b"hello")
        relay.stop()
        again = RelayProcess.start(
            tmp_path / "relay-2.log", state_dir=state, port=port, admin_port=admin
        )
        proc.stdin.write("\n")
        proc.stdin.flush()
        state_now = _line(proc)
        # A new link, made by the agent's own reconnect (not adopted), and the tunnel back
        # under the same URL (reclaimed).
        assert state_now == {"links_made": 2, "adopted": False, "urls": [first["url"]]}, state_now
        assert _curl_hello(again.ca, first).stdout.startswith(b"hello")
        proc.stdin.write("\n")
        proc.stdin.close()
        assert proc.wait(DEADLINE) == 0, proc.stderr.read()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for r in (relay, again):
            if r is not None:
                r.stop()
