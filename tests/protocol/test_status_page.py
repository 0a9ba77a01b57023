"""
The relay's status page document (``/links``, and the snapshots of ``/events``): links with
their principal but never their token, tunnels, refusals, limits; the page itself, and the
bound on pages following the events. The relay runs on a `MemoryReactorClock`; each link is
a `RelayLink` on a `StringTransport`.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

from tests.protocol.test_inspector import Request
from tests.protocol.test_shares import Peer, make_relay
from tunnel._admin import MAX_FOLLOWERS
from tunnel.relay.admin import admin_site, status_page_document

TOKEN = "a-link-token-8d1e44"


def render(site: object, path: bytes) -> tuple[Request, object]:
    request = Request([path])
    resource = site.resource.getChildWithDefault(path, request)  # type: ignore[attr-defined]
    return request, resource.render(request)


def test_the_document_shows_links_and_tunnels_and_never_the_token() -> None:
    relay = make_relay(tokens=frozenset({TOKEN}), max_streams_per_link=77)
    relay.tls = SimpleNamespace(pair=None)  # type: ignore[assignment]
    peer = Peer(relay, token=TOKEN)
    granted = peer.request(1)
    assert granted["type"] == "tunnel_granted"
    document = status_page_document(relay)

    (link,) = document["links"]
    assert link["agent"] == "127.0.0.2:40000" and link["authenticated"]
    assert link["principal"].startswith("token:") and len(link["principal"]) == 6 + 12
    assert link["tunnels"] == [granted["tunnel_id"]] and link["streams"] == 0
    (tunnel,) = document["tunnels"]
    assert tunnel["host"] == f"{granted['tunnel_id']}.tunnel.localhost"
    assert tunnel["kind"] == "tls" and tunnel["members"][0]["agent"] == "127.0.0.2:40000"
    assert document["counts"]["tunnels"] == 1 and document["certificate"] is None
    assert set(document["refusals"]) >= {"denied_connections", "refused_streams_per_link"}
    limits = document["limits"]
    assert limits["max_streams_per_link"] == 77 and limits["tokens_required"] is True
    assert limits["tcp_ports"] == [30000, 30099] and "link_max_streams" in limits
    assert "tokens" not in limits and "tokens_file" not in limits
    assert "never shown" in document["note"]

    text = json.dumps(document)
    assert TOKEN not in text
    # Nor the full digest the principal is keyed by, nor a reclaim secret.
    full = peer.link.principal.partition(":")[2]
    assert len(full) == 32 and full not in text
    assert granted.get("reclaim_secret", "\0") not in text

    site = admin_site(relay)
    request, body = render(site, b"links")
    assert isinstance(body, bytes) and json.loads(body)["links"][0]["tunnels"] == link["tunnels"]
    assert TOKEN.encode() not in body
    request, page = render(site, b"")
    assert isinstance(page, bytes) and b"Tunnels relay status" in page
    assert request.responseHeaders.getRawHeaders(b"content-type") == [b"text/html; charset=utf-8"]
    assert TOKEN.encode() not in page and b"<script src" not in page


def test_events_are_snapshots_for_a_bounded_number_of_followers() -> None:
    relay = make_relay()
    relay.tls = SimpleNamespace(pair=None)  # type: ignore[assignment]
    site = admin_site(relay)
    requests = [render(site, b"events")[0] for _ in range(MAX_FOLLOWERS)]
    first = b"".join(requests[0].written)
    assert b"event: snapshot\ndata: " in first
    assert json.loads(first.split(b"data: ", 1)[1])["links"] == []
    request, body = render(site, b"events")
    assert request.responseCode == 503 and b"too many" in body  # type: ignore[operator]

    # Once a second a fresh snapshot; one that does not read is paused, then caught up.
    peer = Peer(relay)
    slow = requests[1]
    follower = slow.producer
    follower.pauseProducing()
    before = len(slow.written)
    relay.reactor.advance(1.0)
    assert len(slow.written) == before
    latest = json.loads(requests[0].written[-1].split(b"data: ", 1)[1])
    assert latest["links"][0]["agent"] == peer.link.peer_name
    follower.resumeProducing()
    assert len(slow.written) == before + 1 and b"snapshot" in slow.written[-1]

    # A page that goes away frees its place.
    requests[2].processingFailed(Exception("gone"))  # type: ignore[arg-type]
    request, _ = render(site, b"events")
    assert request.responseCode != 503
