"""
``tunnel token``: make the key pair of signed agent tokens, and issue tokens with it.

    tunnel token keygen DIR
    tunnel token issue --key DIR/token-key.pem --subject alice [--names 'web,alice-*']
                       [--expires 30d] [--not-before 1h] [--max-tunnels N] [--id ID]

Relays verify them with ``twistd tunnelrelay --token-key DIR/token-key.pub.pem``. Exit status:
0, or 2 for bad arguments (a key that cannot be read included).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from tunnel import _signedtokens as signed

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunnel token",
        description="Signed agent tokens (JWT, Ed25519) that relays verify with a public key.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    keygen = sub.add_parser(
        "keygen",
        help="write a new key pair into DIR",
        description=f"Write {signed.PRIVATE_KEY_FILE} (private, mode 0600: keep it with the "
        f"issuer) and {signed.PUBLIC_KEY_FILE} (for the relays' --token-key) into DIR.",
    )
    keygen.add_argument("dir", metavar="DIR")
    issue = sub.add_parser(
        "issue",
        help="print a token signed with a private key",
        description="Print a token for SUBJECT, signed with the private key.",
    )
    issue.add_argument("--key", required=True, help=f"the private key ({signed.PRIVATE_KEY_FILE})")
    issue.add_argument("--subject", required=True, help="who the token is for (e.g. alice)")
    issue.add_argument(
        "--names",
        default="",
        help="tunnel names it may hold, comma-separated shell-style globs ('web,alice-*'); "
        "default: random ids only",
    )
    issue.add_argument(
        "--expires", help="valid for this long (90s, 15m, 2h, 30d); default: until revoked"
    )
    issue.add_argument("--not-before", help="valid only from this long from now (90s, 2h)")
    issue.add_argument(
        "--max-tunnels", type=int, help="at most this many tunnels at once for its subject"
    )
    issue.add_argument("--id", help="its token id (jti), for --revoked; default: random")
    return parser


def main(argv: Sequence[str]) -> int:
    """
    Run ``tunnel token`` with `argv` (the arguments after ``token``); the exit status.
    """
    parser = _parser()
    args = parser.parse_args(list(argv))
    if args.command == "keygen":
        try:
            private, public = signed.generate_key_pair(args.dir)
        except (OSError, FileExistsError) as e:
            parser.error(str(e))
        print(f"private key: {private} (keep it secret; it issues tokens)")
        print(f"public key:  {public} (give it to relays: --token-key {public})")
        return 0
    now = time.time()
    try:
        key = signed.load_private_key(args.key)
        expires = signed.parse_duration(args.expires) if args.expires else None
        not_before = now + signed.parse_duration(args.not_before) if args.not_before else None
        names = [n.strip() for n in args.names.split(",") if n.strip()]
        token = signed.issue_token(
            key,
            args.subject,
            now=now,
            names=names,
            expires_in=expires,
            not_before=not_before,
            max_tunnels=args.max_tunnels,
            token_id=args.id,
        )
    except ValueError as e:
        parser.error(str(e))
    print(token)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
