"""
Transfer rates as users write them (``10MB/s``, ``500KB/s``, ``1GB/s``, ``8MiB/s``) and as
the wire carries them (whole octets per second).

Sans-IO and shared: the agent reads a tunnel's ``rate_limit``, the relay its ``--max-rate``
ceiling and, again, the value a request carries (never trusting the agent's check).
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["MAX_RATE", "MIN_RATE", "check_rate", "format_rate", "parse_rate"]

#: The slowest rate accepted, in octets per second: below it one socket read (up to
#: 256 KiB) would hold a connection for minutes.
MIN_RATE = 1000
#: The fastest rate accepted (1 PB/s: beyond any link), so that the wire value stays an
#: exact JSON integer.
MAX_RATE = 10**15

_UNITS = {
    "": 1,
    "K": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "T": 1000**4,
    "KI": 1024,
    "MI": 1024**2,
    "GI": 1024**3,
    "TI": 1024**4,
}

_RATE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kKMGT]i?)?(B|b|bit|bps)?(/s)?\s*", re.ASCII)

_EXAMPLES = "such as 10MB/s, 500KB/s, 1GB/s or 8MiB/s"


def parse_rate(text: str) -> int:
    """
    Octets per second from a rate such as ``10MB/s`` (decimal: 10 000 000), ``500KB/s``,
    ``1GB/s``, ``8MiB/s`` (binary: 8 388 608) or ``1500B/s``; the ``/s`` may be left out
    (``10MB``). ``B`` is for bytes: bits (``Mb``, ``Mbit``, ``Mbps``) are refused, so that
    nobody gets eight times the rate they meant.

    @raise ValueError: not such a rate, or outside `MIN_RATE`..`MAX_RATE`; the message says
        why and how to write one.
    """
    m = _RATE.fullmatch(text)
    if m is None:
        raise ValueError(f"rate {text!r} is not a number with a unit, {_EXAMPLES}")
    number, prefix, unit, _ = m.groups()
    if unit is None:
        raise ValueError(f"rate {text!r} has no unit: write bytes per second, {_EXAMPLES}")
    if unit != "B":
        raise ValueError(
            f"rate {text!r} is in bits: write bytes per second with B ({_EXAMPLES}; "
            "80Mbit/s is 10MB/s)"
        )
    value = float(number) * _UNITS[(prefix or "").upper()]
    return _bounded(round(value), text)


def _bounded(value: int, given: object) -> int:
    if value < MIN_RATE:
        raise ValueError(f"rate {given!r} is below the minimum of {format_rate(MIN_RATE)}")
    if value > MAX_RATE:
        raise ValueError(f"rate {given!r} is above the maximum of {format_rate(MAX_RATE)}")
    return value


def check_rate(value: Any) -> int | None:
    """
    A tunnel's rate limit as given in Python or on a command line: None (no limit), a
    string for `parse_rate`, or an integer number of octets per second.

    @raise ValueError: anything else, saying why.
    """
    if value is None:
        return None
    if isinstance(value, str):
        return parse_rate(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return _bounded(value, value)
    raise ValueError(f"rate_limit is a rate such as '10MB/s', or bytes per second, not {value!r}")


def format_rate(rate: int) -> str:
    """
    `rate` (octets per second) for people, in decimal units: ``10MB/s``, ``1.5GB/s``.
    """
    for prefix, size in (("T", 1000**4), ("G", 1000**3), ("M", 1000**2), ("K", 1000)):
        if rate >= size:
            return f"{rate / size:.4g}{prefix}B/s"
    return f"{rate}B/s"
