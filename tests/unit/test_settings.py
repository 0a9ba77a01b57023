"""The agent's settings: environment defaults, flags, and forward's keyword arguments."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

import tunnel
from tests.clientcerts import make_client_pki
from tunnel import client
from tunnel.agent import settings
from tunnel.agent.settings import (
    ConnectionArgs,
    ForwardArgs,
    ForwardOptions,
    ForwardSpec,
    RelayAddress,
    connection_settings,
    flag_values,
    forward_spec,
    with_flags,
)
from tunnel.wire.options import OPTIONS


def test_forward_keywords_are_the_options_the_target_and_the_connection() -> None:
    spellings = {k for o in OPTIONS for k in (o.name, *o.aliases)}
    assert set(ForwardOptions.__annotations__) == {"host"} | spellings
    assert set(ConnectionArgs.__annotations__) == set(settings.ENVIRONMENT)
    assert set(ForwardArgs.__annotations__) == set(ForwardOptions.__annotations__) | set(
        ConnectionArgs.__annotations__
    ) | {"inspect"}
    # Both APIs take them through the one TypedDict.
    for api in (client.forward, tunnel.forward):
        kwargs = inspect.signature(api).parameters["kwargs"]
        assert "ForwardArgs" in str(kwargs.annotation)


def test_environment_gives_the_defaults(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    env = {
        "TUNNEL_RELAY": "a:1,b:2",
        "TUNNEL_TOKEN": "T",
        "TUNNEL_CA": str(ca),
        "TUNNEL_PROXY": "http://p:3128",
    }
    got = connection_settings(environ=env)
    assert got.relays == (RelayAddress("a", 1), RelayAddress("b", 2))
    assert (got.token, got.ca) == ("T", str(ca))
    assert got.proxy is not None and (got.proxy.host, got.proxy.port) == ("p", 3128)
    given = connection_settings("c:3", "U", environ=env)
    assert given.relays == (RelayAddress("c", 3),) and given.token == "U"
    assert connection_settings("c:3", environ={"TUNNEL_TOKEN": ""}).token is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "no relay given: pass relay='host:port' or set TUNNEL_RELAY"),
        ({"relay": "nope"}, "is not host:port"),
        ({"relay": "a:1", "ca": "/nonexistent.pem"}, "does not exist"),
        ({"relay": "a:1", "proxy": "ftp://x"}, "proxy"),
    ],
)
def test_bad_settings_say_why(kwargs: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        connection_settings(**kwargs, environ={})  # type: ignore[arg-type]


def test_flags_apply_to_every_forward(tmp_path: Path) -> None:
    pem_path = make_client_pki(tmp_path, "flags").ca
    values = flag_values({"allow": ["10.0.0.0/8,::1", "192.0.2.1"], "client_ca": [str(pem_path)]})
    assert values == {
        "allow": ("10.0.0.0/8", "::1", "192.0.2.1"),
        "client_ca": pem_path.read_text(),
    }
    specs = with_flags([ForwardSpec(80), ForwardSpec(81)], values)
    assert [s.allow for s in specs] == [("10.0.0.0/8", "::1", "192.0.2.1")] * 2
    with pytest.raises(ValueError, match="--client-ca: client certificates need a TLS tunnel"):
        with_flags([ForwardSpec(22, unencrypted=True)], values)
    with pytest.raises(ValueError, match="--client-ca: client_ca '/nonexistent'"):
        flag_values({"client_ca": ["/nonexistent"]})
    assert flag_values({}) == {}


def test_forward_spec_reads_file_valued_options(tmp_path: Path) -> None:
    pem_path = make_client_pki(tmp_path, "spec").ca
    spec = forward_spec(8000, {"client_ca": str(pem_path), "host": "::1", "relay": "x:1"})
    assert spec == ForwardSpec(8000, "::1", client_ca=pem_path.read_text())


def test_forward_spec_takes_modal_spellings() -> None:
    assert forward_spec(8000, {"h2_enabled": True}) == ForwardSpec(8000, h2=True)
    assert forward_spec(8000, {"h2_enabled": True, "h2": True}).h2
    assert not forward_spec(8000, {"h2_enabled": False}).h2
    with pytest.raises(ValueError, match="h2=False and h2_enabled=True are one option"):
        forward_spec(8000, {"h2": False, "h2_enabled": True})
    # As Modal's InvalidError: before any I/O.
    with pytest.raises(ValueError, match="h2 applies to TLS tunnels only"):
        forward_spec(8000, {"h2_enabled": True, "unencrypted": True})
    for port in (0, 65536, -1):
        with pytest.raises(ValueError, match="out of range 1-65535"):
            forward_spec(port, {})


def test_api_refuses_an_unknown_keyword() -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'colour'"):
        client.forward(object(), 8000, colour="red")  # type: ignore[call-arg]


def test_forward_specs_of_forward_many() -> None:
    specs = settings.forward_specs([8000, "22:tcp", "[::1]:9000:h2"], {"allow": ["10.0.0.0/8"]})
    assert specs == [
        ForwardSpec(8000, allow=("10.0.0.0/8",)),
        ForwardSpec(22, unencrypted=True, allow=("10.0.0.0/8",)),
        ForwardSpec(9000, "::1", h2=True, allow=("10.0.0.0/8",)),
    ]
    # `host=` is for bare ports; a FORWARD string names its own.
    assert settings.forward_specs([80, "81"], {"host": "::1"}) == [
        ForwardSpec(80, "::1"),
        ForwardSpec(81),
    ]
    assert settings.forward_specs([ForwardSpec(5)], {"h2_enabled": True}) == [
        ForwardSpec(5, h2=True)
    ]


@pytest.mark.parametrize(
    ("entries", "kwargs", "message"),
    [
        ([8000, "8000:tcp"], {}, "port 8000 is given twice"),
        ([], {}, "no port given"),
        ([True], {}, "a port or a FORWARD string"),
        ([8000.0], {}, "a port or a FORWARD string"),
        ([70000], {}, "out of range"),
        (["22:tcp"], {"h2_enabled": True}, "h2 applies to TLS tunnels only"),
    ],
)
def test_forward_specs_refuse(entries: list[object], kwargs: dict[str, object], message: str):
    with pytest.raises(ValueError, match=message):
        settings.forward_specs(entries, kwargs)  # type: ignore[arg-type]
