"""Probes for the tunnel paths, each run in its own process and printing JSON.

* ``forward --relay H:P --ca CA --port N --count K``: ``tunnel.client.forward`` to URL, K times
  on a warm agent (its link already up) and K times from a cold one (a new agent, a new TLS
  link); ``{"warm": [ms...], "cold": [ms...]}``.
* ``hold --port P --sni NAME --ca CA --count K``: opens K TLS connections to the relay's
  loopback port with that SNI, each echoing one byte through the tunnel, prints
  ``{"held": K}`` and keeps them idle until its stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import time
from typing import Any


def _forward(args: argparse.Namespace) -> None:
    from twisted.internet import defer, reactor

    from tunnel.agent.session import Agent, ForwardSpec, parse_relays

    relays = parse_relays(args.relay)
    result: dict[str, list[float]] = {"warm": [], "cold": []}

    @defer.inlineCallbacks
    def run() -> Any:
        warm = Agent(reactor, relays, ca=args.ca)
        t = yield warm.forward(ForwardSpec(args.port))  # bring the link up
        yield t.close()
        for _ in range(args.count):
            start = time.perf_counter()
            t = yield warm.forward(ForwardSpec(args.port))
            result["warm"].append((time.perf_counter() - start) * 1e3)
            yield t.close()
        yield warm.stop()
        for _ in range(args.count):
            start = time.perf_counter()
            cold = Agent(reactor, relays, ca=args.ca)
            t = yield cold.forward(ForwardSpec(args.port))
            result["cold"].append((time.perf_counter() - start) * 1e3)
            yield cold.stop()

    def done(outcome: Any) -> None:
        reactor.stop()  # type: ignore[attr-defined]
        if isinstance(outcome, Exception) or hasattr(outcome, "getTraceback"):
            print(outcome, file=sys.stderr)

    reactor.callWhenRunning(lambda: run().addBoth(done))  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    if len(result["cold"]) != args.count:
        raise SystemExit("forward probe did not finish")
    print(json.dumps(result))


async def _hold(args: argparse.Namespace) -> None:
    ctx = ssl.create_default_context(cafile=args.ca)
    writers: list[asyncio.StreamWriter] = []
    sem = asyncio.Semaphore(200)

    async def one() -> None:
        async with sem:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", args.port, ssl=ctx, server_hostname=args.sni
            )
            writer.write(b"x")
            await writer.drain()
            if await reader.readexactly(1) != b"x":
                raise RuntimeError("echo mismatch")
            writers.append(writer)

    await asyncio.gather(*(one() for _ in range(args.count)))
    print(json.dumps({"held": len(writers)}), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    for writer in writers:
        writer.close()
    # Each close sends a close_notify; wait (bounded) until they are out rather than
    # leaving them to the process's exit.
    await asyncio.wait_for(
        asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True), 60
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tunnelprobe")
    sub = parser.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("forward")
    f.add_argument("--relay", required=True)
    f.add_argument("--ca", required=True)
    f.add_argument("--port", type=int, required=True)
    f.add_argument("--count", type=int, default=100)
    h = sub.add_parser("hold")
    h.add_argument("--port", type=int, required=True)
    h.add_argument("--sni", required=True)
    h.add_argument("--ca", required=True)
    h.add_argument("--count", type=int, default=10000)
    args = parser.parse_args()
    if args.cmd == "forward":
        _forward(args)
    else:
        asyncio.run(_hold(args))


if __name__ == "__main__":
    main()
