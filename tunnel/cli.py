"""
The ``tunnel`` command: forward local ports from a terminal, like ``ngrok http 8000``.

    tunnel 8000                    # https://<id>.<domain> -> 127.0.0.1:8000
    tunnel 8000 22:tcp             # and a raw TCP port for 22
    tunnel --relay relay.example.com:443 --token T 8000

Prints one line per tunnel and runs until interrupted. The relay, token and CA come from the
options or from ``TUNNEL_RELAY``, ``TUNNEL_TOKEN`` and ``TUNNEL_CA``. Exit status: 0 after an
interrupt, 2 for bad arguments, 1 when a tunnel cannot be had (relay down, token refused).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import replace

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunnel",
        description="Give local ports public URLs through a Tunnels relay.",
        epilog="FORWARD is PORT or HOST:PORT, with :tcp for a raw TCP port as well, or :h2 "
        "when the local server speaks HTTP/2 in the clear, and :proxy1 or :proxy2 to send it "
        "a PROXY protocol header with the client's address (e.g. 22:tcp:proxy2).",
    )
    parser.add_argument("forwards", nargs="+", metavar="FORWARD")
    parser.add_argument("--relay", help="relay HOST:PORT, or a list (default $TUNNEL_RELAY)")
    parser.add_argument("--token", help="agent token (default $TUNNEL_TOKEN)")
    parser.add_argument("--ca", help="PEM CA bundle to trust (default $TUNNEL_CA)")
    parser.add_argument(
        "--proxy",
        help="HTTP proxy to reach the relay through, http://[user:pass@]host:port "
        "(default $TUNNEL_PROXY)",
    )
    parser.add_argument(
        "--client-ca",
        metavar="PEM",
        help="public TLS clients must show a certificate from one of these authorities",
    )
    parser.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="NETWORK",
        help="only clients from this network or address may connect (repeatable)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run the command; returns the exit status.
    """
    from tunnel.agent.session import ForwardSpec, parse_forward

    parser = _parser()
    args = parser.parse_args(argv)
    try:
        specs: list[ForwardSpec] = [parse_forward(f) for f in args.forwards]
        allow = [a.strip() for value in args.allow for a in value.split(",") if a.strip()]
        if allow:
            specs = [replace(spec, allow=tuple(allow)) for spec in specs]
    except ValueError as e:
        parser.error(str(e))
    relay = args.relay or os.environ.get("TUNNEL_RELAY")
    if not relay:
        parser.error("give --relay HOST:PORT or set TUNNEL_RELAY")

    from twisted.internet import defer, reactor

    from tunnel import client
    from tunnel.errors import TunnelError

    status = 0

    async def run() -> None:
        nonlocal status
        try:
            for spec in specs:
                t = await client.forward(
                    reactor,
                    spec.port,
                    host=spec.host,
                    unencrypted=spec.unencrypted,
                    h2=spec.h2,
                    proxy_protocol=spec.proxy_protocol,
                    allow=spec.allow,
                    client_ca=args.client_ca,
                    relay=relay,
                    token=args.token,
                    ca=args.ca,
                    proxy=args.proxy,
                )
                line = f"{t.url} -> {spec.target}"
                if t.unencrypted_port is not None:
                    line += f"   tcp://{t.unencrypted_host}:{t.unencrypted_port}"
                print(line, flush=True)
        except (TunnelError, ValueError) as e:
            print(f"tunnel: {e}", file=sys.stderr, flush=True)
            status = 1
            reactor.stop()
            return
        print("Forwarding; press Ctrl-C to stop.", file=sys.stderr, flush=True)

    # Close the tunnels (and tell the relay) on the way out, Ctrl-C included.
    reactor.addSystemEventTrigger("before", "shutdown", client.shutdown, reactor)
    reactor.callWhenRunning(lambda: defer.ensureDeferred(run()))
    reactor.run()
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
