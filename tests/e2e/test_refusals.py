"""
Refusals end to end: a wrong token, a relay that is down, and nothing listening on the
forwarded port. Each must end promptly with a clear error, never hang.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from tests.e2e.harness import (
    DEADLINE,
    LOOPBACK,
    Procs,
    Relay,
    curl,
    first_reply,
    free_port,
    require_tool,
    run,
    tls_context,
)
from tunnel import client
from tunnel.errors import AuthenticationError, RelayUnavailable

pytestmark = pytest.mark.e2e


def get_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def test_wrong_token_is_refused_and_logged_on_both_sides(procs: Procs):
    relay = procs.relay(tokens=["right-token-1234"])
    backend = procs.backend("http")
    wrong = procs.agent(relay, [str(backend.port)], token="wrong-token-5678", wait=False)
    # The relay logs the refusal (without the token); the agent logs the relay's reason.
    relay.wait_log(r"refused agent 127\.0\.0\.1:\d+: wrong token")
    wrong.proc.wait_log(r"UNAUTHORIZED the relay does not accept this token")
    assert "tunnel ready" not in wrong.proc.text()
    assert "wrong-token-5678" not in relay.proc.text(), "the relay logged the token itself"
    # The right token gets a working tunnel from the same relay.
    right = procs.agent(relay, [str(backend.port)], token="right-token-1234")
    tunnel = right.ready(str(backend.port))
    result = curl(relay, tunnel, "-w", " %{http_code}", tunnel.url + "/hello")
    assert result.stdout == b"hello /hello\n 200", result.stderr
    assert "tunnel ready" not in wrong.proc.text()


def test_tokens_file_changes_apply_without_a_restart(procs: Procs, tmp_path: Path):
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("token-alice-1234\ntoken-bob-5678\n")
    relay = procs.relay(extra=["--tokens", str(tokens)])
    backends = [procs.backend("http") for _ in range(3)]
    alice = procs.agent(relay, [str(backends[0].port)], token="token-alice-1234")
    bob = procs.agent(relay, [str(backends[1].port)], token="token-bob-5678")
    alice_tunnel = alice.ready(str(backends[0].port))
    bob_tunnel = bob.ready(str(backends[1].port))

    # Alice's token revoked, Carol's added: the file replaced as a deploy tool would.
    new = tmp_path / "tokens.new"
    new.write_text("token-bob-5678\ntoken-carol-9012\n")
    os.replace(new, tokens)
    relay.wait_log(r"token of agent 127\.0\.0\.1:\d+ revoked; closing its link")
    alice.proc.wait_log(r"the relay no longer accepts this token; stopping")
    alice.proc.wait(lambda: not alice.proc.alive(), "the revoked agent to exit")
    assert "token-alice" not in relay.proc.text(), "the relay logged the token itself"

    gone = curl(relay, alice_tunnel, alice_tunnel.url + "/hello")
    assert gone.returncode == 35 and b"unrecognized name" in gone.stderr, gone.stderr
    kept = curl(relay, bob_tunnel, bob_tunnel.url + "/hello")
    assert kept.stdout == b"hello /hello\n", kept.stderr
    carol = procs.agent(relay, [str(backends[2].port)], token="token-carol-9012")
    carol_tunnel = carol.ready(str(backends[2].port))
    added = curl(relay, carol_tunnel, carol_tunnel.url + "/hello")
    assert added.stdout == b"hello /hello\n", added.stderr

    # A file emptied by mistake changes nothing.
    tokens.write_text("# nothing\n")
    relay.wait_log(r"tokens not reloaded, keeping the previous ones: .* holds no token")
    again = curl(relay, bob_tunnel, bob_tunnel.url + "/hello")
    assert again.stdout == b"hello /hello\n", again.stderr


def test_sighup_reloads_and_never_ends_the_relay(procs: Procs, tmp_path: Path):
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("token-alice-1234\n")
    with_tokens = procs.relay(extra=["--tokens", str(tokens)])
    without = procs.relay()
    for relay in (with_tokens, without):
        os.kill(relay.proc.pid, signal.SIGHUP)
    with_tokens.wait_log(r"SIGHUP: checking .*tokens\.txt")
    without.wait_log(r"SIGHUP: nothing to reload")
    backend = procs.backend("http")
    agent = procs.agent(without, [str(backend.port)])
    tunnel = agent.ready(str(backend.port))
    assert curl(without, tunnel, tunnel.url + "/hello").stdout == b"hello /hello\n"
    assert with_tokens.proc.alive()


def test_no_token_is_refused(procs: Procs):
    relay = procs.relay(tokens=["right-token-1234"])
    agent = procs.agent(relay, [str(free_port())], wait=False)
    relay.wait_log(r"refused agent 127\.0\.0\.1:\d+: wrong token")
    agent.proc.wait_log(r"UNAUTHORIZED the relay does not accept this token")
    assert "tunnel ready" not in agent.proc.text()


def test_wrong_token_agent_error_names_the_token_refusal(procs: Procs):
    """The agent's warning/error lines (not only the link's info line) name the refusal."""
    relay = procs.relay(tokens=["right-token-1234"])
    agent = procs.agent(relay, [str(free_port())], token="wrong-token-5678", wait=False)
    relay.wait_log(r"refused agent 127\.0\.0\.1:\d+: wrong token")
    agent.proc.wait_log(
        r"#(warn|error)\].*the relay refused the agent: the relay does not accept this token",
        timeout=8,
    )


@pytest_twisted.ensureDeferred
async def test_api_wrong_token_raises_authentication_error(procs: Procs):
    reactor = get_reactor()
    relay = procs.relay(tokens=["right-token-1234"])
    d = client.forward(
        reactor, 8080, relay=f"localhost:{relay.port}", ca=str(relay.ca), token="nope"
    )
    d.addTimeout(DEADLINE, reactor)
    try:
        with pytest.raises(AuthenticationError, match="does not accept this token"):
            await d
    finally:
        await client.shutdown(reactor)


@pytest_twisted.ensureDeferred
async def test_relay_down_fails_with_relay_unavailable(procs: Procs):
    reactor = get_reactor()
    relay = procs.relay()
    relay.proc.stop()  # nothing listens on its port any more
    d = client.forward(reactor, 8080, relay=f"localhost:{relay.port}", ca=str(relay.ca))
    # Not a hang: the Deferred fails (well) within the agent's connect timeout.
    d.addTimeout(DEADLINE, reactor)
    try:
        with pytest.raises(RelayUnavailable, match=str(relay.port)):
            await d
    finally:
        await client.shutdown(reactor)


def test_nothing_listening_tls_client_closed_promptly(procs: Procs, relay: Relay):
    port = free_port()  # nothing listens here
    agent = procs.agent(relay, [str(port)])
    tunnel = agent.ready(str(port))
    result = curl(relay, tunnel, tunnel.url + "/", timeout=30)
    # The relay finished the handshake, then closed cleanly: an empty reply (52), not a TLS
    # error (35) that would look like a certificate problem, and not curl's own --max-time
    # (28): the close is prompt.
    assert result.returncode == 52, (result.returncode, result.stderr)
    assert result.stdout == b""
    agent.proc.wait_log(rf"cannot connect to 127\.0\.0\.1:{port}")


def test_nothing_listening_tls_handshake_still_completes_then_clean_close(
    procs: Procs, relay: Relay
):
    """
    A client that stops after its ClientHello gets no stream (the relay opens one only once
    the handshake completed, so the agent tries nothing yet); once it completes the
    handshake, the agent's refusal makes the relay close with close_notify, so the client
    sees an empty reply, never a handshake failure or a reset that would look like a TLS
    problem.
    """
    port = free_port()  # nothing listens here
    agent = procs.agent(relay, [str(port)])
    tunnel = agent.ready(str(port))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = tls_context(relay).wrap_bio(incoming, outgoing, server_hostname=tunnel.host)
    with socket.create_connection((LOOPBACK, relay.port), timeout=DEADLINE) as sock:
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        sock.sendall(outgoing.read())  # the ClientHello alone: no stream yet
        # The relay's first flight arrives: the connection was routed, its TLS layer runs.
        first = sock.recv(65536)
        assert first
        incoming.write(first)
        assert f"cannot connect to 127.0.0.1:{port}" not in agent.proc.text()
        # Now the rest of the handshake, then a read for the response.
        deadline = time.monotonic() + DEADLINE
        closed_cleanly = False
        while time.monotonic() < deadline:
            try:
                if tls.do_handshake() is None and tls.read(1024) == b"":
                    closed_cleanly = True
                    break
            except ssl.SSLZeroReturnError:
                closed_cleanly = True
                break
            except ssl.SSLWantReadError:
                pass
            if outgoing.pending:
                sock.sendall(outgoing.read())
            data = sock.recv(65536)
            if not data:
                incoming.write_eof()
            else:
                incoming.write(data)
        assert closed_cleanly
        assert tls.version() is not None  # the handshake did complete
    agent.proc.wait_log(rf"cannot connect to 127\.0\.0\.1:{port}")


def test_nothing_listening_tcp_client_closed_promptly(procs: Procs, relay: Relay):
    port = free_port()
    agent = procs.agent(relay, [f"{port}:tcp"])
    tunnel = agent.ready(f"{port}:tcp")
    assert tunnel.tcp_port is not None
    data = first_reply(tunnel.tcp_port, b"anyone there?\n")
    assert data == b"", data  # closed (EOF or reset), not left hanging until the timeout
    agent.proc.wait_log(rf"cannot connect to 127\.0\.0\.1:{port}")
    # The tunnel itself stays up: the relay still accepts on its port.
    nc = run([require_tool("nc"), "-z", "-w", "5", LOOPBACK, str(tunnel.tcp_port)])
    assert nc.returncode == 0
