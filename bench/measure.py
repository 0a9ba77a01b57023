"""Measurements.  Each takes a started ``BenchPath`` and returns samples for its metrics.

Every measurement is bounded in time and count.  CPU is ``utime+stime`` of ``path.pids()``
(and descendants) read from /proc before and after; clients' CPU is not counted.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.paths import BenchPath, Endpoint, HttpTarget
from bench.util import LOOPBACK, cpu_seconds, hosts_file, run, with_hosts

MB = 1e6


@dataclass(frozen=True)
class Metric:
    """A reported quantity: ``higher`` says whether bigger is better."""

    key: str
    label: str
    unit: str
    higher: bool


METRICS: list[Metric] = [
    Metric("http_rps", "HTTP keep-alive rate", "req/s", True),
    Metric("http_p50_ms", "HTTP p50", "ms", False),
    Metric("http_p99_ms", "HTTP p99", "ms", False),
    Metric("http_cpu_us_per_req", "CPU per request", "µs/req", False),
    Metric("download_MBps", "1 GiB download", "MB/s", True),
    Metric("download_cpu_ms_per_MB", "CPU per MB (download)", "ms/MB", False),
    Metric("tcp1_MBps", "TCP 1 stream", "MB/s", True),
    Metric("tcp1_cpu_ms_per_MB", "CPU per MB (TCP 1)", "ms/MB", False),
    Metric("tcp100_MBps", "TCP 100 streams", "MB/s", True),
    Metric("tcp100_cpu_ms_per_MB", "CPU per MB (TCP 100)", "ms/MB", False),
    Metric("connect_p50_ms", "connect+1st byte p50", "ms", False),
    Metric("connect_p99_ms", "connect+1st byte p99", "ms", False),
    Metric("newconn_rate", "new connections/s (full TLS handshake)", "conn/s", True),
    Metric("newconn_p50_ms", "new connection p50, under load", "ms", False),
    Metric("newconn_p99_ms", "new connection p99, under load", "ms", False),
    Metric("newconn_cpu_us_per_conn", "CPU per new connection", "µs/conn", False),
    Metric("resumed_rate", "new connections/s, TLS session resumed", "conn/s", True),
    Metric("resumed_cpu_us_per_conn", "CPU per resumed connection", "µs/conn", False),
    Metric("resumed_p50_ms", "connect+resumed TLS+1st byte p50", "ms", False),
    Metric("resumed_p99_ms", "connect+resumed TLS+1st byte p99", "ms", False),
    Metric("http_close_rps", "HTTP, a connection per request", "req/s", True),
    Metric("http_close_p99_ms", "HTTP p99, a connection per request", "ms", False),
    Metric("http_close_cpu_us_per_req", "CPU per request, a connection each", "µs/req", False),
    Metric("wan1_MBps", "WAN 1 stream", "MB/s", True),
    Metric("wan1_cap_pct", "WAN 1 stream, share of the cap", "%", True),
    Metric("wan1_cpu_ms_per_MB", "CPU per MB (WAN 1)", "ms/MB", False),
    Metric("wan8_MBps", "WAN 8 streams", "MB/s", True),
    Metric("wan8_cap_pct", "WAN 8 streams, share of the cap", "%", True),
    Metric("wan8_cpu_ms_per_MB", "CPU per MB (WAN 8)", "ms/MB", False),
    Metric("reconnect_ms", "link cut mid-transfer → same URL serves again", "ms", False),
]
METRIC_BY_KEY = {m.key: m for m in METRICS}


@dataclass
class Settings:
    """Sizes and counts of one run (``quick()`` for the ``--quick`` variant)."""

    runs: int = 3
    wrk_seconds: int = 5
    wrk_threads: int = 2
    wrk_connections: int = 50
    download_bytes: int = 1 << 30
    tcp1_bytes: int = 1 << 30
    tcp100_streams: int = 100
    tcp100_bytes: int = 16 << 20
    connect_count: int = 1000
    #: Seconds, and concurrent clients, of each new-connection rate measurement.
    rate_seconds: float = 5.0
    rate_concurrency: int = 32
    #: Seconds of transfer at the cap for each WAN download (1 stream, and 8 together).
    wan_seconds: float = 6.0
    #: Link cuts timed on each path that can be cut.
    cut_count: int = 5

    @classmethod
    def quick(cls) -> Settings:
        """One run with smaller sizes: a smoke test that finishes in about a minute."""
        return cls(
            runs=1,
            wrk_seconds=2,
            download_bytes=256 << 20,
            tcp1_bytes=256 << 20,
            tcp100_bytes=4 << 20,
            connect_count=200,
            rate_seconds=2.0,
            wan_seconds=2.0,
            cut_count=2,
        )


@dataclass
class PathResult:
    """Samples per metric for one path, the exact commands used, and any errors."""

    samples: dict[str, list[float]] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)
    commands: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def add(self, key: str, value: float, unit: str | None = None) -> None:
        """Append one sample."""
        self.samples.setdefault(key, []).append(value)
        self.units[key] = unit or METRIC_BY_KEY[key].unit

    def summary(self) -> dict[str, dict[str, float | str | list[float]]]:
        """``{metric: {median, min, max, unit, samples}}``."""
        return {
            k: {
                "median": statistics.median(v),
                "min": min(v),
                "max": max(v),
                "unit": self.units[k],
                "samples": v,
            }
            for k, v in self.samples.items()
            if v
        }


def _cpu(path: BenchPath, fn: Callable[[], float]) -> tuple[float, float]:
    """Run ``fn`` (returning a work amount); return (its result, forwarding CPU seconds).

    The CPU seconds of each of the path's roles (``path.roles()``, such as relay and agent)
    are left in ``path.role_cpu``.
    """
    pids = path.pids()
    roles = path.roles()
    before = cpu_seconds(pids)
    before_roles = {role: cpu_seconds(p) for role, p in roles.items()}
    work = fn()
    path.role_cpu = {role: cpu_seconds(p) - before_roles[role] for role, p in roles.items()}
    return work, cpu_seconds(pids) - before


def _add_roles(path: BenchPath, r: PathResult, key: str, scale: float) -> None:
    """Per-role CPU of the last ``_cpu`` call, as ``key_role`` (seconds times ``scale``)."""
    unit = METRIC_BY_KEY[key].unit
    for role, seconds in path.role_cpu.items():
        r.add(f"{key}_{role}", seconds * scale, unit)


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"cannot parse wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> dict[str, float]:
    """Requests/s, p50/p99 (ms), request count and error count from ``wrk --latency``."""
    res = {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "requests": float(re.search(r"(\d+) requests in", out).group(1)),  # type: ignore[union-attr]
        "p50": _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1)),  # type: ignore[union-attr]
        "p99": _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1)),  # type: ignore[union-attr]
    }
    errors = 0.0
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(float(x) for x in m.groups())
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += float(m.group(1))
    res["errors"] = errors
    return res


def http_rps(
    path: BenchPath, t: HttpTarget, s: Settings, r: PathResult, close: bool = False
) -> None:
    """``wrk -tT -cC -dDs --latency`` on ``/small``; with `close`, with ``-H 'Connection:
    close'``: a new connection per request (wrk offers the previous TLS session again on
    each reconnect, so on TLS paths these are resumed handshakes)."""
    hosts = hosts_file([t.hostname], path.dir) if t.needs_resolve else None
    argv = [
        "wrk", f"-t{s.wrk_threads}", f"-c{s.wrk_connections}", f"-d{s.wrk_seconds}s",
        "--timeout", "10s", "--latency", f"{t.base_url}/small",
    ]  # fmt: skip
    if close:
        argv[1:1] = ["-H", "Connection: close"]
    cmd = with_hosts(argv, hosts)
    prefix = "http_close" if close else "http"
    r.commands[prefix] = " ".join(a if " " not in a else repr(a) for a in argv)
    box: dict[str, float] = {}

    def go() -> float:
        p = run(cmd, s.wrk_seconds + 60)
        if p.returncode:
            raise RuntimeError(f"wrk failed: {p.stderr.strip()[-300:]}")
        box.update(parse_wrk(p.stdout))
        return box["requests"]

    requests, cpu = _cpu(path, go)
    if box["errors"]:
        r.errors.append(f"wrk{' (close)' if close else ''}: {box['errors']:.0f} errors")
    r.add(f"{prefix}_rps", box["rps"])
    if not close:
        r.add("http_p50_ms", box["p50"])
    r.add(f"{prefix}_p99_ms", box["p99"])
    if path.pids():
        r.add(f"{prefix}_cpu_us_per_req", cpu / requests * 1e6)
        _add_roles(path, r, f"{prefix}_cpu_us_per_req", 1e6 / requests)


def download(path: BenchPath, t: HttpTarget, s: Settings, r: PathResult) -> None:
    """``curl -o /dev/null`` of ``/big`` (a byte range of it when smaller than 1 GiB)."""
    argv = ["curl", "-sS", "-o", "/dev/null", "--max-time", "120"]
    argv += ["-w", "%{speed_download} %{size_download} %{http_code}"]
    if t.cafile:
        argv += ["--cacert", t.cafile]
    if t.needs_resolve:
        argv += ["--resolve", f"{t.hostname}:{t.port}:{LOOPBACK}"]
    if s.download_bytes < 1 << 30:
        argv += ["-r", f"0-{s.download_bytes - 1}"]
    argv.append(f"{t.base_url}/big")
    r.commands["download"] = " ".join(a if " " not in a else repr(a) for a in argv)
    box: list[float] = []

    def go() -> float:
        p = run(argv, 180)
        if p.returncode:
            raise RuntimeError(f"curl failed: {p.stderr.strip()[-300:]}")
        speed, size, code = p.stdout.split()
        if code not in ("200", "206") or int(size) != s.download_bytes:
            raise RuntimeError(f"curl: HTTP {code}, {size} bytes")
        box.append(float(speed))
        return float(size)

    size, cpu = _cpu(path, go)
    r.add("download_MBps", box[0] / MB)
    if path.pids():
        r.add("download_cpu_ms_per_MB", cpu * 1e3 / (size / MB))
        _add_roles(path, r, "download_cpu_ms_per_MB", 1e3 / (size / MB))


def _client(args: list[str], timeout: float) -> dict[str, object]:
    p = run([sys.executable, "-m", "bench.client", *args], timeout, cwd=str(_ROOT))
    if p.returncode:
        raise RuntimeError(f"bench.client {args[0]} failed: {(p.stderr or p.stdout)[-300:]}")
    out: dict[str, object] = json.loads(p.stdout)
    return out


_ROOT = Path(__file__).resolve().parent.parent


def _tls_args(e: Endpoint) -> list[str]:
    return ["--sni", e.sni, "--ca", e.cafile or ""] if e.sni else []


def tcp_download(
    path: BenchPath, e: Endpoint, streams: int, size: int, key: str, r: PathResult
) -> None:
    """``streams`` parallel raw-TCP downloads of ``size`` bytes each from the data server."""
    args = ["download", e.host, str(e.port), f"--size={size}", f"--streams={streams}"]
    args += _tls_args(e)
    r.commands[key] = "python -m bench.client " + " ".join(args)
    box: dict[str, object] = {}

    def go() -> float:
        box.update(_client(args, 300))
        return float(box["bytes"])  # type: ignore[arg-type]

    total, cpu = _cpu(path, go)
    r.add(f"{key}_MBps", float(box["MBps"]))  # type: ignore[arg-type]
    if path.pids():
        r.add(f"{key}_cpu_ms_per_MB", cpu * 1e3 / (total / MB))
        _add_roles(path, r, f"{key}_cpu_ms_per_MB", 1e3 / (total / MB))


def wan_download(path: BenchPath, e: Endpoint, streams: int, s: Settings, r: PathResult) -> None:
    """``streams`` parallel downloads over ``path.wan``, ``wan_seconds`` at the cap in all;
    throughput also as a share of the cap."""
    assert path.wan is not None
    key = f"wan{streams}"
    total = int(path.wan.rate_MBps * MB * s.wan_seconds)
    tcp_download(path, e, streams, total // streams, key, r)
    r.add(f"{key}_cap_pct", r.samples[f"{key}_MBps"][-1] / path.wan.rate_MBps * 100)


def echo_once(e: Endpoint, timeout: float) -> bool:
    """One connection to the echo target: (TLS handshake,) 1 byte there and back."""
    try:
        with socket.create_connection((e.host, e.port), timeout=timeout) as raw:
            sock: socket.socket = raw
            if e.sni:
                ctx = ssl.create_default_context(cafile=e.cafile)
                sock = ctx.wrap_socket(raw, server_hostname=e.sni)
            sock.sendall(b"x")
            return sock.recv(1) == b"x"
    except (OSError, ssl.SSLError):
        return False


def reconnect(path: BenchPath, s: Settings, r: PathResult, deadline: float = 30.0) -> None:
    """Cut the agent's link in the middle of a download, ``cut_count`` times; each time,
    the milliseconds from the cut until the *same* echo endpoint (raw TCP port or SNI name)
    answers again.  The download must end (the relay resets the streams of a lost link)."""
    assert path.tcp is not None and path.echo is not None
    e, echo = path.tcp, path.echo
    args = ["download", e.host, str(e.port), f"--size={1 << 40}", "--streams=1", *_tls_args(e)]
    r.commands["reconnect"] = (
        "python -m bench.client " + " ".join(args) + " & sleep 1; kill -USR1 WAN_PROXY_PID; "
        "then connect+echo once every 10 ms until it answers"
    )
    for i in range(s.cut_count):
        dl = subprocess.Popen(
            [sys.executable, "-m", "bench.client", *args],
            cwd=str(_ROOT),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(1.0)  # mid-transfer
            if dl.poll() is not None:
                raise RuntimeError(f"cut {i + 1}: the download ended before the cut")
            path.cut_link()
            t0 = time.perf_counter()
            while not echo_once(echo, timeout=1.0):
                if time.perf_counter() - t0 > deadline:
                    raise RuntimeError(f"cut {i + 1}: the URL did not serve in {deadline}s")
                time.sleep(0.01)
            r.add("reconnect_ms", (time.perf_counter() - t0) * 1e3)
            try:
                dl.wait(10)
            except subprocess.TimeoutExpired:
                r.errors.append(f"cut {i + 1}: the download through the cut link did not end")
        finally:
            if dl.poll() is None:
                dl.kill()
                dl.wait()


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def connect_latency(path: BenchPath, e: Endpoint, count: int, r: PathResult) -> None:
    """``count`` sequential connect + 1-byte echo round trips; p50 and p99."""
    args = ["connect", e.host, str(e.port), f"--count={count}", *_tls_args(e)]
    r.commands["connect"] = "python -m bench.client " + " ".join(args)
    samples: list[float] = _client(args, 30 + count * 0.5)["samples_ms"]  # type: ignore[assignment]
    r.add("connect_p50_ms", _percentile(samples, 0.50))
    r.add("connect_p99_ms", _percentile(samples, 0.99))


def connection_rate(
    path: BenchPath, e: Endpoint, s: Settings, r: PathResult, resume: bool = False
) -> None:
    """``rate_concurrency`` clients opening connections to the echo target one after another
    for ``rate_seconds``: new connections per second, their p50/p99 under that load, and
    forwarding CPU per connection. Without `resume` every TLS handshake is a full one; with
    it each client offers its previous session, and the server must resume nearly all."""
    args = ["rate", e.host, str(e.port), f"--seconds={s.rate_seconds:g}"]
    args += [f"--concurrency={s.rate_concurrency}", *_tls_args(e)]
    if resume:
        args.append("--resume")
    key = "resumed" if resume else "newconn"
    r.commands[key] = "python -m bench.client " + " ".join(args)
    box: dict[str, object] = {}

    def go() -> float:
        box.update(_client(args, s.rate_seconds + 60))
        return float(box["connections"])  # type: ignore[arg-type]

    connections, cpu = _cpu(path, go)
    if not connections:
        raise RuntimeError("no connection completed")
    reused = float(box["reused"])  # type: ignore[arg-type]
    if resume and reused < 0.9 * (connections - s.rate_concurrency):
        r.errors.append(f"{key}: the server resumed {reused:.0f} of {connections:.0f} sessions")
    r.add(f"{key}_rate", float(box["per_second"]))  # type: ignore[arg-type]
    if not resume:
        samples: list[float] = box["samples_ms"]  # type: ignore[assignment]
        r.add("newconn_p50_ms", _percentile(samples, 0.50))
        r.add("newconn_p99_ms", _percentile(samples, 0.99))
    if path.pids():
        r.add(f"{key}_cpu_us_per_conn", cpu / connections * 1e6)
        _add_roles(path, r, f"{key}_cpu_us_per_conn", 1e6 / connections)


def resumed_latency(path: BenchPath, e: Endpoint, count: int, r: PathResult) -> None:
    """``count`` sequential connections, each offering the session of the one before
    (connect + abbreviated TLS handshake + 1-byte echo); p50 and p99."""
    args = ["connect", e.host, str(e.port), f"--count={count}", "--resume", *_tls_args(e)]
    r.commands["resumed_connect"] = "python -m bench.client " + " ".join(args)
    out = _client(args, 30 + count * 0.5)
    samples: list[float] = out["samples_ms"]  # type: ignore[assignment]
    reused = int(out["reused"])  # type: ignore[call-overload]
    if reused < 0.9 * count:
        r.errors.append(f"resumed connect: the server resumed {reused} of {count} sessions")
    r.add("resumed_p50_ms", _percentile(samples, 0.50))
    r.add("resumed_p99_ms", _percentile(samples, 0.99))


def measure_path(path: BenchPath, s: Settings, log: Callable[[str], None]) -> PathResult:
    """Run every measurement the path supports ``s.runs`` times; errors are recorded."""
    r = PathResult()
    steps: list[tuple[str, Callable[[], None]]] = []
    if path.wan is not None:
        if (w := path.tcp) is not None:
            steps.append(("wan1", lambda: wan_download(path, w, 1, s, r)))
            steps.append(("wan8", lambda: wan_download(path, w, 8, s, r)))
        if path.cuttable and path.echo is not None:
            steps.append(("reconnect", lambda: reconnect(path, s, r)))
        return _run_steps(path, steps, s, r, log)
    if (t := path.http) is not None:
        steps.append(("http", lambda: http_rps(path, t, s, r)))
        steps.append(("http_close", lambda: http_rps(path, t, s, r, close=True)))
        steps.append(("download", lambda: download(path, t, s, r)))
    if (e := path.tcp) is not None:
        steps.append(("tcp1", lambda: tcp_download(path, e, 1, s.tcp1_bytes, "tcp1", r)))
        n, size = s.tcp100_streams, s.tcp100_bytes
        steps.append(("tcp100", lambda: tcp_download(path, e, n, size, "tcp100", r)))
    if (ec := path.echo) is not None:
        count = min(s.connect_count, path.connect_count or s.connect_count)
        steps.append(("connect", lambda: connect_latency(path, ec, count, r)))
        steps.append(("newconn", lambda: connection_rate(path, ec, s, r)))
        if ec.sni:
            steps.append(("resumed", lambda: connection_rate(path, ec, s, r, resume=True)))
            steps.append(("resumed_connect", lambda: resumed_latency(path, ec, count, r)))
    return _run_steps(path, steps, s, r, log)


def _run_steps(
    path: BenchPath,
    steps: list[tuple[str, Callable[[], None]]],
    s: Settings,
    r: PathResult,
    log: Callable[[str], None],
) -> PathResult:
    for name, step in steps:
        # One reconnect step already times ``cut_count`` cuts.
        for i in range(1 if name == "reconnect" else s.runs):
            t0 = time.monotonic()
            try:
                step()
            except Exception as exc:  # record and go on: one broken metric is not a broken run
                r.errors.append(f"{name} run {i + 1}: {exc}")
                log(f"  {name} run {i + 1}: ERROR {exc}")
                break
            log(f"  {name} run {i + 1}/{s.runs}: {time.monotonic() - t0:.1f}s")
    for key, (unit, samples) in path.extra(s.runs).items():
        for v in samples:
            r.add(key, v, unit)
    return r
