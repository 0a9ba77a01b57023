"""The "path" abstraction: one way for bytes to get from a client to the loopback servers.

A path is started once, measured by every function in ``bench.measure`` that it supports,
then stopped.  To add one (for example our relay + agent), subclass ``BenchPath``, decorate it
with ``@register``, and put its module in ``PATH_MODULES``::

    @register
    class TunnelTls(BenchPath):
        name = "tunnel-tls"
        title = "Tunnels TLS (twistd tunnelrelay + tunnelagent)"

        def start(self) -> None:
            relay = self.spawn(["twistd", "-n", "tunnelrelay", ...], "relay.log")
            ...  # wait until ready; the targets are self.ctx.nginx_port / data_port / echo_port
            self.http = HttpTarget(f"https://{tid}.tunnel.localhost:{port}", cafile=ca)
            self.tcp = Endpoint("127.0.0.1", port, sni=f"{tid}.tunnel.localhost", cafile=ca)

``pids()`` defaults to every process started through ``self.spawn``; their descendants are
included in the CPU accounting automatically (override it to charge, say, only relay+agent).
``self.start_delay_proxy([port, ...])`` puts a 50 ms-each-way delay in front of loopback
ports (e.g. the relay's link port, for an agent far from its relay).  Override ``extra()``
for measurements only one path has (``forward()`` warm/cold time, RSS per idle connection,
...): it returns ``{metric: (unit, samples)}`` and those rows appear in the JSON.
"""

from __future__ import annotations

import abc
import importlib
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar
from urllib.parse import urlsplit

from bench.util import LOOPBACK, ProcessGroup, free_port, json_line, wait_port

# Modules whose import registers path classes, in the order they are run.
PATH_MODULES: list[str] = ["bench.paths", "bench.refs", "bench.tunnels"]


@dataclass(frozen=True)
class Endpoint:
    """A raw-TCP address on loopback; with ``sni`` the client speaks TLS with that name."""

    host: str
    port: int
    sni: str | None = None
    cafile: str | None = None


@dataclass(frozen=True)
class HttpTarget:
    """Where the HTTP measurements go: ``base_url + "/small"`` and ``base_url + "/big"``.

    A host name in ``base_url`` (``x.bench.localhost``) is made to resolve to 127.0.0.1 for
    the clients (curl ``--resolve``; wrk in a private mount namespace), never via DNS.
    """

    base_url: str
    cafile: str | None = None

    @property
    def hostname(self) -> str:
        """The URL's host name (also the TLS SNI name and the Host header)."""
        return urlsplit(self.base_url).hostname or LOOPBACK

    @property
    def port(self) -> int:
        """The URL's port."""
        u = urlsplit(self.base_url)
        return u.port or (443 if u.scheme == "https" else 80)

    @property
    def needs_resolve(self) -> bool:
        """True when the host is a name rather than a loopback IP literal."""
        return self.hostname not in (LOOPBACK, "localhost", "::1")


@dataclass(frozen=True)
class Wan:
    """An emulated WAN link (``bench.delayproxy`` with a delay and a bandwidth cap)."""

    #: Part of the path names: ``wan-100ms-400M``, ``tunnel-tcp-wan-100ms-400M``, ...
    tag: str
    rtt_ms: float
    rate_mbps: float

    @property
    def rate_MBps(self) -> float:
        """The cap in MB/s (10^6 bytes)."""
        return self.rate_mbps / 8

    def proxy_args(self) -> list[str]:
        """``bench.delayproxy`` options for this link (half the round trip each way)."""
        return [f"--delay-ms={self.rtt_ms / 2:g}", f"--rate-mbps={self.rate_mbps:g}"]


#: The WAN links every ``*-wan-*`` path is measured over: an agent far away (100 ms, a
#: 400 Mbit/s share), and one in a nearby region (30 ms, 1 Gbit/s).
WANS: list[Wan] = [Wan("100ms-400M", 100.0, 400.0), Wan("30ms-1G", 30.0, 1000.0)]


@dataclass
class Context:
    """What every path can use: the loopback servers, the TLS material, the run's settings."""

    workdir: Path
    nginx_port: int
    data_port: int
    echo_port: int
    ca_file: Path
    cert_file: Path
    key_file: Path
    domain: str = "bench.localhost"
    quick: bool = False
    procs: ProcessGroup = field(default_factory=ProcessGroup)


class BenchPath(abc.ABC):
    """One benchmarked path.  ``start()`` sets ``http``, ``tcp`` and ``echo`` (or leaves None
    for what the path cannot carry); measurements skip what is None."""

    name: ClassVar[str]
    title: ClassVar[str]
    #: Sequential connections for connect+first-byte latency (None: the run's default).
    connect_count: ClassVar[int | None] = None
    #: False: run only when named with ``--only`` (keeps the default run short).
    default: ClassVar[bool] = True
    #: Set on paths that cross an emulated WAN link: they are measured with the ``wan1`` /
    #: ``wan8`` downloads (as a share of ``wan.rate_MBps``) instead of the loopback set.
    wan: ClassVar[Wan | None] = None
    #: True: ``cut_link()`` drops the agent's link, and the reconnect time is measured.
    cuttable: ClassVar[bool] = False

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.dir = ctx.workdir / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.procs = ProcessGroup()
        self.http: HttpTarget | None = None
        self.tcp: Endpoint | None = None
        self.echo: Endpoint | None = None
        self.setup_commands: list[str] = []
        #: Further Markdown reports by file name (written next to ``results.md``).
        self.reports: dict[str, str] = {}
        #: The WAN proxy started by ``start_wan_proxy`` (the network, not a forwarder).
        self.wan_proxy: subprocess.Popen[bytes] | None = None
        #: CPU seconds per role during the last measurement (see ``roles``).
        self.role_cpu: dict[str, float] = {}

    @abc.abstractmethod
    def start(self) -> None:
        """Start the forwarding processes; return once the path carries traffic."""

    def stop(self) -> None:
        """End every process this path started (by PID)."""
        self.procs.stop_all()

    def pids(self) -> list[int]:
        """The forwarding processes whose CPU time is charged to this path (not the WAN
        proxy: it stands for the network)."""
        proxy = self.wan_proxy.pid if self.wan_proxy is not None else None
        return [p for p in self.procs.pids if p != proxy]

    def extra(self, runs: int) -> dict[str, tuple[str, list[float]]]:
        """Path-specific measurements: ``{metric: (unit, samples)}``.  None by default."""
        return {}

    def roles(self) -> dict[str, list[int]]:
        """Processes whose CPU is also reported on its own, by role (e.g. relay, agent)."""
        return {}

    def start_delay_proxy(self, targets: Sequence[int], delay_ms: float = 50.0) -> list[int]:
        """Start ``bench.delayproxy`` in front of loopback ``targets``; return the new ports.

        ``delay_ms`` is added in each direction.  Use it to put a round trip anywhere in a
        path, e.g. between agent and relay: ``self.start_delay_proxy([relay_port])``.
        """
        ports = {free_port(): t for t in targets}
        argv = [sys.executable, "-m", "bench.delayproxy", f"--delay-ms={delay_ms:g}"]
        argv += [f"{a}:{b}" for a, b in ports.items()]
        proc = self.spawn(argv, f"delayproxy-{len(self.procs.procs)}.log")
        for p in ports:
            _wait_alive(proc, p)
        return list(ports)

    def start_wan_proxy(self, targets: Sequence[int]) -> list[int]:
        """Put ``self.wan`` in front of loopback ``targets``; return the ports that reach
        them. Each target gets its own link (one per direction), shared by all of its
        connections. ``cut_link()`` resets every connection through it. What each link
        delivers per 100 ms goes to ``wanseries.jsonl`` in the path's work directory (kept
        with ``--keep``)."""
        assert self.wan is not None
        ports = {free_port(): t for t in targets}
        argv = [sys.executable, "-m", "bench.delayproxy", *self.wan.proxy_args()]
        argv.append(f"--series={self.dir / 'wanseries.jsonl'}")
        argv += [f"{a}:{b}" for a, b in ports.items()]
        self.wan_proxy = self.spawn(argv, "wanproxy.log")
        for p in ports:
            _wait_alive(self.wan_proxy, p)
        return list(ports)

    def cut_link(self) -> None:
        """Reset (RST both ways) every connection through the WAN proxy, now."""
        assert self.wan_proxy is not None and self.wan_proxy.poll() is None
        os.kill(self.wan_proxy.pid, signal.SIGUSR1)

    def spawn(
        self, argv: Sequence[str], log: str, stdin: int | None = subprocess.DEVNULL
    ) -> subprocess.Popen[bytes]:
        """Start a forwarding process (logged to ``self.dir / log``) and record its command."""
        self.setup_commands.append(shlex.join(argv))
        return self.procs.spawn(argv, log=self.dir / log, stdin=stdin)


REGISTRY: dict[str, type[BenchPath]] = {}


def register(cls: type[BenchPath]) -> type[BenchPath]:
    """Class decorator: make a path selectable by ``--only NAME``."""
    if cls.name in REGISTRY:
        raise ValueError(f"duplicate bench path {cls.name!r}")
    REGISTRY[cls.name] = cls
    return cls


def load_paths() -> dict[str, type[BenchPath]]:
    """Import ``PATH_MODULES`` and return the registry, in registration order."""
    for mod in PATH_MODULES:
        importlib.import_module(mod)
    return REGISTRY


@register
class Direct(BenchPath):
    """Clients talk to nginx and the loopback servers directly: the ceiling."""

    name = "direct"
    title = "direct loopback"

    def start(self) -> None:
        self.http = HttpTarget(f"http://{LOOPBACK}:{self.ctx.nginx_port}")
        self.tcp = Endpoint(LOOPBACK, self.ctx.data_port)
        self.echo = Endpoint(LOOPBACK, self.ctx.echo_port)


@register
class Delay(BenchPath):
    """Direct, through ``bench.delayproxy`` adding 50 ms each way (100 ms RTT).

    Its single-stream throughput is the capacity of the delay path itself, so tunnel paths
    run over the same proxy can be reported as a share of it.
    """

    name = "delay-100ms"
    title = "direct via delay proxy (50 ms each way)"
    connect_count = 50
    #: Only with ``--only``: the ``*-wan-*`` paths measure the far agent with a bandwidth cap.
    default = False
    delay_ms: ClassVar[float] = 50.0

    def start(self) -> None:
        web, data, echo = self.start_delay_proxy(
            [self.ctx.nginx_port, self.ctx.data_port, self.ctx.echo_port], self.delay_ms
        )
        self.http = HttpTarget(f"http://{LOOPBACK}:{web}")
        self.tcp = Endpoint(LOOPBACK, data)
        self.echo = Endpoint(LOOPBACK, echo)


class _WanDirect(BenchPath):
    """The data server through the WAN proxy alone: the link's own capacity (~97 % of the
    cap is what the shaper lets a TCP download reach), the reference for every path over
    the same link. The proxy's CPU is what is charged."""

    def start(self) -> None:
        (data,) = self.start_wan_proxy([self.ctx.data_port])
        self.tcp = Endpoint(LOOPBACK, data)

    def pids(self) -> list[int]:
        return self.procs.pids


for _wan in WANS:
    register(
        type(
            f"WanDirect_{_wan.tag}",
            (_WanDirect,),
            {
                "name": f"wan-{_wan.tag}",
                "title": f"direct via WAN proxy ({_wan.rtt_ms:g} ms RTT, "
                f"{_wan.rate_mbps:g} Mbit/s)",
                "wan": _wan,
            },
        )
    )


def _wait_alive(proc: subprocess.Popen[bytes], port: int, timeout: float = 10.0) -> None:
    if proc.poll() is not None:
        raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
    wait_port(port, timeout=timeout)


def wait_json_line(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> dict[str, object]:
    """Read one JSON line from a process started with ``stdout=PIPE``."""
    return json_line(proc, repr(proc.args), timeout)
