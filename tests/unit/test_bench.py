"""The benchmark's own pieces that numbers depend on: the WAN shaper's arithmetic, the
reading of py-spy's stacks and -X importtime, and the WAN report."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from pathlib import Path

import pytest

from bench import coldstart, delayproxy, profile, report


def test_link_paces_at_the_rate() -> None:
    """Bytes booked back to back depart at the cap, after one bucket of burst."""
    link = delayproxy.Link(delay=0.05, rate=1e6, burst=100_000, queue=1_000_000)
    assert link.departure(10.0, 100_000) == 10.0  # the full bucket pays for it at once
    assert link.departure(10.0, 500_000) == pytest.approx(10.5)
    assert link.backlog(10.0) == pytest.approx(500_000)
    assert link.backlog(10.25) == pytest.approx(250_000)


def test_link_bucket_refills_only_to_burst() -> None:
    """An idle link saves up at most ``burst`` bytes of credit."""
    link = delayproxy.Link(delay=0.0, rate=1e6, burst=100_000, queue=1_000_000)
    link.departure(0.0, 1)
    # 100 s idle: still only 100 kB go at once, the next 100 kB take 0.1 s.
    assert link.departure(100.0, 100_000) == 100.0
    assert link.departure(100.0, 100_000) == pytest.approx(100.1)


def test_link_without_rate_is_only_a_delay() -> None:
    link = delayproxy.Link(delay=0.05, rate=None, burst=0, queue=0)
    assert link.departure(3.0, 1 << 30) == 3.0
    assert link.backlog(3.0) == 0.0


def test_wait_for_room_blocks_while_the_queue_is_full() -> None:
    async def go() -> float:
        loop = asyncio.get_running_loop()
        link = delayproxy.Link(delay=0.0, rate=1e6, burst=0, queue=10_000)
        now = loop.time()
        link.departure(now, 60_000)  # 50 kB over the queue bound: 50 ms at 1 MB/s
        await link.wait_for_room()
        return loop.time() - now

    waited = asyncio.run(go())
    assert 0.04 <= waited < 0.5


def _serve_zeros(total: int) -> tuple[socket.socket, threading.Thread]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def run() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.sendall(bytes(total))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return srv, t


def test_proxy_caps_a_download_and_drops_nothing() -> None:
    """2 MB through a 20 MB/s, 10 ms link: every byte arrives, in about 0.1 s, not at once."""
    total = 2_000_000
    srv, _ = _serve_zeros(total)
    target = srv.getsockname()[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        listen = s.getsockname()[1]
    opts = delayproxy._Options(0.005, 0.005, 64 << 20, None)
    loop = asyncio.new_event_loop()
    task = loop.create_task(
        delayproxy.serve(
            {listen: target}, opts, rate=20e6, burst=64 << 10, queue=256 << 10, cut_on_sigusr1=False
        )
    )

    def run() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(task)
        loop.close()

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    try:
        deadline = time.monotonic() + 5
        while True:
            try:
                c = socket.create_connection(("127.0.0.1", listen), timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        start = time.monotonic()
        got = 0
        with c:
            while chunk := c.recv(1 << 16):
                got += len(chunk)
        seconds = time.monotonic() - start
    finally:
        loop.call_soon_threadsafe(task.cancel)
        runner.join(5)
        srv.close()
    assert got == total
    assert 0.08 <= seconds < 2.0


def test_self_times_names_functions_and_sets_the_poll_apart(tmp_path: Path) -> None:
    stacks = tmp_path / "s.txt"
    poll = "main (a.py:1);EPollReactor.doPoll (twisted/internet/epollreactor.py:227)"
    send = (
        "main (a.py:1);Connection.writeSomeData (twisted/internet/tcp.py:306);"
        "untilConcludes (twisted/python/util.py:760)"
    )
    stacks.write_text(
        f"{poll};untilConcludes (twisted/python/util.py:760) 7\n"
        f"{poll} 3\n"
        f"{send} 5\n"
        "main (a.py:1);feed (tunnel/wire/frames.py:10) 2\n"
        "main (a.py:1);feed (tunnel/wire/frames.py:12) 1\n"
    )
    counts, total = profile.self_times(stacks)
    assert total == 18
    assert counts[profile.POLL] == 10
    assert counts["feed (tunnel/wire/frames.py)"] == 3
    key = (
        "untilConcludes (twisted/python/util.py) ← "
        "Connection.writeSomeData (twisted/internet/tcp.py)"
    )
    assert counts[key] == 5


def test_wan_table_ratios_against_ssh() -> None:
    wan = {"tag": "x", "rtt_ms": 100.0, "rate_mbps": 400.0}

    def path(m1: float, m8: float) -> dict[str, object]:
        stat = lambda v: {"median": v, "min": v, "max": v, "samples": [v], "unit": "MB/s"}  # noqa: E731
        return {"wan": wan, "errors": [], "metrics": {"wan1_MBps": stat(m1), "wan8_MBps": stat(m8)}}

    results = {
        "settings": {"runs": 1},
        "paths": {
            "ssh-R-wan-x": path(10.0, 40.0),
            "ssh-R-tt-wan-x": path(20.0, 40.0),
            "tunnel-tcp-wan-x": path(40.0, 48.0),
        },
    }
    md = report.markdown(results)
    row = next(line for line in md.splitlines() if line.startswith("| tunnel-tcp-wan-x"))
    assert "| 4.00x | 2.00x |" in row and "| 1.20x | 1.20x |" in row


def test_importtime_lines_are_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    class Done:
        returncode = 0
        stdout = ""
        stderr = (
            "import time: self [us] | cumulative | imported package\n"
            "import time:       100 |        100 |   typing\n"
            "import time:       200 |        900 | tunnel\n"
        )

    monkeypatch.setattr(coldstart.subprocess, "run", lambda *a, **k: Done())
    head, *rows = coldstart.importtime("r:1", "ca", 1, forward=False)
    assert (head["total_self_us"], head["modules"]) == (300, 2)
    assert [r["module"] for r in head["top_self"]] == ["tunnel", "typing"]
    assert rows[0] == {"module": "tunnel", "self_us": 200, "cumulative_us": 900, "depth": 0}
    assert rows[1]["depth"] == 1


def _results(metrics: dict[str, dict[str, float]]) -> dict[str, object]:
    return {
        "paths": {
            path: {"metrics": {k: {"median": v} for k, v in values.items()}}
            for path, values in metrics.items()
        }
    }


def test_targets_judge_ratio_bound_and_absence() -> None:
    """A ratio target is met only at or past its factor, a bound only within it, both only
    together; a target whose path or reference did not run is "not measured"."""
    from bench import targets

    by_key = {(t.path, t.key): t for t in targets.TARGETS}
    rps = by_key[("tunnel-tcp", "http_rps")]
    streams = by_key[("tunnel-tcp", "tcp100_MBps")]
    first = by_key[("tunnel-tcp", "connect_p50_ms")]
    run = _results(
        {
            "tunnel-tcp": {"http_rps": 100.0, "tcp100_MBps": 140.0, "connect_p50_ms": 0.4},
            "ssh-R-tt": {"http_rps": 100.0, "connect_p50_ms": 0.6},
            "ssh-R": {"tcp100_MBps": 100.0},
        }
    )
    assert targets.verdict(rps, run) == (100.0, 100.0, "yes")
    assert targets.verdict(streams, run)[2] == "no"  # 1.4× of a 1.5× goal
    assert targets.verdict(first, run)[2] == "yes"  # 0.67× and under 0.5 ms
    slow = _results({"tunnel-tcp": {"connect_p50_ms": 0.55}, "ssh-R-tt": {"connect_p50_ms": 0.9}})
    assert targets.verdict(first, slow)[2] == "no"  # within the ratio, past the bound
    alone = _results({"tunnel-tcp": {"http_rps": 100.0}})
    assert targets.verdict(rps, alone)[2] == "not measured"
    table = targets.markdown(run)
    assert "| raw TCP 100 streams ≥ 1.5× `ssh -N -R` | 140 | 100 | 1.40× | no |" in table
    assert table.count("not measured") == len(targets.TARGETS) - 3
