"""
Control messages that the relay and the agent exchange in CONTROL frames, and the metadata
of an OPEN frame. Sans-IO: values in, bytes out, and back.

Each message is a UTF-8 JSON object with a ``"type"`` member (docs/protocol.md, "Control
messages"). Members a receiver does not know are ignored, and so is a message of an unknown
type, so that later versions can add both without breaking earlier peers.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import MISSING, Field, asdict, dataclass, field
from typing import Any, ClassVar, Literal

__all__ = [
    "AgentHello",
    "CertificateIssued",
    "CertificateRefused",
    "CertificateRequest",
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

TunnelKind = Literal["tls", "tcp", "passthrough"]


class ControlError(ValueError):
    """
    A control message or stream metadata is malformed: not JSON, not an object, a member
    of the wrong type, out of its bounds (see `_FIELDS`), or a string that cannot be UTF-8.
    The link ends with PROTOCOL_ERROR.
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
    #: ``"tls"`` (TLS terminated at the relay, routed by SNI), ``"tcp"`` (a raw port too) or
    #: ``"passthrough"`` (routed by SNI, the TLS bytes passed on untouched).
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
    #: The rate limit the relay enforces on the tunnel, in octets per second each way (the
    #: one asked for, or lower: the relay's ceiling); None: none.
    rate_limit: int | None = None


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


@dataclass(frozen=True)
class CertificateRequest(ControlMessage):
    """
    The agent asks the relay to sign a certificate for one of its passthrough tunnels' host
    name (the key stays with the agent: only its CSR travels).
    """

    TYPE: ClassVar[str] = "certificate_request"
    #: Chosen by the agent, unique on the link (with the tunnel requests'); echoed back.
    request_id: int
    #: The tunnel whose host name the certificate is for.
    tunnel_id: str
    #: A PEM certificate signing request whose only name is the tunnel's host name.
    csr: str


@dataclass(frozen=True)
class CertificateIssued(ControlMessage):
    """
    The relay signed the certificate of a `CertificateRequest`.
    """

    TYPE: ClassVar[str] = "certificate_issued"
    request_id: int
    #: PEM: the certificate, then the certificates of its issuers up to (and with) the
    #: authority clients trust.
    chain: str


@dataclass(frozen=True)
class CertificateRefused(ControlMessage):
    """
    The relay will not sign the certificate of a `CertificateRequest`.
    """

    TYPE: ClassVar[str] = "certificate_refused"
    request_id: int
    #: ``"no_issuer"``, ``"not_held"``, ``"bad_request"``, ``"limit"``, ``"issue_failed"``.
    code: str
    message: str


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
        CertificateRequest,
        CertificateIssued,
        CertificateRefused,
    )
}

#: Bounds of the string members (UTF-8 octets). Tokens and secrets are credentials: a
#: kilobyte is far beyond any real one and keeps what a peer can make the relay hash small.
MAX_TOKEN = 1024
MAX_SECRET = 1024
#: Free text for humans (refusal messages, close reasons).
MAX_TEXT = 4096
#: Software names, logged by the relay and the agent.
MAX_NAME = 256
#: A client's or the relay's address in stream metadata (an IPv6 address with a zone fits).
MAX_ADDRESS = 255
#: Host names (RFC 1035: 253 octets).
MAX_HOST = 253
#: Machine-readable codes and feature names.
MAX_CODE = 64
#: Entries of `RelayWelcome.features`.
MAX_FEATURES = 64
#: The tunnel options object: members, nesting depth, and items of any list or object in it.
MAX_OPTIONS = 64
MAX_OPTION_DEPTH = 4
MAX_OPTION_ITEMS = 1024
#: A certificate signing request, and a certificate chain, in PEM.
MAX_CSR = 8192
MAX_CHAIN = 12288
#: Request ids are chosen by the agent; JSON integers beyond 2^53 lose precision elsewhere.
MAX_REQUEST_ID = (1 << 53) - 1

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", re.ASCII)
_HOST = re.compile(r"[A-Za-z0-9._:\[\]-]{1,253}", re.ASCII)
_CODE = re.compile(r"[A-Za-z0-9_.-]{1,64}", re.ASCII)
#: Strings that JSON writes as they are (no escapes), in OPEN metadata's fast paths.
_PLAIN = re.compile(r"[A-Za-z0-9._:-]*", re.ASCII)
#: OPEN metadata as `StreamInfo.encode` writes it for a tunnel id (`_LABEL`) and hosts that
#: are plain addresses (at most `MAX_ADDRESS` octets): tunnel, client host and port, server
#: host and port. Anything else (other spacing, member order, escapes) takes the JSON path.
_OPEN_SHAPE = re.compile(
    rb'\{"tunnel":"([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)",'
    rb'"client":\["([A-Za-z0-9._:-]{0,255})",(0|[1-9][0-9]{0,4})\],'
    rb'"server":\["([A-Za-z0-9._:-]{0,255})",(0|[1-9][0-9]{0,4})\]\}'
)


def _utf8_size(value: str) -> int | None:
    """
    The UTF-8 length of `value`, or None when it cannot be UTF-8 (a lone surrogate, which
    JSON's ``\\ud800`` escape can produce).
    """
    try:
        return len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return None


def _text(limit: int, printable: bool = False) -> Callable[[Any], bool]:
    def valid(value: Any) -> bool:
        if not isinstance(value, str):
            return False
        size = _utf8_size(value)
        if size is None or size > limit:
            return False
        # Names that end up in log lines carry no control characters (no forged lines).
        return not printable or not any(c < " " or c == "\x7f" for c in value)

    return valid


def _pattern(regex: re.Pattern[str]) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, str) and regex.fullmatch(value) is not None


def _integer(low: int, high: int) -> Callable[[Any], bool]:
    return lambda value: (
        isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
    )


def _seconds(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and 0 < value <= 86400
    )


def _optional(valid: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or valid(value)


def _features(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) <= MAX_FEATURES
        and all(isinstance(f, str) and _CODE.fullmatch(f) is not None for f in value)
    )


def _json_tree(value: Any, depth: int) -> bool:
    """
    Whether an option value is JSON whose every string is UTF-8, within the depth and item
    bounds (the message size bounds the rest).
    """
    if isinstance(value, str):
        return _utf8_size(value) is not None
    if isinstance(value, list):
        return (
            depth < MAX_OPTION_DEPTH
            and len(value) <= MAX_OPTION_ITEMS
            and all(_json_tree(v, depth + 1) for v in value)
        )
    if isinstance(value, dict):
        return (
            depth < MAX_OPTION_DEPTH
            and len(value) <= MAX_OPTION_ITEMS
            and all(_text(MAX_CODE)(k) and _json_tree(v, depth + 1) for k, v in value.items())
        )
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or isinstance(value, bool | int)


def _options(value: Any) -> bool:
    return isinstance(value, dict) and len(value) <= MAX_OPTIONS and _json_tree(value, 0)


def _pem(limit: int) -> Callable[[Any], bool]:
    return lambda value: (
        isinstance(value, str)
        and len(value) <= limit
        and value.isascii()
        and "-----BEGIN " in value
    )


_PORT = _integer(0, 65535)
_ID = _pattern(_LABEL)

#: Every member of every message: the rule its value must satisfy, and the rule in words
#: (the reason given to the peer). A value that breaks it makes the message malformed.
_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "version": (_integer(0, 255), "an integer in 0-255"),
    "token": (
        _optional(_text(MAX_TOKEN)),
        f"a string of at most {MAX_TOKEN} UTF-8 octets, or null",
    ),
    "agent": (_text(MAX_NAME, printable=True), f"printable text of at most {MAX_NAME} octets"),
    "domain": (_pattern(_HOST), "a host name"),
    "public_port": (_PORT, "a port number"),
    "keepalive_interval": (_seconds, "a number of seconds in (0, 86400]"),
    "keepalive_timeout": (_seconds, "a number of seconds in (0, 86400]"),
    "relay": (_text(MAX_NAME, printable=True), f"printable text of at most {MAX_NAME} octets"),
    "code": (_pattern(_CODE), f"a code of at most {MAX_CODE} letters, digits, '_.-'"),
    "message": (_text(MAX_TEXT), f"a string of at most {MAX_TEXT} UTF-8 octets"),
    "request_id": (_integer(0, MAX_REQUEST_ID), "an integer in 0-2^53"),
    "kind": (
        lambda value: value in ("tls", "tcp", "passthrough"),
        '"tls", "tcp" or "passthrough"',
    ),
    "options": (
        _options,
        f"an object of at most {MAX_OPTIONS} options, strings in UTF-8, "
        f"nested at most {MAX_OPTION_DEPTH} deep",
    ),
    "reclaim_id": (_optional(_ID), "a tunnel id (a lowercase DNS label), or null"),
    "reclaim_secret": (
        _optional(_text(MAX_SECRET)),
        f"a string of at most {MAX_SECRET} UTF-8 octets, or null",
    ),
    "reclaim_port": (_optional(_PORT), "a port number, or null"),
    "tunnel_id": (_ID, "a tunnel id (a lowercase DNS label)"),
    "host": (_pattern(_HOST), "a host name"),
    "port": (_PORT, "a port number"),
    "tcp_host": (_optional(_pattern(_HOST)), "a host name, or null"),
    "tcp_port": (_optional(_PORT), "a port number, or null"),
    "secret": (_text(MAX_SECRET), f"a string of at most {MAX_SECRET} UTF-8 octets"),
    "reason": (_text(MAX_TEXT), f"a string of at most {MAX_TEXT} UTF-8 octets"),
    "features": (_features, f"a list of at most {MAX_FEATURES} feature names"),
    "rate_limit": (_optional(_integer(1, 10**15)), "a positive integer, or null"),
    "csr": (_pem(MAX_CSR), f"PEM text of at most {MAX_CSR} octets"),
    "chain": (_pem(MAX_CHAIN), f"PEM text of at most {MAX_CHAIN} octets"),
}


def _required(f: Field[Any]) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


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

    Every member is validated here, once: a message returned has members of the right
    types, within their bounds, and every string in it (options included) encodes to UTF-8.

    @return: the message, or None for a message of a type this version does not know.
    @raise ControlError: the payload is malformed, or a known member breaks its rule.
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
        valid, rule = _FIELDS[name]
        if not valid(value):
            raise ControlError(f"{kind}: member {name!r} must be {rule}")
        kwargs[name] = value
    try:
        message = cls(**kwargs)
    except TypeError:
        missing = [
            n for n, f in cls.__dataclass_fields__.items() if n not in kwargs and _required(f)
        ]
        raise ControlError(f"{kind}: required member {', '.join(missing)} missing") from None
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
        Encode as OPEN metadata: the same octets as ``json.dumps`` with compact separators.
        """
        if (
            _PLAIN.fullmatch(self.tunnel_id + self.client_host + self.server_host) is not None
            and type(self.client_port) is int
            and type(self.server_port) is int
        ):
            # Nothing to escape (the common case: a DNS label and IP addresses).
            return b'{"tunnel":"%s","client":["%s",%d],"server":["%s",%d]}' % (
                self.tunnel_id.encode(),
                self.client_host.encode(),
                self.client_port,
                self.server_host.encode(),
                self.server_port,
            )
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
        Decode OPEN metadata. The addresses are informational: a malformed one (wrong
        type, a port out of range, a host that is not printable UTF-8 of at most
        `MAX_ADDRESS` octets) is read as ``("", 0)``.

        @raise ControlError: malformed metadata, or no valid tunnel id.
        """
        fast = _OPEN_SHAPE.fullmatch(payload)
        if fast is not None:
            # The shape `encode` writes for a DNS label and IP addresses: the same checks as
            # below, in one match (a port above 65535 goes the long way, to be read as 0).
            tunnel_id, client_host, client_port, server_host, server_port = fast.groups()
            cport, sport = int(client_port), int(server_port)
            if cport <= 65535 and sport <= 65535:
                return cls(
                    tunnel_id.decode(), client_host.decode(), cport, server_host.decode(), sport
                )
        body = _load_object(payload, "stream metadata")
        tunnel_id = body.get("tunnel")
        if not isinstance(tunnel_id, str) or not _ID(tunnel_id):
            raise ControlError("stream metadata has no valid tunnel id (a lowercase DNS label)")
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
        or not _text(MAX_ADDRESS, printable=True)(value[0])
        or not _PORT(value[1])
    ):
        return "", 0
    return value[0], value[1]
