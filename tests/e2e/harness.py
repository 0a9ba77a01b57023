"""
Helpers of the end-to-end tests: real relay and agent processes (started and waited for by
the launcher, `tunnel.testing`), local servers, and clients, all on loopback.
``reliability_harness`` builds on the pieces here.

Every wait polls with a deadline; nothing sleeps to see whether something happened. Every
process started here is kept (by PID) and ended by `Proc.stop`: SIGTERM, then SIGKILL after a
timeout.
"""

from __future__ import annotations

import random
import re
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest

from tunnel.testing._daemons import DEADLINE as DEADLINE
from tunnel.testing._daemons import LOOPBACK as LOOPBACK
from tunnel.testing._daemons import AgentProcess, Daemon, RelayProcess
from tunnel.testing._daemons import child_env as clean_env
from tunnel.testing._daemons import free_port as free_port
from tunnel.testing._daemons import wait_for as wait_for

DOMAIN = "tunnel.localhost"
SERVERS = Path(__file__).parent / "servers"
BACKEND = SERVERS / "backend.py"


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (run `make deps`)")
    return path


def tcp_port_range() -> tuple[int, int]:
    """500 ports for a relay's raw TCP tunnels, below the ephemeral range (32768+)."""
    low = random.randrange(20000, 32000)
    return low, low + 499


# ---------------------------------------------------------------------------------------------
# Processes


#: A child process we started, with its output in a file (the launcher's `Daemon`).
Proc = Daemon


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


class Procs(ProcGroup):
    """A `ProcGroup` starting relays, agents and the local servers of ``servers/backend.py``."""

    # -- relay -------------------------------------------------------------------------------

    def relay(
        self,
        *,
        tokens: Sequence[str] | None = None,
        handshake_timeout: float | None = None,
        extra: Sequence[str] = (),
        state: Path | None = None,
    ) -> Relay:
        """Start a relay on free ports (state in `state`, else its own); returns once ready."""
        n = self.next_id()
        state = state or self.dir / f"relay-state-{n}"
        args_tail = ["--drain-grace", "1"]
        if tokens is not None:
            token_file = self.dir / f"tokens-{n}.txt"
            token_file.write_text("# e2e tokens\n" + "\n".join(tokens) + "\n")
            args_tail += ["--tokens", str(token_file)]
        if handshake_timeout is not None:
            args_tail += ["--handshake-timeout", str(handshake_timeout)]
        proc = RelayProcess.start(
            self.dir / f"{n:02d}-relay.log",
            state_dir=state,
            tcp_ports=tcp_port_range(),
            extra=[*args_tail, *extra],
            cwd=self.dir,
        )
        self.procs.append(proc)
        return Relay(proc, proc.port, proc.ca)

    # -- agent -------------------------------------------------------------------------------

    def agent(
        self,
        relay: RelayLike | str,
        forwards: Sequence[str],
        *,
        token: str | None = None,
        wait: bool = True,
        extra: Sequence[str] = (),
        ca: Path | None = None,
    ) -> Agent:
        """Start `twistd tunnelagent` linking to `relay` (or to a ``--relay`` value, trusting
        `ca`); `extra`: more options. With `wait`, returns once every forward is ready."""
        if isinstance(relay, str):
            relays = relay
        else:
            relays, ca = f"localhost:{relay.port}", relay.ca
        n = self.next_id()
        proc = AgentProcess(
            self.dir / f"{n:02d}-agent.log",
            relay=relays,
            ca=ca,
            forwards=forwards,
            token=token,
            extra=extra,
            cwd=self.dir,
        )
        self.procs.append(proc)
        agent = Agent(proc)
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


def forward_target(forward: str) -> str:
    """The local target of a ``--forward`` value such as ``8000``, ``8000:tcp``,
    ``127.0.0.1:8000:h2`` or ``web=8000``, as the agent's ``/status`` names it."""
    name, sep, rest = forward.partition("=")
    if sep and ":" not in name:  # NAME= before the target (``:rate=10MB`` is a suffix)
        forward = rest
    port = forward.split(":")[0] if forward[0].isdigit() else forward.split(":")[1]
    return f"127.0.0.1:{port}"


@dataclass
class Agent:
    proc: AgentProcess

    def ready(self, forward: str, timeout: float = DEADLINE) -> Endpoint:
        """The tunnel of ``--forward`` value `forward`, once the agent reports it granted."""
        info = self.proc.tunnel(forward_target(forward), timeout)
        return Endpoint(info.host, info.port, info.tcp_port)


# ---------------------------------------------------------------------------------------------
# Clients


class RelayLike(Protocol):
    """What a client needs of a relay (`Relay`, or the reliability tests' `RelayProc`)."""

    @property
    def port(self) -> int: ...

    @property
    def ca(self) -> Path: ...


def run(
    args: Sequence[str],
    timeout: float = 60.0,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run a client to completion (bounded by `timeout`), capturing its output; `env`:
    its environment (default: ours without ``TUNNEL_*`` settings or proxies)."""
    return subprocess.run(
        list(args),
        capture_output=True,
        timeout=timeout,
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        env=dict(env) if env is not None else clean_env(),
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
