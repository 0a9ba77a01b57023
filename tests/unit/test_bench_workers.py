"""The pieces of ``bench.handoff`` and ``bench.workers`` that their figures depend on: the
reading of ``strace -c`` summaries, the medians of rounds, and the report's labels."""

from __future__ import annotations

from typing import Any

from bench import handoff, workers

STRACE = """\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 41.20    0.000103           3        30           epoll_wait
 20.00    0.000050           1        40         2 recvfrom
  0.00    0.000000           0         1         1 access
------ ----------- ----------- --------- --------- ----------------
100.00    0.000250           3        71         3 total
"""


def test_strace_summary_counts_calls_with_or_without_errors_and_not_the_total() -> None:
    assert handoff.parse_strace_summary(STRACE) == {"epoll_wait": 30, "recvfrom": 40, "access": 1}
    assert handoff.parse_strace_summary("") == {}


def test_median_of_rounds_skips_what_a_round_lacks() -> None:
    rows: list[dict[str, Any]] = [
        {"first_byte": {"tls": {"p50_ms": 3.0}}},
        {"first_byte": {"tls": {"p50_ms": 1.0}}},
        {"first_byte": {"tls": {"p50_ms": 2.0}}},
        {"first_byte": {}},
    ]
    assert workers._median_of(rows, "first_byte", "tls", "p50_ms") == 2.0
    assert workers._median_of(rows, "first_byte", "tcp", "p50_ms") is None


def test_the_report_labels_noisy_figures_and_counts() -> None:
    run = {
        "workers": 2,
        "errors": [],
        "links": [{"links": 3}, {"links": 5}],
        "held": [{"public_connections": 24}, {"public_connections": 40}],
        "median": {
            "tls_handed_off": 495.0,
            "tcp_p50_ms": 1.0,
            "tcp_p99_ms": 2.0,
            "tls_p50_ms": 3.0,
            "tls_p99_ms": 4.0,
            "tcp_relay_cpu_us_per_connection": 500.0,
            "tls_relay_cpu_us_per_connection": 1500.0,
            "mb_per_s": 300.0,
            "relay_cpu_ms_per_mb": 2.0,
        },
        "rounds": [],
    }
    failed = {"workers": 4, "errors": ["RuntimeError('no supervisor')"]}
    text = workers.markdown({"sizes": workers.Sizes().__dict__, "rounds": 3, "runs": [run, failed]})
    assert "noisy, shared machine" in text and "counts" in text
    assert "| 2 | 3 / 5 | 24 / 40 | 495 of 1000 |" in text
    assert "| 4 |" in text and "no supervisor" in text
