"""Loopback TCP servers the raw-TCP measurements talk to.

Run as ``python -m bench.servers`` (a separate process, so its CPU is not the forwarders'):
prints one JSON line ``{"data": PORT, "echo": PORT}`` once both listen on 127.0.0.1.

* **data** (source/sink): the client sends a 9-byte request, ``b"D"`` or ``b"U"`` followed by
  a big-endian 64-bit byte count.  ``D``: the server sends that many bytes and closes.
  ``U``: the server reads that many bytes and answers ``b"K"``.  One thread per connection,
  4 MiB ``sendall``/``recv_into`` buffers: several GB/s on loopback, so never the bottleneck.
* **echo**: writes back whatever it reads.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import threading
from collections.abc import Callable

CHUNK = 4 << 20
REQUEST = struct.Struct("!cQ")
_ZEROS = memoryview(bytes(CHUNK))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            raise ConnectionError("peer closed")
        buf += part
    return bytes(buf)


def _serve_data(sock: socket.socket) -> None:
    with sock:
        try:
            op, size = REQUEST.unpack(_recv_exact(sock, REQUEST.size))
            if op == b"D":
                while size > 0:
                    n = min(size, CHUNK)
                    sock.sendall(_ZEROS[:n])
                    size -= n
            elif op == b"U":
                buf = bytearray(CHUNK)
                view = memoryview(buf)
                while size > 0:
                    n = sock.recv_into(view, min(size, CHUNK))
                    if not n:
                        return
                    size -= n
                sock.sendall(b"K")
        except OSError:
            return


def _serve_echo(sock: socket.socket) -> None:
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while data := sock.recv(65536):
                sock.sendall(data)
        except OSError:
            return


def _accept_loop(listener: socket.socket, handler: Callable[[socket.socket], None]) -> None:
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handler, args=(conn,), daemon=True).start()


def _listen(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(1024)
    return s


def main(argv: list[str] | None = None) -> None:
    """Start the data and echo servers and serve until killed."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-port", type=int, default=0)
    parser.add_argument("--echo-port", type=int, default=0)
    args = parser.parse_args(argv)
    data, echo = _listen(args.data_port), _listen(args.echo_port)
    threading.Thread(target=_accept_loop, args=(echo, _serve_echo), daemon=True).start()
    print(json.dumps({"data": data.getsockname()[1], "echo": echo.getsockname()[1]}), flush=True)
    sys.stdout.flush()
    _accept_loop(data, _serve_data)


if __name__ == "__main__":
    main()
