"""
Ownership at the protocol tier: reclaims across tokens and of held tunnels (RelayLinks over
iosim, time on a Clock), and the watch over paused public connections (a Clock, and real
loopback sockets for what the kernel says about a peer).
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim

from tests.protocol.linkpair import LinkPair, RecordingLink
from tunnel.relay._peerwatch import PausedWatch, PeerState, peer_state
from tunnel.relay.registry import ReclaimKey
from tunnel.relay.service import RECLAIM_PROBE_TIMEOUT, Relay, RelayConfig, RelayLink
from tunnel.wire.control import AgentHello, TunnelRequest, decode_message, encode_message

KEY = ReclaimKey(b"k" * 32)


def make_relay(clock: MemoryReactorClock) -> Relay:
    config = RelayConfig(domain="tunnel.localhost", tokens=frozenset({"token-a", "token-b"}))
    return Relay(clock, config, tls=None, reclaim_key=KEY)  # type: ignore[arg-type]


def agent(relay: Relay, clock: MemoryReactorClock, token: str) -> LinkPair:
    """An agent's link (a RecordingLink) to a RelayLink of `relay`, accepted with `token`."""
    server = RelayLink(relay)
    client = RecordingLink(clock, client=True)
    client_io, server_io = iosim.makeFakeClient(client), iosim.makeFakeServer(server)
    pump = iosim.connect(server, server_io, client, client_io, greet=False, clock=clock)
    pair = LinkPair(clock, client, server, client_io, server_io, pump)  # type: ignore[arg-type]
    pair.flush()
    client.sendControl(encode_message(AgentHello(1, token, "test")))
    pair.flush()
    assert server.authenticated
    return pair


def ask(pair: LinkPair, request: TunnelRequest) -> None:
    pair.client.sendControl(encode_message(request))
    pair.flush()


def answers(pair: LinkPair) -> list[Any]:
    return [
        m
        for m in (decode_message(p) for p in pair.client.controls)
        if m is not None and type(m).__name__ in ("TunnelGranted", "TunnelRefused")
    ]


def granted(relay: Relay, clock: MemoryReactorClock, token: str) -> tuple[LinkPair, Any]:
    pair = agent(relay, clock, token)
    ask(pair, TunnelRequest(1, "tls"))
    (answer,) = answers(pair)
    assert type(answer).__name__ == "TunnelGranted", answer
    return pair, answer


def test_secret_binds_the_owner() -> None:
    secret = KEY.secret("tls", "k3j5h2g7d9q1xwzp", "token:aa")
    assert KEY.verify("tls", "k3j5h2g7d9q1xwzp", secret, "token:aa")
    assert not KEY.verify("tls", "k3j5h2g7d9q1xwzp", secret, "token:bb")
    assert not KEY.verify("tls", "k3j5h2g7d9q1xwzp", secret, "")
    assert KEY.verify("tls", "k3j5h2g7d9q1xwzp", KEY.secret("tls", "k3j5h2g7d9q1xwzp"))


def test_reclaim_with_another_tokens_secret_is_refused() -> None:
    clock = MemoryReactorClock()
    relay = make_relay(clock)
    first, grant = granted(relay, clock, "token-a")
    first.client.transport.loseConnection()  # type: ignore[union-attr]
    first.flush()
    assert len(relay.registry) == 0
    other = agent(relay, clock, "token-b")
    ask(other, TunnelRequest(1, "tls", reclaim_id=grant.tunnel_id, reclaim_secret=grant.secret))
    (answer,) = answers(other)
    assert answer.code == "reclaim_refused", answer
    # The same secret on the same token gets the id back.
    again = agent(relay, clock, "token-a")
    ask(again, TunnelRequest(1, "tls", reclaim_id=grant.tunnel_id, reclaim_secret=grant.secret))
    (answer,) = answers(again)
    assert answer.tunnel_id == grant.tunnel_id


def test_live_holder_keeps_its_tunnel() -> None:
    clock = MemoryReactorClock()
    relay = make_relay(clock)
    holder, grant = granted(relay, clock, "token-a")
    rival = agent(relay, clock, "token-a")
    ask(rival, TunnelRequest(1, "tls", reclaim_id=grant.tunnel_id, reclaim_secret=grant.secret))
    assert answers(rival) == []  # waiting for the holder
    holder.flush()  # the holder answers the relay's ping
    rival.flush()
    (answer,) = answers(rival)
    assert answer.code == "reclaim_refused", answer
    record = relay.registry.get(grant.tunnel_id)
    assert record is not None and record.owner is holder.server


def test_silent_holder_loses_its_tunnel_after_the_probe_timeout() -> None:
    clock = MemoryReactorClock()
    relay = make_relay(clock)
    _holder, grant = granted(relay, clock, "token-a")
    heir = agent(relay, clock, "token-a")
    ask(heir, TunnelRequest(1, "tls", reclaim_id=grant.tunnel_id, reclaim_secret=grant.secret))
    clock.advance(RECLAIM_PROBE_TIMEOUT * 0.9)
    heir.flush()
    assert answers(heir) == []
    clock.advance(RECLAIM_PROBE_TIMEOUT * 0.1)
    heir.flush()
    (answer,) = answers(heir)
    assert answer.tunnel_id == grant.tunnel_id, answer
    record = relay.registry.get(grant.tunnel_id)
    assert record is not None and record.owner is heir.server


def test_reclaiming_link_gone_meanwhile_takes_nothing() -> None:
    clock = MemoryReactorClock()
    relay = make_relay(clock)
    holder, grant = granted(relay, clock, "token-a")
    heir = agent(relay, clock, "token-a")
    ask(heir, TunnelRequest(1, "tls", reclaim_id=grant.tunnel_id, reclaim_secret=grant.secret))
    heir.server.transport.loseConnection()  # type: ignore[union-attr]
    heir.flush()
    clock.advance(RECLAIM_PROBE_TIMEOUT)
    record = relay.registry.get(grant.tunnel_id)
    assert record is not None and record.owner is holder.server
    assert heir.server.pending_reclaims == 0


# -- paused public connections ------------------------------------------------------------


class Paused:
    def __init__(self, state: str, tls: bool) -> None:
        self.state = state
        self.may_half_close = not tls
        self.gone: list[str] = []

    def peer_socket(self) -> Any:
        return self

    def peer_gone(self, why: str) -> None:
        self.gone.append(why)


def test_paused_watch_rules() -> None:
    clock = MemoryReactorClock()
    watch = PausedWatch(clock, 1.0, 10.0, state_of=lambda c: c.state)
    reset = Paused(PeerState.RESET, tls=False)
    tls_fin = Paused(PeerState.FINISHED, tls=True)
    tcp_fin = Paused(PeerState.FINISHED, tls=False)
    resumed = Paused(PeerState.FINISHED, tls=False)
    alive = Paused(PeerState.OPEN, tls=True)
    for c in (reset, tls_fin, tcp_fin, resumed, alive):
        watch.add(c)
    assert len(clock.getDelayedCalls()) == 1  # one timer for all
    clock.advance(1.0)
    assert reset.gone and tls_fin.gone and not tcp_fin.gone and not alive.gone
    clock.advance(5.0)
    watch.discard(resumed)  # resumed: the transport reads the FIN itself
    clock.advance(4.0)
    assert not tcp_fin.gone
    clock.advance(1.0)
    assert tcp_fin.gone and not resumed.gone and not alive.gone
    watch.discard(alive)
    assert clock.getDelayedCalls() == []


def _pair() -> tuple[socket.socket, socket.socket]:
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    return client, server


def _until(check: Any) -> None:
    deadline = time.monotonic() + 5
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_peer_state_sees_fin_and_reset_behind_unread_data() -> None:
    client, server = _pair()
    try:
        client.sendall(b"x" * 100_000)  # never read by `server`
        assert peer_state(server) == PeerState.OPEN
        client.shutdown(socket.SHUT_WR)
        _until(lambda: peer_state(server) == PeerState.FINISHED)
    finally:
        client.close()
        server.close()
    client, server = _pair()
    try:
        client.sendall(b"x" * 100_000)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        _until(lambda: peer_state(server) == PeerState.RESET)
    finally:
        server.close()
    assert peer_state(None) == PeerState.UNKNOWN
