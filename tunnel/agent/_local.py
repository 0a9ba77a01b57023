"""
The local data path: for each stream the relay opens, a connection to the forward's local
target (with a PROXY protocol header first if asked), spliced to the stream both ways.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import error
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from tunnel.agent._dial import describe_failure
from tunnel.agent._proxyheader import proxy_header
from tunnel.agent.settings import ForwardSpec
from tunnel.link import SpliceProtocol, Stream
from tunnel.wire import ErrorCode
from tunnel.wire.control import StreamInfo

__all__ = ["LocalFactory"]

_log = Logger()


class LocalFactory(ClientFactory):
    """
    Connects one stream to the local target.
    """

    noisy = False

    def __init__(self, stream: Stream, spec: ForwardSpec, info: StreamInfo) -> None:
        self.stream = stream
        self.spec = spec
        self.info = info

    def buildProtocol(self, addr: Any) -> Protocol:
        header = b""
        if self.spec.proxy_protocol:
            info = self.info
            header = proxy_header(
                self.spec.proxy_protocol,
                (info.client_host, info.client_port),
                (info.server_host, info.server_port),
            )
        return _LocalProtocol(self.stream, header)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        timed_out = reason.check(error.TimeoutError, error.UserError) is not None
        code = ErrorCode.CONNECT_TIMEOUT if timed_out else ErrorCode.CONNECT_FAILED
        _log.warn(
            "cannot connect to {target}: {reason}",
            target=self.spec.target,
            reason=describe_failure(reason),
        )
        self.stream.abortConnection(code)


class _LocalProtocol(SpliceProtocol):
    """
    The local target's connection, joined to its stream.
    """

    def __init__(self, stream: Stream, header: bytes = b"") -> None:
        super().__init__(stream)
        #: Written to the target before anything from the stream (a PROXY header).
        self.header = header

    def connectionMade(self) -> None:
        stream: Stream = self.other
        transport = self.transport
        assert transport is not None
        if stream._closed:
            transport.abortConnection()  # type: ignore[attr-defined]
            return
        if self.header:
            transport.write(self.header)
        super().connectionMade()
        stream.attach(SpliceProtocol(transport))
