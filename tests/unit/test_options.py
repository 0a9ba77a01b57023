"""The table of tunnel options: the agent's checks, the request it builds, the relay's parse."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tests.clientcerts import make_client_pki
from tunnel._allow import AllowList, DenyList
from tunnel.agent._proxyheader import VERSIONS
from tunnel.agent.session import ForwardSpec
from tunnel.wire import options
from tunnel.wire.options import (
    OPTIONS,
    Placement,
    check_values,
    missing_features,
    parse_request_options,
    parse_suffixes,
    request_options,
)


def test_every_option_is_a_forward_spec_field() -> None:
    fields = {f.name for f in dataclasses.fields(ForwardSpec)}
    assert fields == {"port", "host"} | {o.name for o in OPTIONS}


def test_rows_are_consistent() -> None:
    names = [o.name for o in OPTIONS]
    assert len(names) == len(set(names))
    suffixes = [s for o in OPTIONS for s in o.suffixes]
    assert len(suffixes) == len(set(suffixes))
    for option in OPTIONS:
        assert option.check(option.default) == option.default, option.name
        assert option.kinds <= options.KINDS and option.kinds
        if option.kinds != options.KINDS:
            assert option.kind_error, option.name
        if option.restricts:
            assert option.feature and option.placement is Placement.OPTIONS, option.name
    assert options.PROXY_VERSIONS == VERSIONS


def test_spellings_are_unique_and_map_to_their_option() -> None:
    spellings = [k for o in OPTIONS for k in (o.name, *o.aliases)]
    assert len(spellings) == len(set(spellings)) and set(spellings) == options.keywords()
    assert options.by_name("h2").aliases == ("h2_enabled",)
    assert options.keyword_values({"h2_enabled": True, "relay": "x:1"}) == {"h2": True}
    assert options.keyword_values({"h2": True, "h2_enabled": True}) == {"h2": True}
    with pytest.raises(ValueError, match="are one option"):
        options.keyword_values({"h2": True, "h2_enabled": False})


def test_defaults_make_a_plain_tls_request() -> None:
    assert request_options(check_values({})) == ("tls", {})


def test_request_carries_only_wire_options_that_differ_from_the_default() -> None:
    values = check_values({"h2": True, "proxy_protocol": 2, "allow": ["10.0.0.0/8"]})
    assert values["allow"] == ("10.0.0.0/8",)
    assert request_options(values) == ("tls", {"h2": True, "allow": ["10.0.0.0/8"]})
    tcp = check_values({"unencrypted": True, "proxy_protocol": 1})
    assert request_options(tcp) == ("tcp", {})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"unencrypted": True, "h2": True}, "h2 applies to TLS tunnels only"),
        ({"unencrypted": True, "client_ca": "x"}, "need a TLS tunnel"),
        ({"h2": "yes"}, "h2 is True or False"),
        ({"proxy_protocol": 3}, "proxy_protocol must be 0"),
        ({"allow": "10.0.0.0/8"}, "not one string"),
        ({"allow": ["nope"]}, "'nope' is not an IP network"),
        ({"deny": "10.0.0.0/8"}, "deny is a list of networks, not one string"),
        ({"deny": ["10.0.0.0/33"]}, "'10.0.0.0/33' is not an IP network"),
        ({"client_ca": "not pem"}, "no PEM certificate"),
        ({"colour": "red"}, "unknown tunnel option 'colour'"),
    ],
)
def test_bad_values_say_why(values: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_values(values)


def test_restricting_options_need_the_relay_feature() -> None:
    opts = {"h2": True, "allow": ["10.0.0.0/8"], "client_ca": "PEM"}
    assert missing_features(opts, ["allow", "client_ca"]) == []
    assert missing_features(opts, ["allow"]) == ["client certificates (--client-ca)"]
    assert missing_features(opts, []) == [
        "allow lists (--allow)",
        "client certificates (--client-ca)",
    ]
    assert missing_features({"h2": True}, []) == []
    assert missing_features({"deny": ["::1"]}, ["allow", "client_ca"]) == ["deny lists (--deny)"]


def test_suffixes() -> None:
    assert parse_suffixes("x", ["proxy2", "tcp"]) == {"proxy_protocol": 2, "unencrypted": True}
    assert parse_suffixes("x", ["tls"]) == {"unencrypted": False}
    with pytest.raises(ValueError, match="tcp and h2 together"):
        parse_suffixes("x", ["h2", "tcp"])
    with pytest.raises(ValueError, match="two PROXY protocol versions"):
        parse_suffixes("x", ["proxy1", "proxy2"])
    with pytest.raises(ValueError, match="unknown option 'zz'"):
        parse_suffixes("x", ["zz"])


# -- the relay's side: a received request's options, typed ----------------------------------


def test_relay_parse_types_each_known_option(tmp_path: Path) -> None:
    pem = make_client_pki(tmp_path, "opts").ca.read_text()
    parsed = parse_request_options(
        "tls", {"h2": True, "allow": ["10.0.0.0/8"], "client_ca": pem, "future": 1}
    )
    assert parsed["h2"] is True
    assert isinstance(parsed["allow"], AllowList)
    assert parsed["allow"].admits("10.1.2.3") and not parsed["allow"].admits("192.0.2.1")
    assert len(parsed["client_ca"]) == 1
    assert "future" not in parsed  # unknown members are ignored
    deny = parse_request_options("tcp", {"deny": ["10.0.0.0/8", "::1"]})["deny"]
    assert isinstance(deny, DenyList) and not deny.admits("10.9.9.9") and deny.admits("::2")
    assert parse_request_options("tcp", {}) == {}


@pytest.mark.parametrize(
    ("kind", "opts", "message"),
    [
        ("tcp", {"client_ca": "x"}, "need a TLS tunnel"),
        ("tcp", {"h2": True}, "h2 applies to TLS tunnels only"),
        ("tls", {"h2": 1}, "h2 is True or False"),
        ("tls", {"allow": []}, "at least one network"),
        ("tls", {"allow": "10.0.0.0/8"}, "is a list"),
        ("tls", {"allow": [5]}, "5 is not a network"),
        ("tls", {"client_ca": 5}, "is PEM text"),
        ("tls", {"client_ca": "nope"}, "no PEM certificate"),
        ("tls", {"proxy_protocol": 2}, None),  # agent-local: ignored if sent
    ],
)
def test_relay_parse_refuses_bad_members(
    kind: str, opts: dict[str, object], message: str | None
) -> None:
    if message is None:
        assert parse_request_options(kind, opts) == {}
        return
    with pytest.raises(ValueError, match=message):
        parse_request_options(kind, opts)
