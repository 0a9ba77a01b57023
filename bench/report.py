"""Results: JSON (everything), Markdown (the table for docs/performance.md), PNG (ratios)."""

from __future__ import annotations

import json
import os
import platform
import re
import sys
from pathlib import Path
from typing import Any

from bench.measure import METRICS
from bench.util import run

Results = dict[str, Any]


def machine() -> dict[str, str]:
    """CPU, cores, kernel and the versions of the programs measured."""
    cpu = "unknown"
    try:
        m = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = m.group(1) if m else cpu
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "kernel": platform.release(),
        "python": interpreter(),
    }
    for name, argv in {
        "nginx": ["nginx", "-v"],
        "haproxy": ["haproxy", "-v"],
        "openssh": ["ssh", "-V"],
        "wrk": ["wrk", "--version"],
        "curl": ["curl", "--version"],
    }.items():
        try:
            p = run(argv, 10)
            info[name] = ((p.stdout or "") + (p.stderr or "")).strip().splitlines()[0]
        except (OSError, IndexError):
            info[name] = "missing"
    return info


def interpreter() -> str:
    """
    The Python that runs the bench, and so the daemons (they are started with this
    interpreter): version, executable, and whether its core is a shared libpython (a
    default source build, slower per call) or linked into the executable.
    """
    linked = "libpython linked in"
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        linked = "libpython unknown"
    else:
        if m := re.search(r"\S*/(libpython[\d.]+\.so[\d.]*)", maps):
            linked = f"shared {m.group(1)}"
    return f"{platform.python_version()} ({sys.executable}; {linked})"


def fmt(v: float) -> str:
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def _cell(stat: dict[str, Any] | None, runs: int) -> str:
    if not stat:
        return "-"
    if runs > 1 and len(stat["samples"]) > 1:
        return f"{fmt(stat['median'])} ({fmt(stat['min'])}-{fmt(stat['max'])})"
    return fmt(stat["median"])


def markdown(results: Results) -> str:
    """One table: a row per metric, a column per path; each cell ``median (min-max)``.

    Metrics a path adds through ``BenchPath.extra()`` get rows of their own.
    """
    runs = results["settings"]["runs"]
    paths = {n: p for n, p in results["paths"].items() if not p.get("wan")}
    if not paths:
        return wan_markdown(results)
    rows: list[tuple[str, str]] = [(m.key, f"{m.label} ({m.unit})") for m in METRICS]
    known = {m.key for m in METRICS}
    for p in paths.values():
        for key, stat in p["metrics"].items():
            if key not in known:
                known.add(key)
                rows.append((key, f"{key} ({stat['unit']})"))
    rows = [(k, label) for k, label in rows if any(k in p["metrics"] for p in paths.values())]
    lines = ["| metric | " + " | ".join(paths) + " |", "|---|" + "---:|" * len(paths)]
    for key, label in rows:
        cells = [_cell(p["metrics"].get(key), runs) for p in paths.values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    out = "\n".join(lines) + "\n"
    out += wan_markdown(results)
    errs = [f"- {n}: {e}" for n, p in results["paths"].items() for e in p["errors"]]
    if errs:
        out += "\nErrors:\n\n" + "\n".join(errs) + "\n"
    return out


def _median(results: Results, path: str, key: str) -> float | None:
    stat = results["paths"].get(path, {}).get("metrics", {}).get(key)
    return float(stat["median"]) if stat else None


def _times(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def wan_markdown(results: Results) -> str:
    """One table per emulated WAN link: each path's 1- and 8-stream throughput, as MB/s, as
    a share of the cap and as a ratio to ``ssh -N -R`` / ``ssh -tt -R`` over the same link
    in the same run; forwarding CPU per MB; the reconnect time after a cut (median, max)."""
    runs = results["settings"]["runs"]
    by_tag: dict[str, list[str]] = {}
    for name, p in results["paths"].items():
        if p.get("wan"):
            by_tag.setdefault(p["wan"]["tag"], []).append(name)
    out = ""
    for tag, names in by_tag.items():
        wan = results["paths"][names[0]]["wan"]
        out += (
            f"\nWAN {tag}: {wan['rtt_ms']:g} ms round trip, {wan['rate_mbps']:g} Mbit/s "
            f"({wan['rate_mbps'] / 8:g} MB/s) each way. Median (min-max).\n\n"
            "| path | 1 stream (MB/s) | % of cap | vs ssh -N -R | vs ssh -tt -R "
            "| 8 streams (MB/s) | % of cap | vs ssh -N -R | vs ssh -tt -R "
            "| CPU/MB 1 / 8 (ms) | cut → serves again, median / max (ms) |\n"
            "|---|" + "---:|" * 10 + "\n"
        )
        bases = (f"ssh-R-wan-{tag}", f"ssh-R-tt-wan-{tag}")
        for name in names:
            m = results["paths"][name]["metrics"]
            cells = []
            for n in (1, 8):
                key = f"wan{n}_MBps"
                mine = _median(results, name, key)
                cells += [_cell(m.get(key), runs), _cell(m.get(f"wan{n}_cap_pct"), 1)]
                cells += [_times(mine, _median(results, b, key)) for b in bases]
            cpu = [_cell(m.get(f"wan{n}_cpu_ms_per_MB"), 1) for n in (1, 8)]
            cells.append(" / ".join(cpu))
            cut = m.get("reconnect_ms")
            cells.append(f"{fmt(cut['median'])} / {fmt(cut['max'])}" if cut else "-")
            out += f"| {name} | " + " | ".join(cells) + " |\n"
    return out


CHART_METRICS = [
    "http_rps",
    "http_p99_ms",
    "download_MBps",
    "tcp1_MBps",
    "tcp100_MBps",
    "connect_p50_ms",
    "http_cpu_us_per_req",
    "download_cpu_ms_per_MB",
]


def ratio(results: Results, path: str, base: str, key: str) -> float | None:
    """How ``path`` compares with ``base`` on ``key``; > 1 is better, whatever the metric."""
    a = results["paths"].get(path, {}).get("metrics", {}).get(key)
    b = results["paths"].get(base, {}).get("metrics", {}).get(key)
    if not a or not b or not a["median"] or not b["median"]:
        return None
    higher = next(m.higher for m in METRICS if m.key == key)
    r: float = a["median"] / b["median"] if higher else b["median"] / a["median"]
    return r


def chart(
    results: Results,
    out: Path,
    baselines: tuple[str, ...] = ("direct", "ssh-R-tt", "haproxy-ssh-R-tt"),
) -> bool:
    """Grouped bars of ``ratio()`` against each baseline (one panel each); False if no
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    bases = [b for b in baselines if b in results["paths"]]
    if not bases:
        return False
    labels = {m.key: m.label for m in METRICS}
    fig, axes = plt.subplots(len(bases), 1, figsize=(12, 4.5 * len(bases)), squeeze=False)
    for ax, base in zip(axes[:, 0], bases, strict=True):
        others = [p for p, e in results["paths"].items() if p != base and not e.get("wan")]
        keys = [k for k in CHART_METRICS if any(ratio(results, p, base, k) for p in others)]
        width = 0.8 / max(1, len(others))
        for i, p in enumerate(others):
            xs = [j + i * width for j in range(len(keys))]
            ys = [ratio(results, p, base, k) or 0.0 for k in keys]
            ax.bar(xs, ys, width, label=p)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([j + width * (len(others) - 1) / 2 for j in range(len(keys))])
        ax.set_xticklabels([labels[k] for k in keys], rotation=20, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel(f"vs {base} (>1 = better)")
        ax.set_title(f"Ratio to {base} (medians; latency and CPU inverted)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def write(results: Results, out_dir: Path) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and ``ratios.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": out_dir / "results.json", "md": out_dir / "results.md"}
    files["json"].write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    files["md"].write_text(markdown(results))
    png = out_dir / "ratios.png"
    if chart(results, png):
        files["png"] = png
    return files
