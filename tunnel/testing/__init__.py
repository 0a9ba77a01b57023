"""
Tools for testing code that uses tunnels:

- `local_relay` (plain code) and `start_local_relay` (Twisted): a development relay in the
  test's own process, on a loopback port, that ``tunnel.forward`` / ``tunnel.client.forward``
  use as they would a real one — no network, no other process;
- `RelayProcess` and `AgentProcess`: real relay and agent daemons as child processes on
  loopback, waited for through their admin endpoints;
- `CutProxy`: a loopback TCP proxy that can cut every connection through it at once, to test
  how code behaves when its link drops.
"""

from tunnel.testing._cutproxy import CutProxy
from tunnel.testing._daemons import (
    AgentProcess,
    DaemonError,
    RelayProcess,
    TunnelInfo,
)
from tunnel.testing._local import LocalRelay, local_relay, start_local_relay

__all__ = [
    "AgentProcess",
    "CutProxy",
    "DaemonError",
    "LocalRelay",
    "RelayProcess",
    "TunnelInfo",
    "local_relay",
    "start_local_relay",
]
