"""
The agent's configuration, from one place: what to forward (`ForwardSpec`, the
``--forward`` syntax), where the relays are (`parse_relays`), the ``TUNNEL_*`` environment
defaults (`connection_settings`), the tunnel-option flags of the ``tunnel`` command and the
``twistd tunnelagent`` daemon (`add_flags`, `flag_values`), and the keyword arguments of
``forward`` (`ForwardArgs`, shared by `tunnel.forward` and `tunnel.client.forward`).

No sockets; reading a file that an option names (``client_ca``) is the only I/O.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypedDict

from tunnel.wire import options as tunnel_options

if TYPE_CHECKING:
    from tunnel.agent._httpconnect import ProxyAddress

__all__ = [
    "ENVIRONMENT",
    "ConnectionArgs",
    "ConnectionSettings",
    "ForwardArgs",
    "ForwardOptions",
    "ForwardSpec",
    "InspectArgs",
    "RelayAddress",
    "add_flags",
    "connection_settings",
    "flag_values",
    "forward_spec",
    "forward_specs",
    "from_environment",
    "parse_forward",
    "parse_relays",
    "read_option_file",
    "split_list",
    "with_flags",
]

#: The environment variable that gives each connection setting its default.
ENVIRONMENT = {
    "relay": "TUNNEL_RELAY",
    "token": "TUNNEL_TOKEN",
    "ca": "TUNNEL_CA",
    "proxy": "TUNNEL_PROXY",
}


@dataclass(frozen=True)
class RelayAddress:
    """
    Where a relay listens for agents.
    """

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_relays(text: str) -> list[RelayAddress]:
    """
    Parse ``host:port`` or a comma-separated list of them (``[v6]:port`` for IPv6).

    @raise ValueError: an entry is not ``host:port`` with a valid port.
    """
    relays = []
    for entry in text.split(","):
        entry = entry.strip()
        if not entry:
            continue
        if entry.startswith("["):
            host, sep, rest = entry[1:].partition("]")
            port_text = rest[1:] if rest.startswith(":") else ""
            if not sep:
                raise ValueError(f"bad relay address {entry!r}")
        else:
            host, _, port_text = entry.rpartition(":")
        if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"relay address {entry!r} is not host:port")
        relays.append(RelayAddress(host, int(port_text)))
    if not relays:
        raise ValueError("no relay address given")
    return relays


@dataclass(frozen=True)
class ForwardSpec:
    """
    What to forward: a local target, and the kind of tunnel.
    """

    #: The local port.
    port: int
    #: The local host; loopback unless the target is elsewhere.
    host: str = "127.0.0.1"
    #: A raw TCP port at the relay instead of TLS by SNI.
    unencrypted: bool = False
    #: Advertise HTTP/2 in ALPN for this tunnel (the target speaks HTTP/2 in the clear).
    h2: bool = False
    #: Send the target a PROXY protocol header (version 1 or 2) with the public client's
    #: address before each connection's first byte; 0: none.
    proxy_protocol: int = 0
    #: Only clients from these networks (``"203.0.113.0/24"``, ``"2001:db8::/32"``, single
    #: addresses) may connect; empty: everyone. The relay enforces it.
    allow: tuple[str, ...] = ()
    #: Clients from these networks may not connect, whether `allow` lists them or not;
    #: empty: nobody refused. The relay enforces it.
    deny: tuple[str, ...] = ()
    #: PEM text of the authorities whose client certificates the relay demands of public
    #: TLS clients (mutual TLS); None: no client certificate needed. TLS tunnels only.
    client_ca: str | None = field(default=None, repr=False)
    #: At most this many octets per second in each direction, over all the tunnel's
    #: connections (given as ``"10MB/s"``, ``"500KB/s"``, ``"8MiB/s"`` or an integer; kept
    #: as the integer); None: no limit but the relay's. The relay enforces it.
    rate_limit: int | None = None
    #: Route public TLS connections to the target by their SNI name without terminating
    #: them: the target speaks TLS, with its own certificate for the tunnel's host name.
    passthrough: bool = False
    #: A kept name (``https://<name>.<domain>``) instead of a random id; None: a random id.
    #: Agents asking for the same name together form a pool that serves it.
    name: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise ValueError(f"port must be an integer, not {self.port!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port {self.port} is out of range 1-65535")
        if not self.host:
            raise ValueError("the target host is empty")
        checked = tunnel_options.check_values(self.option_values())
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    def option_values(self) -> dict[str, Any]:
        """
        The tunnel options of this forward, by name (the rows of `tunnel.wire.options`).
        """
        return {option.name: getattr(self, option.name) for option in tunnel_options.OPTIONS}

    @property
    def target(self) -> str:
        """
        The target as ``host:port`` (``[address]:port`` for IPv6).
        """
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def spec(self) -> str:
        """
        The target as a ``--forward`` value's start: ``NAME=host:port`` for a named tunnel.
        """
        return f"{self.name}={self.target}" if self.name else self.target


def parse_forward(text: str, *, label: str | None = None) -> ForwardSpec:
    """
    Parse a ``--forward`` value: optionally ``NAME=`` (a kept name instead of a random id),
    then ``PORT``, ``HOST:PORT`` or ``[IPV6]:PORT``, then options each after a colon: ``tcp``
    (a raw TCP tunnel), ``h2`` or ``passthrough`` (the target terminates TLS itself), or
    ``tls`` (the default), ``proxy1`` or ``proxy2`` (a PROXY protocol header to the target),
    and ``rate=RATE`` (a rate limit such as ``10MB/s``), e.g. ``22:tcp:proxy2``,
    ``8000:rate=10MB``, ``web=8000:h2``.

    @param label: how the value is named in messages, as the user wrote it; default
        ``--forward '<text>'`` (the ``tunnel`` command passes ``'<text>'``).
    @raise ValueError: not of that form, or a bad name; the message starts with `label`.
    """
    try:
        return _parse_forward(text)
    except ValueError as e:
        raise ValueError(f"{label or f'--forward {text!r}'}: {e}") from None


def _parse_forward(text: str) -> ForwardSpec:
    host = "127.0.0.1"
    prefixed: dict[str, Any] = {}
    # ``NAME=`` comes before the target, so before the first colon (``:rate=10MB`` is a
    # suffix's value, not a name).
    before, sep, after = text.partition("=")
    if sep and ":" not in before:
        option = tunnel_options.prefix_option()
        prefixed[option.name] = option.check(before)
        text = after
    rest = text
    if text.startswith("["):
        inside, sep, rest = text[1:].partition("]")
        if not sep or not inside or not rest.startswith(":"):
            raise ValueError("write an IPv6 target as [ADDRESS]:PORT")
        host, rest = inside, rest[1:]
    parts = rest.split(":")
    suffixes = []
    while len(parts) > 1 and tunnel_options.suffix_option(parts[-1]) is not None:
        suffixes.append(parts.pop())
    values = tunnel_options.parse_suffixes(text, suffixes)
    if len(parts) == 1:
        port_text = parts[0]
    elif len(parts) == 2 and not text.startswith("["):
        host, port_text = parts
    else:
        raise ValueError(
            "expected PORT or HOST:PORT, then :tcp, :h2 or :passthrough, then :proxy1 or "
            ":proxy2, then :rate=RATE"
        )
    if not port_text.isdigit():
        raise ValueError("not a port" if port_text == text else f"{port_text!r} is not a port")
    return ForwardSpec(int(port_text), host or "127.0.0.1", **prefixed, **values)


class ForwardOptions(TypedDict, total=False):
    """
    The keyword arguments of ``forward`` that describe the tunnel (see `ForwardSpec`);
    a file-valued option (``client_ca``) is given as the file's path.
    """

    unencrypted: bool
    name: str | None
    h2: bool
    #: Modal's spelling of `h2` (an alias in `tunnel.wire.options`).
    h2_enabled: bool
    proxy_protocol: int
    allow: Sequence[str]
    deny: Sequence[str]
    client_ca: str | None
    rate_limit: str | int | None
    passthrough: bool
    host: str


class ConnectionArgs(TypedDict, total=False):
    """
    The keyword arguments of ``forward`` that say where the relay is; each defaults to its
    `ENVIRONMENT` variable.
    """

    relay: str | None
    token: str | None
    ca: str | None
    proxy: str | None


class InspectArgs(TypedDict, total=False):
    """
    The keyword argument of ``forward`` that serves the agent's inspector page: True for
    127.0.0.1:4040 (or the next free port), or ``"[HOST:]PORT"``; see `Tunnel.inspector_url`.
    """

    inspect: bool | str | None


class ForwardArgs(ForwardOptions, ConnectionArgs, InspectArgs, total=False):
    """
    Every keyword argument of `tunnel.forward` and `tunnel.client.forward`.
    """


def read_option_file(name: str, path: str) -> str:
    """
    The ASCII text of the file that option `name` names (a PEM bundle).

    @raise ValueError: it cannot be read; the message names the option and the path.
    """
    try:
        with open(path, encoding="ascii") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{name} {path!r}: {e}") from None


def forward_spec(port: int, args: Mapping[str, Any]) -> ForwardSpec:
    """
    The `ForwardSpec` for ``forward(port, **args)``, an option given by its name or an
    alias (``h2_enabled``); connection arguments are ignored.

    @raise ValueError: a bad argument, one option under two spellings that disagree, or a
        file-valued option's file cannot be read.
    """
    return ForwardSpec(port, args.get("host", "127.0.0.1"), **_option_args(args))


def _option_args(args: Mapping[str, Any]) -> dict[str, Any]:
    values = tunnel_options.keyword_values(args)
    for name, value in values.items():
        if tunnel_options.by_name(name).file and value is not None:
            values[name] = read_option_file(name, value)
    return values


def forward_specs(
    entries: Sequence[int | str | ForwardSpec], args: Mapping[str, Any]
) -> list[ForwardSpec]:
    """
    The `ForwardSpec` of each entry of ``forward_many(entries, **args)``: a port (its host
    is ``args["host"]``, else loopback), a ``--forward`` value (``"22:tcp"``,
    ``"[::1]:8080:h2"``: its own host and options) or a `ForwardSpec`; the options in `args`
    apply to every entry, over an entry's own.

    @raise ValueError: a bad entry or argument, no entry, or one local port twice (the
        result of ``forward_many`` is keyed by port).
    """
    options = _option_args(args)
    host = args.get("host", "127.0.0.1")
    specs: list[ForwardSpec] = []
    for entry in entries:
        if isinstance(entry, ForwardSpec):
            spec = entry
        elif isinstance(entry, str):
            spec = parse_forward(entry)
        elif isinstance(entry, int) and not isinstance(entry, bool):
            spec = ForwardSpec(entry, host)
        else:
            raise ValueError(f"a port or a FORWARD string such as '22:tcp', not {entry!r}")
        spec = replace(spec, **options)
        if any(other.port == spec.port for other in specs):
            raise ValueError(f"port {spec.port} is given twice")
        specs.append(spec)
    if not specs:
        raise ValueError("no port given")
    return specs


def from_environment(
    name: str, given: str | None, environ: Mapping[str, str] | None = None
) -> str | None:
    """
    Connection setting `name` (a key of `ENVIRONMENT`): `given`, else its environment
    variable, else None (an empty value counts as none).
    """
    if given:
        return given
    return (os.environ if environ is None else environ).get(ENVIRONMENT[name]) or None


@dataclass(frozen=True)
class ConnectionSettings:
    """
    Where the relays are and how to reach them.
    """

    relays: tuple[RelayAddress, ...]
    token: str | None = None
    #: A PEM CA bundle to trust for the relays; None: the system's trust store.
    ca: str | None = None
    proxy: ProxyAddress | None = None


def connection_settings(
    relay: str | None = None,
    token: str | None = None,
    ca: str | None = None,
    proxy: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    no_relay: str = "pass relay='host:port'",
) -> ConnectionSettings:
    """
    The settings from these arguments, else from the ``TUNNEL_*`` environment.

    @param no_relay: how the caller's user gives a relay, for the message when none is.
    @raise ValueError: no relay, a malformed relay or proxy address, or a missing CA file.
    """
    relay = from_environment("relay", relay, environ)
    if not relay:
        raise ValueError(f"no relay given: {no_relay} or set TUNNEL_RELAY")
    relays = parse_relays(relay)
    ca = from_environment("ca", ca, environ)
    if ca is not None and not os.path.isfile(ca):
        raise ValueError(f"CA file {ca!r} does not exist")
    proxy = from_environment("proxy", proxy, environ)
    proxy_address = None
    if proxy:
        # The HTTP-proxy dialler is imported only where a proxy is used.
        from tunnel.agent._httpconnect import parse_proxy_url

        proxy_address = parse_proxy_url(proxy)
    return ConnectionSettings(
        tuple(relays),
        from_environment("token", token, environ),
        ca,
        proxy_address,
    )


# -- the tunnel-option flags of `tunnel` and `twistd tunnelagent` -----------------------------


def split_list(values: Sequence[str]) -> tuple[str, ...]:
    """
    The entries of a repeatable flag, each value also split at commas (``a,b``).
    """
    return tuple(v.strip() for value in values for v in value.split(",") if v.strip())


def add_flags(add: Callable[[tunnel_options.TunnelOption], object]) -> None:
    """
    Declare the flag of every tunnel option that has one, through `add` (which knows the
    parser: argparse, or `twisted.python.usage`).
    """
    for option in tunnel_options.OPTIONS:
        if option.flag is not None:
            add(option)


def flag_values(given: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """
    Option values from flags: `given` maps an option's name to the values its flag was
    given (in order); options without values are left out.

    @raise ValueError: a file cannot be read; the message starts with the flag.
    """
    values: dict[str, Any] = {}
    for option in tunnel_options.OPTIONS:
        raw = list(given.get(option.name) or ())
        if option.flag is None or not raw:
            continue
        if option.repeatable:
            values[option.name] = split_list(raw)
        elif option.file:
            try:
                values[option.name] = read_option_file(option.name, raw[-1])
            except ValueError as e:
                raise ValueError(f"--{option.flag}: {e}") from None
        else:
            values[option.name] = raw[-1]
    return values


def with_flags(specs: Sequence[ForwardSpec], values: Mapping[str, Any]) -> list[ForwardSpec]:
    """
    `specs` with the flags' option `values` applied to each.

    @raise ValueError: a value that is bad or does not apply to a forward's kind; the
        message starts with the flag.
    """
    result = list(specs)
    for name, value in values.items():
        option = tunnel_options.by_name(name)
        try:
            result = [replace(spec, **{name: value}) for spec in result]
        except ValueError as e:
            raise ValueError(f"--{option.flag}: {e}") from None
    return result
