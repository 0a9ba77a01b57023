"""Our own paths: ``twistd tunnelrelay`` + ``twistd tunnelagent`` on loopback.

* ``tunnel-tls``: public clients speak TLS to the relay, routed by SNI to a tunnel per server
  (the same job as HAProxy TLS → ``ssh -R``). Also measures ``forward()`` to URL, warm and
  cold, and RSS per idle connection at relay and agent.
* ``tunnel-tcp``: raw TCP ports at the relay (the same job as ``ssh -R``).
* ``tunnel-tcp-100ms``: the raw TCP path with 50 ms added each way between agent and relay,
  so the link itself has a 100 ms round trip: what auto-tuned windows are for. Compare its
  single stream with ``delay-100ms`` (the delay path's own capacity).
* ``tunnel-tcp-wan-*``, ``tunnel-tls-wan-*``: the agent's link crosses an emulated WAN
  (``bench.paths.WANS``: a delay and a bandwidth cap); one and eight streams as a share of
  the cap, and the time from a cut of the link until the same URL serves again.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from typing import ClassVar

from bench import coldstart
from bench.paths import WANS, BenchPath, Endpoint, HttpTarget, register
from bench.util import LOOPBACK, free_port, rss_bytes
from tunnel.testing._daemons import AgentProcess, RelayProcess

# As many descriptors as the hard limit allows: 10,000 idle connections need ~20,000.
_HARD = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
_NOFILE = f"--nofile={_HARD}:{_HARD}" if _HARD != resource.RLIM_INFINITY else "--nofile=65536"


class _Tunnel(BenchPath):
    """Relay and agent forwarding the run's nginx, data and echo servers."""

    unencrypted: ClassVar[bool] = False
    link_delay_ms: ClassVar[float | None] = None
    #: --max-window (MiB) for relay and agent; None: the default (16 MiB).
    max_window_mib: ClassVar[int | None] = None

    def start(self) -> None:
        self.state = self.dir / "relay-state"
        low = 21000 + (free_port() % 10) * 1000  # below the ephemeral range
        self.relay = RelayProcess.start(
            self.dir / "relay.log",
            state_dir=self.state,
            tcp_ports=(low, low + 999),
            listen_options=":backlog=4096",
            extra=[
                "--max-connections-per-tunnel", "20000", "--max-streams-per-link", "20000",
                "--max-pending-handshakes", "20000", "--max-pending-per-source", "20000",
                "--max-connections-per-source", "20000", "--max-streams-per-token", "20000",
                "--drain-grace", "1",
                *self._window_args(),
            ],
            prefix=["prlimit", _NOFILE],
        )  # fmt: skip
        self.procs.procs.append(self.relay.popen)
        self.relay_port = self.relay.port
        self.ca = str(self.relay.ca)
        link_port = self.relay_port
        if self.wan is not None:
            link_port = self.start_wan_proxy([self.relay_port])[0]
        elif self.link_delay_ms is not None:
            link_port = self.start_delay_proxy([self.relay_port], self.link_delay_ms)[0]
        suffix = ":tcp" if self.unencrypted else ""
        targets = [self.ctx.nginx_port, self.ctx.data_port, self.ctx.echo_port]
        self.agent = AgentProcess(
            self.dir / "agent.log",
            relay=f"localhost:{link_port}",
            ca=self.relay.ca,
            forwards=[f"{t}{suffix}" for t in targets],
            extra=self._window_args(),
            prefix=["prlimit", _NOFILE],
        )
        self.procs.procs.append(self.agent.popen)
        web, data, echo = (self.agent.tunnel(f"{LOOPBACK}:{t}", timeout=30) for t in targets)
        ca = self.ca
        if self.unencrypted:
            assert web.tcp_port and data.tcp_port and echo.tcp_port
            self.http = HttpTarget(f"http://{LOOPBACK}:{web.tcp_port}")
            self.tcp = Endpoint(LOOPBACK, data.tcp_port)
            self.echo = Endpoint(LOOPBACK, echo.tcp_port)
        else:
            self.http = HttpTarget(f"https://{web.host}:{self.relay_port}", cafile=ca)
            self.tcp = Endpoint(LOOPBACK, self.relay_port, sni=data.host, cafile=ca)
            self.echo = Endpoint(LOOPBACK, self.relay_port, sni=echo.host, cafile=ca)

    def roles(self) -> dict[str, list[int]]:
        return {"relay": [self.relay.pid], "agent": [self.agent.pid]}

    def _window_args(self) -> list[str]:
        if self.max_window_mib is None:
            return []
        return ["--max-window", str(self.max_window_mib)]


@register
class TunnelTls(_Tunnel):
    """Tunnels, TLS by SNI at the relay (like HAProxy TLS → ``ssh -R``)."""

    name = "tunnel-tls"
    title = "Tunnels TLS (tunnelrelay + tunnelagent)"

    def extra(self, runs: int) -> dict[str, tuple[str, list[float]]]:
        out: dict[str, tuple[str, list[float]]] = {}
        count = 20 if self.ctx.quick else 100
        timing = _run_json(
            [
                sys.executable, "-m", "bench.tunnelprobe", "forward",
                "--relay", f"localhost:{self.relay_port}", "--ca", self.ca,
                "--port", str(self.ctx.nginx_port), "--count", str(count),
            ],
            timeout=120,
        )  # fmt: skip
        for kind in ("warm", "cold"):
            samples = sorted(timing[kind])
            out[f"forward_{kind}_p50_ms"] = ("ms", [_pct(samples, 0.5)])
            out[f"forward_{kind}_p99_ms"] = ("ms", [_pct(samples, 0.99)])
        idle = 1000 if self.ctx.quick else 10000
        out.update(self._idle_rss(idle))
        out.update(self._cold_start(10 if self.ctx.quick else 50))
        return out

    def _cold_start(self, count: int) -> dict[str, tuple[str, list[float]]]:
        """``python -m bench.coldstart`` against this relay: fresh processes to a URL."""
        argv = [
            sys.executable, "-m", "bench.coldstart", "--json", "--count", str(count),
            "--relay", f"localhost:{self.relay_port}", "--ca", self.ca,
        ]  # fmt: skip
        p = subprocess.run(argv, capture_output=True, text=True, timeout=60 + count * 5)
        if p.returncode:
            raise RuntimeError(
                f"bench.coldstart failed: {(p.stderr or p.stdout)[-400:]}{self._refusals()}"
            )
        summary = json.loads(p.stdout.strip().splitlines()[-1])
        self.reports["coldstart.md"] = coldstart.markdown(summary)
        out: dict[str, tuple[str, list[float]]] = {}
        for phase in ("total", "import", "first_forward", "later_forward"):
            st = summary["phases"][phase]
            out[f"coldstart_{phase}_p50_ms"] = ("ms", [st["p50_ms"]])
            out[f"coldstart_{phase}_p99_ms"] = ("ms", [st["p99_ms"]])
        return out

    def _refusals(self) -> str:
        """The relay log's lines about refused sources (the reset guard, the rate limits),
        the last five, for an error message: why the relay turned a bench client away."""
        try:
            text = (self.dir / "relay.log").read_text(errors="replace")
        except OSError:
            return ""
        lines = [ln for ln in text.splitlines() if "refus" in ln or "resets" in ln][-5:]
        return "\nrelay log:\n" + "\n".join(lines) if lines else ""

    def _idle_rss(self, count: int) -> dict[str, tuple[str, list[float]]]:
        """RSS per idle TLS connection at the relay and per idle stream at the agent."""
        assert self.echo is not None and self.echo.sni is not None
        relay_pid, agent_pid = self.relay.pid, self.agent.pid
        before = rss_bytes([relay_pid]), rss_bytes([agent_pid])
        holder = subprocess.Popen(
            [
                "prlimit", _NOFILE, sys.executable, "-m", "bench.tunnelprobe", "hold",
                "--port", str(self.relay_port), "--sni", self.echo.sni, "--ca", self.ca,
                "--count", str(count),
            ],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            assert holder.stdout is not None
            line = holder.stdout.readline()
            if not line:
                raise RuntimeError("the idle-connection holder exited")
            held = json.loads(line)["held"]
            time.sleep(1.0)  # let both processes settle before reading RSS
            after = rss_bytes([relay_pid]), rss_bytes([agent_pid])
        finally:
            if holder.stdin:
                holder.stdin.close()
            try:
                holder.wait(60)
            except subprocess.TimeoutExpired:
                holder.kill()
        return {
            "idle_connections": ("count", [float(held)]),
            "relay_rss_per_idle_conn_KiB": ("KiB", [(after[0] - before[0]) / held / 1024]),
            "agent_rss_per_idle_stream_KiB": ("KiB", [(after[1] - before[1]) / held / 1024]),
        }


@register
class TunnelTcp(_Tunnel):
    """Tunnels, raw TCP ports at the relay (like ``ssh -R``)."""

    name = "tunnel-tcp"
    title = "Tunnels raw TCP (tunnelrelay + tunnelagent)"
    unencrypted = True


@register
class TunnelTcpDelay(_Tunnel):
    """Raw TCP tunnel with a 100 ms round trip on the agent's link."""

    name = "tunnel-tcp-100ms"
    title = "Tunnels raw TCP, 100 ms RTT agent-relay"
    unencrypted = True
    link_delay_ms = 50.0
    connect_count = 50
    #: Only with ``--only``: the ``*-wan-*`` paths measure the far agent with a bandwidth cap.
    default = False

    def start(self) -> None:
        super().start()
        # Only the throughput of one stream matters here.
        self.http = None


@register
class TunnelTcpDelayWide(TunnelTcpDelay):
    """The 100 ms path with windows allowed to grow to 64 MiB (``--max-window 64``)."""

    name = "tunnel-tcp-100ms-64M"
    title = "Tunnels raw TCP, 100 ms RTT, --max-window 64"
    max_window_mib = 64


class _TunnelWan(_Tunnel):
    """A tunnel whose agent is across ``wan`` from its relay (the shaped proxy sits on the
    agent's link), measured with one and eight downloads and with link cuts."""

    cuttable = True

    def start(self) -> None:
        super().start()
        self.http = None


for _wan in WANS:
    for _base, _kind in ((TunnelTcp, "raw TCP"), (TunnelTls, "TLS")):
        register(
            type(
                f"{_base.__name__}Wan_{_wan.tag}",
                (_TunnelWan,),
                {
                    "name": f"{_base.name}-wan-{_wan.tag}",
                    "title": f"Tunnels {_kind}, agent link over {_wan.rtt_ms:g} ms / "
                    f"{_wan.rate_mbps:g} Mbit/s",
                    "unencrypted": _base.unencrypted,
                    "wan": _wan,
                },
            )
        )


def _pct(xs: list[float], q: float) -> float:
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def _run_json(argv: list[str], timeout: float) -> dict[str, list[float]]:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if p.returncode:
        raise RuntimeError(f"{argv[2:4]} failed: {(p.stderr or p.stdout)[-400:]}")
    out: dict[str, list[float]] = json.loads(p.stdout.strip().splitlines()[-1])
    return out
