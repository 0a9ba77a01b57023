"""
The admin endpoint of a relay run as several workers (``twistd tunnelrelay --workers N``):
the supervisor serves one site that merges every worker's own admin site, which each worker
serves on a UNIX socket (``<state-dir>/workers/<i>/admin.sock``).

- ``/ready``: 200 ``ready`` when every worker is running and its own ``/ready`` answers 200;
  else 503 ``not ready``, one line per worker that is not, saying why.
- ``/status``: one document in the shape of a single relay's (`tunnel.relay._status`):
  counts summed, lists concatenated with each entry tagged by its ``worker`` index, pools
  merged by name, the certificate taken from the first worker that answered; plus
  ``workers``, one entry per worker (index, pid, state, restarts, its links, tunnels,
  streams and public connections, whether it answered). A worker that does not answer
  within the deadline, or answers too much, is marked so there and left out of the rest.
- ``/links`` and ``/events``: the status page's document merged the same way (with
  ``workers``), as JSON and as server-sent events (a snapshot a second while anyone
  follows, at most `MAX_FOLLOWERS` pages); ``/`` is the relay's status page.
- ``/metrics``: every worker's exposition, parsed and re-exposed with a ``worker`` label,
  the supervisor's own process metrics (no ``worker`` label), ``tunnels_relay_workers`` by
  state, and per worker ``tunnels_relay_worker_restarts`` and ``tunnels_relay_worker_up``
  (1 if it answered this scrape).

Every wait is bounded: each request to a worker has a deadline and a size cap, and at most
`MAX_MERGES` merged answers are in progress at once (more are answered 503).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict, TypeGuard, cast

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry
from twisted.internet import defer
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.interfaces import IPushProducer, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IAgentEndpointFactory, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from tunnel._admin import (
    MAX_FOLLOWERS,
    Follower,
    PageResource,
    event_message,
    start_events,
    too_many_followers,
)
from tunnel._admin import admin_site as _site

__all__ = [
    "DEADLINE",
    "MAX_ANSWER_BYTES",
    "MAX_MERGES",
    "WORKER_STATES",
    "AnswerTooLarge",
    "WorkerAdminClient",
    "WorkerAnswer",
    "WorkerInfo",
    "WorkerUnavailable",
    "merge_documents",
    "merged_admin_site",
]

_log = Logger()

#: Seconds a worker has to answer one request of the supervisor's admin endpoint.
DEADLINE = 1.0
#: Bytes read at most from one answer of a worker; past it the worker is left out.
MAX_ANSWER_BYTES = 16 * 1024 * 1024
#: Merged answers in progress at once (each asks every worker); more are answered 503.
MAX_MERGES = 16
#: The states a worker may be in, as the supervisor reports them.
WORKER_STATES = ("starting", "running", "restarting", "draining", "exited")

#: Counts of a worker's ``/status`` that are not added up: how each is combined instead.
_NOT_SUMMED: Mapping[str, Callable[[list[int]], int]] = {
    # Draining if any worker is.
    "draining": max,
    # The certificate is one for all workers: the first that answered says.
    "certificate_expiry_timestamp_seconds": lambda values: values[0],
}
#: Keys whose value is one for all workers: taken from the first that answered.
_SHARED = frozenset({"certificate", "limits", "version", "domain", "note"})


class WorkerInfo(TypedDict):
    """One worker, as the supervisor's ``workers()`` callable describes it."""

    index: int
    pid: int | None
    #: The path of its admin site's UNIX socket.
    admin: str
    state: str
    restarts: int


class WorkerUnavailable(Exception):
    """A worker's admin site did not answer as expected (the reason is the message)."""


class AnswerTooLarge(WorkerUnavailable):
    """A worker's answer was longer than the client's cap."""


@dataclass(frozen=True)
class WorkerAnswer:
    """What one worker answered to one request."""

    #: The HTTP status code.
    code: int
    #: The body, at most the client's cap.
    body: bytes


def _stop_body(transport: object) -> None:
    """Stop reading a response body: Twisted gives a body's protocol a push producer as its
    transport, and stopping it drops the connection."""
    if transport is not None:
        cast(IPushProducer, transport).stopProducing()


class _CappedBody(Protocol):
    """Collects a response body up to `cap` bytes; past it, drops the connection."""

    def __init__(self, finished: defer.Deferred[bytes], cap: int) -> None:
        self.finished = finished
        self.cap = cap
        self.chunks: list[bytes] = []
        self.size = 0
        self.failed = False

    def dataReceived(self, data: bytes) -> None:
        if self.failed:
            return
        self.size += len(data)
        if self.size > self.cap:
            self.failed = True
            _stop_body(self.transport)
            self.finished.errback(AnswerTooLarge(f"answer longer than {self.cap} bytes"))
            return
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        if self.failed or self.finished.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self.chunks))
        else:
            self.finished.errback(WorkerUnavailable(f"answer cut: {reason.getErrorMessage()}"))


class _Discard(Protocol):
    """Reads nothing of a body: drops the connection at once."""

    def connectionMade(self) -> None:
        _stop_body(self.transport)


@implementer(IAgentEndpointFactory)
class _UNIXEndpoints:
    """Endpoints for the agent: every URI is served by the one UNIX socket `path`."""

    def __init__(self, reactor: Any, path: str) -> None:
        self.reactor = reactor
        self.path = path

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        return UNIXClientEndpoint(self.reactor, self.path, timeout=int(DEADLINE) + 1)


class WorkerAdminClient:
    """
    ``GET`` requests to workers' admin sites on UNIX sockets, with Twisted's HTTP client.
    Each request (connection, answer and body) has `deadline` seconds, and at most `cap`
    bytes of body are read.
    """

    def __init__(
        self, reactor: Any, deadline: float = DEADLINE, cap: int = MAX_ANSWER_BYTES
    ) -> None:
        if deadline <= 0 or cap <= 0:
            raise ValueError("the deadline and the cap must be positive")
        self.reactor = reactor
        self.deadline = deadline
        self.cap = cap
        # One connection per request (the default pool is not persistent): a worker that
        # restarted is reached at its new socket without a stale connection.
        self._pool = HTTPConnectionPool(reactor, persistent=False)

    def get(self, socket_path: str, path: str) -> defer.Deferred[WorkerAnswer]:
        """
        ``GET path`` from the admin site at `socket_path`. Fails with `WorkerUnavailable`
        (no answer in time, no connection, a cut answer) or `AnswerTooLarge`.
        """
        agent = Agent.usingEndpointFactory(
            self.reactor, _UNIXEndpoints(self.reactor, socket_path), pool=self._pool
        )
        result: defer.Deferred[WorkerAnswer] = agent.request(
            b"GET", b"http://worker" + path.encode()
        ).addCallback(self._read)
        result.addTimeout(self.deadline, self.reactor, onTimeoutCancel=self._late)
        return result.addErrback(self._typed)

    def _late(self, result: object, timeout: float) -> Failure:
        # Whatever the cancelled request failed with, it failed because it was late.
        return Failure(WorkerUnavailable(f"no answer within {timeout:g} s"))

    def _read(self, response: IResponse) -> defer.Deferred[WorkerAnswer]:
        length = response.length
        if length is not UNKNOWN_LENGTH and isinstance(length, int) and length > self.cap:
            response.deliverBody(_Discard())
            raise AnswerTooLarge(f"answer of {length} bytes, longer than {self.cap} bytes")

        def cancel(d: defer.Deferred[bytes]) -> None:
            _stop_body(protocol.transport)

        finished: defer.Deferred[bytes] = defer.Deferred(cancel)
        protocol = _CappedBody(finished, self.cap)
        response.deliverBody(protocol)
        return finished.addCallback(lambda body: WorkerAnswer(response.code, body))

    def _typed(self, failure: Failure) -> Failure:
        if failure.check(WorkerUnavailable):
            return failure
        return Failure(WorkerUnavailable(failure.getErrorMessage() or repr(failure.value)))


# --- merging (pure functions of the workers' documents) ---------------------------------


def _is_count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _tagged(entries: Iterable[Any], index: int) -> list[Any]:
    return [{**e, "worker": index} if isinstance(e, dict) else e for e in entries]


def _merge_pools(docs: Sequence[tuple[int, Mapping[str, Any]]]) -> dict[str, Any]:
    """Pools by name: members concatenated (tagged), connections summed, the rest from the
    first worker that holds the name, and which workers hold it."""
    pools: dict[str, dict[str, Any]] = {}
    for index, pool_map in docs:
        for name, pool in pool_map.items():
            merged = pools.get(name)
            members = _tagged(pool.get("members", []), index)
            if merged is None:
                pools[name] = {**pool, "members": members, "workers": [index]}
                continue
            merged["members"] = merged["members"] + members
            merged["workers"] = [*merged["workers"], index]
            if _is_count(pool.get("connections")) and _is_count(merged.get("connections")):
                merged["connections"] += pool["connections"]
    return pools


def _merge_counts(values: list[Any], key: str) -> Any:
    if key in _NOT_SUMMED:
        return _NOT_SUMMED[key](values)
    return sum(values)


def merge_documents(docs: Sequence[tuple[int, Mapping[str, Any]]]) -> dict[str, Any]:
    """
    One document of the shape of each of `docs` (``(worker index, document)``, in order):
    counts summed (``draining`` if any is; the certificate's expiry from the first), lists
    concatenated with each dict entry tagged ``worker``, ``pools`` merged by name, dicts
    of counts (``counts``, ``refusals``, counters added by workers) merged key by key, and
    everything else (the certificate, the limits, names) from the first document. Each
    worker's own ``worker`` entry is dropped. An empty `docs` gives ``{}``.
    """
    merged: dict[str, Any] = {}
    keys: list[str] = []
    for _, doc in docs:
        keys += [k for k in doc if k not in keys and k != "worker"]
    for key in keys:
        present = [(i, doc[key]) for i, doc in docs if key in doc]
        values = [v for _, v in present]
        first = values[0]
        if key in _SHARED:
            merged[key] = first
        elif key == "pools" and all(isinstance(v, dict) for v in values):
            merged[key] = _merge_pools(present)
        elif all(_is_count(v) for v in values):
            merged[key] = _merge_counts(values, key)
        elif all(isinstance(v, list) for v in values):
            merged[key] = [e for i, v in present for e in _tagged(v, i)]
        elif all(isinstance(v, dict) for v in values):
            merged[key] = merge_documents(present)
        else:
            merged[key] = first
    return merged


# --- gathering from the workers ----------------------------------------------------------


def _described(worker: Mapping[str, Any]) -> WorkerInfo:
    """The fields of `WorkerInfo` from one entry of the supervisor's ``workers()``."""
    return {
        "index": int(worker["index"]),
        "pid": worker.get("pid"),
        "admin": str(worker["admin"]),
        "state": str(worker["state"]),
        "restarts": int(worker.get("restarts", 0)),
    }


@dataclass
class _Gathered:
    """Each worker's description with what it answered (or why not)."""

    workers: list[WorkerInfo]
    answers: dict[int, WorkerAnswer]
    errors: dict[int, str]


class _Workers:
    """The workers and a client to their admin sites; gathers one path from all of them."""

    def __init__(
        self, reactor: Any, workers: Callable[[], Sequence[Mapping[str, Any]]], client: Any
    ) -> None:
        self.reactor = reactor
        self.workers = workers
        self.client = client

    def gather(self, path: str) -> defer.Deferred[_Gathered]:
        """``GET path`` from every worker at once; never fails (errors are per worker)."""
        workers = sorted((_described(w) for w in self.workers()), key=lambda w: w["index"])
        gathered = _Gathered(workers, {}, {})

        def one(worker: WorkerInfo) -> defer.Deferred[None]:
            index = worker["index"]

            def answered(answer: WorkerAnswer) -> None:
                gathered.answers[index] = answer

            def failed(failure: Failure) -> None:
                gathered.errors[index] = failure.getErrorMessage()

            if worker["state"] == "exited":
                gathered.errors[index] = "exited"
                return defer.succeed(None)
            d: defer.Deferred[None] = defer.maybeDeferred(
                self.client.get, worker["admin"], path
            ).addCallbacks(answered, failed)
            return d

        return defer.gatherResults([one(w) for w in workers]).addCallback(lambda _: gathered)

    def merged(self, path: str) -> defer.Deferred[dict[str, Any]]:
        """The merged JSON document of `path` from every worker, with ``workers``."""
        return self.gather(path).addCallback(self._merge)

    def _merge(self, gathered: _Gathered) -> dict[str, Any]:
        docs: list[tuple[int, Mapping[str, Any]]] = []
        errors = dict(gathered.errors)
        for index, answer in sorted(gathered.answers.items()):
            if answer.code != 200:
                errors[index] = f"answered {answer.code}"
                continue
            try:
                doc = json.loads(answer.body)
            except ValueError:
                errors[index] = "answered something that is not JSON"
                continue
            if not isinstance(doc, dict):
                errors[index] = "answered something that is not a JSON object"
                continue
            docs.append((index, doc))
        merged = merge_documents(docs)
        by_index = dict(docs)
        rows = []
        for worker in gathered.workers:
            index = worker["index"]
            doc = by_index.get(index)
            rows.append(
                {
                    "index": index,
                    "pid": worker["pid"],
                    "state": worker["state"],
                    "restarts": worker["restarts"],
                    "answered": doc is not None,
                    "error": errors.get(index),
                    "links": _count_of(doc, "links"),
                    "tunnels": _count_of(doc, "tunnels"),
                    "streams": _count_of(doc, "streams"),
                    "public_connections": _count_of(doc, "public_connections"),
                }
            )
        merged["workers"] = rows
        if "now" in merged:
            merged["now"] = round(self.reactor.seconds(), 3)
        return merged


def _count_of(doc: Mapping[str, Any] | None, key: str) -> int | None:
    """A count of a ``/status`` document (a number) or of a page document (under
    ``counts``); None for a worker that did not answer."""
    if doc is None:
        return None
    value = doc.get(key)
    if _is_count(value):
        return value
    counts = doc.get("counts")
    if isinstance(counts, dict):
        value = counts.get(key)
        if _is_count(value):
            return value
    return None


# --- resources ---------------------------------------------------------------------------


class _Merges:
    """The count of merged answers in progress, bounded by `limit`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.running = 0


def _busy(request: Request) -> bytes:
    request.setResponseCode(503)
    request.setHeader(b"content-type", b"text/plain")
    return b"busy: too many answers in progress\n"


class _AsyncResource(Resource):
    """A ``GET`` whose answer comes from a Deferred, counted against `merges`."""

    isLeaf = True

    def __init__(self, merges: _Merges) -> None:
        super().__init__()
        self.merges = merges

    def answer(self, request: Request) -> defer.Deferred[tuple[int, bytes, bytes]]:
        """(code, content type, body) for `request`."""
        raise NotImplementedError

    def render_GET(self, request: Request) -> Any:
        if self.merges.running >= self.merges.limit:
            return _busy(request)
        self.merges.running += 1
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def write(result: tuple[int, bytes, bytes]) -> None:
            if gone:
                return
            code, content_type, body = result
            request.setResponseCode(code)
            request.setHeader(b"content-type", content_type)
            request.write(body)
            request.finish()

        def failed(failure: Failure) -> None:
            _log.failure("merging the workers' answers", failure)
            write((500, b"text/plain", b"could not merge the workers' answers\n"))

        def done(result: object) -> object:
            self.merges.running -= 1
            return result

        self.answer(request).addBoth(done).addCallbacks(write, failed)
        return NOT_DONE_YET


class _MergedJSON(_AsyncResource):
    def __init__(self, merges: _Merges, workers: _Workers, path: str) -> None:
        super().__init__(merges)
        self.workers = workers
        self.path = path

    def answer(self, request: Request) -> defer.Deferred[tuple[int, bytes, bytes]]:
        return self.workers.merged(self.path).addCallback(
            lambda doc: (200, b"application/json", json.dumps(doc).encode() + b"\n")
        )


def _why_not_ready(gathered: _Gathered) -> list[str]:
    reasons = []
    for worker in gathered.workers:
        index = worker["index"]
        answer = gathered.answers.get(index)
        if worker["state"] != "running":
            reasons.append(f"worker {index}: {worker['state']}")
        elif answer is None:
            reasons.append(f"worker {index}: {gathered.errors.get(index, 'no answer')}")
        elif answer.code != 200:
            reasons.append(f"worker {index}: /ready answered {answer.code}")
    if not gathered.workers:
        reasons.append("no worker")
    return reasons


class _MergedReady(_AsyncResource):
    def __init__(self, merges: _Merges, workers: _Workers) -> None:
        super().__init__(merges)
        self.workers = workers

    def answer(self, request: Request) -> defer.Deferred[tuple[int, bytes, bytes]]:
        def verdict(gathered: _Gathered) -> tuple[int, bytes, bytes]:
            reasons = _why_not_ready(gathered)
            if not reasons:
                return 200, b"text/plain", b"ready\n"
            return 503, b"text/plain", ("not ready\n" + "\n".join(reasons) + "\n").encode()

        return self.workers.gather("/ready").addCallback(verdict)


class _Families(Collector):
    """Metric families collected once: the workers' (relabelled), the supervisor's."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def _relabelled(text: str, index: int) -> Iterator[Metric]:
    """The families of one worker's exposition `text`, each sample labelled ``worker``."""
    for family in text_string_to_metric_families(text):
        family.samples = [
            s._replace(labels={**s.labels, "worker": str(index)}) for s in family.samples
        ]
        yield family


def _metric_families(
    gathered: _Gathered, own: Iterable[Metric]
) -> tuple[list[Metric], dict[int, str]]:
    """
    The families of every worker that answered (samples labelled ``worker``), merged by
    name with `own` (the supervisor's, unlabelled), and the workers' gauges; with the
    workers whose exposition could not be used and why.
    """
    by_name: dict[str, Metric] = {}
    errors = dict(gathered.errors)

    def add(family: Metric) -> None:
        known = by_name.get(family.name)
        if known is None:
            by_name[family.name] = family
        elif known.type == family.type:
            known.samples = [*known.samples, *family.samples]
        # A family of the same name and another type is dropped: one name, one type.

    for family in own:
        add(family)
    for index, answer in sorted(gathered.answers.items()):
        if answer.code != 200:
            errors[index] = f"answered {answer.code}"
            continue
        try:
            families = list(_relabelled(answer.body.decode("utf-8"), index))
        except (ValueError, UnicodeDecodeError) as e:
            errors[index] = f"exposition not understood: {e}"
            continue
        for family in families:
            add(family)
    states = GaugeMetricFamily(
        "tunnels_relay_workers", "Workers of the relay, by state", labels=["state"]
    )
    for state in WORKER_STATES:
        states.add_metric([state], sum(1 for w in gathered.workers if w["state"] == state))
    restarts = GaugeMetricFamily(
        "tunnels_relay_worker_restarts", "Times a worker was restarted", labels=["worker"]
    )
    up = GaugeMetricFamily(
        "tunnels_relay_worker_up",
        "Whether a worker's metrics were read in this scrape",
        labels=["worker"],
    )
    for worker in gathered.workers:
        index = worker["index"]
        restarts.add_metric([str(index)], worker["restarts"])
        up.add_metric([str(index)], 0 if index in errors else 1)
    for family in (states, restarts, up):
        add(family)
    return list(by_name.values()), errors


class _MergedMetrics(_AsyncResource):
    def __init__(self, merges: _Merges, workers: _Workers) -> None:
        super().__init__(merges)
        self.workers = workers
        self.process = ProcessCollector(registry=None)

    def answer(self, request: Request) -> defer.Deferred[tuple[int, bytes, bytes]]:
        def expose(gathered: _Gathered) -> tuple[int, bytes, bytes]:
            families, _ = _metric_families(gathered, self.process.collect())
            registry = CollectorRegistry(auto_describe=False)
            registry.register(_Families(families))
            return 200, CONTENT_TYPE_LATEST.encode(), generate_latest(registry)

        return self.workers.gather("/metrics").addCallback(expose)


class _MergedEvents(Resource):
    """
    ``GET``: server-sent events, a ``snapshot`` of the merged page document as soon as the
    workers answer and then every `interval` seconds while anyone follows; at most
    `MAX_FOLLOWERS` pages at once. One gathering is in progress at a time, whatever the
    number of pages.
    """

    isLeaf = True

    def __init__(self, workers: _Workers, clock: Any, interval: float = 1.0) -> None:
        super().__init__()
        self.workers = workers
        self.clock = clock
        self.interval = interval
        self.followers: set[Follower] = set()
        self.latest = b""
        self._ticker: LoopingCall | None = None

    def render_GET(self, request: Request) -> Any:
        if len(self.followers) >= MAX_FOLLOWERS:
            return too_many_followers(request)
        follower = Follower(request, lambda: self.latest, self._gone)
        self.followers.add(follower)
        start_events(request, self.latest)
        if self._ticker is None:
            self._ticker = LoopingCall(self._refresh)
            self._ticker.clock = self.clock
            self._ticker.start(self.interval, now=True)
        return NOT_DONE_YET

    def _gone(self, follower: Follower) -> None:
        self.followers.discard(follower)
        if not self.followers and self._ticker is not None:
            if self._ticker.running:
                self._ticker.stop()
            self._ticker = None
            self.latest = b""

    def _refresh(self) -> defer.Deferred[None]:
        # The LoopingCall waits for this Deferred: never two gatherings at once.
        def send(doc: dict[str, Any]) -> None:
            if not self.followers:
                return
            self.latest = event_message("snapshot", doc)
            for follower in list(self.followers):
                if follower.paused:
                    follower.stale = True
                else:
                    follower.send(self.latest)

        def failed(failure: Failure) -> None:
            _log.failure("merging the workers' page documents", failure)

        return self.workers.merged("/links").addCallbacks(send, failed)


def merged_admin_site(
    reactor: Any,
    workers: Callable[[], Sequence[Mapping[str, Any]]],
    *,
    deadline: float = DEADLINE,
    cap: int = MAX_ANSWER_BYTES,
    max_merges: int = MAX_MERGES,
    client: Any = None,
) -> Site:
    """
    The supervisor's admin site over `workers` (called at each request: one `WorkerInfo`
    per worker). Each worker has `deadline` seconds and `cap` bytes per answer; at most
    `max_merges` answers are in progress at once. `client` (a `WorkerAdminClient` by
    default) is what asks the workers.
    """
    if max_merges < 1:
        raise ValueError("max_merges must be at least 1")
    asker = _Workers(reactor, workers, client or WorkerAdminClient(reactor, deadline, cap))
    merges = _Merges(max_merges)
    site = _site(
        CollectorRegistry(auto_describe=False),
        {
            b"": PageResource("tunnel.relay", "status.html"),
            b"events": _MergedEvents(asker, reactor),
            b"links": _MergedJSON(merges, asker, "/links"),
            b"status": _MergedJSON(merges, asker, "/status"),
            b"ready": _MergedReady(merges, asker),
        },
    )
    # The workers' metrics are asked for at each scrape, not collected from a registry.
    site.resource.putChild(b"metrics", _MergedMetrics(merges, asker))
    return site
