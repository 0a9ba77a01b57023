"""
Pieces of the relay's and the agent's admin endpoints: Prometheus metrics computed when
scraped, JSON documents, and the site that serves them. Bind such a site to loopback.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from importlib import resources
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.process_collector import ProcessCollector
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import LoopingCall
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

__all__ = [
    "MAX_FOLLOWERS",
    "Follower",
    "JSONResource",
    "PageResource",
    "ReadyResource",
    "SnapshotStream",
    "admin_site",
    "event_message",
    "gauges",
]

#: Pages following an admin endpoint's events at once; more are answered 503.
MAX_FOLLOWERS = 32


class _Metrics(Resource):
    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self.registry)


class JSONResource(Resource):
    """
    ``GET`` answers ``document()`` as JSON.
    """

    isLeaf = True

    def __init__(self, document: Callable[[], Any]) -> None:
        super().__init__()
        self.document = document

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(self.document()).encode() + b"\n"


def event_message(name: str, value: Any) -> bytes:
    """
    One server-sent event: `name`, with `value` as JSON.
    """
    return b"event: " + name.encode() + b"\ndata: " + json.dumps(value).encode() + b"\n\n"


@implementer(IPushProducer)
class Follower:
    """
    One page following server-sent events on `request` (registered as its push producer).
    While its socket takes no data it is paused: what it would be sent is dropped, and it
    gets ``fresh()`` (a snapshot) when it resumes, so no buffer grows for a page that does
    not read. `done` is called once, when it ends.
    """

    def __init__(
        self, request: Request, fresh: Callable[[], bytes], done: Callable[[Follower], None]
    ) -> None:
        self.request = request
        self.fresh = fresh
        self._done = done
        self.paused = False
        #: Something was missed while paused: the next message is a snapshot.
        self.stale = False
        self.done = False
        request.registerProducer(self, True)
        request.notifyFinish().addBoth(lambda _: self.finish())

    def send(self, data: bytes) -> None:
        if self.done:
            return
        if self.paused:
            self.stale = True
            return
        self.request.write(data)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if self.stale:
            self.stale = False
            self.send(self.fresh())

    def stopProducing(self) -> None:
        self.finish()

    def finish(self) -> None:
        if not self.done:
            self.done = True
            self._done(self)


def too_many_followers(request: Request) -> bytes:
    request.setResponseCode(503)
    request.setHeader(b"content-type", b"text/plain")
    return b"too many pages follow these events\n"


def start_events(request: Request, first: bytes) -> None:
    """
    Answer `request` as a stream of server-sent events, starting with `first`.
    """
    request.setHeader(b"content-type", b"text/event-stream")
    request.setHeader(b"cache-control", b"no-cache")
    # Retry after 1 s if the daemon goes away.
    request.write(b"retry: 1000\n\n" + first)


class SnapshotStream(Resource):
    """
    ``GET``: server-sent events, a ``snapshot`` of ``document()`` at once and then every
    `interval` seconds (on `clock`) while anyone follows; at most `MAX_FOLLOWERS` at once.
    """

    isLeaf = True

    def __init__(self, document: Callable[[], Any], clock: Any, interval: float = 1.0) -> None:
        super().__init__()
        self.document = document
        self.clock = clock
        self.interval = interval
        self.followers: set[Follower] = set()
        self._ticker: LoopingCall | None = None

    def _snapshot(self) -> bytes:
        return event_message("snapshot", self.document())

    def render_GET(self, request: Request) -> Any:
        if len(self.followers) >= MAX_FOLLOWERS:
            return too_many_followers(request)
        follower = Follower(request, self._snapshot, self._gone)
        self.followers.add(follower)
        if self._ticker is None:
            self._ticker = LoopingCall(self._tick)
            self._ticker.clock = self.clock
            self._ticker.start(self.interval, now=False)
        start_events(request, self._snapshot())
        return NOT_DONE_YET

    def _gone(self, follower: Follower) -> None:
        self.followers.discard(follower)
        if not self.followers and self._ticker is not None:
            if self._ticker.running:
                self._ticker.stop()
            self._ticker = None

    def _tick(self) -> None:
        live = [f for f in self.followers if not f.paused]
        for follower in self.followers:
            if follower.paused:
                follower.stale = True
        if live:
            data = self._snapshot()
            for follower in live:
                follower.send(data)


class PageResource(Resource):
    """
    ``GET /``: the HTML page `name` shipped in `package`; anything below it is 404.
    """

    isLeaf = True

    def __init__(self, package: str, name: str) -> None:
        super().__init__()
        self.page = resources.files(package).joinpath(name).read_bytes()

    def render_GET(self, request: Request) -> bytes:
        if request.postpath not in ([], [b""]):
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain")
            return b"not found\n"
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-cache")
        return self.page


class ReadyResource(Resource):
    """
    ``GET`` answers 200 ``ready`` while ``check()`` holds, else 503 ``not ready``: a
    readiness probe (Kubernetes, systemd, the launcher of tests and benchmarks).
    """

    isLeaf = True

    def __init__(self, check: Callable[[], bool]) -> None:
        super().__init__()
        self.check = check

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        if self.check():
            return b"ready\n"
        request.setResponseCode(503)
        return b"not ready\n"


def gauges(prefix: str, values: Mapping[str, tuple[str, Callable[[], float]]]) -> CollectorRegistry:
    """
    A registry with the process's own metrics and a gauge ``<prefix>_<name>`` per entry of
    `values` (``name: (help, read)``), read when scraped.
    """
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    for name, (text, read) in values.items():
        Gauge(f"{prefix}_{name}", text, registry=registry).set_function(read)
    return registry


class _QuietSite(Site):
    """
    A `Site` that logs no access lines: probes poll ``/ready`` and Prometheus scrapes
    ``/metrics`` every few seconds, and a line each would bury what the daemon has to say.
    """

    def log(self, request: http.Request) -> None:
        pass


def admin_site(registry: CollectorRegistry, children: Mapping[bytes, Resource]) -> Site:
    """
    ``/metrics`` from `registry`, plus `children` (path segment: resource).
    """
    root = Resource()
    root.putChild(b"metrics", _Metrics(registry))
    for path, child in children.items():
        root.putChild(path, child)
    site = _QuietSite(root)
    site.noisy = False
    return site
