"""
The plain API's first link, made with the standard library alone: a blocking loop over a
socket, an `ssl.SSLObject` on memory BIOs and the link's sans-IO cores (the `Multiplexer`
and `AgentControl`), until the relay has answered every forward asked.

It exists because importing Twisted's reactor costs far more than the link itself: the URL
is had before Twisted is imported, and the live link (socket, TLS session, multiplexer,
control state) is then handed to an `Agent` (`Agent.adopt`), which carries on with nothing
redone and no octet lost. This module imports nothing of Twisted.

Only for the common case: one relay, no HTTP proxy. What the caller sees is what the
Twisted path gives: the same control core decides, so a refused connection, an untrusted
certificate, a refused token or tunnel, or a timeout fail with the same `tunnel.errors` and
messages. A link lost after the relay's welcome and before its answers is retried, the
Twisted way (`LinkLostEarly`).
"""

from __future__ import annotations

import select
import socket
import ssl
import time
from collections.abc import Sequence

from tunnel import __version__
from tunnel.agent import _control as control
from tunnel.agent._records import AgentForward
from tunnel.agent._tlscontext import client_context, describe_error
from tunnel.agent.settings import ForwardSpec, RelayAddress
from tunnel.wire import (
    PROTOCOL_VERSION,
    ControlReceived,
    ErrorCode,
    Event,
    GoAwayReceived,
    HelloReceived,
    LinkSettings,
    LinkTerminated,
    Multiplexer,
    PingAcknowledged,
)
from tunnel.wire.control import ControlError, decode_message, encode_message

__all__ = ["Bootstrapped", "LinkLostEarly", "bootstrap", "dial_address", "link_settings"]

#: Octets read from the socket at once.
_READ = 256 * 1024
#: Plaintext read from the TLS session at once (a record is at most 16 KiB).
_RECV = 2**15
#: How a connection's end reads (Twisted's words, as the Twisted path reports it).
_CLOSED = "Connection was closed cleanly."
_LOST = "Connection to the other side was lost in a non-clean fashion."


class LinkLostEarly(Exception):
    """
    The link was lost after the relay's welcome, before it answered: the forwards are to be
    asked again on a new link (as the `Agent`'s `ClientService` would reconnect).
    """


def link_settings() -> LinkSettings:
    """
    The agent's link settings (the relay opens one stream per public connection: many).
    """
    return LinkSettings(max_streams=16384)


def dial_address(relay: RelayAddress) -> str:
    """
    The address to dial for `relay`: ``*.localhost`` names are loopback (RFC 6761).
    """
    host = relay.host
    return "127.0.0.1" if host == "localhost" or host.endswith(".localhost") else host


class Bootstrapped:
    """
    A link the relay has welcomed and answered on, ready to be adopted.
    """

    def __init__(
        self,
        relay: RelayAddress,
        sock: socket.socket,
        tls: ssl.SSLObject,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        mux: Multiplexer,
        agent_control: control.AgentControl,
        records: list[AgentForward],
    ) -> None:
        self.relay = relay
        self.sock = sock
        self.tls = tls
        self.incoming = incoming
        self.outgoing = outgoing
        self.mux = mux
        self.control = agent_control
        self.records = records
        #: The core's effects the adopting `Agent` carries out (the link's welcome, the
        #: grants, log lines); those on the link (sends) are done already.
        self.effects: list[control.Effect] = []
        #: Link events decoded after the last answer (a stream the relay opened at once),
        #: for the adopting link to dispatch, in order.
        self.leftover: list[Event] = []


def bootstrap(
    relay: RelayAddress,
    token: str | None,
    ca: str | None,
    specs: Sequence[ForwardSpec],
    connect_timeout: float = 10.0,
) -> Bootstrapped:
    """
    Connect to `relay`, say hello and ask for `specs`; return once every one is answered.

    @raise RelayUnavailable: the relay could not be reached or failed the link before its
        welcome (refused, untrusted certificate, timeout), as the Twisted path says it.
    @raise AuthenticationError: the relay refused the token.
    @raise LinkLostEarly: the link was lost after the welcome.
    @raise ValueError: a CA file without a certificate.
    """
    context = client_context(ca)
    core = control.AgentControl(
        token=token,
        agent_name=f"tunnels/{__version__}",
        version=PROTOCOL_VERSION,
        connect_timeout=connect_timeout,
        fail_fast=True,
        describe_relays=lambda: str(relay),
    )
    records = [AgentForward(spec) for spec in specs]
    effects = core.start()
    now = time.time()
    for record in records:
        effects += core.forward(record, now)
    return _Loop(relay, context, core, records).run(effects)


class _Loop:
    """
    The blocking loop of one bootstrap: the effects of the core carried out on the socket.
    """

    def __init__(
        self,
        relay: RelayAddress,
        context: ssl.SSLContext,
        core: control.AgentControl,
        records: list[AgentForward],
    ) -> None:
        self.relay = relay
        self.context = context
        self.core = core
        self.records = records
        self.sock: socket.socket | None = None
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls: ssl.SSLObject | None = None
        self.mux: Multiplexer | None = None
        self.kept: list[control.Effect] = []
        self.errors: dict[int, Exception] = {}
        self.answered: set[int] = set()
        self.dial = False
        self.leftover: list[Event] = []

    # -- effects -----------------------------------------------------------------------------

    def apply(self, effects: list[control.Effect]) -> None:
        for effect in effects:
            if isinstance(effect, control.Send):
                assert self.mux is not None
                self.mux.send_control(encode_message(effect.message))
            elif isinstance(effect, control.Dial):
                self.dial = True
            elif isinstance(effect, control.StopDialing):
                self.dial = False
            else:
                if isinstance(effect, control.Granted):
                    self.answered.add(id(effect.forward))
                elif isinstance(effect, control.Failed):
                    self.answered.add(id(effect.forward))
                    self.errors[id(effect.forward)] = effect.error
                self.kept.append(effect)

    def done(self) -> bool:
        return all(id(r) in self.answered for r in self.records)

    def fail_if_done(self) -> None:
        """
        Raise the first error once every forward is answered and one failed: the link is
        then dropped, which ends the others' tunnels too (all or nothing, as `forward_many`
        promises).
        """
        if self.done() and self.errors:
            raise next(iter(self.errors.values()))

    # -- the loop ----------------------------------------------------------------------------

    def run(self, effects: list[control.Effect]) -> Bootstrapped:
        self.apply(effects)
        try:
            self.connect()
            while not self.done():
                self.step()
        except BaseException:
            if self.sock is not None:
                self.sock.close()
            raise
        assert self.sock is not None and self.tls is not None and self.mux is not None
        result = Bootstrapped(
            self.relay,
            self.sock,
            self.tls,
            self.incoming,
            self.outgoing,
            self.mux,
            self.core,
            self.records,
        )
        result.effects = self.kept
        result.leftover = self.leftover
        return result

    def remaining(self) -> float:
        deadline = self.core.next_deadline()
        if deadline is None:
            return self.core.connect_timeout
        return max(0.0, deadline - time.time())

    def connect(self) -> None:
        relay = self.relay
        try:
            sock = socket.create_connection(
                (dial_address(relay), relay.port), timeout=self.remaining()
            )
        except OSError as e:
            self.apply(self.core.dial_failed(f"cannot connect to {relay}: {describe_error(e)}"))
            self.fail_if_done()
            raise LinkLostEarly(str(e)) from e
        self.sock = sock
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        self.tls = self.context.wrap_bio(self.incoming, self.outgoing, server_hostname=relay.host)
        # As the Twisted link does on connectionMade: the multiplexer (its HELLO queued),
        # a PING, and the agent's hello, all leaving with the client's Finished.
        self.mux = Multiplexer(client=True, settings=link_settings(), clock=time.time)
        self.mux.ping()
        self.apply(self.core.connected())
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.send()
                self.receive()
            except ssl.SSLError as e:
                self.send()
                self.lost(describe_error(e))
        self.write_frames()

    def write_frames(self) -> None:
        assert self.mux is not None and self.tls is not None
        while self.mux.has_data_to_send:
            data = self.mux.data_to_send()
            if not data:
                break
            self.tls.write(data)
        self.send()

    def send(self) -> None:
        sock = self.sock
        assert sock is not None
        data = self.outgoing.read()
        view = memoryview(data)
        while view:
            try:
                sent = sock.send(view)
            except BlockingIOError:
                self.wait(write=True)
                continue
            except OSError as e:
                self.lost(describe_error(e))
            view = view[sent:]

    def wait(self, write: bool = False) -> bool:
        """
        Wait until the socket is readable (or writable); False at a deadline (after the core
        has been told the time).
        """
        sock = self.sock
        assert sock is not None
        timeout = self.remaining()
        readable, writable, _ = select.select(
            [] if write else [sock], [sock] if write else [], [], timeout
        )
        if readable or writable:
            return True
        self.apply(self.core.tick(time.time()))
        self.fail_if_done()
        return False

    def receive(self) -> None:
        """
        Read what the socket has into the TLS session's input (waiting for it).
        """
        sock = self.sock
        assert sock is not None
        while True:
            if not self.wait():
                continue
            try:
                data = sock.recv(_READ)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                self.lost(_LOST)
            except OSError as e:
                self.lost(describe_error(e))
            if not data:
                self.lost(_CLOSED)
            self.incoming.write(data)
            return

    def step(self) -> None:
        """
        Read, decrypt and handle one socket read's worth of input.
        """
        assert self.tls is not None and self.mux is not None
        self.receive()
        chunks = []
        #: Why the connection ends after what was decrypted (handled first), if it does.
        ended: str | None = None
        while True:
            try:
                data = self.tls.read(_RECV)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                data = b""
            except ssl.SSLError as e:
                ended = describe_error(e)
                break
            if not data:
                ended = _CLOSED  # the relay's close_notify
                break
            chunks.append(data)
            if not self.incoming.pending and not self.tls.pending():
                break
        self.handle(self.mux.receive_data(b"".join(chunks)))
        if ended is not None and not self.done():
            self.lost(ended)
        self.write_frames()

    def handle(self, events: list[Event]) -> None:
        """
        Handle link events until every forward is answered; keep the rest for the adopter.
        """
        assert self.mux is not None
        for n, event in enumerate(events):
            if self.done():
                self.leftover = events[n:]
                break
            kind = type(event)
            if kind is ControlReceived:
                assert isinstance(event, ControlReceived)
                try:
                    message = decode_message(event.payload)
                except ControlError as e:
                    self.mux.go_away(ErrorCode.PROTOCOL_ERROR, str(e))
                    self.write_frames()
                    self.lost(f"malformed control message from the relay: {e}")
                if message is not None:
                    self.apply(self.core.received(message))
                    self.fail_if_done()
            elif kind is LinkTerminated:
                assert isinstance(event, LinkTerminated)
                self.write_frames()
                self.lost(event.message or "link ended")
            elif kind is GoAwayReceived:
                assert isinstance(event, GoAwayReceived)
                if event.code == ErrorCode.NO_ERROR:
                    # Draining before we had our answers: ask again elsewhere, the Twisted way.
                    self.write_frames()
                    raise LinkLostEarly("the relay is draining")
                # An error GOAWAY ends the link: its LinkTerminated follows.
            elif kind in (HelloReceived, PingAcknowledged):
                pass
            else:
                # Nothing else belongs before the answers (no tunnel, no stream yet).
                self.mux.go_away(ErrorCode.PROTOCOL_ERROR, f"unexpected {kind.__name__}")
                self.write_frames()
                self.lost(f"unexpected {kind.__name__} before the tunnels were granted")

    def lost(self, reason: str) -> None:
        """
        The connection ended: the core decides what the callers are told.

        @raise RelayUnavailable: before the welcome (what the Twisted path reports).
        @raise AuthenticationError: the token was refused.
        @raise LinkLostEarly: after it.
        """
        self.apply(self.core.link_lost(reason))
        self.fail_if_done()
        raise LinkLostEarly(reason)
