"""
Raw TCP tunnels end to end: bytes as they are, through the relay's TCP port, with nc, socat
and Python sockets on loopback.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct

import pytest

from tests.e2e.conftest import BIG, SINK_REPLY, World
from tests.e2e.harness import DEADLINE, LOOPBACK, recv_all, require_tool, run

pytestmark = pytest.mark.e2e


def expected_sink_reply(data_sha: str) -> bytes:
    block = data_sha.encode() * 1024
    reply = bytearray(data_sha.encode() + b"\n")
    left = SINK_REPLY
    while left > 0:
        n = min(left, len(block))
        reply += block[:n]
        left -= n
    return bytes(reply)


def test_tcp_socket_is_on_the_relay(world: World):
    # The agent reports tcp://tunnel.localhost:N; N is a port the relay listens on.
    assert world.echo_tcp.tcp_port is not None
    assert world.echo_tcp.tcp_port != world.relay.port
    with socket.create_connection((LOOPBACK, world.echo_tcp.tcp_port), timeout=DEADLINE) as s:
        s.sendall(b"ping")
        assert s.recv(4) == b"ping"


def test_nc_through_tcp_tunnel(world: World):
    nc = require_tool("nc")
    message = b"hello through nc\n" * 100
    result = run(
        [nc, "-N", "-w", "10", LOOPBACK, str(world.echo_tcp.tcp_port)], input=message, timeout=30
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == message


def test_socat_through_tcp_tunnel(world: World):
    socat = require_tool("socat")
    # Large enough to back up the local connection; socat half-closes after stdin's EOF
    # and ends when the echo server closes. A lost FIN would leave socat waiting until its
    # -t bound (60 s here, past run()'s 30 s deadline): the run would fail, not pass.
    message = os.urandom(256 * 1024)
    result = run(
        [socat, "-t", "60", "-T", "60", "-", f"TCP:{LOOPBACK}:{world.echo_tcp.tcp_port}"],
        input=message,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr.decode()
    assert hashlib.sha256(result.stdout).hexdigest() == hashlib.sha256(message).hexdigest()
    assert len(result.stdout) == len(message)


def test_upload_64_mib(world: World):
    """64 MiB up, length-prefixed (so it does not depend on half-close), hashed by the server."""
    digest = hashlib.sha256()
    with socket.create_connection((LOOPBACK, world.counted_sink_tcp.tcp_port), timeout=60) as s:
        s.sendall(struct.pack("!Q", BIG))
        with open(world.big, "rb") as f:
            while chunk := f.read(1 << 20):
                s.sendall(chunk)
                digest.update(chunk)
        reply = recv_all(s, limit=SINK_REPLY + 1024)
    assert digest.hexdigest() == world.big_sha
    line, _, rest = reply.partition(b"\n")
    assert line.decode() == world.big_sha
    assert len(rest) == SINK_REPLY


def test_download_64_mib(world: World):
    digest = hashlib.sha256()
    size = 0
    with socket.create_connection((LOOPBACK, world.send_tcp.tcp_port), timeout=60) as s:
        while size <= BIG:
            data = s.recv(1 << 20)
            if not data:
                break
            digest.update(data)
            size += len(data)
    assert size == BIG
    assert digest.hexdigest() == world.big_sha


def test_half_close_then_whole_response(world: World):
    """The client shuts down its sending side; the server reads to EOF, then replies 8 MiB."""
    request = b"GET me everything\r\n" * 1000
    with socket.create_connection((LOOPBACK, world.sink_tcp.tcp_port), timeout=60) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        reply = recv_all(s, limit=SINK_REPLY + 1024)
    assert reply == expected_sink_reply(hashlib.sha256(request).hexdigest())


def test_half_close_with_nc(world: World):
    nc = require_tool("nc")
    request = b"request via nc -N\n"
    result = run(
        [nc, "-N", "-w", "20", LOOPBACK, str(world.sink_tcp.tcp_port)], input=request, timeout=60
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == expected_sink_reply(hashlib.sha256(request).hexdigest())


def test_half_close_after_upload_to_a_slow_reader(world: World):
    """
    2 MiB up to a server that reads slowly, then SHUT_WR: the server must see EOF (and
    reply). Found by the 64 MiB upload, where it happened about one time in three.
    """
    request = os.urandom(2 * 1024 * 1024)
    with socket.create_connection((LOOPBACK, world.slow_sink_tcp.tcp_port), timeout=10) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        try:
            reply = recv_all(s, limit=SINK_REPLY + 1024)
        except TimeoutError:
            raise AssertionError(
                "no reply within 10 s: the server never saw the client's half-close"
            ) from None
    assert reply == expected_sink_reply(hashlib.sha256(request).hexdigest())
