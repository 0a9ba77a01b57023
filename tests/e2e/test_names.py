"""
Named tunnels end to end, with real relay and agent processes on loopback: who may hold a
name (the token's ``names=``, a signed token's claims), a name across a relay SIGKILL and
restart, pools of agents (spread, a member killed, drained, restarted in turn), signed
tokens (accepted, expired, wrong key, tampered, revoked) and two relays sharing one key.

Every wait has a deadline; the request loops run in a thread of the test and record every
request's outcome. Every process is ended by PID at teardown.
"""

from __future__ import annotations

import base64
import json
import signal
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import threads

from tests.e2e.reliability_harness import (
    LOOPBACK,
    AgentProc,
    Endpoint,
    Group,
    LocalServer,
    RelayProc,
    echo_handler,
    nc_echo,
    wait_for,
)
from tunnel import _signedtokens as signed
from tunnel import client
from tunnel.errors import AuthenticationError, TunnelRefused
from tunnel.testing._daemons import admin_get

pytestmark = pytest.mark.e2e


@pytest.fixture
def grp(tmp_path: Path) -> Iterator[Group]:
    group = Group(tmp_path)
    try:
        yield group
    finally:
        group.stop_all()


def body_server(grp: Group, body: bytes, delay: float = 0.0) -> LocalServer:
    """An HTTP/1.1 server answering every request with `body`, after `delay` seconds (a
    request that takes that long, so that some are in flight when a member goes)."""

    def handle(sock: socket.socket, server: LocalServer) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return
            data += chunk
        if delay:
            time.sleep(delay)
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        sock.sendall(head.encode() + body)

    server = LocalServer(handle)
    grp.cleanups.append(server.close)
    return server


def get(relay: RelayProc, host: str, timeout: float = 10.0) -> bytes:
    """GET / over TLS through the relay; the body (raises on any failure)."""
    ctx = ssl.create_default_context(cafile=str(relay.ca))
    request = f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    with (
        socket.create_connection((LOOPBACK, relay.port), timeout=timeout) as raw,
        ctx.wrap_socket(raw, server_hostname=host) as s,
    ):
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep or not head.startswith(b"HTTP/1.1 200"):
        raise OSError(f"bad reply {data[:80]!r}")
    return body


def tokens_file(grp: Group, lines: list[str]) -> str:
    path = grp.dir / f"tokens-{grp.next_id()}.txt"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def pool_relay(grp: Group, token_lines: list[str], *extra: str) -> RelayProc:
    return grp.relay("--tokens", tokens_file(grp, token_lines), "--drain-grace", "2", *extra)


def pool_members(relay: RelayProc, name: str) -> list[dict[str, Any]]:
    pools: dict[str, Any] = relay.status().get("pools", {})  # type: ignore[assignment]
    return list(pools.get(name, {}).get("members", []))


def wait_pool(relay: RelayProc, name: str, in_rotation: int) -> None:
    wait_for(
        lambda: sum(m["in_rotation"] for m in pool_members(relay, name)) == in_rotation,
        f"{in_rotation} members of {name} in rotation",
    )


@dataclass
class Loop:
    """GET requests one after another, in a thread, until stopped: each one's start time
    (monotonic), body (None: it failed) and error."""

    relay: RelayProc
    host: str
    results: list[tuple[float, bytes | None, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Loop:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.results.append((started, get(self.relay, self.host), ""))
            except (OSError, ssl.SSLError) as e:
                self.results.append((started, None, repr(e)))

    def wait_count(self, n: int) -> None:
        start = len(self.results)
        wait_for(lambda: len(self.results) >= start + n, f"{n} more requests", 60)

    def stop(self) -> list[tuple[float, bytes | None, str]]:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(30)
        return self.results

    def failures(self) -> list[tuple[float, bytes | None, str]]:
        return [r for r in self.results if r[1] is None]


def start_agent(grp: Group, relay: RelayProc, forward: str, token: str) -> AgentProc:
    return grp.agent(relay, [forward], token=token, extra=["--drain-grace", "10"])


def ready(agent: AgentProc, port: int) -> Endpoint:
    return agent.ready(port)


# ---------------------------------------------------------------------------------------------
# Who may hold a name


def test_names_need_the_tokens_permission_and_keep_their_url(grp: Group) -> None:
    relay = pool_relay(grp, ["tok-web names=web", "tok-api names=api-*", "tok-plain"])
    a, b = body_server(grp, b"A"), body_server(grp, b"B")
    owner = start_agent(grp, relay, f"web={a.port}", "tok-web")
    web = ready(owner, a.port)
    assert (
        web.host == "web.tunnel.localhost"
        and web.url == f"https://web.tunnel.localhost:{relay.port}"
    )
    # Another token, without web among its names, cannot take it, nor join its pool.
    intruder = start_agent(grp, relay, f"web={b.port}", "tok-api")
    intruder.proc.wait_log(
        r"not granted: the token does not allow the tunnel name 'web' "
        r"\(name_not_allowed\)"
    )
    plain = start_agent(grp, relay, f"web={b.port}", "tok-plain")
    plain.proc.wait_log(r"\(name_not_allowed\)")
    assert [get(relay, web.host) for _ in range(4)] == [b"A"] * 4
    assert len(pool_members(relay, "web")) == 1
    # Its own names it gets; a random id it always may.
    api = start_agent(grp, relay, f"api-1={b.port}", "tok-api")
    assert ready(api, b.port).host == "api-1.tunnel.localhost"
    assert get(relay, "api-1.tunnel.localhost") == b"B"


def test_bad_names_are_value_errors_before_any_io(grp: Group) -> None:
    from tunnel.agent.settings import forward_spec

    for bad in ("Web", "k3j5h2g7d9q1xwzp", "a_b", "-x", "x" * 64):
        with pytest.raises(ValueError):
            forward_spec(8000, {"name": bad})
    from tests.e2e.harness import run
    from tunnel.testing._daemons import twistd_command

    result = run(twistd_command("tunnelagent", "--relay", "localhost:1", "--forward", "Web=80"))
    assert result.returncode != 0 and b"not a DNS label" in result.stderr + result.stdout


def test_a_name_survives_a_relay_sigkill_and_restart(grp: Group) -> None:
    relay = pool_relay(grp, ["tok names=web,db"])
    http = body_server(grp, b"web")
    echo = LocalServer(echo_handler)
    grp.cleanups.append(echo.close)
    agent = grp.agent(relay, [f"web={http.port}", f"db={echo.port}:tcp"], token="tok")
    web, db = ready(agent, http.port), ready(agent, echo.port)
    assert db.host == "db.tunnel.localhost" and db.tcp_port is not None
    assert get(relay, web.host) == b"web"
    assert nc_echo(db.tcp_port, b"before\n") == b"before\n"
    assert relay.proc is not None
    relay.proc.kill()
    relay.start()
    for tunnel in (web, db):
        agent.wait_back(tunnel, 1)
    assert "came back as" not in agent.proc.text()
    assert get(relay, web.host) == b"web"
    assert nc_echo(db.tcp_port, b"after\n") == b"after\n"  # the same port


# ---------------------------------------------------------------------------------------------
# Pools


def pool(grp: Group, delay: float = 0.0) -> tuple[RelayProc, list[AgentProc], list[LocalServer]]:
    relay = pool_relay(grp, ["tok-web names=web"])
    servers = [body_server(grp, b"A", delay), body_server(grp, b"B", delay)]
    agents = [start_agent(grp, relay, f"web={s.port}", "tok-web") for s in servers]
    for agent, server in zip(agents, servers, strict=True):
        ready(agent, server.port)
    wait_pool(relay, "web", 2)
    return relay, agents, servers


def test_requests_reach_every_member_of_a_pool(grp: Group) -> None:
    relay, _agents, _servers = pool(grp)
    bodies = [get(relay, "web.tunnel.localhost") for _ in range(20)]
    assert set(bodies) == {b"A", b"B"}
    assert abs(bodies.count(b"A") - bodies.count(b"B")) <= 2  # fewest streams, ties in turn
    assert [m["in_rotation"] for m in pool_members(relay, "web")] == [True, True]
    _, metrics = admin_get(relay.admin_port, "/metrics")
    assert b'tunnels_relay_pool_members{name="web"} 2.0' in metrics
    assert b"tunnels_relay_named_tunnels 1.0" in metrics


def test_a_member_killed_during_a_request_loop_leaves_the_others_serving(grp: Group) -> None:
    relay, agents, _ = pool(grp, delay=0.02)
    loop = Loop(relay, "web.tunnel.localhost").start()
    loop.wait_count(20)
    killed_at = time.monotonic()
    agents[0].proc.kill()
    wait_pool(relay, "web", 1)  # link loss is noticed at once
    noticed = time.monotonic() - killed_at
    loop.wait_count(40)
    results = loop.stop()
    after = [r for r in results if r[0] > killed_at + noticed]
    assert len(after) >= 40 and all(body == b"B" for _, body, _ in after), loop.failures()
    # Only requests in flight on the killed member (or started before it was noticed) fail.
    assert all(r[0] <= killed_at + noticed for r in loop.failures())
    print(f"\n[names] kill: noticed after {noticed:.3f}s, {len(loop.failures())} failed")


def test_a_member_drained_with_sigterm_fails_no_request(grp: Group) -> None:
    relay, agents, _ = pool(grp, delay=0.05)
    loop = Loop(relay, "web.tunnel.localhost").start()
    loop.wait_count(20)
    agents[0].proc.signal(signal.SIGTERM)
    wait_for(lambda: not agents[0].proc.alive(), "the drained agent to exit", 30)
    loop.wait_count(20)
    results = loop.stop()
    assert loop.failures() == [], loop.failures()
    assert results[-1][1] == b"B"
    assert {body for _, body, _ in results} == {b"A", b"B"}


def test_a_rolling_restart_of_a_pool_fails_no_request(grp: Group) -> None:
    relay, agents, servers = pool(grp, delay=0.02)
    loop = Loop(relay, "web.tunnel.localhost").start()
    loop.wait_count(10)
    for i, server in enumerate(servers):
        agents[i].proc.signal(signal.SIGTERM)
        wait_for(lambda i=i: not agents[i].proc.alive(), "the old member to exit", 30)
        agents[i] = start_agent(grp, relay, f"web={server.port}", "tok-web")
        ready(agents[i], server.port)
        wait_pool(relay, "web", 2)
        loop.wait_count(10)
    results = loop.stop()
    assert loop.failures() == [], loop.failures()
    assert len(results) >= 30 and {b for _, b, _ in results[-10:]} <= {b"A", b"B"}


def test_a_member_whose_target_refuses_is_out_of_rotation(grp: Group) -> None:
    relay = pool_relay(grp, ["tok-web names=web"])
    good = body_server(grp, b"B")
    dead = socket.socket()
    dead.bind((LOOPBACK, 0))
    dead_port = dead.getsockname()[1]
    dead.close()  # nothing listens there: connections are refused
    # One after the other, so that the pool lists them in this order.
    refusing = start_agent(grp, relay, f"web={dead_port}", "tok-web")
    ready(refusing, dead_port)
    wait_pool(relay, "web", 1)
    serving = start_agent(grp, relay, f"web={good.port}", "tok-web")
    ready(serving, good.port)
    wait_pool(relay, "web", 2)
    outcomes = []
    for _ in range(10):
        try:
            outcomes.append(get(relay, "web.tunnel.localhost"))
        except (OSError, ssl.SSLError):
            outcomes.append(None)
    # At most the first connection to the refusing member fails; then it rests.
    assert outcomes.count(None) <= 1 and outcomes[-8:] == [b"B"] * 8, outcomes
    assert [m["in_rotation"] for m in pool_members(relay, "web")] == [False, True]


def test_pool_members_must_ask_for_the_same_options(grp: Group) -> None:
    relay = pool_relay(grp, ["tok names=web"])
    a, b = body_server(grp, b"A"), body_server(grp, b"B")
    ready(start_agent(grp, relay, f"web={a.port}", "tok"), a.port)
    other = start_agent(grp, relay, f"web={b.port}:h2", "tok")
    other.proc.wait_log(r"served with other options.*\(bad_request\)")


# ---------------------------------------------------------------------------------------------
# Signed tokens


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Any, str]:
    private, public = signed.generate_key_pair(str(tmp_path / "keys"))
    return signed.load_private_key(private), public


def issue(key: Any, subject: str = "alice", **kw: Any) -> str:
    return signed.issue_token(key, subject, now=time.time(), **kw)


def get_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


@pytest_twisted.ensureDeferred
async def test_signed_tokens_accepted_expired_wrong_key_tampered_and_name_claims(
    grp: Group, keys: tuple[Any, str]
) -> None:
    key, public = keys
    relay = await threads.deferToThread(
        grp.relay, "--token-key", public, "--tokens", tokens_file(grp, ["file-token"])
    )
    server = body_server(grp, b"signed")
    reactor = get_reactor()
    kw: dict[str, Any] = dict(relay=f"localhost:{relay.port}", ca=str(relay.ca))
    try:
        good = issue(key, names=["web", "alice-*"], expires_in=3600)
        t = await client.forward(reactor, server.port, name="alice-dev", token=good, **kw)
        assert t.host == "alice-dev.tunnel.localhost"
        assert await threads.deferToThread(get, relay, t.host) == b"signed"
        await t.close()
        # The file's tokens still work beside the signed ones.
        plain = await client.forward(reactor, server.port, token="file-token", **kw)
        await plain.close()
        # A claim that does not allow the name.
        with pytest.raises(TunnelRefused, match="name_not_allowed"):
            await client.forward(reactor, server.port, name="bob", token=good, **kw)
        # Expired, signed by another key, or tampered with: the token is refused.
        other_key = Ed25519()
        header, payload, sig = issue(key, names=["web"]).split(".")
        claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
        claims["names"] = ["*"]
        forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
        for bad in (
            issue(key, expires_in=-5),
            issue(other_key, names=["web"]),
            f"{header}.{forged}.{sig}",
        ):
            with pytest.raises(AuthenticationError):
                await client.forward(reactor, server.port, token=bad, **kw)
    finally:
        await client.shutdown(reactor)
    log = relay.log.read_text()
    assert "expired" in log and "does not verify" in log


def Ed25519() -> Any:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate()


def test_revoked_subjects_lose_their_links(grp: Group, keys: tuple[Any, str]) -> None:
    key, public = keys
    revoked = grp.dir / "revoked.txt"
    revoked.write_text("# revoked subjects and token ids\n")
    relay = grp.relay("--token-key", public, "--revoked", str(revoked))
    server = body_server(grp, b"x")
    bob = grp.agent(relay, [f"web={server.port}"], token=issue(key, "bob", names=["web"]))
    carol_token = issue(key, "carol", token_id="carol-1")
    carol = grp.agent(relay, [str(server.port)], token=carol_token)
    ready(bob, server.port), ready(carol, server.port)
    revoked.write_text("bob\n")
    bob.proc.wait_log(r"no longer accepts this token")
    wait_for(lambda: not bob.proc.alive(), "the revoked agent to stop")
    relay.wait_status(lambda s: s["agents"] == 1, "one agent left")
    # By token id too.
    revoked.write_text("bob\ncarol-1\n")
    wait_for(lambda: not carol.proc.alive(), "the agent of a revoked token id to stop")
    relay.wait_status(lambda s: s["agents"] == 0, "no agent left")


def test_two_relays_sharing_one_token_key_accept_the_same_token(
    grp: Group, keys: tuple[Any, str]
) -> None:
    key, public = keys
    r1 = grp.relay("--token-key", public, "--domain", "r1.tunnel.localhost")
    r2 = grp.relay("--token-key", public, "--domain", "r2.tunnel.localhost")
    server = body_server(grp, b"fleet")
    value = issue(key, "alice", names=["web"])
    hosts = []
    for relay in (r1, r2):
        agent = grp.agent(relay, [f"web={server.port}"], token=value)
        hosts.append(ready(agent, server.port).host)
    assert hosts == ["web.r1.tunnel.localhost", "web.r2.tunnel.localhost"]
    assert get(r1, hosts[0]) == get(r2, hosts[1]) == b"fleet"
