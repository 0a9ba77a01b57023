"""
What both daemons (``twistd tunnelrelay``, ``twistd tunnelagent``) share beyond their own
options: ``--log-format json``, and an exit status other than 0 when they stop on an error.

``--log-format json`` writes one JSON object per line where twistd would write text (stdout
with ``-n``, else ``--logfile``): Twisted's own ``eventAsJSON`` form (so
``twisted.logger.eventsFromJSONLogFile`` reads it back) with, for people and log shippers,
``time`` (ISO 8601, UTC), ``level``, ``namespace`` and ``text`` (the formatted message), and
the event's own fields: ``event_type``, ``tunnel_id``, ``client``, ``url``, ... where the
agent logs them.

twistd takes its log observer from its own ``--logger`` option, read after the plugin's
options are parsed; a daemon's ``postOptions`` calls `apply_log_format`, which sets it.
"""

from __future__ import annotations

import atexit
import os
import sys
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import ILogObserver, formatEvent, jsonFileLogObserver
from twisted.python import usage
from twisted.python.logfile import LogFile
from zope.interface import provider

__all__ = ["LOG_FORMAT_OPTION", "apply_log_format", "exit_status", "json_observer"]

#: The ``optParameters`` row of ``--log-format``.
LOG_FORMAT_OPTION = [
    "log-format",
    None,
    "text",
    "text, or json: one JSON object per line with event_type, tunnel_id and client fields.",
]

#: Where twistd would log: (``--logfile``, ``--nodaemon``), set by `apply_log_format`.
_target: tuple[str | None, bool] = (None, True)


def apply_log_format(options: usage.Options) -> None:
    """
    Check `options`' ``log-format``; for ``json``, make twistd (the parent options, if
    there are any) log through `json_observer`.

    @raise usage.UsageError: an unknown format, or ``--logger`` given as well.
    """
    global _target
    value = options["log-format"]
    if value not in ("text", "json"):
        raise usage.UsageError(f"--log-format {value!r}: give text or json")
    parent = getattr(options, "parent", None)
    if value == "text" or parent is None:
        return
    if parent.get("logger"):
        raise usage.UsageError("--log-format json and twistd's --logger: give one of them")
    _target = (parent.get("logfile"), bool(parent.get("nodaemon")))
    parent["logger"] = f"{__name__}.json_observer"


def _output() -> IO[str]:
    logfile, nodaemon = _target
    if logfile == "-" or (nodaemon and not logfile):
        return sys.stdout
    log: IO[str] = LogFile.fromFullPath(logfile or "twistd.log")
    return log


def json_observer(out: IO[str] | None = None) -> ILogObserver:
    """
    An observer writing each event as one line of JSON to `out` (default: where twistd
    would log).
    """
    inner = jsonFileLogObserver(out if out is not None else _output(), recordSeparator="")

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        level = event.get("log_level")
        extra = {
            "time": datetime.fromtimestamp(event.get("log_time", 0), UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": getattr(level, "name", None),
            "namespace": event.get("log_namespace"),
            "text": formatEvent(event),
        }
        inner({**event, **extra})

    return observe  # type: ignore[no-any-return]


def exit_status(code: int) -> None:
    """
    Leave the process with status `code` once twistd has finished (its pidfile removed, its
    log closed): twistd itself always exits 0, and systemd's ``Restart=on-failure`` and
    scripts must see a failure as one.
    """

    def leave() -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)

    atexit.register(leave)
