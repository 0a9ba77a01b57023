"""The relay's periodic release of freed memory (`tunnel.relay._memory`)."""

from __future__ import annotations

import gc
import os
import resource

import pytest

from tunnel.relay import _memory

PAGE = resource.getpagesize()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


@pytest.mark.skipif(_memory._malloc_trim is None, reason="no glibc malloc_trim here")
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="no /proc")
def test_freed_heap_below_a_live_block_goes_back_to_the_system() -> None:
    # 64 KiB blocks come from the heap (below glibc's mmap threshold); a block allocated
    # after them stays alive above them, so free() alone keeps their pages resident.
    blocks = [bytes(64 * 1024) for _ in range(1600)]  # 100 MiB
    pin = bytes(64 * 1024)
    before_free = rss_bytes()
    del blocks
    freed_only = rss_bytes()
    assert _memory.release_free_heap() is True
    trimmed = rss_bytes()
    assert freed_only - trimmed > 50 * 1024 * 1024, (before_free, freed_only, trimmed)
    del pin


def test_collect_frees_cycles() -> None:
    class Node:
        pass

    gc.collect()
    a, b = Node(), Node()
    a.other, b.other = b, a  # type: ignore[attr-defined]
    del a, b
    gc.disable()
    try:
        assert any(type(o) is Node for o in gc.get_objects())
        _memory.collect()
        assert not any(type(o) is Node for o in gc.get_objects())
    finally:
        gc.enable()
