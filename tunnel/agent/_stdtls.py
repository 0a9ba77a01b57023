"""
The agent's link TLS: a Twisted protocol wrapper over the standard library's `ssl.SSLObject`
(memory BIOs), the agent-side counterpart of `tunnel._fasttls` (the relay keeps pyOpenSSL,
whose SNI callback it needs).

The wrapped protocol (the link) is connected at once; what it writes before the handshake is
done is held and leaves with the client's Finished. The wrapper promises what Twisted's
`TLSMemoryBIOProtocol` does for a client:

- the handshake verifies the relay as the `ssl.SSLContext` says (`client_context`: the CA
  file or the platform's trust, the host name, ALPN ``LINK_ALPN``); a failure ends the
  connection with the `ssl.SSLError` as the reason (its text says ``certificate verify
  failed`` for an untrusted or misnamed certificate);
- `loseConnection` sends close_notify once what is written has been encrypted, and closes
  the TCP connection when the peer's close_notify has arrived (or the peer closes it); a
  peer's close_notify is answered so, and the reason is then `ConnectionDone`; a TCP close
  without close_notify is reported as the `ssl.SSLEOFError` it is;
- `abortConnection` drops the TCP connection at once.

Writes are not delayed: each `write` is one `SSLObject.write` (OpenSSL splits it into
records; with a memory BIO it takes the whole buffer) and one read of the send BIO, written
on at once. The records decrypted from one socket read are delivered together, up to 256 KiB
per `dataReceived`, and no read is made that could only end in `SSLWantReadError`.

A session carried over from elsewhere (`adopt`: the plain API's first link, made before
Twisted was imported) continues on the same `SSLObject` and BIOs.
"""

from __future__ import annotations

import ssl
from typing import Any

from twisted.internet import error
from twisted.internet.protocol import connectionDone
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure

from tunnel.agent._tlscontext import client_context
from tunnel.link import write_now

__all__ = ["StdTLSFactory", "StdTLSProtocol", "client_context", "eof_error", "std_client_tls"]

#: One TLS record's plaintext is at most 16 KiB; read a little more per SSLObject.read.
_RECV = 2**15
#: Decrypted octets delivered in one dataReceived at most.
_DELIVER = 256 * 1024


def eof_error(error: ssl.SSLError) -> ssl.SSLError:
    """
    `error`, or for OpenSSL 3's "unexpected EOF" the ``ssl.SSLEOFError`` it is: some CPython
    3.11 releases (Debian 12's 3.11.2) raise that reason as a plain ``ssl.SSLError``.
    """
    reason = getattr(error, "reason", None)
    if not isinstance(error, ssl.SSLEOFError) and reason == "UNEXPECTED_EOF_WHILE_READING":
        return ssl.SSLEOFError(*error.args)
    return error


class StdTLSProtocol(ProtocolWrapper):
    """
    A TLS client connection over the transport, on an `ssl.SSLObject`; the transport of the
    wrapped protocol.
    """

    factory: StdTLSFactory

    def __init__(self, factory: StdTLSFactory, wrappedProtocol: Any) -> None:
        super().__init__(factory, wrappedProtocol)
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls: ssl.SSLObject | None = None
        #: What the data path reads, writes and asks `pending` of: the `SSLObject`'s own
        #: C object, to which those three methods of the `SSLObject` only forward (a
        #: Python call less each, per write and per read), or the `SSLObject` itself.
        self._io: Any = None
        self._handshake_done = False
        #: Application octets written before the handshake was done.
        self._held: list[bytes] = []
        #: `loseConnection` was called: close_notify goes once the held octets are out.
        self._closing = False
        #: Our close_notify is sent; nothing more is written.
        self._shutdown_sent = False
        #: The TLS session is over (closed, failed or aborted): input is ignored.
        self._over = False
        #: Why the connection ends, if the TLS layer knows better than the transport.
        self._reason: Failure | None = None

    # -- set-up ------------------------------------------------------------------------------

    def adopt(self, tls: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO) -> None:
        """
        Continue a session whose handshake is done elsewhere: `tls` over `incoming` and
        `outgoing`. Call before `makeConnection`.
        """
        self._tls = tls
        self._io = _data_path(tls)
        self._incoming = incoming
        self._outgoing = outgoing
        self._handshake_done = True

    def makeConnection(self, transport: Any) -> None:
        if self._tls is None:
            self._tls = self.factory.context.wrap_bio(
                self._incoming, self._outgoing, server_hostname=self.factory.hostname
            )
            self._io = _data_path(self._tls)
        super().makeConnection(transport)
        if not self._handshake_done:
            self._handshake()
        else:
            self._flush()
            if self._incoming.pending:
                self._read()

    # -- transport (for the wrapped protocol) ------------------------------------------------

    def write(self, data: Any) -> None:
        if self._over or self._shutdown_sent:
            return
        if not self._handshake_done:
            self._held.append(bytes(data))
            return
        try:
            self._io.write(data)
        except ssl.SSLError as e:
            self._fail(e)
            return
        # `_flush`, inline: this runs for every write of the link.
        outgoing = self._outgoing
        if outgoing.pending and self.transport is not None:
            write_now(self.transport, outgoing.read())

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        if self.disconnecting:
            return
        self.disconnecting = 1
        self._closing = True
        if self._handshake_done and not self._over:
            self._shutdown()

    def abortConnection(self) -> None:
        self._over = True
        self.disconnecting = 1
        transport = self.transport
        if transport is not None:
            transport.abortConnection()  # type: ignore[attr-defined]

    def getHandle(self) -> Any:
        return self.transport.getHandle()  # type: ignore[union-attr]

    # -- protocol (from the transport) -------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._over:
            return
        self._incoming.write(data)
        if not self._handshake_done:
            self._handshake()
        else:
            self._read()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self._over:
            # No more input: what is buffered is read, and a missing close_notify is reported.
            self._incoming.write_eof()
            if self._handshake_done:
                self._read()
            elif self._reason is None:
                self._reason = reason
            if self._reason is None:
                self._reason = Failure(ssl.SSLEOFError("EOF occurred in violation of protocol"))
            self._over = True
        final = self._reason or reason
        self._reason = None
        super().connectionLost(final)

    # -- internals ---------------------------------------------------------------------------

    def _handshake(self) -> None:
        tls = self._tls
        assert tls is not None
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except ssl.SSLError as e:
            self._fail(e)
            return
        self._handshake_done = True
        held, self._held = self._held, []
        if held:
            try:
                tls.write(b"".join(held))
            except ssl.SSLError as e:
                self._fail(e)
                return
        if self._closing:
            self._shutdown()
        else:
            self._flush()
        if self._incoming.pending and not self._over:
            self._read()

    def _read(self) -> None:
        tls = self._io
        incoming = self._incoming
        chunks: list[bytes] = []
        size = 0
        while not self._over:
            try:
                data = tls.read(_RECV)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                data = b""
            except ssl.SSLError as e:
                self._deliver(chunks)
                chunks, size = [], 0
                self._fail(eof_error(e))
                break
            if not data:
                # The peer's close_notify (`SSLObject.read` returns nothing for it): what came
                # before it is delivered, then it is answered.
                self._deliver(chunks)
                chunks, size = [], 0
                self._peer_closed()
                break
            chunks.append(data)
            size += len(data)
            if size >= _DELIVER:
                self._deliver(chunks)
                chunks, size = [], 0
            if not incoming.pending and not tls.pending() and not incoming.eof:
                # Nothing left to decrypt: another read would only say SSLWantReadError.
                break
        # `_deliver`, inline: this runs for every read of the link.
        if chunks and self.wrappedProtocol is not None:
            self.wrappedProtocol.dataReceived(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def _deliver(self, chunks: list[bytes]) -> None:
        if chunks and self.wrappedProtocol is not None:
            self.wrappedProtocol.dataReceived(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def _flush(self) -> None:
        outgoing = self._outgoing
        if outgoing.pending and self.transport is not None:
            write_now(self.transport, outgoing.read())

    def _shutdown(self) -> None:
        """
        Send close_notify; close the TCP connection once the peer's has come.
        """
        tls = self._tls
        assert tls is not None
        self._shutdown_sent = True
        try:
            tls.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            self._flush()
            return
        except ssl.SSLError as e:
            self._fail(e)
            return
        self._flush()
        self._over = True
        self._reason = self._reason or Failure(error.ConnectionDone())
        if self.transport is not None:
            self.transport.loseConnection()

    def _peer_closed(self) -> None:
        self._reason = Failure(error.ConnectionDone())
        if not self._shutdown_sent:
            self._shutdown_sent = True
            try:
                self._tls.unwrap()  # type: ignore[union-attr]
            except ssl.SSLError:
                pass
        self._flush()
        self._over = True
        if self.transport is not None:
            self.transport.loseConnection()

    def _fail(self, e: ssl.SSLError) -> None:
        # The failure holds no traceback: its frames would keep this connection alive in a
        # reference cycle until a cyclic collection.
        e.__traceback__ = None
        self._reason = Failure(e)
        self._over = True
        self._flush()  # an alert, if OpenSSL made one
        if self.transport is not None:
            self.transport.loseConnection()


def _data_path(tls: ssl.SSLObject) -> Any:
    """
    The object whose ``read``, ``write`` and ``pending`` `tls`'s own forward to, unchanged
    (CPython's ``_sslobj``), or `tls` itself if it has none.
    """
    inner = getattr(tls, "_sslobj", None)
    if inner is None or not all(hasattr(inner, m) for m in ("read", "write", "pending")):
        return tls
    return inner


class StdTLSFactory(WrappingFactory[StdTLSProtocol]):
    """
    Wraps the protocols of `wrappedFactory` in `StdTLSProtocol`s for `hostname`.
    """

    protocol = StdTLSProtocol
    noisy = False

    def __init__(
        self,
        context: ssl.SSLContext,
        hostname: str,
        wrappedFactory: Any,
        session: tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO] | None = None,
    ) -> None:
        super().__init__(wrappedFactory)
        self.context = context
        self.hostname = hostname
        #: A session to continue (`StdTLSProtocol.adopt`) for the next protocol built.
        self.session = session

    def buildProtocol(self, addr: Any) -> StdTLSProtocol:
        protocol = super().buildProtocol(addr)
        assert protocol is not None
        session, self.session = self.session, None
        if session is not None:
            protocol.adopt(*session)
        return protocol


def std_client_tls(context: ssl.SSLContext, hostname: str, wrapped_endpoint: Any) -> Any:
    """
    Like `twisted.internet.endpoints.wrapClientTLS`, with `StdTLSProtocol`.
    """
    from twisted.internet.endpoints import _WrapperEndpoint

    return _WrapperEndpoint(
        wrapped_endpoint, lambda factory: StdTLSFactory(context, hostname, factory)
    )
