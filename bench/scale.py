"""Scale figures of a relay: many idle agent links, many idle public connections.

    python -m bench.scale [--links 10000] [--link-workers 1,auto] [--keepalive-seconds 30]
                          [--idle 100000] [--idle-workers 7] [--out bench/results]
                          [--connections N --kind tcp|tls] [--profile]
    python -m bench --scale          # the same, after (or instead of) the paths

1. **Agent links**, once per value of ``--link-workers`` (``twistd tunnelrelay --workers
   W``; ``auto``: the relay's default, one worker per core). The relay runs under
   ``prlimit --nofile`` with every per-source and per-token share raised so that one client
   process may hold everything; one process (``links`` below) opens ``--links`` TLS links
   with the link protocol written by hand (HELLO, ``hello``, one ``tunnel_request`` each;
   it answers the relay's pings and pings every ``keepalive_interval`` itself, as an agent
   does). Reported: the time from the first connect to the last grant (and links/s), the
   relay's CPU for it, the relay's RSS per link, and then, with every link idle, the
   relay's CPU per second of keepalive traffic over ``--keepalive-seconds`` (total, and per
   link). With several workers, RSS and CPU are the supervisor's and its workers' together,
   and the links per worker are reported.
2. **Idle public connections** (``--idle``, default 100,000; 0: none): `bench.idleconns`,
   a relay of ``--idle-workers`` workers, as many agents, targets and client processes, so
   that no process holds more than its share of descriptors (see there).

``--connections N`` also opens N public connections through the links' own tunnels, on the
links' relay (raw TCP ports with ``--kind tcp``; TLS with the tunnel's SNI name with
``--kind tls``), from several 127.0.0.x source addresses, within one process's descriptor
limit (``capped`` in the output says when it did not fit): the time to open them and the
relay's RSS per connection.

Every load is bounded: counts from the options, each phase has a deadline, at most 500
handshakes in flight. Only loopback addresses are used. Writes ``scale.json`` and
``scale.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.util import BENCH_DIR, cpu_seconds, json_line, rss_bytes

HELLO, DATA, OPEN, WINDOW, RESET, PING, GOAWAY, CONTROL = range(8)
ACK = 0x1
IP_BIND_ADDRESS_NO_PORT = 24
NOFILE = 400_000
#: Handshakes in flight at once from one client process.
IN_FLIGHT = 500
_ROOT = BENCH_DIR.parent


def _frame(kind: int, payload: bytes = b"", flags: int = 0, stream: int = 0) -> bytes:
    return struct.pack(">I", len(payload))[1:] + struct.pack(">BBI", kind, flags, stream) + payload


def _control(msg: dict[str, Any]) -> bytes:
    return _frame(CONTROL, json.dumps(msg).encode())


# HELLO: magic, versions 1-1, MAX_STREAMS = 65536 (the relay may open that many to us).
_HELLO = _frame(HELLO, b"TUNL\x01\x01" + struct.pack(">HI", 2, 65536))


def _source(i: int, sources: int) -> str:
    return f"127.0.0.{2 + i % sources}"


async def _open(
    port: int, src: str, ctx: ssl.SSLContext | None, sni: str | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to 127.0.0.1:port from ``src`` (port chosen at connect, so one source
    can reach many destinations), with TLS when ``ctx`` is given."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    sock.setblocking(False)
    sock.bind((src, 0))
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock, ssl=ctx, server_hostname=sni)


class _Link:
    """One hand-written agent link: hello, one tunnel, pings answered and sent."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.interval = 5.0
        self.pings = 0
        self.host = ""
        self.tcp_port: int | None = None

    async def frame(self) -> tuple[int, int, bytes]:
        head = await self.reader.readexactly(9)
        length = int.from_bytes(head[:3], "big")
        kind, flags = head[3], head[4]
        return kind, flags, await self.reader.readexactly(length)

    async def control(self) -> dict[str, Any]:
        while True:
            kind, flags, payload = await self.frame()
            if kind == CONTROL:
                msg: dict[str, Any] = json.loads(payload)
                return msg
            self.handle(kind, flags, payload)

    def handle(self, kind: int, flags: int, payload: bytes) -> None:
        if kind == PING and not flags & ACK:
            self.writer.write(_frame(PING, payload, ACK))
            self.pings += 1
        elif kind == GOAWAY:
            raise ConnectionError(f"GOAWAY {payload[4:8].hex()} {payload[8:]!r}")

    async def setup(self, tcp: bool) -> dict[str, Any]:
        """hello; a TLS tunnel, and with ``tcp`` a raw TCP one too; the last grant."""
        self.writer.write(_HELLO + _control({"type": "hello", "version": 1, "agent": "scale"}))
        welcome = await self.control()
        if welcome.get("type") != "welcome":
            raise ConnectionError(f"no welcome: {welcome}")
        self.interval = float(welcome.get("keepalive_interval", 5.0))
        kinds = ["tls", "tcp"] if tcp else ["tls"]
        for i, kind in enumerate(kinds, 1):
            self.writer.write(
                _control({"type": "tunnel_request", "request_id": i, "kind": kind, "options": {}})
            )
        for _ in kinds:
            granted = await self.control()
            if granted.get("type") != "tunnel_granted":
                raise ConnectionError(f"not granted: {granted}")
            if granted.get("tcp_port"):
                self.tcp_port = granted["tcp_port"]
            else:
                self.host = granted["host"]
        return granted

    async def serve(self) -> None:
        """Answer pings and ping once per interval; OPENs and DATA are left unanswered
        (the public connections stay idle)."""

        async def pinger() -> None:
            await asyncio.sleep(random.random() * self.interval)
            n = 0
            while True:
                n += 1
                self.writer.write(_frame(PING, n.to_bytes(8, "big")))
                await asyncio.sleep(self.interval)

        task = asyncio.ensure_future(pinger())
        try:
            while True:
                self.handle(*await self.frame())
        except (asyncio.IncompleteReadError, OSError, ConnectionError):
            pass
        finally:
            task.cancel()


async def _links(a: argparse.Namespace) -> None:
    ctx = ssl.create_default_context(cafile=a.ca)
    ctx.set_alpn_protocols(["tunnel/1"])
    sem = asyncio.Semaphore(IN_FLIGHT)
    links: list[_Link] = []
    serving: list[asyncio.Future[None]] = []
    errors: list[str] = []

    async def one(i: int) -> None:
        async with sem:
            try:
                r, w = await asyncio.wait_for(
                    _open(a.port, _source(i, a.sources), ctx, a.domain), 30
                )
                link = _Link(r, w)
                await asyncio.wait_for(link.setup(i < a.tcp_tunnels), 30)
                links.append(link)
                # Served from now on: a link left silent while the others come up would
                # reach the relay's keepalive timeout.
                serving.append(asyncio.ensure_future(link.serve()))
            except (TimeoutError, OSError, ConnectionError, ssl.SSLError) as e:
                errors.append(repr(e))

    start = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(a.count)))
    seconds = time.monotonic() - start
    targets = [[link.host, link.tcp_port] for link in links]
    Path(a.targets).write_text(json.dumps(targets))
    print(
        json.dumps(
            {"up": len(links), "seconds": seconds, "errors": len(errors), "error": errors[:3]}
        ),
        flush=True,
    )
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    pings = sum(link.pings for link in links)
    for link in links:
        link.writer.close()
    for t in serving:
        t.cancel()
    print(json.dumps({"pings_answered": pings}), flush=True)


async def _conns(a: argparse.Namespace) -> None:
    targets = json.loads(Path(a.targets).read_text())
    if a.kind == "tcp":
        targets = [t for t in targets if t[1]]
    ctx = ssl.create_default_context(cafile=a.ca) if a.kind == "tls" else None
    sem = asyncio.Semaphore(IN_FLIGHT)
    held: list[asyncio.StreamWriter] = []
    errors: list[str] = []

    async def one(i: int) -> None:
        host, tcp_port = targets[i % len(targets)]
        port, sni = (a.port, host) if a.kind == "tls" else (tcp_port, None)
        async with sem:
            try:
                _, w = await asyncio.wait_for(_open(port, _source(i, a.sources), ctx, sni), 30)
                held.append(w)
            except (TimeoutError, OSError, ssl.SSLError) as e:
                errors.append(repr(e))

    start = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(a.count)))
    seconds = time.monotonic() - start
    print(
        json.dumps(
            {"held": len(held), "seconds": seconds, "errors": len(errors), "error": errors[:3]}
        ),
        flush=True,
    )
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    for w in held:
        w.close()


# -- the orchestrator ---------------------------------------------------------------------------


def _limits(links: int, conns: int) -> list[str]:
    """Relay options that let one client process (a few source addresses, no token) hold
    ``links`` links and ``conns`` public connections."""
    big = str(max(links, conns) * 2)
    return [
        "--max-links-per-token", big, "--max-pending-handshakes", str(IN_FLIGHT * 4),
        "--max-pending-per-source", str(IN_FLIGHT * 4), "--max-connections-per-source", big,
        "--max-connections-per-tunnel", big, "--max-streams-per-token", big,
        "--max-streams-per-link", big, "--token-request-rate", "1000000",
        "--token-request-burst", big, "--client-hello-timeout", "10",
        "--handshake-timeout", "30", "--drain-grace", "1",
    ]  # fmt: skip


def nofile_limit(wanted: int = NOFILE) -> int:
    """The descriptor limit children can get: ``wanted`` if ``prlimit`` may raise the hard
    limit that far (root with CAP_SYS_RESOURCE), else the current hard limit."""
    import resource

    ok = subprocess.run(
        ["prlimit", f"--nofile={wanted}:{wanted}", "true"], capture_output=True, check=False
    )
    if ok.returncode == 0:
        return wanted
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return wanted if hard == resource.RLIM_INFINITY else int(hard)


def _spawn(argv: list[str], nofile: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["prlimit", f"--nofile={nofile}:{nofile}", sys.executable, "-m", "bench.scale", *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=str(_ROOT),
    )


def _end(p: subprocess.Popen[str]) -> None:
    with contextlib.suppress(OSError):
        if p.stdin:
            p.stdin.close()
    try:
        p.wait(60)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def _alive_links(relay: Any) -> int | None:
    """The relay's count of connected agents, from ``/status``, if it reports one."""
    try:
        status = relay.status(timeout=30)
    except (OSError, ValueError):
        return None
    for key in ("agents", "links", "agents_connected"):
        if isinstance(status.get(key), int):
            return int(status[key])
    return None


def _settle(pid: int, seconds: float = 2.0) -> int:
    time.sleep(seconds)
    return rss_bytes([pid])


def run(
    links: int,
    conns: int,
    kind: str = "tls",
    keepalive_s: float = 30.0,
    sources: int = 8,
    tcp_tunnels: int = 100,
    log_dir: Path | None = None,
    profile_to: Path | None = None,
    workers: int | None = 1,
) -> dict[str, Any]:
    """Start a relay (``--workers workers``; None: the relay's default, ``auto``), measure,
    stop everything; returns the figures (see the docstring). With several workers, the
    relay's RSS and CPU are those of the supervisor and its workers together."""
    from tunnel.testing import RelayProcess

    nofile = nofile_limit()
    # The relay holds a descriptor per link and per public connection (plus a few hundred).
    fit = nofile - 1000
    asked = (links, conns)
    links = min(links, fit)
    conns = max(0, min(conns, fit - links))
    tmp = tempfile.TemporaryDirectory(prefix="tunnels-scale-")
    d = Path(tmp.name)
    # Every link holds a TLS tunnel (no descriptor of its own at the relay); with --kind tcp,
    # ``tcp_tunnels`` of them also hold a raw TCP port (a listening socket each).
    tcp_tunnels = tcp_tunnels if kind == "tcp" else 0
    relay = RelayProcess.start(
        (log_dir or d) / "scale-relay.log",
        state_dir=d / "state",
        workers=workers,
        tcp_ports=(20000, 20000 + max(100, tcp_tunnels * 2)),
        listen_options=":backlog=4096",
        extra=_limits(links, conns),
        prefix=["prlimit", f"--nofile={nofile}:{nofile}"],
        timeout=60,
    )
    out: dict[str, Any] = {"links": links, "connections": conns, "kind": kind, "nofile": nofile}
    out["tcp_tunnels"] = tcp_tunnels
    out["workers"] = "auto" if workers is None else workers
    if (links, conns) != asked:
        out["capped"] = (
            f"asked for {asked[0]:,} links and {asked[1]:,} connections; the descriptor "
            f"limit is {nofile:,} here (prlimit could not raise it: no CAP_SYS_RESOURCE)"
        )
    procs: list[subprocess.Popen[str]] = []
    worker_pids: list[int] = []
    try:
        pid = relay.pid
        # With several workers: each one's pid (ended here if its supervisor left it).
        worker_pids = [int(w["pid"]) for w in relay.status(timeout=30).get("workers", [])]
        rss0 = _settle(pid)
        out["relay_rss_start_MiB"] = rss0 / 2**20
        common = ["--port", str(relay.port), "--ca", str(relay.ca), "--kind", kind]
        common += ["--tcp-tunnels", str(tcp_tunnels)]
        common += ["--sources", str(sources), "--targets", str(d / "targets.json")]
        cpu0 = cpu_seconds([pid])
        lp = _spawn(["links", "--count", str(links), "--domain", relay.domain, *common], nofile)
        procs.append(lp)
        up = json_line(lp, "links", 60 + links * 0.05)
        cpu1 = cpu_seconds([pid])
        out["links_up"] = up["up"]
        out["link_errors"] = up["errors"]
        out["link_error_examples"] = up["error"]
        out["links_setup_seconds"] = up["seconds"]
        out["links_per_second"] = up["up"] / up["seconds"]
        out["relay_cpu_ms_per_link_setup"] = (cpu1 - cpu0) * 1e3 / max(1, up["up"])
        rss1 = _settle(pid, 5.0)
        out["relay_rss_links_MiB"] = rss1 / 2**20
        out["relay_rss_per_link_KiB"] = (rss1 - rss0) / max(1, up["up"]) / 1024
        spy = None
        if profile_to is not None:
            from bench.profile import py_spy

            spy = subprocess.Popen(
                [
                    py_spy(), "record", "--pid", str(pid), "--nonblocking", "--rate", "100",
                    "--duration", str(int(keepalive_s)), "--format", "raw",
                    "-o", str(profile_to),
                ],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        c0, t0 = cpu_seconds([pid]), time.monotonic()
        time.sleep(keepalive_s)
        c1, t1 = cpu_seconds([pid]), time.monotonic()
        if spy is not None:
            spy.wait(60)
        out["keepalive_seconds"] = t1 - t0
        out["relay_cpu_pct_idle_links"] = (c1 - c0) / (t1 - t0) * 100
        out["relay_cpu_us_per_link_second"] = (c1 - c0) / (t1 - t0) / max(1, up["up"]) * 1e6
        out["links_alive_after_idle"] = _alive_links(relay)
        if worker_pids:
            status = relay.status(timeout=30)
            out["links_per_worker"] = [w["links"] for w in status["workers"]]
        if conns:
            cpu2 = cpu_seconds([pid])
            cp = _spawn(["conns", "--count", str(conns), *common], nofile)
            procs.append(cp)
            held = json_line(cp, "connections", 120 + conns * 0.02)
            out["relay_cpu_ms_per_connection_open"] = (
                (cpu_seconds([pid]) - cpu2) * 1e3 / max(1, held["held"])
            )
            out["connections_held"] = held["held"]
            out["connection_errors"] = held["errors"]
            out["connection_error_examples"] = held["error"]
            out["connections_open_seconds"] = held["seconds"]
            rss2 = _settle(pid, 5.0)
            out["relay_rss_connections_MiB"] = rss2 / 2**20
            out["relay_rss_per_connection_KiB"] = (rss2 - rss1) / max(1, held["held"]) / 1024
            out["links_alive_at_end"] = _alive_links(relay)
            status = relay.status(timeout=30)
            out["relay_status"] = {
                k: v for k, v in status.items() if isinstance(v, int | float | str)
            }
    finally:
        for p in reversed(procs):
            _end(p)
        relay.stop(timeout=30)
        for wpid in worker_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(wpid, signal.SIGKILL)
        tmp.cleanup()
    return out


ROWS = [
    ("links_up", "agent links up (a TLS tunnel each)", "{:,.0f}"),
    ("links_setup_seconds", "time to accept them (TLS + hello + grant), s", "{:.1f}"),
    ("links_per_second", "links accepted per second", "{:,.0f}"),
    ("relay_cpu_ms_per_link_setup", "relay CPU per link set up, ms", "{:.2f}"),
    ("relay_rss_per_link_KiB", "relay RSS per idle link, KiB", "{:.1f}"),
    ("relay_cpu_pct_idle_links", "relay CPU with every link idle (keepalives), % of a core",
     "{:.1f}"),
    ("relay_cpu_us_per_link_second", "relay CPU per link per second of keepalives, µs",
     "{:.2f}"),
    ("links_alive_after_idle", "links still up after the idle window (relay /status)",
     "{:,.0f}"),
    ("links_per_worker", "of which per worker", "{}"),
    ("connections_held", "idle public connections held", "{:,.0f}"),
    ("connections_open_seconds", "time to open them, s", "{:.1f}"),
    ("relay_cpu_ms_per_connection_open",
     "relay CPU per public connection opened (accept, TLS handshake for tls, OPEN), ms", "{:.2f}"),
    ("relay_rss_per_connection_KiB", "relay RSS per idle public connection, KiB", "{:.1f}"),
    ("links_alive_at_end", "links still up at the end", "{:,.0f}"),
    ("relay_rss_start_MiB", "relay RSS at start, MiB", "{:.0f}"),
    ("relay_rss_links_MiB", "relay RSS with the links, MiB", "{:.0f}"),
    ("relay_rss_connections_MiB", "relay RSS with links and connections, MiB", "{:.0f}"),
]  # fmt: skip


def _shown(value: Any, fmt: str) -> str:
    if isinstance(value, list):
        return " / ".join(f"{v:,}" for v in value)
    return fmt.format(value)


def markdown(r: dict[str, Any]) -> str:
    """The figures as a two-column table."""
    shape = (
        "One relay process"
        if r.get("workers", 1) == 1
        else f"A relay of `--workers {r['workers']}` (RSS and CPU: supervisor and workers)"
    )
    out = (
        f"{r['links']:,} links, {r['connections']:,} {r['kind']} connections requested "
        f"(over {r['tcp_tunnels'] or r['links']:,} tunnels). "
        f"{shape}, clients on the same machine.\n\n| figure | value |\n|---|---:|\n"
    )
    for key, label, fmt in ROWS:
        if key in r:
            out += f"| {label} | {_shown(r[key], fmt)} |\n"
    if r.get("idle_profile_top"):
        out += "\nThe relay's self time while the links idle (py-spy, % of samples):\n\n"
        out += "| function | % |\n|---|---:|\n"
        out += "".join(f"| `{leaf}` | {pct} |\n" for leaf, pct in r["idle_profile_top"])
    for key in ("capped", "link_error_examples", "connection_error_examples"):
        if r.get(key):
            out += f"\n{key}: {r[key]}\n"
    return out


def full(
    links: int = 10_000,
    link_workers: tuple[int | None, ...] = (1, None),
    idle: int = 100_000,
    idle_workers: int = 7,
    keepalive_s: float = 30.0,
    log_dir: Path | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """The scale figures: ``links`` idle agent links on a relay of each of
    ``link_workers`` (None: ``auto``), then ``idle`` idle public TLS connections over a
    relay of ``idle_workers`` workers (`bench.idleconns`; 0: not measured)."""
    from bench import idleconns

    out: dict[str, Any] = {"links": [], "idle": None}
    for w in link_workers if links else ():
        log(f"scale: {links:,} links, --workers {'auto' if w is None else w}")
        out["links"].append(run(links, 0, keepalive_s=keepalive_s, log_dir=log_dir, workers=w))
    if idle:
        log(f"scale: {idle:,} idle connections, --workers {idle_workers}")
        out["idle"] = idleconns.run(idle, idle_workers, log_dir=log_dir, log=log)
    return out


def full_markdown(r: dict[str, Any]) -> str:
    """`full`'s figures: a table per relay of the links, then the idle connections'."""
    parts = [markdown(one) for one in r["links"]]
    if r.get("idle"):
        from bench import idleconns

        parts.append(idleconns.markdown(r["idle"]))
    return "\n".join(parts)


def _workers_list(text: str) -> tuple[int | None, ...]:
    return tuple(None if w == "auto" else int(w) for w in text.split(","))


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    sub = parser.add_subparsers(dest="cmd")
    for name in ("links", "conns"):
        p = sub.add_parser(name, help="(internal) a client process")
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--ca", required=True)
        p.add_argument("--count", type=int, required=True)
        p.add_argument("--kind", choices=("tcp", "tls"), default="tcp")
        p.add_argument("--sources", type=int, default=8)
        p.add_argument("--targets", required=True)
        p.add_argument("--domain", default="tunnel.localhost")
        p.add_argument("--tcp-tunnels", type=int, default=0)
    parser.add_argument("--links", type=int, default=10_000)
    parser.add_argument(
        "--link-workers",
        type=_workers_list,
        default=(1, None),
        help="the relays of the links, comma-separated --workers values (default 1,auto)",
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=0,
        help="public connections through the links' tunnels, on the same relay "
        "(within one process's descriptor limit)",
    )
    parser.add_argument(
        "--kind",
        choices=("tcp", "tls"),
        default="tls",
        help="public connections: TLS by SNI, or to raw TCP ports",
    )
    parser.add_argument(
        "--tcp-tunnels",
        type=int,
        default=100,
        help="with --kind tcp: links that also hold a raw TCP tunnel",
    )
    parser.add_argument("--keepalive-seconds", type=float, default=30.0)
    parser.add_argument("--sources", type=int, default=8, help="127.0.0.x source addresses")
    parser.add_argument(
        "--idle",
        type=int,
        default=100_000,
        help="then idle public TLS connections over a relay of --idle-workers "
        "(bench.idleconns); 0: not measured",
    )
    parser.add_argument("--idle-workers", type=int, default=7)
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results")  # fmt: skip
    parser.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the relay during the idle window (scale-idle-relay.txt in --out)",
    )
    a = parser.parse_args(argv)
    if a.cmd == "links":
        asyncio.run(_links(a))
        return 0
    if a.cmd == "conns":
        asyncio.run(_conns(a))
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    spy_out = a.out / "scale-idle-relay.txt" if a.profile else None
    r: dict[str, Any] = {"links": [], "idle": None}
    for w in a.link_workers if a.links else ():
        one = run(
            a.links, a.connections, a.kind, a.keepalive_seconds, a.sources, a.tcp_tunnels,
            a.out, spy_out if w == 1 else None, w,
        )  # fmt: skip
        if w == 1 and spy_out is not None and spy_out.exists():
            from bench.profile import self_times

            counts, total = self_times(spy_out)
            one["idle_profile_top"] = [
                [leaf, round(n / total * 100, 1)] for leaf, n in counts.most_common(15)
            ]
        r["links"].append(one)
    if a.idle:
        from bench import idleconns

        r["idle"] = idleconns.run(a.idle, a.idle_workers, log_dir=a.out)
    (a.out / "scale.json").write_text(json.dumps(r, indent=2) + "\n")
    md = full_markdown(r)
    (a.out / "scale.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
