"""
Helpers of the reliability tests: relay and agent processes that can be killed, restarted on
the same port and state directory, inspected through the admin ``/status`` JSON; small local
servers (threads of the test process: they are not what fails); raw clients. The basics
(processes, waits, the agent's ``tunnel ready`` lines, TLS clients) are those of ``harness``.

Everything is loopback only. Every wait polls with a deadline. Every process is kept by PID
and stopped with SIGTERM, then SIGKILL after a timeout.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import re
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tests.e2e.harness import (
    DEADLINE,
    ProcGroup,
    forward_target,
    run,
    tcp_port_range,
)

# The ``X as X`` names are re-exported: the reliability tests and bench/soak.py import them
# from here.
from tests.e2e.harness import LOOPBACK as LOOPBACK
from tests.e2e.harness import READY as READY
from tests.e2e.harness import Endpoint as Endpoint
from tests.e2e.harness import Proc as Proc
from tests.e2e.harness import clean_env as clean_env
from tests.e2e.harness import curl as harness_curl
from tests.e2e.harness import require_tool as require_tool
from tests.e2e.harness import tls_connect as tls_connect
from tests.e2e.harness import wait_for as wait_for
from tunnel.testing._daemons import AgentProcess, RelayProcess
from tunnel.testing._servers import LocalServer as LocalServer
from tunnel.testing._servers import echo_handler as echo_handler
from tunnel.testing._servers import http_handler as http_handler


def port_accepts(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# Processes


class RelayProc:
    """
    A relay on a fixed public port, admin port and state directory, so that it can be
    killed and started again as "the same relay".
    """

    def __init__(
        self,
        group: Group,
        extra: Sequence[str] = (),
        prefix: Sequence[str] = (),
        listen_options: str = "",
    ):
        self.group = group
        #: Appended to the --listen endpoint string (e.g. ``:backlog=2048``).
        self.listen_options = listen_options
        self.extra = list(extra)
        self.prefix = list(prefix)
        n = group.next_id()
        self.state = group.dir / f"relay-state-{n}"
        self.log = group.dir / f"{n:02d}-relay.log"
        self.port = 0
        self.admin_port = 0
        self.tcp_range = tcp_port_range()
        self.tcp_low = self.tcp_range[0]
        self.proc: RelayProcess | None = None
        self.starts = 0

    @property
    def ca(self) -> Path:
        return self.state / "ca.pem"

    def start(self, timeout: float = DEADLINE) -> RelayProc:
        """Start (on new free ports the first time; on the same ports afterwards)."""
        self.proc = RelayProcess.start(
            self.log,
            state_dir=self.state,
            port=self.port or None,
            admin_port=self.admin_port or None,
            timeout=timeout,
            tcp_ports=self.tcp_range,
            listen_options=self.listen_options,
            extra=self.extra,
            prefix=self.prefix,
            cwd=self.group.dir,
        )
        self.port, self.admin_port = self.proc.port, self.proc.admin_port
        self.group.procs.append(self.proc)
        self.starts += 1
        return self

    def status(self, timeout: float = 5.0) -> dict[str, int]:
        assert self.proc is not None
        return self.proc.status(timeout)

    def wait_status(
        self, pred: Callable[[dict[str, int]], bool], what: str, timeout: float = DEADLINE
    ) -> dict[str, int]:
        assert self.proc is not None
        return self.proc.wait_status(pred, what, timeout)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


class AgentProc:
    def __init__(self, proc: AgentProcess) -> None:
        self.proc = proc

    def ready(self, target_port: int, timeout: float = DEADLINE) -> Endpoint:
        """The tunnel of 127.0.0.1:`target_port`, once the agent reports it granted."""
        info = self.proc.tunnel(forward_target(str(target_port)), timeout)
        return Endpoint(info.host, info.port, info.tcp_port)

    def back_count(self, tunnel: Endpoint) -> int:
        return self.proc.count(rf"tunnel {re.escape(tunnel.url)} is back")

    def wait_back(self, tunnel: Endpoint, at_least: int, timeout: float = DEADLINE) -> None:
        wait_for(
            lambda: self.back_count(tunnel) >= at_least,
            f"{tunnel.url} back #{at_least}",
            timeout,
        )


class Group(ProcGroup):
    """Every process (and helper) a test started; all stopped at teardown."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.cleanups: list[Callable[[], None]] = []

    def relay(self, *extra: str, prefix: Sequence[str] = (), listen_options: str = "") -> RelayProc:
        return RelayProc(self, extra, prefix, listen_options).start()

    def agent(
        self,
        relay: RelayProc,
        forwards: Sequence[str],
        via_port: int | None = None,
        token: str | None = None,
        extra: Sequence[str] = (),
    ) -> AgentProc:
        """An agent of `relay` (dialling `via_port` instead, e.g. a proxy in front of it)."""
        proc = AgentProcess(
            self.dir / f"{self.next_id():02d}-agent.log",
            relay=f"localhost:{via_port or relay.port}",
            ca=relay.ca,
            forwards=forwards,
            token=token,
            extra=extra,
            cwd=self.dir,
        )
        self.procs.append(proc)
        return AgentProc(proc)

    def stop_all(self) -> None:
        for cleanup in reversed(self.cleanups):
            with contextlib.suppress(Exception):
                cleanup()
        self.cleanups.clear()
        super().stop_all()


# ---------------------------------------------------------------------------------------------
# Local servers (threads of the test process)


def payload(size: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(size)


def slow_sender(
    data: bytes, chunk: int, pause: float, half_close: bool = False
) -> Callable[[socket.socket, LocalServer], None]:
    """
    A handler that, on connect, sends `data` in `chunk`-byte pieces with `pause` seconds
    between them (a rate limit, not a wait for an event), then closes; with `half_close`, it
    only shuts down its sending side and reads until the client closes (a lingering close,
    as nginx does). Records ``done`` or ``broken`` (the peer went away mid-transfer) in
    `server.events`.
    """

    def handle(sock: socket.socket, server: LocalServer) -> None:
        try:
            for i in range(0, len(data), chunk):
                sock.sendall(data[i : i + chunk])
                time.sleep(pause)
            if not half_close:
                server.events.append("done")
                sock.close()
                return
            sock.shutdown(socket.SHUT_WR)
            server.events.append("done")
            # Read until the client closes (bounded by the socket timeout).
            sock.settimeout(30)
            with contextlib.suppress(OSError):
                while sock.recv(65536):
                    pass
        except OSError:
            server.events.append("broken")

    return handle


# ---------------------------------------------------------------------------------------------
# Clients


def curl(relay: RelayProc, tunnel: Endpoint, path: str = "/", timeout: float = 15.0) -> Any:
    """``harness.curl`` of `path` on the tunnel, with a shorter timeout."""
    return harness_curl(relay, tunnel, tunnel.url + path, timeout=timeout)


def nc_echo(port: int, data: bytes, timeout: float = 15.0) -> bytes:
    """Send `data` with ``nc -N`` (close after stdin's EOF) to a raw TCP port; its output."""
    return run(
        [require_tool("nc"), "-N", "-w", "5", LOOPBACK, str(port)], timeout=timeout, input=data
    ).stdout


def echo_roundtrip(sock: socket.socket, data: bytes = b"ping\n") -> bool:
    """Whether `sock` (to an echo server) echoes `data` back."""
    try:
        sock.sendall(data)
        got = b""
        while len(got) < len(data):
            chunk = sock.recv(len(data) - len(got))
            if not chunk:
                return False
            got += chunk
        return got == data
    except OSError:
        return False


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """Whether the peer closes (EOF or reset) `sock` within `timeout` seconds."""
    sock.settimeout(timeout)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except (ConnectionError, ssl.SSLError):
        return True
    except TimeoutError:
        return False
    except OSError:
        return True


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
