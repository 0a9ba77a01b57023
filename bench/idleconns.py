"""Idle public connections at scale: 100,000 over a relay of several workers.

    python -m bench.idleconns [--connections 100000] [--workers 7] [--kind tls|tcp]
                              [--sources-per-client 2] [--in-flight 100] [--out bench/results]
    python -m bench --scale          # bench.scale's links, then this

A process may hold at most ``RLIMIT_NOFILE`` descriptors (20,000 here, a hard limit that
only ``CAP_SYS_RESOURCE`` raises), so no single process holds 100,000 connections: each
holds its share.

- **The relay**: ``twistd tunnelrelay --workers K`` (a supervisor and K workers), with the
  per-tunnel, per-source and per-link shares raised on its command line (`limits`) so that
  one tunnel may hold ``connections / K`` of them, and nothing else changed.
- **K agents** (``twistd tunnelagent``, one tunnel each, TLS or raw TCP), started one after
  the other; the relay hands each link to the worker with the fewest, so each worker holds
  one agent's tunnel (checked in the supervisor's ``/status``: one link per worker, or the
  run fails).
- **K targets**: each agent forwards to a hold server of its own (``hold`` below: accept,
  read and discard, never answer), so that no process holds more than its share.
- **K clients** (``clients`` below), each from its own 127.0.0.x source addresses (a
  (source, destination, port) tuple has ~28,000 ephemeral ports), opening its share of the
  connections spread over every tunnel (TLS: handshake completed, by SNI; raw TCP: to the
  tunnel's port) and then holding them idle, at most ``--in-flight`` being opened at once.

Reported: the connections held (counted by each client, by the relay's merged ``/status``,
by the agents' ``/status`` and by the hold servers), the descriptors of each worker, the
relay's RSS (supervisor + workers) per connection (after minus before, the agents linked and
idle before), the agents' RSS per stream, the time to open them all and the relay's CPU
per connection opened (noisy), and the hand-offs between workers (``/metrics``). Every
process is started here and stopped by PID (a worker left by its supervisor too); every
phase has a deadline; only loopback addresses are used. Writes ``idleconns.json`` and
``idleconns.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import resource
import selectors
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.util import BENCH_DIR, LOOPBACK, cpu_seconds, json_line, rss_bytes

IP_BIND_ADDRESS_NO_PORT = 24
#: Connections one client process opens at once (handshakes in flight).
IN_FLIGHT = 32
#: Seconds any one connection (connect, handshake) may take.
CONNECT_DEADLINE = 60.0
#: Seconds the relay's CPU is measured while every connection idles.
IDLE_SECONDS = 10.0
_ROOT = BENCH_DIR.parent


# -- the hold server: a target that accepts and holds --------------------------------------------


def _hold() -> None:
    """Listen on 127.0.0.1, print ``{"port": P}``; accept every connection, read and discard
    what it sends, close it on EOF. Each line on stdin is answered with ``{"held": n}``;
    EOF on stdin ends the process."""
    srv = socket.socket()
    srv.bind((LOOPBACK, 0))
    srv.listen(4096)
    srv.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(srv, selectors.EVENT_READ, None)
    sel.register(sys.stdin, selectors.EVENT_READ, None)
    held: set[socket.socket] = set()
    print(json.dumps({"port": srv.getsockname()[1]}), flush=True)
    while True:
        for key, _ in sel.select():
            if key.fileobj is srv:
                while True:
                    try:
                        conn, _addr = srv.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:  # out of descriptors: leave it in the backlog
                        break
                    conn.setblocking(False)
                    held.add(conn)
                    sel.register(conn, selectors.EVENT_READ, conn)
            elif key.fd == sys.stdin.fileno():
                if not sys.stdin.readline():
                    return
                print(json.dumps({"held": len(held)}), flush=True)
            else:
                conn = key.data
                try:
                    data = conn.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(conn)
                    held.discard(conn)
                    conn.close()


# -- a client process: its share of the connections ----------------------------------------------


class _Opening:
    """One connection being opened: TCP connect, then (TLS) the handshake."""

    __slots__ = ("fd", "i", "sock", "started", "tls")

    def __init__(self, i: int, sock: socket.socket, started: float) -> None:
        #: Which of the client's connections: its target and source.
        self.i = i
        #: Its descriptor: the selector's key (wrapping in TLS detaches `sock`).
        self.fd = sock.fileno()
        self.sock = sock
        self.tls: ssl.SSLSocket | None = None
        self.started = started


def _clients(a: argparse.Namespace) -> None:
    """Open ``--count`` connections over the targets (round robin from ``--first``), at most
    ``--in-flight`` at once, each attempt within `CONNECT_DEADLINE`; a failed one is tried
    again (same target, same source), at most ``--retries`` times in all; print ``{"held",
    "seconds", "errors", "error"}`` (``errors``: failed attempts); hold them until stdin ends.

    Plain non-blocking sockets and `ssl.SSLSocket` (no asyncio: its TLS transport keeps a
    256 KiB read buffer per connection, 25 GB for 100,000), so a held connection costs
    this process little more than OpenSSL's state."""
    targets: list[list[Any]] = json.loads(Path(a.targets).read_text())
    sources = a.sources.split(",")
    ctx = ssl.create_default_context(cafile=a.ca) if a.kind == "tls" else None
    sel = selectors.DefaultSelector()
    opening: dict[int, _Opening] = {}
    held: list[socket.socket] = []
    errors: list[str] = []
    start = time.monotonic()
    nxt = 0
    again: list[int] = []
    retries = a.retries

    def fail(o: _Opening, why: str) -> None:
        nonlocal retries
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(o.fd)
        opening.pop(o.fd, None)
        errors.append(why)
        (o.tls or o.sock).close()
        if retries > 0:
            retries -= 1
            again.append(o.i)

    def finish(o: _Opening) -> None:
        sel.unregister(o.fd)
        del opening[o.fd]
        held.append(o.tls or o.sock)

    def handshake(o: _Opening) -> None:
        assert o.tls is not None
        try:
            o.tls.do_handshake()
        except ssl.SSLWantReadError:
            sel.modify(o.fd, selectors.EVENT_READ)
        except ssl.SSLWantWriteError:
            sel.modify(o.fd, selectors.EVENT_WRITE)
        except (OSError, ssl.SSLError) as e:
            fail(o, repr(e))
        else:
            finish(o)

    def connected(o: _Opening, i: int) -> None:
        err = o.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            fail(o, repr(OSError(err, os.strerror(err))))
        elif ctx is None:
            finish(o)
        else:
            host = targets[(a.first + i) % len(targets)][0]
            o.tls = ctx.wrap_socket(o.sock, server_hostname=host, do_handshake_on_connect=False)
            handshake(o)

    def begin(i: int) -> None:
        tcp_port = targets[(a.first + i) % len(targets)][1]
        port = a.port if a.kind == "tls" else tcp_port
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.setblocking(False)
        o = _Opening(i, sock, time.monotonic())
        try:
            sock.bind((sources[i % len(sources)], 0))
            code = sock.connect_ex((LOOPBACK, port))
        except OSError as e:
            fail(o, repr(e))
            return
        opening[o.fd] = o
        sel.register(o.fd, selectors.EVENT_WRITE, i)
        if code == 0:
            connected(o, i)
        elif code not in (errno.EINPROGRESS, errno.EAGAIN):
            fail(o, repr(OSError(code, os.strerror(code))))

    while nxt < a.count or opening or again:
        while (nxt < a.count or again) and len(opening) < a.in_flight:
            if again:
                begin(again.pop())
            else:
                begin(nxt)
                nxt += 1
        for key, _ in sel.select(timeout=1.0):
            o = opening[key.fd]
            if o.tls is None:
                connected(o, key.data)
            else:
                handshake(o)
        now = time.monotonic()
        for o in [o for o in opening.values() if now - o.started > CONNECT_DEADLINE]:
            fail(o, f"TimeoutError(no connection after {CONNECT_DEADLINE:g}s)")
    seconds = time.monotonic() - start
    report = {"held": len(held), "seconds": seconds, "errors": len(errors), "error": errors[:3]}
    print(json.dumps(report), flush=True)
    sys.stdin.read()
    for s in held:
        s.close()


# -- the orchestrator ---------------------------------------------------------------------------


def limits(conns: int, workers: int) -> list[str]:
    """The relay options this run needs: one tunnel (one link, one worker) holds
    ``conns / workers`` connections, from a handful of source addresses, its agent's
    links all from 127.0.0.1 (one principal without tokens)."""
    share = str(math.ceil(conns / workers * 1.2) + 100)
    every = str(conns * 2)
    return [
        "--max-connections-per-tunnel", share, "--max-streams-per-link", share,
        "--max-connections-per-source", every, "--max-streams-per-token", every,
        "--max-pending-handshakes", "2048", "--max-pending-per-source", "2048",
        "--handshake-timeout", "30", "--client-hello-timeout", "10", "--drain-grace", "1",
    ]  # fmt: skip


def agent_limits(conns: int, workers: int) -> list[str]:
    """The agent options this run needs: the relay may open its tunnel's share to it."""
    return ["--max-streams", str(math.ceil(conns / workers * 1.2) + 100)]


def _spawn(argv: list[str], log: Path) -> subprocess.Popen[str]:
    """``python -m bench.idleconns ARGV``: JSON lines on its stdout, its stderr to `log`."""
    with open(log, "ab") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "bench.idleconns", *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            cwd=str(_ROOT),
        )


def _ask(p: subprocess.Popen[str], what: str) -> dict[str, Any]:
    assert p.stdin is not None
    p.stdin.write("count\n")
    p.stdin.flush()
    return json_line(p, what, 30)


def _end(p: subprocess.Popen[str], timeout: float = 30) -> None:
    """Close its stdin (it exits), then SIGTERM and SIGKILL by its PID if it does not."""
    with contextlib.suppress(OSError):
        if p.stdin:
            p.stdin.close()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            p.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, sig)
    p.wait()


def _fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def _settle(pids: list[int], seconds: float) -> int:
    time.sleep(seconds)
    return rss_bytes(pids)


def _handoffs(admin_port: int) -> dict[str, float]:
    """The workers' hand-off counts from the supervisor's ``/metrics``, summed by name."""
    from prometheus_client.parser import text_string_to_metric_families

    from tunnel.testing._daemons import admin_get

    code, body = admin_get(admin_port, "/metrics", 30.0)
    found: dict[str, float] = {}
    if code != 200:
        return found
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if "handoff" in sample.name and not sample.name.endswith("_created"):
                found[sample.name] = found.get(sample.name, 0.0) + sample.value
    return found


def run(
    conns: int = 100_000,
    workers: int = 7,
    kind: str = "tls",
    sources_per_client: int = 2,
    in_flight: int = IN_FLIGHT,
    log_dir: Path | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Start the relay, agents, targets and clients; measure; stop them all. Returns the
    figures (see the module docstring).

    @raise RuntimeError: the agents' links did not come out one per worker, or a process
        did not start.
    """
    from tunnel.testing import AgentProcess, RelayProcess

    if 2 + workers * sources_per_client > 254:
        raise ValueError("too many source addresses for 127.0.0.0/24")
    tmp = tempfile.TemporaryDirectory(prefix="tunnels-idleconns-")
    d = Path(tmp.name)
    logs = log_dir or d
    extra = limits(conns, workers)
    tcp_ports = (20000, 20000 + 4 * workers + 100) if kind == "tcp" else None
    out: dict[str, Any] = {
        "connections": conns, "workers": workers, "kind": kind, "agents": workers,
        "clients": workers, "sources": workers * sources_per_client, "in_flight": in_flight,
        "relay_limits": " ".join(extra), "agent_limits": " ".join(agent_limits(conns, workers)),
        "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
    }  # fmt: skip
    relay = RelayProcess.start(
        logs / "idleconns-relay.log",
        state_dir=d / "state",
        workers=workers,
        tcp_ports=tcp_ports,
        listen_options=":backlog=4096",
        extra=extra,
        timeout=120,
    )
    holds: list[subprocess.Popen[str]] = []
    agents: list[AgentProcess] = []
    clients: list[subprocess.Popen[str]] = []
    worker_pids: list[int] = []
    try:
        status = relay.wait_status(
            lambda s: [w.get("state") for w in s.get("workers", [])] == ["running"] * workers,
            f"{workers} workers running",
            120,
        )
        worker_pids = [int(w["pid"]) for w in status["workers"]]
        targets: list[list[Any]] = []
        for i in range(workers):
            hp = _spawn(["hold"], logs / f"idleconns-hold{i}.log")
            holds.append(hp)
            port = int(json_line(hp, f"hold server {i}", 30)["port"])
            agent = AgentProcess(
                logs / f"idleconns-agent{i}.log",
                relay=f"localhost:{relay.port}",
                ca=relay.ca,
                forwards=[f"{port}:tcp" if kind == "tcp" else str(port)],
                extra=agent_limits(conns, workers),
            )
            agents.append(agent)
            t = agent.tunnel(f"{LOOPBACK}:{port}", timeout=60)
            targets.append([t.host, t.tcp_port])
        status = relay.wait_status(
            lambda s: sum(w.get("links") or 0 for w in s["workers"]) == workers,
            f"{workers} links",
            60,
        )
        per_worker = [w["links"] for w in status["workers"]]
        out["links_per_worker"] = per_worker
        if per_worker != [1] * workers:
            raise RuntimeError(f"links per worker {per_worker}, not one each")
        (d / "targets.json").write_text(json.dumps(targets))
        relay_pids = [relay.pid]
        agent_pids = [a.pid for a in agents]
        hold_pids = [h.pid for h in holds]
        rss0 = _settle(relay_pids, 3.0)
        arss0, hrss0 = rss_bytes(agent_pids), rss_bytes(hold_pids)
        out["relay_rss_before_MiB"] = rss0 / 2**20
        out["agents_rss_before_MiB"] = arss0 / 2**20
        cpu0, acpu0 = cpu_seconds(relay_pids), cpu_seconds(agent_pids)
        handoffs0 = _handoffs(relay.admin_port)

        share = [conns // workers + (1 if j < conns % workers else 0) for j in range(workers)]
        log(f"idleconns: {conns:,} {kind} connections from {workers} clients")
        t0 = time.monotonic()
        first = 0
        for j in range(workers):
            srcs = ",".join(
                f"127.0.0.{2 + j * sources_per_client + s}" for s in range(sources_per_client)
            )
            argv = ["clients", "--port", str(relay.port), "--ca", str(relay.ca)]
            argv += ["--kind", kind, "--targets", str(d / "targets.json"), "--sources", srcs]
            argv += ["--count", str(share[j]), "--first", str(first)]
            argv += ["--in-flight", str(in_flight), "--retries", str(share[j] // 10 + 10)]
            clients.append(_spawn(argv, logs / f"idleconns-client{j}.log"))
            first += share[j]
        deadline = t0 + 120 + conns * 0.006
        reports = [
            json_line(c, f"client {j}", max(1.0, deadline - time.monotonic()))
            for j, c in enumerate(clients)
        ]
        t1 = time.monotonic()
        cpu1, acpu1 = cpu_seconds(relay_pids), cpu_seconds(agent_pids)
        held = sum(r["held"] for r in reports)
        out["connections_held_by_clients"] = held
        out["connection_errors"] = sum(r["errors"] for r in reports)
        out["connection_error_examples"] = [e for r in reports for e in r["error"]][:3]
        out["open_seconds"] = t1 - t0
        out["open_seconds_slowest_client"] = max(r["seconds"] for r in reports)
        out["relay_cpu_ms_per_connection_open"] = (cpu1 - cpu0) * 1e3 / max(1, held)
        out["agents_cpu_ms_per_stream_open"] = (acpu1 - acpu0) * 1e3 / max(1, held)

        # Counted where they are held: the relay's workers, the agents, the targets.
        status = relay.wait_status(
            lambda s: s.get("public_connections") == held, f"{held} public connections", 60
        )
        out["relay_public_connections"] = status["public_connections"]
        out["relay_streams"] = status["streams"]
        out["public_connections_per_worker"] = [w["public_connections"] for w in status["workers"]]
        out["links_per_worker_at_end"] = [w["links"] for w in status["workers"]]
        out["open_fds_per_worker"] = [_fds(pid) for pid in worker_pids]
        out["agent_streams"] = [int(a.status(30)["streams"]) for a in agents]
        out["held_by_targets"] = [int(_ask(h, "hold server")["held"]) for h in holds]
        out["handoffs"] = {
            k: v - handoffs0.get(k, 0.0) for k, v in _handoffs(relay.admin_port).items()
        }
        rss1 = _settle(relay_pids, 5.0)
        arss1, hrss1 = rss_bytes(agent_pids), rss_bytes(hold_pids)
        c0, w0 = cpu_seconds(relay_pids), time.monotonic()
        time.sleep(IDLE_SECONDS)
        c1, w1 = cpu_seconds(relay_pids), time.monotonic()
        out["relay_cpu_pct_idle"] = (c1 - c0) / (w1 - w0) * 100
        out["idle_seconds"] = w1 - w0
        out["relay_rss_after_MiB"] = rss1 / 2**20
        out["relay_rss_per_connection_KiB"] = (rss1 - rss0) / max(1, held) / 1024
        out["relay_rss_per_worker_MiB"] = [rss_bytes([p]) / 2**20 for p in worker_pids]
        out["agents_rss_after_MiB"] = arss1 / 2**20
        out["agent_rss_per_stream_KiB"] = (arss1 - arss0) / max(1, held) / 1024
        out["targets_rss_per_connection_KiB"] = (hrss1 - hrss0) / max(1, held) / 1024
        out["clients_rss_MiB"] = rss_bytes([c.pid for c in clients]) / 2**20
    finally:
        # Told to end all at once, then waited for one by one.
        for c in clients:
            with contextlib.suppress(OSError):
                if c.stdin:
                    c.stdin.close()
        for agent in agents:
            agent.signal(signal.SIGTERM)
        for c in clients:
            _end(c)
        for agent in agents:
            agent.stop(timeout=30)
        for h in holds:
            _end(h)
        relay.stop(timeout=60)
        for pid in worker_pids:  # a worker its supervisor did not end
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        tmp.cleanup()
    return out


ROWS = [
    ("connections_held_by_clients", "idle public connections held (the clients' count)",
     "{:,.0f}"),
    ("relay_public_connections", "public connections, the relay's merged /status", "{:,.0f}"),
    ("public_connections_per_worker", "of which per worker", "{}"),
    ("links_per_worker", "agent links per worker", "{}"),
    ("open_fds_per_worker", "descriptors open per worker", "{}"),
    ("agent_streams", "streams per agent (its /status)", "{}"),
    ("held_by_targets", "connections per target (hold server)", "{}"),
    ("connection_errors", "attempts that failed (each tried again, at most 10 % more)",
     "{:,.0f}"),
    ("open_seconds", "time to open them all, s (noisy)", "{:.1f}"),
    ("relay_cpu_ms_per_connection_open",
     "relay CPU per connection opened, all processes, ms (noisy)", "{:.2f}"),
    ("agents_cpu_ms_per_stream_open", "agent CPU per stream opened, ms (noisy)", "{:.2f}"),
    ("relay_rss_per_connection_KiB",
     "relay RSS per idle public connection (supervisor + workers), KiB", "{:.1f}"),
    ("relay_cpu_pct_idle",
     "relay CPU while they idle (10 s; the agents' keepalives included), % of a core",
     "{:.1f}"),
    ("agent_rss_per_stream_KiB", "agent RSS per idle stream, KiB", "{:.1f}"),
    ("targets_rss_per_connection_KiB", "target (hold server) RSS per connection, KiB",
     "{:.1f}"),
    ("relay_rss_before_MiB", "relay RSS before (agents linked), MiB", "{:.0f}"),
    ("relay_rss_after_MiB", "relay RSS with the connections, MiB", "{:.0f}"),
    ("relay_rss_per_worker_MiB", "of which per worker, MiB", "{}"),
    ("clients_rss_MiB", "the clients' RSS, MiB", "{:.0f}"),
]  # fmt: skip


def _shown(value: Any, fmt: str) -> str:
    if isinstance(value, list):
        return " / ".join(f"{v:,.0f}" if isinstance(v, int | float) else str(v) for v in value)
    return fmt.format(value)


def markdown(r: dict[str, Any]) -> str:
    """The figures as a two-column table, with the relay's limits of the run."""
    out = (
        f"{r['connections']:,} idle {r['kind']} connections requested over {r['agents']} "
        f"tunnels (one agent each), `--workers {r['workers']}`, {r['clients']} client "
        f"processes from {r['sources']} 127.0.0.x addresses, {r['in_flight']} "
        f"connections in flight per client; every process's descriptor "
        f"limit {r['nofile']:,}. Relay options of the run: `{r['relay_limits']}`; agents: "
        f"`{r['agent_limits']}`.\n\n| figure | value |\n|---|---:|\n"
    )
    for key, label, fmt in ROWS:
        if key in r:
            out += f"| {label} | {_shown(r[key], fmt)} |\n"
    for name, value in sorted(r.get("handoffs", {}).items()):
        out += f"| `{name}` during the opening (all workers) | {value:,.0f} |\n"
    if r.get("connection_error_examples"):
        out += f"\nconnection errors, e.g.: {r['connection_error_examples']}\n"
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m bench.idleconns", description=__doc__)
    sub = parser.add_subparsers(dest="cmd")
    sub.add_parser("hold", help="(internal) a target that accepts and holds")
    p = sub.add_parser("clients", help="(internal) a client process")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--kind", choices=("tcp", "tls"), default="tls")
    p.add_argument("--targets", required=True)
    p.add_argument("--sources", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--first", type=int, default=0)
    p.add_argument("--in-flight", type=int, default=IN_FLIGHT)
    p.add_argument("--retries", type=int, default=0)
    parser.add_argument("--connections", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=7, help="relay workers = agents")
    parser.add_argument("--kind", choices=("tcp", "tls"), default="tls")
    parser.add_argument("--sources-per-client", type=int, default=2)
    parser.add_argument("--in-flight", type=int, default=IN_FLIGHT, help="per client")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    a = parser.parse_args(argv)
    if a.cmd == "hold":
        _hold()
        return 0
    if a.cmd == "clients":
        _clients(a)
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    r = run(a.connections, a.workers, a.kind, a.sources_per_client, a.in_flight, a.out)
    (a.out / "idleconns.json").write_text(json.dumps(r, indent=2) + "\n")
    md = markdown(r)
    (a.out / "idleconns.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
