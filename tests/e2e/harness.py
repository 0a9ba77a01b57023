"""
Helpers of the end-to-end tests: real relay and agent processes (twistd), local servers,
and clients, all on loopback. ``reliability_harness`` builds on the pieces here.

Every wait polls with a deadline; nothing sleeps to see whether something happened. Every
process started here is kept (by PID) and ended by `Proc.stop`: SIGTERM, then SIGKILL after a
timeout.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest

DOMAIN = "tunnel.localhost"
LOOPBACK = "127.0.0.1"
#: Default deadline of every wait.
DEADLINE = 20.0
SERVERS = Path(__file__).parent / "servers"
BACKEND = SERVERS / "backend.py"

T = TypeVar("T")


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (run `make deps`)")
    return path


def twistd() -> str:
    """The venv's twistd (next to the running interpreter), else the one on PATH."""
    here = Path(sys.executable).parent / "twistd"
    if here.exists():
        return str(here)
    found = shutil.which("twistd")
    if found is None:
        pytest.skip("twistd is not installed")
    return found


def clean_env() -> dict[str, str]:
    """The environment for children: no TUNNEL_* settings leaking in, no proxies."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("TUNNEL_") and k.lower() not in ("http_proxy", "https_proxy")
    }
    env["NO_PROXY"] = "*"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def free_port() -> int:
    """A port free on 127.0.0.1 right now (the caller retries if it is taken meanwhile)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


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


# ---------------------------------------------------------------------------------------------
# Command lines


def twistd_args(plugin: str, *args: str) -> list[str]:
    """``twistd`` running `plugin` in the foreground, no pidfile, logging to stdout."""
    return [twistd(), "-n", "--pidfile", "", "--logfile", "-", plugin, *args]


def tcp_port_range() -> tuple[int, int]:
    """500 ports for a relay's raw TCP tunnels, below the ephemeral range (32768+)."""
    low = random.randrange(20000, 32000)
    return low, low + 499


def relay_args(
    port: int,
    state: Path,
    tcp_ports: tuple[int, int],
    extra: Sequence[str] = (),
    listen_options: str = "",
) -> list[str]:
    """``twistd tunnelrelay`` on 127.0.0.1:`port` (`listen_options` appended to the endpoint)."""
    return twistd_args(
        "tunnelrelay",
        "--domain",
        DOMAIN,
        "--listen",
        f"tcp:{port}:interface={LOOPBACK}{listen_options}",
        "--state-dir",
        str(state),
        "--tcp-ports",
        f"{tcp_ports[0]}-{tcp_ports[1]}",
        "--tcp-interface",
        LOOPBACK,
        *extra,
    )


def agent_args(
    relays: str, ca: Path, forwards: Sequence[str], token: str | None = None
) -> list[str]:
    """``twistd tunnelagent`` linking to `relays` (the ``--relay`` value), trusting `ca`."""
    args = twistd_args("tunnelagent", "--relay", relays, "--ca", str(ca))
    for f in forwards:
        args += ["--forward", f]
    if token is not None:
        args += ["--token", token]
    return args


# ---------------------------------------------------------------------------------------------
# Processes


class Proc:
    """A child process we started, with its output in a file."""

    def __init__(self, args: Sequence[str], log: Path, cwd: Path | None = None) -> None:
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

    def wait(self, check: Callable[[], T | None], what: str, timeout: float = DEADLINE) -> T:
        """`wait_for`, with the end of this process's log in the error."""
        try:
            return wait_for(check, what, timeout)
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- {self.log} ---\n{self.text()[-3000:]}") from None

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

        return self.wait(check, f"{pattern!r} in {self.log.name}", timeout)

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


class ProcGroup:
    """Every process a test (or fixture) started, logging to numbered files in `directory`;
    all stopped at teardown."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.procs: list[Proc] = []
        self._n = 0

    def next_id(self) -> int:
        self._n += 1
        return self._n

    def start(self, name: str, args: Sequence[str]) -> Proc:
        proc = Proc(args, self.dir / f"{self.next_id():02d}-{name}.log", cwd=self.dir)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()


def start_relay(
    launch: Callable[[], tuple[Proc, int]],
    attempts: int = 5,
    also: Sequence[str] = (),
    timeout: float = DEADLINE,
) -> Proc:
    """
    Start a relay with `launch` (which returns its process and public port) and wait until it
    listens there (and has logged every pattern of `also`); stop it and launch again (on new
    ports) if it does not, up to `attempts` times: a free port may be taken meanwhile.
    """
    last = ""
    for _ in range(attempts):
        proc, port = launch()
        try:
            proc.wait_log(rf"relay listening on 127\.0\.0\.1:{port}\b", timeout)
            for pattern in also:
                proc.wait_log(pattern, timeout)
        except AssertionError as e:
            last = str(e)
            proc.stop()
            continue
        return proc
    raise AssertionError(f"the relay did not start:\n{last}")


class Procs(ProcGroup):
    """A `ProcGroup` starting relays, agents and the local servers of ``servers/backend.py``."""

    # -- relay -------------------------------------------------------------------------------

    def relay(
        self,
        *,
        tokens: Sequence[str] | None = None,
        handshake_timeout: float | None = None,
        extra: Sequence[str] = (),
    ) -> Relay:
        """Start a relay on a free port; returns once it listens."""
        state = self.dir / f"relay-state-{self._n + 1}"
        args_tail = ["--drain-grace", "1"]
        if tokens is not None:
            token_file = self.dir / f"tokens-{self._n + 1}.txt"
            token_file.write_text("# e2e tokens\n" + "\n".join(tokens) + "\n")
            args_tail += ["--tokens", str(token_file)]
        if handshake_timeout is not None:
            args_tail += ["--handshake-timeout", str(handshake_timeout)]
        args_tail += list(extra)
        port = 0

        def launch() -> tuple[Proc, int]:
            nonlocal port
            port = free_port()
            return self.start("relay", relay_args(port, state, tcp_port_range(), args_tail)), port

        proc = start_relay(launch)
        return Relay(proc, port, state / "ca.pem")

    # -- agent -------------------------------------------------------------------------------

    def agent(
        self,
        relay: Relay,
        forwards: Sequence[str],
        *,
        token: str | None = None,
        wait: bool = True,
        extra: Sequence[str] = (),
    ) -> Agent:
        """Start `twistd tunnelagent` (`extra`: more options); with `wait`, returns once
        every forward is ready."""
        args = [*agent_args(f"localhost:{relay.port}", relay.ca, forwards, token), *extra]
        agent = Agent(self.start("agent", args))
        if wait:
            for f in forwards:
                agent.ready(f)
        return agent

    # -- local servers -----------------------------------------------------------------------

    def backend(self, mode: str, *args: str) -> Backend:
        """Start a server of ``servers/backend.py``; returns once it listens."""
        proc = self.start(f"backend-{mode}", [sys.executable, str(BACKEND), mode, *args])
        m = proc.wait_log(r"listening on (\d+)")
        return Backend(proc, int(m.group(1)))


@dataclass
class Relay:
    proc: Proc
    port: int
    ca: Path

    def wait_log(self, pattern: str, timeout: float = DEADLINE) -> re.Match[str]:
        return self.proc.wait_log(pattern, timeout)


@dataclass
class Backend:
    proc: Proc
    port: int


READY = re.compile(
    r"tunnel ready: https://(?P<host>[a-z0-9]+\.[a-z0-9.\-]+):(?P<port>\d+)"
    r"(?: tcp://(?P<tcp_host>[^\s:]+):(?P<tcp_port>\d+))? -> (?P<target>\S+)"
)


@dataclass(frozen=True)
class Endpoint:
    """A tunnel as the agent reported it."""

    host: str
    port: int
    tcp_port: int | None

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    @property
    def id(self) -> str:
        return self.host.split(".", 1)[0]


def ready_tunnels(log: str) -> Iterator[tuple[str, Endpoint]]:
    """Each ``tunnel ready`` line of an agent's `log`, in order: (its target, its tunnel)."""
    for m in READY.finditer(log):
        tcp = m.group("tcp_port")
        yield (
            m.group("target"),
            Endpoint(m.group("host"), int(m.group("port")), int(tcp) if tcp else None),
        )


@dataclass
class Agent:
    proc: Proc
    tunnels: dict[str, Endpoint] = field(default_factory=dict)

    def ready(self, forward: str, timeout: float = DEADLINE) -> Endpoint:
        """The tunnel of ``--forward`` value `forward`, once the agent says it is ready."""
        port = forward.split(":")[0] if forward[0].isdigit() else forward.split(":")[1]
        target = f"127.0.0.1:{port}"
        if target not in self.tunnels:

            def check() -> Endpoint | None:
                self.tunnels.update(ready_tunnels(self.proc.text()))
                return self.tunnels.get(target)

            self.proc.wait(check, f"tunnel ready for {target}", timeout)
        return self.tunnels[target]


# ---------------------------------------------------------------------------------------------
# Clients


class RelayLike(Protocol):
    """What a client needs of a relay (`Relay`, or the reliability tests' `RelayProc`)."""

    @property
    def port(self) -> int: ...

    @property
    def ca(self) -> Path: ...


def run(
    args: Sequence[str], timeout: float = 60.0, input: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run a client to completion (bounded by `timeout`), capturing its output."""
    return subprocess.run(
        list(args),
        capture_output=True,
        timeout=timeout,
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        env=clean_env(),
    )


def curl(relay: RelayLike, tunnel: Endpoint, *args: str, timeout: float = 60.0) -> Any:
    """curl against a TLS tunnel, trusting the relay's dev CA, resolving to loopback."""
    return run(
        [
            require_tool("curl"),
            "-sS",
            "--max-time",
            str(int(timeout)),
            "--cacert",
            str(relay.ca),
            "--resolve",
            f"{tunnel.host}:{tunnel.port}:{LOOPBACK}",
            *args,
        ],
        timeout=timeout + 10,
    )


def first_reply(port: int, data: bytes) -> bytes:
    """Send `data` to the raw TCP `port`; what comes back first (b"" on a close or reset)."""
    with socket.create_connection((LOOPBACK, port), timeout=DEADLINE) as sock:
        sock.sendall(data)
        try:
            return sock.recv(1024)
        except ConnectionResetError:
            return b""


def tls_context(relay: RelayLike) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(relay.ca))


def tls_connect(
    relay: RelayLike, tunnel: Endpoint, timeout: float = DEADLINE, alpn: Sequence[str] = ()
) -> ssl.SSLSocket:
    """A TLS connection to the tunnel through the relay (SNI = the tunnel's host)."""
    ctx = tls_context(relay)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    raw = socket.create_connection((LOOPBACK, relay.port), timeout=timeout)
    try:
        return ctx.wrap_socket(raw, server_hostname=tunnel.host)
    except BaseException:
        raw.close()
        raise


def recv_all(sock: socket.socket, limit: int = 1 << 30) -> bytes:
    """Read until EOF (bounded by `limit` bytes and the socket's timeout)."""
    chunks = []
    total = 0
    while total < limit:
        data = sock.recv(1 << 16)
        if not data:
            break
        chunks.append(data)
        total += len(data)
    return b"".join(chunks)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    got = 0
    while got < n:
        data = sock.recv(min(1 << 16, n - got))
        if not data:
            raise AssertionError(f"connection closed after {got} of {n} bytes")
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def random_file(path: Path, size: int, seed: int) -> str:
    """Write `size` pseudo-random bytes to `path`; returns their sha256 (hex)."""
    import hashlib

    rng = random.Random(seed)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, 1 << 20)
            block = rng.randbytes(n)
            digest.update(block)
            f.write(block)
            left -= n
    return digest.hexdigest()
