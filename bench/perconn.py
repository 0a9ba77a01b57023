"""What one connection costs the relay and the agent, in counts that do not depend on load.

    python -m bench.perconn [--count 500] [--only tcp,tls,tls-resumed] [--out FILE]

For each kind it starts the path (``bench.tunnels``: ``twistd tunnelrelay`` + ``twistd
tunnelagent`` in front of the bench's echo server), attaches ``strace -c -f`` to each daemon,
and runs ``python -m bench.client connect`` ``--count`` times (sequential connections, each
a connect, a TLS handshake on the TLS kinds, a 1-byte echo and a close; ``tls-resumed``
offers each connection the previous one's session). Then it prints, per connection and per
process: system calls by name, all system calls, ``epoll_wait`` calls (reactor turns), and
the CPU seconds from /proc (the one figure here that moves with the machine's load), with
the client's connect + first byte p50. ``strace`` slows the daemons, so its latencies are
not the bench's; its counts are exact (minus the idle link's keepalive, a few calls a
second).

Needs ``strace`` and root or CAP_SYS_PTRACE. Every process it starts (the backends, the
daemons, the strace processes) is ended by PID.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import refs
from bench.measure import _client, _tls_args
from bench.tunnels import TunnelTcp, TunnelTls
from bench.util import cpu_seconds

KINDS = ("tcp", "tls", "tls-resumed")

#: ``strace -c`` summary lines: % time, seconds, usecs/call, calls, [errors,] name.
_ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:(\d+)\s+)?(\w+)\s*$")


def parse_strace_summary(text: str) -> dict[str, int]:
    """System calls by name from ``strace -c`` output (the ``total`` line left out)."""
    calls: dict[str, int] = {}
    for line in text.splitlines():
        m = _ROW.match(line)
        if m and m.group(3) != "total":
            calls[m.group(3)] = calls.get(m.group(3), 0) + int(m.group(1))
    return calls


def measure(ctx: object, kind: str, count: int, workdir: Path) -> dict[str, object]:
    """One kind: start the path, count both daemons' system calls over `count` connections."""
    cls = TunnelTcp if kind == "tcp" else TunnelTls
    path = cls(ctx)  # type: ignore[arg-type]
    tracers: dict[str, subprocess.Popen[bytes]] = {}
    try:
        path.start()
        assert path.echo is not None
        echo = path.echo
        args = ["connect", echo.host, str(echo.port), f"--count={count}", *_tls_args(echo)]
        if kind == "tls-resumed":
            args.append("--resume")
        _client([*args[:3], "--count=20", *args[4:]], 60)  # warm up: imports, first paths
        roles = {"relay": path.relay.pid, "agent": path.agent.pid}
        outputs = {role: workdir / f"{kind}-{role}.strace" for role in roles}
        for role, pid in roles.items():
            argv = ["strace", "-c", "-f", "-o", str(outputs[role]), "-p", str(pid)]
            tracers[role] = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # strace attaches
        cpu0 = {role: cpu_seconds([pid]) for role, pid in roles.items()}
        out = _client(args, 60 + count)
        cpu = {role: cpu_seconds([pid]) - cpu0[role] for role, pid in roles.items()}
        for tracer in tracers.values():
            tracer.send_signal(signal.SIGINT)
        for tracer in tracers.values():
            tracer.wait(30)
        samples: list[float] = out["samples_ms"]  # type: ignore[assignment]
        result: dict[str, object] = {
            "count": count,
            "p50_ms": statistics.median(samples),
            "reused": out.get("reused", 0),
        }
        for role in roles:
            calls = parse_strace_summary(outputs[role].read_text())
            result[role] = {
                "syscalls": {k: v / count for k, v in sorted(calls.items())},
                "total": sum(calls.values()) / count,
                "reactor_turns": calls.get("epoll_wait", 0) / count,
                "cpu_us": cpu[role] / count * 1e6,
            }
        return result
    finally:
        for tracer in tracers.values():
            if tracer.poll() is None:
                tracer.kill()
                tracer.wait()
        path.stop()


def markdown(results: dict[str, dict[str, object]]) -> str:
    """A table per kind: system calls per connection by name, relay and agent."""
    lines: list[str] = []
    for kind, r in results.items():
        relay: dict[str, object] = r["relay"]  # type: ignore[assignment]
        agent: dict[str, object] = r["agent"]  # type: ignore[assignment]
        lines += [
            f"**{kind}**, {r['count']} connections (client p50 under strace "
            f"{r['p50_ms']:.2f} ms, sessions resumed {r['reused']}):",
            "",
            "| per connection | relay | agent |",
            "|---|---:|---:|",
        ]
        for key, label in (
            ("total", "system calls"),
            ("reactor_turns", "reactor turns (epoll_wait)"),
            ("cpu_us", "CPU µs (noisy)"),
        ):
            lines.append(f"| {label} | {relay[key]:.1f} | {agent[key]:.1f} |")
        rs: dict[str, float] = relay["syscalls"]  # type: ignore[assignment]
        ags: dict[str, float] = agent["syscalls"]  # type: ignore[assignment]
        for name in sorted(set(rs) | set(ags), key=lambda n: -(rs.get(n, 0) + ags.get(n, 0))):
            if rs.get(name, 0) + ags.get(name, 0) >= 0.05:
                lines.append(f"| `{name}` | {rs.get(name, 0):.2f} | {ags.get(name, 0):.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m bench.perconn", description=__doc__)
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--only", help=f"comma-separated, of {','.join(KINDS)}")
    parser.add_argument("--out", type=Path, help="also write the results here (JSON)")
    a = parser.parse_args(argv)
    kinds = a.only.split(",") if a.only else list(KINDS)
    if bad := set(kinds) - set(KINDS):
        parser.error(f"unknown kind(s) {', '.join(sorted(bad))}")
    if shutil.which("strace") is None:
        parser.error("needs strace (apt-get install strace)")
    workdir = Path(tempfile.mkdtemp(prefix="tunnels-perconn-"))
    ctx = None
    results: dict[str, dict[str, object]] = {}
    try:
        ctx, _ = refs.start_backends(workdir, quick=True)
        for kind in kinds:
            print(f"perconn: {kind}", file=sys.stderr, flush=True)
            results[kind] = measure(ctx, kind, a.count, workdir)
    finally:
        if ctx is not None:
            ctx.procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    if a.out is not None:
        a.out.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
