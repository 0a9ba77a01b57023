"""
The relay's file of accepted agent tokens, read at start and again whenever it changes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

__all__ = ["TokenFile", "read_tokens"]


def read_tokens(lines: Iterable[str]) -> frozenset[str]:
    """
    Tokens from a file's lines: one per line; blank lines and ``#`` comments skipped.
    """
    tokens = {line.strip() for line in lines}
    return frozenset(t for t in tokens if t and not t.startswith("#"))


class TokenFile:
    """
    A tokens file, and whether it changed since it was last read (its modification time,
    size or inode: an editor's save, an ``mv`` of a new file, a mounted secret's update).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None

    def _stat(self) -> tuple[int, int, int]:
        st = os.stat(self.path)
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def read(self) -> frozenset[str]:
        """
        The tokens now in the file.

        @raise OSError: it cannot be read.
        @raise ValueError: it holds no token (taken for a mistake, never for "refuse all").
        """
        stamp = self._stat()
        with open(self.path, encoding="utf-8") as f:
            tokens = read_tokens(f)
        self._stamp = stamp
        if not tokens:
            raise ValueError(f"{self.path} holds no token")
        return tokens

    def changed(self) -> bool:
        """
        Whether the file differs from when it was last read (False while it is missing).
        """
        try:
            return self._stat() != self._stamp
        except OSError:
            return False
