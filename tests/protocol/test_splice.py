"""
`tunnel.link.splice`, `SpliceProtocol` and `half_close`: a link stream joined to a TCP-like
`StringTransport`, with producers both ways and half-close carried across.

The link's two ends run over `twisted.test.iosim`; the far end of the stream is a
`StreamRecorder` on the server link, the near end is spliced to the string transport.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from twisted.internet import error, interfaces
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from tests.protocol.linkpair import LinkPair, StreamRecorder, make_link_pair
from tunnel.link import HIGH_WATER, SpliceProtocol, Stream, StreamResetError, half_close, splice
from tunnel.wire import ErrorCode


@implementer(interfaces.ITCPTransport)
class TCPStringTransport(StringTransport):
    """
    A `StringTransport` that is a TCP transport: it can half-close.
    """

    write_closed = False
    nodelay = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.nodelay = enabled


class RecordingTLS(TLSMemoryBIOProtocol):
    """
    A `TLSMemoryBIOProtocol` that records how it is closed instead of speaking TLS.
    """

    def __init__(self) -> None:  # no wrapped factory: nothing of TLS is used
        self.calls: list[str] = []
        self.written: list[bytes] = []
        self.producer: Any = None

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def loseConnection(self) -> None:
        self.calls.append("loseConnection")

    def loseWriteConnection(self) -> None:
        self.calls.append("loseWriteConnection")

    def abortConnection(self) -> None:
        self.calls.append("abortConnection")


@dataclass
class Spliced:
    pair: LinkPair
    stream: Stream
    tcp: Any
    tcp_proto: SpliceProtocol
    stream_side: SpliceProtocol
    remote_stream: Stream
    remote: StreamRecorder


def make_spliced(tcp: Any | None = None) -> Spliced:
    """
    Open a stream from the client and splice its client end to `tcp` the way the agent does:
    the TCP side's protocol is connected first, then the stream side is attached.
    """
    pair = make_link_pair()
    stream = pair.client.openStream(b"target")
    pair.flush()
    remote_stream, _, remote = pair.server.opened[-1]
    tcp = tcp if tcp is not None else TCPStringTransport()
    tcp_proto = SpliceProtocol(stream)
    tcp_proto.makeConnection(tcp)
    stream_side = splice(stream, tcp)
    return Spliced(pair, stream, tcp, tcp_proto, stream_side, remote_stream, remote)


def test_bytes_flow_both_ways() -> None:
    s = make_spliced()
    s.remote_stream.write(b"to the local server")
    s.tcp_proto.dataReceived(b"from the local server")
    s.pair.flush()
    assert s.tcp.value() == b"to the local server"
    assert s.remote.data == b"from the local server"
    assert s.tcp.nodelay


def test_data_that_arrived_before_the_splice_is_delivered() -> None:
    pair = make_link_pair()
    stream = pair.client.openStream(b"")
    pair.flush()
    remote_stream = pair.server.opened[-1][0]
    remote_stream.write(b"early")
    pair.flush()
    tcp = TCPStringTransport()
    SpliceProtocol(stream).makeConnection(tcp)
    splice(stream, tcp)
    assert tcp.value() == b"early"


def test_producers_are_registered_both_ways() -> None:
    s = make_spliced()
    assert s.tcp.producer is s.stream
    assert s.tcp.streaming
    assert s.stream._producer is s.tcp


def test_a_stalled_peer_pauses_the_tcp_transport_and_resumes_it() -> None:
    s = make_spliced()
    s.remote_stream.pauseProducing()
    chunk = b"p" * 16384
    sent = 0
    while s.tcp.producerState == "producing" and sent < 4 * 1024 * 1024:
        s.tcp_proto.dataReceived(chunk)
        sent += len(chunk)
        s.pair.flush()
    assert s.tcp.producerState == "paused"
    assert s.pair.client.mux.pending(s.stream.stream_id) > HIGH_WATER
    s.remote_stream.resumeProducing()
    s.pair.flush()
    assert s.tcp.producerState == "producing"
    assert s.remote.received == sent


def test_a_full_tcp_buffer_pauses_the_stream() -> None:
    s = make_spliced()
    s.tcp.producer.pauseProducing()  # what a TCP transport does when its buffer fills
    s.remote_stream.write(b"r" * 100_000)
    s.pair.flush()
    assert s.tcp.value() == b""
    # Nothing was consumed, so no credit went back.
    assert s.pair.server.mux.send_window(s.remote_stream.stream_id) == 256 * 1024 - 100_000
    s.tcp.producer.resumeProducing()
    s.pair.flush()
    assert s.tcp.value() == b"r" * 100_000


def test_stream_fin_half_closes_the_tcp_transport() -> None:
    s = make_spliced()
    s.remote_stream.write(b"request")
    s.remote_stream.loseWriteConnection()
    s.pair.flush()
    assert s.tcp.value() == b"request"
    assert s.tcp.write_closed
    assert not s.tcp.disconnecting
    # The local server can still answer.
    s.tcp_proto.dataReceived(b"response")
    s.pair.flush()
    assert s.remote.data == b"response"


def test_tcp_read_eof_sends_a_fin() -> None:
    s = make_spliced()
    s.tcp_proto.dataReceived(b"upload")
    s.tcp_proto.readConnectionLost()
    s.pair.flush()
    assert s.remote.data == b"upload"
    assert s.remote.read_closed == 1
    assert s.remote.lost is None
    s.remote_stream.write(b"still writing")
    s.pair.flush()
    assert s.tcp.value() == b"still writing"


def test_both_half_closes_close_the_stream_and_the_tcp_transport() -> None:
    s = make_spliced()
    s.tcp_proto.readConnectionLost()
    s.remote_stream.loseWriteConnection()
    s.pair.flush()
    assert s.tcp.write_closed
    assert s.remote.lost is not None
    assert s.remote.lost.check(error.ConnectionDone)
    assert not s.remote.lost.check(StreamResetError)
    # The stream side learnt the stream is over, and closed the TCP transport cleanly.
    assert s.stream_side.lost
    assert s.tcp.disconnecting
    assert not s.tcp.disconnected  # not aborted
    s.tcp_proto.connectionLost(Failure(error.ConnectionDone()))
    assert s.pair.client.streams == {}


def test_half_close_on_a_tls_transport_closes_it_entirely() -> None:
    tls = RecordingTLS()
    half_close(tls)
    assert tls.calls == ["loseConnection"]


def test_stream_fin_closes_a_tls_transport_entirely() -> None:
    tls = RecordingTLS()
    s = make_spliced(tls)
    assert tls.producer is s.stream
    s.remote_stream.write(b"to tls")
    s.remote_stream.loseWriteConnection()
    s.pair.flush()
    assert tls.written == [b"to tls"]
    assert tls.calls == ["loseConnection"]


def test_half_close_choices() -> None:
    tcp = TCPStringTransport()
    half_close(tcp)
    assert tcp.write_closed and not tcp.disconnecting
    plain = StringTransport()  # not a TCP transport: no half-close to offer
    half_close(plain)
    assert plain.disconnecting
    pair = make_link_pair()
    opened = pair.open()
    half_close(opened.stream)
    pair.flush()
    assert opened.remote.read_closed == 1
    assert opened.local.lost is None


def test_clean_tcp_close_sends_a_fin() -> None:
    s = make_spliced()
    s.tcp_proto.dataReceived(b"last")
    s.tcp_proto.connectionLost(Failure(error.ConnectionDone()))
    s.pair.flush()
    assert s.remote.data == b"last"
    assert s.remote.read_closed == 1
    assert s.remote.lost is None
    # Data the peer still sends is discarded, with its credit returned.
    s.remote_stream.write(b"x" * 300_000)
    s.pair.flush()
    assert s.tcp.value() == b""
    assert s.pair.server.mux.pending(s.remote_stream.stream_id) == 0
    s.remote_stream.loseWriteConnection()
    s.pair.flush()
    assert s.remote.lost is not None and s.remote.lost.check(error.ConnectionDone)
    assert s.pair.client.streams == {} and s.pair.server.streams == {}


@pytest.mark.parametrize(
    "reason",
    [error.ConnectionLost(), error.ConnectionRefusedError(), error.TimeoutError()],
    ids=["lost", "refused", "timeout"],
)
def test_tcp_abort_resets_the_stream(reason: Exception) -> None:
    s = make_spliced()
    s.tcp_proto.connectionLost(Failure(reason))
    s.pair.flush()
    assert s.remote.lost is not None
    assert s.remote.lost.check(StreamResetError)
    assert s.remote.lost.value.code == ErrorCode.CANCEL
    assert s.stream_side.lost


def test_stream_reset_aborts_the_tcp_transport() -> None:
    s = make_spliced()
    s.remote_stream.abortConnection(ErrorCode.SHUTDOWN)
    s.pair.flush()
    assert s.tcp.disconnected  # StringTransport.abortConnection
    assert s.stream_side.lost


def test_link_loss_aborts_every_spliced_transport() -> None:
    s = make_spliced()
    s.pair.client_io.loseConnection()
    s.pair.flush()
    assert s.tcp.disconnected
    assert s.remote.lost is not None and s.remote.lost.check(StreamResetError)
