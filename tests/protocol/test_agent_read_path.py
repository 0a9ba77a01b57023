"""The agent's link read path: the pass-through layers Twisted's connecting adds (the
endpoint's ``_WrappingProtocol``, ``ClientService``'s proxy) are taken off the way in, and
what they are there for (the connection-lost notification) still happens."""

from __future__ import annotations

from typing import Any

from twisted.application._client_service import _ReconnectingProtocolProxy
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import _WrappingProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure

from tunnel.agent._link import shorten_read_path
from tunnel.link import LinkProtocol


def _connected() -> tuple[LinkProtocol, Any, ProtocolWrapper, StringTransport, list[Failure]]:
    """socket transport → endpoint wrapper → TLS-like wrapper → ClientService proxy → link,
    connected as Twisted connects them."""
    link = LinkProtocol(Clock(), client=True)
    lost: list[Failure] = []
    proxy = _ReconnectingProtocolProxy(link, lost.append)
    tls = ProtocolWrapper(WrappingFactory(Factory()), proxy)
    connected: Deferred[Any] = Deferred()
    tcp = StringTransport()
    tcp.protocol = _WrappingProtocol(connected, tls)  # type: ignore[attr-defined]
    tcp.protocol.makeConnection(tcp)  # type: ignore[attr-defined]
    return link, proxy, tls, tcp, lost


def test_both_layers_are_taken_off_the_read_path() -> None:
    link, proxy, tls, tcp, _ = _connected()
    assert shorten_read_path(link) == 2
    assert tcp.protocol is tls  # type: ignore[attr-defined]
    # The proxy's dataReceived is the link's own, not a __getattr__ lookup per read.
    assert "dataReceived" in vars(proxy)
    assert proxy.dataReceived == link.dataReceived


def test_reads_reach_the_link_and_the_loss_still_reaches_clientservice() -> None:
    link, _, _, tcp, lost = _connected()
    shorten_read_path(link)
    received: list[bytes] = []
    link.mux.receive_data = lambda data: received.append(data) or []  # type: ignore[method-assign]
    tcp.protocol.dataReceived(b"abc")  # type: ignore[attr-defined]
    assert received == [b"abc"]
    reason = Failure(ConnectionDone())
    tcp.protocol.connectionLost(reason)  # type: ignore[attr-defined]
    assert lost == [reason]  # ClientService's bookkeeping: it reconnects from here
    assert link._lost


def test_other_shapes_are_left_as_they_are() -> None:
    link = LinkProtocol(Clock(), client=True)
    tcp = StringTransport()
    link.makeConnection(tcp)
    assert shorten_read_path(link) == 0
    assert not hasattr(tcp, "protocol")
