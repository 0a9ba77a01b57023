"""``python -m bench`` (``make bench``): measure every registered path, write the report.

python -m bench [--quick] [--only direct,ssh-R,...] [--runs N] [--out DIR] [--list] [--scale]
                [--workers]
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

from bench import refs, report, targets
from bench.measure import Settings, measure_path
from bench.paths import load_paths
from bench.util import BENCH_DIR, ensure_tools


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, start the backends, measure each path, write the results."""
    registry = load_paths()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1 run, smaller sizes")
    parser.add_argument(
        "--only", help="comma-separated path names or patterns, e.g. '*wan-*' (see --list)"
    )
    parser.add_argument("--runs", type=int, help="repetitions per measurement (default 3)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    parser.add_argument("--list", action="store_true", help="list the paths and exit")
    parser.add_argument("--no-install", action="store_true", help="do not apt/pip install")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (configs, logs)")
    parser.add_argument(
        "--scale",
        action="store_true",
        help="also the scale figures (bench.scale: 10,000 links with --workers 1 and auto, "
        "100,000 idle connections over --workers 7; minutes); with --only none, only them",
    )
    parser.add_argument(
        "--workers",
        action="store_true",
        help="also the figures of a relay of 1 and 2 workers and of the hand-off alone "
        "(bench.workers; a few minutes); with --only none, only them",
    )
    a = parser.parse_args(argv)
    if a.list:
        for name, cls in registry.items():
            extra = "" if cls.default else "  (only with --only)"
            print(f"{name:26} {cls.title}{extra}")
        return 0
    names = [n for n, c in registry.items() if c.default]
    unknown: list[str] = []
    if a.only:
        # Names or shell patterns ("*wan-*"), in the order given; "none": no path at all.
        names = []
        for pattern in a.only.split(","):
            matched = [n for n in registry if fnmatch.fnmatchcase(n, pattern)]
            if not matched and pattern != "none":
                unknown.append(pattern)
            names += [n for n in matched if n not in names]
    if unknown:
        parser.error(f"unknown path(s) {', '.join(unknown)}; known: {', '.join(registry)}")
    settings = Settings.quick() if a.quick else Settings()
    if a.runs:
        settings.runs = a.runs
    if not a.no_install:
        for problem in ensure_tools():
            _log(f"bench: {problem}")

    signal.signal(signal.SIGTERM, _terminate)
    workdir = Path(tempfile.mkdtemp(prefix="tunnels-bench-"))
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": report.machine(),
        "settings": dataclasses.asdict(settings),
        "backends": [],
        "paths": {},
    }
    t_start = time.monotonic()
    ctx = None
    reports: dict[str, str] = {}
    try:
        if names:
            ctx, backend_cmds = refs.start_backends(workdir, a.quick)
            results["backends"] = backend_cmds
        for name in names:
            assert ctx is not None
            path = registry[name](ctx)
            _log(f"bench: {name} ({path.title})")
            entry: dict[str, Any] = {"title": path.title, "setup": [], "metrics": {}}
            if path.wan is not None:
                entry["wan"] = dataclasses.asdict(path.wan)
            try:
                path.start()
                entry["setup"] = path.setup_commands
                r = measure_path(path, settings, _log)
                entry.update(metrics=r.summary(), commands=r.commands, errors=r.errors)
            except Exception as exc:
                entry.update(setup=path.setup_commands, commands={}, errors=[f"start: {exc}"])
                _log(f"  ERROR {exc}")
            finally:
                path.stop()
            results["paths"][name] = entry
            reports.update(path.reports)
    finally:
        if ctx is not None:
            ctx.procs.stop_all()
        if a.keep:
            _log(f"bench: kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if a.scale:
        from bench import scale

        _log("bench: scale figures (bench.scale)")
        a.out.mkdir(parents=True, exist_ok=True)
        links, conns, k = (1000, 5000, 3) if a.quick else (10_000, 100_000, 7)
        results["scale"] = scale.full(
            links, idle=conns, idle_workers=k, keepalive_s=10 if a.quick else 30,
            log_dir=a.out, log=_log,
        )  # fmt: skip
        reports["scale.md"] = scale.full_markdown(results["scale"])
    if a.workers:
        from bench import workers

        _log("bench: workers figures (bench.workers)")
        sizes = workers.Sizes.quick() if a.quick else workers.Sizes()
        results["workers"] = workers.run([1, 2], sizes, log=_log)
        reports["workers.md"] = workers.markdown(results["workers"])
    results["seconds"] = round(time.monotonic() - t_start, 1)
    if results["paths"]:
        reports["targets.md"] = targets.markdown(results)
    files = report.write(results, a.out)
    for fname, text in reports.items():
        files[fname] = a.out / fname
        files[fname].write_text(text)
    print(report.markdown(results))
    for fname, text in reports.items():
        print(f"\n{fname}:\n\n{text}")
    _log(f"bench: {results['seconds']}s; wrote " + ", ".join(str(p) for p in files.values()))
    failed = any(p["errors"] for p in results["paths"].values())
    failed |= any(r["errors"] for r in results.get("workers", {}).get("runs", []))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
