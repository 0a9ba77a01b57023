"""
The agent's control plane, sans-IO: hello, requests and answers, reclaim after reconnect,
the relay's ``error`` and drain, and failover bookkeeping.

Inputs (link events, control messages from the relay, API calls, the clock) go in through
one method each; each returns the `Effect`s the adapter carries out (send a message, a
tunnel is ready, a forward failed, stop retrying, ...). The link's states and what each
input does in each are the table `TRANSITIONS`, in the style of `tunnel.wire.mux`; an input
that is not in it is a protocol error: `LocalProtocolError` for a misuse by the adapter,
and, for a control message the relay may not send in that state, a `Violation` effect (the
adapter ends the link with PROTOCOL_ERROR).

Each forward's reclaim data (tunnel id, secret, TCP port) is kept across links: the request
on the next link asks for the same tunnel back.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from enum import Enum
from typing import Any

from tunnel.agent._effects import (
    AbortStreams,
    CertificateAnswered,
    CloseConfirmed,
    Dial,
    Drain,
    Effect,
    Failed,
    Granted,
    LinkReady,
    Log,
    Send,
    StopDialing,
    StopRetrying,
    Violation,
)
from tunnel.agent.settings import ForwardSpec
from tunnel.errors import AuthenticationError, RelayUnavailable, TunnelError, TunnelRefused
from tunnel.wire import options as tunnel_options
from tunnel.wire.codes import ErrorReason, RefusalCode
from tunnel.wire.control import (
    MAX_CSR,
    AgentHello,
    CertificateIssued,
    CertificateRefused,
    CertificateRequest,
    ControlMessage,
    ErrorMessage,
    RelayWelcome,
    TunnelClose,
    TunnelClosed,
    TunnelGranted,
    TunnelRequest,
)
from tunnel.wire.control import TunnelRefused as TunnelRefusedMessage
from tunnel.wire.errors import LocalProtocolError

__all__ = [
    "CERTIFICATES",
    "TRANSITIONS",
    "AbortStreams",
    "AgentControl",
    "CertificateAnswered",
    "CloseConfirmed",
    "Dial",
    "Drain",
    "Effect",
    "Failed",
    "ForwardRecord",
    "Granted",
    "Input",
    "LinkReady",
    "Log",
    "Send",
    "SessionState",
    "StopDialing",
    "StopRetrying",
    "Violation",
]


class SessionState(Enum):
    """
    The agent's session with its relay.
    """

    #: Not connecting: before the first forward, or after `AgentControl.stop`.
    IDLE = "idle"
    #: Dialling a relay (the adapter's `ClientService` retries, with backoff).
    CONNECTING = "connecting"
    #: Connected; hello sent, no answer yet.
    HELLO_SENT = "hello_sent"
    #: The relay welcomed us: requests go out, answers come in.
    WELCOMED = "welcomed"
    #: The relay is draining (GOAWAY NO_ERROR): streams finish, then we reconnect elsewhere.
    DRAINING = "draining"
    #: The relay sent ``error`` (other than a refused token); the link is ending.
    ENDING = "ending"
    #: The relay refused the token: no retrying until the next forward.
    REFUSED = "refused"


class Input(Enum):
    """
    What can happen to the session.
    """

    START = "start"  # the first forward (or one after stop / refusal)
    CONNECTED = "connected"  # a link is up (TLS done)
    DIAL_FAILED = "dial_failed"  # a connection attempt failed
    WELCOME = "welcome"
    ANSWER = "answer"  # tunnel_granted or tunnel_refused
    CERTIFICATE = "certificate"  # certificate_issued or certificate_refused
    TUNNEL_CLOSED = "tunnel_closed"
    ERROR = "error"  # the relay's error message
    TOKEN_REFUSED = "token_refused"  # an error message with code `unauthorized`
    DRAIN = "drain"  # GOAWAY NO_ERROR
    LINK_LOST = "link_lost"
    STOP = "stop"


S, In = SessionState, Input

#: (state, input) → next state. Missing pairs are protocol errors.
TRANSITIONS: dict[tuple[SessionState, Input], SessionState] = {
    (S.IDLE, In.START): S.CONNECTING,
    (S.REFUSED, In.START): S.CONNECTING,
    (S.CONNECTING, In.CONNECTED): S.HELLO_SENT,
    (S.CONNECTING, In.DIAL_FAILED): S.CONNECTING,
    (S.CONNECTING, In.LINK_LOST): S.CONNECTING,  # lost before it was made: the dial failed
    (S.HELLO_SENT, In.WELCOME): S.WELCOMED,
    (S.HELLO_SENT, In.ERROR): S.ENDING,
    (S.HELLO_SENT, In.TOKEN_REFUSED): S.REFUSED,
    (S.HELLO_SENT, In.DRAIN): S.DRAINING,
    (S.HELLO_SENT, In.LINK_LOST): S.CONNECTING,  # a failed handshake: an attempt failed
    (S.WELCOMED, In.ANSWER): S.WELCOMED,
    (S.WELCOMED, In.CERTIFICATE): S.WELCOMED,
    (S.DRAINING, In.CERTIFICATE): S.DRAINING,
    (S.ENDING, In.CERTIFICATE): S.ENDING,
    (S.WELCOMED, In.TUNNEL_CLOSED): S.WELCOMED,
    (S.WELCOMED, In.ERROR): S.ENDING,
    (S.WELCOMED, In.TOKEN_REFUSED): S.REFUSED,  # a token revoked
    (S.WELCOMED, In.DRAIN): S.DRAINING,
    (S.WELCOMED, In.LINK_LOST): S.CONNECTING,  # reconnect, then reclaim
    (S.DRAINING, In.WELCOME): S.DRAINING,  # no requests on a draining link
    (S.DRAINING, In.ANSWER): S.DRAINING,
    (S.DRAINING, In.TUNNEL_CLOSED): S.DRAINING,
    (S.DRAINING, In.ERROR): S.ENDING,
    (S.DRAINING, In.TOKEN_REFUSED): S.REFUSED,
    (S.DRAINING, In.LINK_LOST): S.CONNECTING,  # to the next relay
    (S.ENDING, In.ANSWER): S.ENDING,
    (S.ENDING, In.TUNNEL_CLOSED): S.ENDING,
    (S.ENDING, In.LINK_LOST): S.CONNECTING,
    # Refused or stopped: what the ending link still delivers is dropped.
    **{(S.REFUSED, i): S.REFUSED for i in Input if i not in (In.START, In.STOP)},
    **{(S.IDLE, i): S.IDLE for i in Input if i is not In.START},
    **{(state, In.STOP): S.IDLE for state in SessionState},
}

#: Inputs that come from the relay (the others come from the adapter).
_REMOTE = {
    In.WELCOME,
    In.ANSWER,
    In.CERTIFICATE,
    In.TUNNEL_CLOSED,
    In.ERROR,
    In.TOKEN_REFUSED,
    In.DRAIN,
}
#: The feature of a relay that answers ``certificate_request``.
CERTIFICATES = "certificates"
#: States with a link the relay welcomed.
_LINKED = {SessionState.WELCOMED, SessionState.DRAINING}


# -- the core -------------------------------------------------------------------------------


class ForwardRecord:
    """
    The agent's record of one forward: what was asked, and what the relay granted (kept
    across links, for reclaim).
    """

    def __init__(self, spec: ForwardSpec) -> None:
        self.spec = spec
        self.tunnel_id: str | None = None
        self.secret: str | None = None
        self.tcp_port: int | None = None
        #: The last grant, or None.
        self.granted: TunnelGranted | None = None
        #: A caller waits for the first grant until this time (the clock's), or None.
        self.deadline: float | None = None
        self.closed = False

    @property
    def waiting(self) -> bool:
        return self.deadline is not None


class AgentControl:
    """
    The agent's session with its relays, without I/O.

    @param relays: how many relays there are (the adapter dials ``relay_index % relays``).
    @param fail_fast: fail waiting forwards as soon as an attempt fails (the API); otherwise
        they wait for their deadline (the daemon retries forever).
    """

    def __init__(
        self,
        *,
        token: str | None,
        agent_name: str,
        version: int,
        connect_timeout: float = 10.0,
        fail_fast: bool = True,
        describe_relays: Callable[[], str] = lambda: "?",
    ) -> None:
        self.state = SessionState.IDLE
        self.token = token
        self.agent_name = agent_name
        self.version = version
        self.connect_timeout = connect_timeout
        self.fail_fast = fail_fast
        self.describe_relays = describe_relays
        self.forwards: list[ForwardRecord] = []
        self.welcome: RelayWelcome | None = None
        #: Advanced on each failed attempt and each drain: failover to the next relay.
        self.relay_index = 0
        self.last_error: str | None = None
        self._requests: dict[int, ForwardRecord] = {}
        #: Certificate requests waiting for an answer: request id → the adapter's waiter.
        self._certificates: dict[int, Any] = {}
        self._request_ids = itertools.count(1)
        self._closing: set[str] = set()

    # -- the table ---------------------------------------------------------------------------

    def _move(self, event: Input) -> SessionState:
        next_state = TRANSITIONS.get((self.state, event))
        if next_state is None:
            if event in _REMOTE:
                raise _Remote(f"{event.value} in state {self.state.value}")
            raise LocalProtocolError(f"{event.value} in state {self.state.value}")
        previous, self.state = self.state, next_state
        return previous

    @property
    def link_usable(self) -> bool:
        """
        Whether requests go out now (a welcomed link that is not draining).
        """
        return self.state is SessionState.WELCOMED

    # -- the API -----------------------------------------------------------------------------

    def start(self) -> list[Effect]:
        """
        Start connecting, unless already connecting or connected.
        """
        if self.state not in (SessionState.IDLE, SessionState.REFUSED):
            return []
        self._move(Input.START)
        return [Dial()]

    def forward(self, record: ForwardRecord, now: float) -> list[Effect]:
        """
        Ask for a tunnel for `record` (waiting until `now` + the connect timeout).

        @raise ValueError: its target is already forwarded.
        """
        self.check_forward(record.spec)
        record.deadline = now + self.connect_timeout
        self.forwards.append(record)
        return self.start() or (self._request(record) if self.link_usable else [])

    def check_forward(self, spec: ForwardSpec) -> None:
        """
        Whether `forward` would take `spec`, without taking it (so that several forwards can
        be checked before any is asked for).

        @raise ValueError: its target is already forwarded.
        """
        for existing in self.forwards:
            if (existing.spec.host, existing.spec.port) == (spec.host, spec.port):
                raise ValueError(f"port {spec.port} is already forwarded ({existing.spec.target})")

    def close(self, record: ForwardRecord) -> list[Effect]:
        """
        Close `record`'s tunnel. A `CloseConfirmed` follows (unless nothing was sent: then
        there is nothing to wait for, and `record.tunnel_id` is left out of `closing`).
        """
        if record.closed:
            return []
        record.closed = True
        if record in self.forwards:
            self.forwards.remove(record)
        effects: list[Effect] = [
            Log(
                "info",
                f"tunnel {_url(record)} closed",
                "tunnel_closed",
                detail=True,
                tunnel_id=record.tunnel_id,
            )
        ]
        if self.state not in _LINKED or record.tunnel_id is None:
            return effects
        self._closing.add(record.tunnel_id)
        return [
            *effects,
            Send(TunnelClose(record.tunnel_id)),
            AbortStreams(record.tunnel_id),
        ]

    def issue_certificate(self, record: ForwardRecord, csr: str, waiter: Any) -> list[Effect]:
        """
        Ask the relay to sign `csr` (PEM) for `record`'s tunnel; a `CertificateAnswered`
        with `waiter` follows (at once when it cannot be asked).

        @raise ValueError: the forward is not a passthrough one, or `csr` is not PEM text
            of at most `MAX_CSR` octets.
        """
        if not record.spec.passthrough:
            raise ValueError("certificates are issued for passthrough tunnels only")
        if len(csr) > MAX_CSR or not csr.isascii() or "-----BEGIN " not in csr:
            raise ValueError(f"the CSR is not PEM text of at most {MAX_CSR} octets")
        error: Exception | None = None
        if record.closed:
            error = TunnelError("the tunnel is closed")
        elif not self.link_usable or record.tunnel_id is None:
            error = RelayUnavailable("the link to the relay is not up: try again once it is")
        elif self.welcome is None or CERTIFICATES not in self.welcome.features:
            error = TunnelRefused(RefusalCode.NO_ISSUER, "the relay issues no certificates")
        if error is not None:
            return [CertificateAnswered(waiter, None, error)]
        assert record.tunnel_id is not None
        request_id = next(self._request_ids)
        self._certificates[request_id] = waiter
        return [Send(CertificateRequest(request_id, record.tunnel_id, csr))]

    def _certificate_answered(
        self, message: CertificateIssued | CertificateRefused
    ) -> list[Effect]:
        self._move(Input.CERTIFICATE)
        waiter = self._certificates.pop(message.request_id, None)
        if waiter is None:
            return []
        if isinstance(message, CertificateIssued):
            return [CertificateAnswered(waiter, message.chain)]
        return [CertificateAnswered(waiter, None, TunnelRefused(message.code, message.message))]

    def _certificates_lost(self, why: str) -> list[Effect]:
        waiting, self._certificates = self._certificates, {}
        return [CertificateAnswered(w, None, RelayUnavailable(why)) for w in waiting.values()]

    def closing(self, tunnel_id: str) -> bool:
        """
        Whether a close of `tunnel_id` awaits the relay's confirmation.
        """
        return tunnel_id in self._closing

    def stop(self) -> list[Effect]:
        """
        Close every tunnel and the link; stop reconnecting.
        """
        effects: list[Effect] = []
        if self.state in _LINKED:
            effects += [
                Send(TunnelClose(f.tunnel_id))
                for f in self.forwards
                if f.tunnel_id is not None and not f.closed
            ]
        for record in list(self.forwards):
            effects += self._fail(record, RelayUnavailable("the agent is stopping"))
        self._move(Input.STOP)
        self._requests.clear()
        effects += self._certificates_lost("the agent is stopping")
        return [*effects, StopDialing()]

    def tick(self, now: float) -> list[Effect]:
        """
        The clock: fail forwards whose callers waited past their deadline.
        """
        effects: list[Effect] = []
        for record in list(self.forwards):
            if record.deadline is not None and now >= record.deadline:
                detail = f": {self.last_error}" if self.last_error else ""
                effects += self._fail(
                    record,
                    RelayUnavailable(
                        f"no tunnel from relay {self.describe_relays()} within "
                        f"{self.connect_timeout:g}s{detail}"
                    ),
                )
        return effects

    def next_deadline(self) -> float | None:
        """
        When `tick` next has something to do, or None.
        """
        deadlines = [f.deadline for f in self.forwards if f.deadline is not None]
        return min(deadlines) if deadlines else None

    # -- the link ----------------------------------------------------------------------------

    def connected(self) -> list[Effect]:
        """
        A link is up: say hello.
        """
        if self._move(Input.CONNECTED) is not SessionState.CONNECTING:
            return []  # stopped or refused meanwhile
        return [Send(AgentHello(version=self.version, token=self.token, agent=self.agent_name))]

    def dial_failed(self, reason: str) -> list[Effect]:
        """
        A connection attempt failed: the next attempt goes to the next relay.
        """
        self._move(Input.DIAL_FAILED)
        self.relay_index += 1
        return self._attempt_failed(reason)

    def drain(self, message: str) -> list[Effect]:
        """
        The relay sent GOAWAY NO_ERROR: it is draining.
        """
        try:
            previous = self._move(Input.DRAIN)
        except _Remote as e:
            return [Violation(f"unexpected {e}")]
        if self.state is not SessionState.DRAINING or previous is SessionState.DRAINING:
            return []
        self.relay_index += 1
        return [
            Log(
                "info",
                f"relay is draining ({message}); reconnecting once streams finish",
                "relay_draining",
            ),
            Drain(),
        ]

    def link_lost(self, reason: str) -> list[Effect]:
        """
        The link ended (or a connection ended before it was welcomed).
        """
        previous = self._move(Input.LINK_LOST)
        effects: list[Effect] = [CloseConfirmed(t) for t in sorted(self._closing)]
        self._closing.clear()
        self._requests.clear()
        effects += self._certificates_lost(f"the link to the relay was lost: {reason}")
        if previous is SessionState.HELLO_SENT:
            effects += self._attempt_failed(reason)
        elif previous is SessionState.WELCOMED and self.forwards:
            effects.append(Log("warn", "link to relay lost; reconnecting", "link_lost"))
        return effects

    def received(self, message: ControlMessage) -> list[Effect]:
        """
        A control message from the relay.
        """
        handler = _DISPATCH.get(type(message))
        if handler is None:
            return []  # unknown types are ignored
        try:
            return handler(self, message)
        except _Remote as e:
            return [Violation(f"unexpected {e}")]

    # -- control messages --------------------------------------------------------------------

    def _welcomed(self, welcome: RelayWelcome) -> list[Effect]:
        if self._move(Input.WELCOME) not in (SessionState.HELLO_SENT, SessionState.DRAINING):
            return []
        self.welcome = welcome
        self.last_error = None
        effects: list[Effect] = [LinkReady(welcome)]
        for record in list(self.forwards) if self.link_usable else ():
            effects += self._request(record)
        return effects

    def _request(self, record: ForwardRecord) -> list[Effect]:
        spec = record.spec
        kind, options = tunnel_options.request_options(spec.option_values())
        # An older relay would ignore a restricting option and let everyone in: refuse.
        features = self.welcome.features if self.welcome is not None else []
        missing = tunnel_options.missing_features(options, features, kind)
        if missing:
            what = " and ".join(missing)
            return [
                Log(
                    "error",
                    f"the relay does not support {what}; not opening {spec.target} to everyone",
                    "tunnel_failed",
                ),
                *self._fail(
                    record,
                    TunnelRefused(RefusalCode.UNSUPPORTED, f"the relay does not support {what}"),
                ),
            ]
        request_id = next(self._request_ids)
        self._requests[request_id] = record
        ignored = tunnel_options.ignored_features(options, features)
        warnings: list[Effect] = [
            Log("warn", f"the relay does not support {what}: {spec.target} goes without")
            for what in ignored
        ]
        # A name is its own identity (the token's permission is what counts): no reclaim
        # secret; its raw TCP port is asked back as a hint.
        named = spec.name is not None
        return [
            *warnings,
            Send(
                TunnelRequest(
                    request_id=request_id,
                    kind=kind,
                    options=options,
                    reclaim_id=None if named else record.tunnel_id,
                    reclaim_secret=None if named else record.secret,
                    reclaim_port=record.tcp_port,
                )
            ),
        ]

    def _answered(self, message: TunnelGranted | TunnelRefusedMessage) -> list[Effect]:
        self._move(Input.ANSWER)
        record = self._requests.pop(message.request_id, None)
        if record is None or record.closed:
            if isinstance(message, TunnelGranted) and record is not None and self.state in _LINKED:
                return [Send(TunnelClose(message.tunnel_id))]
            return []
        if isinstance(message, TunnelRefusedMessage):
            if message.code == RefusalCode.RECLAIM_REFUSED and record.tunnel_id is not None:
                effects: list[Effect] = [
                    Log(
                        "warn",
                        f"the relay no longer knows tunnel {record.tunnel_id}; "
                        "asking for a new one",
                        "tunnel_lost",
                        tunnel_id=record.tunnel_id,
                    )
                ]
                record.tunnel_id = record.secret = None
                record.tcp_port = None
                if self.link_usable:
                    effects += self._request(record)
                return effects
            return self._fail(record, TunnelRefused(message.code, message.message))
        previous = record.granted
        record.granted = message
        record.tunnel_id = message.tunnel_id
        record.secret = message.secret
        record.tcp_port = message.tcp_port
        record.deadline = None
        return [Granted(record, message, previous)]

    def _closed_by_relay(self, message: TunnelClosed) -> list[Effect]:
        self._move(Input.TUNNEL_CLOSED)
        if message.tunnel_id in self._closing:
            self._closing.discard(message.tunnel_id)
            return [CloseConfirmed(message.tunnel_id)]
        effects: list[Effect] = []
        for record in list(self.forwards):
            if record.tunnel_id == message.tunnel_id:
                effects.append(
                    Log(
                        "warn",
                        f"relay closed tunnel {message.tunnel_id}: {message.reason}",
                        "tunnel_closed_by_relay",
                        tunnel_id=message.tunnel_id,
                    )
                )
                record.closed = True
                self.forwards.remove(record)
        return effects

    def _error(self, message: ErrorMessage) -> list[Effect]:
        refused = message.code == ErrorReason.UNAUTHORIZED
        previous = self._move(Input.TOKEN_REFUSED if refused else Input.ERROR)
        if previous in (SessionState.IDLE, SessionState.REFUSED):
            return []
        reason = f"the relay refused the agent: {message.message}"
        return self._attempt_failed(reason, AuthenticationError if refused else RelayUnavailable)

    # -- outcomes ----------------------------------------------------------------------------

    def _attempt_failed(
        self, reason: str, error_type: type[Exception] = RelayUnavailable
    ) -> list[Effect]:
        self.last_error = reason
        refused = error_type is AuthenticationError
        effects: list[Effect] = [
            Log(
                "warn",
                f"relay {self.describe_relays()}: {reason}",
                "token_refused" if refused else "retrying",
                # Each failed attempt of a reconnect; the first connection's failure ends
                # the callers' waits, and they say why.
                detail=not refused,
            )
        ]
        if refused:
            return effects + self._refused(reason)
        if self.fail_fast:
            for record in list(self.forwards):
                if record.waiting:
                    effects += self._fail(record, error_type(reason))
        return effects

    def _refused(self, reason: str) -> list[Effect]:
        """
        The token was refused (at the handshake, or later when revoked): every forward fails
        or closes, reconnecting stops until the next forward.
        """
        effects: list[Effect] = []
        for record in list(self.forwards):
            if not record.waiting and record.granted is not None:
                effects.append(
                    Log(
                        "error",
                        f"tunnel {_url(record)} closed: {reason}",
                        "tunnel_closed",
                        tunnel_id=record.tunnel_id,
                    )
                )
            effects += self._fail(record, AuthenticationError(reason))
        self._requests.clear()
        return [*effects, StopDialing(), StopRetrying(reason)]

    def _fail(self, record: ForwardRecord, error: Exception) -> list[Effect]:
        if record in self.forwards:
            self.forwards.remove(record)
        record.closed = True
        waiting = record.waiting
        record.deadline = None
        return [Failed(record, error)] if waiting else []


class _Remote(Exception):
    """
    An input from the relay that the table does not allow in this state.
    """


def _url(record: ForwardRecord) -> str:
    grant = record.granted
    if grant is None:
        return "?"
    return f"https://{grant.host}" + ("" if grant.port == 443 else f":{grant.port}")


_DISPATCH: dict[type, Callable[[AgentControl, Any], list[Effect]]] = {
    RelayWelcome: AgentControl._welcomed,
    TunnelGranted: AgentControl._answered,
    TunnelRefusedMessage: AgentControl._answered,
    CertificateIssued: AgentControl._certificate_answered,
    CertificateRefused: AgentControl._certificate_answered,
    TunnelClosed: AgentControl._closed_by_relay,
    ErrorMessage: AgentControl._error,
}
