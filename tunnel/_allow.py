"""
Client allow and deny lists: which public client addresses may reach a tunnel.

Sans-IO and shared: the agent checks a list before asking for it, the relay parses it again
from the request (never trusting the agent's check) and admits or refuses each connection.
A tunnel may have both; the deny list wins.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

__all__ = ["MAX_ENTRIES", "AllowList", "DenyList"]

#: Networks a list may hold.
MAX_ENTRIES = 64

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class AllowList:
    """
    Networks (``203.0.113.0/24``, ``2001:db8::/32``, or single addresses) whose clients may
    connect. IPv4 clients seen as IPv4-mapped IPv6 addresses match IPv4 networks.
    """

    __slots__ = ("networks",)

    #: What a list is called in messages.
    what = "an allow list"

    def __init__(self, networks: Iterable[_Network]) -> None:
        self.networks: tuple[_Network, ...] = tuple(networks)

    @classmethod
    def parse(cls, entries: object) -> AllowList:
        """
        From a list of strings, each a network or an address (host bits are allowed and
        ignored: ``10.1.2.3/8`` is ``10.0.0.0/8``).

        @raise ValueError: not a non-empty list of at most `MAX_ENTRIES` such strings; the
            message names the bad entry.
        """
        if isinstance(entries, str) or not isinstance(entries, list | tuple):
            raise ValueError(f"{cls.what} is a list of networks")
        if not entries:
            raise ValueError(f"{cls.what} needs at least one network")
        if len(entries) > MAX_ENTRIES:
            raise ValueError(f"{cls.what} holds at most {MAX_ENTRIES} networks")
        networks = []
        for entry in entries:
            if not isinstance(entry, str):
                raise ValueError(f"{entry!r} is not a network")
            try:
                networks.append(ipaddress.ip_network(entry.strip(), strict=False))
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP network or address") from None
        return cls(networks)

    def contains(self, host: str) -> bool | None:
        """
        Whether `host` (an IP address as the relay saw it) is in one of the networks; None
        when it is not an IP address.
        """
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return None
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)

    def admits(self, host: str) -> bool:
        """
        Whether a client at `host` (an IP address as the relay saw it) may connect; anything
        that is not an IP address is refused.
        """
        return self.contains(host) is True

    def entries(self) -> list[str]:
        """
        The networks as strings, as a request carries them.
        """
        return [str(n) for n in self.networks]

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.networks == self.networks

    def __hash__(self) -> int:
        return hash(self.networks)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.entries()!r})"


class DenyList(AllowList):
    """
    Networks whose clients may not connect, whatever the allow list says. IPv4 clients
    seen as IPv4-mapped IPv6 addresses match IPv4 networks; anything that is not an IP
    address is refused (it cannot be shown not to be listed).
    """

    __slots__ = ()

    what = "a deny list"

    def admits(self, host: str) -> bool:
        return self.contains(host) is False
