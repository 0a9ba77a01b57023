"""
The relay's end of one agent's link: a thin Twisted adapter around the control core.

`RelayLink` is the link protocol (frames, streams, keepalive, the gate before hello); each
control message, the hello timer, and the answers to its probes go into its
`_control.RelaySession`, and it carries out the effects that come back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from tunnel.link import LinkProtocol, Stream
from tunnel.relay._control import LinkState, RelaySession
from tunnel.relay._effects import AcceptPeer, Effect, GoAway, Log, ProbeHolder, Send
from tunnel.relay._issuer import IssueCertificate
from tunnel.relay._ratelog import shorten
from tunnel.relay._shares import TokenBucket
from tunnel.relay._sni import source_of
from tunnel.wire import ErrorCode
from tunnel.wire.codes import RefusalCode
from tunnel.wire.control import (
    CertificateIssued,
    CertificateRefused,
    ControlError,
    ControlMessage,
    decode_message,
    encode_message,
)

if TYPE_CHECKING:
    from tunnel.relay._state import Relay

__all__ = ["RelayLink"]

_log = Logger()

_LEVELS = {"info": LogLevel.info, "warn": LogLevel.warn, "error": LogLevel.error}


class RelayLink(LinkProtocol):
    """
    The relay's end of one agent's link.
    """

    def __init__(self, relay: Relay) -> None:
        config = relay.config
        super().__init__(
            relay.reactor,
            client=False,
            settings=config.link,
            keepalive_interval=config.keepalive_interval,
            keepalive_timeout=config.keepalive_timeout,
            # Until its hello is accepted, an agent may send a few KiB of HELLO, PING and
            # CONTROL only: nothing it does before then costs the relay more than that.
            gated=True,
        )
        self.relay = relay
        #: The control plane of this link; the registry records this link as the owner.
        self.session = RelaySession(relay, self, relay.reactor.seconds)
        self._hello_timer: Any = None
        #: The agent sent GOAWAY NO_ERROR (it is stopping): no new public connection goes
        #: to it; those in flight finish.
        self.draining = False

    # -- what the relay's state and its tests read -----------------------------------------

    @property
    def authenticated(self) -> bool:
        return self.session.authenticated

    @property
    def token(self) -> str | None:
        return self.session.token

    @property
    def peer_name(self) -> str:
        return self.session.peer_name

    @property
    def principal(self) -> str:
        return self.session.principal

    @property
    def reclaim_owner(self) -> str:
        return self.session.reclaim_owner

    @property
    def pending_reclaims(self) -> int:
        return self.session.pending_reclaims

    @property
    def requests(self) -> TokenBucket:
        return self.session.requests

    @property
    def strikes(self) -> TokenBucket:
        return self.session.strikes

    @property
    def lost(self) -> bool:
        """
        Whether the link's connection has ended.
        """
        return self._lost

    # -- the link ----------------------------------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        transport = self.transport
        assert transport is not None
        peer = transport.getPeer()
        self.session.connected(
            f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}", source_of(peer)
        )
        self.relay.links.add(self)
        self._hello_timer = self.reactor.callLater(
            self.relay.config.handshake_timeout,
            lambda: self.perform(self.session.hello_timed_out()),
        )

    def send(self, message: ControlMessage) -> None:
        """
        Send a control message to the agent.
        """
        self.sendControl(encode_message(message))

    def controlReceived(self, payload: bytes) -> None:
        try:
            message = decode_message(payload)
        except ControlError as e:
            self.perform(self.session.bad_message(str(e)))
            return
        self.perform(self.session.received(message))

    def streamOpened(self, stream: Stream, metadata: bytes) -> None:
        # Agents do not open streams.
        stream.abortConnection(ErrorCode.REFUSED_STREAM)

    def goAwayReceived(self, code: int, message: str) -> None:
        if code == ErrorCode.NO_ERROR and not self.draining:
            self.draining = True
            if self.authenticated:
                _log.info(
                    "agent {peer} is draining ({message}): no new connections to it",
                    peer=self.peer_name,
                    message=shorten(message),
                )

    def linkLost(self, reason: Failure) -> None:
        self._cancel_hello_timer()
        self.relay.links.discard(self)
        self.perform(self.session.link_lost())

    # -- effects -----------------------------------------------------------------------------

    def perform(self, effects: list[Effect]) -> None:
        """
        Carry out what the control core asks.
        """
        if self.session.state is not LinkState.AWAITING_HELLO:
            self._cancel_hello_timer()
        for effect in effects:
            if isinstance(effect, Send):
                self.send(effect.message)
            elif isinstance(effect, GoAway):
                if effect.after_turn:
                    self.reactor.callLater(0, self.goAway, effect.code, effect.message)
                else:
                    self.goAway(effect.code, effect.message)
            elif isinstance(effect, AcceptPeer):
                self.acceptPeer()
            elif isinstance(effect, ProbeHolder):
                self._probe(effect)
            elif isinstance(effect, IssueCertificate):
                self._issue(effect)
            elif isinstance(effect, Log):
                self._log(effect)

    def _probe(self, effect: ProbeHolder) -> None:
        holder: RelayLink = effect.holder
        session = self.session

        def answered(alive: bool) -> None:
            probe = effect.probe
            self.perform(session.probe_answered(probe) if alive else session.probe_timed_out(probe))

        d: defer.Deferred[Any] = holder.probe(effect.timeout)
        d.addCallback(answered).addErrback(
            lambda f: _log.failure("error answering a tunnel request", f)
        )

    def _issue(self, effect: IssueCertificate) -> None:
        issuer = self.relay.issuer
        assert issuer is not None

        def issued(chain: str) -> None:
            if not self._lost:
                self.send(CertificateIssued(effect.request_id, chain))

        def failed(reason: Failure) -> None:
            _log.failure("cannot issue a certificate for {host}", reason, host=effect.host)
            if not self._lost:
                message = shorten(str(reason.value) or "the issuer failed")
                self.send(CertificateRefused(effect.request_id, RefusalCode.ISSUE_FAILED, message))

        d: defer.Deferred[Any] = defer.maybeDeferred(issuer.issue, effect.csr, effect.host)
        d.addCallbacks(issued, failed)

    def _log(self, effect: Log) -> None:
        fields = dict(effect.fields)
        for name in effect.peer_fields:
            fields[name] = shorten(fields[name])
        level = _LEVELS[effect.level]
        if effect.key is None:
            _log.emit(level, effect.format, **fields)
        else:
            self.relay.ratelog.emit(effect.key, level, effect.format, limit=effect.limit, **fields)

    def _cancel_hello_timer(self) -> None:
        timer, self._hello_timer = self._hello_timer, None
        if timer is not None and timer.active():
            timer.cancel()
