"""
Reliability of Tunnels with real processes on loopback: the same URL after any disconnect,
dead links found fast, graceful drain, hard limits, file-descriptor exhaustion, and a
reconnect storm.

Relays and agents are real ``twistd`` processes (they are what fails); local servers are
threads of the test process; link cuts go through `tunnel.testing._cutproxy`. Every wait has a
deadline; every process is ended by PID at teardown. Observed numbers are printed (``-s``)
and recorded in ``docs/reliability.md``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import resource
import selectors
import socket
import ssl
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from tests.e2e.reliability_harness import (
    LOOPBACK,
    Endpoint,
    Group,
    LocalServer,
    RelayProc,
    closed_by_peer,
    curl,
    echo_handler,
    echo_roundtrip,
    http_handler,
    nc_echo,
    payload,
    port_accepts,
    require_tool,
    sha256,
    slow_sender,
    tls_connect,
    wait_for,
)
from tunnel.testing._cutproxy import CutProxy

pytestmark = pytest.mark.e2e


def _report(name: str, **numbers: Any) -> None:
    print(f"\n[reliability] {name}: " + ", ".join(f"{k}={v}" for k, v in numbers.items()))


@pytest.fixture
def grp(tmp_path: Path) -> Iterator[Group]:
    group = Group(tmp_path)
    try:
        yield group
    finally:
        group.stop_all()


def _server(grp: Group, handler: Any) -> LocalServer:
    server = LocalServer(handler)
    grp.cleanups.append(server.close)
    return server


def _proxy(grp: Group, port: int) -> CutProxy:
    proxy = CutProxy(port)
    grp.cleanups.append(proxy.close)
    return proxy


def _curl_ok(relay: RelayProc, tunnel: Endpoint) -> None:
    result = curl(relay, tunnel, "/hello")
    assert result.returncode == 0 and result.stdout == b"ok\n", (result.returncode, result.stderr)


class Download:
    """A public client reading a TLS tunnel to EOF in a thread."""

    def __init__(self, relay: RelayProc, tunnel: Endpoint) -> None:
        self.sock = tls_connect(relay, tunnel, timeout=30)
        self.chunks: list[bytes] = []
        self.received = 0
        self.error: BaseException | None = None
        self.ended_at: float | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while True:
                data = self.sock.recv(1 << 16)
                if not data:
                    break
                self.chunks.append(data)
                self.received += len(data)
        except BaseException as e:
            self.error = e
        finally:
            self.ended_at = time.monotonic()
            with contextlib.suppress(OSError):
                self.sock.close()

    def data(self) -> bytes:
        return b"".join(self.chunks)

    def wait_received(self, n: int, timeout: float = 20.0) -> None:
        wait_for(lambda: self.received >= n or self.ended_at is not None, f"{n} bytes", timeout)
        assert self.received >= n, (self.received, self.error)

    def join(self, timeout: float) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()


# ---------------------------------------------------------------------------------------------
# 1. SIGKILL and restart: same URL, same TCP port; a transfer in flight is closed, not hung


def test_relay_sigkill_restart_same_url_and_port(grp: Group) -> None:
    http = _server(grp, http_handler)
    echo = _server(grp, echo_handler)
    big = payload(16 << 20, seed=1)
    slow = _server(grp, slow_sender(big, 64 << 10, 0.05))
    relay = grp.relay()
    agent = grp.agent(relay, [str(http.port), str(slow.port), f"{echo.port}:tcp"])
    web, dl, tcp = agent.ready(http.port), agent.ready(slow.port), agent.ready(echo.port)
    assert tcp.tcp_port is not None
    _curl_ok(relay, web)
    assert nc_echo(tcp.tcp_port, b"before\n") == b"before\n"

    download = Download(relay, dl)
    download.wait_received(256 << 10)
    killed_at = time.monotonic()
    assert relay.proc is not None
    relay.proc.kill()

    # The public client mid-transfer sees its connection end (EOF or reset), never a hang.
    assert download.join(5.0), "the public client hung after the relay was killed"
    assert download.received < len(big)
    assert download.ended_at is not None
    client_closed_after = download.ended_at - killed_at
    # The agent notices the lost link and resets the local connection too.
    wait_for(lambda: "broken" in slow.events, "the local server sees its client go", 10)

    relay.start()
    restarted_at = time.monotonic()
    for tunnel in (web, dl, tcp):
        agent.wait_back(tunnel, 1)
    back_after = time.monotonic() - restarted_at
    assert "came back as" not in agent.proc.text()
    _curl_ok(relay, web)
    assert nc_echo(tcp.tcp_port, b"after\n") == b"after\n"
    _report(
        "sigkill-restart",
        client_closed_after=f"{client_closed_after:.3f}s",
        received_before_cut=download.received,
        all_back_after_restart=f"{back_after:.2f}s",
        error=type(download.error).__name__ if download.error else "EOF",
    )


# ---------------------------------------------------------------------------------------------
# 2. A silent cut (no FIN, no RST): keepalive finds the dead link


def test_silent_cut_detected_by_keepalive(grp: Group) -> None:
    interval, timeout = 1.0, 3.0
    http = _server(grp, http_handler)
    relay = grp.relay("--keepalive-interval", "1", "--keepalive-timeout", "3")
    proxy = _proxy(grp, relay.port)
    agent = grp.agent(relay, [str(http.port)], via_port=proxy.port)
    web = agent.ready(http.port)
    _curl_ok(relay, web)
    relay.wait_status(lambda s: s["links"] == 1 and s["tunnels"] == 1, "one link")

    agent_log_at = agent.proc.size()
    ports = proxy.cut()
    cut_at = time.monotonic()
    assert len(ports) == 1
    assert relay.proc is not None
    relay.proc.wait_log(rf"agent 127\.0\.0\.1:{ports[0]} disconnected", timeout + 5)
    relay_detected = time.monotonic() - cut_at
    status = relay.wait_status(lambda s: s["links"] == 0, "the link gone", 1)
    assert status["tunnels"] == 0 and status["streams"] == 0
    agent.proc.wait_log("link to relay lost; reconnecting", timeout + 5, start=agent_log_at)
    agent_detected = time.monotonic() - cut_at
    assert relay_detected <= timeout + 2, relay_detected
    assert agent_detected <= timeout + 2, agent_detected
    assert re.search(r"link silent for [\d.]+s, declaring it dead", relay.proc.text())

    proxy.heal()
    healed_at = time.monotonic()
    agent.wait_back(web, 1)
    back_after = time.monotonic() - healed_at
    _curl_ok(relay, web)
    relay.wait_status(lambda s: s["links"] == 1 and s["tunnels"] == 1, "the link back")
    _report(
        "silent-cut",
        keepalive=f"{interval:g}/{timeout:g}s",
        relay_detected=f"{relay_detected:.2f}s",
        agent_detected=f"{agent_detected:.2f}s",
        back_after_heal=f"{back_after:.2f}s",
    )


# ---------------------------------------------------------------------------------------------
# 3. Twenty abrupt cuts in a row: nothing leaks


BASELINE_KEYS = (
    "links",
    "agents",
    "tunnels",
    "streams",
    "public_connections",
    "tcp_listeners",
    "tcp_ports_in_use",
    "pending_handshakes",
    "open_fds",
)


def test_twenty_cut_cycles_back_to_baseline(grp: Group) -> None:
    cycles = 20
    http = _server(grp, http_handler)
    echo = _server(grp, echo_handler)
    relay = grp.relay()
    proxy = _proxy(grp, relay.port)
    agent = grp.agent(relay, [str(http.port), f"{echo.port}:tcp"], via_port=proxy.port)
    web, tcp = agent.ready(http.port), agent.ready(echo.port)
    assert tcp.tcp_port is not None
    _curl_ok(relay, web)
    baseline = relay.wait_status(
        lambda s: s["links"] == 1 and s["tunnels"] == 2 and s["public_connections"] == 0,
        "a quiet relay",
    )
    # The fd count settles once curl's connection is fully gone.
    baseline = {k: baseline[k] for k in BASELINE_KEYS}

    started = time.monotonic()
    for cycle in range(1, cycles + 1):
        # Some cycles cut with a public connection open through the tunnel.
        held = tls_connect(relay, web) if cycle % 4 == 0 else None
        killed = proxy.kill_all()
        assert killed, f"cycle {cycle}: no link to cut"
        if held is not None:
            assert closed_by_peer(held, 5), f"cycle {cycle}: public connection left open"
            held.close()
        agent.wait_back(web, cycle)
        agent.wait_back(tcp, cycle)
        if cycle % 5 == 0:
            _curl_ok(relay, web)
            assert nc_echo(tcp.tcp_port, b"cycle\n") == b"cycle\n"
    elapsed = time.monotonic() - started

    final = relay.wait_status(
        lambda s: all(s[k] == baseline[k] for k in BASELINE_KEYS),
        f"the relay back to its baseline {baseline}",
    )
    assert "came back as" not in agent.proc.text()
    _report(
        "cut-cycles",
        cycles=cycles,
        elapsed=f"{elapsed:.1f}s",
        baseline=baseline,
        final={k: final[k] for k in BASELINE_KEYS},
    )


# ---------------------------------------------------------------------------------------------
# 4. Forged reclaims are refused; the holder keeps its tunnel


def _get_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


@pytest_twisted.inlineCallbacks
def test_forged_reclaim_refused(grp: Group) -> Any:
    from twisted.internet import threads

    from tunnel.agent.session import Agent, ForwardSpec, RelayAddress
    from tunnel.wire.control import TunnelRefused as TunnelRefusedMessage

    reactor = _get_reactor()
    http = _server(grp, http_handler)
    relay = grp.relay()
    holder = grp.agent(relay, [str(http.port)])
    victim = holder.ready(http.port)
    victim_id = victim.host.split(".")[0]
    yield threads.deferToThread(_curl_ok, relay, victim)

    agents: list[Any] = []

    def forge(tunnel_id: str, secret: str | None) -> tuple[Any, list[Any]]:
        agent = Agent(
            reactor, [RelayAddress("localhost", relay.port)], ca=str(relay.ca), fail_fast=False
        )
        agents.append(agent)
        refusals: list[Any] = []
        answered = agent._answered

        def spy(message: Any) -> None:
            if isinstance(message, TunnelRefusedMessage):
                refusals.append(message)
            answered(message)

        agent._answered = spy  # type: ignore[method-assign]
        d = agent.forward(ForwardSpec(http.port))
        # The link is not up yet: the first request will carry this forged reclaim.
        agent.forwards[0].tunnel_id = tunnel_id
        agent.forwards[0].secret = secret
        return d, refusals

    try:
        # (a) a made-up secret, (b) no secret, (c) a genuine secret of another tunnel.
        d, refused_a = forge(victim_id, "A" * 43)
        tunnel_a = yield d
        d, refused_b = forge(victim_id, None)
        tunnel_b = yield d
        other_secret = agents[0].forwards[0].secret
        assert other_secret
        d, refused_c = forge(victim_id, other_secret)
        tunnel_c = yield d
        for refusals, tunnel in (
            (refused_a, tunnel_a),
            (refused_b, tunnel_b),
            (refused_c, tunnel_c),
        ):
            assert [m.code for m in refusals] == ["reclaim_refused"], refusals
            # The agent then asks for (and gets) a fresh tunnel, never the victim's id.
            assert not tunnel.url.startswith(f"https://{victim_id}.")
        assert relay.proc is not None
        text = relay.proc.text()
        assert text.count(f"refused a reclaim of {victim_id} with a wrong secret") == 3
        assert "reclaimed from an older link" not in text
        # The holder keeps serving, on its link.
        yield threads.deferToThread(_curl_ok, relay, victim)
        status = yield threads.deferToThread(relay.status)
        assert status["links"] == 4 and status["tunnels"] == 4
        assert "relay closed tunnel" not in holder.proc.text()
    finally:
        for agent in agents:
            yield agent.stop()


# ---------------------------------------------------------------------------------------------
# 5. SIGTERM drains: the download in flight completes, new connections are refused


def test_sigterm_drain_completes_download(grp: Group) -> None:
    grace = 5.0
    data = payload(4 << 20, seed=5)
    slow = _server(grp, slow_sender(data, 64 << 10, 0.03))
    echo = _server(grp, echo_handler)
    relay = grp.relay("--drain-grace", str(grace))
    agent = grp.agent(relay, [str(slow.port), f"{echo.port}:tcp"])
    dl, tcp = agent.ready(slow.port), agent.ready(echo.port)
    assert tcp.tcp_port is not None and port_accepts(tcp.tcp_port)

    download = Download(relay, dl)
    download.wait_received(256 << 10)
    assert relay.proc is not None
    proc = relay.proc
    proc.popen.send_signal(15)
    term_at = time.monotonic()

    # New connections are refused while the download is still running.
    wait_for(lambda: not port_accepts(relay.port), "the public port to refuse", 2)
    wait_for(lambda: not port_accepts(tcp.tcp_port), "the tunnel's TCP port to refuse", 2)
    refused_after = time.monotonic() - term_at
    assert download.ended_at is None, "the download ended before the drain was observed"
    assert proc.alive()

    assert download.join(grace), (
        f"the download did not finish within the grace period: {download.received} of "
        f"{len(data)} bytes, server {slow.events}"
    )
    assert download.error is None, download.error
    assert sha256(download.data()) == sha256(data)
    finished_after = (download.ended_at or 0) - term_at
    wait_for(
        lambda: not proc.alive(), "the relay to exit", grace + 1 - (time.monotonic() - term_at)
    )
    exited_after = time.monotonic() - term_at
    # twistd re-raises the signal it stopped on once its shutdown is complete.
    assert proc.popen.returncode in (0, -15), proc.popen.returncode
    assert "Server Shut Down." in proc.text()
    agent.proc.wait_log("relay is draining", 5)
    _report(
        "drain",
        grace=f"{grace:g}s",
        refused_new_after=f"{refused_after:.2f}s",
        download_done_after=f"{finished_after:.2f}s",
        exited_after=f"{exited_after:.2f}s",
    )


def _lingering_download(grp: Group, tcp: bool) -> tuple[int, int, bool]:
    """
    A local server sends 1 MiB, shuts down its sending side and reads on (a lingering close);
    a public client reads through the tunnel until EOF. Returns (received, expected, EOF
    seen within 5 s).
    """
    data = payload(1 << 20, seed=6)
    server = _server(grp, slow_sender(data, 64 << 10, 0.0, half_close=True))
    relay = grp.relay()
    agent = grp.agent(relay, [f"{server.port}:tcp" if tcp else str(server.port)])
    tunnel = agent.ready(server.port)
    if tcp:
        assert tunnel.tcp_port is not None
        sock: socket.socket = socket.create_connection((LOOPBACK, tunnel.tcp_port), timeout=5)
    else:
        sock = tls_connect(relay, tunnel, timeout=5)
    received = 0
    eof = False
    try:
        while True:
            chunk = sock.recv(1 << 16)
            if not chunk:
                eof = True
                break
            received += len(chunk)
    except (TimeoutError, ssl.SSLError, ConnectionError):
        pass
    finally:
        sock.close()
    return received, len(data), eof


def test_server_half_close_reaches_tcp_client(grp: Group) -> None:
    received, expected, eof = _lingering_download(grp, tcp=True)
    assert received == expected
    assert eof, "the raw TCP client never saw the local server's FIN"


def test_server_half_close_reaches_tls_client(grp: Group) -> None:
    received, expected, eof = _lingering_download(grp, tcp=False)
    assert received == expected
    assert eof, "the TLS client got every byte but no close_notify/EOF within 5 s"


# ---------------------------------------------------------------------------------------------
# 6. A thousand silent or half-hello sockets are aborted; real handshakes keep working


def _raise_nofile(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < n:
        if hard != resource.RLIM_INFINITY and hard < n:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {n}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))


def _open_silent(
    port: int, count: int, send: bytes = b"", may_be_refused: bool = False
) -> list[socket.socket]:
    """`count` connected sockets to 127.0.0.1:`port` (each sends `send`, then nothing).

    With `may_be_refused`, a socket the server resets at once (before we look) is kept too.
    """
    socks: list[socket.socket] = []
    sel = selectors.DefaultSelector()
    try:
        for _ in range(count):
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect((LOOPBACK, port))
            socks.append(s)
            sel.register(s, selectors.EVENT_WRITE)
        pending = set(socks)
        deadline = time.monotonic() + 20
        while pending and time.monotonic() < deadline:
            for key, _ in sel.select(0.5):
                s = key.fileobj  # type: ignore[assignment]
                sel.unregister(s)
                pending.discard(s)
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if may_be_refused and err == errno.ECONNRESET:
                    continue
                assert err == 0, os.strerror(err)
                if send:
                    s.send(send)
        assert not pending, f"{len(pending)} sockets did not connect"
    except BaseException:
        for s in socks:
            s.close()
        raise
    finally:
        sel.close()
    return socks


def _client_hello(server_name: str) -> bytes:
    """A real TLS client's first flight (its ClientHello) for `server_name`."""
    from OpenSSL import SSL

    conn = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
    conn.set_connect_state()
    conn.set_tlsext_host_name(server_name.encode())
    with contextlib.suppress(SSL.WantReadError):
        conn.do_handshake()
    return conn.bio_read(65536)


# The first 60 bytes of a TLS 1.2 ClientHello record: a record header announcing more.
HALF_HELLO = bytes.fromhex("160301020001000200030300") + b"\x00" * 48


def test_thousand_silent_sockets_aborted(grp: Group) -> None:
    count, hs_timeout = 1000, 1.0
    _raise_nofile(count * 2 + 512)
    http = _server(grp, http_handler)
    # Twisted listens with a backlog of 50 by default: a burst of 1000 connects overflows it
    # and the kernel drops handshake ACKs (accepted seconds later, on SYN-ACK retransmits).
    # All from 127.0.0.1, like the curls: the per-source bound is lifted as well.
    relay = grp.relay(
        "--handshake-timeout",
        str(hs_timeout),
        "--max-pending-handshakes",
        "2000",
        "--max-pending-per-source",
        "2000",
        listen_options=":backlog=2048",
    )
    agent = grp.agent(relay, [str(http.port)])
    web = agent.ready(http.port)
    _curl_ok(relay, web)

    opened_at = time.monotonic()
    socks = _open_silent(relay.port, count // 2) + _open_silent(
        relay.port, count - count // 2, HALF_HELLO
    )
    try:
        connected_at = time.monotonic()
        # Real handshakes succeed meanwhile.
        curls = 0
        while time.monotonic() - connected_at < hs_timeout / 2:
            _curl_ok(relay, web)
            curls += 1
        status = relay.status()
        assert status["refused_handshakes_overload"] == 0
        # Every silent socket is aborted after the handshake timeout (with 2 s of slack).
        sel = selectors.DefaultSelector()
        for s in socks:
            sel.register(s, selectors.EVENT_READ)
        open_ = set(socks)
        closed_at: list[float] = []
        deadline = connected_at + hs_timeout + 2
        while open_ and time.monotonic() < deadline:
            for key, _ in sel.select(0.2):
                s = key.fileobj  # type: ignore[assignment]
                try:
                    data = s.recv(4096)
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(s)
                    open_.discard(s)
                    closed_at.append(time.monotonic())
        sel.close()
        assert not open_, f"{len(open_)} of {count} silent sockets still open"
        first = min(closed_at) - opened_at
        last = max(closed_at) - connected_at
        assert first >= hs_timeout * 0.9, f"aborted before the handshake timeout: {first:.2f}s"
        _curl_ok(relay, web)
        status = relay.wait_status(lambda s: s["pending_handshakes"] == 0, "no pending handshakes")
        assert status["refused_handshakes_overload"] == 0
        _report(
            "handshake-flood",
            sockets=count,
            curls_during=curls,
            first_aborted_after_open=f"{first:.2f}s",
            last_aborted_after_connected=f"{last:.2f}s",
        )
    finally:
        for s in socks:
            s.close()


# ---------------------------------------------------------------------------------------------
# 7. Limits


@pytest_twisted.inlineCallbacks
def test_limit_tunnels_per_agent(grp: Group) -> Any:
    from tunnel.agent.session import Agent, ForwardSpec, RelayAddress
    from tunnel.errors import TunnelRefused

    a, b, c = (_server(grp, http_handler) for _ in range(3))
    relay = grp.relay("--max-tunnels-per-agent", "2")
    agent = Agent(
        _get_reactor(), [RelayAddress("localhost", relay.port)], ca=str(relay.ca), fail_fast=False
    )
    try:
        t1 = yield agent.forward(ForwardSpec(a.port))
        t2 = yield agent.forward(ForwardSpec(b.port, unencrypted=True))
        assert t1.url != t2.url
        with pytest.raises(TunnelRefused) as info:
            yield agent.forward(ForwardSpec(c.port))
        assert info.value.code == "limit"
        assert "at most 2 tunnels" in str(info.value)
        # The two granted tunnels are untouched.
        assert [f.tunnel_id is not None for f in agent.forwards] == [True, True]
    finally:
        yield agent.stop()


def test_limit_connections_per_tunnel(grp: Group) -> None:
    echo = _server(grp, echo_handler)
    relay = grp.relay("--max-connections-per-tunnel", "3")
    agent = grp.agent(relay, [str(echo.port)])
    tunnel = agent.ready(echo.port)
    conns = [tls_connect(relay, tunnel) for _ in range(3)]
    try:
        for c in conns:
            assert echo_roundtrip(c)
        relay.wait_status(lambda s: s["public_connections"] == 3, "3 public connections")
        # The 4th is closed (during its handshake), the 3 stay up.
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            fourth = tls_connect(relay, tunnel, timeout=5)
            try:
                if not echo_roundtrip(fourth):
                    raise ConnectionError("closed")
            finally:
                fourth.close()
        assert relay.proc is not None
        relay.proc.wait_log(r"3 connections open, refusing another", 5)
        for c in conns:
            assert echo_roundtrip(c, b"still\n")
        # One closes: a new one is accepted again.
        conns.pop().close()
        relay.wait_status(lambda s: s["public_connections"] == 2, "2 public connections")
        again = tls_connect(relay, tunnel)
        conns.append(again)
        assert echo_roundtrip(again)
    finally:
        for c in conns:
            c.close()


def test_limit_idle_timeout(grp: Group) -> None:
    idle = 1.0
    echo = _server(grp, echo_handler)
    relay = grp.relay("--idle-timeout", str(idle))
    agent = grp.agent(relay, [str(echo.port)])
    tunnel = agent.ready(echo.port)
    quiet = tls_connect(relay, tunnel)
    busy = tls_connect(relay, tunnel)
    try:
        assert echo_roundtrip(quiet) and echo_roundtrip(busy)
        opened = time.monotonic()
        quiet.setblocking(False)
        closed_after: float | None = None
        # Keep `busy` talking (every idle/4 s) until `quiet` is closed, and for 2 idle
        # periods after that.
        while time.monotonic() - opened < idle + 2 + 2 * idle:
            assert echo_roundtrip(busy), "the active connection was closed"
            if closed_after is None:
                try:
                    if quiet.recv(4096) == b"":
                        closed_after = time.monotonic() - opened
                except (ssl.SSLWantReadError, BlockingIOError):
                    pass
                except OSError:
                    closed_after = time.monotonic() - opened
                if closed_after is None and time.monotonic() - opened > idle + 2:
                    pytest.fail("the idle connection was not closed within idle timeout + 2 s")
            elif time.monotonic() - opened > closed_after + 2 * idle:
                break
            time.sleep(idle / 4)  # the pace of the active client, not a wait for an event
        assert closed_after is not None
        assert closed_after >= idle * 0.9
        _report("idle-timeout", idle=f"{idle:g}s", idle_closed_after=f"{closed_after:.2f}s")
    finally:
        quiet.close()
        busy.close()


def test_limit_pending_handshakes(grp: Group) -> None:
    http = _server(grp, http_handler)
    relay = grp.relay("--max-pending-handshakes", "5", "--handshake-timeout", "30")
    agent = grp.agent(relay, [str(http.port)])
    web = agent.ready(http.port)
    # Five handshakes that stall after a complete ClientHello: a silent socket would be
    # evicted for a newcomer, these are not.
    socks = _open_silent(relay.port, 5, _client_hello(web.host))
    try:
        relay.wait_status(lambda s: s["pending_handshakes"] == 5, "5 pending handshakes")
        sixth = _open_silent(relay.port, 1, may_be_refused=True)[0]
        socks.append(sixth)
        opened = time.monotonic()
        assert closed_by_peer(sixth, 5), "the 6th silent socket was not closed"
        closed_after = time.monotonic() - opened
        assert closed_after < 5
        status = relay.status()
        assert status["refused_handshakes_overload"] >= 1
        assert status["evicted_silent_handshakes"] == 0
        assert status["pending_handshakes"] == 5
        # The first five are still held (30 s handshake timeout): the server's first flight
        # at most, no end of file.
        for s in socks[:5]:
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                assert s.recv(65536) != b""
    finally:
        for s in socks:
            s.close()
    relay.wait_status(lambda s: s["pending_handshakes"] == 0, "no pending handshakes")
    _curl_ok(relay, web)
    _report("pending-handshakes", sixth_closed_after=f"{closed_after * 1000:.0f}ms")


# ---------------------------------------------------------------------------------------------
# 8. File descriptors: EMFILE at accept, and recovery


def test_fd_exhaustion_and_recovery(grp: Group) -> None:
    prlimit = require_tool("prlimit")
    http = _server(grp, http_handler)
    relay = grp.relay(
        "--handshake-timeout",
        "30",
        "--max-pending-handshakes",
        "2000",
        "--max-pending-per-source",
        "2000",
    )
    agent = grp.agent(relay, [str(http.port)])
    web = agent.ready(http.port)
    _curl_ok(relay, web)
    before = relay.wait_status(lambda s: s["public_connections"] == 0, "a quiet relay")
    limit = 64
    subprocess.run([prlimit, "--pid", str(relay.pid), f"--nofile={limit}:{limit}"], check=True)
    assert relay.proc is not None
    log_at = relay.proc.size()

    socks: list[socket.socket] = []
    try:
        # More connections than the relay has descriptors left; the kernel completes the
        # handshakes (backlog), the relay accepts until EMFILE.
        for _ in range(limit + 16):
            s = socket.socket()
            s.settimeout(2)
            try:
                s.connect((LOOPBACK, relay.port))
            except OSError:
                s.close()
                break
            socks.append(s)
        relay.proc.wait_log(r"EMFILE encountered", 10, start=log_at)
        exhausted_at = time.monotonic()
        assert relay.proc.alive()
        # While exhausted, a real client cannot get through (bounded: curl's --max-time).
        failed = curl(relay, web, "/hello", timeout=2)
        assert failed.returncode != 0
    finally:
        for s in socks:
            s.close()
    closed_at = time.monotonic()
    # Recovery: once the connections are gone, new ones succeed again.
    wait_for(lambda: curl(relay, web, "/hello", timeout=3).returncode == 0, "a curl to succeed", 20)
    recovered_after = time.monotonic() - closed_at
    after = relay.wait_status(
        lambda s: s["open_fds"] <= before["open_fds"] + 2 and s["pending_handshakes"] == 0,
        "descriptors released",
    )
    emfile_lines = relay.proc.text()[log_at:].count("EMFILE recovery: Closed socket")
    exhausted_for = closed_at - exhausted_at
    assert after["links"] == 1 and after["tunnels"] == 1
    _report(
        "fd-exhaustion",
        connections=len(socks),
        fds_before=before["open_fds"],
        fds_after=after["open_fds"],
        emfile_log_lines=emfile_lines,
        exhausted_for=f"{exhausted_for:.2f}s",
        recovered_after=f"{recovered_after:.2f}s",
    )


# ---------------------------------------------------------------------------------------------
# 9. Reconnect storm: 100 in-process agents, relay SIGKILLed and restarted


@pytest_twisted.inlineCallbacks
def test_reconnect_storm(grp: Group) -> Any:
    from twisted.internet import defer, threads
    from twisted.logger import globalLogPublisher

    from tunnel.agent.session import Agent, ForwardSpec, RelayAddress

    count = 100
    _raise_nofile(4096)
    reactor = _get_reactor()
    http = _server(grp, http_handler)
    relay = grp.relay()
    agents = [
        Agent(reactor, [RelayAddress("localhost", relay.port)], ca=str(relay.ca), fail_fast=False)
        for _ in range(count)
    ]
    back: dict[str, float] = {}
    moved: list[str] = []

    def observer(event: dict[str, Any]) -> None:
        kind = event.get("event_type")
        if kind == "tunnel_back":
            back.setdefault(event["url"], time.monotonic())
        elif kind == "tunnel_moved":
            moved.append(event["old"])

    globalLogPublisher.addObserver(observer)
    try:
        tunnels = yield defer.gatherResults(
            [agent.forward(ForwardSpec(http.port)) for agent in agents], consumeErrors=True
        )
        urls = [t.url for t in tunnels]
        assert len(set(urls)) == count
        status = yield threads.deferToThread(relay.status)
        assert status["agents"] == count and status["tunnels"] == count

        def kill_and_restart() -> float:
            assert relay.proc is not None
            relay.proc.kill()
            restarted = time.monotonic()
            relay.start()
            return restarted

        restarted_at = yield threads.deferToThread(kill_and_restart)
        listening_at = time.monotonic()
        deadline = listening_at + 30
        while len(back) < count and time.monotonic() < deadline:
            yield _later(reactor, 0.05)
        assert not moved, f"tunnels came back under another URL: {moved[:3]}"
        assert len(back) == count, f"only {len(back)} of {count} came back"
        assert sorted(back) == sorted(urls)
        assert [a.forwards[0].tunnel.url for a in agents] == urls
        times = sorted(t - restarted_at for t in back.values())
        spread = times[-1] - times[0]
        # Jitter: the reconnects are not one burst.
        assert spread > 0.05, f"all {count} reconnects within {spread * 1000:.0f} ms"
        in_50ms = max(sum(1 for t in times if start <= t < start + 0.05) for start in times)
        status = yield threads.deferToThread(
            relay.wait_status, lambda s: s["agents"] == count and s["tunnels"] == count, "all back"
        )
        sample = [tunnels[i] for i in (0, count // 2, count - 1)]
        for t in sample:
            endpoint = Endpoint(t.tls_socket[0], t.tls_socket[1], None)
            yield threads.deferToThread(_curl_ok, relay, endpoint)
        _report(
            "reconnect-storm",
            agents=count,
            relay_startup=f"{listening_at - restarted_at:.2f}s",
            back_min=f"{times[0]:.2f}s",
            back_median=f"{statistics.median(times):.2f}s",
            back_max=f"{times[-1]:.2f}s",
            spread=f"{spread:.2f}s",
            max_in_any_50ms=in_50ms,
        )
    finally:
        globalLogPublisher.removeObserver(observer)
        yield defer.gatherResults([agent.stop() for agent in agents], consumeErrors=True)


def _later(reactor: Any, seconds: float) -> Any:
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: None)
