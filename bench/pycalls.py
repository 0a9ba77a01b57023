"""Python function calls per connection and per request, at the relay and at the agent.

    python -m bench.pycalls [--only tcp,tls] [--count 300] [--seconds 3] [--top 25] [--out F]

For each kind it starts the path as the bench does (``bench.refs.start_backends``, then
``bench.tunnels.TunnelTcp`` or ``TunnelTls``: ``twistd tunnelrelay`` + ``twistd
tunnelagent``) with a ``sitecustomize`` on ``PYTHONPATH`` that, in those two daemons only,
starts cProfile on SIGUSR1 and stops it on SIGUSR2 (dumping the stats to a file). Around
each load it switches both daemons' profiles on, runs the load, switches them off and
divides the calls counted by the units of work:

* ``connection``: ``--count`` sequential ``python -m bench.client connect`` connections
  (a connect, a TLS handshake on ``tls``, a 1-byte echo, a close);
* ``request -c1``: ``wrk -t1 -c1`` on ``/small`` for ``--seconds`` (keep-alive requests on
  one connection);
* ``request -c50``: ``wrk -t2 -c50`` on ``/small`` for ``--seconds``.

Then it prints, per unit and per process, the calls (cProfile's primitive and recursive
calls together) and the ``--top`` functions by calls. Call counts do not depend on the
machine's load (the idle link's keepalive adds a few calls a second); cProfile slows the
daemons, so no time is reported. Every process it starts is ended by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from bench import refs
from bench.measure import _client, _tls_args
from bench.paths import Context
from bench.tunnels import TunnelTcp, TunnelTls
from bench.util import hosts_file, with_hosts

KINDS = ("tcp", "tls")

#: The environment variable naming the directory the daemons dump their profiles to.
PROF_DIR_ENV = "BENCH_PYCALLS_DIR"

#: Installed as ``sitecustomize`` for the daemons: a profiling switch, in the two daemons only.
SITECUSTOMIZE = '''\
"""bench.pycalls: SIGUSR1 starts cProfile, SIGUSR2 stops it and dumps $BENCH_PYCALLS_DIR/PID.prof.

Active only in ``twistd tunnelrelay`` / ``twistd tunnelagent`` processes started with
BENCH_PYCALLS_DIR set; any other Python process is left as it is.
"""
import os
import sys

_DIR = os.environ.get("BENCH_PYCALLS_DIR")
if _DIR and any(a in ("tunnelrelay", "tunnelagent") for a in sys.argv):
    import cProfile
    import signal

    _profile = [None]

    def _on(signum, frame):
        _profile[0] = cProfile.Profile()
        _profile[0].enable()

    def _off(signum, frame):
        p, _profile[0] = _profile[0], None
        if p is not None:
            p.disable()
            tmp = os.path.join(_DIR, f"{os.getpid()}.prof.tmp")
            p.dump_stats(tmp)
            os.replace(tmp, os.path.join(_DIR, f"{os.getpid()}.prof"))

    signal.signal(signal.SIGUSR1, _on)
    signal.signal(signal.SIGUSR2, _off)
'''

#: A function's key in ``pstats.Stats.stats``: file, line, name.
FuncKey = tuple[str, int, str]
#: A function's row in ``pstats.Stats.stats``: primitive calls, calls, own time, cumulative
#: time, callers.
FuncRow = tuple[int, int, float, float, object]


@dataclass(frozen=True)
class Count:
    """Python calls counted in one process over `units` units of work."""

    total_calls: int
    units: int
    functions: Mapping[FuncKey, FuncRow]

    @property
    def per_unit(self) -> float:
        """All calls divided by the units of work."""
        return self.total_calls / self.units

    def top(self, k: int) -> list[tuple[float, str]]:
        """The `k` functions with the most calls: (calls per unit, short name), most first;
        ties in file/line/name order, so the listing is stable."""
        rows = sorted(self.functions.items(), key=lambda kv: (-kv[1][1], kv[0]))[:k]
        return [(row[1] / self.units, short_name(key)) for key, row in rows]


def short_name(key: FuncKey) -> str:
    """``file:line:function`` with the file relative to site-packages or to the repository;
    built-ins (cProfile's ``~`` file) as their name alone."""
    filename, line, name = key
    if filename == "~":
        return name
    for marker in ("site-packages/", "/lib/python3", "/tunnel/", "/bench/", "/twisted/"):
        if marker in filename:
            i = filename.index(marker)
            if marker == "/lib/python3":
                filename = "stdlib/" + filename[i:].split("/", 3)[-1]
            elif marker == "site-packages/":
                filename = filename[i + len(marker) :]
            else:
                filename = filename[i + 1 :]
            break
    return f"{filename}:{line}:{name}"


def count_from_stats(stats: pstats.Stats, units: int) -> Count:
    """A :class:`Count` from loaded cProfile stats."""
    if units <= 0:
        raise ValueError(f"units of work must be positive, not {units}")
    functions: dict[FuncKey, FuncRow] = stats.stats  # type: ignore[attr-defined]
    return Count(sum(row[1] for row in functions.values()), units, functions)


def wrk_requests(out: str) -> int:
    """The number of requests from ``wrk``'s output; an error if it reports socket errors
    or non-2xx responses (their calls would be counted against too few requests)."""
    m = re.search(r"(\d+) requests in", out)
    if m is None:
        raise ValueError(f"cannot find the request count in wrk's output {out[-300:]!r}")
    if e := re.search(r"Socket errors: .*|Non-2xx or 3xx responses: \d+", out):
        raise ValueError(f"wrk reported {e.group(0)!r}")
    return int(m.group(1))


def markdown(results: Mapping[str, Mapping[str, Mapping[str, Count]]], k: int) -> str:
    """Per kind: a table of calls per unit (relay, agent), then each unit's top functions."""
    lines: list[str] = []
    for kind, units in results.items():
        lines += [f"**{kind}**: Python calls", "", "| per | relay | agent |", "|---|---:|---:|"]
        for unit, roles in units.items():
            n = roles["relay"].units
            lines.append(
                f"| {unit} ({n}) | {roles['relay'].per_unit:.1f} | {roles['agent'].per_unit:.1f} |"
            )
        lines.append("")
        for unit, roles in units.items():
            for role, c in roles.items():
                lines += [f"{kind}, per {unit}, {role}: {c.per_unit:.1f} calls", "```"]
                lines += [f"{per:8.2f}  {name}" for per, name in c.top(k)]
                lines += ["```", ""]
    return "\n".join(lines)


class _Profiled:
    """Both daemons of a started path, profiled around a load by signal."""

    def __init__(self, pids: Mapping[str, int], directory: Path) -> None:
        self.pids = dict(pids)
        self.dir = directory

    def run(self, load: Callable[[], int]) -> dict[str, Count]:
        """Profile both daemons while `load` runs; `load` returns its units of work."""
        files = {role: self.dir / f"{pid}.prof" for role, pid in self.pids.items()}
        for role, pid in self.pids.items():
            files[role].unlink(missing_ok=True)
            os.kill(pid, signal.SIGUSR1)
        time.sleep(0.3)  # the signals are handled at the daemons' next bytecode
        units = load()
        for pid in self.pids.values():
            os.kill(pid, signal.SIGUSR2)
        deadline = time.monotonic() + 30
        while not all(f.exists() for f in files.values()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no profile from the daemons in {self.dir}")
            time.sleep(0.05)
        return {role: count_from_stats(pstats.Stats(str(f)), units) for role, f in files.items()}


def measure(
    ctx: Context, kind: str, count: int, seconds: int, profdir: Path
) -> dict[str, dict[str, Count]]:
    """One kind: start the path, count both daemons' Python calls per unit of each load."""
    path = (TunnelTcp if kind == "tcp" else TunnelTls)(ctx)
    try:
        path.start()
        assert path.echo is not None and path.http is not None
        echo, http = path.echo, path.http
        connect = ["connect", echo.host, str(echo.port), f"--count={count}", *_tls_args(echo)]
        hosts = hosts_file([http.hostname], path.dir) if http.needs_resolve else None

        def conns() -> int:
            _client(connect, 60 + count)
            return count

        def wrk(threads: int, conns: int) -> Callable[[], int]:
            argv = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds}s", f"{http.base_url}/small"]
            cmd = with_hosts(argv, hosts)
            return lambda: wrk_requests(
                subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout
            )

        _client([*connect[:3], "--count=20", *connect[4:]], 60)  # warm up: imports, first paths
        wrk(1, 1)()
        prof = _Profiled({"relay": path.relay.pid, "agent": path.agent.pid}, profdir)
        return {
            "connection": prof.run(conns),
            "request -c1": prof.run(wrk(1, 1)),
            "request -c50": prof.run(wrk(2, 50)),
        }
    finally:
        path.stop()


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m bench.pycalls", description=__doc__)
    parser.add_argument("--only", help=f"comma-separated, of {','.join(KINDS)}")
    parser.add_argument("--count", type=int, default=300, help="connections (default 300)")
    parser.add_argument("--seconds", type=int, default=3, help="each wrk run (default 3)")
    parser.add_argument("--top", type=int, default=25, help="functions listed (default 25)")
    parser.add_argument("--out", type=Path, help="also write the calls per unit here (JSON)")
    a = parser.parse_args(argv)
    kinds = a.only.split(",") if a.only else list(KINDS)
    if bad := set(kinds) - set(KINDS):
        parser.error(f"unknown kind(s) {', '.join(sorted(bad))}")
    if shutil.which("wrk") is None:
        parser.error("needs wrk")
    workdir = Path(tempfile.mkdtemp(prefix="tunnels-pycalls-"))
    site, profdir = workdir / "site", workdir / "prof"
    site.mkdir()
    profdir.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", PROF_DIR_ENV)}
    old = saved["PYTHONPATH"]
    os.environ["PYTHONPATH"] = str(site) + (os.pathsep + old if old else "")
    os.environ[PROF_DIR_ENV] = str(profdir)
    ctx = None
    results: dict[str, dict[str, dict[str, Count]]] = {}
    try:
        ctx, _ = refs.start_backends(workdir, quick=True)
        for kind in kinds:
            print(f"pycalls: {kind}", file=sys.stderr, flush=True)
            results[kind] = measure(ctx, kind, a.count, a.seconds, profdir)
    finally:
        if ctx is not None:
            ctx.procs.stop_all()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(workdir, ignore_errors=True)
    if a.out is not None:
        summary = {
            kind: {u: {r: c.per_unit for r, c in roles.items()} for u, roles in units.items()}
            for kind, units in results.items()
        }
        a.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(markdown(results, a.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
