"""
``tunnel run``: open tunnels, run a command that serves them, and end with it.

    tunnel run 8888 22:tcp -- jupyter lab --port 8888
    tunnel run --json 8000 -- python -m http.server 8000

The tunnels are opened first (a port the command has not opened yet simply waits for it: a
public client meanwhile gets a clean close), then the command starts with
``TUNNEL_URL_<PORT>`` (and, for a raw TCP tunnel, ``TUNNEL_TCP_<PORT>`` = ``host:port``) in
its environment. One line per tunnel goes to stdout before the command starts (one JSON
object per line with ``--json``). SIGINT, SIGTERM and SIGHUP are passed on to the command;
when it exits, the tunnels are closed and ``tunnel run`` exits with its status (128+N when a
signal N ended it), as a shell would. Before the command starts: 2 for bad arguments, 1 when
a tunnel cannot be had, 127 when the command is not found, 126 when it cannot be run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from tunnel._tunnel import Tunnel
from tunnel.agent.settings import ForwardSpec

__all__ = [
    "child_environment",
    "environment_names",
    "exit_status",
    "find_executable",
    "main",
    "split_command",
    "tunnel_line",
    "tunnel_record",
]

#: The signals passed on to the command.
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
#: Exit statuses of the shell's convention.
NOT_FOUND = 127
NOT_EXECUTABLE = 126
USAGE = "tunnel run [options] FORWARD... -- CMD [ARGS...]"


def environment_names(port: int) -> tuple[str, str]:
    """
    The variables that give the command a tunnel of local `port`: its URL, its raw TCP
    ``host:port``.
    """
    return f"TUNNEL_URL_{port}", f"TUNNEL_TCP_{port}"


def child_environment(
    tunnels: Mapping[int, Tunnel], base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """
    The command's environment: `base` (default: ours) with ``TUNNEL_URL_<PORT>`` for each
    tunnel and ``TUNNEL_TCP_<PORT>`` for each raw TCP one.
    """
    env = dict(os.environ if base is None else base)
    for port, t in tunnels.items():
        url_name, tcp_name = environment_names(port)
        env[url_name] = t.url
        if t.unencrypted_port is not None:
            env[tcp_name] = f"{t.unencrypted_host}:{t.unencrypted_port}"
    return env


def tunnel_record(spec: ForwardSpec, t: Tunnel) -> dict[str, Any]:
    """
    A tunnel as one ``--json`` line says it.
    """
    url_name, tcp_name = environment_names(spec.port)
    tcp = list(t.tcp_socket) if t.unencrypted_port is not None else None
    env = {url_name: t.url}
    if tcp is not None:
        env[tcp_name] = f"{tcp[0]}:{tcp[1]}"
    return {
        "port": spec.port,
        "target": spec.target,
        "url": t.url,
        "tls_socket": list(t.tls_socket),
        "tcp_socket": tcp,
        "env": env,
    }


def tunnel_line(spec: ForwardSpec, t: Tunnel) -> str:
    """
    A tunnel as one line says it, as the ``tunnel`` command does.
    """
    line = f"{t.url} -> {spec.target}"
    if t.unencrypted_port is not None:
        line += f"   tcp://{t.unencrypted_host}:{t.unencrypted_port}"
    return line


def exit_status(code: int | None, signum: int | None) -> int:
    """
    A shell's status for a child that exited with `code` or was ended by signal `signum`.
    """
    if signum is not None:
        return 128 + signum
    return code if code is not None else 1


def split_command(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """
    ``tunnel run``'s arguments before the first ``--``, and the command after it.

    @raise ValueError: no ``--``, or nothing after it.
    """
    if "--" not in argv:
        raise ValueError("give the command after --, as in: " + USAGE)
    at = list(argv).index("--")
    command = list(argv[at + 1 :])
    if not command:
        raise ValueError("no command after --")
    return list(argv[:at]), command


def find_executable(name: str, env: Mapping[str, str]) -> tuple[str | None, int]:
    """
    The path that runs `name` (looked up in the command's ``PATH`` unless it has a
    ``/``), or None and the status to exit with (127 not found, 126 not executable).
    """
    if "/" in name:
        if not os.path.exists(name):
            return None, NOT_FOUND
        return (name, 0) if os.access(name, os.X_OK) else (None, NOT_EXECUTABLE)
    found = shutil.which(name, path=env.get("PATH", os.defpath))
    return (found, 0) if found is not None else (None, NOT_FOUND)


def _terminal_interrupted_us_both() -> bool:
    """
    Whether a SIGINT probably came from our terminal's Ctrl-C, which the kernel sends to the
    whole foreground process group (the command included): true when we are that group.
    """
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:
        return False
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(fd)


class _Run:
    """
    One ``tunnel run``: the tunnels, then the command, then the exit status.
    """

    def __init__(
        self,
        reactor: Any,
        specs: list[ForwardSpec],
        executable: str,
        command: list[str],
        connection: Mapping[str, str | None],
        as_json: bool,
    ) -> None:
        self.reactor = reactor
        self.specs = specs
        self.executable = executable
        self.command = command
        self.connection = connection
        self.as_json = as_json
        #: The exit status, once known.
        self.status = 0
        #: The command's process transport, once started.
        self.child: Any = None
        self.ended = False

    def start(self) -> None:
        from tunnel import client

        # After the reactor's own handlers (installed before callWhenRunning calls): a signal
        # is the command's, not a reason to stop the reactor under it.
        for signum in FORWARDED:
            signal.signal(signum, self._signal_handler)
        try:
            d = client.forward_many(self.reactor, self.specs, **self.connection)  # type: ignore[arg-type]
        except ValueError as e:
            self._fail(1, str(e))
            return
        d.addCallbacks(self._opened, self._not_opened)

    def _signal_handler(self, signum: int, frame: Any) -> None:
        # In a signal handler: only hand it to the reactor.
        self.reactor.callFromThread(self._signalled, signum)

    def _signalled(self, signum: int) -> None:
        if self.ended:
            return
        if self.child is None:
            # The command has not started: stop opening tunnels, exit as killed by it.
            self._end(128 + signum)
            return
        if signum == signal.SIGINT and _terminal_interrupted_us_both():
            return  # the command had it from the terminal already
        try:
            self.child.signalProcess(signum)
        except ProcessExitedAlready:
            pass  # processEnded follows

    def _opened(self, tunnels: dict[int, Tunnel]) -> None:
        if self.ended:
            return
        for spec in self.specs:
            t = tunnels[spec.port]
            line = json.dumps(tunnel_record(spec, t)) if self.as_json else tunnel_line(spec, t)
            print(line, flush=True)
        try:
            self.child = self.reactor.spawnProcess(
                _Child(self),
                self.executable,
                self.command,
                env=child_environment(tunnels),
                childFDs={0: 0, 1: 1, 2: 2},
            )
        except OSError as e:
            self._fail(NOT_EXECUTABLE, f"{self.command[0]}: {e.strerror or e}")

    def _not_opened(self, failure: Failure) -> None:
        if not self.ended:
            self._fail(1, str(failure.value))

    def child_ended(self, code: int | None, signum: int | None) -> None:
        self.child = None
        self._end(exit_status(code, signum))

    def _fail(self, status: int, message: str) -> None:
        print(f"tunnel run: {message}", file=sys.stderr, flush=True)
        self._end(status)

    def _end(self, status: int) -> None:
        if self.ended:
            return
        self.ended = True
        self.status = status
        # The shutdown trigger closes the tunnels (telling the relay) before the reactor stops.
        self.reactor.stop()


class _Child(ProcessProtocol):
    """
    The command's process: its stdio is ours, so only its end matters here.
    """

    def __init__(self, run: _Run) -> None:
        self.run = run

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        self.run.child_ended(getattr(value, "exitCode", None), getattr(value, "signal", None))


def main(argv: Sequence[str]) -> int:
    """
    Run ``tunnel run`` with `argv` (the arguments after ``run``); returns the exit status.
    """
    from tunnel.agent import settings
    from tunnel.cli import _parser
    from tunnel.wire.options import OPTIONS

    parser = _parser()
    parser.prog = "tunnel run"
    parser.usage = USAGE
    parser.description = (
        "Open tunnels, then run CMD with TUNNEL_URL_<PORT> (and TUNNEL_TCP_<PORT> = host:port "
        "for a raw TCP tunnel) in its environment; pass SIGINT, SIGTERM and SIGHUP on to it; "
        "when it exits, close the tunnels and exit with its status (128+N for signal N)."
    )
    parser.add_argument(
        "--json", action="store_true", help="print each tunnel as one JSON object per line"
    )
    try:
        before, command = split_command(argv)
    except ValueError as e:
        if "-h" in argv or "--help" in argv:
            parser.print_help()
            return 0
        parser.error(str(e))
    args = parser.parse_args(before)
    try:
        specs = [settings.parse_forward(f, label=repr(f)) for f in args.forwards]
        flags = {option.name: getattr(args, option.name) for option in OPTIONS if option.flag}
        specs = settings.with_flags(specs, settings.flag_values(flags))
        settings.forward_specs(specs, {})  # one tunnel per port: TUNNEL_URL_<PORT> is one name
    except ValueError as e:
        parser.error(str(e))
    if not settings.from_environment("relay", args.relay):
        parser.error("give --relay HOST:PORT or set TUNNEL_RELAY")
    # Before any tunnel is opened: the command's environment differs from ours only in
    # TUNNEL_* variables, so its PATH is ours.
    executable, status = find_executable(command[0], os.environ)
    if executable is None:
        why = "command not found" if status == NOT_FOUND else "permission denied"
        print(f"tunnel run: {command[0]}: {why}", file=sys.stderr, flush=True)
        return status

    from twisted.internet import reactor

    from tunnel import client

    connection = {"relay": args.relay, "token": args.token, "ca": args.ca, "proxy": args.proxy}
    run = _Run(reactor, specs, executable, command, connection, args.json)
    reactor.addSystemEventTrigger("before", "shutdown", client.shutdown, reactor)
    reactor.callWhenRunning(run.start)
    reactor.run()
    return run.status
