"""
The C allocator's thresholds for the daemons' data path.

Every socket read asks for a buffer of the read size (`tunnel._splice.SOCKET_READ`, 256 KiB:
Twisted's ``socket.recv(bufferSize)``), and CPython shrinks it to what arrived. glibc's malloc
serves a request of more than 128 KiB with a fresh ``mmap``; shrinking it is an ``mremap``
and freeing it a ``munmap``, and each new mapping's pages fault in again. So every read of a
small request (a few hundred octets) cost three system calls and a page fault: measured on
this machine, ~15 µs per 256 KiB ``recv`` of 200 octets against ~2.5 µs for 64 KiB, and a
100 KB bulk read 70 µs against 15 µs (``docs/performance.md``, "The allocator").

`tune_allocator` raises the mmap threshold above the read size (those buffers come from the
heap, and shrinking one is done in place) and the trim threshold with it (freeing one at the
top of the heap does not hand the memory back, to be asked for again by the next read). It
is applied only where this project owns the process (the relay's and the agent's daemons),
never in a program that imports the plain API.
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "tune_allocator"]

#: Requests below this come from the heap (glibc's ``M_MMAP_THRESHOLD``): above the largest
#: socket read.
MMAP_THRESHOLD = 1024 * 1024
#: Free memory at the top of the heap kept rather than returned (``M_TRIM_THRESHOLD``).
TRIM_THRESHOLD = 8 * 1024 * 1024

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_allocator() -> bool:
    """
    Set glibc malloc's mmap and trim thresholds for this process (see the module docstring).

    @return: whether they were set (False where the C library has no ``mallopt``: not Linux,
        or not glibc, e.g. musl).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        # The process's own symbols: the C library it runs on.
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
