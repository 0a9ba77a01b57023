"""
What the relay is told at start (`RelayConfig`), and the constants of its bounds.

Sans-IO: plain values, read by the relay's state (`_state`), its control core (`_control`)
and its adapters.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from tunnel._signedtokens import TokenVerifier
from tunnel.relay._tokens import RevokedFile, TokenFile
from tunnel.wire import LinkSettings

__all__ = [
    "POOL_REFUSED_PAUSE",
    "RATE_STRIKES",
    "RECLAIM_PROBE_TIMEOUT",
    "REFUSALS",
    "RESET_HOLD",
    "TOKENS_CHECK_INTERVAL",
    "RelayConfig",
    "parse_port_range",
]

#: Seconds between checks of the tokens file for changes.
TOKENS_CHECK_INTERVAL = 2.0

#: Seconds a link holding a tunnel that another link reclaims has to answer a ping before it
#: loses the tunnel (a stale session: the agent reconnected before the old link was found
#: dead). A holder that answers keeps it, and the reclaim is refused.
RECLAIM_PROBE_TIMEOUT = 1.0

#: Seconds a pool member whose local target refused a connection stays out of rotation
#: (unless one of its connections succeeds sooner).
POOL_REFUSED_PAUSE = 5.0

#: Reasons of refusals counted in `Relay.refused` (and shown as ``refused_<reason>``).
REFUSALS = (
    "connections_per_tunnel",
    "connections_per_source",
    "streams_per_link",
    "streams_per_token",
    "tunnel_requests_rate",
    "links_per_token",
    "resets_per_source",
)

#: Seconds a public source that reset its connections faster than `source_reset_rate`
#: (after `source_reset_burst`) has its new connections refused.
RESET_HOLD = 10.0

#: A link refused this many tunnel requests for their rate (refilled at one per second)
#: that goes on asking is ended with GOAWAY ENHANCE_YOUR_CALM.
RATE_STRIKES = 32


@dataclass
class RelayConfig:
    """
    Everything the relay is told at start.
    """

    #: Tunnels are ``<id>.<domain>``; agents connect to ``<domain>``.
    domain: str
    #: The port public clients use for TLS, written into URLs (0: the listening port).
    public_port: int = 443
    #: The range raw TCP tunnels take their ports from, inclusive.
    tcp_ports: tuple[int, int] = (20000, 29999)
    #: The address raw TCP listeners bind to ("" for all).
    tcp_interface: str = ""
    #: Accepted agent tokens (a mapping gives the names each may hold; a plain collection:
    #: random ids only); None: none from a file. With no `token_verifier` either, any
    #: agent is accepted, and may hold any name.
    tokens: Collection[str] | None = None
    #: The file `tokens` came from, watched for changes (None: they never change).
    tokens_file: TokenFile | None = None
    #: The keys of signed tokens (``--token-key``); None: no signed tokens.
    token_verifier: TokenVerifier | None = None
    #: Revoked subjects and token ids of signed tokens, and the file they came from.
    revoked: frozenset[str] = frozenset()
    revoked_file: RevokedFile | None = None
    #: Seconds a public TLS handshake (or an agent's hello) may take.
    handshake_timeout: float = 10.0
    #: Seconds from accept until the whole ClientHello has arrived (at most the above).
    client_hello_timeout: float = 3.0
    #: TLS handshakes in progress at once; more are refused at accept.
    max_pending_handshakes: int = 1024
    #: Of those, from one source (an IPv4 address or an IPv6 /64).
    max_pending_per_source: int = 256
    #: Tunnels one agent link may hold.
    max_tunnels_per_agent: int = 64
    #: Streams open on one link at once (public connections through one agent).
    max_streams_per_link: int = 4096
    #: Public connections open through one tunnel at once.
    max_connections_per_tunnel: int = 1024
    #: Of those, from one source (an IPv4 address or an IPv6 /64).
    max_connections_per_source: int = 256
    #: Public connections of one source (an IPv4 address or an IPv6 /64) that may end in a
    #: reset (the client's TCP RST, or an error), per second over all tunnels, and the burst
    #: above it; past it the source's new connections are refused for `RESET_HOLD`.
    source_reset_rate: float = 100.0
    source_reset_burst: int = 1000
    #: Authenticated links of one principal (a token, or a source without tokens).
    max_links_per_token: int = 256
    #: Streams open at once over all the links of one principal.
    max_streams_per_token: int = 16384
    #: Tunnel requests of one link: per second, and the burst allowed at once.
    tunnel_request_rate: float = 10.0
    tunnel_request_burst: int = 128
    #: Tunnel requests of one principal over all its links: per second, and burst.
    token_request_rate: float = 50.0
    token_request_burst: int = 1024
    #: The fraction of the TCP range one principal may have in quarantine.
    port_quarantine_share: float = 0.1
    #: The most octets per second a tunnel may carry in each direction (a tunnel without a
    #: rate limit of its own gets it; a higher one is lowered to it); None: no ceiling.
    max_rate: int | None = None
    #: Seconds a public connection may go without traffic in either direction; None = never.
    idle_timeout: float | None = None
    #: Keepalive of agent links.
    keepalive_interval: float = 5.0
    keepalive_timeout: float = 15.0
    #: Seconds in-flight streams may run on after a stop signal.
    drain_grace: float = 30.0
    #: Seconds a released TCP port waits before a different tunnel may take it.
    port_quarantine: float = 300.0
    #: Link settings of the relay's end.
    link: LinkSettings = field(default_factory=LinkSettings)


def parse_port_range(text: str) -> tuple[int, int]:
    """
    Parse ``LOW-HIGH`` (or a single port).

    @raise ValueError: not a valid range.
    """
    low, _, high = text.partition("-")
    lo, hi = int(low), int(high or low)
    if not 1 <= lo <= hi <= 65535:
        raise ValueError(f"bad port range {text!r}")
    return lo, hi
