"""
The agent's inspector: a page at ``/`` of its admin endpoint (``inspector.html``, shipped in
the package) showing its tunnels and a live table of the public connections through them,
fed by server-sent events at ``/events`` (``text/event-stream``); ``/connections`` is the
same snapshot as JSON.

The stream starts with a ``snapshot`` (tunnels, the kept connections, counters), then
sends ``connection`` for each change of a connection, ``tunnels`` when a tunnel or the link
changes, ``log`` for the agent's other events, and once a second ``progress`` (bytes of the
open connections, counters; also a keepalive). A subscriber whose socket stops taking data
is paused (its request is a push producer's consumer) and gets a fresh snapshot when it
resumes, so no buffer grows for a page that does not read.

`listen` binds the inspector for the `tunnel` command and the API: loopback, port 4040
unless taken, then the next ones, then any free port (as ngrok does).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet import error
from twisted.internet.task import LoopingCall
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from tunnel import __version__
from tunnel._admin import (
    MAX_FOLLOWERS,
    Follower,
    JSONResource,
    PageResource,
    event_message,
    start_events,
    too_many_followers,
)
from tunnel.agent._events import HISTORY, Event

if TYPE_CHECKING:
    from tunnel.agent.session import Agent

__all__ = [
    "DEFAULT_PORT",
    "EventStream",
    "InspectorPage",
    "listen",
    "parse_address",
    "snapshot",
]

#: The inspector's port when none is given (ngrok's); the next few are tried if it is taken.
DEFAULT_PORT = 4040
_TRIES = 10
#: Pages following the events at once; more are answered 503.
MAX_SUBSCRIBERS = MAX_FOLLOWERS
#: Seconds between ``progress`` messages.
PROGRESS_INTERVAL = 1.0


def tunnels(agent: Agent) -> list[dict[str, Any]]:
    """
    The agent's tunnels for the page: URL, target, kind, options, state.
    """
    link_up = agent.link is not None
    result = []
    for f in agent.forwards:
        spec, t = f.spec, f.tunnel
        options = []
        if spec.h2:
            options.append("h2")
        if spec.proxy_protocol:
            options.append(f"PROXY v{spec.proxy_protocol}")
        if spec.allow:
            options.append("allow " + ", ".join(spec.allow))
        if spec.client_ca:
            options.append("client certificates")
        if t is None:
            state = "waiting"
        elif link_up:
            state = "ready"
        else:
            state = "reconnecting"
        result.append(
            {
                "tunnel_id": f.tunnel_id,
                "url": t.url if t is not None else None,
                "tcp": (
                    f"tcp://{t.unencrypted_host}:{t.unencrypted_port}"
                    if t is not None and t.unencrypted_port is not None
                    else None
                ),
                "target": spec.target,
                "kind": "tcp" if spec.unencrypted else "tls",
                "options": options,
                "state": state,
            }
        )
    return result


def _link(agent: Agent) -> dict[str, Any]:
    return {
        "up": agent.link is not None,
        "relay": str(agent.relays[agent._relay_index % len(agent.relays)]),
        "links_made": agent.links_made,
        "last_error": agent.last_error,
    }


def snapshot(agent: Agent) -> dict[str, Any]:
    """
    Everything the page shows, as JSON values.
    """
    events = agent.events
    return {
        "version": __version__,
        "now": round(agent.reactor.seconds(), 3),
        "started": round(events.started, 3),
        "history": events.history.maxlen or HISTORY,
        "link": _link(agent),
        "tunnels": tunnels(agent),
        "connections": [c.as_json() for c in events.connections()],
        "counters": events.counters(),
        "events": [{**event.as_json(), "time": round(at, 3)} for at, event in events.recent],
    }


_message = event_message


class EventStream(Resource):
    """
    ``GET /events``: the agent's events as server-sent events.
    """

    isLeaf = True

    def __init__(self, agent: Agent) -> None:
        super().__init__()
        self.agent = agent
        self.subscribers: set[Follower] = set()
        self._ticker: LoopingCall | None = None

    def render_GET(self, request: Request) -> Any:
        if len(self.subscribers) >= MAX_SUBSCRIBERS:
            return too_many_followers(request)
        subscriber = Follower(
            request, lambda: _message("snapshot", snapshot(self.agent)), self._gone
        )
        if not self.subscribers:
            self.agent.events.observers.append(self._observe)
            self._ticker = LoopingCall(self._progress)
            self._ticker.clock = self.agent.reactor
            self._ticker.start(PROGRESS_INTERVAL, now=False)
        self.subscribers.add(subscriber)
        start_events(request, _message("snapshot", snapshot(self.agent)))
        return NOT_DONE_YET

    def _gone(self, subscriber: Follower) -> None:
        self.subscribers.discard(subscriber)
        self.idle()

    def idle(self) -> None:
        if self.subscribers:
            return
        if self._observe in self.agent.events.observers:
            self.agent.events.observers.remove(self._observe)
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()
        self._ticker = None

    def _broadcast(self, data: bytes) -> None:
        for subscriber in list(self.subscribers):
            subscriber.send(data)

    def _observe(self, event: Event) -> None:
        if event.connection is not None:
            value = {
                **event.as_json(),
                "time": round(self.agent.reactor.seconds(), 3),
                "counters": self.agent.events.counters(),
            }
            self._broadcast(_message("connection", value))
            return
        self._broadcast(
            _message("log", {**event.as_json(), "time": round(self.agent.reactor.seconds(), 3)})
        )
        self._broadcast(
            _message("tunnels", {"link": _link(self.agent), "tunnels": tunnels(self.agent)})
        )

    def _progress(self) -> None:
        events = self.agent.events
        open_now = [
            [c.id, c.from_client, c.to_client] for c in events.connections() if c.ended is None
        ]
        self._broadcast(
            _message(
                "progress",
                {
                    "now": round(self.agent.reactor.seconds(), 3),
                    "open": open_now,
                    "counters": events.counters(),
                },
            )
        )


class InspectorPage(PageResource):
    """
    ``GET /``: the inspector page.
    """

    def __init__(self) -> None:
        super().__init__("tunnel.agent", "inspector.html")


def parse_address(text: str | None) -> tuple[str, int | None]:
    """
    An inspector address: ``PORT``, ``HOST``, ``HOST:PORT`` or ``[IPV6]:PORT``; the host
    defaults to 127.0.0.1, the port to None (4040 or the next free one).

    @raise ValueError: not of that form.
    """
    if text is None or text in ("", "true", "True"):
        return "127.0.0.1", None
    host, port_text = "127.0.0.1", ""
    if text.startswith("["):
        inside, sep, rest = text[1:].partition("]")
        if not sep or not inside or (rest and not rest.startswith(":")):
            raise ValueError(f"inspector address {text!r}: write IPv6 as [ADDRESS]:PORT")
        host, port_text = inside, rest[1:]
    elif text.isdigit():
        port_text = text
    elif text.count(":") == 1:
        host, port_text = text.split(":")
        host = host or "127.0.0.1"
    elif ":" not in text:
        host = text
    else:
        raise ValueError(f"inspector address {text!r} is not HOST:PORT")
    if not port_text:
        return host, None
    if not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise ValueError(f"inspector address {text!r}: {port_text!r} is not a port")
    return host, int(port_text)


def listen(reactor: Any, site: Site, address: str | None) -> tuple[Any, str]:
    """
    Listen for the inspector at `address` (see `parse_address`): with no port given,
    4040, else the next free one of a few, else any free port.

    @return: the listening port and the page's URL.
    @raise error.CannotListenError: the port given cannot be listened on.
    """
    host, port = parse_address(address)
    candidates: list[int] = (
        [port] if port is not None else [*range(DEFAULT_PORT, DEFAULT_PORT + _TRIES), 0]
    )
    last: Exception | None = None
    for candidate in candidates:
        try:
            listening = reactor.listenTCP(candidate, site, interface=host)
        except error.CannotListenError as e:
            last = e
            continue
        shown = f"[{host}]" if ":" in host else host
        return listening, f"http://{shown}:{listening.getHost().port}/"
    assert last is not None
    raise last


def inspector_children(agent: Agent) -> dict[bytes, Resource]:
    """
    The inspector's resources, for the admin site of `agent`.
    """
    return {
        b"": InspectorPage(),
        b"events": EventStream(agent),
        b"connections": JSONResource(lambda: snapshot(agent)),
    }


def inspect(agent: Agent, address: bool | str | None) -> str | None:
    """
    Serve `agent`'s inspector (its admin site) at `address` (True: the default), once per
    agent; it stops listening when the agent stops.

    @return: the page's URL, or None for a false `address`.
    @raise ValueError: a malformed address, or one that cannot be listened on.
    """
    if not address:
        return None
    if agent.inspector_url is not None:
        return agent.inspector_url
    from tunnel.agent.admin import admin_site

    try:
        port, url = listen(agent.reactor, admin_site(agent), None if address is True else address)
    except error.CannotListenError as e:
        raise ValueError(f"cannot serve the inspector: {e}") from None
    agent.inspector_url = url
    agent.on_stop.append(port.stopListening)
    return url
