"""`tunnel.agent._events`: the agent's connection records, bounded history and counters."""

from __future__ import annotations

from tunnel.agent._events import ConnectionState, Event, EventLog, Side


def _log() -> tuple[EventLog, list[Event]]:
    now = [1000.0]
    log = EventLog(lambda: now[0], history=3)
    seen: list[Event] = []
    log.observers.append(seen.append)
    return log, seen


def test_the_history_is_bounded_and_the_counters_are_since_start() -> None:
    log, _ = _log()
    records = [log.opened("t1", "127.0.0.1:80", "203.0.113.7", 40000 + n) for n in range(5)]
    for record in records:
        log.connected(record)
        record.from_client += 10
        record.to_client += 100
        log.ended(record, ConnectionState.CLOSED, Side.CLIENT)
    assert [c.id for c in log.connections()] == [3, 4, 5]
    counters = log.counters()
    assert counters["connections"] == 5 and counters["closed"] == 5 and counters["open"] == 0
    assert counters["from_client"] == 50 and counters["to_client"] == 500


def test_an_end_is_recorded_once_and_a_half_close_names_who_closed() -> None:
    log, seen = _log()
    record = log.opened("t1", "127.0.0.1:80", "203.0.113.7", 40000)
    log.connected(record)
    log.half_closed(record, Side.TARGET)
    assert record.state == ConnectionState.HALF_CLOSED
    log.ended(record, ConnectionState.CLOSED, Side.CLIENT)
    log.ended(record, ConnectionState.RESET, Side.AGENT, "late")
    assert (record.state, record.by, record.why) == ("closed", "target", None)
    assert [e.kind for e in seen] == [
        "connection_opened",
        "connection_changed",
        "connection_changed",
        "connection_closed",
    ]
    assert all(e.detail and not e.log for e in seen)


def test_a_refusing_target_is_told_once_until_it_answers() -> None:
    log, seen = _log()

    def refuse() -> None:
        record = log.opened("t1", "127.0.0.1:22", "203.0.113.7", 40000)
        log.ended(record, ConnectionState.FAILED, Side.TARGET, "nothing is listening on x")

    refuse()
    refuse()
    told = [e for e in seen if e.kind == "target_refused"]
    assert [e.detail for e in told] == [False, True]
    assert told[0].fields["client"] == "203.0.113.7:40000"
    works = log.opened("t1", "127.0.0.1:22", "203.0.113.7", 40001)
    log.connected(works)
    refuse()
    assert [e.detail for e in seen if e.kind == "target_refused"] == [False, True, False]
    assert log.counters()["failed"] == 3


def test_nothing_is_built_per_connection_without_observers() -> None:
    log = EventLog(lambda: 0.0)
    record = log.opened("t1", "127.0.0.1:80", "203.0.113.7", 40000)
    log.ended(record, ConnectionState.CLOSED, Side.CLIENT)
    assert not log.recent
