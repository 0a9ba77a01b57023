"""
Pieces of the relay's and the agent's admin endpoints: Prometheus metrics computed when
scraped, JSON documents, and the site that serves them. Bind such a site to loopback.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.process_collector import ProcessCollector
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

__all__ = ["JSONResource", "ReadyResource", "admin_site", "gauges"]


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
