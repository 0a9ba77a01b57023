"""
Public clients that open connections and end them with a TCP reset, through a raw TCP and a
TLS tunnel of a real relay and agent: the agent's link never ends for it (the relay answers
for its clients), and one source past ``--source-reset-rate`` is refused before any stream,
counted, while other clients are served during and after. A close after the whole
answer, or right after a TLS close_notify, is no reset and is never refused.
"""

from __future__ import annotations

import re
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from pathlib import Path

from tests.attacks.harness import usage
from tests.attacks.test_shares import urlopen_text
from tests.e2e.reliability_harness import (
    Group,
    LocalServer,
    curl,
    echo_handler,
    echo_roundtrip,
    http_handler,
)
from tests.e2e.test_tls_close import close_notify_then_close

RSS_GROWTH_KIB = 64 * 1024
FD_GROWTH = 64
#: The relay's per-source bound in this test (small, so that a TLS flood reaches it soon).
RATE, BURST = 20, 500
#: The distributed phase: this many sources, each staying within its burst, together
#: resetting far more streams than the agent's old rapid-reset burst (2,000) allowed.
SOURCES, PER_SOURCE = 12, BURST - 20
_LINGER_0 = struct.pack("ii", 1, 0)


def _socket_from(source: str) -> socket.socket:
    """A TCP socket bound to `source`, with a 10 s timeout."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.settimeout(10)
    return sock


def _resetting_socket(source: str) -> socket.socket:
    """A socket bound to `source` whose close is a TCP reset (SO_LINGER 0), as the flood's."""
    sock = _socket_from(source)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_0)
    return sock


def _tls_echo(raw: socket.socket, port: int, ca: Path, host: str) -> tuple[ssl.SSLSocket, bool]:
    """Connect `raw` to the relay, TLS to tunnel `host` over it, echo a byte: the TLS socket
    and whether the byte came back."""
    raw.connect(("127.0.0.1", port))
    ctx = ssl.create_default_context(cafile=str(ca))
    sock = ctx.wrap_socket(raw, server_hostname=host)
    sock.sendall(b"x")
    return sock, sock.recv(1) == b"x"


def raw_reset(port: int, source: str) -> bool:
    """Connect from `source`, echo a byte, end with a reset; whether the echo came back."""
    sock = _resetting_socket(source)
    try:
        sock.connect(("127.0.0.1", port))
        return echo_roundtrip(sock, b"x")
    except OSError:
        return False
    finally:
        sock.close()


def reset_after_answer(port: int, source: str) -> bool:
    """From `source`, one HTTP request read to the server's close, then a reset."""
    sock = _resetting_socket(source)
    try:
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
        return answer.endswith(b"ok\n")
    except OSError:
        return False
    finally:
        sock.close()


def tls_reset(port: int, ca: Path, host: str, source: str) -> bool:
    """A TLS connection from `source` that echoes a byte and resets (the agent's side still
    open); whether it was served."""
    raw = _resetting_socket(source)
    try:
        sock, served = _tls_echo(raw, port, ca, host)
        sock.close()
        return served
    except OSError:
        return False
    finally:
        raw.close()


def tls_close_notify_then_close(port: int, ca: Path, host: str, source: str) -> bool:
    """From `source`, a TLS connection that echoes a byte (the agent's side still open),
    sends its close_notify and closes its socket at once, as Go's, asyncio's and Java's
    clients do (the relay's close_notify then meets a closed socket, and TCP resets);
    whether it was served."""
    raw = _socket_from(source)
    try:
        sock, served = _tls_echo(raw, port, ca, host)
        close_notify_then_close(sock)
        return served
    except OSError:
        return False
    finally:
        raw.close()


def flood_until_refused(attempt: Callable[[], bool], limit: int) -> tuple[int, int]:
    """Call `attempt` until 20 in a row fail (or `limit` calls); (served, refused)."""
    served = refused = streak = 0
    for _ in range(limit):
        if attempt():
            served += 1
            streak = 0
        else:
            refused += 1
            streak += 1
            if streak >= 20:
                break
    return served, refused


def test_resetting_clients_never_end_the_agents_link_and_one_source_is_refused(
    group: Group,
) -> None:
    relay = group.relay("--source-reset-rate", str(RATE), "--source-reset-burst", str(BURST))
    web = LocalServer(http_handler)
    echo = LocalServer(echo_handler)
    answers = LocalServer(http_handler)
    tls_echo = LocalServer(echo_handler)
    group.cleanups += [web.close, echo.close, answers.close, tls_echo.close]
    agent = group.agent(
        relay, [str(web.port), f"{echo.port}:tcp", f"{answers.port}:tcp", str(tls_echo.port)]
    )
    tls_tunnel = agent.ready(web.port)
    tls_echo_tunnel = agent.ready(tls_echo.port)
    tcp_tunnel = agent.ready(echo.port)
    answers_tunnel = agent.ready(answers.port)
    assert tcp_tunnel.tcp_port is not None and answers_tunnel.tcp_port is not None

    def served() -> bool:
        result = curl(relay, tls_tunnel, timeout=10)
        return bool(result.returncode == 0 and result.stdout == b"ok\n")

    assert served()
    baseline = usage(relay.pid)

    # 1. Many sources, each within its bound: thousands of resets reach the agent, which
    #    (before) ended its link past 2,000 at once. Its link must stay up.
    def one_source(i: int) -> None:
        for _ in range(PER_SOURCE):
            raw_reset(tcp_tunnel.tcp_port, f"127.0.0.{10 + i}")  # type: ignore[arg-type]

    threads = [threading.Thread(target=one_source, args=(i,)) for i in range(SOURCES)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    status = relay.status()
    assert status["refused_resets_per_source"] == 0, status
    assert served()

    # 1b. One source that resets each connection only after the whole answer (the server
    #    closed first, as with HTTP's Connection: close): twice its burst, never refused,
    #    since such a reset costs the agent nothing.
    for _ in range(2 * BURST):
        assert reset_after_answer(answers_tunnel.tcp_port, "127.0.0.5")  # type: ignore[arg-type]
    status = relay.status()
    assert status["refused_resets_per_source"] == 0, status

    # 1c. One source whose TLS clients end with a close_notify and close their sockets at
    #    once: twice its burst, never refused, since such a close is clean.
    for _ in range(2 * BURST):
        assert tls_close_notify_then_close(relay.port, relay.ca, tls_echo_tunnel.host, "127.0.0.6")
    status = relay.status()
    assert status["refused_resets_per_source"] == 0, status

    # 2. One source floods the raw TCP tunnel, 3. another the TLS tunnel, while a
    #    legitimate client (curl from 127.0.0.1) keeps being served.
    during: list[bool] = []
    stop = threading.Event()

    def legitimate() -> None:
        while not stop.is_set():
            during.append(served())

    watcher = threading.Thread(target=legitimate)
    watcher.start()
    try:
        tcp_served, tcp_refused = flood_until_refused(
            lambda: raw_reset(tcp_tunnel.tcp_port, "127.0.0.3"),  # type: ignore[arg-type]
            4 * BURST,
        )
        tls_served, tls_refused = flood_until_refused(
            lambda: tls_reset(relay.port, relay.ca, tls_echo_tunnel.host, "127.0.0.4"), 4 * BURST
        )
    finally:
        stop.set()
        watcher.join(60)
    # Each flooder got its burst (and what the rate refilled meanwhile), then refusals.
    assert BURST <= tcp_served < 4 * BURST, (tcp_served, tcp_refused)
    assert BURST <= tls_served < 4 * BURST, (tls_served, tls_refused)
    assert tcp_refused >= 20 and tls_refused >= 20
    assert during and all(during), during
    # Refused at once, before any stream: still blocked, while another source is served.
    assert not raw_reset(tcp_tunnel.tcp_port, "127.0.0.3")  # type: ignore[arg-type]
    assert raw_reset(tcp_tunnel.tcp_port, "127.0.0.2")  # type: ignore[arg-type]
    status = relay.status()
    assert status["refused_resets_per_source"] >= tcp_refused + tls_refused, status
    metrics = urlopen_text(f"http://127.0.0.1:{relay.admin_port}/metrics")
    match = re.search(r"^tunnels_relay_refused_resets_per_source (\S+)$", metrics, re.M)
    assert match is not None and float(match.group(1)) >= 40, match
    assert relay.proc is not None
    log = relay.proc.text()
    assert "127.0.0.3 resets connections faster than 20/s" in log
    assert "127.0.0.4 resets connections faster than 20/s" in log
    assert log.count("resets too many") <= 2 * 10 + 4  # summarised (RateLog)

    # The agent's one link stayed up throughout: no link lost, no tunnel back.
    assert agent.proc.count(r"link to relay lost") == 0, agent.proc.text()[-2000:]
    assert agent.back_count(tls_tunnel) == 0 and agent.back_count(tcp_tunnel) == 0
    assert agent.proc.count("ENHANCE_YOUR_CALM") == 0
    assert status["agents"] == 1 and status["links"] == 1, status

    now = usage(relay.pid)
    assert now.rss_kib - baseline.rss_kib <= RSS_GROWTH_KIB, (baseline, now)
    assert now.fds - baseline.fds <= FD_GROWTH, (baseline, now)
    assert served()
