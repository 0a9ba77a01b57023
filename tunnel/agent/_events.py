"""
What the agent tells the people watching it, without I/O: one `Event` per thing worth
saying (the link is lost, back, a tunnel is ready, the relay is going away, the token is
refused, the local target refused a connection, ...) and a `Connection` record per public
connection, kept in a bounded history with counters since start.

The `tunnel` command prints the events, the inspector page (``/events`` of the admin
endpoint) streams them, and the daemon logs them with their fields (``event_type``,
``tunnel_id``, ``client``, ...), which ``--log-format json`` keeps as JSON members.

The data path only adds to two integers per connection (`Connection.from_client`,
`Connection.to_client`) as bytes pass; nothing here is called per write.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "HISTORY",
    "RECENT",
    "Connection",
    "ConnectionState",
    "Event",
    "EventLog",
    "Side",
]

#: Connections kept for the inspector (the open ones and the last closed ones).
HISTORY = 500
#: Other events kept for the inspector.
RECENT = 50


class ConnectionState:
    """
    The states of a `Connection` (strings, as the page and JSON show them).
    """

    #: The agent is connecting to the local target.
    CONNECTING = "connecting"
    OPEN = "open"
    #: One side finished sending (`Connection.half_closed_by` says which); the other may go on.
    HALF_CLOSED = "half-closed"
    #: Both sides finished cleanly.
    CLOSED = "closed"
    #: Ended abruptly (`Connection.by` and `Connection.why` say by whom and why).
    RESET = "reset"
    #: The local target could not be reached; nothing was exchanged.
    FAILED = "failed"

    ENDED = frozenset({CLOSED, RESET, FAILED})


#: `ConnectionState.ENDED`, for the per-connection checks (a property call less each).
_ENDED = ConnectionState.ENDED


class Side:
    """
    Who did something to a connection.
    """

    CLIENT = "client"
    TARGET = "target"
    RELAY = "relay"
    AGENT = "agent"


@dataclass(slots=True, eq=False)
class Connection:
    """
    One public connection through one of the agent's tunnels.
    """

    #: Numbered from 1 in the order the relay opened them.
    id: int
    tunnel_id: str
    #: The local target, ``host:port``.
    target: str
    #: The public client's address and port, as the relay saw them.
    client: str
    client_port: int
    #: When it was opened and when it ended (the clock's seconds: wall time in the agent).
    opened: float
    ended: float | None = None
    #: Octets from the public client to the target, and back.
    from_client: int = 0
    to_client: int = 0
    state: str = ConnectionState.CONNECTING
    #: Who finished sending first (a half-close), or None.
    half_closed_by: str | None = None
    #: Who ended it (a `Side`), once ended.
    by: str | None = None
    #: Why it failed or was reset, for people (``target refused``, ``reset by the client``).
    why: str | None = None

    @property
    def ended_already(self) -> bool:
        return self.state in ConnectionState.ENDED

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "tunnel_id": self.tunnel_id,
            "target": self.target,
            "client": self.client,
            "client_port": self.client_port,
            "opened": round(self.opened, 3),
            "ended": None if self.ended is None else round(self.ended, 3),
            "from_client": self.from_client,
            "to_client": self.to_client,
            "state": self.state,
            "half_closed_by": self.half_closed_by,
            "by": self.by,
            "why": self.why,
        }


@dataclass(frozen=True)
class Event:
    """
    Something worth telling the person running the agent.
    """

    #: What happened: ``link_up``, ``link_lost``, ``retrying``, ``link_back``,
    #: ``tunnel_ready``, ``tunnel_back``, ``tunnel_moved``, ``tunnel_failed``,
    #: ``tunnel_closed``, ``relay_draining``, ``token_refused``, ``target_refused``,
    #: ``connection_opened``, ``connection_changed``, ``connection_closed``, ``log``.
    kind: str
    #: One line for people.
    text: str
    #: ``info``, ``warn`` or ``error``.
    level: str = "info"
    #: Only worth showing when asked for more (``tunnel -v``): each connection, each retry.
    detail: bool = False
    #: Whether the daemon logs it (connections are not logged one by one).
    log: bool = True
    #: Fields for structured logs and the inspector (``tunnel_id``, ``client``, ...).
    fields: dict[str, Any] = field(default_factory=dict)
    #: The connection it is about, if any.
    connection: Connection | None = None

    def as_json(self) -> dict[str, Any]:
        value: dict[str, Any] = {"kind": self.kind, "text": self.text, "level": self.level}
        value.update(self.fields)
        if self.connection is not None:
            value["connection"] = self.connection.as_json()
        return value


class EventLog:
    """
    The agent's events and connections: observers are told of each `Event` as it happens;
    the open connections, the last `history` connections and counters since start are
    kept for whoever asks (the inspector's first page load).

    @param clock: the time now, in seconds since the epoch (the reactor's ``seconds``).
    """

    def __init__(self, clock: Callable[[], float], history: int = HISTORY) -> None:
        self.clock = clock
        self.started = clock()
        self.observers: list[Callable[[Event], object]] = []
        self.open: dict[int, Connection] = {}
        self.history: deque[Connection] = deque(maxlen=history)
        self._ids = 0
        #: Counters since start.
        self.counts: dict[str, int] = {
            "connections": 0,
            "closed": 0,
            "reset": 0,
            "failed": 0,
        }
        #: Octets of connections that ended (the open ones are added when asked).
        self._ended_from_client = 0
        self._ended_to_client = 0
        #: Targets whose refusal was told, until a connection to them works again.
        self._refusing: set[str] = set()
        #: The last agent events other than connections' (time, event), for the page.
        self.recent: deque[tuple[float, Event]] = deque(maxlen=RECENT)

    # -- observers ---------------------------------------------------------------------------

    def emit(self, event: Event) -> None:
        """
        Tell every observer of `event` (one failing observer does not stop the others).
        """
        if event.connection is None or event.kind == "target_refused":
            self.recent.append((self.clock(), event))
        for observer in list(self.observers):
            try:
                observer(event)
            except Exception:  # pragma: no cover - an observer's bug
                pass

    def say(
        self, kind: str, text: str, level: str = "info", *, detail: bool = False, **fields: Any
    ) -> Event:
        """
        Emit an `Event` made of these arguments; returns it.
        """
        event = Event(kind, text, level, detail=detail, fields=fields)
        self.emit(event)
        return event

    # -- connections -------------------------------------------------------------------------

    def opened(self, tunnel_id: str, target: str, client: str, client_port: int) -> Connection:
        """
        The relay opened a stream for a public connection; the agent connects to `target`.
        """
        self._ids += 1
        connection = Connection(self._ids, tunnel_id, target, client, client_port, self.clock())
        self.open[connection.id] = connection
        self.history.append(connection)
        self.counts["connections"] += 1
        if self.observers:
            self._connection_event("connection_opened", connection)
        return connection

    def connected(self, connection: Connection) -> None:
        """
        The local target accepted the connection.
        """
        if connection.state != ConnectionState.CONNECTING:
            return
        connection.state = ConnectionState.OPEN
        self._refusing.discard(connection.target)
        if self.observers:
            self._connection_event("connection_changed", connection)

    def half_closed(self, connection: Connection, by: str) -> None:
        """
        `by` (the client or the target) finished sending.
        """
        if connection.state in _ENDED:
            return
        if connection.half_closed_by is None:
            connection.half_closed_by = by
            connection.state = ConnectionState.HALF_CLOSED
            if self.observers:
                self._connection_event("connection_changed", connection)

    def ended(self, connection: Connection, state: str, by: str, why: str | None = None) -> None:
        """
        The connection ended (`state`: closed, reset or failed), by `by`; later calls for
        the same connection (its other side ending too) change nothing.
        """
        if connection.state in _ENDED:
            return
        if state == ConnectionState.CLOSED and connection.half_closed_by is not None:
            by = connection.half_closed_by  # whoever finished first closed it
        connection.state = state
        connection.by = by
        connection.why = why
        connection.ended = self.clock()
        self.open.pop(connection.id, None)
        self.counts[state] += 1
        self._ended_from_client += connection.from_client
        self._ended_to_client += connection.to_client
        if state == ConnectionState.FAILED and by == Side.TARGET:
            first = connection.target not in self._refusing
            self._refusing.add(connection.target)
            event = Event(
                "target_refused",
                f"{why} (a connection from {connection.client}:{connection.client_port})",
                "warn",
                # Said once until the target answers again; each one with -v.
                detail=not first,
                log=False,
                fields=self._fields(connection),
                connection=connection,
            )
            self.emit(event)
            return
        if self.observers:
            self._connection_event("connection_closed", connection)

    def _connection_event(self, kind: str, connection: Connection) -> None:
        # Called only when someone observes: with none (the daemon without an inspector
        # open), a connection's events cost no Event, and no call.
        self.emit(
            Event(
                kind,
                _describe(connection),
                detail=True,
                log=False,
                fields=self._fields(connection),
                connection=connection,
            )
        )

    @staticmethod
    def _fields(connection: Connection) -> dict[str, Any]:
        return {
            "tunnel_id": connection.tunnel_id,
            "client": f"{connection.client}:{connection.client_port}",
            "target": connection.target,
        }

    # -- what the inspector asks -------------------------------------------------------------

    def connections(self) -> Iterator[Connection]:
        """
        The kept connections, oldest first.
        """
        return iter(self.history)

    def counters(self) -> dict[str, int]:
        """
        Counters since start: connections (opened, open now, closed, reset, failed) and
        octets each way.
        """
        open_now = self.open.values()
        return {
            **self.counts,
            "open": len(self.open),
            "from_client": self._ended_from_client + sum(c.from_client for c in open_now),
            "to_client": self._ended_to_client + sum(c.to_client for c in open_now),
        }


def _describe(connection: Connection) -> str:
    who = f"{connection.client}:{connection.client_port} -> {connection.target}"
    if connection.state == ConnectionState.HALF_CLOSED:
        return f"connection {who}: the {connection.half_closed_by} finished sending"
    if connection.state not in _ENDED:
        return f"connection {who} {connection.state}"
    moved = f"{connection.from_client} B in, {connection.to_client} B out"
    if connection.state == ConnectionState.CLOSED:
        return f"connection {who} closed by the {connection.by} ({moved})"
    return f"connection {who} {connection.state}: {connection.why} ({moved})"
