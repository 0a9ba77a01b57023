"""A relay run as several workers, against the same relay as one process.

    python -m bench.workers [--workers 1,2] [--quick] [--rounds 3] [--no-handoff]
                            [--out bench/results]
    python -m bench --workers       # N = 1 and 2, after (or instead of) the paths

Every N of ``--workers`` (1: today's relay, one process, no supervisor; N > 1:
``twistd -n tunnelrelay --workers N``) is started at once, on loopback only, each with its
own agents (``twistd -n tunnelagent``, one raw TCP and one TLS tunnel each, to data servers
of ``bench.servers``); every process is started here and ended by PID. Then:

1. **Links** (once): links and tunnels per worker (the supervisor's ``/status``, its
   ``workers`` list), the supervisor's system calls (``strace -c -f``) and CPU per tunnel
   granted while the agents link, and each process's resident memory.
2. **Spread** (once): TLS connections held open at once, spread over the tunnels: public
   connections per worker.
3. **Rounds** (``--rounds``, the Ns alternating within each round): sequential connections
   asking the data server for one byte, raw TCP and TLS (connect, + handshake, to first
   byte, p50 / p99; the relay's CPU per connection; the TLS connections handed off to the
   worker owning their tunnel, from the workers' hand-off counts in ``/metrics``); then
   streams downloading at once, half raw TCP, half TLS (bounded: a deadline per socket and
   for the phase): MB/s, and per worker its CPU (``/proc/<pid>/stat``, pids from
   ``/status``), the MB through the tunnels it owns and its CPU per MB.
4. **System calls** (once): of the whole relay per raw TCP and per TLS connection, with
   the hand-offs in the same window (``strace -c -f`` on every worker and the supervisor).

Then the hand-off mechanism alone (`bench.handoff`) unless ``--no-handoff``. Writes
``workers.json`` and ``workers.md`` into ``--out``. CPU, times and MB/s on a shared machine
are noisy; counts (links, connections, hand-offs, system calls, memory) are not.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import handoff
from bench.util import BENCH_DIR, LOOPBACK, cpu_seconds
from tunnel.testing import AgentProcess, RelayProcess

REQUEST = struct.Struct("!cQ")
#: Names of the workers' hand-off counts (whatever their exact spelling).
_HANDOFF = re.compile(r"hand_?off|handed")
#: Seconds any one socket operation of the clients may take.
SOCKET_DEADLINE = 30.0
#: Seconds the throughput phase may take in all.
PHASE_DEADLINE = 300.0


@dataclass
class Sizes:
    agents: int = 8
    firsts: int = 1000
    hold: int = 64
    streams: int = 32
    megabytes: int = 64

    @classmethod
    def quick(cls) -> Sizes:
        return cls(agents=4, firsts=100, hold=16, streams=8, megabytes=4)


@dataclass
class Tunnels:
    """The tunnels of the agents: raw TCP ``(port)`` and TLS ``(host)``."""

    tcp: list[int] = field(default_factory=list)
    tls: list[str] = field(default_factory=list)


def _start_data_server(log: Path) -> tuple[subprocess.Popen[bytes], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.servers"],
        stdout=subprocess.PIPE,
        stderr=open(log, "ab"),  # noqa: SIM115
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError("bench.servers did not start")
    return proc, int(json.loads(line)["data"])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _connect(kind: str, target: Any, relay: RelayProcess, ctx: ssl.SSLContext) -> socket.socket:
    if kind == "tcp":
        return socket.create_connection((LOOPBACK, target), timeout=SOCKET_DEADLINE)
    raw = socket.create_connection((LOOPBACK, relay.port), timeout=SOCKET_DEADLINE)
    return ctx.wrap_socket(raw, server_hostname=target)


def _download(sock: socket.socket, size: int) -> int:
    sock.sendall(REQUEST.pack(b"D", size))
    got = 0
    buf = bytearray(1 << 20)
    while got < size:
        n = sock.recv_into(buf)
        if not n:
            break
        got += n
    return got


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _workers(relay: RelayProcess, plain: bool) -> list[dict[str, Any]]:
    """The workers of the supervisor's ``/status`` (for one process: itself, as worker 0)."""
    status = relay.status()
    if plain:
        return [
            {
                "index": 0,
                "pid": relay.pid,
                "links": status["links"],
                "tunnels": status["tunnels"],
                "public_connections": status["public_connections"],
            }
        ]
    return list(status["workers"])


def _handoffs(relay: RelayProcess) -> dict[str, dict[str, float]]:
    """Every sample of the relay's ``/metrics`` that counts hand-offs, by worker."""
    from prometheus_client.parser import text_string_to_metric_families

    from tunnel.testing._daemons import admin_get

    code, body = admin_get(relay.admin_port, "/metrics", 10.0)
    if code != 200:
        return {}
    found: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if _HANDOFF.search(sample.name) and not sample.name.endswith("_created"):
                worker = sample.labels.get("worker", "supervisor")
                row = found.setdefault(worker, {})
                row[sample.name] = row.get(sample.name, 0.0) + sample.value
    return found


def _owners(relay: RelayProcess, plain: bool) -> dict[Any, int]:
    """Which worker owns each tunnel: raw TCP port or TLS host -> worker index."""
    from tunnel.testing._daemons import admin_get

    code, body = admin_get(relay.admin_port, "/links", 10.0)
    if code != 200:
        raise RuntimeError(f"/links answered {code}")
    owners: dict[Any, int] = {}
    for t in json.loads(body)["tunnels"]:
        index = 0 if plain else int(t["worker"])
        if t.get("tcp_port"):
            owners[t["tcp_port"]] = index
        owners[t["host"].split(":")[0]] = index
    return owners


def _first_bytes(
    kind: str, targets: list[Any], count: int, relay: RelayProcess, ctx: ssl.SSLContext
) -> list[float]:
    times = []
    for i in range(count):
        t0 = time.perf_counter()
        with _connect(kind, targets[i % len(targets)], relay, ctx) as s:
            if _download(s, 1) != 1:
                raise RuntimeError(f"no first byte over {kind}")
            times.append(time.perf_counter() - t0)
    return times


def _throughput(
    tunnels: Tunnels,
    sizes: Sizes,
    relay: RelayProcess,
    ctx: ssl.SSLContext,
    owners: dict[Any, int],
) -> tuple[float, dict[int, int], list[str]]:
    """All streams at once; (seconds, bytes per owning worker, errors)."""
    size = sizes.megabytes << 20
    jobs: list[tuple[str, Any]] = []
    for i in range(sizes.streams):
        if i % 2 == 0:
            jobs.append(("tcp", tunnels.tcp[(i // 2) % len(tunnels.tcp)]))
        else:
            jobs.append(("tls", tunnels.tls[(i // 2) % len(tunnels.tls)]))
    carried: dict[int, int] = {}
    errors: list[str] = []
    lock = threading.Lock()

    def one(kind: str, target: Any) -> None:
        try:
            with _connect(kind, target, relay, ctx) as s:
                got = _download(s, size)
        except OSError as e:
            with lock:
                errors.append(f"{kind} {target}: {e}")
            return
        with lock:
            carried[owners[target]] = carried.get(owners[target], 0) + got
            if got != size:
                errors.append(f"{kind} {target}: {got} of {size} bytes")

    threads = [threading.Thread(target=one, args=job, daemon=True) for job in jobs]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    deadline = time.monotonic() + PHASE_DEADLINE
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    seconds = time.perf_counter() - t0
    if any(t.is_alive() for t in threads):
        errors.append(f"streams still running after {PHASE_DEADLINE:g} s")
    return seconds, carried, errors


@contextlib.contextmanager
def _held(
    tunnels: Tunnels, count: int, relay: RelayProcess, ctx: ssl.SSLContext
) -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    try:
        for i in range(count):
            socks.append(_connect("tls", tunnels.tls[i % len(tunnels.tls)], relay, ctx))
        yield socks
    finally:
        for s in socks:
            s.close()


class _Setup:
    """One relay of `n` workers (1: one process) with its agents and data servers."""

    def __init__(self, n: int, sizes: Sizes, workdir: Path, log: Any) -> None:
        self.n = n
        self.plain = n == 1
        self.sizes = sizes
        here = workdir / f"n{n}"
        here.mkdir()
        self.servers: list[subprocess.Popen[bytes]] = []
        self.agents: list[AgentProcess] = []
        self.relay: RelayProcess | None = None
        self.result: dict[str, Any] = {"workers": n, "errors": [], "rounds": []}
        try:
            self._start(here, log)
        except BaseException:
            self.stop()
            raise

    def _start(self, here: Path, log: Any) -> None:
        servers, data_port = _start_data_server(here / "servers.log")
        self.servers.append(servers)
        servers_tls, data_port_tls = _start_data_server(here / "servers.log")
        self.servers.append(servers_tls)
        extra = [] if self.plain else ["--workers", str(self.n)]
        ports = (21000 + 200 * self.n, 21000 + 200 * self.n + 199)
        self.relay = relay = RelayProcess.start(
            here / "relay.log", state_dir=here / "state", tcp_ports=ports, extra=extra
        )
        log(f"workers: N={self.n}: {self.sizes.agents} agents")
        supervisor = [] if self.plain else [relay.pid]
        tracer = _Tracer(supervisor[0], here / "strace-grants.txt") if supervisor else None
        sup_before = _own_cpu(supervisor)
        for i in range(self.sizes.agents):
            self.agents.append(
                AgentProcess(
                    here / f"agent{i}.log",
                    relay=f"localhost:{relay.port}",
                    ca=relay.ca,
                    forwards=[f"{data_port}:tcp", f"{data_port_tls}"],
                )
            )
        self.tunnels = Tunnels()
        for agent in self.agents:
            tcp = agent.tunnel(f"127.0.0.1:{data_port}")
            tls = agent.tunnel(f"127.0.0.1:{data_port_tls}")
            assert tcp.tcp_port is not None
            self.tunnels.tcp.append(tcp.tcp_port)
            self.tunnels.tls.append(tls.host)
        granted = 2 * self.sizes.agents
        relay.wait_status(lambda s: s["tunnels"] >= granted, "every tunnel in the relay's /status")
        if tracer is not None:
            calls = tracer.stop()
            self.result["supervisor_per_grant"] = {
                "cpu_ms": round((_own_cpu(supervisor) - sup_before) * 1e3 / granted, 2),
                "syscalls": round(sum(calls.values()) / granted, 1),
                "detail": {k: round(v / granted, 2) for k, v in sorted(calls.items())},
            }
        self.ctx = ssl.create_default_context(cafile=str(relay.ca))
        self.result["links"] = [
            {k: w.get(k) for k in ("index", "pid", "links", "tunnels")}
            for w in _workers(relay, self.plain)
        ]
        self.owners = _owners(relay, self.plain)
        self.pids = {int(w["index"]): int(w["pid"]) for w in _workers(relay, self.plain)}
        self.result["rss_mib"] = {
            "workers": [round(_own_rss(p) / 2**20, 1) for _, p in sorted(self.pids.items())],
            "supervisor": None if self.plain else round(_own_rss(relay.pid) / 2**20, 1),
        }

    def first_bytes(self) -> dict[str, Any]:
        """One round of sequential connections per kind: first-byte times, the relay's CPU
        per connection, and the hand-offs it made."""
        assert self.relay is not None
        out: dict[str, Any] = {}
        for kind, targets in (("tcp", self.tunnels.tcp), ("tls", self.tunnels.tls)):
            before = _handoffs(self.relay)
            cpu_before = self._relay_cpu()
            times = _first_bytes(kind, targets, self.sizes.firsts, self.relay, self.ctx)
            cpu = self._relay_cpu() - cpu_before
            after = _handoffs(self.relay)
            sent = sum(
                v - before.get(w, {}).get(k, 0.0)
                for w, row in after.items()
                for k, v in row.items()
                if k.endswith("sent")
            )
            out[kind] = {
                "p50_ms": round(statistics.median(times) * 1e3, 3),
                "p99_ms": round(_percentile(times, 0.99) * 1e3, 3),
                "relay_cpu_us_per_connection": round(cpu / len(times) * 1e6, 1),
                "handed_off": int(sent),
            }
        return out

    def traced_first_bytes(self, count: int, workdir: Path) -> dict[str, Any]:
        """System calls per connection of the whole relay (every worker and the supervisor,
        ``strace -c -f`` attached for the window of `count` connections per kind), with the
        hand-offs made in that window: counts, whatever the machine's load."""
        assert self.relay is not None
        pids = list(self.pids.values()) + ([] if self.plain else [self.relay.pid])
        out: dict[str, Any] = {}
        for kind, targets in (("tcp", self.tunnels.tcp), ("tls", self.tunnels.tls)):
            before = _handoffs(self.relay)
            tracers = [_Tracer(pid, workdir / f"strace-n{self.n}-{kind}-{pid}.txt") for pid in pids]
            try:
                _first_bytes(kind, targets, count, self.relay, self.ctx)
            finally:
                calls = [t.stop() for t in tracers]
            after = _handoffs(self.relay)
            merged: dict[str, int] = {}
            for c in calls:
                for name, n in c.items():
                    merged[name] = merged.get(name, 0) + n
            out[kind] = {
                "syscalls_per_connection": round(sum(merged.values()) / count, 2),
                "detail": {
                    k: round(v / count, 2) for k, v in sorted(merged.items()) if v >= count / 2
                },
                "handed_off": int(
                    sum(
                        v - before.get(w, {}).get(k, 0.0)
                        for w, row in after.items()
                        for k, v in row.items()
                        if k.endswith("sent")
                    )
                ),
                "connections": count,
            }
        return out

    def held(self) -> list[dict[str, Any]]:
        assert self.relay is not None
        relay = self.relay
        with _held(self.tunnels, self.sizes.hold, relay, self.ctx):
            relay.wait_status(
                lambda s: s["public_connections"] >= self.sizes.hold, "the held connections"
            )
            return [
                {k: w.get(k) for k in ("index", "public_connections")}
                for w in _workers(relay, self.plain)
            ]

    def throughput(self) -> dict[str, Any]:
        assert self.relay is not None
        agent_pids = [a.pid for a in self.agents]
        supervisor = [] if self.plain else [self.relay.pid]
        cpu_before = {i: cpu_seconds([p]) for i, p in self.pids.items()}
        sup_before = _own_cpu(supervisor)
        agents_before = cpu_seconds(agent_pids)
        seconds, carried, errors = _throughput(
            self.tunnels, self.sizes, self.relay, self.ctx, self.owners
        )
        cpu = {i: cpu_seconds([p]) - cpu_before[i] for i, p in self.pids.items()}
        sup = _own_cpu(supervisor) - sup_before
        total = sum(carried.values())
        self.result["errors"] += errors
        return {
            "seconds": round(seconds, 3),
            "mb": round(total / 1e6, 1),
            "mb_per_s": round(total / 1e6 / seconds, 1) if seconds else None,
            "per_worker": [
                {
                    "index": i,
                    "cpu_s": round(cpu[i], 2),
                    "mb": round(carried.get(i, 0) / 1e6, 1),
                    "cpu_ms_per_mb": round(cpu[i] * 1e3 / (carried[i] / 1e6), 2)
                    if carried.get(i)
                    else None,
                }
                for i in sorted(self.pids)
            ],
            "relay_cpu_ms_per_mb": round((sum(cpu.values()) + sup) * 1e3 / (total / 1e6), 2)
            if total
            else None,
            "supervisor_cpu_s": round(sup, 2),
            "agents_cpu_s": round(cpu_seconds(agent_pids) - agents_before, 2),
        }

    def _relay_cpu(self) -> float:
        """The CPU seconds of the workers and of the supervisor itself."""
        assert self.relay is not None
        own = [] if self.plain else [self.relay.pid]
        return sum(cpu_seconds([p]) for p in self.pids.values()) + _own_cpu(own)

    def stop(self) -> None:
        for agent in self.agents:
            agent.stop()
        if self.relay is not None:
            self.relay.stop()
        for proc in self.servers:
            _stop(proc)


def _own_cpu(pids: list[int]) -> float:
    """utime+stime of `pids` themselves, without their descendants."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _own_rss(pid: int) -> int:
    """The resident set of `pid` itself, in bytes (0 once it is gone)."""
    try:
        pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except OSError:
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


class _Tracer:
    """``strace -c -f`` attached to `pid` until `stop` (a window of counts)."""

    def __init__(self, pid: int, out: Path) -> None:
        self.out = out
        self.proc = subprocess.Popen(
            ["strace", "-c", "-f", "-p", str(pid), "-o", str(out)], stderr=subprocess.PIPE
        )
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()
        if b"attached" not in line:
            _stop(self.proc)
            raise RuntimeError(f"strace did not attach to {pid}: {line!r}")

    def stop(self) -> dict[str, int]:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=20)
        return handoff.parse_strace_summary(self.out.read_text())


def _median_of(rows: list[dict[str, Any]], *path: str) -> float | None:
    values = []
    for row in rows:
        value: Any = row
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, (int, float)):
            values.append(float(value))
    return round(statistics.median(values), 3) if values else None


def run(
    workers: list[int], sizes: Sizes, with_handoff: bool = True, log: Any = print, rounds: int = 3
) -> dict[str, Any]:
    """Every N set up at once, then `rounds` rounds of first bytes and of throughput, the
    Ns alternating within each round; then the hand-off alone."""
    results: dict[str, Any] = {"sizes": sizes.__dict__, "rounds": rounds, "runs": []}
    setups: list[_Setup] = []
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
        try:
            for n in workers:
                try:
                    setups.append(_Setup(n, sizes, Path(tmp), log))
                except Exception as e:  # one N failing leaves the others' figures
                    log(f"workers: N={n}: ERROR {e}")
                    results["runs"].append({"workers": n, "errors": [repr(e)]})
            for setup in setups:
                log(f"workers: N={setup.n}: {sizes.hold} TLS connections held")
                setup.result["held"] = setup.held()
            for r in range(rounds):
                for setup in setups:
                    log(f"workers: round {r + 1}/{rounds}, N={setup.n}: first bytes")
                    firsts = setup.first_bytes()
                    log(f"workers: round {r + 1}/{rounds}, N={setup.n}: streams")
                    setup.result["rounds"].append(
                        {"first_byte": firsts, "throughput": setup.throughput()}
                    )
            for setup in setups:
                log(f"workers: N={setup.n}: system calls (strace)")
                setup.result["traced"] = setup.traced_first_bytes(
                    max(100, sizes.firsts // 3), Path(tmp)
                )
        finally:
            for setup in setups:
                setup.stop()
    for setup in setups:
        res, rows = setup.result, setup.result["rounds"]
        res["median"] = {
            f"{kind}_{key}": _median_of(rows, "first_byte", kind, key)
            for kind in ("tcp", "tls")
            for key in ("p50_ms", "p99_ms", "relay_cpu_us_per_connection", "handed_off")
        } | {
            key: _median_of(rows, "throughput", key)
            for key in ("mb_per_s", "relay_cpu_ms_per_mb", "supervisor_cpu_s")
        }
        results["runs"].append(res)
    results["runs"].sort(key=lambda r: r["workers"])
    if with_handoff:
        log("workers: the hand-off alone (bench.handoff)")
        quick = sizes.firsts < Sizes().firsts
        results["handoff"] = handoff.run(1000 if quick else 5000, 3)
    return results


def _row(cells: list[Any]) -> str:
    return "| " + " | ".join("-" if c is None else str(c) for c in cells) + " |"


def markdown(results: dict[str, Any]) -> str:
    """The tables of `run`, each figure labelled noisy or a count."""
    s = results["sizes"]
    out = [
        f"Workers: {s['agents']} agents (one raw TCP and one TLS tunnel each), "
        f"{s['firsts']} sequential first-byte connections per kind and round, {s['hold']} "
        f"held TLS connections, {s['streams']} streams of {s['megabytes']} MB at once (half "
        f"raw TCP, half TLS); {results['rounds']} rounds, the Ns alternating "
        "(`python -m bench.workers`). Medians of the rounds. Times, MB/s and CPU: noisy, "
        "shared machine; links, connections, hand-offs and system calls: counts.",
        "",
        "| N | links per worker | held TLS connections per worker | TLS connections handed "
        "off | first byte TCP p50 / p99 ms | first byte TLS p50 / p99 ms | relay CPU µs per "
        "TCP / TLS connection | MB/s | relay CPU ms per MB | supervisor per grant |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    traced = []
    for r in results["runs"]:
        if "median" not in r:
            out.append(_row([r["workers"], *["-"] * 8, "; ".join(r["errors"])]))
            continue
        md = r["median"]
        grant = r.get("supervisor_per_grant")
        out.append(
            _row(
                [
                    r["workers"],
                    " / ".join(str(w["links"]) for w in r["links"]),
                    " / ".join(str(w["public_connections"]) for w in r["held"]),
                    f"{md['tls_handed_off']:g} of {s['firsts']}",
                    f"{md['tcp_p50_ms']} / {md['tcp_p99_ms']}",
                    f"{md['tls_p50_ms']} / {md['tls_p99_ms']}",
                    f"{md['tcp_relay_cpu_us_per_connection']} / "
                    f"{md['tls_relay_cpu_us_per_connection']}",
                    md["mb_per_s"],
                    md["relay_cpu_ms_per_mb"],
                    f"{grant['syscalls']} system calls, {grant['cpu_ms']} ms CPU" if grant else "-",
                ]
            )
        )
        if "traced" in r:
            t = r["traced"]
            traced.append(
                _row(
                    [
                        r["workers"],
                        t["tcp"]["syscalls_per_connection"],
                        t["tls"]["syscalls_per_connection"],
                        f"{t['tls']['handed_off']} of {t['tls']['connections']}",
                        ", ".join(f"{k} {v}" for k, v in t["tls"]["detail"].items()),
                    ]
                )
            )
    if traced:
        out += [
            "",
            "System calls of the whole relay per public connection (counts; `strace -c -f` "
            "on every worker and the supervisor for the window of the connections):",
            "",
            "| N | per raw TCP connection | per TLS connection | TLS connections handed off "
            "| per TLS connection, by call |",
            "|---|---|---|---|---|",
            *traced,
        ]
    rss = [
        f"N={r['workers']}: workers "
        + " / ".join(str(m) for m in r["rss_mib"]["workers"])
        + " MiB"
        + (f", supervisor {r['rss_mib']['supervisor']} MiB" if r["rss_mib"]["supervisor"] else "")
        for r in results["runs"]
        if "rss_mib" in r
    ]
    if rss:
        out += [
            "",
            "Resident memory with the agents linked, idle (counts): " + "; ".join(rss) + ".",
        ]
    out += [
        "",
        "Per worker, each round: CPU ms per MB (MB through the tunnels it owns).",
        "",
    ]
    for r in results["runs"]:
        for i, row in enumerate(r.get("rounds", [])):
            tp = row["throughput"]
            per = " / ".join(f"{w['cpu_ms_per_mb']} ({w['mb']} MB)" for w in tp["per_worker"])
            out.append(
                f"- N={r['workers']}, round {i + 1}: {per}; {tp['mb_per_s']} MB/s; "
                f"supervisor {tp['supervisor_cpu_s']} s, agents {tp['agents_cpu_s']} s CPU"
            )
        if r["errors"]:
            out.append(f"- N={r['workers']} errors: " + "; ".join(r["errors"][:5]))
    if "handoff" in results:
        out += ["", handoff.markdown(results["handoff"])]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.workers", description=__doc__)
    parser.add_argument("--workers", default="1,2", help="comma-separated N (1: one process)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-handoff", action="store_true")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per N (default 3)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    a = parser.parse_args(argv)
    try:
        workers = [int(n) for n in a.workers.split(",")]
    except ValueError:
        parser.error("--workers: comma-separated numbers")
    if not workers or any(not 1 <= n <= 16 for n in workers):
        parser.error("--workers: each N in 1..16")
    sizes = Sizes.quick() if a.quick else Sizes()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if not 1 <= a.rounds <= 20:
        parser.error("--rounds: 1..20")
    results = run(workers, sizes, not a.no_handoff, log, a.rounds)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "workers.json").write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    (a.out / "workers.md").write_text(text)
    print(text)
    return 1 if any(r["errors"] for r in results["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
