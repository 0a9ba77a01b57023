"""
The daemons' allocator thresholds (`tunnel._malloc`): with them, a 256 KiB socket read of a
small message takes its buffer from the heap instead of a fresh mapping per read, which
showed as a page fault (and mmap, mremap, munmap) per read. Counted in a fresh process:
minor page faults over 2,000 such reads.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tunnel._splice import SOCKET_READ

_CHILD = f"""
import resource, socket, sys
if sys.argv[1] == "tuned":
    from tunnel._malloc import tune_allocator
    assert tune_allocator()
a, b = socket.socketpair()
for _ in range(50):  # the heap grows to its working size first
    a.send(b"x" * 200); b.recv({SOCKET_READ})
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2000):
    a.send(b"x" * 200)
    assert len(b.recv({SOCKET_READ})) == 200
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_reads_do_not_map_a_buffer_per_read() -> None:
    untuned, tuned = _faults("plain"), _faults("tuned")
    # Untuned, each read's 256 KiB buffer is a new mapping whose first page faults in.
    assert untuned >= 2000, untuned
    # Tuned, the buffer comes from the heap: next to no faults over the 2,000 reads.
    assert tuned < 100, tuned
