"""
Attacks on who owns what, against a real relay process: public connections that reach the
target before their TLS handshake ends, public clients that leave while their target does
not read, and reclaims of tunnels that are live or belong to another token.
"""

from __future__ import annotations

import contextlib
import fcntl
import socket
import ssl
import struct
import termios
import threading
import time
from pathlib import Path
from typing import Any

from tests.attacks.harness import AttackWorld
from tests.attacks.rawlink import CONTROL, PING, RawLink, frame
from tests.clientcerts import make_client_pki
from tests.e2e.harness import wait_for
from tests.e2e.reliability_harness import LOOPBACK, Group, LocalServer

TOKEN_A = "token-alice-0123456789"
TOKEN_B = "token-bob-0123456789ab"


def _tokens(group: Group) -> list[str]:
    path = group.dir / "tokens.txt"
    path.write_text(f"{TOKEN_A}\n{TOKEN_B}\n")
    return ["--tokens", str(path)]


def _hold(sock: socket.socket, server: LocalServer) -> None:
    """A target that accepts, counts, and never reads (until the client side goes)."""
    server.events.append("accepted")
    with contextlib.suppress(OSError):
        sock.settimeout(60)
        # Block on something that never comes: a read of zero octets would return at once.
        threading.Event().wait(60)


def _client_hello(server_name: str) -> bytes:
    """The first flight of a TLS client for `server_name`, and nothing after."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


# ---------------------------------------------------------------------------------------------
# Item 6: no stream before the handshake (and its client-certificate check) completed


def test_bare_hellos_and_failed_client_certs_reach_no_local_server(
    group: Group, tmp_path: Path
) -> None:
    world = AttackWorld(group)
    target = LocalServer(_hold)
    group.cleanups.append(target.close)
    pki = make_client_pki(tmp_path / "pki", "ours")
    agent = group.agent(world.relay, [str(target.port)], extra=["--client-ca", str(pki.ca)])
    tunnel = agent.ready(target.port)
    hello = _client_hello(tunnel.host)

    bare = []
    for _ in range(20):
        sock = socket.create_connection((LOOPBACK, world.relay.port), timeout=5)
        sock.sendall(hello)
        bare.append(sock)
    # Every one got the relay's ServerHello flight: each was routed to the tunnel and its
    # TLS layer ran (the old code had opened its stream by then).
    for sock in bare:
        assert sock.recv(5)[:1] == b"\x16", "no ServerHello"
    # Full handshakes without a certificate: refused by the client-certificate check.
    refused = 0
    ctx = ssl.create_default_context(cafile=str(world.relay.ca))
    for _ in range(20):
        raw = socket.create_connection((LOOPBACK, world.relay.port), timeout=5)
        try:
            with ctx.wrap_socket(raw, server_hostname=tunnel.host) as tls:
                tls.sendall(b"GET / HTTP/1.1\r\n\r\n")
                tls.recv(1)
        except (ssl.SSLError, OSError):
            refused += 1
        finally:
            raw.close()
    assert refused == 20
    # A client with the certificate gets through: the target sees exactly that one.
    ctx.load_cert_chain(str(pki.cert), str(pki.key))
    with (
        socket.create_connection((LOOPBACK, world.relay.port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=tunnel.host) as tls,
    ):
        tls.sendall(b"x")
        wait_for(lambda: target.events.count("accepted") >= 1, "the legitimate client", 10)
    assert target.events.count("accepted") == 1, target.events
    for sock in bare:
        sock.close()
    world.assert_serves()
    world.wait_fds_back()
    world.assert_bounded(rss_growth_kib=20_000, fd_growth=8)


# ---------------------------------------------------------------------------------------------
# Item 7: clients that leave while paused are noticed


def _unsent(sock: Any) -> int:
    """Octets in `sock`'s send queue not yet acknowledged by the relay's kernel."""
    out = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
    return int(struct.unpack("i", out)[0])


def _relay_unread(relay_port: int, client_port: int) -> int | None:
    """Octets the relay's kernel holds unread for the client at `client_port` (/proc)."""
    want_local, want_remote = f"{relay_port:04X}", f"{client_port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[1].endswith(":" + want_local) and fields[2].endswith(":" + want_remote):
                    return int(fields[4].split(":")[1], 16)
    return None


def _fill(sock: Any, relay_port: int, deadline: float) -> int:
    """
    Send into `sock` until the relay stops reading it (the target does not read, so the
    relay paused it): after a chunk has reached the relay's kernel, what it holds unread
    stays. Nothing remains in our own send queue then, so a FIN we send reaches the relay.
    """
    client_port = sock.getsockname()[1]
    chunk = b"\0" * (512 * 1024)
    sent = 0
    while time.monotonic() < deadline:
        sock.sendall(chunk)
        sent += len(chunk)
        wait_for(lambda: _unsent(sock) == 0, "the chunk at the relay", 5)
        held = time.monotonic() + 0.5
        while (unread := _relay_unread(relay_port, client_port)) and time.monotonic() < held:
            time.sleep(0.02)  # sampling the kernel's queue, not waiting for the outcome
        if unread:
            return sent
    raise AssertionError(f"the relay never paused the client ({sent} octets sent)")


def test_clients_that_leave_a_non_reading_target_are_noticed(group: Group) -> None:
    world = AttackWorld(group)
    tls_target, tcp_target = LocalServer(_hold), LocalServer(_hold)
    group.cleanups += [tls_target.close, tcp_target.close]
    agent = world.start_agent([str(tls_target.port), f"{tcp_target.port}:tcp"])
    tls_tunnel = agent.ready(tls_target.port)
    tcp_tunnel = agent.ready(tcp_target.port)
    assert tcp_tunnel.tcp_port is not None
    baseline = world.relay.status()["public_connections"]
    ctx = ssl.create_default_context(cafile=str(world.relay.ca))

    clients: list[tuple[str, Any]] = []
    for i in range(6):
        raw = socket.create_connection((LOOPBACK, world.relay.port), timeout=5)
        tls = ctx.wrap_socket(raw, server_hostname=tls_tunnel.host)
        clients.append(("tls-fin" if i % 2 else "tls-rst", tls))
    for _ in range(3):
        raw = socket.create_connection((LOOPBACK, tcp_tunnel.tcp_port), timeout=5)
        clients.append(("tcp-rst", raw))
    deadline = time.monotonic() + 60
    for _, sock in clients:
        port = world.relay.port if isinstance(sock, ssl.SSLSocket) else tcp_tunnel.tcp_port
        assert _fill(sock, port, deadline) > 0
    world.relay.wait_status(
        lambda s: s["public_connections"] >= baseline + len(clients), "every client open", 10
    )
    left_at = time.monotonic()
    for kind, sock in clients:
        if kind.endswith("rst"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        else:
            sock.shutdown(socket.SHUT_WR)  # a FIN behind everything the relay has not read
    world.relay.wait_status(
        lambda s: s["public_connections"] == baseline, "the paused clients noticed", 5
    )
    noticed = time.monotonic() - left_at
    assert noticed < 4, noticed
    for kind, sock in clients:
        if kind == "tls-fin":
            sock.close()
    world.wait_fds_back(timeout=10)
    world.assert_serves()
    world.assert_bounded(rss_growth_kib=40_000, fd_growth=8)


# ---------------------------------------------------------------------------------------------
# Item 9: reclaims


class PingAnswerer:
    """Owns a raw link on a thread: answers every PING, keeps control messages."""

    def __init__(self, link: RawLink) -> None:
        self.link = link
        self.controls: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                f = self.link.recv_frame(timeout=0.2)
            except TimeoutError:
                continue
            except OSError:
                return
            if f is None:
                return
            if f.kind == PING and not f.flags & 1:
                self.link.send(frame(PING, 0, f.payload, 1))
            elif f.kind == CONTROL:
                self.controls.append(f.json())

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(5)


def test_reclaims_across_tokens_and_of_live_holders_are_refused(group: Group) -> None:
    world = AttackWorld(group, extra=_tokens(group), token=TOKEN_A)
    with RawLink(world.relay.port, world.relay.ca) as first:
        assert first.handshake(TOKEN_A)["type"] == "welcome"
        granted = first.request(1, "tls")
        assert granted["type"] == "tunnel_granted", granted
        tunnel_id, secret = granted["tunnel_id"], granted["secret"]
    # The first link is gone; the tunnel is offline, its secret genuine.
    world.relay.wait_status(lambda s: s["links"] == 1, "the first raw link gone", 10)
    with RawLink(world.relay.port, world.relay.ca) as other:
        assert other.handshake(TOKEN_B)["type"] == "welcome"
        answer = other.request(1, "tls", reclaim_id=tunnel_id, reclaim_secret=secret)
        assert answer["type"] == "tunnel_refused", answer
        assert answer["code"] == "reclaim_refused"

    # A live holder (it answers pings) keeps its tunnel against the same token's reclaim.
    holder_link = RawLink(world.relay.port, world.relay.ca)
    group.cleanups.append(holder_link.close)
    assert holder_link.handshake(TOKEN_A)["type"] == "welcome"
    held = holder_link.request(1, "tls", reclaim_id=tunnel_id, reclaim_secret=secret)
    assert held["type"] == "tunnel_granted" and held["tunnel_id"] == tunnel_id, held
    holder = PingAnswerer(holder_link)
    group.cleanups.append(holder.stop)
    for attempt in range(5):
        with RawLink(world.relay.port, world.relay.ca) as rival:
            assert rival.handshake(TOKEN_A)["type"] == "welcome"
            started = time.monotonic()
            answer = rival.request(1, "tls", reclaim_id=tunnel_id, reclaim_secret=secret)
            assert answer["type"] == "tunnel_refused", (attempt, answer)
            assert answer["code"] == "reclaim_refused"
            assert time.monotonic() - started < 1.0
        world.assert_serves()
    assert not [m for m in holder.controls if m["type"] == "tunnel_closed"], holder.controls
    assert "refused a reclaim" in world.log()

    # A silent holder (it stops reading) loses the tunnel within about a second.
    holder.stop()
    started = time.monotonic()
    with RawLink(world.relay.port, world.relay.ca) as heir:
        assert heir.handshake(TOKEN_A)["type"] == "welcome"
        answer = heir.request(1, "tls", reclaim_id=tunnel_id, reclaim_secret=secret)
        elapsed = time.monotonic() - started
        assert answer["type"] == "tunnel_granted" and answer["tunnel_id"] == tunnel_id, answer
        assert 0.9 <= elapsed < 2.5, elapsed
        world.assert_serves()
    holder_link.close()
    world.assert_serves()
    world.wait_fds_back()
    world.assert_bounded(rss_growth_kib=20_000, fd_growth=8)
