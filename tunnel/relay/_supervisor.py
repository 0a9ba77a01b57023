"""
The supervisor of a relay run as several workers (``twistd tunnelrelay --workers N``).

It holds no tunnel and accepts no public connection. It starts N worker processes (the same
``twistd tunnelrelay`` command line, each told its place by `tunnel.relay._worker.WORKER_ENV`
and given its own admin socket), watches them (a worker that exits is started again after a
back-off, counted), forwards SIGHUP to every worker, and on stop (SIGTERM) tells every worker
to drain and waits for all of them, at most the drain grace and `STOP_MARGIN` seconds more,
before it kills what is left.

It is also the directory (`tunnel.relay._directory.Directory`): each worker reports what it
grants and holds over its own control socket (`<state-dir>/workers/<i>/control.sock`, in
the format of `tunnel.relay._workermsg`), and the supervisor tells every worker who holds
what. A worker that sends a malformed message is logged and restarted; the supervisor goes
on.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application import service
from twisted.internet import defer, error
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.logger import Logger, LogLevel, eventFromJSON, globalLogPublisher
from twisted.python.failure import Failure

from tunnel.relay._directory import Directory, Outgoing
from tunnel.relay._worker import WORKER_ENV, admin_path, control_path, worker_dir
from tunnel.relay._workermsg import MessageDecoder, MessageError, encode

__all__ = ["BACKOFF_MAX", "STOP_MARGIN", "Supervisor", "worker_argv"]

_log = Logger()

#: Seconds at most between a worker's exit and its restart (the back-off doubles from
#: half a second with each exit less than a minute after the previous start).
BACKOFF_MAX = 30.0
#: Seconds past the drain grace the supervisor waits for its workers to exit.
STOP_MARGIN = 10.0

_TWISTD = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"

#: Options of the supervisor's command line that the workers do not get as they are.
_NOT_FOR_WORKERS = ("--workers", "--admin", "--log-format")

#: Octets of one line of a worker's output; a longer one is cut there.
MAX_LOG_LINE = 65536

#: What `tunnel._daemon.json_observer` adds to each event (the supervisor's own observer
#: computes them again).
_JSON_EXTRAS = ("time", "level", "namespace", "text")


def worker_argv(args: Sequence[str], admin: str) -> list[str]:
    """
    The ``tunnelrelay`` arguments of a worker: the supervisor's `args` without
    ``--workers``, ``--admin`` and ``--log-format`` (either spelling, ``--opt VALUE`` or
    ``--opt=VALUE``), with ``--admin`` `admin` instead, and JSON logs (which the supervisor
    reads and logs as its own, with the worker's index).
    """
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg in _NOT_FOR_WORKERS:
            skip = True
            continue
        if arg.startswith(tuple(f"{name}=" for name in _NOT_FOR_WORKERS)):
            continue
        out.append(arg)
    return [*out, "--admin", admin, "--log-format", "json"]


def worker_event(line: bytes, index: int) -> dict[str, Any]:
    """
    The log event of one line of worker `index`'s output (its JSON log), marked with the
    worker; a line that is not an event becomes one that carries it as text.
    """
    text = line.decode("utf-8", "replace")
    try:
        event = eventFromJSON(text)
        if not isinstance(event, dict) or not isinstance(event.get("log_format"), str):
            raise ValueError("not an event")
    except (ValueError, TypeError, AttributeError):
        return {
            "log_format": "worker {worker}: {line}",
            "log_level": LogLevel.info,
            "log_namespace": "tunnel.relay.worker",
            "log_time": time.time(),
            "worker": index,
            "line": text.rstrip(),
        }
    for name in _JSON_EXTRAS:
        event.pop(name, None)
    event["log_format"] = "worker {worker}: " + event["log_format"]
    event["worker"] = index
    flattened = event.get("log_flattened")
    if isinstance(flattened, dict):
        # A flattened event is formatted from these (`twisted.logger.formatEvent`).
        flattened["worker!:"] = flattened["worker!s:"] = str(index)
    return event


class _WorkerProcess(ProcessProtocol):
    """A worker's process: its exit, and its output re-logged line by line."""

    def __init__(self, supervisor: Supervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self._partial = {1: b"", 2: b""}

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        buffered = self._partial.get(childFD, b"") + data
        *lines, rest = buffered.split(b"\n")
        if len(rest) > MAX_LOG_LINE:
            lines.append(rest[:MAX_LOG_LINE])
            rest = b""
        self._partial[childFD] = rest
        for line in lines:
            if line.strip():
                globalLogPublisher(worker_event(line, self.index))

    def processEnded(self, reason: Failure) -> None:
        self.supervisor._ended(self.index, reason)


class _ControlConnection(Protocol):
    """The supervisor's end of one worker's control socket."""

    def __init__(self, supervisor: Supervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.decoder = MessageDecoder()

    def connectionMade(self) -> None:
        self.supervisor._connected(self.index, self)

    def dataReceived(self, data: bytes) -> None:
        try:
            messages = self.decoder.feed(data)
            for message in messages:
                self.supervisor._message(self.index, message)
        except (MessageError, ValueError, KeyError) as e:
            self.supervisor._broken(self.index, str(e))

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.supervisor._disconnected(self.index, self)


class _ControlFactory(Factory):
    noisy = False

    def __init__(self, supervisor: Supervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index

    def buildProtocol(self, addr: Any) -> _ControlConnection:
        return _ControlConnection(self.supervisor, self.index)


class _Slot:
    """One worker: its process, its control connection, its state and restarts."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: Any = None
        self.control: _ControlConnection | None = None
        self.state = "starting"
        self.restarts = 0
        self.started_at = 0.0
        self.backoff = 0.5
        self.restart_call: Any = None
        self.port: Any = None


class Supervisor(service.Service):
    """
    Starts, watches and drains `count` workers running ``tunnelrelay`` with `args` (the
    supervisor's own, see `worker_argv`), and keeps the directory among them.
    """

    def __init__(
        self,
        reactor: Any,
        count: int,
        args: Sequence[str],
        state_dir: str,
        drain_grace: float,
        admin: str | None = None,
        admin_site: Callable[..., Any] | None = None,
        signals: bool = True,
    ) -> None:
        self.reactor = reactor
        self.count = count
        self.args = list(args)
        self.state_dir = state_dir
        self.drain_grace = drain_grace
        self.admin = admin
        self.admin_site = admin_site
        #: Installs the SIGHUP handler (False: inside another program, such as a test).
        self.signals = signals
        self.directory = Directory(count)
        self.slots = [_Slot(i) for i in range(count)]
        self.stopping = False
        self._stopped: defer.Deferred[None] | None = None
        self._admin_port: Any = None
        #: Malformed messages from workers, since start.
        self.malformed = 0

    # -- the workers as the admin endpoint sees them ----------------------------------------

    def workers(self) -> list[dict[str, Any]]:
        """One entry per worker: index, pid, admin socket, state, restarts."""
        return [
            {
                "index": slot.index,
                "pid": slot.process.pid if slot.process is not None else None,
                "admin": admin_path(self.state_dir, slot.index),
                "state": slot.state,
                "restarts": slot.restarts,
            }
            for slot in self.slots
        ]

    # -- starting ------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        for slot in self.slots:
            directory = worker_dir(self.state_dir, slot.index)
            os.makedirs(directory, mode=0o700, exist_ok=True)
            path = control_path(self.state_dir, slot.index)
            if os.path.exists(path):
                os.unlink(path)
            factory = _ControlFactory(self, slot.index)
            slot.port = self.reactor.listenUNIX(path, factory, mode=0o600)
            self._spawn(slot)
        if self.signals:
            signal.signal(
                signal.SIGHUP, lambda signum, frame: self.reactor.callFromThread(self._forward_hup)
            )
        if self.admin and self.admin_site is not None:

            def listening(port: Any) -> None:
                self._admin_port = port
                address = port.getHost()
                _log.info(
                    "admin of {n} workers on http://{host}:{port}/metrics",
                    n=self.count,
                    host=getattr(address, "host", address),
                    port=getattr(address, "port", ""),
                )

            serverFromString(self.reactor, self.admin).listen(
                self.admin_site(self.reactor, self.workers)
            ).addCallbacks(listening, lambda f: _log.failure("cannot listen for admin", f))
        _log.info("supervising {n} workers (pid {pid})", n=self.count, pid=os.getpid())

    def _spawn(self, slot: _Slot) -> None:
        slot.restart_call = None
        admin = admin_path(self.state_dir, slot.index)
        if os.path.exists(admin):
            os.unlink(admin)
        argv = [
            sys.executable,
            "-u",
            "-c",
            _TWISTD,
            "-n",
            "--pidfile",
            "",
            "--logfile",
            "-",
            "tunnelrelay",
            *worker_argv(self.args, f"unix:{admin}"),
        ]
        env = {**os.environ, WORKER_ENV: f"{slot.index}/{self.count}"}
        slot.state = "starting" if slot.restarts == 0 else "restarting"
        slot.started_at = self.reactor.seconds()
        slot.process = self.reactor.spawnProcess(
            _WorkerProcess(self, slot.index),
            sys.executable,
            argv,
            env=env,
            childFDs={0: "w", 1: "r", 2: "r"},
        )
        _log.info("worker {i} started (pid {pid})", i=slot.index, pid=slot.process.pid)

    # -- control connections -------------------------------------------------------------------

    def _connected(self, index: int, control: _ControlConnection) -> None:
        slot = self.slots[index]
        if slot.control is not None and slot.control.transport is not None:
            # A second connection for one worker: not ours to keep.
            control.transport.loseConnection()  # type: ignore[union-attr]
            return
        slot.control = control
        if not self.stopping:
            slot.state = "running"
        self._send(self.directory.snapshot(index))

    def _disconnected(self, index: int, control: _ControlConnection) -> None:
        slot = self.slots[index]
        if slot.control is control:
            slot.control = None

    def _message(self, index: int, message: dict[str, Any]) -> None:
        self._send(
            self.directory.handle(index, message, lambda w: self.slots[w].control is not None)
        )

    def _send(self, out: list[Outgoing]) -> None:
        for index, message in out:
            control = self.slots[index].control
            if control is not None and control.transport is not None:
                control.transport.write(encode(message))

    def _broken(self, index: int, why: str) -> None:
        self.malformed += 1
        _log.error("worker {i} sent a malformed message ({why}): restarting it", i=index, why=why)
        slot = self.slots[index]
        if slot.control is not None and slot.control.transport is not None:
            slot.control.transport.abortConnection()  # type: ignore[attr-defined]
        self._signal(slot, "KILL")

    # -- exits, restarts, signals ------------------------------------------------------------

    def _signal(self, slot: _Slot, name: str) -> None:
        if slot.process is None:
            return
        try:
            slot.process.signalProcess(name)
        except (error.ProcessExitedAlready, OSError):
            pass

    def _ended(self, index: int, reason: Failure) -> None:
        slot = self.slots[index]
        slot.process = None
        if slot.control is not None and slot.control.transport is not None:
            slot.control.transport.abortConnection()  # type: ignore[attr-defined]
        slot.control = None
        self._send(self.directory.worker_gone(index))
        if self.stopping:
            slot.state = "exited"
            if all(s.process is None for s in self.slots) and self._stopped is not None:
                done, self._stopped = self._stopped, None
                done.callback(None)
            return
        now = self.reactor.seconds()
        if now - slot.started_at >= 60:
            slot.backoff = 0.5
        delay = slot.backoff
        slot.backoff = min(slot.backoff * 2, BACKOFF_MAX)
        slot.restarts += 1
        slot.state = "restarting"
        _log.warn(
            "worker {i} exited ({why}): starting it again in {delay:g}s (restart {n})",
            i=index,
            why=reason.getErrorMessage(),
            delay=delay,
            n=slot.restarts,
        )
        slot.restart_call = self.reactor.callLater(delay, self._spawn, slot)

    def _forward_hup(self) -> None:
        _log.info("SIGHUP: telling {n} workers to reload", n=self.count)
        for slot in self.slots:
            self._signal(slot, "HUP")

    # -- stopping ------------------------------------------------------------------------------

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        self.stopping = True
        if self._admin_port is not None:
            self._admin_port.stopListening()
            self._admin_port = None
        for slot in self.slots:
            if slot.restart_call is not None and slot.restart_call.active():
                slot.restart_call.cancel()
            slot.restart_call = None
            if slot.process is not None:
                slot.state = "draining"
                self._signal(slot, "TERM")
            else:
                slot.state = "exited"
        done: defer.Deferred[None] = defer.Deferred()
        if all(s.process is None for s in self.slots):
            done.callback(None)
        else:
            self._stopped = done
            _log.info(
                "draining {n} workers, at most {t:g}s",
                n=sum(1 for s in self.slots if s.process is not None),
                t=self.drain_grace + STOP_MARGIN,
            )
            killer = self.reactor.callLater(self.drain_grace + STOP_MARGIN, self._kill_all)
            done.addBoth(lambda r: (killer.cancel() if killer.active() else None, r)[1])

        def close_sockets(result: Any) -> Any:
            for slot in self.slots:
                if slot.port is not None:
                    slot.port.stopListening()
                    slot.port = None
            return result

        return done.addBoth(close_sockets)

    def _kill_all(self) -> None:
        for slot in self.slots:
            if slot.process is not None:
                _log.warn("worker {i} did not drain in time: killing it", i=slot.index)
                self._signal(slot, "KILL")
