"""
Giving a long-running relay's freed memory back to the system.

Two things keep a relay's resident size above what it uses under churn:

- objects in reference cycles wait for one of CPython's rare full collections (the relay
  avoids making them: closed links and connections are freed by reference counting; this is
  the backstop for cycles that remain, in its own code or in its libraries);
- glibc's ``free`` gives memory back to the system only from the top of its heap, so the
  space freed by connections that ended below one that lives on stays resident.
  ``malloc_trim`` returns the free pages anywhere in the heap (on a relay after 50 minutes
  of churn, one call returned 0.7 MiB of a 2.2 MiB rise; see docs/reliability.md).

`collect` does both; the relay calls it every `INTERVAL` seconds.
"""

from __future__ import annotations

import ctypes
import gc
from typing import Any

#: Seconds between collections.
INTERVAL = 30.0


def _load_malloc_trim() -> Any:
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    trim = getattr(libc, "malloc_trim", None)  # glibc only (not musl, not macOS)
    if trim is not None:
        trim.argtypes = [ctypes.c_size_t]
        trim.restype = ctypes.c_int
    return trim


_malloc_trim = _load_malloc_trim()


def release_free_heap() -> bool:
    """
    Return the C heap's free pages to the system, where the C library can.

    @return: whether it could (glibc's ``malloc_trim`` is available).
    """
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True


def collect() -> None:
    """
    Collect cyclic garbage, then give the freed heap back.
    """
    gc.collect()
    release_free_heap()
