"""The relay's admin resources, rendered in memory against a relay in this process."""

from __future__ import annotations

import json

import pytest_twisted
from twisted.web.test.requesthelper import DummyRequest

from tunnel.relay.admin import admin_site
from tunnel.relay.service import RelayService


def render(site: object, path: bytes) -> tuple[bytes, bytes]:
    request = DummyRequest([path])
    resource = site.resource.getChildWithDefault(path, request)  # type: ignore[attr-defined]
    body = resource.render(request)
    content_type = request.responseHeaders.getRawHeaders(b"content-type")[0]
    return content_type, body


@pytest_twisted.ensureDeferred
async def test_status_and_metrics(relay: RelayService) -> None:
    site = admin_site(relay.relay, relay.front)
    content_type, body = render(site, b"status")
    assert content_type == b"application/json"
    status = json.loads(body)
    assert status["tunnels"] == 0 and status["links"] == 0 and status["draining"] == 0
    assert status["open_fds"] > 0
    content_type, body = render(site, b"metrics")
    assert content_type.startswith(b"text/plain")
    text = body.decode()
    for key, value in status.items():
        if key == "certificate":  # the JSON's own: names and dates, not a gauge
            assert "tunnel.localhost" in value["names"], value
            continue
        if isinstance(value, int):
            assert f"tunnels_relay_{key} " in text, key
    assert status["certificate_expiry_timestamp_seconds"] > 0
    assert status["pools"] == {} and status["named_tunnels"] == 0
    assert "process_resident_memory_bytes" in text
