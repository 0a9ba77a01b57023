"""
Signed agent tokens: JWTs signed with Ed25519 (``EdDSA``, RFC 8037), through PyJWT.

The issuer (``tunnel token issue``) holds the private key; relays (``--token-key``) hold the
public key and verify a token without a database: its signature, its expiry (``exp``) and
not-before (``nbf``), and its claims, which say who it is for (``sub``, required), the tunnel
names it may hold (``names``: shell-style globs), and at most how many tunnels its subject may
hold at once (``max_tunnels``). Each token has an id (``jti``) so that one token can be
revoked by id, and all of a subject's by subject (``--revoked``).

No I/O but reading and writing key files; the verifying side takes the time as an argument.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "ALGORITHM",
    "LEEWAY",
    "MAX_SUBJECT",
    "PRIVATE_KEY_FILE",
    "PUBLIC_KEY_FILE",
    "Claims",
    "InvalidToken",
    "TokenVerifier",
    "generate_key_pair",
    "issue_token",
    "load_private_key",
    "looks_signed",
    "parse_duration",
]

ALGORITHM = "EdDSA"
#: Seconds of clock skew allowed for ``nbf`` and ``iat`` (never for ``exp``).
LEEWAY = 30.0
#: The longest subject, in characters.
MAX_SUBJECT = 128
PRIVATE_KEY_FILE = "token-key.pem"
PUBLIC_KEY_FILE = "token-key.pub.pem"

_DURATION = re.compile(r"([0-9]+)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SUBJECT = re.compile(r"[A-Za-z0-9._@+:-]+")


class InvalidToken(ValueError):
    """
    A token that does not verify; the message says why (for the relay's log, never the
    agent: it is told ``unauthorized``).
    """


def parse_duration(text: str) -> int:
    """
    Seconds in ``90s``, ``15m``, ``2h`` or ``30d``.

    @raise ValueError: not of that form, or zero.
    """
    m = _DURATION.fullmatch(text.strip())
    if m is None or int(m.group(1)) == 0:
        raise ValueError(f"duration {text!r} is not a positive number then s, m, h or d (90s, 2h)")
    return int(m.group(1)) * _UNITS[m.group(2)]


def generate_key_pair(directory: str) -> tuple[str, str]:
    """
    Write a new Ed25519 key pair into `directory` (created if missing): the private key
    (`PRIVATE_KEY_FILE`, PKCS#8 PEM, mode 0600) and the public one (`PUBLIC_KEY_FILE`).

    @raise FileExistsError: a key is already there (never overwritten).
    @return: the two paths, private first.
    """
    os.makedirs(directory, mode=0o700, exist_ok=True)
    private_path = os.path.join(directory, PRIVATE_KEY_FILE)
    public_path = os.path.join(directory, PUBLIC_KEY_FILE)
    for path in (private_path, public_path):
        if os.path.exists(path):
            raise FileExistsError(f"{path} exists; not overwriting a key")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    with open(public_path, "wb") as f:
        f.write(public_pem)
    return private_path, public_path


def load_private_key(path: str) -> Ed25519PrivateKey:
    """
    The Ed25519 private key in PEM file `path`.

    @raise ValueError: it cannot be read, or is not an Ed25519 private key.
    """
    try:
        with open(path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: not a readable private key: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def _check_subject(subject: str) -> str:
    if not isinstance(subject, str) or not _SUBJECT.fullmatch(subject):
        raise ValueError(
            f"subject {subject!r} is not 1 to {MAX_SUBJECT} of letters, digits and ._@+:-"
        )
    if len(subject) > MAX_SUBJECT:
        raise ValueError(f"subject is longer than {MAX_SUBJECT} characters")
    return subject


def _check_globs(names: Sequence[str]) -> tuple[str, ...]:
    globs = tuple(names)
    for glob in globs:
        if not isinstance(glob, str) or not re.fullmatch(r"[a-z0-9*?\[\]!-]{1,63}", glob):
            raise ValueError(
                f"name pattern {glob!r} is not a tunnel name or a shell-style glob of one "
                "(lowercase letters, digits, hyphens, * ? [])"
            )
    return globs


def issue_token(
    key: Ed25519PrivateKey,
    subject: str,
    *,
    now: float,
    names: Sequence[str] = (),
    expires_in: float | None = None,
    not_before: float | None = None,
    max_tunnels: int | None = None,
    token_id: str | None = None,
) -> str:
    """
    A signed token for `subject`, issued at `now` (seconds since the epoch).

    @param names: the tunnel names (globs) it may hold; empty: random ids only.
    @param expires_in: seconds from `now` until it expires; None: never (revoke it instead).
    @param not_before: seconds since the epoch before which it is not valid.
    @param max_tunnels: at most this many tunnels at once for its subject; None: the relay's
        bounds only.
    @raise ValueError: a bad subject, name pattern or count.
    """
    claims: dict[str, Any] = {
        "sub": _check_subject(subject),
        "iat": int(now),
        "jti": token_id or secrets.token_hex(8),
    }
    globs = _check_globs(names)
    if globs:
        claims["names"] = list(globs)
    if expires_in is not None:
        claims["exp"] = int(now + expires_in)
    if not_before is not None:
        claims["nbf"] = int(not_before)
    if max_tunnels is not None:
        if isinstance(max_tunnels, bool) or not isinstance(max_tunnels, int) or max_tunnels < 1:
            raise ValueError(f"max_tunnels must be a positive integer, not {max_tunnels!r}")
        claims["max_tunnels"] = max_tunnels
    return jwt.encode(claims, key, algorithm=ALGORITHM)


def looks_signed(token: str) -> bool:
    """
    Whether `token` has the form of a JWT (three base64url parts), to be verified as one.
    """
    return token.count(".") == 2 and all(
        part and re.fullmatch(r"[A-Za-z0-9_-]+", part) for part in token.split(".")
    )


@dataclass(frozen=True)
class Claims:
    """
    What a verified token says.
    """

    subject: str
    #: Its id (``jti``), or "" if it has none.
    token_id: str
    #: The tunnel names (globs) it may hold; empty: random ids only.
    names: tuple[str, ...]
    #: Seconds since the epoch it expires at, or None.
    expires: float | None
    max_tunnels: int | None


class TokenVerifier:
    """
    Verifies signed tokens against one or more Ed25519 public keys (several while a key is
    being rotated: a token signed by any of them is accepted).
    """

    def __init__(self, keys: Sequence[Ed25519PublicKey], paths: Sequence[str] = ()) -> None:
        if not keys:
            raise ValueError("a token verifier needs at least one key")
        self.keys = tuple(keys)
        self.paths = tuple(paths)

    @classmethod
    def from_files(cls, paths: Sequence[str]) -> TokenVerifier:
        """
        The public keys in PEM files `paths` (a file may hold several).

        @raise ValueError: a file cannot be read or holds no Ed25519 public key.
        """
        keys: list[Ed25519PublicKey] = []
        for path in paths:
            try:
                with open(path, "rb") as f:
                    text = f.read()
            except OSError as e:
                raise ValueError(f"--token-key {path}: {e}") from None
            found = 0
            for block in re.findall(
                rb"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", text, re.S
            ):
                key = serialization.load_pem_public_key(block)
                if not isinstance(key, Ed25519PublicKey):
                    raise ValueError(f"--token-key {path}: not an Ed25519 public key")
                keys.append(key)
                found += 1
            if not found:
                raise ValueError(f"--token-key {path}: no PEM public key in it")
        return cls(keys, paths)

    def verify(self, token: str, now: float) -> Claims:
        """
        The claims of `token` if its signature verifies with one of the keys, `now` is
        before its ``exp`` and (within `LEEWAY`) not before its ``nbf``, and its claims
        are well formed.

        @raise InvalidToken: any of that fails; the message says which.
        """
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as e:
            raise InvalidToken(f"not a token: {e}") from None
        if header.get("alg") != ALGORITHM:
            raise InvalidToken(f"algorithm {header.get('alg')!r} is not {ALGORITHM}")
        claims: dict[str, Any] | None = None
        for key in self.keys:
            try:
                # Times are checked below, against the caller's clock.
                claims = jwt.decode(
                    token,
                    key,
                    algorithms=[ALGORITHM],
                    options={"verify_exp": False, "verify_nbf": False, "verify_iat": False},
                )
                break
            except jwt.InvalidSignatureError:
                continue
            except jwt.PyJWTError as e:
                raise InvalidToken(f"not a valid token: {e}") from None
        if claims is None:
            raise InvalidToken("the signature does not verify with the relay's token key")
        return _claims(claims, now)


def _number(claims: dict[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidToken(f"claim {name!r} is not a number")
    return float(value)


def _claims(claims: dict[str, Any], now: float) -> Claims:
    subject = claims.get("sub")
    try:
        _check_subject(subject)  # type: ignore[arg-type]
    except ValueError as e:
        raise InvalidToken(f"claim 'sub': {e}") from None
    expires = _number(claims, "exp")
    if expires is not None and now >= expires:
        raise InvalidToken(f"expired {now - expires:.0f} s ago")
    not_before = _number(claims, "nbf")
    if not_before is not None and now < not_before - LEEWAY:
        raise InvalidToken(f"not valid for another {not_before - now:.0f} s")
    names = claims.get("names", [])
    if not isinstance(names, list):
        raise InvalidToken("claim 'names' is not a list")
    try:
        globs = _check_globs(names)
    except ValueError as e:
        raise InvalidToken(f"claim 'names': {e}") from None
    max_tunnels = claims.get("max_tunnels")
    if max_tunnels is not None and (
        isinstance(max_tunnels, bool) or not isinstance(max_tunnels, int) or max_tunnels < 1
    ):
        raise InvalidToken("claim 'max_tunnels' is not a positive integer")
    token_id = claims.get("jti", "")
    if not isinstance(token_id, str) or len(token_id) > 128:
        raise InvalidToken("claim 'jti' is not a string of at most 128 characters")
    return Claims(str(subject), token_id, globs, expires, max_tunnels)
