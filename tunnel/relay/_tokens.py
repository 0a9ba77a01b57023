"""
The relay's files of credentials, read at start and again whenever they change: accepted
agent tokens (``--tokens``: one a line, each with the tunnel names it may hold) and revoked
signed tokens (``--revoked``: subjects or token ids, one a line).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

__all__ = ["RevokedFile", "TokenFile", "WatchedFile", "read_revoked", "read_tokens"]


def _lines(lines: Iterable[str]) -> Iterable[tuple[int, str]]:
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if text and not text.startswith("#"):
            yield number, text


def read_tokens(lines: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """
    Tokens from a file's lines, each with the tunnel names (shell-style globs) it may hold:
    ``TOKEN`` (random ids only) or ``TOKEN names=web,api-*``; blank lines and ``#``
    comments skipped. A token given twice holds the names of both lines.

    @raise ValueError: a line with something else after its token (the message names the
        line).
    """
    tokens: dict[str, tuple[str, ...]] = {}
    for number, text in _lines(lines):
        token, *attributes = text.split()
        names: list[str] = []
        for attribute in attributes:
            key, sep, value = attribute.partition("=")
            if key != "names" or not sep:
                raise ValueError(
                    f"line {number}: {attribute!r} is not names=NAME[,NAME...] after the token"
                )
            names += [n for n in value.split(",") if n]
        tokens[token] = tuple(dict.fromkeys((*tokens.get(token, ()), *names)))
    return tokens


def read_revoked(lines: Iterable[str]) -> frozenset[str]:
    """
    Revoked subjects and token ids (``jti``) from a file's lines, one a line; blank lines and
    ``#`` comments skipped.
    """
    return frozenset(text for _, text in _lines(lines))


class WatchedFile:
    """
    A file, and whether it changed since it was last read (its modification time, size or
    inode: an editor's save, an ``mv`` of a new file, a mounted secret's update).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None

    def _stat(self) -> tuple[int, int, int]:
        st = os.stat(self.path)
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _read_lines(self) -> list[str]:
        stamp = self._stat()
        with open(self.path, encoding="utf-8") as f:
            lines = f.readlines()
        self._stamp = stamp
        return lines

    def changed(self) -> bool:
        """
        Whether the file differs from when it was last read (False while it is missing).
        """
        try:
            return self._stat() != self._stamp
        except OSError:
            return False


class TokenFile(WatchedFile):
    """
    A tokens file (`read_tokens`).
    """

    def read(self) -> dict[str, tuple[str, ...]]:
        """
        The tokens now in the file, with their names.

        @raise OSError: it cannot be read.
        @raise ValueError: a malformed line, or no token at all (taken for a mistake, never
            for "refuse all").
        """
        try:
            tokens = read_tokens(self._read_lines())
        except ValueError as e:
            raise ValueError(f"{self.path}: {e}") from None
        if not tokens:
            raise ValueError(f"{self.path} holds no token")
        return tokens


class RevokedFile(WatchedFile):
    """
    A file of revoked subjects and token ids (`read_revoked`); it may be empty.
    """

    def read(self) -> frozenset[str]:
        """
        @raise OSError: it cannot be read.
        """
        return read_revoked(self._read_lines())
