"""
Tunnel names and random tunnel ids: the first label of a tunnel's host name.

Sans-IO, shared by agent and relay. A random id is exactly `ID_LENGTH` characters of
`ID_ALPHABET`; a name is any other lowercase DNS label (docs/protocol.md §11.2), so the two
can never be the same string: no name can take a random id's URL, and no random id can
land on a name.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["ID_ALPHABET", "ID_LENGTH", "MAX_NAME", "check_name", "is_random_id"]

#: Lowercase, DNS-safe, without the look-alikes i, l, o, u.
ID_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
#: 16 characters of 5 bits each: 80 bits from the CSPRNG.
ID_LENGTH = 16
#: A DNS label's longest.
MAX_NAME = 63

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_ALPHABET = frozenset(ID_ALPHABET)


def is_random_id(text: str) -> bool:
    """
    Whether `text` has the form of a random id: `ID_LENGTH` characters of `ID_ALPHABET`.
    """
    return len(text) == ID_LENGTH and all(c in _ALPHABET for c in text)


def check_name(value: Any) -> str | None:
    """
    A tunnel name as given (None: a random id), checked.

    @raise ValueError: not a lowercase DNS label (letters, digits and inner hyphens, 1 to
        63 characters), or one of the form of a random id; the message says which.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"a tunnel name is a string, not {value!r}")
    if not _LABEL.fullmatch(value):
        raise ValueError(
            f"tunnel name {value!r} is not a DNS label: 1 to {MAX_NAME} lowercase letters, "
            "digits and hyphens, starting and ending with a letter or digit"
        )
    if is_random_id(value):
        raise ValueError(
            f"tunnel name {value!r} has the form of a random tunnel id ({ID_LENGTH} "
            f"characters of {ID_ALPHABET}); choose another (e.g. add a hyphen)"
        )
    return value
