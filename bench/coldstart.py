"""Cold start of the plain-Python API: a fresh process from ``import tunnel`` to a URL.

    python -m bench.coldstart [--count 50] [--forwards 5] [--out bench/results]
    python -m bench.coldstart --relay localhost:PORT --ca CA.pem --json   # an existing relay

Without ``--relay`` it starts its own ``twistd tunnelrelay`` (development mode, through
``tunnel.testing``) on loopback and stops it at the end.  Then ``--count`` fresh interpreters
each run::

    import tunnel                                   # phase "import"
    with tunnel.forward(port) as t: t.url           # phase "first forward" (to the URL),
        <a TLS request through t.url at once>       #   then "URL → first byte"
    with tunnel.forward(port) as t: t.url           # x (--forwards - 1): "later forward"

and report, in milliseconds on the system-wide monotonic clock: spawn → the script's
first line (``interpreter``: CPython start-up and ``site``), the import, the first
``forward()`` to its URL (the link, which the plain API makes with the standard library
before Twisted is imported), spawn → URL in all (``total``), then a public client's request
made at once through that URL: URL → the first byte of its response (it waits until the
reactor runs and has adopted the link: a URL the first visitor must wait on is reported as
such) and spawn → that first byte; each later ``forward()`` in the same process (from the
call to the tunnel closed).  p50 and p99 over the processes.  The forwarded port is a small
HTTP server of the benchmark's own.

Bytecode: the report says whether ``tunnel/``'s modules had current bytecode caches
(``make venv`` compiles them; an editable install ships none, and ``PYTHONDONTWRITEBYTECODE``
stops Python from writing them), compiles them if not (as ``make venv`` does), and runs
``--count`` more processes, interleaved with the others, that ignore those caches (so
``tunnel/`` is compiled at every start, as without ``make venv``): both are in the table.

It also runs ``python -X importtime -c "import tunnel"`` and the same for a script that
makes one ``forward()``: the 10 modules with the largest cumulative import time.

Writes ``coldstart.json`` and ``coldstart.md`` into ``--out``; with ``--json`` prints the
summary on stdout instead (what ``python -m bench`` reads for the ``tunnel-tls`` column).
"""

from __future__ import annotations

import argparse
import compileall
import importlib.util
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.util import BENCH_DIR

_ROOT = BENCH_DIR.parent

#: Run in each fresh process; argv: port, forwards, mode ("plain", "preimport", or
#: "nobytecode": the bytecode caches of the package directory argv[4] are not read, so its
#: modules are compiled from source, as where none were ever written).
CHILD = r"""
import json, sys, time
t_first = time.monotonic()
if sys.argv[3] == "nobytecode":
    import importlib._bootstrap_external as _be
    _pkg, _cache_from_source = sys.argv[4], _be.cache_from_source
    def _no_cache(path, *args, **kwargs):
        if path.startswith(_pkg):
            raise NotImplementedError  # the loader then compiles the source, writing nothing
        return _cache_from_source(path, *args, **kwargs)
    _be.cache_from_source = _no_cache
import tunnel
t_import = time.monotonic()
port, forwards = int(sys.argv[1]), int(sys.argv[2])
if sys.argv[3] == "preimport":
    import tunnel.client, tunnel._tunnel, twisted.internet.reactor, twisted.internet.ssl
t_preimported = time.monotonic()
def request(tun):
    # A public client's request through the URL, at once: until its response's first byte.
    import os, socket, ssl
    ctx = ssl.create_default_context(cafile=os.environ["TUNNEL_CA"])
    with socket.create_connection(("127.0.0.1", tun.port)) as raw:
        with ctx.wrap_socket(raw, server_hostname=tun.host) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert s.recv(1), "no response"
laps, url = [], None
for n in range(forwards):
    t = time.monotonic()
    with tunnel.forward(port) as tun:
        url = tun.url
        if n == 0:
            t_url = time.monotonic()
            request(tun)
            t_byte = time.monotonic()
    if n == 0:
        laps.append((t_url - t) * 1e3)
    else:
        laps.append((time.monotonic() - t) * 1e3)
print(json.dumps({"first_line": t_first, "imported": t_import, "preimported": t_preimported,
                  "url_at": t_url, "byte_at": t_byte,
                  "laps_ms": laps, "url": url}))
"""

#: One forward(), for ``-X importtime`` of everything the first URL needs.
IMPORT_FORWARD = "import sys, tunnel\nwith tunnel.forward(int(sys.argv[1])) as t: t.url\n"

#: The package whose bytecode caches the benchmark looks at (and, in "nobytecode" runs, hides).
PACKAGE = _ROOT / "tunnel"

PHASES = (
    "interpreter",
    "import",
    "first_forward",
    "lazy_imports",
    "first_forward_preimported",
    "later_forward",
    "total",
    "url_to_first_byte",
    "total_first_byte",
    "total_first_byte_preimported",
)


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def _env(relay: str, ca: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNNEL_")}
    env.update(TUNNEL_RELAY=relay, TUNNEL_CA=ca, NO_PROXY="*")
    return env


def bytecode_caches(package: Path = PACKAGE) -> dict[str, int]:
    """How many of `package`'s modules have a bytecode cache that this interpreter would
    use (its magic number, and the source's modification time and size in the header)."""
    modules = cached = 0
    for source in sorted(package.rglob("*.py")):
        modules += 1
        try:
            header = Path(importlib.util.cache_from_source(str(source))).read_bytes()[:16]
        except OSError:
            continue
        st = source.stat()
        if (
            header[:4] == importlib.util.MAGIC_NUMBER
            and int.from_bytes(header[4:8], "little") == 0  # timestamp-based
            and int.from_bytes(header[8:12], "little") == int(st.st_mtime) & 0xFFFFFFFF
            and int.from_bytes(header[12:16], "little") == st.st_size & 0xFFFFFFFF
        ):
            cached += 1
    return {"modules": modules, "cached": cached}


def ensure_bytecode(package: Path = PACKAGE) -> dict[str, Any]:
    """The state of `package`'s bytecode caches before the runs, compiling them (as
    ``make venv`` does) if any is missing or stale."""
    before = bytecode_caches(package)
    compiled = before["cached"] < before["modules"]
    if compiled:
        compileall.compile_dir(str(package), quiet=1)
    return {**before, "compiled_by_bench": compiled, "after": bytecode_caches(package)}


def one_process(
    relay: str,
    ca: str,
    port: int,
    forwards: int,
    preimport: bool = False,
    bytecode: bool = True,
) -> dict[str, Any]:
    """One fresh interpreter: its phases in milliseconds.  With ``preimport`` the modules
    the first ``forward()`` would import lazily are imported before it is timed (so it
    takes the Twisted path: a reactor is imported already); without
    ``bytecode`` the package's bytecode caches are not read (it is compiled from source)."""
    spawn = time.monotonic()
    mode = "preimport" if preimport else "plain" if bytecode else "nobytecode"
    p = subprocess.run(
        [sys.executable, "-c", CHILD, str(port), str(forwards), mode, f"{PACKAGE}{os.sep}"],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(relay, ca),
        cwd=str(_ROOT),
    )
    if p.returncode:
        raise RuntimeError(f"cold-start child failed: {p.stderr[-500:]}")
    d = json.loads(p.stdout.strip().splitlines()[-1])
    if preimport:
        return {
            "lazy_imports": (d["preimported"] - d["imported"]) * 1e3,
            "first_forward_preimported": d["laps_ms"][0],
            "total_first_byte_preimported": (d["byte_at"] - spawn) * 1e3,
        }
    return {
        "interpreter": (d["first_line"] - spawn) * 1e3,
        "import": (d["imported"] - d["first_line"]) * 1e3,
        "first_forward": d["laps_ms"][0],
        "later_forward": d["laps_ms"][1:],
        "total": (d["url_at"] - spawn) * 1e3,
        "url_to_first_byte": (d["byte_at"] - d["url_at"]) * 1e3,
        "total_first_byte": (d["byte_at"] - spawn) * 1e3,
    }


def importtime(
    relay: str, ca: str, port: int, forward: bool, top: int = 10
) -> list[dict[str, Any]]:
    """``-X importtime`` of ``import tunnel`` (or of one forward()): a summary (with the
    ``top`` modules by self time), then the ``top`` modules by cumulative time, with their
    self time (µs) and nesting depth (0 = imported directly)."""
    code = IMPORT_FORWARD if forward else "import tunnel"
    p = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code, str(port)],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(relay, ca),
        cwd=str(_ROOT),
    )
    rows = []
    for line in p.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)", line)
        if m:
            rows.append(
                {
                    "module": m.group(4),
                    "self_us": int(m.group(1)),
                    "cumulative_us": int(m.group(2)),
                    "depth": len(m.group(3)) // 2,
                }
            )
    total_self = sum(r["self_us"] for r in rows)
    rows.sort(key=lambda r: -r["cumulative_us"])
    by_self = sorted(rows, key=lambda r: -r["self_us"])[:top]
    head = {"total_self_us": total_self, "modules": len(rows), "top_self": by_self}
    return [head, *rows[:top]]


def _phases(runs: list[dict[str, Any]], phases: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for phase in phases:
        xs: list[float] = []
        for r in runs:
            if phase not in r:
                continue
            v = r[phase]
            xs.extend(v if isinstance(v, list) else [v])
        if xs:
            out[phase] = {
                "p50_ms": _pct(xs, 0.5),
                "p99_ms": _pct(xs, 0.99),
                "mean_ms": statistics.fmean(xs),
                "samples": len(xs),
            }
    return out


class _Responder:
    """
    A local HTTP server for the forwarded port, on loopback, in a thread: to each connection
    a fixed response once its request has arrived, then a close.
    """

    def __enter__(self) -> int:
        self._srv = socket.create_server(("127.0.0.1", 0))
        self._srv.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        return int(self._srv.getsockname()[1])

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                try:
                    conn.recv(65536)
                    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
                except OSError:
                    pass

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._srv.close()


def measure(relay: str, ca: str, count: int, forwards: int) -> dict[str, Any]:
    """``count`` fresh processes with the package's bytecode caches (compiled first if they
    were missing) and, interleaved with them, ``count`` without; ``count`` more that import
    what the first forward() needs before timing it, to split its time (after one unmeasured
    warm-up, for the page cache); and the import-time profiles."""
    bytecode = ensure_bytecode()
    with _Responder() as port:  # the local server of the forwarded port
        one_process(relay, ca, port, 2)
        runs: list[dict[str, Any]] = []
        cold: list[dict[str, Any]] = []
        for i in range(count):
            # Alternate which goes first, so that neither always follows the other.
            for cached in (True, False) if i % 2 == 0 else (False, True):
                run = one_process(relay, ca, port, forwards, bytecode=cached)
                (runs if cached else cold).append(run)
        runs += [one_process(relay, ca, port, 1, preimport=True) for _ in range(count)]
        imports = {
            "import tunnel": importtime(relay, ca, port, forward=False),
            "import tunnel + first forward()": importtime(relay, ca, port, forward=True),
        }
    summary: dict[str, Any] = {
        "count": count,
        "forwards": forwards,
        "bytecode": bytecode,
        "phases": _phases(runs, PHASES),
        "phases_no_bytecode": _phases(cold, PHASES),
        "importtime": imports,
    }
    return summary


LABELS = {
    "interpreter": "spawn → first line (CPython start-up, site)",
    "import": "`import tunnel`",
    "first_forward": "first `tunnel.forward()` → URL (the link, made before Twisted is imported)",
    "lazy_imports": "for comparison: importing `tunnel.client` and Twisted's reactor",
    "first_forward_preimported": "for comparison: first `forward()` → URL with those imported "
    "beforehand (the Twisted path: reactor thread, link TCP + TLS + hello, grant)",
    "later_forward": "later `tunnel.forward()` in the same process (call to closed)",
    "total": "**spawn → URL**",
    "url_to_first_byte": "URL → first byte of a request made at once (waits for the reactor: "
    "Twisted's imports, the adoption of the link)",
    "total_first_byte": "**spawn → first byte** of that request",
    "total_first_byte_preimported": "for comparison: spawn → first byte, the Twisted path "
    "(reactor imported before the first `forward()`)",
}


def markdown(s: dict[str, Any]) -> str:
    """The phase table and the two import-time tables."""
    b = s.get("bytecode")
    if b:
        state = (
            f"`tunnel/` had current bytecode caches for {b['cached']} of its {b['modules']} "
            "modules"
            + (
                f"; the benchmark compiled them first ({b['after']['cached']} then)"
                if b["compiled_by_bench"]
                else ""
            )
        )
    else:
        state = "bytecode caches not recorded"
    cold = s.get("phases_no_bytecode", {})
    out = (
        f"{s['count']} fresh processes, {s['forwards']} `forward()` each, with bytecode caches"
        f" for `tunnel/` ({state}); and {s['count']} more, interleaved with them, that do not"
        " read those caches (`tunnel/` compiled at every start: the last column)."
        " Milliseconds.\n\n"
        "| phase | p50 | p99 | mean | samples | p50, no bytecode |\n"
        "|---|---:|---:|---:|---:|---:|\n"
    )
    for phase, st in s["phases"].items():
        nb = f"{cold[phase]['p50_ms']:.1f}" if phase in cold else "-"
        out += (
            f"| {LABELS[phase]} | {st['p50_ms']:.1f} | {st['p99_ms']:.1f} | "
            f"{st['mean_ms']:.1f} | {st['samples']} | {nb} |\n"
        )
    for what, rows in s["importtime"].items():
        head, mods = rows[0], rows[1:]
        out += (
            f"\n`python -X importtime` of {what}: {head['modules']} modules, "
            f"{head['total_self_us'] / 1e3:.1f} ms of self time in all; the top "
            f"{len(mods)} by cumulative time.\n\n"
            "| module | depth | cumulative (ms) | self (ms) |\n|---|---:|---:|---:|\n"
        )
        for r in mods:
            out += (
                f"| `{r['module']}` | {r['depth']} | {r['cumulative_us'] / 1e3:.1f} | "
                f"{r['self_us'] / 1e3:.2f} |\n"
            )
        if head.get("top_self"):
            out += (
                f"\nThe top {len(head['top_self'])} by their own (self) time: "
                + ", ".join(
                    f"`{r['module']}` {r['self_us'] / 1e3:.1f} ms" for r in head["top_self"]
                )
                + ".\n"
            )
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m bench.coldstart", description=__doc__)
    parser.add_argument("--relay", help="host:port of a running relay (default: start one)")
    parser.add_argument("--ca", help="its CA file (with --relay)")
    parser.add_argument("--count", type=int, default=50, help="fresh processes")
    parser.add_argument("--forwards", type=int, default=5, help="forward() per process")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    a = parser.parse_args(argv)
    relay_proc = None
    tmp = None
    try:
        if a.relay:
            if not a.ca:
                parser.error("--relay needs --ca")
            relay, ca = a.relay, a.ca
        else:
            from tunnel.testing import RelayProcess

            tmp = tempfile.TemporaryDirectory(prefix="tunnels-coldstart-")
            d = Path(tmp.name)
            relay_proc = RelayProcess.start(d / "relay.log", state_dir=d / "state")
            relay, ca = f"localhost:{relay_proc.port}", str(relay_proc.ca)
        summary = measure(relay, ca, a.count, a.forwards)
    finally:
        if relay_proc is not None:
            relay_proc.stop()
        if tmp is not None:
            tmp.cleanup()
    if a.json:
        print(json.dumps(summary))
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "coldstart.json").write_text(json.dumps(summary, indent=2) + "\n")
    md = markdown(summary)
    (a.out / "coldstart.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
