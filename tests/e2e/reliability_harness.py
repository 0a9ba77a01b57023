"""
Helpers of the reliability tests: relay and agent processes that can be killed, restarted on
the same port and state directory, inspected through the admin ``/status`` JSON; small local
servers (threads of the test process: they are not what fails); raw clients.

Everything is loopback only. Every wait polls with a deadline. Every process is kept by PID
and stopped with SIGTERM, then SIGKILL after a timeout.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

DOMAIN = "tunnel.localhost"
LOOPBACK = "127.0.0.1"
DEADLINE = 20.0

T = TypeVar("T")


def wait_for(check: Callable[[], T | None], what: str, timeout: float = DEADLINE) -> T:
    """Poll `check` until it returns something other than None/False, or fail at `timeout`."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        value = check()
        if value is not None and value is not False:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def twistd() -> str:
    here = Path(sys.executable).parent / "twistd"
    if here.exists():
        return str(here)
    found = shutil.which("twistd")
    if found is None:
        pytest.skip("twistd is not installed")
    return found


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def clean_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("TUNNEL_") and k.lower() not in ("http_proxy", "https_proxy")
    }
    env["NO_PROXY"] = "*"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def port_accepts(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# Processes


class Proc:
    """A child process we started; its output goes to `log`."""

    def __init__(self, args: Sequence[str], log: Path, cwd: Path) -> None:
        self.args = list(args)
        self.log = log
        self._out = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            self.args,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            env=clean_env(),
        )
        self.pid = self.popen.pid

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

    def wait_log(self, pattern: str, timeout: float = DEADLINE, start: int = 0) -> re.Match[str]:
        """The first match of regex `pattern` in the log after character offset `start`."""
        regex = re.compile(pattern)

        def check() -> re.Match[str] | None:
            m = regex.search(self.text(), start)
            if m is None and self.popen.poll() is not None:
                m = regex.search(self.text(), start)
                if m is None:
                    raise AssertionError(
                        f"{self.args[:7]} exited ({self.popen.returncode}) before logging "
                        f"{pattern!r}:\n{self.text()[-3000:]}"
                    )
            return m

        try:
            return wait_for(check, f"{pattern!r} in {self.log.name}", timeout)
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- {self.log} ---\n{self.text()[-3000:]}") from None

    def count(self, pattern: str) -> int:
        return len(re.findall(pattern, self.text()))

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL now, and reap."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.popen.wait(10)

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(timeout)
        self._out.close()


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
        self.state = group.dir / f"relay-state-{group.next_id()}"
        self.port = 0
        self.admin_port = 0
        self.tcp_low = random.randrange(20000, 32000)  # below the ephemeral range (32768+)
        self.tcp_range = (self.tcp_low, self.tcp_low + 499)
        self.proc: Proc | None = None
        self.starts = 0

    @property
    def ca(self) -> Path:
        return self.state / "ca.pem"

    def _args(self) -> list[str]:
        return [
            *self.prefix,
            twistd(),
            "-n",
            "--pidfile",
            "",
            "--logfile",
            "-",
            "tunnelrelay",
            "--domain",
            DOMAIN,
            "--listen",
            f"tcp:{self.port}:interface={LOOPBACK}{self.listen_options}",
            "--state-dir",
            str(self.state),
            "--tcp-ports",
            f"{self.tcp_range[0]}-{self.tcp_range[1]}",
            "--tcp-interface",
            LOOPBACK,
            "--admin",
            f"tcp:{self.admin_port}:interface={LOOPBACK}",
            *self.extra,
        ]

    def start(self, timeout: float = DEADLINE) -> RelayProc:
        """Start (on new free ports the first time; on the same ports afterwards)."""
        attempts = 5 if self.starts == 0 else 1
        last = ""
        for _ in range(attempts):
            if self.starts == 0:
                self.port, self.admin_port = free_port(), free_port()
            proc = self.group.start("relay", self._args())
            try:
                proc.wait_log(rf"relay listening on 127\.0\.0\.1:{self.port}\b", timeout)
                proc.wait_log(r"admin on http://", timeout)
            except AssertionError as e:
                last = str(e)
                proc.stop()
                continue
            self.proc = proc
            self.starts += 1
            return self
        raise AssertionError(f"the relay did not start:\n{last}")

    def status(self, timeout: float = 5.0) -> dict[str, int]:
        url = f"http://{LOOPBACK}:{self.admin_port}/status"
        with urllib.request.urlopen(url, timeout=timeout) as r:
            data: dict[str, int] = json.loads(r.read())
            return data

    def wait_status(
        self, pred: Callable[[dict[str, int]], bool], what: str, timeout: float = DEADLINE
    ) -> dict[str, int]:
        last: list[dict[str, int]] = [{}]

        def check() -> dict[str, int] | None:
            try:
                s = self.status()
            except OSError:
                return None
            last[0] = s
            return s if pred(s) else None

        try:
            return wait_for(check, what, timeout)
        except AssertionError as e:
            raise AssertionError(f"{e}; last /status: {last[0]}") from None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


@dataclass(frozen=True)
class Endpoint:
    """A tunnel as the agent reported it."""

    host: str
    port: int
    tcp_port: int | None

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"


READY = re.compile(
    r"tunnel ready: https://(?P<host>[a-z0-9]+\.[a-z0-9.\-]+):(?P<port>\d+)"
    r"(?: tcp://(?P<tcp_host>[^\s:]+):(?P<tcp_port>\d+))? -> (?P<target>\S+)"
)


class AgentProc:
    def __init__(self, proc: Proc) -> None:
        self.proc = proc

    def ready(self, target_port: int, timeout: float = DEADLINE) -> Endpoint:
        target = f"127.0.0.1:{target_port}"

        def check() -> Endpoint | None:
            for m in READY.finditer(self.proc.text()):
                if m.group("target") == target:
                    tcp = m.group("tcp_port")
                    return Endpoint(
                        m.group("host"), int(m.group("port")), int(tcp) if tcp else None
                    )
            return None

        try:
            return wait_for(check, f"tunnel ready for {target}", timeout)
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- agent log ---\n{self.proc.text()[-3000:]}") from None

    def back_count(self, tunnel: Endpoint) -> int:
        return self.proc.count(rf"tunnel {re.escape(tunnel.url)} is back")

    def wait_back(self, tunnel: Endpoint, at_least: int, timeout: float = DEADLINE) -> None:
        wait_for(
            lambda: self.back_count(tunnel) >= at_least,
            f"{tunnel.url} back #{at_least}",
            timeout,
        )


class Group:
    """Every process (and helper) a test started; all stopped at teardown."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.procs: list[Proc] = []
        self.cleanups: list[Callable[[], None]] = []
        self._n = 0

    def next_id(self) -> int:
        self._n += 1
        return self._n

    def start(self, name: str, args: Sequence[str]) -> Proc:
        proc = Proc(args, self.dir / f"{self.next_id():02d}-{name}.log", cwd=self.dir)
        self.procs.append(proc)
        return proc

    def relay(self, *extra: str, prefix: Sequence[str] = (), listen_options: str = "") -> RelayProc:
        return RelayProc(self, extra, prefix, listen_options).start()

    def agent(
        self, relay: RelayProc, forwards: Sequence[str], via_port: int | None = None
    ) -> AgentProc:
        args = [
            twistd(),
            "-n",
            "--pidfile",
            "",
            "--logfile",
            "-",
            "tunnelagent",
            "--relay",
            f"localhost:{via_port or relay.port}",
            "--ca",
            str(relay.ca),
        ]
        for f in forwards:
            args += ["--forward", f]
        return AgentProc(self.start("agent", args))

    def stop_all(self) -> None:
        for cleanup in reversed(self.cleanups):
            with contextlib.suppress(Exception):
                cleanup()
        self.cleanups.clear()
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()


# ---------------------------------------------------------------------------------------------
# Local servers (threads of the test process)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False


class LocalServer:
    """A threaded TCP server on 127.0.0.1 with a handler function(sock, server)."""

    def __init__(self, handle: Callable[[socket.socket, LocalServer], None]) -> None:
        owner = self
        self.events: list[str] = []

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                with contextlib.suppress(OSError):
                    handle(self.request, owner)

        self.server = _Server((LOOPBACK, 0), Handler)
        self.port: int = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def echo_handler(sock: socket.socket, server: LocalServer) -> None:
    while True:
        data = sock.recv(65536)
        if not data:
            return
        sock.sendall(data)


def http_handler(sock: socket.socket, server: LocalServer) -> None:
    """A tiny HTTP/1.1 server: answers every request with ``ok``, closes after one."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return
        data += chunk
    body = b"ok\n"
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\n" + body)


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


def tls_context(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


def tls_connect(
    relay: RelayProc, tunnel: Endpoint, timeout: float = 10.0, ctx: ssl.SSLContext | None = None
) -> ssl.SSLSocket:
    ctx = ctx or tls_context(relay.ca)
    raw = socket.create_connection((LOOPBACK, relay.port), timeout=timeout)
    try:
        return ctx.wrap_socket(raw, server_hostname=tunnel.host)
    except BaseException:
        raw.close()
        raise


def curl(relay: RelayProc, tunnel: Endpoint, path: str = "/", timeout: float = 15.0) -> Any:
    return subprocess.run(
        [
            require_tool("curl"),
            "-sS",
            "--max-time",
            str(int(timeout)),
            "--cacert",
            str(relay.ca),
            "--resolve",
            f"{tunnel.host}:{tunnel.port}:{LOOPBACK}",
            tunnel.url + path,
        ],
        capture_output=True,
        timeout=timeout + 10,
        stdin=subprocess.DEVNULL,
        env=clean_env(),
    )


def nc_echo(port: int, data: bytes, timeout: float = 15.0) -> bytes:
    """Send `data` with ``nc -N`` (close after stdin's EOF) to a raw TCP port; its output."""
    result = subprocess.run(
        [require_tool("nc"), "-N", "-w", "5", LOOPBACK, str(port)],
        input=data,
        capture_output=True,
        timeout=timeout,
        env=clean_env(),
    )
    return result.stdout


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
