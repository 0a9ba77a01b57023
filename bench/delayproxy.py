"""A loopback TCP proxy that adds a fixed one-way delay per direction, without a rate limit.

    python -m bench.delayproxy --delay-ms 50 LISTEN_PORT:TARGET_PORT [...]

gives a 100 ms round trip between a client of ``127.0.0.1:LISTEN_PORT`` and the server on
``127.0.0.1:TARGET_PORT`` (``--delay-ms-back`` sets the server-to-client delay separately).
Every chunk read is scheduled for release at ``arrival + delay``; reading pauses only while
more than ``--max-inflight`` bytes (default 64 MiB) per direction wait for release, so
throughput is capped at about ``max_inflight / delay`` (64 MiB / 50 ms ≈ 1.3 GB/s) and by the
proxy's own CPU, not by a bandwidth shaper.  Prints ``{"ports": {LISTEN: TARGET}}`` once
listening.  Only loopback addresses are used.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import socket

READ_SIZE = 256 << 10
HOST = "127.0.0.1"


class _Pipe:
    """One direction: read, timestamp, release after ``delay``, bounded by ``max_inflight``."""

    def __init__(self, delay: float, max_inflight: int) -> None:
        self.delay = delay
        self.max_inflight = max_inflight
        self.inflight = 0
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.ready = asyncio.Event()
        self.space = asyncio.Event()
        self.space.set()

    async def read_side(self, reader: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self.space.wait()
                chunk = await reader.read(READ_SIZE)
                self.queue.append((loop.time() + self.delay, chunk))
                self.ready.set()
                if not chunk:
                    return
                self.inflight += len(chunk)
                if self.inflight > self.max_inflight:
                    self.space.clear()
        except (OSError, asyncio.CancelledError):
            self.queue.append((loop.time(), b""))
            self.ready.set()

    async def write_side(self, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                while not self.queue:
                    self.ready.clear()
                    await self.ready.wait()
                release, chunk = self.queue.popleft()
                wait = release - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not chunk:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(chunk)
                self.inflight -= len(chunk)
                if self.inflight <= self.max_inflight:
                    self.space.set()
                await writer.drain()
        except OSError:
            return


async def _handle(
    target: int,
    fwd: float,
    back: float,
    max_inflight: int,
    creader: asyncio.StreamReader,
    cwriter: asyncio.StreamWriter,
) -> None:
    try:
        sreader, swriter = await asyncio.open_connection(HOST, target)
    except OSError:
        cwriter.close()
        return
    for w in (cwriter, swriter):
        sock = w.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    up, down = _Pipe(fwd, max_inflight), _Pipe(back, max_inflight)
    tasks = [
        asyncio.ensure_future(up.read_side(creader)),
        asyncio.ensure_future(up.write_side(swriter)),
        asyncio.ensure_future(down.read_side(sreader)),
        asyncio.ensure_future(down.write_side(cwriter)),
    ]
    try:
        await asyncio.gather(tasks[1], tasks[3])
    finally:
        for t in tasks:
            t.cancel()
        for w in (cwriter, swriter):
            w.close()


async def serve(mapping: dict[int, int], fwd: float, back: float, max_inflight: int) -> None:
    """Listen on each ``127.0.0.1:listen`` and proxy to ``127.0.0.1:target`` with delays."""
    servers = []
    for listen, target in mapping.items():

        async def handler(
            r: asyncio.StreamReader, w: asyncio.StreamWriter, target: int = target
        ) -> None:
            await _handle(target, fwd, back, max_inflight, r, w)

        servers.append(await asyncio.start_server(handler, HOST, listen, backlog=1024))
    print(json.dumps({"ports": mapping}), flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--delay-ms", type=float, default=50.0, help="client→server delay")
    parser.add_argument("--delay-ms-back", type=float, help="server→client (default: same)")
    parser.add_argument("--max-inflight", type=int, default=64 << 20, help="bytes/direction")
    parser.add_argument("map", nargs="+", help="LISTEN_PORT:TARGET_PORT on 127.0.0.1")
    a = parser.parse_args(argv)
    mapping = {int(m.split(":")[0]): int(m.split(":")[1]) for m in a.map}
    back = a.delay_ms if a.delay_ms_back is None else a.delay_ms_back
    asyncio.run(serve(mapping, a.delay_ms / 1000, back / 1000, a.max_inflight))


if __name__ == "__main__":
    main()
