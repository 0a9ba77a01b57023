"""What to forward: `ForwardSpec` and the ``--forward`` syntax."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.clientcerts import make_client_pki
from tunnel.agent.session import ForwardSpec, parse_forward


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("8000", ForwardSpec(8000)),
        ("10.0.0.5:8000", ForwardSpec(8000, "10.0.0.5")),
        ("8000:tls", ForwardSpec(8000)),
        ("22:tcp", ForwardSpec(22, unencrypted=True)),
        ("8000:h2", ForwardSpec(8000, h2=True)),
        ("8000:proxy1", ForwardSpec(8000, proxy_protocol=1)),
        ("22:tcp:proxy2", ForwardSpec(22, unencrypted=True, proxy_protocol=2)),
        ("22:proxy2:tcp", ForwardSpec(22, unencrypted=True, proxy_protocol=2)),
        ("db:5432:tcp:proxy1", ForwardSpec(5432, "db", unencrypted=True, proxy_protocol=1)),
        ("[::1]:8000", ForwardSpec(8000, "::1")),
        ("[2001:db8::5]:22:tcp", ForwardSpec(22, "2001:db8::5", unencrypted=True)),
    ],
)
def test_forward_syntax(text: str, spec: ForwardSpec) -> None:
    assert parse_forward(text) == spec


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not a port"),
        ("http", "not a port"),
        ("tcp", "not a port"),
        ("a:b:8000", "expected PORT or HOST:PORT"),
        ("8000:tcp:h2", "tcp and h2 together"),
        ("8000:proxy1:proxy2", "two PROXY protocol versions"),
        ("8000:proxy3", "not a port"),
        ("70000", "out of range"),
        ("8000:h2:tcp", "h2 and tcp together"),
        ("[::1]8000", "as \\[ADDRESS\\]:PORT"),
        ("[::1", "as \\[ADDRESS\\]:PORT"),
        ("[]:80", "as \\[ADDRESS\\]:PORT"),
        ("[::1]:a:80", "expected PORT or HOST:PORT"),
        ("::1:8000", "expected PORT or HOST:PORT"),
    ],
)
def test_bad_forwards_say_why(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_forward(text)


@pytest.mark.parametrize("version", [3, -1, True, "2"])
def test_proxy_protocol_version_is_checked(version: object) -> None:
    with pytest.raises(ValueError, match="proxy_protocol must be 0"):
        ForwardSpec(8000, proxy_protocol=version)  # type: ignore[arg-type]


def test_h2_is_for_tls_tunnels() -> None:
    with pytest.raises(ValueError, match="h2 applies to TLS tunnels only"):
        ForwardSpec(8000, unencrypted=True, h2=True)


def test_allow_lists_are_checked_and_kept_as_tuples() -> None:
    spec = ForwardSpec(8000, allow=["10.0.0.0/8", "::1"])  # type: ignore[arg-type]
    assert spec.allow == ("10.0.0.0/8", "::1")
    assert hash(spec) == hash(ForwardSpec(8000, allow=("10.0.0.0/8", "::1")))
    with pytest.raises(ValueError, match="'nope' is not an IP network"):
        ForwardSpec(8000, allow=("nope",))
    with pytest.raises(ValueError, match="is a list"):
        ForwardSpec(8000, allow="10.0.0.0/8")  # type: ignore[arg-type]


def test_agent_allow_option_applies_to_every_forward() -> None:
    from twisted.python import usage

    from tunnel.agent.tap import Options

    options = Options()
    forwards = ["--forward", "8000", "--forward", "22:tcp"]
    allows = ["--allow", "10.0.0.0/8,192.0.2.1", "--allow", "::1"]
    options.parseOptions(["--relay", "localhost:8443", *forwards, *allows])
    assert [f.allow for f in options["forward"]] == [("10.0.0.0/8", "192.0.2.1", "::1")] * 2
    with pytest.raises(usage.UsageError, match="--allow: 'x' is not an IP network"):
        Options().parseOptions(["--relay", "localhost:8443", "--forward", "8000", "--allow", "x"])


def test_agent_deny_option_is_repeatable_and_split_at_commas() -> None:
    from twisted.python import usage

    from tunnel.agent.tap import Options

    options = Options()
    denies = ["--deny", "10.6.6.0/24,2001:db8::/32", "--deny", "192.0.2.1"]
    options.parseOptions(["--relay", "localhost:8443", "--forward", "8000", *denies])
    (spec,) = options["forward"]
    assert spec.deny == ("10.6.6.0/24", "2001:db8::/32", "192.0.2.1") and spec.allow == ()
    with pytest.raises(usage.UsageError, match="--deny: 'x' is not an IP network"):
        Options().parseOptions(["--relay", "localhost:8443", "--forward", "8000", "--deny", "x"])


def test_api_refuses_one_string_as_an_allow_list() -> None:
    from tunnel import client

    with pytest.raises(ValueError, match="a list of networks, not one string"):
        client.forward(object(), 8000, allow="10.0.0.0/8")


def test_ipv6_targets_are_written_in_brackets() -> None:
    assert ForwardSpec(8000, "::1").target == "[::1]:8000"
    assert ForwardSpec(8000).target == "127.0.0.1:8000"


def test_client_ca_is_checked_and_only_for_tls_tunnels(tmp_path: Path) -> None:
    pki = make_client_pki(tmp_path, "unit")
    pem = pki.ca.read_text()
    assert ForwardSpec(8000, client_ca=pem).client_ca == pem
    with pytest.raises(ValueError, match="need a TLS tunnel"):
        ForwardSpec(22, unencrypted=True, client_ca=pem)
    with pytest.raises(ValueError, match="no PEM certificate"):
        ForwardSpec(8000, client_ca="not a certificate")
    with pytest.raises(ValueError, match="more than 16"):
        ForwardSpec(8000, client_ca=pem * 17)
    with pytest.raises(ValueError, match="is PEM text"):
        ForwardSpec(8000, client_ca=b"bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"client_ca .*missing"):
        from tunnel import client

        client.forward(object(), 8000, client_ca=str(tmp_path / "missing"))
