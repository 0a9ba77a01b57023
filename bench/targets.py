"""The performance targets the project holds itself to, read from one run's results.

Each `Target` names a path's metric and what it must reach: a ratio to a reference path's
same metric in the same run (``factor``), an absolute bound, or both. `markdown` renders the
"Against the targets" table of docs/performance.md from ``results.json``, so the table is
the run's, not a transcription: a target whose path or reference did not run is "not
measured", never met.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bench.report import fmt

__all__ = ["TARGETS", "Target", "markdown", "verdict"]

Results = dict[str, Any]

TLS, TCP = "tunnel-tls", "tunnel-tcp"
HAPROXY, SSH_TT, SSH_N = "haproxy-ssh-R-tt", "ssh-R-tt", "ssh-R"


@dataclass(frozen=True)
class Target:
    """``path``'s ``key`` against ``ref``'s same metric (× ``factor``) and/or ``bound``."""

    label: str
    path: str
    key: str
    #: True for rates (more is better), False for latencies and costs.
    higher: bool
    ref: str | None = None
    factor: float = 1.0
    bound: float | None = None
    #: False: the row is reported for reading beside the targets, with no verdict.
    goal: bool = True


TARGETS: tuple[Target, ...] = (
    Target(
        "TLS keep-alive requests/s ≥ 1.0× HAProxy → `ssh -tt -R`",
        TLS,
        "http_rps",
        True,
        HAPROXY,
    ),
    Target("TLS keep-alive p99 ≤ 1.0× it", TLS, "http_p99_ms", False, HAPROXY),
    Target("TLS CPU per request ≤ the C assembly's", TLS, "http_cpu_us_per_req", False, HAPROXY),
    Target("raw TCP keep-alive requests/s ≥ 1.0× `ssh -tt -R`", TCP, "http_rps", True, SSH_TT),
    Target("raw TCP CPU per request ≤ `ssh -tt -R`", TCP, "http_cpu_us_per_req", False, SSH_TT),
    Target(
        "TLS connect + handshake + first byte p50 ≤ 1.0× HAProxy",
        TLS,
        "connect_p50_ms",
        False,
        HAPROXY,
    ),
    Target(
        "TLS connect + handshake + first byte p99 ≤ 1.0× HAProxy",
        TLS,
        "connect_p99_ms",
        False,
        HAPROXY,
    ),
    Target("new TLS connections/s ≥ 1.0× it (full handshakes)", TLS, "newconn_rate", True, HAPROXY),
    Target("resumed TLS connections/s", TLS, "resumed_rate", True, HAPROXY, goal=False),
    Target(
        "HTTP, a connection per request (TLS)",
        TLS,
        "http_close_rps",
        True,
        HAPROXY,
        goal=False,
    ),
    Target(
        "raw TCP connect + first byte p50 ≤ 1.0× `ssh -tt -R` and ≤ 0.5 ms",
        TCP,
        "connect_p50_ms",
        False,
        SSH_TT,
        bound=0.5,
    ),
    Target("raw TCP one stream ≥ 1.0× `ssh -N -R`", TCP, "tcp1_MBps", True, SSH_N),
    Target("raw TCP 100 streams ≥ 1.5× `ssh -N -R`", TCP, "tcp100_MBps", True, SSH_N, factor=1.5),
    Target(
        "WAN 100 ms / 400 Mbit/s, one stream ≥ 93 % of the cap (raw TCP)",
        "tunnel-tcp-wan-100ms-400M",
        "wan1_cap_pct",
        True,
        bound=93.0,
    ),
    Target(
        "WAN 100 ms / 400 Mbit/s, one stream ≥ 93 % of the cap (TLS)",
        "tunnel-tls-wan-100ms-400M",
        "wan1_cap_pct",
        True,
        bound=93.0,
    ),
    Target(
        "WAN 30 ms / 1 Gbit/s, one stream ≥ 93 % of the cap (raw TCP)",
        "tunnel-tcp-wan-30ms-1G",
        "wan1_cap_pct",
        True,
        bound=93.0,
    ),
    Target(
        "WAN 30 ms / 1 Gbit/s, one stream ≥ 93 % of the cap (TLS)",
        "tunnel-tls-wan-30ms-1G",
        "wan1_cap_pct",
        True,
        bound=93.0,
    ),
    Target("`forward()` warm, p50 ≤ 1 ms", TLS, "forward_warm_p50_ms", False, bound=1.0),
    Target(
        "`forward()` cold (a new agent), p50 ≤ 20 ms", TLS, "forward_cold_p50_ms", False, bound=20.0
    ),
    Target(
        "relay RSS per idle TLS connection ≤ 64 KiB",
        TLS,
        "relay_rss_per_idle_conn_KiB",
        False,
        bound=64.0,
    ),
    Target(
        "agent RSS per idle stream ≤ 16 KiB",
        TLS,
        "agent_rss_per_idle_stream_KiB",
        False,
        bound=16.0,
    ),
    Target(
        "cold start, spawn → URL p50 ≤ 100 ms",
        TLS,
        "coldstart_total_p50_ms",
        False,
        bound=100.0,
    ),
)


def _median(results: Results, path: str, key: str) -> float | None:
    stat = results["paths"].get(path, {}).get("metrics", {}).get(key)
    return float(stat["median"]) if stat else None


def verdict(target: Target, results: Results) -> tuple[float | None, float | None, str]:
    """``(value, reference value, "yes" | "no" | "not measured" | "")`` for one run."""
    value = _median(results, target.path, target.key)
    ref = _median(results, target.ref, target.key) if target.ref else None
    if value is None or (target.ref is not None and not ref):
        return value, ref, "not measured"
    if not target.goal:
        return value, ref, ""
    ok = True
    if ref is not None:
        goal = target.factor * ref
        ok &= value >= goal if target.higher else value <= goal
    if target.bound is not None:
        ok &= value >= target.bound if target.higher else value <= target.bound
    return value, ref, "yes" if ok else "no"


def markdown(results: Results) -> str:
    """The targets table: the tunnel's median, the reference's in the same run, their ratio
    (> 1 is better for rates, < 1 for latencies and costs) and whether the goal is met."""
    lines = [
        "| target | Tunnels | reference (same run) | ratio | met |",
        "|---|---:|---:|---:|---|",
    ]
    for target in TARGETS:
        value, ref, met = verdict(target, results)
        ratio = f"{value / ref:.2f}×" if value is not None and ref else "-"
        lines.append(
            f"| {target.label} | {fmt(value) if value is not None else '-'} | "
            f"{fmt(ref) if ref is not None else '-'} | {ratio} | {met} |"
        )
    return "\n".join(lines) + "\n"
