"""The pure parts of ``bench.pycalls``: counting, naming, the top list, wrk's output, the
profiling switch that is installed in the daemons."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.pycalls import PROF_DIR_ENV, SITECUSTOMIZE, Count, short_name, wrk_requests

FUNCS = {
    ("~", 0, "<built-in method builtins.len>"): (30, 30, 0.0, 0.0, {}),
    ("/x/.venv/lib/python3.12/site-packages/twisted/internet/tcp.py", 269, "doRead"): (
        10, 10, 0.0, 0.0, {},
    ),
    ("/work/wt/tunnel/link.py", 358, "flush"): (10, 12, 0.0, 0.0, {}),
}  # fmt: skip


def test_calls_per_unit_count_recursive_calls_too() -> None:
    c = Count(total_calls=52, units=4, functions=FUNCS)
    assert c.per_unit == 13.0


def test_top_is_most_calls_first_and_cut_at_k() -> None:
    c = Count(total_calls=52, units=2, functions=FUNCS)
    assert c.top(2) == [
        (15.0, "<built-in method builtins.len>"),
        (6.0, "tunnel/link.py:358:flush"),
    ]
    assert [name for _, name in c.top(10)][-1] == "twisted/internet/tcp.py:269:doRead"


def test_short_names() -> None:
    assert short_name(("~", 0, "<method 'get' of 'dict' objects>")) == (
        "<method 'get' of 'dict' objects>"
    )
    assert short_name(("/usr/lib/python3.12/ssl.py", 912, "read")) == "stdlib/ssl.py:912:read"
    assert short_name(("/a/b/bench/client.py", 3, "f")) == "bench/client.py:3:f"
    assert short_name(("/elsewhere/x.py", 1, "g")) == "/elsewhere/x.py:1:g"


def test_wrk_requests_and_its_errors() -> None:
    out = "  6793 requests in 3.00s, 1.2MB read\nRequests/sec: 2264.1\n"
    assert wrk_requests(out) == 6793
    with pytest.raises(ValueError, match="Socket errors"):
        wrk_requests(out + "  Socket errors: connect 0, read 1, write 0, timeout 0\n")
    with pytest.raises(ValueError, match="Non-2xx"):
        wrk_requests(out + "  Non-2xx or 3xx responses: 4\n")
    with pytest.raises(ValueError, match="request count"):
        wrk_requests("unable to connect")


def _handlers(tmp_path: Path, argv0: str) -> str:
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), PROF_DIR_ENV: str(tmp_path)}
    code = "import signal, sys; print(signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL)"
    p = subprocess.run(
        [sys.executable, "-c", code, argv0], env=env, capture_output=True, text=True, check=True
    )
    return p.stdout.strip()


def test_the_switch_is_installed_in_the_daemons_only(tmp_path: Path) -> None:
    assert _handlers(tmp_path, "tunnelagent") == "False"
    assert _handlers(tmp_path, "tunnelrelay") == "False"
    assert _handlers(tmp_path, "somethingelse") == "True"


def test_the_switch_dumps_a_profile_on_sigusr2(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), PROF_DIR_ENV: str(tmp_path)}
    code = (
        "import os, signal; os.kill(os.getpid(), signal.SIGUSR1); sum(range(10));"
        "os.kill(os.getpid(), signal.SIGUSR2); print(os.getpid())"
    )
    p = subprocess.run(
        [sys.executable, "-c", code, "tunnelrelay"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert (tmp_path / f"{p.stdout.strip()}.prof").stat().st_size > 0
