"""
Small TCP servers on 127.0.0.1, each connection handled in a thread of this process: stand-ins
for a user's local server in the tests and benchmarks (they are not what is under test).
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
from collections.abc import Callable

__all__ = ["LocalServer", "echo_handler", "http_handler"]

LOOPBACK = "127.0.0.1"


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False


class LocalServer:
    """A threaded TCP server on 127.0.0.1 with a handler function(sock, server)."""

    def __init__(self, handle: Callable[[socket.socket, LocalServer], None]) -> None:
        owner = self
        self.events: list[str] = []

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                with contextlib.suppress(OSError):
                    handle(self.request, owner)

        self.server = _Server((LOOPBACK, 0), Handler)
        self.port: int = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def echo_handler(sock: socket.socket, server: LocalServer) -> None:
    while True:
        data = sock.recv(65536)
        if not data:
            return
        sock.sendall(data)


def http_handler(sock: socket.socket, server: LocalServer) -> None:
    """A tiny HTTP/1.1 server: answers every request with ``ok``, closes after one."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return
        data += chunk
    body = b"ok\n"
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\n" + body)
