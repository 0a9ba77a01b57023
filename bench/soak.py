"""
Soak test of the relay: hours of churn, and whether its memory and descriptors stay flat.

    python -m bench.soak [--duration 3600] [--interval 5] [--out bench/results/soak]

Starts a development relay (``twistd tunnelrelay`` with ``--admin``), a local HTTP server and
an echo server (threads of this process), a loopback cut proxy in front of the relay, and
agents whose links go through the proxy: in-process `Agent` objects and, one at a time,
``twistd tunnelagent`` processes. For ``--duration`` seconds it churns, one operation every
``--pace`` seconds:

- tunnels opened (``Agent.forward``) and closed (``Tunnel.close``), TLS and raw TCP;
- connections through them: curl and Python TLS GETs to the TLS URLs, echo round trips
  through the raw TCP ports (some held open for a few round trips);
- every ``--cut-every`` seconds a link cut (every proxied connection reset; agents reconnect
  and reclaim their tunnels);
- every ``--agent-every`` seconds a ``twistd tunnelagent`` process started or stopped.

Bounds: at most 20 tunnels and 50 connections in flight; every connection has a timeout.

Every ``--interval`` seconds the relay's RSS (VmRSS), open descriptors (/proc/PID/fd) and its
``/status`` counts are appended to ``soak.csv``. At the end every tunnel is closed and every
agent stopped; the relay's idle state is sampled once more (``phase=idle-end``) and compared
with its idle state before the churn (``phase=idle-start``). Written to ``--out``:
``soak.csv``, ``soak.png`` (RSS and fds over time) and ``summary.json``.

The check: after warm-up (the first 10% of the run) RSS must not grow by more than 1% an
hour (``--max-growth``), extrapolated from the median of the samples just after warm-up and
of the last 5% of the samples. Exit status 1 when it fails, 2 on a setup error.

Loopback only. Every process started here is ended by PID (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import random
import shlex
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunnel.testing._cutproxy import CutProxy
from tunnel.testing._daemons import AgentProcess, RelayProcess, child_env, wait_for
from tunnel.testing._servers import LocalServer, echo_handler, http_handler

DOMAIN = "tunnel.localhost"
LOOPBACK = "127.0.0.1"

#: In-process agents, and per agent how many TLS and raw TCP tunnels it may hold at once.
AGENTS = 3
HTTP_SLOTS = 3
TCP_SLOTS = 2
#: Tunnels at most: in-process ones plus the (at most one) agent process's two.
MAX_TUNNELS = AGENTS * (HTTP_SLOTS + TCP_SLOTS) + 2
MAX_INFLIGHT = 50
CONNECT_TIMEOUT = 10.0
STATUS_KEYS = (
    "links",
    "agents",
    "tunnels",
    "streams",
    "public_connections",
    "tcp_listeners",
    "tcp_ports_in_use",
    "pending_handshakes",
    "open_fds",
)
COLUMNS = ("t", "phase", "rss_kib", "fds", *STATUS_KEYS, "ops", "errors", "inflight")


# ---------------------------------------------------------------------------------------------
# The relay process


class Relay:
    def __init__(self, work: Path, prefix: list[str] | None = None) -> None:
        self.work = work
        #: Put before ``twistd`` (e.g. a tracing wrapper).
        self.prefix = prefix or []
        self.state = work / "relay-state"
        # Below Linux's ephemeral range (32768-60999): an outgoing connection that happens to
        # take a port of the range as its local port makes a reclaim miss that port.
        low = random.randrange(20000, 30000)
        self.tcp_range = (low, low + 1999)
        self.log = work / "relay.log"
        self.proc: RelayProcess | None = None

    @property
    def ca(self) -> Path:
        return self.state / "ca.pem"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def port(self) -> int:
        assert self.proc is not None
        return self.proc.port

    def start(self) -> None:
        self.proc = RelayProcess.start(
            self.log,
            state_dir=self.state,
            tcp_ports=self.tcp_range,
            extra=["--keepalive-interval", "1", "--keepalive-timeout", "3"],
            prefix=self.prefix,
            cwd=self.work,
            timeout=30.0,
        )

    def status(self) -> dict[str, int]:
        assert self.proc is not None
        return self.proc.status()

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return -1

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


# ---------------------------------------------------------------------------------------------
# Clients (run in threads; each bounded by a timeout)


def tls_get(ca: Path, relay_port: int, host: str) -> None:
    ctx = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection((LOOPBACK, relay_port), timeout=CONNECT_TIMEOUT) as raw,
        ctx.wrap_socket(raw, server_hostname=host) as s,
    ):
        s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while len(data) < 1 << 16:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    if not data.startswith(b"HTTP/1.1 200") or not data.endswith(b"ok\n"):
        raise OSError(f"bad answer {data[:60]!r}")


def curl_get(ca: Path, relay_port: int, host: str) -> None:
    url = f"https://{host}:{relay_port}/"
    r = subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            str(int(CONNECT_TIMEOUT)),
            "--cacert",
            str(ca),
            "--resolve",
            f"{host}:{relay_port}:{LOOPBACK}",
            url,
        ],
        capture_output=True,
        timeout=CONNECT_TIMEOUT + 5,
        stdin=subprocess.DEVNULL,
        env=child_env(),
        check=False,
    )
    if r.returncode != 0 or r.stdout != b"ok\n":
        raise OSError(f"curl exit {r.returncode}: {r.stderr.decode(errors='replace')[:200]}")


def tcp_echo(port: int, rounds: int, pace: float) -> None:
    with socket.create_connection((LOOPBACK, port), timeout=CONNECT_TIMEOUT) as s:
        for i in range(rounds):
            if i:
                time.sleep(pace)  # a pacing interval between round trips, not a wait
            data = os.urandom(random.randrange(1, 4096))
            s.sendall(data)
            got = b""
            while len(got) < len(data):
                chunk = s.recv(65536)
                if not chunk:
                    raise OSError("closed mid-echo")
                got += chunk
            if got != data:
                raise OSError("echo mismatch")


# ---------------------------------------------------------------------------------------------
# The churn


@dataclass(eq=False)
class Slot:
    """A tunnel this soak may hold: who holds it, what it forwards, and its state."""

    owner: Any  # an in-process Agent, or "proc"
    port: int
    tcp: bool
    state: str = "free"  # free | opening | open | closing
    tunnel: Any = None
    host: str = ""
    tcp_port: int | None = None
    inflight: int = 0
    #: Counts the tunnels this slot has held: a connection whose slot was closed and opened
    #: again while it ran was disrupted by that close.
    generation: int = 0


@dataclass
class Stats:
    ops: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    #: Failures of connections whose tunnel was closed or whose link was cut meanwhile.
    disrupted: Counter[str] = field(default_factory=Counter)
    samples: list[dict[str, Any]] = field(default_factory=list)
    error_examples: list[str] = field(default_factory=list)

    def error(self, kind: str, detail: str) -> None:
        self.errors[kind] += 1
        if len(self.error_examples) < 20:
            self.error_examples.append(f"{kind}: {detail}"[:300])


class Soak:
    def __init__(self, args: argparse.Namespace, out: Path) -> None:
        from twisted.internet import reactor

        self.reactor: Any = reactor
        self.args = args
        self.out = out
        self.work = out / "work"
        self.work.mkdir(parents=True, exist_ok=True)
        self.relay = Relay(self.work, shlex.split(args.relay_prefix))
        self.stats = Stats()
        self.slots: list[Slot] = []
        self.agents: list[Any] = []
        self.proxy: CutProxy | None = None
        self.servers: list[LocalServer] = []
        self.agent_proc: AgentProcess | None = None
        self.agent_proc_n = 0
        self.proc_slots: list[Slot] = []
        self.inflight = 0
        self.last_cut = -1e9
        self.t0 = 0.0
        self.churning = False
        self.result = 2
        self.csv_file: Any = None
        self.csv: Any = None
        self.lock = threading.Lock()

    # -- sampling ----------------------------------------------------------------------------

    def sample(self, phase: str) -> dict[str, Any]:
        """One row (blocking: call from a thread or outside the reactor)."""
        row: dict[str, Any] = {"t": round(time.monotonic() - self.t0, 2), "phase": phase}
        row["rss_kib"] = self.relay.rss_kib()
        row["fds"] = self.relay.fds()
        try:
            status = self.relay.status()
        except OSError:
            status = {}
        for key in STATUS_KEYS:
            row[key] = status.get(key, -1)
        row["ops"] = sum(self.stats.ops.values())
        row["errors"] = sum(self.stats.errors.values())
        row["inflight"] = self.inflight
        with self.lock:
            self.stats.samples.append(row)
            self.csv.writerow(row)
            self.csv_file.flush()
        return row

    def sample_soon(self) -> Any:
        from twisted.internet import threads

        d = threads.deferToThread(self.sample, "churn")
        d.addErrback(lambda f: self.stats.error("sample", f.getErrorMessage()))
        return d

    # -- set-up ------------------------------------------------------------------------------

    def setup(self) -> None:
        from tunnel.agent.session import Agent, RelayAddress

        self.csv_file = open(self.out / "soak.csv", "w", newline="")  # noqa: SIM115
        self.csv = csv.DictWriter(self.csv_file, COLUMNS)
        self.csv.writeheader()
        self.http = [LocalServer(http_handler) for _ in range(HTTP_SLOTS)]
        self.echo = [LocalServer(echo_handler) for _ in range(TCP_SLOTS)]
        self.servers = self.http + self.echo
        # The in-process agents' log (reconnections, reclaims), next to the relay's.
        from twisted.logger import globalLogPublisher, textFileLogObserver

        self.agent_log = open(self.work / "agents.log", "a")  # noqa: SIM115
        self.agent_observer = textFileLogObserver(self.agent_log)
        globalLogPublisher.addObserver(self.agent_observer)
        self.relay.start()
        self.proxy = CutProxy(self.relay.port)
        self.t0 = time.monotonic()
        self.idle_start = self.sample("idle-start")
        for _ in range(AGENTS):
            agent = Agent(
                self.reactor,
                [RelayAddress("localhost", self.proxy.port)],
                ca=str(self.relay.ca),
                fail_fast=False,
                connect_timeout=CONNECT_TIMEOUT,
            )
            self.agents.append(agent)
            for server in self.http:
                self.slots.append(Slot(agent, server.port, tcp=False))
            for server in self.echo:
                self.slots.append(Slot(agent, server.port, tcp=True))
        assert len(self.slots) + 2 <= MAX_TUNNELS <= 20

    # -- operations (in the reactor thread) --------------------------------------------------

    def open_tunnel(self) -> None:
        from tunnel.agent.session import ForwardSpec

        free = [s for s in self.slots if s.state == "free"]
        if not free or self.tunnels() >= MAX_TUNNELS:
            return
        slot = random.choice(free)
        slot.state = "opening"
        self.stats.ops["open"] += 1
        d = slot.owner.forward(ForwardSpec(slot.port, unencrypted=slot.tcp))

        def granted(tunnel: Any) -> None:
            slot.tunnel = tunnel
            slot.host = tunnel.host
            slot.tcp_port = tunnel.unencrypted_port
            if not self.churning:
                slot.state = "closing"
                tunnel.close().addBoth(lambda _: setattr(slot, "state", "free"))
                return
            slot.state = "open"
            slot.generation += 1

        def failed(f: Any) -> None:
            slot.state = "free"
            self.stats.error("open", f.getErrorMessage())

        d.addCallbacks(granted, failed)

    def close_tunnel(self, slot: Slot | None = None) -> Any:
        from twisted.internet import defer

        if slot is None:
            candidates = [s for s in self.slots if s.state == "open"]
            if not candidates:
                return defer.succeed(None)
            slot = random.choice(candidates)
        slot.state = "closing"
        self.stats.ops["close"] += 1
        d = slot.tunnel.close()

        def done(result: Any) -> None:
            slot.state = "free"
            slot.tunnel = None
            if hasattr(result, "getErrorMessage"):
                self.stats.error("close", result.getErrorMessage())

        d.addBoth(done)
        return d

    def tunnels(self) -> int:
        return sum(1 for s in self.slots if s.state != "free") + (2 if self.agent_proc else 0)

    def connect(self) -> None:
        from twisted.internet import threads

        if self.inflight >= MAX_INFLIGHT:
            self.stats.ops["connect_skipped_bound"] += 1
            return
        usable = [s for s in self.slots if s.state == "open"] + self.proc_slots
        if not usable:
            return
        slot = random.choice(usable)
        relay = self.relay
        if slot.tcp:
            assert slot.tcp_port is not None
            kind, rounds = "tcp_echo", random.choice((1, 1, 1, 3, 10))
            call: Any = (tcp_echo, slot.tcp_port, rounds, 0.2)
        elif random.random() < 0.25:
            kind, call = "curl", (curl_get, relay.ca, relay.port, slot.host)
        else:
            kind, call = "tls_get", (tls_get, relay.ca, relay.port, slot.host)
        self.stats.ops[kind] += 1
        self.inflight += 1
        slot.inflight += 1
        started = time.monotonic()
        generation = slot.generation
        d = threads.deferToThread(*call)

        def done(result: Any) -> None:
            self.inflight -= 1
            slot.inflight -= 1
            if not hasattr(result, "getErrorMessage"):
                return
            # A cut during the connection (or just before it: the tunnel is reclaimed
            # within about a second), or the tunnel closed meanwhile, explains a failure.
            if (
                self.last_cut >= started - 3.0
                or slot.state != "open"
                or slot.generation != generation
            ):
                self.stats.disrupted[kind] += 1
            else:
                when = time.strftime(
                    "%H:%M:%S", time.gmtime(time.time() - (time.monotonic() - started))
                )
                self.stats.error(
                    kind,
                    f"{slot.host or slot.tcp_port} (started {when}Z): {result.getErrorMessage()}",
                )

        d.addBoth(done)

    def cut(self) -> None:
        from twisted.internet import threads

        assert self.proxy is not None
        self.last_cut = time.monotonic()
        self.stats.ops["cut"] += 1
        d = threads.deferToThread(self.proxy.kill_all)

        def done(ports: Any) -> None:
            self.last_cut = time.monotonic()
            self.stats.ops["links_cut"] += len(ports)

        d.addCallbacks(done, lambda f: self.stats.error("cut", f.getErrorMessage()))

    # -- the agent process -------------------------------------------------------------------

    def toggle_agent_proc(self) -> Any:
        from twisted.internet import threads

        if self.agent_proc is None:
            if self.tunnels() + 2 > MAX_TUNNELS:
                return None
            return threads.deferToThread(self._start_agent_proc).addErrback(
                lambda f: self.stats.error("agent_proc_start", f.getErrorMessage())
            )
        proc, self.agent_proc = self.agent_proc, None
        for s in self.proc_slots:
            s.state = "closing"
        self.proc_slots = []
        self.stats.ops["agent_proc_stop"] += 1
        return threads.deferToThread(proc.stop)

    def _start_agent_proc(self) -> None:
        assert self.proxy is not None
        self.agent_proc_n += 1
        http, echo = self.http[0].port, self.echo[0].port
        log = self.work / f"agent-{self.agent_proc_n:04d}.log"
        proc = AgentProcess(
            log,
            relay=f"localhost:{self.proxy.port}",
            ca=self.relay.ca,
            forwards=[str(http), f"{echo}:tcp"],
            cwd=self.work,
        )
        self.agent_proc = proc
        self.stats.ops["agent_proc_start"] += 1
        found: dict[str, Slot] = {}

        def ready() -> bool:
            if not proc.alive():
                raise RuntimeError(f"agent process exited: {proc.tail(500)}")
            for t in proc.tunnels():
                target = int(t.target.rsplit(":", 1)[1])
                slot = Slot("proc", target, tcp=target == echo, state="open")
                slot.host = t.host
                slot.tcp_port = t.tcp_port
                found[t.target] = slot
            return len(found) == 2

        try:
            wait_for(ready, "the agent process's tunnels", 20.0)
        except BaseException:
            proc.stop()
            self.agent_proc = None
            raise
        if self.agent_proc is proc:
            self.proc_slots = list(found.values())
        # Logs of agents that came and went are noise once they are done.
        for old in self.work.glob("agent-*.log"):
            if old != log:
                with contextlib.suppress(OSError):
                    old.unlink()

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> int:
        from twisted.internet import defer, task

        reactor = self.reactor
        reactor.suggestThreadPoolSize(MAX_INFLIGHT + 10)
        args = self.args
        end = time.monotonic() + args.duration

        @defer.inlineCallbacks
        def churn() -> Any:
            self.churning = True
            sampler = task.LoopingCall(self.sample_soon)
            sampler.start(args.interval, now=True)
            inf = float("inf")
            next_cut = time.monotonic() + args.cut_every if args.cut_every > 0 else inf
            next_agent = time.monotonic() + args.agent_every / 2 if args.agent_every > 0 else inf
            try:
                while time.monotonic() < end:
                    now = time.monotonic()
                    if now >= next_cut:
                        next_cut = now + args.cut_every
                        self.cut()
                    elif now >= next_agent:
                        next_agent = now + args.agent_every
                        self.toggle_agent_proc()
                    else:
                        r = random.random()
                        if args.mix == "tunnels":
                            r *= 0.2  # tunnels opened and closed, no connections
                        if r < 0.10:
                            self.open_tunnel()
                        elif r < 0.16 and self.tunnels() > 4 and args.mix != "connections":
                            self.close_tunnel()
                        elif r < 0.20:
                            self.open_tunnel()
                        else:
                            self.connect()
                    # The pacing interval between churn operations.
                    yield task.deferLater(reactor, args.pace, lambda: None)
            finally:
                self.churning = False
                sampler.stop()
            yield self.teardown()

        def finished(result: Any) -> None:
            if hasattr(result, "getTraceback"):
                print(result.getTraceback(), file=sys.stderr)
                self.result = 2
            else:
                self.result = 0
            reactor.stop()

        reactor.callWhenRunning(lambda: churn().addBoth(finished))
        # A backstop: the run stops by itself even if tear-down hangs.
        reactor.callLater(args.duration + 180, reactor.stop)
        reactor.run(installSignalHandlers=True)
        return self.result

    @staticmethod
    def _poll(reactor: Any, check: Any, timeout: float) -> Any:
        """A Deferred polling `check()` until true or the deadline (then False)."""
        from twisted.internet import defer, task

        @defer.inlineCallbacks
        def go() -> Any:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if check():
                    return True
                yield task.deferLater(reactor, 0.05, lambda: None)
            return bool(check())

        return go()

    def teardown(self) -> Any:
        from twisted.internet import defer, threads

        @defer.inlineCallbacks
        def go() -> Any:
            reactor = self.reactor
            # Let connections in flight finish (each has a timeout), and tunnels being opened
            # settle, before closing everything.
            yield self._poll(reactor, lambda: self.inflight == 0, 3 * CONNECT_TIMEOUT)
            yield self._poll(
                reactor,
                lambda: not any(s.state in ("opening", "closing") for s in self.slots),
                2 * CONNECT_TIMEOUT,
            )
            yield defer.DeferredList(
                [self.close_tunnel(s) for s in self.slots if s.state == "open"],
                consumeErrors=True,
            )
            if self.agent_proc is not None:
                yield self.toggle_agent_proc()
            yield defer.DeferredList([a.stop() for a in self.agents], consumeErrors=True)

            def idle() -> bool:
                try:
                    s = self.relay.status()
                except OSError:
                    return False
                return s["links"] == 0 and s["tunnels"] == 0 and s["public_connections"] == 0

            ok = yield threads.deferToThread(wait_for_quiet, idle, 20.0)
            if not ok:
                self.stats.error("teardown", "the relay did not return to idle in 20 s")
            # The sockets of the last connections (the /status polls above among them) close
            # a moment after their peers do: the descriptors are compared once they settled.
            baseline = self.idle_start["fds"]
            yield threads.deferToThread(wait_for_quiet, lambda: self.relay.fds() <= baseline, 5.0)
            self.idle_end = yield threads.deferToThread(self.sample, "idle-end")

        return go()

    def close(self) -> None:
        """Stop everything we started (by PID), whatever happened."""
        if self.agent_proc is not None:
            self.agent_proc.stop()
        for s in self.servers:
            with contextlib.suppress(Exception):
                s.close()
        if self.proxy is not None:
            with contextlib.suppress(Exception):
                self.proxy.close()
        self.relay.stop()
        if self.csv_file is not None:
            self.csv_file.close()
        if getattr(self, "agent_log", None) is not None:
            from twisted.logger import globalLogPublisher

            globalLogPublisher.removeObserver(self.agent_observer)
            self.agent_log.close()


def wait_for_quiet(check: Any, timeout: float) -> bool:
    try:
        wait_for(lambda: check() or None, "the relay to be idle", timeout)
    except AssertionError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Results


def _median_rss(rows: list[dict[str, Any]]) -> float:
    return float(statistics.median(r["rss_kib"] for r in rows))


def summarize(
    soak: Soak, duration: float, max_growth: float, warmup: float = 0.10
) -> dict[str, Any]:
    stats = soak.stats
    rows = [r for r in stats.samples if r["phase"] == "churn"]
    if len(rows) < 2:
        raise RuntimeError("fewer than two samples: nothing to compare")
    t_first, t_last = rows[0]["t"], rows[-1]["t"]
    span = t_last - t_first
    warm_t = t_first + warmup * span
    after = [r for r in rows if r["t"] >= warm_t] or rows[-1:]
    # The samples just after warm-up and the last 5% of the run, medians of each.
    w_hi = after[0]["t"] + max(0.05 * span, 1e-9)
    warm_rows = [r for r in after if r["t"] <= w_hi] or after[:1]
    e_lo = t_last - 0.05 * span
    end_rows = [r for r in after if r["t"] >= e_lo] or after[-1:]
    rss_warm, rss_end = _median_rss(warm_rows), _median_rss(end_rows)
    t_warm = statistics.median(r["t"] for r in warm_rows)
    t_end = statistics.median(r["t"] for r in end_rows)
    hours = max(t_end - t_warm, 1e-9) / 3600
    growth = (rss_end - rss_warm) / rss_warm * 100 / hours
    # A least-squares slope over every sample after warm-up, for reference.
    ts = [r["t"] for r in after]
    rs = [r["rss_kib"] for r in after]
    slope = statistics.linear_regression(ts, rs).slope if len(after) >= 2 else 0.0
    idle_start, idle_end = soak.idle_start, getattr(soak, "idle_end", None)
    summary: dict[str, Any] = {
        "duration_s": duration,
        "interval_s": soak.args.interval,
        "samples": len(rows),
        "warmup_s": round(warm_t, 1),
        "warmup_fraction": warmup,
        "rss_kib_start": rows[0]["rss_kib"],
        "rss_kib_after_warmup": rss_warm,
        "rss_kib_end": rss_end,
        "rss_kib_max": max(r["rss_kib"] for r in rows),
        "rss_growth_pct_per_hour": round(growth, 3),
        "rss_regression_pct_per_hour": round(slope * 3600 / rss_warm * 100, 3),
        "max_growth_pct_per_hour": max_growth,
        "fds_start": rows[0]["fds"],
        "fds_end": rows[-1]["fds"],
        "fds_max": max(r["fds"] for r in rows),
        "idle_start": {k: idle_start[k] for k in ("rss_kib", "fds", *STATUS_KEYS)},
        "idle_end": {k: idle_end[k] for k in ("rss_kib", "fds", *STATUS_KEYS)}
        if idle_end
        else None,
        "operations": sum(v for k, v in stats.ops.items() if k != "links_cut"),
        "ops": dict(sorted(stats.ops.items())),
        "errors": sum(stats.errors.values()),
        "errors_by_kind": dict(sorted(stats.errors.items())),
        "disrupted_by_cut_or_close": dict(sorted(stats.disrupted.items())),
        "error_examples": stats.error_examples,
        "pass": growth <= max_growth,
        "csv": str(soak.out / "soak.csv"),
        "png": str(soak.out / "soak.png"),
        "relay_log": str(soak.relay.log),
    }
    summary["fds_idle_start"] = idle_start["fds"]
    summary["fds_idle_end"] = idle_end["fds"] if idle_end else None
    return summary


def plot(samples: list[dict[str, Any]], warmup: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in samples if r["phase"] == "churn"]
    t = [r["t"] / 60 for r in rows]
    fig, (ax1, ax2) = plt.subplots(2, 1, sharex=True, figsize=(8, 5), dpi=80)
    ax1.plot(t, [r["rss_kib"] / 1024 for r in rows], lw=1)
    ax1.set_ylabel("relay RSS (MiB)")
    ax2.plot(t, [r["fds"] for r in rows], lw=1, color="tab:orange", label="open fds")
    ax2.plot(t, [r["streams"] for r in rows], lw=0.8, color="tab:green", label="streams")
    ax2.set_ylabel("count")
    ax2.set_xlabel("minutes")
    ax2.legend(loc="upper right", fontsize="small")
    for ax in (ax1, ax2):
        ax.axvline(warmup / 60, color="grey", ls="--", lw=0.8)
        ax.grid(alpha=0.3)
    ax1.set_title("relay soak: RSS and descriptors (dashed: end of warm-up)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def ensure_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "matplotlib"], check=True, timeout=600
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[1])
    p.add_argument("--duration", type=float, default=3600.0, help="seconds of churn")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    p.add_argument("--out", type=Path, default=Path("bench/results/soak"))
    p.add_argument("--pace", type=float, default=0.1, help="seconds between churn operations")
    p.add_argument("--cut-every", type=float, default=15.0, help="link cut period, s (0: none)")
    p.add_argument("--agent-every", type=float, default=10.0, help="agent process period (0: none)")
    p.add_argument("--max-growth", type=float, default=1.0, help="RSS growth limit, %%/h")
    p.add_argument("--warmup", type=float, default=0.10, help="share of the run counted as warm-up")
    p.add_argument(
        "--mix",
        choices=("all", "connections", "tunnels"),
        default="all",
        help="all; or only connections (tunnels never closed); or only tunnel open/close "
        "(with --cut-every 0 --agent-every 0 to isolate one kind of operation)",
    )
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--relay-prefix", default="", help="command put before the relay's twistd")
    args = p.parse_args(argv)
    if args.duration <= 0 or args.interval <= 0 or args.pace <= 0:
        p.error("--duration, --interval and --pace must be positive")
    if not 0 <= args.warmup < 0.9:
        p.error("--warmup is a share of the run, from 0 to 0.9")
    random.seed(args.seed)

    def terminate(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    # Until the reactor installs its own handlers: SIGTERM still runs the `finally` below.
    signal.signal(signal.SIGTERM, terminate)
    ensure_matplotlib()
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    soak = Soak(args, out)
    try:
        soak.setup()
        code = soak.run()
    finally:
        soak.close()
    if code == 2 and not getattr(soak, "idle_end", None):
        print("soak: the run did not complete", file=sys.stderr)
        return 2
    summary = summarize(soak, args.duration, args.max_growth, args.warmup)
    if args.warmup != 0.10:
        # The figure with the default warm-up too, so the two can be compared.
        summary["rss_growth_pct_per_hour_warmup_10pct"] = summarize(
            soak, args.duration, args.max_growth, 0.10
        )["rss_growth_pct_per_hour"]
    plot(soak.stats.samples, summary["warmup_s"], out / "soak.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    verdict = "PASS" if summary["pass"] else "FAIL"
    print(
        f"soak: {verdict}: RSS {summary['rss_kib_after_warmup']:.0f} KiB after warm-up -> "
        f"{summary['rss_kib_end']:.0f} KiB at the end, {summary['rss_growth_pct_per_hour']:+.2f}"
        f" %/h (limit {args.max_growth} %/h); fds {summary['fds_start']} -> "
        f"{summary['fds_end']}; {summary['operations']} operations, {summary['errors']} errors"
    )
    return 0 if summary["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
