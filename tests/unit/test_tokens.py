"""The relay's tokens file (`tunnel.relay._tokens`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tunnel.relay._tokens import RevokedFile, TokenFile, read_revoked, read_tokens


def test_read_tokens_skips_blank_lines_and_comments() -> None:
    assert set(read_tokens(["a\n", "\n", "  # c\n", "# d\n", " b \n", "a\n"])) == {"a", "b"}


def test_a_token_line_may_carry_the_names_its_token_may_hold() -> None:
    tokens = read_tokens(["plain\n", "web-token names=web,api-*\n", "web-token names=x\n"])
    assert tokens == {"plain": (), "web-token": ("web", "api-*", "x")}


@pytest.mark.parametrize("line", ["t extra", "t names", "t name=web", "t names:web"])
def test_anything_else_after_a_token_is_an_error_naming_the_line(line: str) -> None:
    with pytest.raises(ValueError, match="line 2"):
        read_tokens(["# head\n", line])


def test_the_revoked_file_may_be_empty_and_is_reread(tmp_path: Path) -> None:
    assert read_revoked(["# none\n", "\n"]) == frozenset()
    path = tmp_path / "revoked"
    path.write_text("")
    revoked = RevokedFile(str(path))
    assert revoked.read() == frozenset()
    path.write_text("alice\n# a token id\n3f2a9c\n")
    assert revoked.changed()
    assert revoked.read() == {"alice", "3f2a9c"}


def test_changes_are_seen_once_read_again(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("one\n")
    tokens = TokenFile(str(path))
    assert tokens.changed()  # never read
    assert set(tokens.read()) == {"one"}
    assert not tokens.changed()
    # Replaced by a new file (as deploy tools and mounted secrets do).
    new = tmp_path / "tokens.new"
    new.write_text("one\ntwo\n")
    os.replace(new, path)
    assert tokens.changed()
    assert set(tokens.read()) == {"one", "two"}
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
