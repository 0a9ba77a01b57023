"""
The relay's status page in a real browser: headless Chromium loads the page from the relay's
admin endpoint before any agent links; an agent then links with a token and asks for a
tunnel, and the link and its tunnel appear in the page without a reload, read from the DOM
through the DevTools protocol. The token is nowhere in the page or its JSON.

A screenshot is kept in the test's directory; with ``TUNNELS_STATUS_SCREENSHOT=PATH`` it is
also written there.
"""

from __future__ import annotations

import base64
import json
import os
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.browser import start_chromium
from tests.e2e.harness import LOOPBACK, Procs, wait_for

pytestmark = pytest.mark.e2e

TOKEN = "status-page-token-5f3a9c"


def test_a_link_and_its_tunnel_appear_live_in_the_status_page(procs: Procs, tmp_path: Path) -> None:
    web = procs.backend("http")
    relay = procs.relay(tokens=[TOKEN])
    admin = f"http://{LOOPBACK}:{relay.proc.admin_port}/"  # type: ignore[attr-defined]
    with urllib.request.urlopen(admin, timeout=5) as r:
        assert r.headers["content-type"].startswith("text/html")
        page = r.read().decode()
    # One self-contained page: nothing loaded from elsewhere.
    assert "<script src" not in page and "<link" not in page and "@import" not in page

    browser = start_chromium(procs, tmp_path / "chromium-profile")
    try:
        browser.call("Page.enable")
        browser.call("Page.navigate", url=admin)
        # The first snapshot: no link yet, the certificate and the limits shown.
        wait_for(
            lambda: browser.evaluate(
                "document.getElementById('links').innerText.includes('no link')"
                " && !!document.getElementById('cert-names')"
            ),
            "the first snapshot in the page",
        )
        assert "tunnel.localhost" in browser.evaluate("$('cert-names').textContent")
        limits = browser.evaluate("$('limits').innerText")
        assert "max streams per link" in limits and "4096" in limits
        assert "never shown" in browser.evaluate("$('note').textContent")
        before = browser.evaluate("performance.timeOrigin")

        agent = procs.agent(relay, [str(web.port)], token=TOKEN)
        tunnel = agent.ready(str(web.port))

        row = f"document.querySelector('#tunnels tr[data-host=\"{tunnel.host}\"]')"
        text = wait_for(
            lambda: browser.evaluate(f"{row} && {row}.innerText"), "the tunnel in the page"
        )
        assert "TLS (SNI)" in text and "127.0.0.1:" in text  # the agent's address
        link = "Array.from(document.querySelectorAll('#links tr[data-agent]'))"
        linked = wait_for(
            lambda: browser.evaluate(
                f"{link}.map(r => r.innerText).find(t => t.includes({json.dumps(tunnel.id)})"
                " && t.includes(' ms'))"  # its RTT, from the keepalive pings
            ),
            "the link, its tunnel and its RTT in the page",
        )
        assert "token:" in linked and "linked" in linked
        # Live: the same document, not a reload.
        assert browser.evaluate("performance.timeOrigin") == before
        assert browser.evaluate("$('c-tunnels').textContent") == "1"
        html = browser.evaluate("document.documentElement.outerHTML")
        assert TOKEN not in html
        shot = browser.call("Page.captureScreenshot", format="png")["data"]
    finally:
        browser.close()

    with urllib.request.urlopen(admin + "links", timeout=5) as r:
        body = r.read().decode()
    assert TOKEN not in body
    document = json.loads(body)
    assert [t["host"] for t in document["tunnels"]] == [tunnel.host]
    assert document["links"][0]["tunnels"] == [tunnel.id]

    png = base64.b64decode(shot)
    (tmp_path / "status.png").write_bytes(png)
    assert png.startswith(b"\x89PNG")
    if os.environ.get("TUNNELS_STATUS_SCREENSHOT"):
        Path(os.environ["TUNNELS_STATUS_SCREENSHOT"]).write_bytes(png)
