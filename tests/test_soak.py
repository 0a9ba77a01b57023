"""
A short smoke run of the soak (``python -m bench.soak``): it starts, churns, samples and
writes its CSV, plot and summary. The RSS-growth check itself is not asserted here: 20 s is
far too short for a growth per hour to mean anything.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

FIELDS = {
    "duration_s",
    "samples",
    "rss_kib_start",
    "rss_kib_after_warmup",
    "rss_kib_end",
    "rss_growth_pct_per_hour",
    "fds_start",
    "fds_end",
    "fds_idle_start",
    "fds_idle_end",
    "operations",
    "ops",
    "errors",
    "pass",
}


def test_soak_smoke(tmp_path: Path) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    pytest.importorskip("matplotlib")
    out = tmp_path / "soak"
    cmd = [sys.executable, "-m", "bench.soak", "--duration", "15", "--interval", "1"]
    cmd += ["--out", str(out), "--cut-every", "5", "--agent-every", "6"]
    try:
        r = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as e:  # the soak stops its own children in `finally`
        pytest.fail(f"the soak smoke run overran its deadline:\n{e.stdout}\n{e.stderr}")
    # 0 (pass) or 1 (the growth check failed: meaningless over 15 s); 2 is a broken run.
    assert r.returncode in (0, 1), r.stdout[-3000:] + r.stderr[-3000:]

    with open(out / "soak.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    churn = [row for row in rows if row["phase"] == "churn"]
    assert len(churn) >= 8, rows
    assert all(int(row["rss_kib"]) > 0 and int(row["fds"]) > 0 for row in churn)
    assert {row["phase"] for row in rows} == {"idle-start", "churn", "idle-end"}

    png = out / "soak.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    summary = json.loads((out / "summary.json").read_text())
    assert summary.keys() >= FIELDS, FIELDS - summary.keys()
    assert isinstance(summary["pass"], bool)
    assert summary["operations"] > 20
    for kind in ("open", "close", "cut", "tls_get", "tcp_echo"):
        assert summary["ops"].get(kind, 0) >= 1, summary["ops"]
    # Everything was closed at the end: the relay is back to idle, with its descriptors.
    idle_end = summary["idle_end"]
    assert idle_end["links"] == idle_end["tunnels"] == idle_end["streams"] == 0, idle_end
    assert summary["fds_idle_end"] == summary["fds_idle_start"], summary
    assert "soak: " in r.stdout
