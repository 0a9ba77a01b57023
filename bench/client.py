"""Raw-TCP load clients, run as ``python -m bench.client`` so they get their own process.

Subcommands print one JSON object:

* ``download HOST PORT --size N --streams K [--sni NAME --ca FILE]``: K parallel streams, each
  receiving N bytes from the data server; ``{"bytes", "seconds", "MBps"}`` (MB = 10^6 bytes;
  the clock runs from before the first connect to after the last byte).
* ``connect HOST PORT --count N [--sni NAME --ca FILE]``: N sequential connections to the echo
  server, each: connect (and TLS handshake), send 1 byte, read it back, close;
  ``{"samples_ms": [...]}``.

``HOST`` must be a loopback address; with ``--sni`` the stream is wrapped in TLS with that
server name, verified against ``--ca``.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import ssl
import threading
import time

from bench.servers import CHUNK, REQUEST

TIMEOUT = 60.0


def _connect(host: str, port: int, sni: str | None, ca: str | None) -> socket.socket:
    if not ipaddress.ip_address(host).is_loopback:
        raise SystemExit(f"refusing non-loopback address {host}")
    sock = socket.create_connection((host, port), timeout=TIMEOUT)
    if sni is None:
        return sock
    ctx = ssl.create_default_context(cafile=ca)
    return ctx.wrap_socket(sock, server_hostname=sni)


def download(
    host: str, port: int, size: int, streams: int, sni: str | None, ca: str | None
) -> dict[str, float]:
    """Receive ``size`` bytes on each of ``streams`` parallel connections."""
    errors: list[BaseException] = []
    received = [0] * streams
    barrier = threading.Barrier(streams + 1)

    def one(i: int) -> None:
        try:
            barrier.wait(TIMEOUT)
            with _connect(host, port, sni, ca) as sock:
                sock.sendall(REQUEST.pack(b"D", size))
                view = memoryview(bytearray(min(CHUNK, 1 << 20) if streams > 1 else CHUNK))
                while received[i] < size:
                    n = sock.recv_into(view)
                    if not n:
                        raise ConnectionError(f"stream {i}: closed after {received[i]} bytes")
                    received[i] += n
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    barrier.wait(TIMEOUT)
    start = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    if errors:
        raise SystemExit(f"{len(errors)} stream(s) failed: {errors[0]!r}")
    total = sum(received)
    return {"bytes": total, "seconds": seconds, "MBps": total / seconds / 1e6}


def connect(
    host: str, port: int, count: int, sni: str | None, ca: str | None
) -> dict[str, list[float]]:
    """Time ``count`` sequential connect + 1-byte echo round trips, in milliseconds."""
    samples: list[float] = []
    for _ in range(count):
        start = time.perf_counter()
        with _connect(host, port, sni, ca) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(b"x")
            if sock.recv(1) != b"x":
                raise SystemExit("echo server answered wrongly")
        samples.append((time.perf_counter() - start) * 1000)
    return {"samples_ms": samples}


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("download", "connect"):
        p = sub.add_parser(name)
        p.add_argument("host")
        p.add_argument("port", type=int)
        p.add_argument("--sni")
        p.add_argument("--ca")
    sub.choices["download"].add_argument("--size", type=int, required=True)
    sub.choices["download"].add_argument("--streams", type=int, default=1)
    sub.choices["connect"].add_argument("--count", type=int, default=1000)
    a = parser.parse_args(argv)
    if a.cmd == "download":
        out: object = download(a.host, a.port, a.size, a.streams, a.sni, a.ca)
    else:
        out = connect(a.host, a.port, a.count, a.sni, a.ca)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
