"""
Tunnel options, one row each: what an agent may ask of a tunnel besides its target.

Sans-IO, shared by agent and relay. A row says an option's type and its check (one function,
raising `ValueError` with a message that says why), which kinds of tunnel it applies to,
whether it restricts who may connect (and so needs the relay's ``welcome.features`` to
name it: a relay that ignored it would let everyone in), where it goes in a
``tunnel_request`` (the ``kind`` member, an ``options`` member, or nowhere: agent-local),
and how users spell it: the Python keyword (the row's `name`, and its `aliases`: another
API's spelling, such as Modal's ``h2_enabled``), the ``tunnel`` and ``twistd tunnelagent``
flag, and the ``--forward PORT:SUFFIX`` suffixes.

The agent builds a request with `check_values` then `request_options`; the relay turns a
received ``options`` member into typed values with `parse_request_options`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

from tunnel._allow import AllowList, DenyList
from tunnel._rate import check_rate
from tunnel.wire.names import check_name

__all__ = [
    "KINDS",
    "OPTIONS",
    "PROXY_VERSIONS",
    "Kind",
    "Placement",
    "TunnelOption",
    "by_name",
    "check_values",
    "ignored_features",
    "keyword_values",
    "keywords",
    "missing_features",
    "parse_request_options",
    "parse_suffixes",
    "prefix_option",
    "request_options",
    "suffix_option",
]

Kind = Literal["tls", "tcp", "passthrough"]
#: Every kind of tunnel: TLS terminated at the relay (``tls``), that plus a raw TCP port
#: (``tcp``), and TLS routed by its SNI name but terminated by the local server
#: (``passthrough``).
KINDS: frozenset[str] = frozenset({"tls", "tcp", "passthrough"})
#: The PROXY protocol versions an agent can write to its target.
PROXY_VERSIONS = (1, 2)


class Placement(Enum):
    """
    Where an option goes in a ``tunnel_request``.
    """

    #: It decides the request's ``kind`` member (`TunnelOption.makes_kind`, when true).
    KIND = "kind"
    #: A member of the request's ``options``, under the row's name.
    OPTIONS = "options"
    #: Nowhere: the agent alone acts on it.
    LOCAL = "local"


def _identity(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class TunnelOption:
    """
    One tunnel option.
    """

    #: The Python keyword of ``forward``, the `ForwardSpec` field, and the ``options``
    #: member on the wire.
    name: str
    #: Its value when not given (never sent).
    default: Any
    #: The agent's check: a value as given → the value kept (`ValueError`, saying why).
    check: Callable[[Any], Any]
    #: One line for ``--help``.
    doc: str
    #: What it is, in messages (``"allow lists"``); empty: its name.
    words: str = ""
    #: Where it goes in a request.
    placement: Placement = Placement.OPTIONS
    #: For `Placement.KIND`: the kind a true value makes (the first such option wins).
    makes_kind: str | None = None
    #: The kinds of tunnel it applies to; a value other than the default on another kind
    #: is refused with `kind_error`.
    kinds: frozenset[str] = KINDS
    kind_error: str = ""
    #: The relay's check of a received ``options`` member: → the typed value it acts on.
    #: None: `check`.
    parse: Callable[[Any], Any] | None = None
    #: The checked value → JSON for the wire.
    encode: Callable[[Any], Any] = _identity
    #: Whether it restricts who may connect (the relay checks that every member of a pool
    #: has the same restrictions).
    restricts: bool = False
    #: Whether an agent refuses to send it to a relay whose ``welcome.features`` lack
    #: `feature` though it restricts nobody: that relay would serve the tunnel otherwise
    #: than asked (a passthrough tunnel: it would decrypt it, or refuse the link).
    required: bool = False
    #: Its name in ``welcome.features`` (the relay announces that it enforces it).
    feature: str | None = None
    #: Other Python keywords of ``forward`` for it: another API's spelling (Modal's
    #: ``h2_enabled``), so that code written for that API runs with only its import changed.
    aliases: tuple[str, ...] = ()
    #: The flag of ``tunnel`` and ``twistd tunnelagent`` (without ``--``), applied to every
    #: forward; None: none.
    flag: str | None = None
    metavar: str = "VALUE"
    #: The flag may be given several times, and each value may be a comma-separated list.
    repeatable: bool = False
    #: The Python keyword and the flag name a file (read as ASCII) whose text is the value.
    file: bool = False
    #: Spelled ``VALUE=`` before the target of a ``--forward`` value (``web=8000``).
    prefix: bool = False
    #: ``--forward PORT:SUFFIX`` spellings: suffix → value.
    suffixes: Mapping[str, Any] = field(default_factory=dict)
    #: A ``--forward PORT:KEY=VALUE`` spelling: the key; the value is given to `check`.
    suffix_key: str | None = None
    #: Suffixes of one group exclude each other; `conflict` says so (``{this}`` and
    #: ``{other}`` are the two suffixes).
    group: str | None = None
    conflict: str = "{this} and {other} together"

    def parse_wire(self, value: Any) -> Any:
        """
        The relay's typed value for a received ``options`` member.

        @raise ValueError: not a valid value.
        """
        return (self.parse or self.check)(value)


def _bool(name: str) -> Callable[[Any], bool]:
    def check(value: Any) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} is True or False, not {value!r}")
        return value

    return check


def _proxy_protocol(value: Any) -> int:
    if isinstance(value, bool) or value not in (0, *PROXY_VERSIONS):
        raise ValueError(f"proxy_protocol must be 0 (none), 1 or 2, not {value!r}")
    return int(value)


def _networks(name: str, kind: type[AllowList]) -> Callable[[Any], tuple[str, ...]]:
    def check(value: Any) -> tuple[str, ...]:
        if isinstance(value, str):
            raise ValueError(f"{name} is a list of networks, not one string: [{value!r}]")
        if not value:
            return ()
        entries = tuple(value) if isinstance(value, list | tuple) else value
        kind.parse(entries)  # names a bad entry
        return tuple(entries)

    return check


def _wire_rate(value: Any) -> int:
    if value is None or isinstance(value, str):
        raise ValueError(f"rate_limit is an integer number of bytes per second, not {value!r}")
    rate = check_rate(value)
    assert rate is not None
    return rate


def _client_ca(value: Any) -> str | None:
    if value is None:
        return None
    _parse_client_cas(value)
    return str(value)


def _parse_client_cas(value: Any) -> Any:
    # `cryptography.x509` is imported only for a tunnel that has client CAs.
    from tunnel._clientca import parse_client_cas

    return parse_client_cas(value)


#: Every tunnel option, in the order they are checked.
OPTIONS: tuple[TunnelOption, ...] = (
    TunnelOption(
        "unencrypted",
        default=False,
        check=_bool("unencrypted"),
        doc="a raw TCP port at the relay as well as the TLS name",
        placement=Placement.KIND,
        makes_kind="tcp",
        suffixes={"tcp": True, "tls": False},
        group="kind",
    ),
    TunnelOption(
        "name",
        default=None,
        check=check_name,
        doc="a kept name, https://NAME.<domain>, instead of a random id (the token must allow it)",
        words="tunnel names",
        required=True,
        feature="name",
        prefix=True,
        metavar="NAME",
    ),
    TunnelOption(
        "h2",
        default=False,
        check=_bool("h2"),
        doc="advertise HTTP/2 in ALPN (the local server speaks HTTP/2 in the clear)",
        kinds=frozenset({"tls"}),
        kind_error=(
            "h2 applies to TLS tunnels only (the relay offers it in ALPN), not unencrypted or "
            "passthrough ones"
        ),
        aliases=("h2_enabled",),
        suffixes={"h2": True},
        group="kind",
    ),
    TunnelOption(
        "passthrough",
        default=False,
        check=_bool("passthrough"),
        doc="TLS routed by its SNI name but untouched: the local server terminates it",
        placement=Placement.KIND,
        makes_kind="passthrough",
        kinds=frozenset({"passthrough"}),
        kind_error=(
            "passthrough hands the TLS connection to the local server: not with unencrypted"
        ),
        words="TLS passthrough",
        required=True,
        feature="passthrough",
        suffixes={"passthrough": True},
        group="kind",
    ),
    TunnelOption(
        "proxy_protocol",
        default=0,
        check=_proxy_protocol,
        doc="a PROXY protocol header (version 1 or 2) to the local server",
        placement=Placement.LOCAL,
        suffixes={"proxy1": 1, "proxy2": 2},
        group="proxy",
        conflict="two PROXY protocol versions",
    ),
    TunnelOption(
        "rate_limit",
        default=None,
        check=check_rate,
        parse=_wire_rate,
        doc="at most this many bytes per second each way, over all the tunnel's connections "
        "(10MB/s, 500KB/s, 1GB/s, 8MiB/s)",
        words="rate limits",
        feature="rate_limit",
        flag="rate-limit",
        metavar="RATE",
        suffix_key="rate",
    ),
    TunnelOption(
        "allow",
        default=(),
        check=_networks("allow", AllowList),
        parse=AllowList.parse,
        encode=list,
        doc="only clients from this network or address may connect (repeatable)",
        words="allow lists",
        restricts=True,
        feature="allow",
        flag="allow",
        metavar="NETWORK",
        repeatable=True,
    ),
    TunnelOption(
        "deny",
        default=(),
        check=_networks("deny", DenyList),
        parse=DenyList.parse,
        encode=list,
        doc="clients from this network or address may not connect, allowed or not (repeatable)",
        words="deny lists",
        restricts=True,
        feature="deny",
        flag="deny",
        metavar="NETWORK",
        repeatable=True,
    ),
    TunnelOption(
        "client_ca",
        default=None,
        check=_client_ca,
        parse=_parse_client_cas,
        doc="public TLS clients must show a certificate from one of these authorities",
        kinds=frozenset({"tls"}),
        kind_error=(
            "client certificates need a TLS tunnel terminated at the relay (a raw TCP port would "
            "let clients without one in; with passthrough, the local server checks them)"
        ),
        words="client certificates",
        restricts=True,
        feature="client_ca",
        flag="client-ca",
        metavar="PEM",
        file=True,
    ),
)

_BY_NAME = {option.name: option for option in OPTIONS}


def by_name(name: str) -> TunnelOption:
    """
    The row of option `name`.

    @raise KeyError: no such option.
    """
    return _BY_NAME[name]


def keywords() -> frozenset[str]:
    """
    Every Python keyword of ``forward`` that names a tunnel option: names and aliases.
    """
    return frozenset(k for option in OPTIONS for k in (option.name, *option.aliases))


def keyword_values(args: Mapping[str, Any]) -> dict[str, Any]:
    """
    The option values of ``forward(**args)`` by option name, whichever of an option's
    spellings (its name or an alias) gave it; keys that name no option are left out.

    @raise ValueError: one option given under two spellings with different values.
    """
    values: dict[str, Any] = {}
    for option in OPTIONS:
        given = [k for k in (option.name, *option.aliases) if k in args]
        for other in given[1:]:
            if args[other] != args[given[0]]:
                raise ValueError(
                    f"{given[0]}={args[given[0]]!r} and {other}={args[other]!r} are one option: "
                    "give one of them"
                )
        if given:
            values[option.name] = args[given[0]]
    return values


def _kind(values: Mapping[str, Any]) -> Kind:
    """
    The kind that `values` make: that of the first `Placement.KIND` option set, else tls.
    """
    for option in OPTIONS:
        if option.placement is Placement.KIND and option.makes_kind and values.get(option.name):
            return option.makes_kind  # type: ignore[return-value]
    return "tls"


def _describe(option: TunnelOption) -> str:
    what = option.words or option.name
    return f"{what} (--{option.flag})" if option.flag else what


def check_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """
    Check an agent's option values (by name; absent ones take their default): each one's
    kind, then its value.

    @raise ValueError: the first bad one, saying why.
    @return: every option's kept value.
    """
    unknown = sorted(set(values) - _BY_NAME.keys())
    if unknown:
        raise ValueError(f"unknown tunnel option {unknown[0]!r}")
    kind = _kind(values)
    checked: dict[str, Any] = {}
    for option in OPTIONS:
        value = values.get(option.name, option.default)
        if kind not in option.kinds and value != option.default:
            raise ValueError(option.kind_error or f"{option.name} does not apply to {kind}")
        checked[option.name] = option.check(value)
    return checked


def request_options(values: Mapping[str, Any]) -> tuple[Kind, dict[str, Any]]:
    """
    The ``kind`` and ``options`` members of a request for checked `values`: every option
    placed there whose value is not its default.
    """
    kind = _kind(values)
    options = {
        option.name: option.encode(values[option.name])
        for option in OPTIONS
        if option.placement is Placement.OPTIONS
        and option.name in values
        and values[option.name] != option.default
    }
    return kind, options


def missing_features(
    options: Mapping[str, Any], features: Iterable[str], kind: str = "tls"
) -> list[str]:
    """
    What the relay lacks of a request (its `kind` and its ``options`` member) to serve it
    as asked, in words for a message (``"allow lists (--allow)"``); empty when it lacks
    nothing. A relay that ignored a restricting option would let everyone in; one that
    did not know passthrough would decrypt the tunnel (or refuse the link); one that ignored
    a name would hand out a random id.
    """
    have = set(features)
    return [
        _describe(option)
        for option in OPTIONS
        if (option.restricts or option.required)
        and (
            option.name in options or (option.makes_kind is not None and option.makes_kind == kind)
        )
        and option.feature not in have
    ]


def ignored_features(options: Mapping[str, Any], features: Iterable[str]) -> list[str]:
    """
    What of `options` (a request's ``options`` member) the relay would ignore, lacking
    its feature, among the options that restrict nobody (``"rate limits (--rate-limit)"``):
    worth a warning, not a refusal.
    """
    have = set(features)
    return [
        _describe(option)
        for option in OPTIONS
        if not option.restricts
        and option.feature is not None
        and option.name in options
        and option.feature not in have
    ]


def parse_request_options(kind: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """
    The relay's check of a received request's ``options``: each known member parsed to
    the typed value the relay acts on (an `AllowList`, the client CA certificates, ...).
    Unknown members are ignored, as docs/protocol.md says; known ones absent are left out.

    @raise ValueError: a member that does not apply to `kind` or is not valid, saying which
        (a ``bad_request`` refusal).
    """
    parsed: dict[str, Any] = {}
    for option in OPTIONS:
        if option.placement is not Placement.OPTIONS or option.name not in options:
            continue
        if kind not in option.kinds:
            raise ValueError(option.kind_error or f"{option.name} does not apply to {kind}")
        parsed[option.name] = option.parse_wire(options[option.name])
    return parsed


def parse_suffixes(text: str, suffixes: Sequence[str]) -> dict[str, Any]:
    """
    Option values from the suffixes of a ``--forward`` value (`text`), read from the last
    one back, as they are peeled off the target.

    @raise ValueError: an unknown suffix, or two of one group.
    """
    values: dict[str, Any] = {}
    seen: dict[str, str] = {}
    for suffix in suffixes:
        option = suffix_option(suffix)
        if option is None:
            raise ValueError(f"unknown option {suffix!r}")
        group = option.group or option.name
        if group in seen:
            message = option.conflict.format(this=suffix, other=seen[group])
            raise ValueError(message)
        seen[group] = suffix
        if option.suffix_key is not None and suffix.startswith(option.suffix_key + "="):
            values[option.name] = suffix.split("=", 1)[1]
        else:
            values[option.name] = option.suffixes[suffix]
    return values


def suffix_option(suffix: str) -> TunnelOption | None:
    """
    The option that `suffix` (of a ``--forward`` value) sets, or None.
    """
    key, valued, _ = suffix.partition("=")
    return next(
        (
            option
            for option in OPTIONS
            if suffix in option.suffixes or (valued and option.suffix_key == key)
        ),
        None,
    )


def prefix_option() -> TunnelOption:
    """
    The option spelled ``VALUE=`` before the target of a ``--forward`` value (the name).
    """
    return next(option for option in OPTIONS if option.prefix)
