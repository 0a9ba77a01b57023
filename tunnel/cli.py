"""
The ``tunnel`` command: forward local ports from a terminal, like ``ngrok http 8000``.

    tunnel 8000                    # https://<id>.<domain> -> 127.0.0.1:8000
    tunnel 8000 22:tcp             # and a raw TCP port for 22
    tunnel web=8000                # https://web.<domain>: a kept name (the token allows it)
    tunnel --relay relay.example.com:443 --token T 8000
    tunnel token keygen DIR / tunnel token issue --key K --subject S   # signed tokens

Prints one line per tunnel and runs until interrupted. The relay, token and CA come from the
options or from ``TUNNEL_RELAY``, ``TUNNEL_TOKEN`` and ``TUNNEL_CA``. Exit status: 0 after an
interrupt, 2 for bad arguments, 1 when a tunnel cannot be had (relay down, token refused).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunnel",
        description="Give local ports public URLs through a Tunnels relay.",
        epilog="FORWARD is [NAME=]PORT or [NAME=]HOST:PORT (NAME: a kept name, "
        "https://NAME.<domain>, if the token allows it), with :tcp for a raw TCP port as "
        "well, or :h2 when the local server speaks HTTP/2 in the clear, and :proxy1 or :proxy2 "
        "to send it a PROXY protocol header with the client's address (e.g. 22:tcp:proxy2, "
        "web=8000:h2). See also: tunnel token --help.",
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
    from tunnel.agent.settings import add_flags

    add_flags(
        lambda option: parser.add_argument(
            f"--{option.flag}",
            dest=option.name,
            action="append",
            default=[],
            metavar=option.metavar,
            help=option.doc,
        )
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run the command; returns the exit status.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["token"]:
        from tunnel import _token_cli

        return _token_cli.main(argv[1:])
    from tunnel.agent import settings
    from tunnel.wire.options import OPTIONS

    parser = _parser()
    args = parser.parse_args(argv)
    try:
        specs = [settings.parse_forward(f) for f in args.forwards]
        flags = {option.name: getattr(args, option.name) for option in OPTIONS if option.flag}
        specs = settings.with_flags(specs, settings.flag_values(flags))
    except ValueError as e:
        parser.error(str(e))
    relay = settings.from_environment("relay", args.relay)
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
                agent = client.agent_for(reactor, relay, args.token, args.ca, args.proxy)
                t = await agent.forward(spec)
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
