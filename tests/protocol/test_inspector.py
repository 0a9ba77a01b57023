"""
The agent's connection records and the inspector's event stream, against a relay and an
agent in this process: what the data path records (bytes each way, half-closes, who ended a
connection and why) and what ``/events`` sends.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import protocol
from twisted.web.test.requesthelper import DummyRequest

from tests.protocol.inprocess import Echo, agent_for, connect, get_reactor, wait_until
from tunnel.agent._inspect import EventStream, parse_address, snapshot
from tunnel.agent.session import ForwardSpec
from tunnel.relay.service import RelayService


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Request(DummyRequest):
    """A `DummyRequest` whose producer is kept (DummyRequest's loops on a push producer)."""

    producer: Any = None

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None


def _messages(request: DummyRequest) -> list[tuple[str, Any]]:
    text = b"".join(request.written).decode()
    result = []
    for block in text.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in lines:
            result.append((lines["event"], json.loads(lines["data"])))
    return result


@pytest_twisted.ensureDeferred
async def test_connections_are_recorded_and_streamed(relay: RelayService, tmp_path: Path) -> None:
    reactor = get_reactor()
    echo = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
    agent = agent_for(relay, tmp_path / "state")
    stream = EventStream(agent)
    request = Request([b""])
    try:
        tunnel = await agent.forward(ForwardSpec(echo.getHost().port, unencrypted=True))
        refused = await agent.forward(ForwardSpec(_free_port(), unencrypted=True))
        stream.render_GET(request)  # type: ignore[arg-type]
        assert request.responseHeaders.getRawHeaders(b"content-type") == [b"text/event-stream"]
        (first,) = _messages(request)
        assert first[0] == "snapshot"
        assert {t["target"] for t in first[1]["tunnels"]} == {
            f"127.0.0.1:{echo.getHost().port}",
            refused.tcp_socket and f"127.0.0.1:{agent.forwards[1].spec.port}",
        }

        # An echoed connection, closed by the client: bytes each way, who closed it.
        client = await connect(tunnel.unencrypted_port or 0)
        assert client.transport is not None
        client.transport.write(b"ping" * 100)
        await wait_until(lambda: len(client.received) == 400, "the echo")
        (open_now,) = agent.events.open.values()
        assert open_now.state == "open" and open_now.from_client == 400
        assert open_now.to_client == 400
        client.transport.loseConnection()
        await wait_until(lambda: not agent.events.open, "the connection to end")
        (record,) = agent.events.connections()
        assert record.state == "closed" and record.by == "client"
        assert record.half_closed_by == "client" and record.ended is not None

        # A target that refuses: failed, and why.
        lost = await connect(refused.unencrypted_port or 0)
        await lost.lost
        await wait_until(lambda: len(list(agent.events.connections())) == 2, "the record")
        failed = list(agent.events.connections())[1]
        assert failed.state == "failed" and failed.by == "target"
        assert failed.why == f"nothing is listening on 127.0.0.1:{agent.forwards[1].spec.port}"

        counters = agent.events.counters()
        assert counters["connections"] == 2 and counters["closed"] == 1
        assert counters["failed"] == 1 and counters["open"] == 0
        assert counters["from_client"] == 400 and counters["to_client"] == 400

        kinds = [(name, value.get("kind")) for name, value in _messages(request)]
        assert ("connection", "connection_opened") in kinds
        assert ("connection", "connection_closed") in kinds
        assert ("connection", "target_refused") in kinds
        # A page that stops reading is paused, and gets a snapshot when it reads again.
        request.producer.pauseProducing()
        written = len(request.written)
        again = await connect(tunnel.unencrypted_port or 0)
        await wait_until(lambda: len(agent.events.open) == 1, "another connection")
        assert len(request.written) == written
        request.producer.resumeProducing()
        assert _messages(request)[-1][0] == "snapshot"
        assert again.transport is not None
        again.transport.loseConnection()
        await wait_until(lambda: not agent.events.open, "that connection to end")
        page = snapshot(agent)
        assert [c["state"] for c in page["connections"]] == ["closed", "failed", "closed"]
        assert any(e["kind"] == "target_refused" for e in page["events"])
    finally:
        stream.subscribers.clear()
        stream.idle()
        await agent.stop()
        await echo.stopListening()


@pytest.mark.parametrize(
    ("text", "address"),
    [
        (None, ("127.0.0.1", None)),
        ("", ("127.0.0.1", None)),
        ("4041", ("127.0.0.1", 4041)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),
        (":4050", ("127.0.0.1", 4050)),
        ("[::1]:4040", ("::1", 4040)),
        ("localhost", ("localhost", None)),
    ],
)
def test_inspector_addresses(text: str | None, address: tuple[str, int | None]) -> None:
    assert parse_address(text) == address


@pytest.mark.parametrize("text", ["a:b:c", "[::1", "127.0.0.1:http", "99999"])
def test_bad_inspector_addresses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_address(text)


@pytest_twisted.ensureDeferred
async def test_forward_with_inspect_serves_the_page(relay: RelayService, tmp_path: Path) -> None:
    import urllib.request

    from twisted.internet import threads

    from tunnel import client

    reactor = get_reactor()
    echo = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
    port = _free_port()
    try:
        t = await client.forward(
            reactor,
            echo.getHost().port,
            relay=f"localhost:{relay.port.getHost().port}",
            ca=str(tmp_path / "state" / "ca.pem"),
            inspect=f"127.0.0.1:{port}",
        )
        assert t.inspector_url == f"http://127.0.0.1:{port}/"

        def get(path: str) -> bytes:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
                return bytes(r.read())

        page = await threads.deferToThread(get, "/")
        assert b"Tunnels inspector" in page
        document = json.loads(await threads.deferToThread(get, "/connections"))
        assert [x["url"] for x in document["tunnels"]] == [t.url]
    finally:
        await client.shutdown(reactor)
        await echo.stopListening()
    # The page stopped with the agent.
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect(("127.0.0.1", port))


def test_forward_refuses_a_bad_inspector_address_at_once() -> None:
    from tunnel import client

    with pytest.raises(ValueError, match="inspector address"):
        client.forward(get_reactor(), 8000, relay="localhost:1", inspect="a:b:c")
