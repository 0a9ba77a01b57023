"""
Attacks on the relay's public TLS port that never reach a tunnel: bare-domain connections
held open after their handshake, and silent sockets filling the pending-handshake slots.

Each attack is small (a few hundred sockets at most, from 127.0.0.2-127.0.0.7 as distinct
sources), runs for seconds, measures the relay's RSS and descriptors before, during and
after, and checks that a legitimate curl (from 127.0.0.1) gets through while the attacker's
sockets are still held, and after.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.attacks.harness import AttackWorld
from tests.e2e.harness import wait_for
from tests.e2e.reliability_harness import Group

pytestmark = pytest.mark.e2e

DOMAIN = "tunnel.localhost"
SOURCES = [f"127.0.0.{i}" for i in range(2, 8)]


def connect_from(source: str, port: int) -> socket.socket:
    """A TCP connection to the relay from `source` (a loopback address)."""
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


def bare_domain_tls(source: str, port: int, ca: Path) -> ssl.SSLSocket | None:
    """
    A TLS connection to ``<domain>`` itself with ALPN http/1.1, handshake done, from
    `source`; None when the relay refuses it.
    """
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["http/1.1"])
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(10)
    try:
        # A refused connection may be reset before connect() even returns.
        sock.connect(("127.0.0.1", port))
        tls = context.wrap_socket(sock, server_hostname=DOMAIN)
    except (OSError, ssl.SSLError):
        sock.close()
        return None
    return tls


def wait_closed(socks: list[socket.socket], timeout: float) -> list[float]:
    """
    Wait until the relay has closed every socket of `socks` (EOF or reset); the monotonic
    time each was seen closed.
    """
    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    open_ = set(socks)
    closed_at: list[float] = []
    deadline = time.monotonic() + timeout
    try:
        while open_ and time.monotonic() < deadline:
            for key, _ in sel.select(0.1):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                try:
                    data = s.recv(65536)
                except (BlockingIOError, ssl.SSLWantReadError):
                    continue
                except (OSError, ssl.SSLError):
                    data = b""
                if not data:
                    sel.unregister(s)
                    open_.discard(s)
                    closed_at.append(time.monotonic())
    finally:
        sel.close()
    assert not open_, f"{len(open_)} of {len(socks)} sockets still open after {timeout}s"
    return closed_at


@contextlib.contextmanager
def held(socks: list[socket.socket]) -> Iterator[list[socket.socket]]:
    try:
        yield socks
    finally:
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()


def test_info_page_answers_one_request_and_closes(group: Group) -> None:
    world = AttackWorld(group)
    tls = bare_domain_tls("127.0.0.2", world.relay.port, world.relay.ca)
    assert tls is not None
    with held([tls]):
        request = f"GET / HTTP/1.1\r\nHost: {DOMAIN}\r\n\r\n".encode()
        tls.sendall(request + request)  # a pipelined second request gets nothing
        answer = b""
        tls.settimeout(10)
        with contextlib.suppress(ssl.SSLError, OSError):
            while chunk := tls.recv(65536):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 404 Not Found\r\n"), answer
    assert answer.count(b"HTTP/1.1 ") == 1, answer
    world.relay.wait_status(lambda s: s["pending_handshakes"] == 0, "the info slot given back")


def test_bare_domain_connections_are_counted_and_closed_at_the_deadline(group: Group) -> None:
    """
    Three sources open 40 bare-domain TLS connections each and never send a request: each
    source holds at most its 16 pending slots (the rest are refused at once), nobody else is
    refused, and every one is closed at the handshake deadline.
    """
    timeout, per_source, attempts = 4.0, 16, 40
    world = AttackWorld(
        group,
        extra=[
            "--handshake-timeout",
            str(timeout),
            "--max-pending-handshakes",
            "64",
            "--max-pending-per-source",
            str(per_source),
        ],
    )
    before = world.baseline
    opened_at = time.monotonic()
    socks: list[socket.socket] = []
    refused = 0
    with held(socks):
        for source in SOURCES[:3]:
            for _ in range(attempts):
                tls = bare_domain_tls(source, world.relay.port, world.relay.ca)
                if tls is None:
                    refused += 1
                else:
                    socks.append(tls)
        assert time.monotonic() - opened_at < timeout, "the attack took too long to set up"
        # During: at most 16 per source held, all of them counted as pending.
        kept = 3 * per_source
        status = world.relay.status()
        assert status["pending_handshakes"] <= kept
        during = world.assert_bounded(rss_growth_kib=20 * 1024, fd_growth=kept + 8)
        world.assert_serves()  # with the attacker's sockets still held
        # The relay closes every one at the deadline (a refused one may still be closing).
        closed_at = wait_closed(socks, timeout + 5)
        assert min(closed_at) - opened_at >= timeout * 0.9
        assert refused >= 3 * (attempts - per_source)
        after = world.wait_fds_back()
        world.relay.wait_status(lambda s: s["pending_handshakes"] == 0, "no pending handshakes")
    world.assert_serves()
    print(
        f"\n[attack] bare-domain hold: {len(socks)} held, {refused} refused; "
        f"before {before}, during {during}, after {after}"
    )


def test_silent_sockets_are_evicted_for_newcomers(group: Group) -> None:
    """
    Six sources fill every pending-handshake slot (and more) with silent sockets: the oldest
    silent ones are evicted for newer connections, so a legitimate curl gets through while
    they are held; and all of them are closed at the ClientHello deadline, long before the
    handshake timeout.
    """
    hello_timeout, per_source, slots = 4.0, 16, 64
    world = AttackWorld(
        group,
        extra=[
            "--handshake-timeout",
            "20",
            "--client-hello-timeout",
            str(hello_timeout),
            "--max-pending-handshakes",
            str(slots),
            "--max-pending-per-source",
            str(per_source),
        ],
    )
    before = world.baseline
    opened_at = time.monotonic()
    socks = [
        connect_from(source, world.relay.port) for source in SOURCES for _ in range(per_source)
    ]
    with held(socks):
        # Every slot taken and every surplus socket accepted (each accepted past the slots
        # evicts one): under load the relay may still be accepting when the slots fill.
        status = world.relay.wait_status(
            lambda s: (
                s["pending_handshakes"] == slots
                and s["evicted_silent_handshakes"] >= len(socks) - slots
            ),
            "every slot taken, the surplus evicted",
            timeout=hello_timeout,
        )
        during = world.assert_bounded(rss_growth_kib=20 * 1024, fd_growth=slots + 8)
        # The attacker's sockets are still held: the legitimate client evicts the oldest.
        world.assert_serves(timeout=5)
        assert time.monotonic() - opened_at < hello_timeout, "too slow to test while held"
        assert status["evicted_silent_handshakes"] >= len(socks) - slots
        assert status["refused_handshakes_overload"] == 0
        evicted = world.relay.status()["evicted_silent_handshakes"]
        assert evicted > len(socks) - slots
        # Every silent socket is closed by the ClientHello deadline, not the handshake one.
        closed_at = wait_closed(socks, hello_timeout + 6)
        assert max(closed_at) - opened_at < hello_timeout + 6 < 20
        after = world.wait_fds_back()
        world.relay.wait_status(lambda s: s["pending_handshakes"] == 0, "no pending handshakes")
    world.assert_serves()
    print(
        f"\n[attack] silent slot flood: {len(socks)} sockets, {evicted} evicted; "
        f"before {before}, during {during}, after {after}"
    )


def test_refilled_slots_do_not_lock_out_a_client(group: Group) -> None:
    """
    The attacker keeps the slots full, replacing each socket the relay closes: legitimate
    curls still succeed again and again, and the relay's descriptors stay bounded.
    """
    slots, per_source = 32, 8
    world = AttackWorld(
        group,
        extra=[
            "--handshake-timeout",
            "10",
            "--client-hello-timeout",
            "2",
            "--max-pending-handshakes",
            str(slots),
            "--max-pending-per-source",
            str(per_source),
        ],
    )
    socks: list[socket.socket] = []
    with held(socks):
        for source in SOURCES:
            socks += [connect_from(source, world.relay.port) for _ in range(per_source)]
        world.relay.wait_status(lambda s: s["pending_handshakes"] == slots, "every slot taken")
        served = 0
        started = time.monotonic()
        while time.monotonic() - started < 3.0:
            # Refill: as many fresh silent sockets as the relay closed since the last round.
            closed = [s for s in socks if closed_now(s)]
            for s in closed:
                socks.remove(s)
                s.close()
            for i in range(len(closed)):
                socks.append(connect_from(SOURCES[i % len(SOURCES)], world.relay.port))
            world.assert_serves(timeout=5)
            served += 1
            world.assert_bounded(rss_growth_kib=20 * 1024, fd_growth=slots + 8)
        assert served >= 3
    world.wait_fds_back()
    wait_for(world.serves, "a legitimate client after the attack", 10)


def closed_now(sock: socket.socket) -> bool:
    """Whether the relay has closed `sock` (without waiting)."""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
