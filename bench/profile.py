"""Where the relay's and the agent's CPU goes, per request and per MB (``make profile``).

    python -m bench.profile [--seconds 20] [--rate 250] [--top 15] [--native]
                            [--only tls-http,tcp-http,tcp-download,tcp-connect] [--out DIR]

For each scenario it starts the path (``bench.tunnels``: ``twistd tunnelrelay`` +
``twistd tunnelagent`` in front of the bench's nginx and data server), puts load on it, and
samples both daemons with ``py-spy record --nonblocking --format raw`` (collapsed stacks,
which speedscope and flamegraph.pl read) for the duration of the load:

* ``tls-http``: ``wrk -t2 -c50`` on ``/small`` through the TLS tunnel (keep-alive);
* ``tcp-http``: the same through the raw TCP tunnel;
* ``tcp-download``: ``bench.client download`` of one stream through the raw TCP tunnel;
* ``tcp-connect``: ``bench.client connect`` through the raw TCP tunnel: sequential
  connections (connect, a 1-byte echo, close), ``600 × --seconds`` of them, costed per
  connection (not in the default run; name it with ``--only``).

Samples inside the reactor's ``epoll.poll`` call are counted apart and left out: py-spy
counts a thread that epoll has woken but that waits for a core as active, which on a
loaded 2-core machine is a large share and no CPU. The same caveat holds, less strongly,
for any system call that wakes a peer on loopback (``send`` runs the receiver's TCP stack
and may be preempted): the kernel's share of each process (stime) is printed beside it.

Self time of a Python function includes the C calls it makes (``send``, ``recv``,
``SSL_read``...; ``--native`` splits those out, more slowly). Each function's share of the
process's samples is multiplied by the process's measured CPU per request (or per MB) to
give µs per request (ms per MB). Writes ``profile.md`` and the stack files
(``<scenario>-<relay|agent>.txt``) into ``--out`` (default ``bench/results/profile``).
Needs root or CAP_SYS_PTRACE; installs ``py-spy`` into the venv if it is missing.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import refs
from bench.measure import parse_wrk
from bench.paths import BenchPath
from bench.tunnels import TunnelTcp, TunnelTls
from bench.util import BENCH_DIR, cpu_seconds, hosts_file, run, with_hosts

SCENARIOS = ("tls-http", "tcp-http", "tcp-download", "tcp-connect")
#: What `make profile` runs when no ``--only`` is given.
DEFAULT_SCENARIOS = ("tls-http", "tcp-http", "tcp-download")


def py_spy() -> str:
    """The py-spy executable (pip-installed into this venv when missing)."""
    exe = Path(sys.executable).with_name("py-spy")
    if not exe.exists() and not shutil.which("py-spy"):
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=True)
    return str(exe) if exe.exists() else "py-spy"


_LINE = re.compile(r"^(.*) \((.*?)(?::\d+)?\)$")


def function_of(frame: str) -> str:
    """``"func (path/file.py:123)"`` → ``"func (path/file.py)"``: samples of every line of a
    function count for the function."""
    m = _LINE.match(frame)
    return f"{m.group(1)} ({m.group(2)})" if m else frame


#: The bucket of samples taken inside the reactor's ``epoll.poll`` call.
POLL = "(in epoll_wait: waiting for events, or woken and waiting for a core)"


def _lean_poll_frame() -> str:
    """The py-spy frame of the daemons' own poll loop (`tunnel._reactor`) at its
    ``epoll.poll`` call: ``_lean_do_poll (tunnel/_reactor.py:LINE)``."""
    import inspect

    from tunnel import _reactor

    lines, first = inspect.getsourcelines(_reactor._lean_do_poll)
    line = first + next(i for i, text in enumerate(lines) if "_poller.poll(" in text)
    return f"_lean_do_poll (tunnel/_reactor.py:{line})"


LEAN_POLL = _lean_poll_frame()


def _in_poll(frames: list[str]) -> bool:
    """A sample inside the reactor's call of ``epoll.poll`` (Twisted's
    ``EPollReactor.doPoll``, through ``untilConcludes``, or the daemons' own
    `tunnel._reactor` loop at that line): py-spy counts a thread that epoll has woken but
    that waits for a core as active, so on a loaded machine these samples are mostly not
    CPU time."""
    if frames and frames[-1].endswith(LEAN_POLL):
        return True
    tail = [function_of(f) for f in frames[-2:]]
    return bool(tail) and (
        tail[-1].startswith("EPollReactor.doPoll")
        or (tail[-1].startswith("untilConcludes") and tail[0].startswith("EPollReactor.doPoll"))
    )


def self_times(stacks: Path) -> tuple[collections.Counter[str], int]:
    """Samples per innermost function in a collapsed-stack file (those in the reactor's
    poll call under ``POLL``), and the total."""
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in stacks.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = stack.split(";")
        leaf = POLL if _in_poll(frames) else function_of(frames[-1])
        if leaf.startswith("untilConcludes") and len(frames) > 1:
            # Twisted's EINTR wrapper around the socket calls: name the caller (send()
            # from Connection.writeSomeData, recv() from doRead...).
            leaf += " ← " + function_of(frames[-2])
        counts[leaf] += int(n)
        total += int(n)
    return counts, total


def area_of(leaf: str) -> str:
    """The file a leaf function is in (the socket calls as one area of their own)."""
    if is_syscall(leaf):
        return "send/recv system calls"
    m = re.search(r"\(([^()]*)\)(?: ←.*)?$", leaf)
    return m.group(1) if m else leaf


def is_syscall(leaf: str) -> bool:
    """Whether a sample's leaf is (almost all) a socket system call: Twisted's send() /
    recv() wrappers, ``Connection.doRead`` (its own time is the ``recv``)."""
    return leaf.startswith(("untilConcludes ", "Connection.doRead (twisted/internet/tcp.py)"))


def user_system(pid: int) -> tuple[float, float]:
    """(utime, stime) of ``pid`` in seconds: Python and libraries vs the kernel."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    tck = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tck, int(fields[12]) / tck


def _load(path: BenchPath, scenario: str, seconds: int) -> tuple[float, str]:
    """Run the scenario's load for ``seconds``; returns (work done, unit) — requests or MB."""
    if scenario.endswith("http"):
        assert path.http is not None
        t = path.http
        hosts = hosts_file([t.hostname], path.dir) if t.needs_resolve else None
        argv = ["wrk", "-t2", "-c50", f"-d{seconds}s", "--timeout", "10s", "--latency"]
        p = run(with_hosts([*argv, f"{t.base_url}/small"], hosts), seconds + 60)
        if p.returncode:
            raise RuntimeError(f"wrk failed: {p.stderr[-300:]}")
        return parse_wrk(p.stdout)["requests"], "request"
    if scenario == "tcp-connect":
        assert path.echo is not None
        count = 600 * seconds
        echo = path.echo
        args = ["connect", echo.host, str(echo.port), f"--count={count}"]
        p = run([sys.executable, "-m", "bench.client", *args], seconds * 10 + 60)
        if p.returncode:
            raise RuntimeError(f"connect failed: {p.stderr[-300:]}")
        return float(count), "connection"
    assert path.tcp is not None
    e = path.tcp
    # Sized to last about ``seconds`` at ~200 MB/s; a bounded transfer either way.
    size = 200_000_000 * seconds
    args = ["download", e.host, str(e.port), f"--size={size}", "--streams=1"]
    p = run([sys.executable, "-m", "bench.client", *args], seconds * 10 + 60)
    if p.returncode:
        raise RuntimeError(f"download failed: {p.stderr[-300:]}")
    return size / 1e6, "MB"


def profile(
    ctx: object,
    scenario: str,
    seconds: int,
    rate: int,
    native: bool,
    out: Path,
    blocking: bool = False,
) -> dict[str, object]:
    """One scenario: start the path, sample relay and agent under load, stop."""
    cls = TunnelTls if scenario.startswith("tls") else TunnelTcp
    path = cls(ctx)  # type: ignore[arg-type]
    spy = py_spy()
    try:
        path.start()
        roles = {"relay": path.relay.pid, "agent": path.agent.pid}
        spies = {}
        for role, pid in roles.items():
            argv = [spy, "record", "--pid", str(pid), "--rate", str(rate)]
            argv += [] if blocking else ["--nonblocking"]
            argv += ["--format", "raw", "-o", str(out / f"{scenario}-{role}.txt")]
            argv += ["--duration", str(seconds + 2)] + (["--native"] if native else [])
            spies[role] = subprocess.Popen(
                argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
            )
        time.sleep(1.0)  # py-spy attaches
        cpu0 = {role: cpu_seconds([pid]) for role, pid in roles.items()}
        us0 = {role: user_system(pid) for role, pid in roles.items()}
        work, unit = _load(path, scenario, seconds)
        cpu = {role: cpu_seconds([pid]) - cpu0[role] for role, pid in roles.items()}
        system = {role: user_system(pid)[1] - us0[role][1] for role, pid in roles.items()}
        for role, sp in spies.items():
            _, err = sp.communicate(timeout=seconds * 10 + 60)
            if sp.returncode:
                raise RuntimeError(f"py-spy ({role}) failed: {err[-300:]}")
    finally:
        path.stop()
    return {"work": work, "unit": unit, "cpu": cpu, "system": system}


def summary(results: dict[str, dict[str, object]], out: Path, rows: int = 12) -> str:
    """One table: each file's (area's) cost per request or per MB, a column per scenario
    and process, the areas ordered by their largest cost; the total CPU last."""
    columns: dict[str, dict[str, float]] = {}
    totals: dict[str, str] = {}
    for scenario, r in results.items():
        unit = str(r["unit"])
        scale, per = _PER[unit]
        work = float(r["work"])  # type: ignore[arg-type]
        cpu: dict[str, float] = r["cpu"]  # type: ignore[assignment]
        system: dict[str, float] = r.get("system", {})  # type: ignore[assignment]
        for role in ("relay", "agent"):
            counts, _ = self_times(out / f"{scenario}-{role}.txt")
            counts.pop(POLL, None)
            per_unit = cpu[role] / work * scale
            sys_part = system.get(role, 0.0) / work * scale
            col = f"{scenario} {role} ({per})"
            columns[col] = _costs(counts, per_unit - sys_part, sys_part, by_area=True)
            totals[col] = f"{per_unit:.2f}"
    areas: dict[str, float] = {}
    for costs in columns.values():
        for area, c in costs.items():
            areas[area] = max(areas.get(area, 0.0), c / max(sum(costs.values()), 1e-9))
    ranked = sorted(areas, key=lambda a: -areas[a])[:rows]
    text = "| file | " + " | ".join(columns) + " |\n|---|" + "---:|" * len(columns) + "\n"
    for area in ranked:
        cells = [f"{columns[c].get(area, 0.0):.2f}" for c in columns]
        text += f"| `{area}` | " + " | ".join(cells) + " |\n"
    text += "| **all (measured CPU)** | " + " | ".join(totals.values()) + " |\n"
    return text


#: Per unit of work: the scale from seconds, and the label.
_PER = {"request": (1e6, "µs/req"), "connection": (1e6, "µs/conn"), "MB": (1e3, "ms/MB")}


def _costs(
    counts: collections.Counter[str], user: float, system: float, by_area: bool = False
) -> dict[str, float]:
    """Each leaf's (or area's) cost: its share of the user-space samples times ``user``, or
    for socket calls its share of theirs times ``system``."""
    user_n = sum(n for leaf, n in counts.items() if not is_syscall(leaf))
    sys_n = sum(n for leaf, n in counts.items() if is_syscall(leaf))
    out: dict[str, float] = collections.defaultdict(float)
    for leaf, n in counts.items():
        if is_syscall(leaf):
            c = n / sys_n * system if sys_n else 0.0
        else:
            c = n / user_n * user if user_n else 0.0
        out[area_of(leaf) if by_area else leaf] += c
    return dict(out)


def markdown(results: dict[str, dict[str, object]], out: Path, top: int) -> str:
    """A summary by file, then per scenario and process the top functions by cost."""
    text = "Cost by file, per request, connection or MB:\n\n" + summary(results, out) + "\n"
    for scenario, r in results.items():
        unit = str(r["unit"])
        scale, per = _PER[unit]
        work = float(r["work"])  # type: ignore[arg-type]
        cpu: dict[str, float] = r["cpu"]  # type: ignore[assignment]
        system: dict[str, float] = r.get("system", {})  # type: ignore[assignment]
        for role in ("relay", "agent"):
            counts, total = self_times(out / f"{scenario}-{role}.txt")
            poll = counts.pop(POLL, 0)
            per_unit = cpu[role] / work * scale
            sys_part = system.get(role, 0.0) / work * scale
            user_part = per_unit - sys_part
            user_n = sum(n for leaf, n in counts.items() if not is_syscall(leaf))
            sys_n = sum(n for leaf, n in counts.items() if is_syscall(leaf))
            costs = _costs(counts, user_part, sys_part)
            text += (
                f"\n**{scenario}, {role}**: {per_unit:.1f} {per} of CPU: "
                f"{user_part:.1f} in user space (utime: Python, OpenSSL), {sys_part:.1f} in "
                f"the kernel (stime). {work:,.0f} {unit}s; {total:,} samples, {poll:,} of "
                f"them in the reactor's epoll call (left out). A function's {per} is its "
                "share of the user-space samples times utime, or for the socket calls "
                f"(send, recv) its share of their samples times stime. Top {top}:\n\n"
                f"| function | samples % | {per} |\n|---|---:|---:|\n"
            )
            busy = user_n + sys_n
            for leaf, c in sorted(costs.items(), key=lambda kv: -kv[1])[:top]:
                share = counts[leaf] / busy if busy else 0.0
                text += f"| `{leaf}` | {share * 100:.1f} | {c:.2f} |\n"
            files: collections.Counter[str] = collections.Counter()
            for leaf, c in costs.items():
                files[area_of(leaf)] += c
            text += (
                f"\nBy file ({per}): "
                + ", ".join(f"`{f}` {c:.2f}" for f, c in files.most_common(10))
                + "\n"
            )
    return text


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--seconds", type=int, default=20, help="load per scenario")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--native", action="store_true", help="py-spy --native (C frames)")
    parser.add_argument(
        "--blocking", action="store_true", help="py-spy pauses the process for each sample"
    )
    parser.add_argument("--only", help=f"comma-separated, of {','.join(SCENARIOS)}")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "profile")
    a = parser.parse_args(argv)
    scenarios = a.only.split(",") if a.only else list(DEFAULT_SCENARIOS)
    if bad := set(scenarios) - set(SCENARIOS):
        parser.error(f"unknown scenario(s) {', '.join(sorted(bad))}")
    a.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="tunnels-profile-"))
    ctx = None
    results: dict[str, dict[str, object]] = {}
    try:
        ctx, _ = refs.start_backends(workdir, quick=True)
        for s in scenarios:
            print(f"profile: {s}", file=sys.stderr, flush=True)
            results[s] = profile(ctx, s, a.seconds, a.rate, a.native, a.out, a.blocking)
    finally:
        if ctx is not None:
            ctx.procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    md = markdown(results, a.out, a.top)
    (a.out / "profile.md").write_text(md)
    (a.out / "profile.json").write_text(json.dumps(results, indent=2) + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
