"""
How a public TLS client's close reaches the local server, with a real relay and agent: a
client that closes its TCP connection without a TLS close_notify (as curl, browsers and
Python's `ssl` do) has closed cleanly, so the local server reads an end of file; so has one
that sends its close_notify and closes its socket at once (as Go's, asyncio's and Java's
do), though the relay's own close_notify then meets a closed socket and the TCP connection
resets; a client that resets its connection resets the local one too.
"""

from __future__ import annotations

import queue
import socket
import ssl
import struct
import threading
from collections.abc import Iterator

import pytest

from tests.e2e.conftest import World
from tests.e2e.harness import DEADLINE, LOOPBACK, Endpoint, Procs, tls_connect

pytestmark = pytest.mark.e2e


@pytest.fixture
def ends(world: World, procs: Procs) -> Iterator[tuple[Endpoint, queue.Queue[str]]]:
    """A local echo server, forwarded through a TLS tunnel, that says how each connection
    ended: "eof" (the peer's FIN) or "reset"."""
    server = socket.create_server((LOOPBACK, 0))
    server.settimeout(DEADLINE)
    seen: queue.Queue[str] = queue.Queue()

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                try:
                    while data := conn.recv(65536):
                        conn.sendall(data)
                    seen.put("eof")
                except ConnectionResetError:
                    seen.put("reset")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    port = server.getsockname()[1]
    agent = procs.agent(world.relay, [str(port)])
    try:
        yield agent.ready(str(port)), seen
    finally:
        server.shutdown(socket.SHUT_RDWR)  # wakes the accept
        server.close()
        thread.join(DEADLINE)


def _echo_once(world: World, tunnel: Endpoint) -> socket.socket:
    sock = tls_connect(world.relay, tunnel)
    sock.sendall(b"x")
    assert sock.recv(1) == b"x"
    return sock


def test_a_close_without_close_notify_reaches_the_server_as_an_end_of_file(
    world: World, ends: tuple[Endpoint, queue.Queue[str]]
) -> None:
    tunnel, seen = ends
    for _ in range(3):
        # SSLSocket.close() sends no close_notify: only the TCP FIN.
        _echo_once(world, tunnel).close()
        assert seen.get(timeout=DEADLINE) == "eof"


def close_notify_then_close(sock: ssl.SSLSocket) -> None:
    """Send a close_notify and close the socket without waiting for the peer's."""
    sock.setblocking(False)
    try:
        sock.unwrap()
    except ssl.SSLWantReadError:
        pass  # sent; the peer's answer is not awaited
    sock.close()


def test_a_close_notify_then_a_close_reaches_the_server_as_an_end_of_file(
    world: World, ends: tuple[Endpoint, queue.Queue[str]]
) -> None:
    tunnel, seen = ends
    # The relay's answering close_notify reaches a closed socket each time: each of these
    # TCP connections can end with a reset, which must not reach the server.
    for _ in range(20):
        close_notify_then_close(_echo_once(world, tunnel))
        assert seen.get(timeout=DEADLINE) == "eof"


def test_a_reset_reaches_the_server_as_a_reset(
    world: World, ends: tuple[Endpoint, queue.Queue[str]]
) -> None:
    tunnel, seen = ends
    sock = _echo_once(world, tunnel)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    assert seen.get(timeout=DEADLINE) == "reset"
