"""
The supervisor's merged admin site (`tunnel.relay._workeradmin`) against fake workers: real
admin sites (`tunnel._admin`) on real UNIX sockets in a temporary directory.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, task
from twisted.internet.protocol import Protocol
from twisted.web.client import Agent, ResponseNeverReceived
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from tests.protocol.inprocess import running_relay
from tunnel._admin import MAX_FOLLOWERS, JSONResource, ReadyResource, admin_site, gauges
from tunnel.relay._status import relay_status_document, status_page_document
from tunnel.relay._workeradmin import (
    AnswerTooLarge,
    WorkerAdminClient,
    WorkerAnswer,
    WorkerInfo,
    WorkerUnavailable,
    _UNIXEndpoints,
    merge_documents,
    merged_admin_site,
)

DEADLINE = 20.0


def get_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def status_doc(index: int, links: int, pools: dict[str, Any] | None = None) -> dict[str, Any]:
    """A worker's ``/status`` in the shape of `relay_status_document`, with the ``worker``
    entry and a hand-off counter a worker adds."""
    return {
        "links": links,
        "agents": links,
        "tunnels": links * 2,
        "streams": 3,
        "public_connections": 4 + index,
        "open_fds": 10,
        "draining": 0,
        "refused_streams": 1,
        "certificate_expiry_timestamp_seconds": 2_000_000_000 + index,
        "named_tunnels": len(pools or {}),
        "handoffs_received": 7,
        "pools": pools or {},
        "certificate": {"names": ["*.tunnel.localhost"], "serial": f"s{index}"},
        "worker": {"index": index, "of": 2},
    }


def page_doc(index: int, agents: list[str]) -> dict[str, Any]:
    """A worker's ``/links`` in the shape of `status_page_document`."""
    return {
        "version": "1.0",
        "domain": "tunnel.localhost",
        "now": 123.0,
        "counts": {"links": len(agents), "tunnels": len(agents), "draining": 0, "open_fds": 9},
        "links": [{"agent": a, "tunnels": [f"t-{a}"], "streams": 0} for a in agents],
        "tunnels": [{"tunnel_id": f"t-{a}", "members": [{"agent": a}]} for a in agents],
        "pools": {},
        "refusals": {"refused_streams": index + 1},
        "certificate": {"names": ["*.tunnel.localhost"], "serial": f"s{index}"},
        "limits": {"max_links": 100 + index},
        "note": "no addresses",
        "worker": {"index": index, "of": 2},
    }


class Hang(Resource):
    """Never answers."""

    isLeaf = True

    def render_GET(self, request: Request) -> Any:
        return NOT_DONE_YET


class Chunked(Resource):
    """Answers `size` bytes in chunks (no content-length)."""

    isLeaf = True

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def render_GET(self, request: Request) -> Any:
        for _ in range(self.size // 100):
            request.write(b"x" * 100)
        request.finish()
        return NOT_DONE_YET


class FakeWorker:
    """A worker's admin site on ``<dir>/workers/<i>/admin.sock``, serving what its fields
    say; ``children`` replace its resources."""

    def __init__(
        self, directory: Path, index: int, children: dict[bytes, Resource] | None = None
    ) -> None:
        self.index = index
        self.state = "running"
        self.restarts = 0
        self.ready = True
        self.status = status_doc(index, links=index + 1)
        self.page = page_doc(index, [f"127.0.0.1:{1000 + index}"])
        path = directory / "workers" / str(index)
        path.mkdir(parents=True)
        self.path = str(path / "admin.sock")
        registry = gauges(
            "tunnels_relay",
            {"links": ("Relay links", lambda: float(self.status["links"]))},
        )
        resources: dict[bytes, Resource] = {
            b"status": JSONResource(lambda: self.status),
            b"links": JSONResource(lambda: self.page),
            b"ready": ReadyResource(lambda: self.ready),
            **(children or {}),
        }
        self.port = get_reactor().listenUNIX(self.path, admin_site(registry, resources))

    def info(self) -> WorkerInfo:
        return {
            "index": self.index,
            "pid": 1000 + self.index,
            "admin": self.path,
            "state": self.state,
            "restarts": self.restarts,
        }


class Cluster:
    """Fake workers and the supervisor's merged site over them, on a UNIX socket."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.workers: list[FakeWorker] = []
        self.ports: list[Any] = []
        self.client = WorkerAdminClient(get_reactor(), deadline=DEADLINE)

    def add(self, children: dict[bytes, Resource] | None = None) -> FakeWorker:
        worker = FakeWorker(self.directory, len(self.workers), children)
        self.workers.append(worker)
        self.ports.append(worker.port)
        return worker

    def serve(self, **options: Any) -> str:
        site = merged_admin_site(get_reactor(), lambda: [w.info() for w in self.workers], **options)
        self.site = site
        path = str(self.directory / f"admin-{len(self.ports)}.sock")
        self.ports.append(get_reactor().listenUNIX(path, site))
        return path

    async def get(self, admin: str, path: str) -> WorkerAnswer:
        return await self.client.get(admin, path)

    async def json(self, admin: str, path: str) -> dict[str, Any]:
        answer = await self.get(admin, path)
        assert answer.code == 200, answer
        doc = json.loads(answer.body)
        assert isinstance(doc, dict)
        return doc

    async def close(self) -> None:
        for port in self.ports:
            if port.connected:
                await port.stopListening()


@pytest_twisted.async_yield_fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        await c.close()


# --- merge_documents ---------------------------------------------------------------------


def test_merging_sums_counts_tags_lists_and_takes_the_shared_from_the_first() -> None:
    pools0 = {"web": {"kind": "tls", "tcp_port": None, "connections": 2, "members": [{"a": 1}]}}
    pools1 = {
        "web": {"kind": "tls", "tcp_port": None, "connections": 3, "members": [{"a": 2}]},
        "api": {"kind": "tcp", "tcp_port": 20001, "connections": 1, "members": []},
    }
    merged = merge_documents([(0, status_doc(0, 1, pools0)), (1, status_doc(1, 2, pools1))])
    assert merged["links"] == 3 and merged["tunnels"] == 6 and merged["public_connections"] == 9
    assert merged["handoffs_received"] == 14  # a worker's own counter: summed too
    assert merged["draining"] == 0
    assert merged["certificate_expiry_timestamp_seconds"] == 2_000_000_000
    assert merged["certificate"]["serial"] == "s0"
    assert "worker" not in merged
    assert merged["pools"]["web"]["connections"] == 5
    assert merged["pools"]["web"]["members"] == [{"a": 1, "worker": 0}, {"a": 2, "worker": 1}]
    assert merged["pools"]["web"]["workers"] == [0, 1]
    assert merged["pools"]["api"]["tcp_port"] == 20001  # a port is not a count
    assert merged["pools"]["api"]["workers"] == [1]


def test_merging_draining_is_any_and_an_empty_list_is_empty() -> None:
    a, b = status_doc(0, 1), status_doc(1, 1)
    b["draining"] = 1
    assert merge_documents([(0, a), (1, b)])["draining"] == 1
    assert merge_documents([]) == {}


def test_merging_page_documents_keeps_their_shape() -> None:
    docs = [(0, page_doc(0, ["a", "b"])), (1, page_doc(1, ["c"]))]
    merged = merge_documents(docs)
    assert set(merged) == set(page_doc(0, [])) - {"worker"}
    assert merged["counts"] == {"links": 3, "tunnels": 3, "draining": 0, "open_fds": 18}
    assert [(link["agent"], link["worker"]) for link in merged["links"]] == [
        ("a", 0),
        ("b", 0),
        ("c", 1),
    ]
    assert [t["worker"] for t in merged["tunnels"]] == [0, 0, 1]
    assert merged["refusals"] == {"refused_streams": 3}
    assert merged["limits"] == {"max_links": 100}
    assert merged["version"] == "1.0" and merged["domain"] == "tunnel.localhost"


# --- the client --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_client_reads_at_most_its_cap(cluster: Cluster) -> None:
    worker = cluster.add({b"big": JSONResource(lambda: "x" * 5000), b"chunked": Chunked(5000)})
    client = WorkerAdminClient(get_reactor(), deadline=DEADLINE, cap=1000)
    for path in ("/big", "/chunked"):  # with a content-length, and without one
        with pytest.raises(AnswerTooLarge):
            await client.get(worker.path, path)
    answer = await client.get(worker.path, "/ready")  # small: read
    assert answer == WorkerAnswer(200, b"ready\n")


@pytest_twisted.ensureDeferred
async def test_client_gives_up_at_its_deadline(cluster: Cluster) -> None:
    worker = cluster.add({b"hang": Hang()})
    client = WorkerAdminClient(get_reactor(), deadline=0.2)
    with pytest.raises(WorkerUnavailable, match=r"no answer within 0\.2 s"):
        await client.get(worker.path, "/hang")
    with pytest.raises(WorkerUnavailable):
        await client.get(str(cluster.directory / "nothing.sock"), "/ready")


def test_client_refuses_a_deadline_or_cap_that_is_not_positive() -> None:
    with pytest.raises(ValueError):
        WorkerAdminClient(get_reactor(), deadline=0)
    with pytest.raises(ValueError):
        WorkerAdminClient(get_reactor(), cap=0)
    with pytest.raises(ValueError):
        merged_admin_site(get_reactor(), list, max_merges=0)


# --- the merged site ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_status_is_the_workers_merged_with_the_workers_list(cluster: Cluster) -> None:
    cluster.add()
    cluster.add().restarts = 2
    admin = cluster.serve()
    doc = await cluster.json(admin, "/status")
    assert doc["links"] == 1 + 2 and doc["handoffs_received"] == 14
    assert doc["certificate"]["serial"] == "s0"
    assert doc["workers"] == [
        {
            "index": 0,
            "pid": 1000,
            "state": "running",
            "restarts": 0,
            "answered": True,
            "error": None,
            "links": 1,
            "tunnels": 2,
            "streams": 3,
            "public_connections": 4,
        },
        {
            "index": 1,
            "pid": 1001,
            "state": "running",
            "restarts": 2,
            "answered": True,
            "error": None,
            "links": 2,
            "tunnels": 4,
            "streams": 3,
            "public_connections": 5,
        },
    ]
    # Live: a change in a worker is in the next answer.
    cluster.workers[1].status["links"] = 10
    assert (await cluster.json(admin, "/status"))["links"] == 11


@pytest_twisted.ensureDeferred
async def test_a_worker_that_does_not_answer_in_time_is_marked_and_left_out(
    cluster: Cluster,
) -> None:
    cluster.add()
    cluster.add({b"status": Hang()})
    gone = cluster.add()
    await gone.port.stopListening()  # its socket answers nothing at all
    exited = cluster.add()
    exited.state = "exited"
    admin = cluster.serve(deadline=0.3)
    doc = await cluster.json(admin, "/status")
    assert doc["links"] == 1  # worker 0's alone: an exited worker is not asked
    rows = {row["index"]: row for row in doc["workers"]}
    assert rows[0]["answered"] and rows[0]["error"] is None
    assert not rows[1]["answered"] and rows[1]["error"] == "no answer within 0.3 s"
    assert rows[1]["links"] is None
    assert not rows[2]["answered"] and rows[2]["error"]
    assert not rows[3]["answered"] and rows[3]["error"] == "exited"


@pytest_twisted.ensureDeferred
async def test_status_leaves_out_an_answer_longer_than_the_cap(cluster: Cluster) -> None:
    cluster.add()
    big = cluster.add()
    big.status["padding"] = "x" * 20_000
    admin = cluster.serve(cap=10_000)
    doc = await cluster.json(admin, "/status")
    assert doc["links"] == 1 and "padding" not in doc
    assert "longer than 10000 bytes" in doc["workers"][1]["error"]


@pytest_twisted.ensureDeferred
async def test_status_leaves_out_a_worker_that_answers_an_error_or_not_json(
    cluster: Cluster,
) -> None:
    cluster.add()
    cluster.add({b"status": JSONResource(lambda: [1, 2])})
    cluster.add({b"status": ReadyResource(lambda: False)})
    doc = await cluster.json(cluster.serve(), "/status")
    assert doc["links"] == 1
    assert [row["error"] for row in doc["workers"]] == [
        None,
        "answered something that is not a JSON object",
        "answered 503",
    ]


@pytest_twisted.ensureDeferred
async def test_ready_only_when_every_worker_runs_and_is_ready(cluster: Cluster) -> None:
    zero, one = cluster.add(), cluster.add()
    admin = cluster.serve(deadline=0.5)
    assert await cluster.get(admin, "/ready") == WorkerAnswer(200, b"ready\n")
    one.ready = False
    answer = await cluster.get(admin, "/ready")
    assert answer == WorkerAnswer(503, b"not ready\nworker 1: /ready answered 503\n")
    one.ready = True
    zero.state = "restarting"
    answer = await cluster.get(admin, "/ready")
    assert answer == WorkerAnswer(503, b"not ready\nworker 0: restarting\n")
    zero.state = "running"
    await one.port.stopListening()
    answer = await cluster.get(admin, "/ready")
    assert answer.code == 503 and answer.body.startswith(b"not ready\nworker 1: "), answer
    cluster.workers.clear()
    assert await cluster.get(admin, "/ready") == WorkerAnswer(503, b"not ready\nno worker\n")


def samples(text: bytes) -> Iterator[tuple[str, dict[str, str], float]]:
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            yield s.name, s.labels, s.value


@pytest_twisted.ensureDeferred
async def test_metrics_are_every_workers_labelled_and_the_supervisors_own(
    cluster: Cluster,
) -> None:
    cluster.add()
    cluster.add().restarts = 3
    cluster.add({b"metrics": JSONResource(lambda: "not an exposition {")})
    down = cluster.add()
    down.state = "restarting"
    await down.port.stopListening()
    answer = await cluster.get(cluster.serve(deadline=0.5), "/metrics")
    assert answer.code == 200
    found = list(samples(answer.body))
    links = {labels["worker"]: v for name, labels, v in found if name == "tunnels_relay_links"}
    assert links == {"0": 1.0, "1": 2.0}
    cpu = [labels for name, labels, _ in found if name == "process_cpu_seconds_total"]
    # The supervisor's own (no label) and each answering worker's, in one family.
    assert {} in cpu and {"worker": "0"} in cpu and {"worker": "1"} in cpu
    assert answer.body.count(b"# TYPE process_cpu_seconds_total") == 1
    states = {labels["state"]: v for name, labels, v in found if name == "tunnels_relay_workers"}
    assert states == {"starting": 0, "running": 3, "restarting": 1, "draining": 0, "exited": 0}
    up = {labels["worker"]: v for name, labels, v in found if name == "tunnels_relay_worker_up"}
    assert up == {"0": 1, "1": 1, "2": 0, "3": 0}
    restarts = {
        labels["worker"]: v for name, labels, v in found if name == "tunnels_relay_worker_restarts"
    }
    assert restarts == {"0": 0, "1": 3, "2": 0, "3": 0}


@pytest_twisted.ensureDeferred
async def test_answers_in_progress_are_bounded(cluster: Cluster) -> None:
    cluster.add({b"status": Hang()})
    admin = cluster.serve(deadline=1.0, max_merges=2)
    first = defer.ensureDeferred(cluster.get(admin, "/status"))
    second = defer.ensureDeferred(cluster.get(admin, "/status"))
    merges = cluster.site.resource.children[b"status"].merges
    await wait_until(lambda: merges.running == 2, "two answers in progress")
    refused = await cluster.get(admin, "/status")
    assert refused == WorkerAnswer(503, b"busy: too many answers in progress\n")
    for pending in (first, second):  # answered once the worker's deadline passes
        doc = json.loads((await pending).body)
        assert doc["workers"][0]["error"] == "no answer within 1 s"
    assert (await cluster.get(admin, "/status")).code == 200  # counted back down


@pytest_twisted.ensureDeferred
async def test_the_page_and_links(cluster: Cluster) -> None:
    cluster.add()
    cluster.add()
    admin = cluster.serve()
    page = await cluster.get(admin, "/")
    assert page.code == 200 and b'id="workers"' in page.body
    doc = await cluster.json(admin, "/links")
    assert [link["worker"] for link in doc["links"]] == [0, 1]
    assert [row["links"] for row in doc["workers"]] == [1, 1]


class Events(Protocol):
    """Follows server-sent events: each complete snapshot's document, in order."""

    def __init__(self) -> None:
        self.buffer = b""
        self.snapshots: list[dict[str, Any]] = []

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\n\n" in self.buffer:
            message, self.buffer = self.buffer.split(b"\n\n", 1)
            lines = dict(line.split(b": ", 1) for line in message.split(b"\n") if b": " in line)
            if lines.get(b"event") == b"snapshot":
                self.snapshots.append(json.loads(lines[b"data"]))

    def stop(self) -> None:
        assert self.transport is not None
        self.transport.stopProducing()  # type: ignore[attr-defined]


async def follow(admin: str) -> tuple[int, Events]:
    reactor = get_reactor()
    agent = Agent.usingEndpointFactory(reactor, _UNIXEndpoints(reactor, admin))
    response = await agent.request(b"GET", b"http://supervisor/events")
    events = Events()
    response.deliverBody(events)
    return response.code, events


async def wait_until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await task.deferLater(get_reactor(), 0.01, lambda: None)


@pytest_twisted.ensureDeferred
async def test_events_push_the_merged_page_document(cluster: Cluster) -> None:
    cluster.add()
    one = cluster.add()
    admin = cluster.serve()
    code, events = await follow(admin)
    assert code == 200
    await wait_until(lambda: bool(events.snapshots), "a first snapshot")
    first = events.snapshots[0]
    assert [row["index"] for row in first["workers"]] == [0, 1]
    assert first["counts"]["links"] == 2
    one.page = page_doc(1, ["x", "y", "z"])
    await wait_until(
        lambda: events.snapshots[-1]["counts"]["links"] == 4, "a snapshot with the change"
    )
    events.stop()


@pytest_twisted.ensureDeferred
async def test_events_have_at_most_max_followers(cluster: Cluster) -> None:
    cluster.add()
    admin = cluster.serve()
    followers = [await follow(admin) for _ in range(MAX_FOLLOWERS)]
    assert all(code == 200 for code, _ in followers)
    code, _ = await follow(admin)
    assert code == 503
    followers[0][1].stop()
    deadline = time.monotonic() + DEADLINE
    while True:  # a place frees once a page goes
        code, extra = await follow(admin)
        if code == 200:
            extra.stop()
            break
        assert time.monotonic() < deadline, "no place after a follower left"
        await task.deferLater(get_reactor(), 0.02, lambda: None)
    for _, events in followers[1:]:
        events.stop()


@pytest_twisted.ensureDeferred
async def test_a_real_relays_documents_merge_into_their_own_shape(tmp_path: Path) -> None:
    async for service in running_relay(tmp_path / "state"):
        status = relay_status_document(service.relay, service.front)
        page = status_page_document(service.relay, service.front)
    docs = [(0, status), (1, copy.deepcopy(status))]
    merged = merge_documents(docs)
    assert set(merged) == set(status)
    for key, value in status.items():
        if isinstance(value, int) and key not in ("draining",) and "timestamp" not in key:
            assert merged[key] == 2 * value, key
    assert merged["certificate"] == status["certificate"]
    merged_page = merge_documents([(0, page), (1, copy.deepcopy(page))])
    assert set(merged_page) == set(page)
    assert merged_page["limits"] == page["limits"]
    assert merged_page["counts"]["open_fds"] == 2 * page["counts"]["open_fds"]


@pytest_twisted.ensureDeferred
async def test_a_request_that_goes_away_gives_its_place_back(cluster: Cluster) -> None:
    cluster.add({b"status": Hang()})
    admin = cluster.serve(deadline=0.5, max_merges=1)
    reactor = get_reactor()
    merges = cluster.site.resource.children[b"status"].merges
    agent = Agent.usingEndpointFactory(reactor, _UNIXEndpoints(reactor, admin))
    pending = agent.request(b"GET", b"http://supervisor/status")
    await wait_until(lambda: merges.running == 1, "the answer in progress")
    pending.cancel()
    with pytest.raises(ResponseNeverReceived):
        await pending
    # Its place comes back once the worker's deadline passes, though nobody is answered.
    await wait_until(lambda: merges.running == 0, "the place given back")
    assert (await cluster.get(admin, "/ready")).code == 200
