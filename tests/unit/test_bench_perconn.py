"""The reading of ``strace -c`` summaries by ``bench.perconn``."""

from __future__ import annotations

from bench.perconn import parse_strace_summary

SUMMARY = """\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 35.10    0.004123           6       600           sendto
 20.00    0.002000           2      1200       300 recvfrom
  5.00    0.000500           1       900           epoll_wait
  0.10    0.000010           0         3         1 accept4
------ ----------- ----------- --------- --------- ----------------
100.00    0.006633           2      2703       301 total
"""


def test_calls_by_name_with_and_without_errors_and_no_total() -> None:
    assert parse_strace_summary(SUMMARY) == {
        "sendto": 600,
        "recvfrom": 1200,
        "epoll_wait": 900,
        "accept4": 3,
    }


def test_an_empty_summary_has_no_calls() -> None:
    assert parse_strace_summary("") == {}
