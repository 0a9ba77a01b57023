"""
Control messages that the relay and the agent exchange in CONTROL frames, and the metadata
of an OPEN frame. Sans-IO: values in, bytes out, and back.

Each message is a UTF-8 JSON object with a ``"type"`` member (docs/protocol.md, "Control
messages"). Members a receiver does not know are ignored, and so is a message of an unknown
type, so that later versions can add both without breaking earlier peers.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

__all__ = [
    "AgentHello",
    "ControlError",
    "ControlMessage",
    "ErrorMessage",
    "RelayWelcome",
    "StreamInfo",
    "TunnelClose",
    "TunnelClosed",
    "TunnelGranted",
    "TunnelRefused",
    "TunnelRequest",
    "decode_message",
    "encode_message",
]

#: Largest control message accepted, in octets (it also has to fit one frame).
MAX_CONTROL_SIZE = 16 * 1024

TunnelKind = Literal["tls", "tcp"]


class ControlError(ValueError):
    """
    A control message or stream metadata is malformed: not JSON, not an object, or a
    member of the wrong type. The link ends with PROTOCOL_ERROR.
    """


@dataclass(frozen=True)
class ControlMessage:
    """
    Base class of control messages; `TYPE` is the value of the ``"type"`` member.
    """

    TYPE: ClassVar[str] = ""


@dataclass(frozen=True)
class AgentHello(ControlMessage):
    """
    The agent's first control message: who it is and its credential.
    """

    TYPE: ClassVar[str] = "hello"
    #: The link protocol version the agent speaks.
    version: int
    #: The agent's token, or None when the relay needs none.
    token: str | None = None
    #: The agent's software name and version, for the relay's logs.
    agent: str = ""


@dataclass(frozen=True)
class RelayWelcome(ControlMessage):
    """
    The relay accepted the agent.
    """

    TYPE: ClassVar[str] = "welcome"
    #: The relay's tunnel domain: tunnels are ``<id>.<domain>``.
    domain: str
    #: The port public clients use for TLS tunnels (the one written into URLs).
    public_port: int
    #: Seconds between keepalive pings the relay expects, and the silence it tolerates.
    keepalive_interval: float = 5.0
    keepalive_timeout: float = 15.0
    #: A name of the relay, for the agent's logs.
    relay: str = ""
    #: What this relay supports beyond the first release, such as ``"allow"`` (client
    #: allow lists). An agent needing a feature the relay does not list refuses to use it
    #: rather than have it ignored.
    features: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ErrorMessage(ControlMessage):
    """
    A link-level refusal (a wrong token, a version too old); the link closes after it.
    """

    TYPE: ClassVar[str] = "error"
    #: A stable, machine-readable code such as ``"unauthorized"``.
    code: str
    #: A sentence for the human who runs the agent.
    message: str


@dataclass(frozen=True)
class TunnelRequest(ControlMessage):
    """
    The agent asks for a tunnel.
    """

    TYPE: ClassVar[str] = "tunnel_request"
    #: Chosen by the agent; the answer carries it back.
    request_id: int
    #: ``"tls"`` (TLS terminated at the relay, routed by SNI) or ``"tcp"`` (a raw port).
    kind: TunnelKind
    #: Extensible options, such as ``{"h2": true}`` or ``{"allow": ["203.0.113.0/24"]}``;
    #: unknown ones are ignored (an agent checks `RelayWelcome.features` before relying on
    #: one that restricts access).
    options: dict[str, Any] = field(default_factory=dict)
    #: To get a previous tunnel back: its id and the secret it was granted with.
    reclaim_id: str | None = None
    reclaim_secret: str | None = None
    #: For a reclaimed raw TCP tunnel: the port it had.
    reclaim_port: int | None = None


@dataclass(frozen=True)
class TunnelGranted(ControlMessage):
    """
    The relay granted a tunnel.
    """

    TYPE: ClassVar[str] = "tunnel_granted"
    request_id: int
    #: The tunnel's id, the first label of its host name.
    tunnel_id: str
    #: The public TLS host name and port (``<id>.<domain>``).
    host: str
    port: int
    #: For raw TCP tunnels: the public host and port, else None.
    tcp_host: str | None = None
    tcp_port: int | None = None
    #: Proves ownership of `tunnel_id` for a later reclaim, even after a relay restart.
    secret: str = ""


@dataclass(frozen=True)
class TunnelRefused(ControlMessage):
    """
    The relay refused a tunnel request.
    """

    TYPE: ClassVar[str] = "tunnel_refused"
    request_id: int
    #: A stable code: ``"limit"``, ``"bad_request"``, ``"reclaim_refused"``, ``"no_ports"``.
    code: str
    message: str


@dataclass(frozen=True)
class TunnelClose(ControlMessage):
    """
    The agent closes one of its tunnels.
    """

    TYPE: ClassVar[str] = "tunnel_close"
    tunnel_id: str


@dataclass(frozen=True)
class TunnelClosed(ControlMessage):
    """
    The relay closed a tunnel (at the agent's request, or on its own, such as an eviction).
    """

    TYPE: ClassVar[str] = "tunnel_closed"
    tunnel_id: str
    reason: str = ""


_MESSAGES: dict[str, type[ControlMessage]] = {
    cls.TYPE: cls
    for cls in (
        AgentHello,
        RelayWelcome,
        ErrorMessage,
        TunnelRequest,
        TunnelGranted,
        TunnelRefused,
        TunnelClose,
        TunnelClosed,
    )
}

_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "version": (int,),
    "token": (str, type(None)),
    "agent": (str,),
    "domain": (str,),
    "public_port": (int,),
    "keepalive_interval": (int, float),
    "keepalive_timeout": (int, float),
    "relay": (str,),
    "code": (str,),
    "message": (str,),
    "request_id": (int,),
    "kind": (str,),
    "options": (dict,),
    "reclaim_id": (str, type(None)),
    "reclaim_secret": (str, type(None)),
    "reclaim_port": (int, type(None)),
    "tunnel_id": (str,),
    "host": (str,),
    "port": (int,),
    "tcp_host": (str, type(None)),
    "tcp_port": (int, type(None)),
    "secret": (str,),
    "reason": (str,),
    "features": (list,),
}


def encode_message(message: ControlMessage) -> bytes:
    """
    Encode a control message as the payload of a CONTROL frame.
    """
    body = {"type": message.TYPE, **asdict(message)}
    return json.dumps(body, separators=(",", ":")).encode()


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _load_object(payload: bytes, what: str) -> dict[str, Any]:
    if len(payload) > MAX_CONTROL_SIZE:
        raise ControlError(f"{what} of {len(payload)} octets is too large")
    try:
        body = json.loads(payload.decode("utf-8"), parse_constant=_no_constants)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ControlError(f"{what} is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise ControlError(f"{what} is not a JSON object")
    return body


def decode_message(payload: bytes) -> ControlMessage | None:
    """
    Decode a CONTROL frame's payload.

    @return: the message, or None for a message of a type this version does not know.
    @raise ControlError: the payload is malformed or a known member has the wrong type.
    """
    body = _load_object(payload, "control message")
    kind = body.get("type")
    cls = _MESSAGES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        return None
    kwargs: dict[str, Any] = {}
    for name in cls.__dataclass_fields__:
        if name not in body:
            continue
        value = body[name]
        allowed = _FIELD_TYPES[name]
        if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
            raise ControlError(f"{kind}: member {name!r} has the wrong type")
        kwargs[name] = value
    try:
        message = cls(**kwargs)
    except TypeError as e:
        raise ControlError(f"{kind}: {e}") from None
    if isinstance(message, TunnelRequest) and message.kind not in ("tls", "tcp"):
        raise ControlError(f"tunnel_request: unknown kind {message.kind!r}")
    if isinstance(message, RelayWelcome) and not all(isinstance(f, str) for f in message.features):
        raise ControlError("welcome: member 'features' is not a list of strings")
    return message


@dataclass(frozen=True)
class StreamInfo:
    """
    The metadata of an OPEN frame from the relay: which tunnel, and who connected.
    """

    #: The tunnel the public connection arrived on.
    tunnel_id: str
    #: The public client's address and port as the relay saw them.
    client_host: str = ""
    client_port: int = 0
    #: The relay's address and port that the client connected to ("" and 0 when the relay
    #: did not say: it is optional, added after the first version).
    server_host: str = ""
    server_port: int = 0

    def encode(self) -> bytes:
        """
        Encode as OPEN metadata.
        """
        return json.dumps(
            {
                "tunnel": self.tunnel_id,
                "client": [self.client_host, self.client_port],
                "server": [self.server_host, self.server_port],
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def decode(cls, payload: bytes) -> StreamInfo:
        """
        Decode OPEN metadata.

        @raise ControlError: malformed metadata.
        """
        body = _load_object(payload, "stream metadata")
        tunnel_id = body.get("tunnel")
        if not isinstance(tunnel_id, str):
            raise ControlError("stream metadata has no tunnel id")
        client_host, client_port = _address(body.get("client"))
        server_host, server_port = _address(body.get("server"))
        return cls(tunnel_id, client_host, client_port, server_host, server_port)


def _address(value: Any) -> tuple[str, int]:
    """
    A ``[host, port]`` pair of stream metadata, or ``("", 0)`` when absent or malformed (the
    addresses are informational: a bad one never fails the stream).
    """
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not isinstance(value[0], str)
        or not isinstance(value[1], int)
        or isinstance(value[1], bool)
    ):
        return "", 0
    return value[0], value[1]
