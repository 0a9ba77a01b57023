"""
In-process benchmark of the link protocol's sans-IO core (no sockets, no TLS, no Twisted).

    python -m bench.wire [--megabytes 128] [--runs 5] [--streams 10000]

Measures:

- throughput of frame encoding + decoding alone (`encode_data` + `FrameDecoder.feed`);
- throughput through two multiplexers: 64 KiB `send`s on one side, `data_to_send`, the other
  side's `receive_data` and `consumed`, credit flowing back, each run's median/min/max of 5;
- memory (tracemalloc) and time per idle stream with 10,000 streams open in both cores.

Prints a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable

from tunnel.wire import frames as F
from tunnel.wire.events import DataReceived, StreamOpened
from tunnel.wire.mux import LinkSettings, Multiplexer

WRITE = 64 * 1024


def _frames_only(total: int) -> tuple[float, int]:
    payload = b"x" * WRITE
    decoder = F.FrameDecoder(F.DEFAULT_MAX_FRAME_SIZE)
    count = total // WRITE
    got = 0
    start = time.perf_counter()
    for _ in range(count):
        for frame in decoder.feed(F.encode_data(1, payload)):
            got += len(frame.payload)
    elapsed = time.perf_counter() - start
    assert got == count * WRITE
    return elapsed, count


def _through_mux(total: int) -> tuple[float, int]:
    link = LinkSettings(initial_window=1 << 20, max_window=16 << 20)
    client = Multiplexer(client=True, settings=link)
    server = Multiplexer(client=False, settings=link)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    sid = client.open_stream()
    server.receive_data(client.data_to_send())
    payload = b"x" * WRITE
    writes = total // WRITE
    received = 0
    frames = 0
    start = time.perf_counter()
    written = 0
    while received < writes * WRITE:
        # Keep about one window queued, as a transport's producer would.
        while written < writes and client.pending(sid) < 2 * WRITE:
            client.send(sid, payload)
            written += 1
        out = client.data_to_send(budget=1 << 20)
        for event in server.receive_data(out):
            if isinstance(event, DataReceived):
                n = len(event.data)
                received += n
                frames += 1
                server.consumed(sid, n)
        back = server.data_to_send()
        if back:
            client.receive_data(back)
    elapsed = time.perf_counter() - start
    return elapsed, frames


def _repeat(fn: Callable[[int], tuple[float, int]], total: int, runs: int) -> list[str]:
    rates: list[float] = []
    per_frame: list[float] = []
    for _ in range(runs):
        gc.collect()
        elapsed, frames = fn(total)
        rates.append(total / elapsed / 1e6)
        per_frame.append(elapsed / frames * 1e6)
    return [
        f"{statistics.median(rates):,.0f} MB/s (min {min(rates):,.0f}, max {max(rates):,.0f})",
        f"{statistics.median(per_frame):.2f} µs (min {min(per_frame):.2f}, "
        f"max {max(per_frame):.2f})",
    ]


def _open_pair(count: int) -> tuple[Multiplexer, Multiplexer]:
    link = LinkSettings(max_streams=max(count, 1))
    client = Multiplexer(client=True, settings=link)
    server = Multiplexer(client=False, settings=link)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    client.data_to_send()
    server.data_to_send()
    return client, server


def _idle_streams(count: int) -> tuple[float, float, float, float]:
    """
    Bytes per idle stream in the client core and in the server core, µs to open one stream
    (both ends), and µs for a ping round trip with `count` idle streams open.
    """
    # Time, without tracemalloc (it slows every allocation down).
    client, server = _open_pair(count)
    gc.collect()
    start = time.perf_counter()
    for _ in range(count):
        client.open_stream()
    events = server.receive_data(client.data_to_send())
    open_us = (time.perf_counter() - start) / count * 1e6
    assert sum(isinstance(e, StreamOpened) for e in events) == count
    rounds = 1000
    start = time.perf_counter()
    for _ in range(rounds):
        client.ping()
        server.receive_data(client.data_to_send())
        client.receive_data(server.data_to_send())
    ping_us = (time.perf_counter() - start) / rounds * 1e6
    del client, server, events

    # Memory.
    client, server = _open_pair(count)
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(count):
            client.open_stream()
        out = client.data_to_send()
        client_bytes = tracemalloc.get_traced_memory()[0] - base - sys.getsizeof(out)
        events = server.receive_data(out)
        assert sum(isinstance(e, StreamOpened) for e in events) == count
        del out, events
        gc.collect()
        total = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert client.stream_count == server.stream_count == count
    return client_bytes / count, (total - client_bytes) / count, open_us, ping_us


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.wire", description=__doc__)
    parser.add_argument("--megabytes", type=int, default=128, help="data moved per run")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--streams", type=int, default=10_000)
    args = parser.parse_args(argv)
    total = args.megabytes * 1024 * 1024

    frames_row = _repeat(_frames_only, total, args.runs)
    mux_row = _repeat(_through_mux, total, args.runs)
    client_b, server_b, open_us, ping_us = _idle_streams(args.streams)

    print(
        f"Link core, in-process ({platform.python_implementation()} "
        f"{platform.python_version()}, {platform.machine()}); "
        f"{args.megabytes} MiB per run in 64 KiB writes, median of {args.runs} runs\n"
    )
    print("| Measurement | Result | Per frame |")
    print("|---|---|---|")
    print(f"| Encode + decode, frames only | {frames_row[0]} | {frames_row[1]} |")
    print(
        f"| Through two multiplexers (send → receive → consume → credit) | {mux_row[0]} "
        f"| {mux_row[1]} |"
    )
    print(f"| Idle stream, client core ({args.streams:,} open) | {client_b:,.0f} bytes | |")
    print(f"| Idle stream, server core ({args.streams:,} open) | {server_b:,.0f} bytes | |")
    print(f"| Open one stream, both ends ({args.streams:,} streams) | {open_us:.1f} µs | |")
    print(f"| Ping round trip with {args.streams:,} idle streams open | {ping_us:.1f} µs | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
