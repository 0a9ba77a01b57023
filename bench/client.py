"""Raw-TCP load clients, run as ``python -m bench.client`` so they get their own process.

Subcommands print one JSON object:

* ``download HOST PORT --size N --streams K [--sni NAME --ca FILE]``: K parallel streams, each
  receiving N bytes from the data server; ``{"bytes", "seconds", "MBps"}`` (MB = 10^6 bytes;
  the clock runs from before the first connect to after the last byte).
* ``connect HOST PORT --count N [--sni NAME --ca FILE] [--resume]``: N sequential connections
  to the echo server, each: connect (and TLS handshake), send 1 byte, read it back, close;
  ``{"samples_ms": [...], "reused": R}``. With ``--resume`` each TLS connection offers the
  session of the one before (a returning client: TLS 1.3 tickets, TLS 1.2 tickets or ids);
  one more connection first makes the first session, untimed; R counts the connections whose
  session the server resumed.
* ``rate HOST PORT --seconds S --concurrency C [--sni NAME --ca FILE] [--resume]``: C threads,
  each opening connections one after another for S seconds as ``connect`` does (a new
  connection, TLS handshake included, per 1-byte echo); ``{"connections", "seconds",
  "per_second", "reused", "samples_ms"}``. Without ``--resume`` every handshake is a full
  one (no session is offered).

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


def _connect(
    host: str,
    port: int,
    sni: str | None,
    ca: str | None,
    ctx: ssl.SSLContext | None = None,
    session: ssl.SSLSession | None = None,
) -> socket.socket:
    if not ipaddress.ip_address(host).is_loopback:
        raise SystemExit(f"refusing non-loopback address {host}")
    sock = socket.create_connection((host, port), timeout=TIMEOUT)
    if sni is None:
        return sock
    if ctx is None:
        ctx = ssl.create_default_context(cafile=ca)
    return ctx.wrap_socket(sock, server_hostname=sni, session=session)


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
    host: str, port: int, count: int, sni: str | None, ca: str | None, resume: bool = False
) -> dict[str, list[float] | int]:
    """Time ``count`` sequential connect + 1-byte echo round trips, in milliseconds; with
    `resume`, each TLS connection offers the previous one's session (see the module
    docstring)."""
    samples: list[float] = []
    ctx = ssl.create_default_context(cafile=ca) if sni is not None else None
    session: ssl.SSLSession | None = None
    reused = 0
    for i in range(count + 1 if resume else count):
        start = time.perf_counter()
        with _connect(host, port, sni, ca, ctx, session) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(b"x")
            if sock.recv(1) != b"x":
                raise SystemExit("echo server answered wrongly")
            if isinstance(sock, ssl.SSLSocket):
                reused += sock.session_reused
                if resume:
                    # Read after the echo, a TLS 1.3 session holds the server's ticket.
                    session = sock.session
        if resume and i == 0:
            reused = 0  # the connection that made the first session is not counted
            continue
        samples.append((time.perf_counter() - start) * 1000)
    return {"samples_ms": samples, "reused": reused}


def rate(
    host: str,
    port: int,
    seconds: float,
    concurrency: int,
    sni: str | None,
    ca: str | None,
    resume: bool = False,
) -> dict[str, object]:
    """New connections per second from ``concurrency`` threads for ``seconds``, each
    connection a connect (+ TLS handshake) and a 1-byte echo; also their latencies (ms)."""
    ctx = ssl.create_default_context(cafile=ca) if sni is not None else None
    errors: list[BaseException] = []
    counts = [0] * concurrency
    reused = [0] * concurrency
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    barrier = threading.Barrier(concurrency + 1)
    deadline = [0.0]

    def one(i: int) -> None:
        session: ssl.SSLSession | None = None
        try:
            barrier.wait(TIMEOUT)
            while time.perf_counter() < deadline[0]:
                start = time.perf_counter()
                with _connect(host, port, sni, ca, ctx, session) as sock:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sock.sendall(b"x")
                    if sock.recv(1) != b"x":
                        raise ConnectionError("echo server answered wrongly")
                    if isinstance(sock, ssl.SSLSocket):
                        reused[i] += sock.session_reused
                        if resume:
                            session = sock.session
                latencies[i].append((time.perf_counter() - start) * 1000)
                counts[i] += 1
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    start = time.perf_counter()
    deadline[0] = start + seconds
    barrier.wait(TIMEOUT)
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise SystemExit(f"{len(errors)} client(s) failed: {errors[0]!r}")
    total = sum(counts)
    return {
        "connections": total,
        "seconds": elapsed,
        "per_second": total / elapsed,
        "reused": sum(reused),
        "samples_ms": [x for xs in latencies for x in xs],
    }


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("download", "connect", "rate"):
        p = sub.add_parser(name)
        p.add_argument("host")
        p.add_argument("port", type=int)
        p.add_argument("--sni")
        p.add_argument("--ca")
    sub.choices["download"].add_argument("--size", type=int, required=True)
    sub.choices["download"].add_argument("--streams", type=int, default=1)
    sub.choices["connect"].add_argument("--count", type=int, default=1000)
    sub.choices["connect"].add_argument("--resume", action="store_true")
    sub.choices["rate"].add_argument("--seconds", type=float, default=5.0)
    sub.choices["rate"].add_argument("--concurrency", type=int, default=32)
    sub.choices["rate"].add_argument("--resume", action="store_true")
    a = parser.parse_args(argv)
    if a.cmd == "download":
        out: object = download(a.host, a.port, a.size, a.streams, a.sni, a.ca)
    elif a.cmd == "connect":
        out = connect(a.host, a.port, a.count, a.sni, a.ca, a.resume)
    else:
        out = rate(a.host, a.port, a.seconds, a.concurrency, a.sni, a.ca, a.resume)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
