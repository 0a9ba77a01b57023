"""
What the ``tunnel`` command says on stderr while it runs: the agent's events, concisely
(``nothing is listening on 127.0.0.1:22``, ``link to relay lost; reconnecting``,
``reconnected to the relay: tunnels back``, the relay going away, a refused token), more with
``-v`` (each connection, each retry), none with ``-q`` (stdout has the URLs either way).
"""

from __future__ import annotations

import signal
import sys
import time
from typing import IO

from tunnel.agent._events import Event

__all__ = ["QUIET", "VERBOSE", "Console", "default_sigint"]

QUIET, NORMAL, VERBOSE = -1, 0, 1

#: Events the command shows in its own words (the URL lines on stdout).
_OWN = {"tunnel_ready", "tunnel_closed"}


class Console:
    """
    Prints the agent's events for a person at a terminal.

    @param verbosity: `QUIET`, 0 or `VERBOSE`.
    """

    def __init__(self, verbosity: int = NORMAL, out: IO[str] | None = None) -> None:
        self.verbosity = verbosity
        self.out = out

    def wants(self, event: Event) -> bool:
        if self.verbosity <= QUIET:
            return False
        if event.kind in _OWN and event.level == "info":
            return False
        return not event.detail or self.verbosity >= VERBOSE

    def event(self, event: Event) -> None:
        """
        Print `event` if it is worth it at this verbosity.
        """
        if self.wants(event):
            self.say(event.text, event.level)

    def say(self, text: str, level: str = "info") -> None:
        """
        Print one line (unless quiet), with the time.
        """
        if self.verbosity <= QUIET:
            return
        prefix = {"warn": "", "error": "error: "}.get(level, "")
        out = self.out or sys.stderr
        print(f"{time.strftime('%H:%M:%S')}  {prefix}{text}", file=out, flush=True)


def default_sigint() -> None:
    """
    Make SIGINT interrupt, even when it was inherited as ignored (a command started in the
    background by a script): the reactor installs its own handler only over the default.
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def inspector_line(url: str) -> str:
    return f"inspector   {url}"
