"""A loopback TCP proxy that emulates a WAN path: a one-way delay and, optionally, a
bandwidth cap per direction.

    python -m bench.delayproxy --delay-ms 50 LISTEN_PORT:TARGET_PORT [...]
    python -m bench.delayproxy --delay-ms 50 --rate-mbps 400 LISTEN_PORT:TARGET_PORT

gives a 100 ms round trip between a client of ``127.0.0.1:LISTEN_PORT`` and the server on
``127.0.0.1:TARGET_PORT`` (``--delay-ms-back`` sets the server-to-client delay separately).

**Delay.** Every chunk read is released at ``departure + delay``.

**Bandwidth cap** (``--rate-mbps``, Mbit/s = 10^6 bit/s). Each direction of each mapping is
one emulated link, shared by every connection through that listening port (eight streams
through it share the cap as eight flows share a real link). The link is a token bucket
(``--burst-kib``): a chunk departs once the bucket has paid for it, the bytes waiting to
depart are the link's queue, bounded by ``--queue-kib``. Nothing is ever dropped: the path
is TCP, so when the queue is full the proxy stops reading that side, and TCP's own
backpressure (the socket buffers, then the sender's window) holds the sender back.

Without a rate, reading pauses only while more than ``--max-inflight`` bytes (default 64 MiB)
per direction wait for release: throughput is then capped at about ``max_inflight / delay``
and by the proxy's own CPU.

**Cuts.** ``SIGUSR1`` resets (RST, both sides) every connection open at that moment;
``--cut-after BYTES`` resets each connection once it has carried that many bytes (both
directions together). New connections are accepted as before: what a NAT rebinding or a
dropped mobile link does to a long-lived connection.

**Time series.** ``--series FILE`` appends one JSON line per ``--series-ms`` (100) interval
in which bytes left the proxy: ``{"t": SECONDS, "bytes": {"LISTEN>TARGET": N,
"TARGET>LISTEN": N}}``, the octets each direction of each link delivered in the interval
that ended at ``t`` (seconds since the proxy started), to see how a transfer ramps up.

Prints ``{"ports": {LISTEN: TARGET}, "pid": PID}`` once listening. Only loopback addresses
are used.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import signal
import socket
import struct
from dataclasses import dataclass, field

READ_SIZE = 256 << 10
HOST = "127.0.0.1"


class Link:
    """One direction of an emulated link: token bucket, bounded queue, propagation delay.

    ``departure(n)`` books ``n`` bytes on the link and returns when they leave it (the
    bucket's virtual clock); ``wait_for_room()`` returns once the queue of bytes not yet
    departed is below its bound.  With ``rate`` None the link has no cap and no queue bound
    of its own (the pipes' ``max_inflight`` bounds them).
    """

    def __init__(self, delay: float, rate: float | None, burst: int, queue: int) -> None:
        self.delay = delay
        self.rate = rate
        self.burst = burst
        self.queue = queue
        #: When the bytes booked so far will all have departed (loop time).
        self.clock = 0.0
        #: Bytes booked on this link so far.
        self.booked = 0
        #: Bytes released (written on) by this link so far.
        self.delivered = 0

    def departure(self, now: float, n: int) -> float:
        """Book ``n`` bytes read at ``now``; the time they have all left the bucket."""
        self.booked += n
        if self.rate is None:
            return now
        # A bucket full of tokens lets ``burst`` bytes through at once: the clock may lag
        # ``now`` by at most ``burst / rate``.
        start = max(self.clock, now - self.burst / self.rate)
        self.clock = start + n / self.rate
        return max(now, self.clock)

    def backlog(self, now: float) -> float:
        """Bytes booked but not yet departed (the queue)."""
        if self.rate is None:
            return 0.0
        return max(0.0, (self.clock - now) * self.rate)

    async def wait_for_room(self) -> None:
        """Return once the queue is below its bound (at once without a rate)."""
        if self.rate is None:
            return
        loop = asyncio.get_running_loop()
        while (excess := self.backlog(loop.time()) - self.queue) > 0:
            await asyncio.sleep(excess / self.rate)


class _Pipe:
    """One direction of one connection: read, book on the link, release after the delay."""

    def __init__(self, link: Link, max_inflight: int) -> None:
        self.link = link
        self.max_inflight = max_inflight
        self.inflight = 0
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.ready = asyncio.Event()
        self.space = asyncio.Event()
        self.space.set()

    async def read_side(self, reader: asyncio.StreamReader, conn: _Conn) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self.space.wait()
                await self.link.wait_for_room()
                chunk = await reader.read(READ_SIZE)
                now = loop.time()
                if not chunk:
                    self.queue.append((now + self.link.delay, chunk))
                    self.ready.set()
                    return
                release = self.link.departure(now, len(chunk)) + self.link.delay
                self.queue.append((release, chunk))
                self.ready.set()
                self.inflight += len(chunk)
                if self.inflight > self.max_inflight:
                    self.space.clear()
                conn.carried(len(chunk))
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
                self.link.delivered += len(chunk)
                self.inflight -= len(chunk)
                if self.inflight <= self.max_inflight:
                    self.space.set()
                await writer.drain()
        except OSError:
            return


@dataclass(eq=False)
class _Conn:
    """Both sockets of one proxied connection, so that a cut can reset them."""

    socks: list[socket.socket]
    cut_after: int | None
    tasks: list[asyncio.Future[None]] = field(default_factory=list)
    total: int = 0

    def carried(self, n: int) -> None:
        self.total += n
        if self.cut_after is not None and self.total >= self.cut_after:
            self.reset()

    def reset(self) -> None:
        """RST both sides (SO_LINGER 0) and stop forwarding."""
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        for t in self.tasks:
            t.cancel()


@dataclass
class _Options:
    fwd: float
    back: float
    max_inflight: int
    cut_after: int | None


CONNS: set[_Conn] = set()


async def _handle(
    target: int,
    links: tuple[Link, Link],
    opts: _Options,
    creader: asyncio.StreamReader,
    cwriter: asyncio.StreamWriter,
) -> None:
    try:
        sreader, swriter = await asyncio.open_connection(HOST, target)
    except OSError:
        cwriter.close()
        return
    socks = []
    for w in (cwriter, swriter):
        sock = w.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            socks.append(sock)
    conn = _Conn(socks, opts.cut_after)
    CONNS.add(conn)
    up, down = _Pipe(links[0], opts.max_inflight), _Pipe(links[1], opts.max_inflight)
    conn.tasks = [
        asyncio.ensure_future(up.read_side(creader, conn)),
        asyncio.ensure_future(up.write_side(swriter)),
        asyncio.ensure_future(down.read_side(sreader, conn)),
        asyncio.ensure_future(down.write_side(cwriter)),
    ]
    try:
        await asyncio.gather(conn.tasks[1], conn.tasks[3])
    except asyncio.CancelledError:
        pass
    finally:
        CONNS.discard(conn)
        for t in conn.tasks:
            t.cancel()
        for w in (cwriter, swriter):
            w.close()


def cut_all() -> int:
    """Reset every connection open now; returns how many."""
    conns = list(CONNS)
    for c in conns:
        c.reset()
    return len(conns)


async def record_series(links: dict[str, Link], path: str, interval: float) -> None:
    """Every ``interval`` seconds, append to ``path`` what each link delivered since the
    last line (a line only when something moved)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    last = {name: 0 for name in links}
    tick = start
    with open(path, "a", encoding="utf-8") as out:
        while True:
            tick += interval
            await asyncio.sleep(max(0.0, tick - loop.time()))
            moved = {name: link.delivered - last[name] for name, link in links.items()}
            last = {name: link.delivered for name, link in links.items()}
            if any(moved.values()):
                out.write(json.dumps({"t": round(tick - start, 3), "bytes": moved}) + "\n")
                out.flush()


async def serve(
    mapping: dict[int, int],
    opts: _Options,
    rate: float | None = None,
    burst: int = 256 << 10,
    queue: int = 4 << 20,
    cut_on_sigusr1: bool = True,
    series: str | None = None,
    series_interval: float = 0.1,
) -> None:
    """Listen on each ``127.0.0.1:listen`` and proxy to ``127.0.0.1:target`` over a link
    (one per mapping and direction) with ``opts``' delays and ``rate`` bytes/s; SIGUSR1
    cuts every connection (when ``cut_on_sigusr1``: only in the main thread). With
    ``series``, append the links' deliveries per ``series_interval`` to that file."""
    if cut_on_sigusr1:
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, cut_all)
    servers = []
    named: dict[str, Link] = {}
    for listen, target in mapping.items():
        links = (Link(opts.fwd, rate, burst, queue), Link(opts.back, rate, burst, queue))
        named[f"{listen}>{target}"], named[f"{target}>{listen}"] = links

        async def handler(
            r: asyncio.StreamReader,
            w: asyncio.StreamWriter,
            target: int = target,
            links: tuple[Link, Link] = links,
        ) -> None:
            await _handle(target, links, opts, r, w)

        servers.append(await asyncio.start_server(handler, HOST, listen, backlog=1024))
    print(json.dumps({"ports": mapping, "pid": os.getpid()}), flush=True)
    tasks = [s.serve_forever() for s in servers]
    if series is not None:
        tasks.append(record_series(named, series, series_interval))
    await asyncio.gather(*tasks)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--delay-ms", type=float, default=50.0, help="client→server delay")
    parser.add_argument("--delay-ms-back", type=float, help="server→client (default: same)")
    parser.add_argument("--rate-mbps", type=float, help="cap per direction, Mbit/s (10^6)")
    parser.add_argument("--burst-kib", type=int, default=256, help="token bucket size")
    parser.add_argument("--queue-kib", type=int, default=4096, help="link queue bound")
    parser.add_argument("--max-inflight", type=int, default=64 << 20, help="bytes/direction")
    parser.add_argument("--cut-after", type=int, help="reset a connection after BYTES")
    parser.add_argument("--series", help="append bytes delivered per interval to FILE")
    parser.add_argument("--series-ms", type=float, default=100.0, help="the series' interval")
    parser.add_argument("map", nargs="+", help="LISTEN_PORT:TARGET_PORT on 127.0.0.1")
    a = parser.parse_args(argv)
    mapping = {int(m.split(":")[0]): int(m.split(":")[1]) for m in a.map}
    back = a.delay_ms if a.delay_ms_back is None else a.delay_ms_back
    opts = _Options(a.delay_ms / 1000, back / 1000, a.max_inflight, a.cut_after)
    rate = a.rate_mbps * 1e6 / 8 if a.rate_mbps else None
    asyncio.run(
        serve(
            mapping,
            opts,
            rate,
            a.burst_kib << 10,
            a.queue_kib << 10,
            series=a.series,
            series_interval=a.series_ms / 1000,
        )
    )


if __name__ == "__main__":
    main()
