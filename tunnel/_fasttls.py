"""
A leaner TLS layer for the data path: Twisted's `TLSMemoryBIOProtocol` with fewer copies and
fewer calls per octet.

Twisted's TLS protocol hands OpenSSL 16 KiB slices (each a copy), drains the send BIO after
every record, and delivers every 16 KiB record to the application as its own
`dataReceived`; its `BufferingTLSTransport` adds two more copies and a reactor turn of delay
to aggregate small writes. For a tunnel, which moves bulk data in large frames and already
batches its own writes, that is most of the CPU spent per megabyte outside OpenSSL:

- `_write` passes OpenSSL memoryview slices of up to 256 KiB (no copies) and drains the send
  BIO once per write, in large reads;
- `_flushReceiveBIO` delivers the records decrypted from one socket read together, up to
  256 KiB per `dataReceived`;
- writes are not delayed: the caller decides when to write.

Semantics (handshake, errors, shutdown, producers) are Twisted's: only the three methods
above are replaced, each keeping the error handling of the original, with one difference: a
peer's close_notify read while the connection is open makes its end a clean one
(``ConnectionDone``) whatever the TCP connection does afterwards, where Twisted reports the
TCP transport's reason (a reset, when the peer closed its socket before our close_notify
reached it).

The record work reaches under pyOpenSSL's public API (falling back to it when the private
names are missing), because its wrappers cost more than the encryption of a small record:
OpenSSL's partial-write mode is cleared (with a memory BIO, which never refuses, one
SSL_write then encrypts a whole buffer instead of one record per call); SSL_write, SSL_read,
BIO_write and BIO_read are called directly, into one shared buffer rather than a fresh
allocation per call; and the memory BIOs are asked how much they hold, so that no call is
made only to end in a WantReadError: a request-sized record costs one SSL_read and one
BIO_read, not two of each and two exceptions. The handshake is driven the same way
(SSL_do_handshake called directly; a flight that only waits for the peer's next one is no
exception), and so is the BIO write of every received chunk, handshake included. Anything
but success or "want read" goes through pyOpenSSL's own error mapping.
"""

from __future__ import annotations

from typing import Any

from OpenSSL.SSL import Error, WantReadError, ZeroReturnError

try:
    from OpenSSL._util import ffi as _ffi
    from OpenSSL._util import lib as _lib

    _SSL_read = _lib.SSL_read
    _SSL_write = _lib.SSL_write
    _SSL_pending = _lib.SSL_pending
    _SSL_do_handshake = _lib.SSL_do_handshake
    _SSL_get_error = _lib.SSL_get_error
    _WANT_READ = _lib.SSL_ERROR_WANT_READ
    _ZERO_RETURN = _lib.SSL_ERROR_ZERO_RETURN
    _BIO_read = _lib.BIO_read
    _BIO_write = _lib.BIO_write
    # For a memory BIO, BIO_get_mem_data returns the octets it holds (the pointer is
    # optional).
    _BIO_pending = _lib.BIO_get_mem_data
    _NULL = _ffi.NULL
    _PARTIAL_WRITE = _lib.SSL_MODE_ENABLE_PARTIAL_WRITE
    _clear_mode = _lib.SSL_clear_mode
    _from_buffer = _ffi.from_buffer
    _buffer = _ffi.buffer
except (ImportError, AttributeError):  # pragma: no cover - a pyOpenSSL without these
    _SSL_read = None
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol, connectionDone
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import directlyProvides, providedBy

from tunnel.link import write_now

__all__ = ["FastTLSFactory", "FastTLSProtocol", "fast_client_tls"]

#: Application octets handed to one SSL_write (OpenSSL splits them into records).
_WRITE_CHUNK = 256 * 1024
#: Bytes read from the send BIO at once.
_BIO_READ = 256 * 1024
#: One TLS record's plaintext is at most 16 KiB; read a little more per SSL_read.
_RECV = 2**15
#: Decrypted octets delivered in one dataReceived at most.
_DELIVER = 256 * 1024

if _SSL_read is not None:
    # One buffer for every connection: the reactor runs on one thread, and what is read
    # into it is copied out before the next read.
    _SCRATCH = _ffi.new("char[]", max(_BIO_READ, _RECV))


class FastTLSProtocol(TLSMemoryBIOProtocol):
    """
    `TLSMemoryBIOProtocol` with batched, copy-free writes and batched delivery.
    """

    #: The private pyOpenSSL names are there for this connection (set in makeConnection).
    _fast = False
    #: The receive BIO was told that no more input comes (the transport is gone).
    _eof = False

    def makeConnection(self, transport: Any) -> None:
        creator = getattr(self.factory, "_creatorCallable", None)
        if creator is None:  # pragma: no cover - a Twisted without it
            super().makeConnection(transport)
            self._use_fast_path()
            return
        # TLSMemoryBIOProtocol.makeConnection, doing once what it does twice: it declares
        # the transport's interfaces one at a time (each declaration replacing the last),
        # then all at once through ProtocolWrapper.makeConnection, which also repeats the
        # Protocol.makeConnection and registerProtocol calls it has just made.
        self._tlsConnection = creator(self)
        self._appSendBuffer = []
        self._use_fast_path()
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        if self._connectWrapped:
            self.wrappedProtocol.makeConnection(self)
        self._checkHandshakeStatus()

    def _use_fast_path(self) -> None:
        connection = self._tlsConnection
        if (
            _SSL_read is not None
            and connection is not None
            and hasattr(connection, "_ssl")
            and getattr(connection, "_into_ssl", None) is not None
            and getattr(connection, "_from_ssl", None) is not None
        ):
            self._fast = True
            _clear_mode(connection._ssl, _PARTIAL_WRITE)

    def dataReceived(self, data: bytes) -> None:
        if not self._fast:
            super().dataReceived(data)
            return
        # TLSMemoryBIOProtocol.dataReceived, with the BIO written directly.
        connection: Any = self._tlsConnection
        bio = connection._into_ssl
        # A memory BIO takes everything (it grows); anything else is pyOpenSSL's to report.
        result = _BIO_write(bio, data, len(data))
        if result <= 0:
            connection._handle_bio_errors(bio, result)
        if not self._handshakeDone:
            self._checkHandshakeStatus()
            if not self._handshakeDone:
                return
        if self._appSendBuffer:
            self._unbufferPendingWrites()
        self._flushReceiveBIO()

    def _checkHandshakeStatus(self) -> None:
        if not self._fast:
            super()._checkHandshakeStatus()
            return
        # TLSMemoryBIOProtocol._checkHandshakeStatus without an exception per flight: a
        # handshake that only waits for the peer's next flight (SSL_ERROR_WANT_READ, with
        # nothing pending from a callback, which fails the handshake instead) is not an
        # error; anything else goes through pyOpenSSL's error mapping as before.
        if self._aborted:
            return
        connection: Any = self._tlsConnection
        ssl = connection._ssl
        result = _SSL_do_handshake(ssl)
        if result <= 0:
            if _SSL_get_error(ssl, result) == _WANT_READ:
                self._flushSendBIO()
                return
            try:
                connection._raise_ssl_error(ssl, result)
            except WantReadError:  # pragma: no cover - answered above
                self._flushSendBIO()
                return
            except Error as e:
                self._tlsShutdownFinished(_untraced(e))
                return
        self._handshakeDone = True
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # The receive BIO is shut down next (TLSMemoryBIOProtocol.connectionLost): the final
        # read must be attempted even with nothing buffered, as it reports an unclean EOF.
        self._eof = True
        super().connectionLost(reason)

    def _write(self, bytes: Any) -> None:
        if self._lostTLSConnection:
            return
        connection: Any = self._tlsConnection
        total = len(bytes)
        if self._fast:
            ssl = connection._ssl
            with _from_buffer(bytes) as data:
                done = 0
                while done < total:
                    size = min(total - done, _WRITE_CHUNK)
                    result = _SSL_write(ssl, data + done, size)
                    if result <= 0:
                        try:
                            connection._raise_ssl_error(ssl, result)
                        except WantReadError:
                            self._bufferedWrite(memoryview(bytes)[done:].tobytes())
                            break
                        except Error as e:
                            self._tlsShutdownFinished(_untraced(e))
                            return
                    done += result
            self._flushSendBIO()
            return
        view = memoryview(bytes)
        done = 0
        while done < total:
            try:
                sent = connection.send(view[done : done + _WRITE_CHUNK])
            except WantReadError:
                self._bufferedWrite(view[done:].tobytes())
                break
            except Error as e:
                self._tlsShutdownFinished(_untraced(e))
                return
            done += sent
        self._flushSendBIO()

    def _flushSendBIO(self) -> None:
        connection: Any = self._tlsConnection
        if connection is None:
            return
        chunks = []
        if self._fast:
            bio = connection._from_ssl
            pending = _BIO_pending(bio, _NULL)
            while pending > 0:
                result = _BIO_read(bio, _SCRATCH, min(pending, _BIO_READ))
                if result <= 0:
                    break
                chunks.append(_buffer(_SCRATCH, result)[:])
                pending -= result
        else:
            while True:
                try:
                    chunks.append(connection.bio_read(_BIO_READ))
                except WantReadError:
                    break
        if chunks and self.transport is not None:
            write_now(self.transport, chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def _flushReceiveBIO(self) -> None:
        chunks: list[bytes] = []
        size = 0
        connection: Any = self._tlsConnection
        fast = self._fast
        while not self._lostTLSConnection:
            try:
                if fast:
                    ssl = connection._ssl
                    result = _SSL_read(ssl, _SCRATCH, _RECV)
                    if result <= 0:
                        code = _SSL_get_error(ssl, result)
                        if code == _WANT_READ:
                            break  # what arrived was no application data (a ticket, ...)
                        if code == _ZERO_RETURN:
                            # The peer's close_notify (or, with OP_IGNORE_UNEXPECTED_EOF,
                            # its FIN), as the ZeroReturnError below, without the exception.
                            self._deliver(chunks)
                            chunks, size = [], 0
                            self._peer_closed()
                            continue
                        connection._raise_ssl_error(ssl, result)
                    data = _buffer(_SCRATCH, result)[:]
                else:
                    data = connection.recv(_RECV)
            except WantReadError:
                break
            except ZeroReturnError:
                self._deliver(chunks)
                chunks, size = [], 0
                self._peer_closed()
            except Error as e:
                failure = _untraced(e)
                self._deliver(chunks)
                chunks, size = [], 0
                self._tlsShutdownFinished(failure)
            else:
                chunks.append(data)
                size += len(data)
                if size >= _DELIVER:
                    self._deliver(chunks)
                    chunks, size = [], 0
                if (
                    fast
                    and not self._eof
                    and not _BIO_pending(connection._into_ssl, _NULL)
                    and not _SSL_pending(ssl)
                ):
                    # Nothing left to decrypt: another SSL_read would only say WANT_READ.
                    break
        self._deliver(chunks)
        self._flushSendBIO()

    def _peer_closed(self) -> None:
        """
        The peer ended TLS in order: its close_notify read while the connection was open
        (or, during `connectionLost`, the end of a connection whose context ignores an
        EOF without one). The first is a clean close whatever TCP does next: a client that
        closes its socket right after its close_notify (Go's, asyncio's, Java's) resets
        the connection when our own close_notify reaches it, and that reset is no reason to
        report the close as a loss. During `connectionLost` the transport's reason stands
        (a reset without a close_notify is still a reset).
        """
        if not self._eof and self._reason is None:
            self._reason = connectionDone
        self._shutdownTLS()
        self._tlsShutdownFinished(None)

    def _deliver(self, chunks: list[bytes]) -> None:
        if chunks and not self._aborted:
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            # What `ProtocolWrapper.dataReceived` does, without its call per delivery.
            self.wrappedProtocol.dataReceived(data)


def _untraced(error: Exception) -> Failure:
    """
    A failure for an OpenSSL error, without its traceback: that would hold the frames of this
    connection's methods (and so the connection and its OpenSSL state) in a reference cycle
    until a cyclic collection. The type and message are all that is reported.
    """
    error.__traceback__ = None
    return Failure(error)


class FastTLSFactory(TLSMemoryBIOFactory):
    """
    `TLSMemoryBIOFactory` building `FastTLSProtocol`s.
    """

    protocol = FastTLSProtocol


def fast_client_tls(connection_creator: Any, wrapped_endpoint: Any) -> Any:
    """
    Like `twisted.internet.endpoints.wrapClientTLS`, with `FastTLSProtocol`.
    """
    from twisted.internet.endpoints import _WrapperEndpoint

    return _WrapperEndpoint(
        wrapped_endpoint,
        lambda factory: FastTLSFactory(connection_creator, True, factory),
    )
