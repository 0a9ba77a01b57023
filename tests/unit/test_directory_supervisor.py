"""
The supervisor of the relay's workers on a memory reactor: the workers' command line, the
control connections (a malformed message restarts its worker, never the supervisor), exits
and restarts with back-off, SIGHUP forwarding, and a bounded drain.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from tunnel.relay._supervisor import BACKOFF_MAX, STOP_MARGIN, Supervisor, worker_argv
from tunnel.relay._worker import WORKER_ENV
from tunnel.relay._workermsg import MessageDecoder, encode


class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[str] = []

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class Reactor(MemoryReactorClock):
    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, list[str], dict[str, str], FakeProcess]] = []

    def spawnProcess(
        self, proto: Any, executable: str, args: list[str], env: Any, **kw: Any
    ) -> Any:
        process = FakeProcess(1000 + len(self.spawned))
        self.spawned.append((proto, args, env, process))
        return process


def started(tmp_path: Path, count: int = 2) -> tuple[Reactor, Supervisor]:
    reactor = Reactor()
    args = ["--listen", "tcp:8443", "--workers", str(count), "--admin=tcp:9090", "--tokens", "t"]
    supervisor = Supervisor(reactor, count, args, str(tmp_path), 5.0, signals=False)
    supervisor.startService()
    return reactor, supervisor


def control(reactor: Reactor, index: int) -> tuple[Any, StringTransport]:
    factory = reactor.unixServers[index][1]
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def decoded(transport: StringTransport) -> list[dict[str, Any]]:
    return MessageDecoder().feed(transport.value())


def test_the_workers_get_the_same_arguments_but_workers_and_admin() -> None:
    assert worker_argv(
        [
            "--workers",
            "2",
            "--listen",
            "tcp:1",
            "--admin=tcp:2",
            "--log-format=text",
            "--admin",
            "x",
        ],
        "unix:/a.sock",
    ) == ["--listen", "tcp:1", "--admin", "unix:/a.sock", "--log-format", "json"]


def test_each_worker_is_started_with_its_place_and_admin_socket(tmp_path: Path) -> None:
    reactor, supervisor = started(tmp_path)
    assert [path for path, *_ in reactor.unixServers] == [
        str(tmp_path / "workers" / "0" / "control.sock"),
        str(tmp_path / "workers" / "1" / "control.sock"),
    ]
    for i, (_, args, env, _) in enumerate(reactor.spawned):
        assert env[WORKER_ENV] == f"{i}/2"
        tail = args[args.index("tunnelrelay") + 1 :]
        assert tail == [
            "--listen",
            "tcp:8443",
            "--tokens",
            "t",
            "--admin",
            f"unix:{tmp_path}/workers/{i}/admin.sock",
            "--log-format",
            "json",
        ]
    assert [w["state"] for w in supervisor.workers()] == ["starting", "starting"]
    assert [w["pid"] for w in supervisor.workers()] == [1000, 1001]


def test_claims_are_told_to_every_connected_worker(tmp_path: Path) -> None:
    reactor, supervisor = started(tmp_path)
    p0, t0 = control(reactor, 0)
    p1, t1 = control(reactor, 1)
    assert [w["state"] for w in supervisor.workers()] == ["running", "running"]
    p0.dataReceived(
        encode({"t": "claim", "id": "abc", "named": False, "sig": "", "principal": "p"})
    )
    for transport in (t0, t1):
        owners = [m for m in decoded(transport) if m["t"] == "owners"]
        assert owners == [{"t": "owners", "id": "abc", "workers": [0], "sig": ""}]
    # A worker that connects again (restarted) gets a snapshot.
    p1.connectionLost(None)
    _, again = control(reactor, 1)
    assert decoded(again) == [
        {"t": "spread", "up": [0, 1], "links": [0, 0]},
        {"t": "owners", "id": "abc", "workers": [0], "sig": ""},
        {"t": "counts", "principal": "p", "links": 0, "tunnels": 1},
    ]


def test_a_malformed_message_restarts_its_worker_only(tmp_path: Path) -> None:
    reactor, supervisor = started(tmp_path)
    p0, t0 = control(reactor, 0)
    p1, _ = control(reactor, 1)
    p1.dataReceived(encode({"t": "links", "principal": "p", "n": 1}))
    garbage = b"{not json"
    p0.dataReceived(struct.pack(">I", len(garbage)) + garbage)
    process0, process1 = reactor.spawned[0][3], reactor.spawned[1][3]
    assert process0.signals == ["KILL"] and process1.signals == []
    assert supervisor.malformed == 1 and t0.disconnecting
    # A message only the supervisor sends, from a worker: the same.
    p1.dataReceived(encode({"t": "lost", "id": "x", "reason": "r"}))
    assert process1.signals == ["KILL"] and supervisor.malformed == 2


def test_an_exited_worker_is_restarted_with_back_off_and_counted(tmp_path: Path) -> None:
    reactor, supervisor = started(tmp_path)
    p0, _ = control(reactor, 0)
    _, t1 = control(reactor, 1)
    p0.dataReceived(
        encode({"t": "claim", "id": "abc", "named": False, "sig": "", "principal": "p"})
    )
    t1.clear()
    delays = []
    for n in range(1, 9):
        reactor.spawned[-2 if n == 1 else -1][0].processEnded(Failure(Exception("exited")))
        assert supervisor.workers()[0]["state"] == "restarting"
        assert supervisor.workers()[0]["pid"] is None
        (call,) = [c for c in reactor.getDelayedCalls() if c.active()]
        delays.append(call.getTime() - reactor.seconds())
        spawned = len(reactor.spawned)
        reactor.advance(delays[-1])
        assert len(reactor.spawned) == spawned + 1
    assert delays == [0.5, 1, 2, 4, 8, 16, BACKOFF_MAX, BACKOFF_MAX]
    assert supervisor.workers()[0]["restarts"] == 8
    # What it held is gone, and the other worker was told.
    assert supervisor.directory.holders("abc") == []
    assert {"t": "owners", "id": "abc", "workers": [], "sig": ""} in decoded(t1)


def test_a_workers_log_is_the_supervisors_with_its_index(tmp_path: Path) -> None:
    from twisted.logger import LogLevel, eventAsJSON, formatEvent, globalLogPublisher

    reactor, _ = started(tmp_path)
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        proto = reactor.spawned[1][0]
        line = eventAsJSON(
            {
                "log_format": "granted {what}",
                "what": "a tunnel",
                "log_level": LogLevel.warn,
                "log_namespace": "tunnel.relay._link",
                "log_time": 5.0,
            }
        ).encode()
        # Split anywhere, on stdout; a line that is no event (stderr) is kept as text.
        proto.childDataReceived(1, line[:10])
        assert events == []
        proto.childDataReceived(1, line[10:] + b"\n")
        proto.childDataReceived(2, b"Traceback: boom\n" + b"x" * 70000)
    finally:
        globalLogPublisher.removeObserver(events.append)
    ours = [e for e in events if e.get("worker") == 1]
    assert [formatEvent(e) for e in ours[:2]] == [
        "worker 1: granted a tunnel",
        "worker 1: Traceback: boom",
    ]
    assert ours[0]["log_level"] == LogLevel.warn and ours[0]["log_time"] == 5.0
    assert ours[0]["log_namespace"] == "tunnel.relay._link"
    # A line longer than the bound is cut there.
    assert len(ours) == 3 and len(ours[2]["line"]) == 65536


def test_sighup_goes_to_every_worker(tmp_path: Path) -> None:
    reactor, supervisor = started(tmp_path)
    supervisor._forward_hup()
    assert [p.signals for *_, p in reactor.spawned] == [["HUP"], ["HUP"]]


def test_stop_drains_every_worker_and_kills_the_late_ones(tmp_path: Path) -> None:
    reactor, supervisor = started(tmp_path)
    done = supervisor.stopService()
    processes = [p for *_, p in reactor.spawned]
    assert [p.signals for p in processes] == [["TERM"], ["TERM"]]
    assert {w["state"] for w in supervisor.workers()} == {"draining"}
    reactor.spawned[0][0].processEnded(Failure(Exception("exited")))
    # No restart while stopping.
    assert len(reactor.spawned) == 2 and supervisor.workers()[0]["state"] == "exited"
    reactor.advance(5.0 + STOP_MARGIN)
    assert processes[1].signals == ["TERM", "KILL"]
    fired: list[object] = []
    done.addCallback(fired.append)
    assert fired == []
    reactor.spawned[1][0].processEnded(Failure(Exception("killed")))
    assert fired == [None]
