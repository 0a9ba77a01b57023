"""
The relay's control plane for one agent link, sans-IO: hello and authentication, links per
principal, tunnel requests (rates, grant through the options table, reclaim with its probe
of a live holder), tunnel close, token revocation and drain.

Inputs (control messages from the agent, the adapter's events, the clock through the
relay's buckets) go in through one method each; each returns the `Effect`s the adapter
(`tunnel.relay._link.RelayLink`) carries out. The link's states and what each input does in
each are the table `TRANSITIONS`, in the style of `tunnel.wire.mux` and the agent's
`tunnel.agent._control`. A message from the agent that is not in the table is a protocol
error, answered with its code (before hello: ``unauthorized``, "the first control message
must be hello") and the end of the link; an input from the adapter that is not in it is a
`LocalProtocolError`.

What is relay-wide (the registry, the port pool, the per-principal shares, the reclaim key,
the tokens) stays in the relay's state (`tunnel.relay._state.Relay`), which the core
consults; it opens TCP listeners and builds TLS contexts for the core (`listen_tcp`,
`client_context`), and closes tunnels (`close_tunnel`). The decision on one tunnel request
(rates, grant, reclaim) is `_grant`'s.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING, Any

from tunnel import __version__
from tunnel.relay import _grant, _issuer
from tunnel.relay._auth import ANYONE, Permit
from tunnel.relay._effects import AcceptPeer, Effect, GoAway, Send, log
from tunnel.relay._shares import TokenBucket
from tunnel.relay.config import RATE_STRIKES
from tunnel.relay.registry import TunnelRecord
from tunnel.wire import options as tunnel_options
from tunnel.wire.codes import ErrorReason
from tunnel.wire.control import (
    AgentHello,
    CertificateRequest,
    ControlMessage,
    ErrorMessage,
    RelayWelcome,
    TunnelClose,
    TunnelClosed,
    TunnelRequest,
)
from tunnel.wire.errors import ErrorCode, LocalProtocolError

if TYPE_CHECKING:
    from tunnel.relay._state import Relay

__all__ = ["FEATURES", "TRANSITIONS", "Input", "LinkState", "RelaySession"]

#: Features this relay supports that are not tunnel options (none yet), announced beside
#: the options it enforces.
_OTHER_FEATURES: tuple[str, ...] = ()
#: Announced by a relay with a certificate issuer: it answers ``certificate_request``.
CERTIFICATES = "certificates"

#: What this relay supports beyond the first release (`RelayWelcome.features`): the
#: feature of every tunnel option that has one (it enforces them all: the restricting ones
#: first), then the others.
FEATURES: tuple[str, ...] = (
    *(o.feature for o in tunnel_options.OPTIONS if o.restricts and o.feature),
    *(o.feature for o in tunnel_options.OPTIONS if not o.restricts and o.feature),
    *_OTHER_FEATURES,
)


class LinkState(Enum):
    """
    The relay's session with one agent link.
    """

    #: Connected; no hello yet. Only a hello may come (the handshake timeout bounds it).
    AWAITING_HELLO = "awaiting_hello"
    #: The hello was accepted: requests and closes are answered.
    ACCEPTED = "accepted"
    #: The relay is draining (GOAWAY NO_ERROR sent): requests are refused with ``draining``.
    DRAINING = "draining"
    #: Refused (its ``error`` sent, its GOAWAY sent or about to be): input is ignored.
    ENDING = "ending"
    #: The link is gone.
    CLOSED = "closed"


class Input(Enum):
    """
    What can happen to the session.
    """

    HELLO = "hello"  # a hello, accepted (or a later one, ignored)
    HELLO_REFUSED = "hello_refused"  # a hello with a wrong token, or one link too many
    REQUEST = "request"  # tunnel_request
    CERTIFICATE = "certificate"  # certificate_request
    CLOSE = "close"  # tunnel_close
    OTHER = "other"  # a known message the agent does not send (ignored once accepted)
    BAD_MESSAGE = "bad_message"  # a control message that does not decode
    HELLO_TIMEOUT = "hello_timeout"
    PROBE_ANSWERED = "probe_answered"  # the holder of a reclaimed tunnel answered
    PROBE_TIMED_OUT = "probe_timed_out"  # ... or did not, in time
    TOKEN_REVOKED = "token_revoked"
    DRAIN = "drain"
    LINK_LOST = "link_lost"


S, In = LinkState, Input

#: (state, input) → next state. A missing pair is a protocol error (see the module).
TRANSITIONS: dict[tuple[LinkState, Input], LinkState] = {
    (S.AWAITING_HELLO, In.HELLO): S.ACCEPTED,
    (S.AWAITING_HELLO, In.HELLO_REFUSED): S.ENDING,
    (S.AWAITING_HELLO, In.BAD_MESSAGE): S.ENDING,
    (S.AWAITING_HELLO, In.HELLO_TIMEOUT): S.ENDING,
    # GOAWAY NO_ERROR; a hello that still comes is answered, its requests with `draining`.
    (S.AWAITING_HELLO, In.DRAIN): S.AWAITING_HELLO,
    (S.ACCEPTED, In.HELLO): S.ACCEPTED,  # a second hello is ignored
    (S.ACCEPTED, In.REQUEST): S.ACCEPTED,
    (S.ACCEPTED, In.CERTIFICATE): S.ACCEPTED,
    (S.ACCEPTED, In.CLOSE): S.ACCEPTED,
    (S.ACCEPTED, In.OTHER): S.ACCEPTED,
    (S.ACCEPTED, In.BAD_MESSAGE): S.ENDING,
    (S.ACCEPTED, In.PROBE_ANSWERED): S.ACCEPTED,
    (S.ACCEPTED, In.PROBE_TIMED_OUT): S.ACCEPTED,
    (S.ACCEPTED, In.TOKEN_REVOKED): S.ENDING,
    (S.ACCEPTED, In.DRAIN): S.DRAINING,
    (S.DRAINING, In.HELLO): S.DRAINING,
    (S.DRAINING, In.REQUEST): S.DRAINING,  # refused: draining
    (S.DRAINING, In.CERTIFICATE): S.DRAINING,  # its tunnels live on until the link ends
    (S.DRAINING, In.CLOSE): S.DRAINING,
    (S.DRAINING, In.OTHER): S.DRAINING,
    (S.DRAINING, In.BAD_MESSAGE): S.ENDING,
    (S.DRAINING, In.PROBE_ANSWERED): S.DRAINING,  # decided afresh: draining
    (S.DRAINING, In.PROBE_TIMED_OUT): S.DRAINING,
    (S.DRAINING, In.TOKEN_REVOKED): S.ENDING,
    (S.DRAINING, In.DRAIN): S.DRAINING,
    # Refused or gone: what still arrives (or was pending) is dropped.
    **{(S.ENDING, i): S.ENDING for i in Input if i is not In.HELLO_REFUSED},
    **{(S.CLOSED, i): S.CLOSED for i in Input if i is not In.HELLO_REFUSED},
    **{(state, In.HELLO_TIMEOUT): state for state in (S.ACCEPTED, S.DRAINING)},  # a race
    **{(state, In.LINK_LOST): S.CLOSED for state in LinkState},
}

#: Inputs that come from the agent (the others come from the adapter or the relay).
_REMOTE = {In.HELLO, In.REQUEST, In.CERTIFICATE, In.CLOSE, In.OTHER}
#: States in which requests are answered.
_ANSWERING = {S.ACCEPTED, S.DRAINING}


class RelaySession:
    """
    The relay's control plane for one agent link, without I/O.

    @param relay: the relay's state, consulted for every relay-wide decision.
    @param owner: what the relay's registry records as the owner of this link's tunnels
        (the adapter; opaque here, except that it is the holder a `ProbeHolder` names).
    @param clock: seconds, for this link's request buckets.
    """

    def __init__(self, relay: Relay, owner: Any, clock: Callable[[], float]) -> None:
        config = relay.config
        self.relay = relay
        self.owner = owner
        self.state = LinkState.AWAITING_HELLO
        #: Whether a hello was accepted (it stays so once the link ends).
        self.authenticated = False
        #: The token it was accepted with (checked again when the tokens change).
        self.token: str | None = None
        #: What that token allows (the names it may hold, its expiry, its claims).
        self.permit: Permit = ANYONE
        self.peer_name = "?"
        #: Who the link acts for, the key of per-party bounds and of reclaim secrets:
        #: ``token:<digest>`` once accepted with a token of the tokens file,
        #: ``sub:<subject>`` with a signed token (one subject's tokens count as one), else
        #: ``addr:<source>`` (an IPv4 address or an IPv6 /64) of a relay that needs no token.
        self.principal = "?"
        #: Its tunnel requests, and its refusals for their rate (see `_requested`).
        self.requests = TokenBucket(config.tunnel_request_rate, config.tunnel_request_burst, clock)
        self.strikes = TokenBucket(1.0, RATE_STRIKES, clock)
        #: Reclaims waiting for the holder of their tunnel: probe → (request, record, holder).
        self._probes: dict[int, tuple[TunnelRequest, TunnelRecord, Any]] = {}
        self._probe_ids = itertools.count(1)

    def connected(self, peer_name: str, source: str) -> None:
        """
        Who is at the other end: `peer_name` for logs, `source` (an IPv4 address or an IPv6
        /64) for the principal of a link without a token.
        """
        self.peer_name = peer_name
        self.principal = "addr:" + source

    @property
    def reclaim_owner(self) -> str:
        """
        What the reclaim secrets of this link's tunnels bind: its token's identity, or ""
        on a relay that takes no tokens (an address would not do: an agent's may change
        between links).
        """
        return self.principal if self.principal.startswith(("token:", "sub:")) else ""

    @property
    def pending_reclaims(self) -> int:
        """
        Reclaims by this link waiting for the link that holds their tunnel to answer.
        """
        return len(self._probes)

    # -- the table ---------------------------------------------------------------------------

    def _move(self, event: Input) -> LinkState:
        next_state = TRANSITIONS.get((self.state, event))
        if next_state is None:
            if event in _REMOTE:
                raise _Violation(event)
            raise LocalProtocolError(f"{event.value} in state {self.state.value}")
        previous, self.state = self.state, next_state
        return previous

    def _violation(self, event: Input) -> list[Effect]:
        if self.state is LinkState.AWAITING_HELLO:
            reason, message, code = (
                ErrorReason.UNAUTHORIZED,
                "the first control message must be hello",
                ErrorCode.UNAUTHORIZED,
            )
        else:  # not reached with the table as it is: every message is answered once accepted
            reason, message, code = (
                ErrorReason.BAD_MESSAGE,
                f"unexpected {event.value} in state {self.state.value}",
                ErrorCode.PROTOCOL_ERROR,
            )
        self.state = LinkState.ENDING
        return _refusal(reason, message, code)

    # -- inputs ------------------------------------------------------------------------------

    def received(self, message: ControlMessage | None) -> list[Effect]:
        """
        A control message from the agent (None: one of a type this relay does not know,
        which is ignored).
        """
        if message is None:
            return []
        handler = _DISPATCH.get(type(message), RelaySession._other)
        try:
            return handler(self, message)
        except _Violation as e:
            return self._violation(e.event)

    def bad_message(self, error: str) -> list[Effect]:
        """
        A control message that does not decode (`error` says why): ``bad_message``, and the
        link ends with PROTOCOL_ERROR.
        """
        if self._move(Input.BAD_MESSAGE) not in (S.AWAITING_HELLO, *_ANSWERING):
            return []
        return [
            log(
                "warn",
                "malformed control message from {peer}: {e}",
                key="malformed-control",
                peer_fields=("e",),
                peer=self.peer_name,
                e=error,
            ),
            *_refusal(ErrorReason.BAD_MESSAGE, error, ErrorCode.PROTOCOL_ERROR),
        ]

    def hello_timed_out(self) -> list[Effect]:
        """
        The handshake time passed without a hello.
        """
        if self._move(Input.HELLO_TIMEOUT) is not S.AWAITING_HELLO:
            return []
        return [
            log(
                "warn",
                "agent link from {peer} sent no hello in time",
                key="hello-timeout",
                peer=self.peer_name,
            ),
            *_refusal(ErrorReason.TIMEOUT, "no hello in time", ErrorCode.TIMEOUT),
        ]

    def probe_answered(self, probe: int) -> list[Effect]:
        """
        The holder that `ProbeHolder` `probe` asked about answered: it keeps its tunnel.
        """
        return self._probed(probe, Input.PROBE_ANSWERED)

    def probe_timed_out(self, probe: int) -> list[Effect]:
        """
        The holder that `ProbeHolder` `probe` asked about did not answer in time (or its
        link ended): it loses its tunnel, and the reclaim is decided afresh.
        """
        return self._probed(probe, Input.PROBE_TIMED_OUT)

    def token_revoked(self, why: str = "revoked") -> list[Effect]:
        """
        The relay no longer accepts this link's token (`why`: revoked, expired, ...):
        ``unauthorized``, and the link ends (its tunnels close with it).
        """
        if self._move(Input.TOKEN_REVOKED) not in _ANSWERING:
            return []
        expired = why == "the token expired"
        return [
            log(
                "warn",
                "token of agent {peer} {what}; closing its link{why}",
                peer=self.peer_name,
                what="expired" if expired else "revoked",
                why="" if expired or why == "revoked" else f" ({why})",
            ),
            *_refusal(
                ErrorReason.UNAUTHORIZED,
                "the token expired" if expired else "the relay no longer accepts this token",
                ErrorCode.UNAUTHORIZED,
            ),
        ]

    def drain(self) -> list[Effect]:
        """
        The relay is shutting down: GOAWAY NO_ERROR, and nothing new is granted.
        """
        if self._move(Input.DRAIN) not in (S.AWAITING_HELLO, S.ACCEPTED):
            return []
        return [GoAway(ErrorCode.NO_ERROR, "relay shutting down")]

    def link_lost(self) -> list[Effect]:
        """
        The link ended: its tunnels go offline (and can be reclaimed), its place among its
        principal's links is freed, and reclaims it waited for are forgotten.
        """
        previous = self._move(Input.LINK_LOST)
        if previous is LinkState.CLOSED:
            return []
        self._probes.clear()
        relay = self.relay
        relay.principal_links.discard(self.principal, self.owner)
        for record in relay.registry.owned_by(self.owner):
            relay.leave_tunnel(record, self.owner, "link lost", notify=False)
        # The adapter holds the session: without this cycle it is freed as soon as it ends.
        self.owner = None
        if not self.authenticated:
            return []
        return [
            log(
                "info",
                "agent {peer} disconnected",
                key="agent-disconnected",
                limit=100,
                peer=self.peer_name,
            )
        ]

    # -- control messages --------------------------------------------------------------------

    def _hello(self, hello: AgentHello) -> list[Effect]:
        if self.state is not LinkState.AWAITING_HELLO:
            self._move(Input.HELLO)  # a later hello: ignored
            return []
        relay = self.relay
        config = relay.config
        permit = relay.authenticate(hello.token)
        if isinstance(permit, str):
            self._move(Input.HELLO_REFUSED)
            return [
                log(
                    "warn",
                    "refused agent {peer}: wrong token{why}",
                    key="wrong-token",
                    peer=self.peer_name,
                    why="" if permit == "wrong token" else f" ({permit})",
                ),
                *_refusal(
                    ErrorReason.UNAUTHORIZED,
                    "the relay does not accept this token",
                    ErrorCode.UNAUTHORIZED,
                ),
            ]
        principal = permit.principal or self.principal
        whose = "token" if permit.principal else "address"
        links = relay.principal_links.count(principal) + relay.elsewhere.links(principal)
        if links >= config.max_links_per_token:
            self._move(Input.HELLO_REFUSED)
            relay.refused["links_per_token"] += 1
            message = f"too many links with this {whose}: at most {config.max_links_per_token}"
            return [
                log(
                    "warn",
                    "refused agent {peer}: its {whose} has {n} links, the limit",
                    key="links-per-token",
                    peer=self.peer_name,
                    whose=whose,
                    n=config.max_links_per_token,
                ),
                Send(ErrorMessage(ErrorReason.LIMIT, message)),
                # ENHANCE_YOUR_CALM drops what is queued, so it follows once the error is
                # written; nothing more is read from the link meanwhile (ENDING).
                GoAway(ErrorCode.ENHANCE_YOUR_CALM, message, after_turn=True),
            ]
        self._move(Input.HELLO)
        self.authenticated = True
        self.token = hello.token
        self.permit = permit
        self.principal = principal
        relay.principal_links.add(principal, self.owner)
        return [
            AcceptPeer(),
            log(
                "info",
                "agent {peer} connected ({agent})",
                key="agent-connected",
                limit=100,
                peer_fields=("agent",),
                peer=self.peer_name,
                agent=hello.agent,
            ),
            Send(
                RelayWelcome(
                    domain=relay.domain,
                    public_port=config.public_port,
                    keepalive_interval=config.keepalive_interval,
                    keepalive_timeout=config.keepalive_timeout,
                    relay=f"tunnels/{__version__}",
                    features=[*FEATURES, *([CERTIFICATES] if relay.issuer else [])],
                )
            ),
        ]

    def _requested(self, request: TunnelRequest) -> list[Effect]:
        if self._move(Input.REQUEST) not in _ANSWERING:
            return []
        return _grant.requested(self, request)

    def _certificate(self, request: CertificateRequest) -> list[Effect]:
        if self._move(Input.CERTIFICATE) not in _ANSWERING:
            return []
        return _issuer.requested(self, request)

    def await_probe(self, request: TunnelRequest, existing: TunnelRecord) -> int:
        """
        Hold `request` (a reclaim of `existing`) until its holder is probed; the probe's id.
        """
        probe = next(self._probe_ids)
        self._probes[probe] = (request, existing, existing.owner)
        return probe

    def _probed(self, probe: int, event: Input) -> list[Effect]:
        previous = self._move(event)
        pending = self._probes.pop(probe, None)
        if pending is None or previous not in _ANSWERING:
            return []  # the reclaiming link is ending or gone: nobody to answer
        request, existing, holder = pending
        alive = event is Input.PROBE_ANSWERED
        return _grant.decide_reclaim(self, request, existing, holder, alive)

    def _closed(self, message: TunnelClose) -> list[Effect]:
        if self._move(Input.CLOSE) not in _ANSWERING:
            return []
        relay = self.relay
        record = relay.registry.get(message.tunnel_id)
        if record is None or record.member(self.owner) is None:
            return [Send(TunnelClosed(message.tunnel_id, "not held by this agent"))]
        # The owner is told (`TunnelClosed`) once the tunnel's port is really closed; a
        # member of a name's pool as soon as it has left it.
        relay.leave_tunnel(record, self.owner, "closed by the agent")
        return [log("info", "tunnel {id} closed by its agent", id=message.tunnel_id)]

    def _other(self, message: ControlMessage) -> list[Effect]:
        self._move(Input.OTHER)
        return []


class _Violation(Exception):
    """
    A message from the agent that the table does not allow in this state.
    """

    def __init__(self, event: Input) -> None:
        super().__init__(event.value)
        self.event = event


def _refusal(reason: ErrorReason, message: str, code: int) -> list[Effect]:
    """
    Tell the agent why (``error``), then end the link with GOAWAY `code`.
    """
    return [Send(ErrorMessage(reason, message)), GoAway(code, message)]


_DISPATCH: dict[type, Callable[[RelaySession, Any], list[Effect]]] = {
    AgentHello: RelaySession._hello,
    TunnelRequest: RelaySession._requested,
    CertificateRequest: RelaySession._certificate,
    TunnelClose: RelaySession._closed,
}
