"""
Per-party shares against a real relay process: one token churning TCP tunnels, hammering
tunnel requests or opening link after link; one address holding a tunnel's connections; a
flood of refused handshakes with 10 KB names. Each time another party keeps being served,
and the relay's memory, descriptors and log stay bounded.
"""

from __future__ import annotations

import re
import socket
import ssl
import struct
import threading
import time
from pathlib import Path
from typing import Any

from tests.attacks.harness import AttackWorld
from tests.attacks.rawlink import CONTROL, GOAWAY, Frame, RawLink, control_frame, goaway_code
from tests.e2e.harness import tcp_port_range, wait_for
from tests.e2e.reliability_harness import (
    Group,
    LocalServer,
    echo_handler,
    echo_roundtrip,
)

ATTACKER, VICTIM = "attacker-token-0123456789", "victim-token-0123456789"

# Every bound is generous: they catch a leak, not noise.
RSS_GROWTH_KIB = 64 * 1024
FD_GROWTH = 64


def tokens_file(group: Group) -> str:
    path = Path(group.dir) / "tokens.txt"
    path.write_text(f"{ATTACKER}\n{VICTIM}\n")
    path.chmod(0o600)
    return str(path)


def answer_to(link: RawLink, request_id: int, timeout: float = 10.0) -> dict[str, Any]:
    """The relay's answer to request `request_id` (skipping ``tunnel_closed`` and the like)."""
    deadline = time.monotonic() + timeout
    while True:
        message = link.control(max(0.01, deadline - time.monotonic()))
        if message.get("request_id") == request_id:
            return message


def request(link: RawLink, request_id: int, kind: str) -> dict[str, Any]:
    message = {"type": "tunnel_request", "request_id": request_id, "kind": kind}
    link.send(control_frame(message))
    return answer_to(link, request_id)


def test_tcp_churn_of_one_token_leaves_ports_to_the_others(group: Group) -> None:
    low = tcp_port_range()[0]
    world = AttackWorld(
        group,
        extra=[
            "--tokens",
            tokens_file(group),
            "--tcp-ports",
            f"{low}-{low + 99}",
            # Fast enough to cycle the range three times in seconds: the share is the bound
            # under test, not the request rate.
            "--tunnel-request-rate",
            "1000",
            "--tunnel-request-burst",
            "1000",
            "--token-request-rate",
            "1000",
            "--token-request-burst",
            "1000",
        ],
        token=VICTIM,
    )
    echo = LocalServer(echo_handler)
    group.cleanups.append(echo.close)
    stop = threading.Event()
    cycles = [0]
    errors: list[BaseException] = []

    def churn() -> None:
        try:
            with RawLink(world.relay.port, world.relay.ca) as link:
                assert link.handshake(ATTACKER)["type"] == "welcome"
                n = 0
                while not stop.is_set() and n < 300:
                    n += 1
                    answer = request(link, n, "tcp")
                    assert answer["type"] == "tunnel_granted", answer
                    link.send(
                        control_frame({"type": "tunnel_close", "tunnel_id": answer["tunnel_id"]})
                    )
                    cycles[0] = n
        except BaseException as e:  # reported by the test thread
            errors.append(e)

    thread = threading.Thread(target=churn, daemon=True)
    thread.start()
    try:
        wait_for(lambda: cycles[0] >= 150 or errors, "the attacker to cycle 150 TCP tunnels", 30)
        # During the churn: another token's agent gets a raw TCP port, and it works.
        during = world.start_agent([f"{echo.port}:tcp"], token=VICTIM)
        tunnel = during.ready(echo.port)
        assert tunnel.tcp_port is not None
        with socket.create_connection(("127.0.0.1", tunnel.tcp_port), timeout=10) as sock:
            assert echo_roundtrip(sock)
    finally:
        stop.set()
        thread.join(30)
    assert not errors, errors
    assert cycles[0] >= 150
    status = world.relay.status()
    assert status["tcp_ports_quarantined"] <= 10 + 1, status
    assert status["tcp_ports_released_early"] >= 100, status
    # After it: still ports for others.
    with RawLink(world.relay.port, world.relay.ca) as link:
        assert link.handshake(VICTIM)["type"] == "welcome"
        for n in range(1, 21):
            assert request(link, n, "tcp")["type"] == "tunnel_granted"
    world.assert_serves()
    world.assert_bounded(RSS_GROWTH_KIB, FD_GROWTH)
    world.wait_fds_back(slack=8 + 2)


def test_hammering_tunnel_requests_is_refused_then_ended(group: Group) -> None:
    world = AttackWorld(
        group,
        extra=["--tokens", tokens_file(group), "--tunnel-request-burst", "20"],
        token=VICTIM,
    )
    with RawLink(world.relay.port, world.relay.ca) as link:
        assert link.handshake(ATTACKER)["type"] == "welcome"
        # One request after another, as fast as the answers come, refusals or not.
        frames: list[Frame] = []
        for n in range(1, 201):
            link.send(control_frame({"type": "tunnel_request", "request_id": n, "kind": "tls"}))
            frame = link.recv_frame()
            while frame is not None and frame.kind != CONTROL:
                frames.append(frame)
                frame = link.recv_frame()
            if frame is None:
                break
            frames.append(frame)
        frames += link.until_closed(timeout=15)
    answers = [f.json() for f in frames if f.kind == CONTROL]
    granted = [a for a in answers if a["type"] == "tunnel_granted"]
    refused = [a for a in answers if a["type"] == "tunnel_refused"]
    assert 20 <= len(granted) <= 30, len(granted)
    assert len(refused) >= 32
    assert refused and all(a["code"] == "limit" and "slow down" in a["message"] for a in refused)
    assert goaway_code(frames) == 0x8  # ENHANCE_YOUR_CALM
    assert world.relay.status()["refused_tunnel_requests_rate"] >= len(refused)
    world.assert_serves()
    # Another agent of the same relay still gets tunnels at once.
    with RawLink(world.relay.port, world.relay.ca) as other:
        assert other.handshake(VICTIM)["type"] == "welcome"
        assert request(other, 1, "tls")["type"] == "tunnel_granted"


def test_links_per_token_are_bounded(group: Group) -> None:
    world = AttackWorld(
        group, extra=["--tokens", tokens_file(group), "--max-links-per-token", "8"], token=VICTIM
    )
    links = [RawLink(world.relay.port, world.relay.ca) for _ in range(8)]
    try:
        for link in links:
            assert link.handshake(ATTACKER)["type"] == "welcome"
        # (Quickly: these raw links answer no keepalive, so the relay ends them in 15 s.)
        for _ in range(5):
            with RawLink(world.relay.port, world.relay.ca) as over:
                answer = over.handshake(ATTACKER)
                assert answer["type"] == "error" and answer["code"] == "limit", answer
                assert goaway_code(until_goaway(over)) == 0x8
        status = world.relay.status()
        assert status["refused_links_per_token"] == 5
        assert status["agents"] == 8 + 1
        # The other token's agents are not counted against it.
        world.assert_serves()
        with RawLink(world.relay.port, world.relay.ca) as victim:
            assert victim.handshake(VICTIM)["type"] == "welcome"
        world.assert_bounded(RSS_GROWTH_KIB, FD_GROWTH)
    finally:
        for link in links:
            link.close()
    world.wait_fds_back()


def until_goaway(link: RawLink) -> list[Frame]:
    """Frames up to the relay's GOAWAY (or the end of the connection)."""
    frames: list[Frame] = []
    while (frame := link.recv_frame()) is not None:
        frames.append(frame)
        if frame.kind == GOAWAY:
            break
    return frames


def idle_tls(port: int, ca: Path, host: str, source: str) -> ssl.SSLSocket | None:
    """A TLS connection to tunnel `host` from `source`, left idle; None when refused."""
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.bind((source, 0))
    raw.settimeout(10)
    try:
        raw.connect(("127.0.0.1", port))
        ctx = ssl.create_default_context(cafile=str(ca))
        sock = ctx.wrap_socket(raw, server_hostname=host)
        # A refused connection is aborted at once: reading shows it.
        sock.settimeout(0.2)
        try:
            if sock.recv(1) == b"":
                sock.close()
                return None
        except TimeoutError:
            pass
        sock.settimeout(10)
        return sock
    except OSError:
        raw.close()
        return None


def test_one_address_cannot_take_a_tunnel(group: Group) -> None:
    world = AttackWorld(
        group, extra=["--max-connections-per-tunnel", "48", "--max-connections-per-source", "16"]
    )
    held: list[ssl.SSLSocket] = []
    try:
        for _ in range(64):
            sock = idle_tls(world.relay.port, world.relay.ca, world.tunnel.host, "127.0.0.2")
            if sock is not None:
                held.append(sock)
        status = world.relay.wait_status(
            lambda s: s["refused_connections_per_source"] >= 64 - 16, "per-source refusals"
        )
        assert len(held) == 16, len(held)
        assert status["public_connections"] <= 16 + 1, status
        # The legitimate client (127.0.0.1) still gets through.
        for _ in range(3):
            world.assert_serves()
        metrics = urlopen_text(f"http://127.0.0.1:{world.relay.admin_port}/metrics")
        match = re.search(r"^tunnels_relay_refused_connections_per_source (\S+)$", metrics, re.M)
        assert match is not None and float(match.group(1)) >= 48
        world.assert_bounded(RSS_GROWTH_KIB, FD_GROWTH + 16)
    finally:
        for sock in held:
            sock.close()
    world.wait_fds_back()
    world.assert_serves()


def urlopen_text(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as r:
        text: str = r.read().decode()
        return text


def long_sni_hello(name: bytes) -> bytes:
    """A TLS 1.2-style ClientHello record(s) naming `name` (up to the parser's 16 KiB)."""

    def vec(width: int, data: bytes) -> bytes:
        return len(data).to_bytes(width, "big") + data

    server_name = struct.pack("!H", 0) + vec(2, vec(2, b"\x00" + vec(2, name)))
    body = struct.pack("!H", 0x0303) + bytes(32) + vec(1, b"") + vec(2, b"\x13\x01\xc0\x2b")
    body += vec(1, b"\x00") + vec(2, server_name)
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    out = b""
    for i in range(0, len(message), 2**14):
        chunk = message[i : i + 2**14]
        out += struct.pack("!BHH", 22, 0x0301, len(chunk)) + chunk
    return out


def test_refused_flood_with_long_names_keeps_the_log_small(group: Group) -> None:
    world = AttackWorld(group)
    hello = long_sni_hello(b"x" * 10_000 + b".unknown.example")
    before = world.relay.proc.size() if world.relay.proc else 0
    count = 3000
    done = [0]

    def flood(n: int) -> None:
        for _ in range(n):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.3", 0))
                s.settimeout(10)
                s.connect(("127.0.0.1", world.relay.port))
                s.sendall(hello)
                try:
                    while s.recv(4096):
                        pass
                except OSError:
                    pass
            done[0] += 1

    threads = [threading.Thread(target=flood, args=(count // 4,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert done[0] == count
    during = world.usage()
    # The summary of what was left out comes at the end of the interval.
    assert world.relay.proc is not None
    world.relay.proc.wait_log(r"TLS front refused \(no route\): … and [\d,]+ more in the last 10 s")
    grown = world.relay.proc.size() - before
    assert grown < 64 * 1024, f"the relay's log grew {grown} octets for {count} refusals"
    assert "x" * 200 not in world.log()
    world.assert_serves()
    world.assert_bounded(RSS_GROWTH_KIB, FD_GROWTH)
    assert during.fds - world.baseline.fds <= FD_GROWTH
