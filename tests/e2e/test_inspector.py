"""
The agent's inspector in a real browser: headless Chromium loads the page from the agent's
admin endpoint, a request goes through the tunnel (curl), and the new connection appears in
the page without a reload, read from the DOM through the DevTools protocol.

A screenshot is kept in the test's directory; with ``TUNNELS_SCREENSHOT=PATH`` it is also
written there (``docs/inspector.png`` is made so).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.browser import start_chromium
from tests.e2e.harness import LOOPBACK, Procs, curl, free_port, require_tool, wait_for

pytestmark = pytest.mark.e2e


def test_a_connection_appears_live_in_the_inspector(procs: Procs, tmp_path: Path) -> None:
    require_tool("curl")
    web = procs.backend("http")
    echo = procs.backend("echo")
    nothing = free_port()
    relay = procs.relay()
    agent = procs.agent(relay, [str(web.port), f"{echo.port}:tcp", str(nothing)])
    tunnel = agent.ready(str(web.port))
    echo_tunnel = agent.ready(f"{echo.port}:tcp")
    dead_tunnel = agent.ready(str(nothing))
    inspector = f"http://{LOOPBACK}:{agent.proc.admin_port}/"

    browser = start_chromium(procs, tmp_path / "chromium-profile")
    try:
        browser.call("Page.enable")
        browser.call("Page.navigate", url=inspector)
        # The page has its snapshot once the tunnel's URL is in the tunnels table.
        wait_for(
            lambda: browser.evaluate(
                "Array.from(document.querySelectorAll('#tunnels a')).map(a => a.textContent)"
                f".includes({json.dumps(tunnel.url)})"
            ),
            "the tunnel in the page",
        )
        assert "does not parse HTTP" in browser.evaluate("document.body.innerText")
        before = browser.evaluate("performance.timeOrigin")

        # A request through the tunnel; the relay sees curl's local port as the client's.
        result = curl(relay, tunnel, "-w", "\n%{local_port}", tunnel.url + "/hello")
        assert result.returncode == 0, result.stderr
        body, _, local_port = result.stdout.decode().rpartition("\n")
        assert body == "hello /hello\n"

        row = f"document.querySelector('#connections tr[data-client-port=\"{local_port}\"]')"
        closed = f"{row} && {row}.dataset.state === 'closed' && {row}.innerText"
        try:
            state = wait_for(lambda: browser.evaluate(closed), "the connection closed in the page")
        except AssertionError as e:
            table = browser.evaluate("document.getElementById('connections').innerText")
            with urllib.request.urlopen(inspector + "connections", timeout=5) as r:
                known = json.load(r)["connections"]
            raise AssertionError(f"{e}\nthe page's table: {table!r}\nthe agent's: {known}")
        assert "127.0.0.1:" + local_port in state
        assert tunnel.id in state  # the tunnel's name, with its target
        # Live: the same document, not a reload.
        assert browser.evaluate("performance.timeOrigin") == before
        assert browser.evaluate("document.getElementById('c-connections').textContent") == "1"

        # A target that refuses: the page says why.
        assert curl(relay, dead_tunnel, dead_tunnel.url + "/").returncode != 0
        failed = "document.querySelector('#connections tr[data-state=\"failed\"]')"
        why = wait_for(
            lambda: browser.evaluate(f"{failed} && {failed}.innerText"), "the failed connection"
        )
        assert f"nothing is listening on 127.0.0.1:{nothing}" in why

        # An open raw TCP connection, with its bytes counted as they pass.
        for _ in range(2):
            curl(relay, tunnel, tunnel.url + "/hello")
        with socket.create_connection((LOOPBACK, echo_tunnel.tcp_port or 0), timeout=10) as s:
            s.sendall(b"x" * 5000)
            got = b""
            while len(got) < 5000:
                got += s.recv(65536)
            opened = "document.querySelector('#connections tr[data-state=\"open\"]')"
            text = wait_for(
                lambda: browser.evaluate(f"{opened} && {opened}.innerText.includes('4.9 KiB')"),
                "the open connection's bytes",
            )
            assert text
            # The picture without the highlight of rows just added.
            browser.evaluate("document.querySelectorAll('tr.fresh').forEach(r => r.className = '')")
            shot = browser.call("Page.captureScreenshot", format="png")["data"]
    finally:
        browser.close()
    png = base64.b64decode(shot)
    (tmp_path / "inspector.png").write_bytes(png)
    assert png.startswith(b"\x89PNG")
    if os.environ.get("TUNNELS_SCREENSHOT"):
        Path(os.environ["TUNNELS_SCREENSHOT"]).write_bytes(png)


def test_the_tunnel_command_serves_the_inspector(procs: Procs, tmp_path: Path) -> None:
    tunnel_command = Path(sys.executable).parent / "tunnel"
    if not tunnel_command.exists():
        pytest.skip("the tunnel command is not installed next to this interpreter")
    web = procs.backend("http")
    relay = procs.relay()
    cli = procs.start(
        "tunnel",
        [
            str(tunnel_command), "--relay", f"localhost:{relay.port}", "--ca", str(relay.ca),
            "--inspect", str(web.port),
        ],
    )  # fmt: skip
    url = cli.wait_log(r"inspector\s+(http://127\.0\.0\.1:\d+/)").group(1)
    cli.wait_log(rf"-> 127\.0\.0\.1:{web.port}")
    with urllib.request.urlopen(url, timeout=5) as r:
        page = r.read().decode()
        assert r.headers["content-type"].startswith("text/html")
    assert "Tunnels inspector" in page and "<script>" in page
    # One self-contained page: nothing loaded from elsewhere.
    assert "<script src" not in page and "<link" not in page and "@import" not in page
    with urllib.request.urlopen(url + "connections", timeout=5) as r:
        snapshot = json.load(r)
    assert [t["target"] for t in snapshot["tunnels"]] == [f"127.0.0.1:{web.port}"]
