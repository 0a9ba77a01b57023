"""
A programmable startup hub: each authorised ``POST`` starts a fresh server behind a fresh
tunnel and sends the caller there; ``DELETE`` closes it. The shape of a notebook or preview
hub that hands every user their own URL (Modal's "programmable startup" pattern), in
twisted.web with the Deferred API.

    HUB_TOKEN=s3cret TUNNEL_RELAY=localhost:8443 TUNNEL_CA=state/relay/ca.pem \\
        python examples/hub.py --listen tcp:8080:interface=127.0.0.1

    curl -i -X POST -H 'Authorization: Bearer s3cret' http://127.0.0.1:8080/tunnels
    # HTTP/1.1 303 See Other
    # Location: https://<id>.tunnel.localhost:8443/
    curl -X DELETE -H 'Authorization: Bearer s3cret' http://127.0.0.1:8080/tunnels/<id>
    # 204: the tunnel is closed, its name no longer answers

Without the bearer token (or with another) every request is a 401. ``GET /tunnels`` lists
the open ones. Each session's server here is a small page on a loopback port of this
process; a real hub would start a notebook, a container or a preview build instead.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, endpoints, task
from twisted.web import resource, server

from tunnel import client


class SessionPage(resource.Resource):
    """What a session serves: a page that names it."""

    isLeaf = True

    def __init__(self, number: int) -> None:
        super().__init__()
        self.number = number

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return f"hello from session {self.number}\n".encode()


@dataclass
class Session:
    tunnel: client.Tunnel
    listening: Any  # the session server's IListeningPort

    def close(self) -> defer.Deferred[Any]:
        return defer.gatherResults(
            [self.tunnel.close(), defer.maybeDeferred(self.listening.stopListening)],
            consumeErrors=True,
        )


class Hub(resource.Resource):
    """
    ``POST /tunnels`` → 303 to a fresh tunnel; ``DELETE /tunnels/<id>`` → 204;
    ``GET /tunnels`` → the open ones; all behind ``Authorization: Bearer <token>``.
    """

    isLeaf = True

    def __init__(self, reactor: Any, token: str) -> None:
        super().__init__()
        self.reactor = reactor
        self.token = token.encode()
        self.sessions: dict[str, Session] = {}
        self.started = 0

    def render(self, request: server.Request) -> Any:
        given = request.getHeader(b"authorization") or b""
        scheme, _, credential = given.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(credential, self.token):
            request.setResponseCode(401)
            request.setHeader(b"www-authenticate", b'Bearer realm="hub"')
            return b"a bearer token is needed\n"
        path = [p.decode(errors="replace") for p in request.postpath if p]
        if path[:1] != ["tunnels"] or len(path) > 2:
            request.setResponseCode(404)
            return b"not found\n"
        return super().render(request)

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        listing = {key: s.tunnel.url for key, s in self.sessions.items()}
        return json.dumps(listing).encode()

    def render_POST(self, request: server.Request) -> Any:
        self.started += 1
        listening = self.reactor.listenTCP(
            0, server.Site(SessionPage(self.started)), interface="127.0.0.1"
        )
        gone = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def granted(t: client.Tunnel) -> None:
            session = Session(t, listening)
            if gone:  # the caller left before its tunnel was ready: nobody will use it
                session.close()
                return
            key = t.host.split(".", 1)[0]
            self.sessions[key] = session
            request.setResponseCode(303)
            request.setHeader(b"location", f"{t.url}/".encode())
            request.setHeader(b"content-type", b"application/json")
            request.write(json.dumps({"id": key, "url": t.url}).encode())
            request.finish()

        def failed(reason: Any) -> None:
            listening.stopListening()
            if not gone:
                request.setResponseCode(502)
                request.write(f"no tunnel: {reason.value}\n".encode())
                request.finish()

        client.forward(self.reactor, listening.getHost().port).addCallbacks(granted, failed)
        return server.NOT_DONE_YET

    def render_DELETE(self, request: server.Request) -> Any:
        path = [p.decode(errors="replace") for p in request.postpath if p]
        session = self.sessions.pop(path[1], None) if len(path) == 2 else None
        if session is None:
            request.setResponseCode(404)
            return b"no such tunnel\n"

        def closed(_: Any) -> None:
            request.setResponseCode(204)
            request.finish()

        session.close().addBoth(closed)
        return server.NOT_DONE_YET


async def serve(reactor: Any, listen: str, token: str) -> None:
    hub = Hub(reactor, token)
    port = await endpoints.serverFromString(reactor, listen).listen(server.Site(hub))
    address = port.getHost()
    print(f"hub listening on http://{address.host}:{address.port}/tunnels", flush=True)
    # Close every tunnel (telling the relay) when the hub stops: Ctrl-C or SIGTERM.
    reactor.addSystemEventTrigger("before", "shutdown", client.shutdown, reactor)
    await defer.Deferred()  # until the reactor stops


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A hub that hands out fresh tunnels.")
    parser.add_argument(
        "--listen", default="tcp:8080:interface=127.0.0.1", help="endpoint string to serve on"
    )
    parser.add_argument("--token", default=os.environ.get("HUB_TOKEN"), help="or $HUB_TOKEN")
    args = parser.parse_args(argv)
    if not args.token:
        parser.error("give --token or set HUB_TOKEN: the bearer token callers must show")
    task.react(lambda reactor: defer.ensureDeferred(serve(reactor, args.listen, args.token)))


if __name__ == "__main__":
    main(sys.argv[1:])
