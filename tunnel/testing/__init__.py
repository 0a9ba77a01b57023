"""
Tools for testing code that uses tunnels: real relay and agent daemons started as child
processes on loopback, and waited for through their admin endpoints.
"""

from tunnel.testing._daemons import (
    AgentProcess,
    DaemonError,
    RelayProcess,
    TunnelInfo,
)

__all__ = ["AgentProcess", "DaemonError", "RelayProcess", "TunnelInfo"]
