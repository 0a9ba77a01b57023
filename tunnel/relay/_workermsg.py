"""
The messages between the relay's supervisor and its workers (``--workers N``), sans-IO.

Each message is a JSON object with a type ``"t"``, framed by a 4-octet big-endian length.
A frame is at most `MAX_MESSAGE` octets, and every message is checked against its type's
fields (`FIELDS`) when it is decoded: a worker that sends anything else is broken (or
compromised), and the supervisor restarts it rather than act on it.

Worker to supervisor:

- ``claim`` {id, named, sig, principal}: one member of a tunnel was granted on this worker.
- ``release`` {id, principal}: one member of it left this worker.
- ``links`` {principal, n}: the authenticated links of `principal` on this worker now.
- ``probe`` {id, probe}: a link here reclaims `id`, which another worker holds: is its holder
  alive? (answered with ``probed``).
- ``probed`` {probe, to, alive}: this worker's answer to a ``probe`` it was sent.

Supervisor to worker:

- ``owners`` {id, workers, sig}: the workers that hold members of `id` now (empty: none),
  and its pool signature ("" for a random id).
- ``counts`` {principal, links, tunnels}: what `principal` holds on the *other* workers.
- ``lost`` {id, reason}: this worker's claim of `id` lost to another's; close its members.
- ``probe`` {id, probe, to}: probe the holder of `id` here; answer ``probed`` with `probe`
  and `to`.
- ``probed`` {probe, alive}: the answer to this worker's ``probe``.
- ``spread`` {up, links}: the workers running now, and the links on each worker (by index),
  to pick where a new agent link goes.
"""

from __future__ import annotations

import json
import struct
from typing import Any

__all__ = [
    "FIELDS",
    "MAX_MESSAGE",
    "MessageDecoder",
    "MessageError",
    "encode",
]

#: Octets one message may take (its frame's length).
MAX_MESSAGE = 65536

_LENGTH = struct.Struct(">I")

_STR = str
_INT = int
_BOOL = bool
_INTS = "ints"

#: Each message type and the type of each of its fields (every field is required, no
#: other is allowed).
FIELDS: dict[str, dict[str, Any]] = {
    "claim": {"id": _STR, "named": _BOOL, "sig": _STR, "principal": _STR},
    "release": {"id": _STR, "principal": _STR},
    "links": {"principal": _STR, "n": _INT},
    "probe": {"id": _STR, "probe": _INT, "to": _INT},
    "probed": {"probe": _INT, "to": _INT, "alive": _BOOL},
    "owners": {"id": _STR, "workers": _INTS, "sig": _STR},
    "counts": {"principal": _STR, "links": _INT, "tunnels": _INT},
    "lost": {"id": _STR, "reason": _STR},
    "spread": {"up": _INTS, "links": _INTS},
}

#: Longest string field (a tunnel id or name, a principal, a reason, a signature).
MAX_STRING = 4096


class MessageError(ValueError):
    """
    A frame or a message that breaks the format: too long, not JSON, of an unknown type, or
    with missing, extra or mistyped fields.
    """


def _valid_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**53


def check(message: Any) -> dict[str, Any]:
    """
    `message` itself when it is a well-formed message.

    @raise MessageError: it is not.
    """
    if not isinstance(message, dict):
        raise MessageError("a message is a JSON object")
    kind = message.get("t")
    fields = FIELDS.get(kind) if isinstance(kind, str) else None
    if fields is None:
        raise MessageError(f"unknown message type {str(kind)[:40]!r}")
    given = set(message) - {"t"}
    if given != set(fields):
        raise MessageError(f"{kind}: fields {sorted(given)} instead of {sorted(fields)}")
    for name, kind_of in fields.items():
        value = message[name]
        if kind_of is _STR:
            ok = isinstance(value, str) and len(value) <= MAX_STRING
        elif kind_of is _BOOL:
            ok = isinstance(value, bool)
        elif kind_of is _INT:
            ok = _valid_int(value)
        else:
            ok = isinstance(value, list) and len(value) <= 1024 and all(map(_valid_int, value))
        if not ok:
            raise MessageError(f"{kind}: field {name!r} has the wrong type")
    return message


def encode(message: dict[str, Any]) -> bytes:
    """
    The frame of `message` (checked first; the bounds of its fields keep it well under
    `MAX_MESSAGE`).

    @raise MessageError: it is not a well-formed message.
    """
    body = json.dumps(check(message), separators=(",", ":")).encode()
    return _LENGTH.pack(len(body)) + body


class MessageDecoder:
    """
    Frames in, checked messages out. Holds at most one frame's octets.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """
        The messages completed by `data`, in order.

        @raise MessageError: a frame is too long or a message is malformed (the stream is
            then unusable).
        """
        self._buffer += data
        out: list[dict[str, Any]] = []
        while len(self._buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buffer)
            if length > MAX_MESSAGE:
                raise MessageError(f"a frame of {length} octets, over {MAX_MESSAGE}")
            end = _LENGTH.size + length
            if len(self._buffer) < end:
                break
            body = bytes(self._buffer[_LENGTH.size : end])
            del self._buffer[:end]
            try:
                message = json.loads(body)
            except ValueError:
                raise MessageError("a frame that is not JSON") from None
            out.append(check(message))
        return out
