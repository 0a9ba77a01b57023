"""
Errors that the public API raises.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "RelayUnavailable",
    "TunnelClosedError",
    "TunnelError",
    "TunnelRefused",
]


class TunnelError(Exception):
    """
    Base class of every error of the Tunnels API.
    """


class RelayUnavailable(TunnelError):
    """
    The relay could not be reached, or its certificate was not trusted, in time.
    """


class AuthenticationError(TunnelError):
    """
    The relay refused the agent's token.
    """


class TunnelRefused(TunnelError):
    """
    The relay refused to grant a tunnel (a limit, no free TCP port, a bad reclaim).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} ({code})")
        #: The relay's machine-readable reason.
        self.code = code


class TunnelClosedError(TunnelError):
    """
    The tunnel was closed (by the caller, or by the relay) before the operation completed.
    """
