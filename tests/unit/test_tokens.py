"""The relay's tokens file (`tunnel.relay._tokens`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tunnel.relay._tokens import TokenFile, read_tokens


def test_read_tokens_skips_blank_lines_and_comments() -> None:
    assert read_tokens(["a\n", "\n", "  # c\n", "# d\n", " b \n", "a\n"]) == {"a", "b"}


def test_changes_are_seen_once_read_again(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("one\n")
    tokens = TokenFile(str(path))
    assert tokens.changed()  # never read
    assert tokens.read() == {"one"}
    assert not tokens.changed()
    # Replaced by a new file (as deploy tools and mounted secrets do).
    new = tmp_path / "tokens.new"
    new.write_text("one\ntwo\n")
    os.replace(new, path)
    assert tokens.changed()
    assert tokens.read() == {"one", "two"}
    assert not tokens.changed()
    path.unlink()
    assert not tokens.changed()  # missing: nothing to reload
    with pytest.raises(OSError):
        tokens.read()


def test_a_file_without_tokens_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# nothing yet\n\n")
    with pytest.raises(ValueError, match="holds no token"):
        TokenFile(str(path)).read()
