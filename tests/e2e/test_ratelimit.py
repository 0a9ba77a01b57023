"""
Rate limits end to end: a real relay process holds a tunnel's download to its rate, with
curl as the client, and its memory does not grow with the file (the limit pauses the agent
through the stream's credit; nothing is buffered). Times are lower bounds only.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.attacks.harness import usage
from tests.e2e.harness import LOOPBACK, Procs, Relay, random_file, require_tool

pytestmark = pytest.mark.e2e

SIZE = 20 * 1000 * 1000
RATE = 5 * 1000 * 1000


def test_a_download_is_held_to_the_rate_and_the_relay_does_not_buffer_it(
    procs: Procs, relay: Relay
) -> None:
    root = procs.dir / "files"
    root.mkdir()
    random_file(root / "big", SIZE, seed=5)
    backend = procs.backend("http", "--root", str(root))
    agent = procs.agent(relay, [f"{backend.port}:rate=5MB/s"])
    tunnel = agent.ready(f"{backend.port}")
    agent.proc.wait_log(r"at most 5MB/s each way")
    before = usage(relay.proc.pid).rss_kib
    started = time.monotonic()
    curl = subprocess.Popen(
        [
            require_tool("curl"),
            "-sS",
            "--max-time",
            "60",
            "--cacert",
            str(relay.ca),
            "--resolve",
            f"{tunnel.host}:{tunnel.port}:{LOOPBACK}",
            "-o",
            "/dev/null",
            "-w",
            "%{size_download} %{speed_download}",
            tunnel.url + "/file/big",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    peak = before
    while curl.poll() is None:
        peak = max(peak, usage(relay.proc.pid).rss_kib)
        try:
            curl.wait(0.05)
        except subprocess.TimeoutExpired:
            pass
    took = time.monotonic() - started
    out, err = curl.communicate()
    assert curl.returncode == 0, err
    size, _speed = out.split()
    assert int(size) == SIZE
    # At 5 MB/s, 20 MB take 4 s; the bucket's burst is 0.1 s of the rate.
    assert took >= 3.0, took
    # The file went through the relay; its memory grew by far less than the file.
    assert (peak - before) * 1024 < SIZE / 4, (before, peak)
