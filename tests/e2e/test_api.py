"""
The Python API end to end against a relay process: plain ``tunnel.forward`` (in a
subprocess, since it runs the reactor in a thread) and the Deferred ``tunnel.client.forward``
(in-process, on pytest-twisted's reactor).
"""

from __future__ import annotations

import json
import socket
import sys
import textwrap
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import threads

from tests.e2e.conftest import World
from tests.e2e.harness import DEADLINE, LOOPBACK, Endpoint, Relay, free_port, run, tls_connect
from tunnel import client
from tunnel.errors import TunnelError

pytestmark = pytest.mark.e2e


def get_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def https_get(relay: Relay, host: str, path: str = "/hello") -> bytes:
    """GET over TLS through the relay (blocking); the whole response."""
    endpoint = Endpoint(host, relay.port, None)
    with tls_connect(relay, endpoint) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


def tcp_echo(port: int, payload: bytes = b"ping through tcp") -> bytes:
    with socket.create_connection((LOOPBACK, port), timeout=DEADLINE) as s:
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            data = s.recv(65536)
            if not data:
                break
            got += data
    return got


# ---------------------------------------------------------------------------------------------
# Plain Python, in a subprocess

SCRIPT = textwrap.dedent(
    """
    import json, socket, ssl, sys
    import tunnel

    relay, ca, http_port, echo_port, dead = sys.argv[1:6]
    http_port, echo_port = int(http_port), int(echo_port)
    kw = dict(relay=relay, ca=ca)
    out = {}

    def get(t):
        ctx = ssl.create_default_context(cafile=ca)
        with socket.create_connection(("127.0.0.1", t.port), timeout=20) as raw:
            with ctx.wrap_socket(raw, server_hostname=t.host) as s:
                s.sendall(b"GET /hello HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n")
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
        return data.decode()

    def echo(port):
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            s.sendall(b"plain ping")
            return s.recv(100).decode()

    with tunnel.forward(http_port, **kw) as a, tunnel.forward(
        echo_port, unencrypted=True, **kw
    ) as b:
        out["a_url"], out["a_tls"] = a.url, list(a.tls_socket)
        out["a_get"] = get(a)
        out["b_tcp"] = list(b.tcp_socket)
        out["b_echo"] = echo(b.tcp_socket[1])
        try:
            _ = a.tcp_socket
        except tunnel.TunnelError as e:
            out["tcp_socket_error"] = str(e)
        try:
            with tunnel.forward(http_port, **kw):
                pass
        except ValueError as e:
            out["duplicate_error"] = str(e)
    with tunnel.forward(http_port, **kw) as again:
        out["again_url"] = again.url
        out["again_get"] = get(again)
    for bad in (0, "abc"):
        try:
            # A relay where nothing listens: a ValueError must come before any I/O.
            with tunnel.forward(bad, relay=dead, ca=ca):
                pass
        except ValueError as e:
            out[f"bad_{bad}"] = str(e)
        except Exception as e:
            out[f"bad_{bad}"] = f"WRONG {type(e).__name__}: {e}"
    print("RESULT " + json.dumps(out), flush=True)
    """
)


def test_plain_forward_in_a_subprocess(world: World, tmp_path: Any):
    script = tmp_path / "plain_api.py"
    script.write_text(SCRIPT)
    relay = world.relay
    result = run(
        [
            sys.executable,
            str(script),
            f"localhost:{relay.port}",
            str(relay.ca),
            str(world.backends["http"].port),
            str(world.backends["echo_tcp"].port),
            f"localhost:{free_port()}",
        ],
        timeout=60,
    )
    output = result.stdout.decode(errors="replace")
    assert result.returncode == 0, output + result.stderr.decode(errors="replace")
    line = next(line for line in output.splitlines() if line.startswith("RESULT "))
    out = json.loads(line[len("RESULT ") :])
    host, port = out["a_tls"]
    assert port == relay.port and host.endswith(".tunnel.localhost")
    assert out["a_url"] == f"https://{host}:{port}"
    assert out["a_get"].startswith("HTTP/1.0 200") or out["a_get"].startswith("HTTP/1.1 200")
    assert out["a_get"].endswith("hello /hello\n")
    assert out["b_tcp"][0] == "tunnel.localhost" and out["b_tcp"][1] != relay.port
    assert out["b_echo"] == "plain ping"
    assert "unencrypted=True" in out["tcp_socket_error"]
    assert str(world.backends["http"].port) in out["duplicate_error"]
    assert out["again_url"] != out["a_url"]
    assert out["again_get"].endswith("hello /hello\n")
    assert "out of range" in out["bad_0"], out["bad_0"]
    assert "'abc'" in out["bad_abc"] and "integer" in out["bad_abc"], out["bad_abc"]


# ---------------------------------------------------------------------------------------------
# Deferred API, in-process


@pytest_twisted.ensureDeferred
async def test_deferred_forward_several_close_and_again(world: World):
    reactor = get_reactor()
    relay = world.relay
    kw = {"relay": f"localhost:{relay.port}", "ca": str(relay.ca)}
    http_port = world.backends["http"].port
    echo_port = world.backends["echo_tcp"].port
    try:
        a_d = client.forward(reactor, http_port, **kw)
        b_d = client.forward(reactor, echo_port, unencrypted=True, **kw)
        a = await a_d.addTimeout(DEADLINE, reactor)
        b = await b_d.addTimeout(DEADLINE, reactor)
        assert a.host != b.host
        response = await threads.deferToThread(https_get, relay, a.host)
        assert response.endswith(b"hello /hello\n")
        assert b.tcp_socket[0] == "tunnel.localhost"
        assert await threads.deferToThread(tcp_echo, b.tcp_socket[1]) == b"ping through tcp"

        with pytest.raises(TunnelError, match="unencrypted=True"):
            _ = a.tcp_socket
        with pytest.raises(ValueError, match=str(http_port)):
            client.forward(reactor, http_port, **kw)

        await a.close()
        await b.close()
        # Closed: the old name is refused at the TLS handshake, the TCP port is closed.
        with pytest.raises(OSError):
            await threads.deferToThread(https_get, relay, a.host)
        with pytest.raises(OSError):
            await threads.deferToThread(tcp_echo, b.tcp_socket[1])

        again = await client.forward(reactor, http_port, **kw).addTimeout(DEADLINE, reactor)
        assert again.host != a.host
        response = await threads.deferToThread(https_get, relay, again.host)
        assert response.endswith(b"hello /hello\n")
        await again.close()
    finally:
        await client.shutdown(reactor)


@pytest_twisted.ensureDeferred
async def test_deferred_forward_bad_arguments_before_any_io(world: World):
    reactor = get_reactor()
    # A relay where nothing listens: only argument checking can answer in time.
    kw = {"relay": f"localhost:{free_port()}", "ca": str(world.relay.ca)}
    try:
        with pytest.raises(ValueError, match="out of range"):
            client.forward(reactor, 0, **kw)
        with pytest.raises(ValueError, match="'abc'"):
            client.forward(reactor, "abc", **kw)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="relay"):
            client.forward(reactor, 8000, relay="no-port-here", ca=str(world.relay.ca))
        with pytest.raises(ValueError, match="does not exist"):
            client.forward(reactor, 8000, relay=kw["relay"], ca="/nonexistent/ca.pem")
    finally:
        await client.shutdown(reactor)


@pytest_twisted.ensureDeferred
async def test_async_with_forward(world: World):
    reactor = get_reactor()
    relay = world.relay
    kw = {"relay": f"localhost:{relay.port}", "ca": str(relay.ca)}
    try:
        async with client.forward(reactor, world.backends["http"].port, **kw) as t:
            assert t.url == f"https://{t.host}:{relay.port}"
            response = await threads.deferToThread(https_get, relay, t.host)
            assert response.endswith(b"hello /hello\n")
        # Leaving the block closed the tunnel.
        with pytest.raises(OSError):
            await threads.deferToThread(https_get, relay, t.host)
    finally:
        await client.shutdown(reactor)


# ---------------------------------------------------------------------------------------------
# Several ports at once: forward_many


@pytest_twisted.ensureDeferred
async def test_forward_many_gives_tunnels_by_port(world: World):
    reactor = get_reactor()
    relay = world.relay
    kw = {"relay": f"localhost:{relay.port}", "ca": str(relay.ca)}
    http_port = world.backends["http"].port
    echo_port = world.backends["echo_tcp"].port
    try:
        d = client.forward_many(reactor, [http_port, f"{echo_port}:tcp"], **kw)
        tunnels = await d.addTimeout(DEADLINE, reactor)
        assert sorted(tunnels) == sorted([http_port, echo_port])
        web, echo = tunnels[http_port], tunnels[echo_port]
        response = await threads.deferToThread(https_get, relay, web.host)
        assert response.endswith(b"hello /hello\n")
        assert echo.unencrypted_host == "tunnel.localhost"
        assert await threads.deferToThread(tcp_echo, echo.tcp_socket[1]) == b"ping through tcp"

        # A port already forwarded: refused at once, and nothing else asked of the relay.
        agent = client.agent_for(reactor, kw["relay"], None, kw["ca"])
        held = len(agent.forwards)
        with pytest.raises(ValueError, match=f"port {http_port} is already forwarded"):
            client.forward_many(reactor, [free_port(), http_port], **kw)
        assert len(agent.forwards) == held

        await client.close_all(tunnels)
        with pytest.raises(OSError):
            await threads.deferToThread(https_get, relay, web.host)

        async with client.forward_many(reactor, [http_port], h2_enabled=False, **kw) as again:
            response = await threads.deferToThread(https_get, relay, again[http_port].host)
            assert response.endswith(b"hello /hello\n")
        with pytest.raises(OSError):
            await threads.deferToThread(https_get, relay, again[http_port].host)
    finally:
        await client.shutdown(reactor)


@pytest_twisted.ensureDeferred
async def test_forward_many_is_all_or_nothing(procs: Any):
    reactor = get_reactor()
    relay = procs.relay(extra=["--max-tunnels-per-agent", "1"])
    kw = {"relay": f"localhost:{relay.port}", "ca": str(relay.ca)}
    try:
        d = client.forward_many(reactor, [free_port(), free_port()], **kw)
        with pytest.raises(TunnelError):
            await d.addTimeout(DEADLINE, reactor)
        # The tunnel that was granted is closed again: the agent holds nothing, and the relay
        # was told.
        assert client.agent_for(reactor, kw["relay"], None, kw["ca"]).forwards == []
        await threads.deferToThread(relay.wait_log, r"closed by its agent")
    finally:
        await client.shutdown(reactor)
