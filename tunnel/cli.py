"""
The ``tunnel`` command: forward local ports from a terminal, like ``ngrok http 8000``.

    tunnel 8000                    # https://<id>.<domain> -> 127.0.0.1:8000
    tunnel 8000 22:tcp             # and a raw TCP port for 22
    tunnel web=8000                # https://web.<domain>: a kept name (the token allows it)
    tunnel --relay relay.example.com:443 --token T 8000
    tunnel run 8000 -- CMD ARGS    # CMD gets TUNNEL_URL_8000; see tunnel._run
    tunnel token keygen DIR / tunnel token issue --key K --subject S   # signed tokens

Prints one line per tunnel on stdout and runs until interrupted; what happens meanwhile (the
link lost and back, a target that refuses connections, ...) goes to stderr (``-q``: nothing,
``-v``: each connection too). ``--inspect`` serves the inspector page (its tunnels and a live
table of connections) on 127.0.0.1:4040 or the next free port. The relay, token and CA come
from the options or from ``TUNNEL_RELAY``, ``TUNNEL_TOKEN`` and ``TUNNEL_CA``. Exit status: 0
after an interrupt, 2 for bad arguments, 1 when a tunnel cannot be had (relay down, token
refused) or the relay refuses the token later.
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
        "well, :h2 when the local server speaks HTTP/2 in the clear, or :passthrough when it "
        "terminates TLS itself; :proxy1 or :proxy2 to send it a PROXY protocol header with "
        "the client's address; :rate=RATE for a rate limit (e.g. 22:tcp:proxy2, "
        "8000:rate=10MB, web=8000:h2). See also: tunnel token --help.",
    )
    from tunnel import __version__

    parser.add_argument("forwards", nargs="+", metavar="FORWARD")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    talk = parser.add_mutually_exclusive_group()
    talk.add_argument(
        "-q", "--quiet", action="store_true", help="print the URLs only (stderr: fatal errors)"
    )
    talk.add_argument(
        "-v", "--verbose", action="store_true", help="also print each connection and retry"
    )
    parser.add_argument(
        "--inspect",
        nargs="?",
        const="",
        metavar="ADDR",
        help="serve the inspector page (tunnels, live connections) on 127.0.0.1:4040, or the "
        "next free port; --inspect=[HOST:]PORT to choose",
    )
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
    if argv[:1] == ["run"]:
        from tunnel import _run

        return _run.main(argv[1:])
    if argv[:1] == ["token"]:
        from tunnel import _token_cli

        return _token_cli.main(argv[1:])
    from tunnel.agent import settings
    from tunnel.wire.options import OPTIONS

    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # `--inspect` alone never takes the next word (`tunnel --inspect 8000` forwards 8000);
    # an address is given as --inspect=ADDR.
    args = parser.parse_args(["--inspect=" if a == "--inspect" else a for a in argv])
    try:
        specs = [settings.parse_forward(f, label=repr(f)) for f in args.forwards]
        flags = {option.name: getattr(args, option.name) for option in OPTIONS if option.flag}
        specs = settings.with_flags(specs, settings.flag_values(flags))
    except ValueError as e:
        parser.error(str(e))
    seen: dict[tuple[str, int], str] = {}
    for text, spec in zip(args.forwards, specs, strict=True):
        first = seen.setdefault((spec.host, spec.port), text)
        if first is not text:
            parser.error(f"{first!r} and {text!r} both forward {spec.target}")
    relay = settings.from_environment("relay", args.relay)
    if not relay:
        parser.error("give --relay HOST:PORT or set TUNNEL_RELAY")

    from twisted.internet import defer, reactor

    from tunnel import _console, client
    from tunnel.errors import TunnelError

    status = 0
    console = _console.Console(
        _console.QUIET if args.quiet else _console.VERBOSE if args.verbose else _console.NORMAL
    )

    def fatal(message: str) -> None:
        nonlocal status
        print(f"tunnel: {message}", file=sys.stderr, flush=True)
        status = 1
        if reactor.running:
            reactor.stop()

    async def run() -> None:
        nonlocal status
        try:
            agent = client.agent_for(reactor, relay, args.token, args.ca, args.proxy)
        except ValueError as e:
            fatal(str(e))
            return
        agent.events.observers.append(console.event)
        # A token refused (or revoked) while running: retrying cannot help.
        agent.on_refused.append(lambda reason: fatal(f"{reason}; check --token / TUNNEL_TOKEN"))
        if args.inspect is not None:
            from tunnel.agent._inspect import inspect

            try:
                url = inspect(agent, args.inspect or True)
            except ValueError as e:
                fatal(str(e))
                return
            console.say(_console.inspector_line(url or ""))
        try:
            for spec in specs:
                t = await agent.forward(spec)
                line = f"{t.url} -> {spec.target}"
                if t.unencrypted_port is not None:
                    line += f"   tcp://{t.unencrypted_host}:{t.unencrypted_port}"
                print(line, flush=True)
        except (TunnelError, ValueError) as e:
            if status == 0:
                fatal(str(e))
            return
        console.say("Forwarding; press Ctrl-C to stop.")

    # Close the tunnels (and tell the relay) on the way out, Ctrl-C included.
    reactor.addSystemEventTrigger("before", "shutdown", client.shutdown, reactor)
    _console.default_sigint()
    reactor.callWhenRunning(lambda: defer.ensureDeferred(run()))
    reactor.run()
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
