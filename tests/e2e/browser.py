"""
A headless Chromium for the browser tests of the admin pages, driven through the DevTools
protocol (`DevTools`); `start_chromium` runs it in a `Procs` group, so it is stopped by PID.
"""

from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path
from typing import Any

from tests.e2e.harness import LOOPBACK, Procs, require_tool, wait_for

__all__ = ["CHROMIUM_FLAGS", "DevTools", "start_chromium"]

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-proxy-server",
    "--hide-scrollbars",
    "--window-size=1280,1010",
    "--remote-debugging-port=0",
]


class DevTools:
    """
    A minimal client of the Chrome DevTools protocol over one page's websocket.
    """

    def __init__(self, url: str) -> None:
        import websocket

        self.ws = websocket.create_connection(url, timeout=10, suppress_origin=True)
        self._ids = 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._ids += 1
        request_id = self._ids
        self.ws.send(json.dumps({"id": request_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == request_id:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                result: dict[str, Any] = message["result"]
                return result

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def close(self) -> None:
        self.ws.close()


def start_chromium(procs: Procs, profile: Path) -> DevTools:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        require_tool("chromium")
    assert binary is not None
    procs.start("chromium", [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"])
    # Chromium writes the port it chose (and its browser endpoint) into the profile.
    active = profile / "DevToolsActivePort"
    port = wait_for(
        lambda: (active.is_file() and active.read_text().split("\n")[0].strip()) or None,
        "Chromium's DevTools port",
    )

    def page_target() -> str | None:
        try:
            with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/json/list", timeout=5) as r:
                targets = json.load(r)
        except OSError:
            return None
        pages = [t for t in targets if t.get("type") == "page"]
        return pages[0]["webSocketDebuggerUrl"] if pages else None

    return DevTools(wait_for(page_target, "a page in Chromium"))
