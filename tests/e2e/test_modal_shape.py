"""
Code shaped like Modal's documented tunnel examples runs with only its import changed:
``import tunnel as modal`` (or ``from tunnel import forward``), the relay from
``TUNNEL_RELAY``/``TUNNEL_CA``, in a subprocess (the plain API runs the reactor in a thread).
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from tests.e2e.harness import Relay, clean_env, free_port, run

pytestmark = pytest.mark.e2e

#: Modal's examples (``modal.forward`` in a function body), with a local HTTP server on PORT
#: and an echo server on ECHO; the checks after each are ours.
MODAL_SHAPED = textwrap.dedent(
    """
    import http.server, json, socket, socketserver, ssl, sys, threading

    import tunnel as modal
    from tunnel import forward

    PORT, ECHO, CA = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    out = {}

    class Echo(socketserver.BaseRequestHandler):
        def handle(self):
            while data := self.request.recv(65536):
                self.request.sendall(data)

    web = http.server.ThreadingHTTPServer(("127.0.0.1", PORT), http.server.SimpleHTTPRequestHandler)
    echo = socketserver.ThreadingTCPServer(("127.0.0.1", ECHO), Echo)
    for server in (web, echo):
        threading.Thread(target=server.serve_forever, daemon=True).start()

    def https_status(tls_socket, alpn=()):
        host, port = tls_socket
        ctx = ssl.create_default_context(cafile=CA)
        if alpn:
            ctx.set_alpn_protocols(list(alpn))
        with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
            with ctx.wrap_socket(raw, server_hostname=host) as s:
                if alpn:
                    return s.selected_alpn_protocol()
                s.sendall(b"HEAD / HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n")
                return s.recv(12).decode()

    # --- https://modal.com/docs/guide/tunnels, as printed there ---------------------------
    def start_app():
        # Inside this `with` block, port 8000 on the container can be accessed by
        # the address at `tunnel.url`, which is randomly assigned.
        with modal.forward(PORT) as tunnel:
            print(f"tunnel.url        = {tunnel.url}")
            print(f"tunnel.tls_socket = {tunnel.tls_socket}")
            out["url"], out["tls_socket"] = tunnel.url, list(tunnel.tls_socket)
            out["host_port"] = [tunnel.host, tunnel.port]
            out["unencrypted_host_port"] = [tunnel.unencrypted_host, tunnel.unencrypted_port]
            out["status"] = https_status(tunnel.tls_socket)

    def tcp_example():
        with modal.forward(ECHO, unencrypted=True) as tunnel:
            hostname, port = tunnel.tcp_socket
            connection_str = f"{hostname}:{port}"
            print(f"Connect with {connection_str}")
            out["tcp"] = connection_str
            out["unencrypted"] = [tunnel.unencrypted_host, tunnel.unencrypted_port]
            with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
                s.sendall(b"modal-shaped")
                out["echo"] = s.recv(100).decode()

    def h2_example():
        with forward(PORT, h2_enabled=True) as tunnel:
            out["h2_alpn"] = https_status(tunnel.tls_socket, alpn=["h2", "http/1.1"])

    def errors():
        # As Modal's InvalidError: before any I/O.
        for name, call in {
            "port_0": lambda: modal.forward(0),
            "port_65536": lambda: modal.forward(65536),
            "h2_unencrypted": lambda: modal.forward(PORT, unencrypted=True, h2_enabled=True),
        }.items():
            try:
                with call():
                    out[name] = "no error"
            except ValueError as e:
                out[name] = str(e)
        with modal.forward(PORT):
            try:
                with modal.forward(PORT):
                    out["twice"] = "no error"
            except ValueError as e:
                out["twice"] = str(e)

    def sandbox_tunnels():
        # Sandbox.tunnels()'s {port: Tunnel}.
        with modal.forward_many([PORT, f"{ECHO}:tcp"]) as tunnels:
            out["many"] = {str(p): t.url for p, t in tunnels.items()}
            out["many_tcp"] = list(tunnels[ECHO].tcp_socket)

    start_app()
    tcp_example()
    h2_example()
    errors()
    sandbox_tunnels()
    print("RESULT " + json.dumps(out), flush=True)
    """
)


def test_modal_shaped_code_runs_with_the_import_changed(relay: Relay, tmp_path: Path) -> None:
    script = tmp_path / "modal_shaped.py"
    script.write_text(MODAL_SHAPED)
    port, echo = free_port(), free_port()
    env = clean_env({"TUNNEL_RELAY": f"localhost:{relay.port}", "TUNNEL_CA": str(relay.ca)})
    result = run(
        [sys.executable, str(script), str(port), str(echo), str(relay.ca)], timeout=90, env=env
    )
    output = result.stdout.decode(errors="replace")
    assert result.returncode == 0, output + result.stderr.decode(errors="replace")
    out = json.loads(next(x for x in output.splitlines() if x.startswith("RESULT "))[7:])
    host, tls_port = out["tls_socket"]
    assert out["url"] == f"https://{host}:{relay.port}" and tls_port == relay.port
    assert out["host_port"] == [host, tls_port]
    assert out["unencrypted_host_port"] == [None, None]
    assert out["status"] == "HTTP/1.0 200"
    assert f"tunnel.url        = {out['url']}" in output
    assert f"tunnel.tls_socket = ('{host}', {tls_port})" in output
    tcp_host, tcp_port = out["unencrypted"]
    assert out["tcp"] == f"{tcp_host}:{tcp_port}" and tcp_host == "tunnel.localhost"
    assert out["echo"] == "modal-shaped"
    assert out["h2_alpn"] == "h2"
    assert "out of range 1-65535" in out["port_0"]
    assert "out of range 1-65535" in out["port_65536"]
    assert "h2 applies to TLS tunnels only" in out["h2_unencrypted"]
    assert f"port {port} is already forwarded" in out["twice"]
    assert sorted(out["many"]) == sorted([str(port), str(echo)])
    assert out["many_tcp"][0] == "tunnel.localhost"
