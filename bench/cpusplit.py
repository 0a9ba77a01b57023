"""User and kernel CPU per raw TCP connection: the tunnel's daemons beside OpenSSH's.

    python -m bench.cpusplit [--count 3000] [--rounds 2] [--out FILE]

It starts the bench's echo server, the raw TCP tunnel (``bench.tunnels.TunnelTcp``:
``twistd tunnelrelay`` + ``twistd tunnelagent``) and ``ssh -tt -R`` (``bench.refs``: our own
``sshd`` and one ``ssh`` client), then, in ``--rounds`` rounds alternating between the two,
runs ``python -m bench.client connect --count N`` (sequential connections: a connect, a
1-byte echo, a close) through each and reads from /proc, before and after, for every
process of the path and its descendants (``sshd`` serves the forward in a child): user
time, kernel time and context switches, summed over threads. Nothing is traced, so the
client's connect + first byte p50 is the bench's; per connection it prints the medians over
rounds, per process and for the whole path.

What it shows: whether a gap in connect latency is the kernel's work (packets, wake-ups:
the same for any relay) or the processes' own (the interpreter, for the tunnel). /proc
counts CPU in clock ticks, so use a ``--count`` of a few thousand. Every process it starts
is ended by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench import refs
from bench.measure import _client
from bench.paths import BenchPath
from bench.refs import SshReverseTty
from bench.tunnels import TunnelTcp

#: Clock ticks per second, the unit of /proc's CPU times.
_HZ = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Usage:
    """What a process (all its threads) has used so far."""

    user_s: float
    system_s: float
    switches: int

    def __sub__(self, other: Usage) -> Usage:
        return Usage(
            self.user_s - other.user_s,
            self.system_s - other.system_s,
            self.switches - other.switches,
        )


def parse_stat_times(stat: str) -> tuple[int, int]:
    """(utime, stime) in clock ticks from a /proc/PID/stat (or task) line; the command name
    in parentheses may hold spaces and parentheses itself."""
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def parse_switches(status: str) -> int:
    """Voluntary plus involuntary context switches from a /proc/PID/status text."""
    total = 0
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
            total += int(value)
    return total


def usage(pid: int) -> Usage:
    """`pid`'s use so far, summed over its threads."""
    user = system = switches = 0
    task_dir = Path(f"/proc/{pid}/task")
    for task in task_dir.iterdir():
        try:
            u, s = parse_stat_times((task / "stat").read_text())
            switches += parse_switches((task / "status").read_text())
        except (OSError, IndexError, ValueError):
            continue  # a thread that ended meanwhile
        user += u
        system += s
    return Usage(user / _HZ, system / _HZ, switches)


def descendants(pids: list[int]) -> list[int]:
    """`pids` and every live process below them."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.append(pid)
            todo.extend(children.get(pid, []))
    return sorted(out)


def _name(path: BenchPath, pid: int) -> str:
    """The tunnel's daemons by role, any other process by its command name."""
    for role in ("relay", "agent"):
        proc = getattr(path, role, None)
        if getattr(proc, "pid", None) == pid:
            return f"tunnel{role}"
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def _round(path: BenchPath, count: int) -> dict[str, object]:
    """One timed run of `count` connections through `path`."""
    assert path.echo is not None
    echo = path.echo
    pids = descendants(path.pids())
    before = {pid: usage(pid) for pid in pids}
    out = _client(["connect", echo.host, str(echo.port), f"--count={count}"], 60 + count)
    after = {pid: usage(pid) for pid in pids if Path(f"/proc/{pid}").exists()}
    used = {pid: after[pid] - before[pid] for pid in after}
    busy = {pid: u for pid, u in used.items() if u.user_s + u.system_s > 0}
    samples: list[float] = out["samples_ms"]  # type: ignore[assignment]
    return {
        "p50_ms": statistics.median(samples),
        "processes": {
            f"{_name(path, pid)}[{pid}]": {
                "user_us": u.user_s / count * 1e6,
                "system_us": u.system_s / count * 1e6,
                "switches": u.switches / count,
            }
            for pid, u in busy.items()
        },
    }


def _median_rows(rounds: list[dict[str, object]]) -> dict[str, object]:
    """Per process and in total, the median over rounds of each figure."""
    names: list[str] = []
    for r in rounds:
        names += [n for n in r["processes"] if n not in names]  # type: ignore[attr-defined]

    def med(name: str, key: str) -> float:
        return statistics.median(
            r["processes"].get(name, {}).get(key, 0.0)  # type: ignore[attr-defined]
            for r in rounds
        )

    procs = {n: {k: med(n, k) for k in ("user_us", "system_us", "switches")} for n in names}
    total = {
        k: statistics.median(
            sum(p[k] for p in r["processes"].values())  # type: ignore[attr-defined]
            for r in rounds
        )
        for k in ("user_us", "system_us", "switches")
    }
    return {
        "p50_ms": statistics.median(r["p50_ms"] for r in rounds),  # type: ignore[misc]
        "processes": procs,
        "total": total,
    }


def markdown(results: dict[str, dict[str, object]], count: int, rounds: int) -> str:
    """One table: per connection, each path's processes and total."""
    lines = [
        f"Per raw TCP connection ({count} sequential connections per round, medians of "
        f"{rounds} rounds):",
        "",
        "| path, process | user µs | kernel µs | context switches | connect + first byte p50 |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        procs: dict[str, dict[str, float]] = r["processes"]  # type: ignore[assignment]
        total: dict[str, float] = r["total"]  # type: ignore[assignment]
        for proc, p in procs.items():
            lines.append(
                f"| {name}, `{proc}` | {p['user_us']:.0f} | {p['system_us']:.0f} | "
                f"{p['switches']:.1f} | |"
            )
        lines.append(
            f"| **{name}, all** | **{total['user_us']:.0f}** | **{total['system_us']:.0f}** | "
            f"{total['switches']:.1f} | {r['p50_ms']:.3f} ms |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m bench.cpusplit", description=__doc__)
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, help="also write the results here (JSON)")
    a = parser.parse_args(argv)
    if shutil.which("sshd") is None and not Path("/usr/sbin/sshd").exists():
        parser.error("needs sshd (apt-get install openssh-server)")
    workdir = Path(tempfile.mkdtemp(prefix="tunnels-cpusplit-"))
    ctx = None
    paths: list[BenchPath] = []
    per: dict[str, list[dict[str, object]]] = {}
    try:
        ctx, _ = refs.start_backends(workdir, quick=True)
        for cls in (TunnelTcp, SshReverseTty):
            path = cls(ctx)
            paths.append(path)
            path.start()
            assert path.echo is not None
            _client(["connect", path.echo.host, str(path.echo.port), "--count=300"], 120)
        for i in range(a.rounds):
            print(f"cpusplit: round {i + 1}", file=sys.stderr, flush=True)
            for path in paths:
                per.setdefault(path.name, []).append(_round(path, a.count))
    finally:
        for path in paths:
            path.stop()
        if ctx is not None:
            ctx.procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    results = {name: _median_rows(rounds) for name, rounds in per.items()}
    if a.out is not None:
        a.out.write_text(json.dumps({"count": a.count, "paths": results}, indent=2) + "\n")
    print(markdown(results, a.count, a.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
