"""The /proc readings of ``bench.cpusplit``: CPU ticks, context switches, process trees."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from bench.cpusplit import Usage, descendants, markdown, parse_stat_times, parse_switches

# A command name with a space and parentheses of its own, as /proc shows it.
STAT = (
    "4242 (python (x) y) S 1 4242 4242 0 -1 4194560 1000 0 0 0 "
    "1234 567 0 0 20 0 3 0 100 200000 3000 18446744073709551615"
)

STATUS = """\
Name:\tpython3
State:\tS (sleeping)
voluntary_ctxt_switches:\t150
nonvoluntary_ctxt_switches:\t7
"""


def test_times_are_read_after_the_command_name() -> None:
    assert parse_stat_times(STAT) == (1234, 567)


def test_switches_are_voluntary_plus_involuntary() -> None:
    assert parse_switches(STATUS) == 157
    assert parse_switches("Name:\tx\n") == 0


def test_usage_differences() -> None:
    assert Usage(2.0, 1.5, 30) - Usage(0.5, 1.0, 10) == Usage(1.5, 0.5, 20)


def test_descendants_include_children_of_children() -> None:
    code = (
        "import subprocess, sys\n"
        "p = subprocess.Popen(['sleep', '30'])\n"
        "print(p.pid, flush=True)\n"
        "p.wait()\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    grandchild = None
    try:
        assert parent.stdout is not None
        grandchild = int(parent.stdout.readline())
        found = descendants([os.getpid()])
        assert os.getpid() in found and parent.pid in found and grandchild in found
        assert descendants([parent.pid]) == sorted([parent.pid, grandchild])
    finally:
        if grandchild is not None:
            os.kill(grandchild, signal.SIGKILL)
        parent.kill()
        parent.wait()


def test_markdown_has_a_row_per_process_and_a_total_per_path() -> None:
    results = {
        "tunnel-tcp": {
            "p50_ms": 0.65,
            "processes": {
                "python[1]": {"user_us": 190.0, "system_us": 120.0, "switches": 3.1},
                "python[2]": {"user_us": 170.0, "system_us": 130.0, "switches": 3.0},
            },
            "total": {"user_us": 360.0, "system_us": 250.0, "switches": 6.1},
        }
    }
    text = markdown(results, 3000, 2)  # type: ignore[arg-type]
    assert "| tunnel-tcp, `python[1]` | 190 | 120 | 3.1 | |" in text
    assert "| **tunnel-tcp, all** | **360** | **250** | 6.1 | 0.650 ms |" in text
