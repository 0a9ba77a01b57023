"""
A rate-limited download through a real relay: its throughput, and the relay's memory.

    python -m bench.ratelimit [--rate 10MB/s] [--size 100MB] [--kind tcp|tls]

Starts a development relay (``twistd tunnelrelay``), a local server (a thread of this
process) that sends ``--size`` octets to each connection, and ``twistd tunnelagent``
forwarding it with ``:rate=RATE``; then downloads once through the tunnel (a raw TCP port,
or TLS with SNI), sampling the relay's RSS (VmRSS) every 50 ms. Prints the download's
rate (octets over the time from the first to the last octet, and from connect), the
relay's RSS before and at its peak, and whether the rate is within 5 % of the limit.
Exit status 1 if not, or if the relay's RSS grew by more than a quarter of the file.

Not part of ``make bench`` (it takes size / rate seconds). Loopback only; every process
started here is ended by PID.
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import sys
import tempfile
import time
from pathlib import Path

from tunnel._rate import format_rate, parse_rate
from tunnel.testing._daemons import AgentProcess, RelayProcess
from tunnel.testing._servers import LocalServer

LOOPBACK = "127.0.0.1"
CHUNK = 1 << 20


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def sender(size: int):  # type: ignore[no-untyped-def]
    block = bytes(CHUNK)

    def handle(sock: socket.socket, server: LocalServer) -> None:
        left = size
        while left > 0:
            n = min(left, CHUNK)
            sock.sendall(block[:n])
            left -= n

    return handle


def download(sock: socket.socket, size: int, relay_pid: int) -> tuple[float, float, int]:
    """Read `size` octets; (seconds from connect, seconds from the first octet, peak RSS)."""
    started = time.monotonic()
    first = None
    got = 0
    peak = 0
    next_sample = 0.0
    while got < size:
        data = sock.recv(1 << 18)
        if not data:
            raise SystemExit(f"connection closed after {got} of {size} octets")
        now = time.monotonic()
        if first is None:
            first = now
        got += len(data)
        if now >= next_sample:
            peak = max(peak, rss_kib(relay_pid))
            next_sample = now + 0.05
    end = time.monotonic()
    return end - started, end - (first or started), peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ratelimit", description=__doc__)
    parser.add_argument("--rate", default="10MB/s", help="the tunnel's rate limit")
    parser.add_argument("--size", default="100MB", help="octets to download (e.g. 100MB)")
    parser.add_argument("--kind", choices=["tcp", "tls"], default="tcp")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    rate = parse_rate(args.rate)
    size = parse_rate(args.size)  # the same units, without the /s
    server = LocalServer(sender(size))
    with tempfile.TemporaryDirectory(prefix="bench-ratelimit-") as tmp:
        directory = Path(tmp)
        relay = RelayProcess.start(
            directory / "relay.log",
            state_dir=directory / "state",
            tcp_ports=(27000, 27999),
            extra=["--drain-grace", "1"],
        )
        agent = None
        try:
            forward = f"{server.port}:tcp" if args.kind == "tcp" else f"{server.port}"
            agent = AgentProcess(
                directory / "agent.log",
                relay=f"localhost:{relay.port}",
                ca=relay.ca,
                forwards=[f"{forward}:rate={args.rate}"],
            )
            tunnel = agent.tunnel(f"{LOOPBACK}:{server.port}")
            time.sleep(0.5)  # let start-up allocations settle before the baseline
            before = rss_kib(relay.pid)
            if args.kind == "tcp":
                assert tunnel.tcp_port is not None
                sock: socket.socket = socket.create_connection((LOOPBACK, tunnel.tcp_port))
            else:
                context = ssl.create_default_context(cafile=str(relay.ca))
                raw = socket.create_connection((LOOPBACK, relay.port))
                sock = context.wrap_socket(raw, server_hostname=tunnel.host)
            with sock:
                total, streaming, peak = download(sock, size, relay.pid)
        finally:
            if agent is not None:
                agent.stop()
            relay.stop()
            server.close()
    measured = size / streaming
    result = {
        "limit": rate,
        "size": size,
        "kind": args.kind,
        "seconds": round(total, 3),
        "rate_from_first_octet": round(measured),
        "rate_from_connect": round(size / total),
        "relay_rss_before_kib": before,
        "relay_rss_peak_kib": peak,
        "relay_rss_growth_kib": peak - before,
    }
    within = abs(measured - rate) <= 0.05 * rate
    bounded = (peak - before) * 1024 <= size / 4
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{format_rate(size)[:-2]} over a {args.kind} tunnel limited to {format_rate(rate)}: "
            f"{total:.2f} s, {measured / 1e6:.2f} MB/s from the first octet "
            f"({size / total / 1e6:.2f} MB/s from connect); relay RSS "
            f"{before / 1024:.1f} MiB before, {peak / 1024:.1f} MiB at peak "
            f"(+{(peak - before) / 1024:.1f} MiB for a {size / 1e6:.0f} MB file)"
        )
    return 0 if within and bounded else 1


if __name__ == "__main__":
    sys.exit(main())
