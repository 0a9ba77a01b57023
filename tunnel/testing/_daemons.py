"""
The one launcher of relay and agent daemons as child processes (``twistd tunnelrelay``,
``twistd tunnelagent``), used by the end-to-end tests, the benchmarks and ``make demo``.

A daemon is started with an admin endpoint on a loopback port chosen here, and is *ready*
when that endpoint says so (``/ready``: the relay listens for public clients; the agent's
link is up and every tunnel granted); nothing is read from its log to decide it. The log (the
daemon's stdout and stderr) is kept in a file, for people and for tests that check what was
logged.

Every process is kept by PID and stopped with SIGTERM, then SIGKILL after a timeout. Ports
are picked free on 127.0.0.1 just before the start; if one is taken meanwhile the daemon
exits, and `RelayProcess.start` tries again on new ports.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "AgentProcess",
    "Daemon",
    "DaemonError",
    "RelayProcess",
    "TunnelInfo",
    "free_port",
    "twistd_command",
    "wait_for",
]

LOOPBACK = "127.0.0.1"
DOMAIN = "tunnel.localhost"
#: Default deadline of every wait, in seconds.
DEADLINE = 20.0

T = TypeVar("T")

#: ``twistd`` run by this interpreter: no dependence on a script directory or on PATH.
_TWISTD = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"


class DaemonError(AssertionError):
    """
    A daemon did not become ready, or exited: the message says which, with the end of its
    log. (An `AssertionError`, so that a test using the launcher fails rather than errors.)
    """


def twistd_command(plugin: str, *args: str) -> list[str]:
    """``twistd`` running `plugin` in the foreground, no pidfile, logging to stdout."""
    daemon = ["-n", "--pidfile", "", "--logfile", "-", plugin, *args]
    return [sys.executable, "-u", "-c", _TWISTD, *daemon]


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port free on `host` right now (the caller retries if it is taken meanwhile)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], T | None], what: str, timeout: float = DEADLINE) -> T:
    """
    Poll `check` until it returns something other than None or False, and return that.

    @raise DaemonError: `timeout` seconds passed first.
    """
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        value = check()
        if value is not None and value is not False:
            return value
        if time.monotonic() >= deadline:
            raise DaemonError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for daemons: no ``TUNNEL_*`` settings or HTTP proxies leaking in."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("TUNNEL_") and k.lower() not in ("http_proxy", "https_proxy")
    }
    env["NO_PROXY"] = "*"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def admin_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """``GET http://127.0.0.1:<port><path>``: (status, body); (0, b"") if nothing answers."""
    try:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{port}{path}", timeout=timeout) as r:
            return int(r.status), bytes(r.read())
    except urllib.error.HTTPError as e:
        return int(e.code), bytes(e.read())
    except OSError:
        return 0, b""


class Daemon:
    """
    A child process we started, its output in a file, and waits on it with deadlines.
    """

    name = "process"

    def __init__(
        self,
        args: Sequence[str],
        log: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        new_session: bool = False,
    ) -> None:
        self.args = list(args)
        self.log = Path(log)
        self._out = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            self.args,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            env=dict(env) if env is not None else child_env(),
            # Its own session: a terminal's Ctrl-C reaches only the launching program, which
            # then stops its children in order.
            start_new_session=new_session,
        )
        self.pid = self.popen.pid

    # -- the log ---------------------------------------------------------------------------------

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def size(self) -> int:
        try:
            return self.log.stat().st_size
        except FileNotFoundError:
            return 0

    def tail(self, chars: int = 3000) -> str:
        return self.text()[-chars:]

    def count(self, pattern: str) -> int:
        return len(re.findall(pattern, self.text()))

    def wait(self, check: Callable[[], T | None], what: str, timeout: float = DEADLINE) -> T:
        """`wait_for`, failing early if the process exits, with the end of its log."""

        def checked() -> T | None:
            value = check()
            if (value is None or value is False) and not self.alive():
                value = check()
                if value is None or value is False:
                    raise DaemonError(
                        f"the {self.name} exited ({self.popen.returncode}) before {what}:\n"
                        f"--- {self.log} ---\n{self.tail()}"
                    )
            return value

        try:
            return wait_for(checked, what, timeout)
        except DaemonError as e:
            if "exited" in str(e):
                raise
            raise DaemonError(f"{e}\n--- {self.log} ---\n{self.tail()}") from None

    def wait_log(self, pattern: str, timeout: float = DEADLINE, start: int = 0) -> re.Match[str]:
        """The first match of regex `pattern` in the log after character offset `start`."""
        regex = re.compile(pattern)
        return self.wait(
            lambda: regex.search(self.text(), start), f"{pattern!r} in {self.log.name}", timeout
        )

    # -- the process -----------------------------------------------------------------------------

    def alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def signal(self, signum: int) -> None:
        """Send `signum` to the process (by its PID), if it still runs."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def kill(self) -> None:
        """SIGKILL now, and reap."""
        self.signal(signal.SIGKILL)
        self.popen.wait(10)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout` seconds; reap; close the log."""
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._out.close()


class _Admin(Daemon):
    """A daemon with an admin endpoint on `admin_port`: ``/status`` JSON and ``/ready``."""

    admin_port = 0

    def status(self, timeout: float = 5.0) -> dict[str, Any]:
        """The admin ``/status`` document.

        @raise OSError: the endpoint does not answer.
        """
        code, body = admin_get(self.admin_port, "/status", timeout)
        if code != 200:
            raise ConnectionError(f"/status of the {self.name} answered {code or 'nothing'}")
        value: dict[str, Any] = json.loads(body)
        return value

    def ready(self) -> bool:
        """Whether ``/ready`` answers 200 now."""
        return admin_get(self.admin_port, "/ready", 2.0)[0] == 200

    def wait_ready(self, timeout: float = DEADLINE) -> None:
        self.wait(self.ready, f"the {self.name} to be ready (/ready)", timeout)

    def wait_status(
        self, pred: Callable[[dict[str, Any]], bool], what: str, timeout: float = DEADLINE
    ) -> dict[str, Any]:
        """Poll ``/status`` until `pred` holds of it; returns that document."""
        last: list[dict[str, Any]] = [{}]

        def check() -> dict[str, Any] | None:
            try:
                s = self.status()
            except (OSError, ValueError):
                return None
            last[0] = s
            return s if pred(s) else None

        try:
            return self.wait(check, what, timeout)
        except DaemonError as e:
            raise DaemonError(f"{e}\nlast /status: {last[0]}") from None


class RelayProcess(_Admin):
    """
    ``twistd tunnelrelay`` on 127.0.0.1, in development mode unless `extra` says otherwise.
    """

    name = "relay"

    def __init__(
        self,
        log: Path,
        *,
        state_dir: Path,
        port: int,
        admin_port: int,
        tcp_ports: tuple[int, int] | None = None,
        domain: str = DOMAIN,
        listen_options: str = "",
        workers: int | None = 1,
        extra: Sequence[str] = (),
        prefix: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        new_session: bool = False,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.port = port
        self.admin_port = admin_port
        self.domain = domain
        args = [
            *("--domain", domain),
            *("--listen", f"tcp:{port}:interface={LOOPBACK}{listen_options}"),
            *("--admin", f"tcp:{admin_port}:interface={LOOPBACK}"),
            *("--state-dir", str(state_dir)),
        ]
        if tcp_ports is not None:
            args += ["--tcp-ports", f"{tcp_ports[0]}-{tcp_ports[1]}", "--tcp-interface", LOOPBACK]
        #: Worker processes (``--workers``; 1: the relay is one process). Given unless None
        #: (the relay's default, one per core), so that a relay started here does not
        #: depend on the machine's cores unless asked to.
        self.workers = workers
        if workers is not None:
            args += ["--workers", str(workers)]
        #: What `restart` starts the same relay with again.
        self.launch: dict[str, Any] = dict(
            state_dir=state_dir,
            tcp_ports=tcp_ports,
            domain=domain,
            listen_options=listen_options,
            workers=workers,
            extra=list(extra),
            prefix=list(prefix),
            env=env,
            cwd=cwd,
            new_session=new_session,
        )
        super().__init__(
            [*prefix, *twistd_command("tunnelrelay", *args, *extra)],
            log,
            env=env,
            cwd=cwd,
            new_session=new_session,
        )

    @property
    def ca(self) -> Path:
        """The development CA (in the state directory) that clients and agents trust."""
        return self.state_dir / "ca.pem"

    def worker_status(self, index: int, timeout: float = 5.0) -> dict[str, Any]:
        """
        The ``/status`` document of worker `index` itself (with ``--workers``), from its
        admin socket in the state directory.

        @raise OSError: it does not answer.
        """
        path = self.state_dir / "workers" / str(index) / "admin.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(b"GET /status HTTP/1.0\r\nHost: worker\r\n\r\n")
            answer = bytearray()
            while chunk := s.recv(65536):
                answer += chunk
        head, _, body = bytes(answer).partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.") or head.split(b" ", 2)[1] != b"200":
            raise ConnectionError(f"/status of worker {index} answered {head[:40]!r}")
        value: dict[str, Any] = json.loads(body)
        return value

    def worker_pids(self) -> list[int | None]:
        """The PID of each worker (None while one is not running), from ``/status``."""
        return [w.get("pid") for w in self.status().get("workers", [])]

    @classmethod
    def start(
        cls,
        log: Path,
        *,
        state_dir: Path,
        port: int | None = None,
        admin_port: int | None = None,
        attempts: int = 5,
        timeout: float = DEADLINE,
        **options: Any,
    ) -> RelayProcess:
        """
        Start a relay and return it once it is ready. Without `port`/`admin_port`, free ones
        are picked, and picked again (up to `attempts` starts) if the relay could not listen
        on them. `options` are those of `RelayProcess`.

        @raise DaemonError: it did not become ready.
        """
        last = ""
        for _ in range(attempts if port is None or admin_port is None else 1):
            relay = cls(
                log,
                state_dir=state_dir,
                port=port or free_port(),
                admin_port=admin_port or free_port(),
                **options,
            )
            try:
                relay.wait_ready(timeout)
            except DaemonError as e:
                last = str(e)
                relay.stop()
                continue
            return relay
        raise DaemonError(f"the relay did not start:\n{last}")

    def restart(self, timeout: float = DEADLINE) -> RelayProcess:
        """The same relay (ports, state, options) started again, once this one has exited."""
        return RelayProcess.start(
            self.log,
            port=self.port,
            admin_port=self.admin_port,
            timeout=timeout,
            **self.launch,
        )


@dataclass(frozen=True)
class TunnelInfo:
    """A tunnel as the agent's ``/status`` reports it."""

    #: ``host:port`` of the local target.
    target: str
    #: ``https://<host>[:port]``.
    url: str
    #: ``host:port`` of the raw TCP port, for a raw TCP tunnel.
    tcp: str | None

    @property
    def host(self) -> str:
        return self.url.split("//", 1)[1].rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        rest = self.url.split("//", 1)[1]
        return int(rest.rsplit(":", 1)[1]) if ":" in rest else 443

    @property
    def tcp_port(self) -> int | None:
        return int(self.tcp.rsplit(":", 1)[1]) if self.tcp else None


class AgentProcess(_Admin):
    """
    ``twistd tunnelagent`` linking to `relay` (a ``--relay`` value), with an admin endpoint.
    """

    name = "agent"

    def __init__(
        self,
        log: Path,
        *,
        relay: str,
        ca: Path | None,
        forwards: Sequence[str],
        token: str | None = None,
        admin_port: int | None = None,
        extra: Sequence[str] = (),
        prefix: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        new_session: bool = False,
    ) -> None:
        self.admin_port = admin_port or free_port()
        args = ["--relay", relay, "--admin", f"tcp:{self.admin_port}:interface={LOOPBACK}"]
        if ca is not None:
            args += ["--ca", str(ca)]
        for f in forwards:
            args += ["--forward", f]
        if token is not None:
            args += ["--token", token]
        super().__init__(
            [*prefix, *twistd_command("tunnelagent", *args, *extra)],
            log,
            env=env,
            cwd=cwd,
            new_session=new_session,
        )

    def tunnels(self) -> list[TunnelInfo]:
        """The granted tunnels, from ``/status`` (empty while the endpoint does not answer)."""
        try:
            status = self.status()
        except (OSError, ValueError):
            return []
        return [
            TunnelInfo(t["target"], t["url"], t.get("tcp"))
            for t in status.get("tunnels", [])
            if t.get("url") and t.get("ready")
        ]

    def tunnel(self, target: str, timeout: float = DEADLINE) -> TunnelInfo:
        """The tunnel of `target` (``host:port``), once the agent reports it granted."""
        return self.wait(
            lambda: next((t for t in self.tunnels() if t.target == target), None),
            f"a tunnel for {target} (/status)",
            timeout,
        )
