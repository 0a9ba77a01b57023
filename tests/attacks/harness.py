"""
The attack suite's world: a relay process (with its admin endpoint), a local HTTP server and
a legitimate agent forwarding it, plus measurements of the relay process (RSS, descriptors)
and a check that a legitimate client still gets through.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from tests.e2e.harness import wait_for
from tests.e2e.reliability_harness import (
    AgentProc,
    Endpoint,
    Group,
    LocalServer,
    RelayProc,
    curl,
    http_handler,
)

__all__ = ["AttackWorld", "Usage", "usage"]


@dataclass(frozen=True)
class Usage:
    """A process's resident memory and open descriptors at one moment."""

    rss_kib: int
    fds: int


def usage(pid: int) -> Usage:
    """The RSS (``VmRSS``) and descriptor count of process `pid`, from /proc."""
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return Usage(rss, len(os.listdir(f"/proc/{pid}/fd")))


@dataclass
class AttackWorld:
    """
    A relay with `extra` options, a local HTTP server, and a legitimate agent (with `token`)
    forwarding it through a TLS tunnel.
    """

    group: Group
    extra: Sequence[str] = ()
    token: str | None = None
    relay: RelayProc = field(init=False)
    server: LocalServer = field(init=False)
    agent: AgentProc = field(init=False)
    tunnel: Endpoint = field(init=False)
    baseline: Usage = field(init=False)

    def __post_init__(self) -> None:
        self.relay = self.group.relay(*self.extra)
        self.server = LocalServer(http_handler)
        self.group.cleanups.append(self.server.close)
        self.agent = self.start_agent([str(self.server.port)], token=self.token)
        self.tunnel = self.agent.ready(self.server.port)
        self.assert_serves()
        self.baseline = self.usage()

    def start_agent(self, forwards: Sequence[str], token: str | None = None) -> AgentProc:
        """Another legitimate agent process on the relay."""
        return self.group.agent(self.relay, forwards, token=token)

    def usage(self) -> Usage:
        return usage(self.relay.pid)

    def serves(self, timeout: float = 10.0) -> bool:
        """Whether a legitimate curl through the tunnel gets the server's answer."""
        result = curl(self.relay, self.tunnel, timeout=timeout)
        return result.returncode == 0 and result.stdout == b"ok\n"

    def assert_serves(self, timeout: float = 10.0) -> None:
        result = curl(self.relay, self.tunnel, timeout=timeout)
        assert result.returncode == 0 and result.stdout == b"ok\n", (
            f"a legitimate client did not get through: curl exit {result.returncode}, "
            f"{result.stderr.decode(errors='replace')[-500:]}"
        )

    def assert_bounded(self, rss_growth_kib: int, fd_growth: int) -> Usage:
        """The relay's RSS and descriptors now are within the given growth of the baseline."""
        now = self.usage()
        assert now.rss_kib - self.baseline.rss_kib <= rss_growth_kib, (
            f"relay RSS grew {now.rss_kib - self.baseline.rss_kib} KiB "
            f"(bound {rss_growth_kib}): {self.baseline} -> {now}"
        )
        assert now.fds - self.baseline.fds <= fd_growth, (
            f"relay descriptors grew {now.fds - self.baseline.fds} (bound {fd_growth}): "
            f"{self.baseline} -> {now}"
        )
        return now

    def wait_fds_back(self, slack: int = 8, timeout: float = 20.0) -> Usage:
        """Wait until the relay's descriptors are back within `slack` of the baseline."""
        wait_for(
            lambda: self.usage().fds <= self.baseline.fds + slack,
            f"relay descriptors back near {self.baseline.fds}",
            timeout,
        )
        return self.usage()

    def log(self) -> str:
        assert self.relay.proc is not None
        return self.relay.proc.text()
