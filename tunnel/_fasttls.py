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
above are replaced, each keeping the error handling of the original.

Two shortcuts reach under pyOpenSSL's public API, each with a fallback when the private
names are missing: OpenSSL's partial-write mode is cleared (with a memory BIO, which never
refuses, one SSL_write then encrypts a whole buffer instead of one record per call), and
records are read with SSL_read into one shared buffer rather than a fresh allocation per
record, with pyOpenSSL's own error mapping for anything but success.
"""

from __future__ import annotations

from typing import Any

from OpenSSL.SSL import Error, WantReadError, ZeroReturnError

try:
    from OpenSSL._util import ffi as _ffi
    from OpenSSL._util import lib as _lib

    _SSL_read = _lib.SSL_read
    _PARTIAL_WRITE = _lib.SSL_MODE_ENABLE_PARTIAL_WRITE
    _clear_mode = _lib.SSL_clear_mode
    # One buffer for every connection: the reactor runs on one thread, and each record is
    # copied out before the next read.
    _READ_BUFFER = _ffi.new("char[]", 2**15)
    _buffer = _ffi.buffer
except (ImportError, AttributeError):  # pragma: no cover - a pyOpenSSL without these
    _SSL_read = None
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure

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


class FastTLSProtocol(TLSMemoryBIOProtocol):
    """
    `TLSMemoryBIOProtocol` with batched, copy-free writes and batched delivery.
    """

    def makeConnection(self, transport: Any) -> None:
        super().makeConnection(transport)
        connection = self._tlsConnection
        if _SSL_read is not None and connection is not None and hasattr(connection, "_ssl"):
            _clear_mode(connection._ssl, _PARTIAL_WRITE)

    def _write(self, bytes: Any) -> None:
        if self._lostTLSConnection:
            return
        view = memoryview(bytes)
        total = len(view)
        done = 0
        connection = self._tlsConnection
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
        fast = _SSL_read is not None and hasattr(connection, "_ssl")
        while not self._lostTLSConnection:
            try:
                if fast:
                    ssl = connection._ssl
                    result = _SSL_read(ssl, _READ_BUFFER, _RECV)
                    if result <= 0:
                        connection._raise_ssl_error(ssl, result)
                    data = _buffer(_READ_BUFFER, result)[:]
                else:
                    data = connection.recv(_RECV)
            except WantReadError:
                break
            except ZeroReturnError:
                self._deliver(chunks)
                chunks, size = [], 0
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
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
        self._deliver(chunks)
        self._flushSendBIO()

    def _deliver(self, chunks: list[bytes]) -> None:
        if chunks and not self._aborted:
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            ProtocolWrapper.dataReceived(self, data)


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
