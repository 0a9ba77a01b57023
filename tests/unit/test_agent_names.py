"""Named tunnels on the agent's side: the ``NAME=`` spelling, the checks before any I/O, and
the requests (no reclaim secret; a relay without the ``name`` feature is not asked)."""

from __future__ import annotations

import pytest

from tests.unit.test_agent_control import core, grant, sent, welcomed
from tunnel.agent import _control as c
from tunnel.agent.settings import ForwardSpec, forward_spec, parse_forward
from tunnel.errors import TunnelRefused
from tunnel.wire import options as tunnel_options
from tunnel.wire.codes import RefusalCode
from tunnel.wire.control import TunnelRefused as Refused
from tunnel.wire.control import TunnelRequest


def test_a_forward_value_may_start_with_a_name() -> None:
    assert parse_forward("web=8000") == ForwardSpec(8000, name="web")
    assert parse_forward("web=8000:h2") == ForwardSpec(8000, name="web", h2=True)
    assert parse_forward("db=10.0.0.5:5432:tcp") == ForwardSpec(
        5432, "10.0.0.5", unencrypted=True, name="db"
    )
    assert parse_forward("v6=[::1]:80").host == "::1"
    assert parse_forward("web=8000").spec == "web=127.0.0.1:8000"


@pytest.mark.parametrize("text", ["Web=8000", "k3j5h2g7d9q1xwzp=8000", "=8000", "a_b=1"])
def test_bad_names_in_a_forward_value_are_value_errors(text: str) -> None:
    with pytest.raises(ValueError, match="tunnel name"):
        parse_forward(text)


def test_the_python_keyword_is_checked_before_any_io() -> None:
    assert forward_spec(8000, {"name": "web"}).name == "web"
    with pytest.raises(ValueError, match="not a DNS label"):
        forward_spec(8000, {"name": "no way"})
    with pytest.raises(ValueError, match="form of a random tunnel id"):
        ForwardSpec(8000, name="k3j5h2g7d9q1xwzp")


def test_name_is_one_row_of_the_options_table() -> None:
    row = tunnel_options.by_name("name")
    assert row.prefix and row.feature == "name" and not row.restricts
    assert tunnel_options.prefix_option() is row
    kind, options = tunnel_options.request_options(ForwardSpec(8000, name="web").option_values())
    assert (kind, options) == ("tls", {"name": "web"})


def test_a_named_request_carries_no_reclaim_secret_even_after_a_reconnect() -> None:
    agent = core()
    record = c.ForwardRecord(ForwardSpec(22, unencrypted=True, name="db"))
    agent.forward(record, now=0.0)
    (request,) = sent(welcomed(agent, ("name",)))
    assert isinstance(request, TunnelRequest) and request.options == {"name": "db"}
    agent.received(grant(request, "db", port=30042))
    agent.link_lost("gone")
    assert agent.state is c.SessionState.CONNECTING
    (again,) = sent(welcomed(agent, ("name",)))
    assert again.reclaim_id is None and again.reclaim_secret is None
    assert again.reclaim_port == 30042  # a hint: the port it had


def test_a_relay_without_names_is_not_asked_for_one() -> None:
    agent = core()
    record = c.ForwardRecord(ForwardSpec(8000, name="web"))
    agent.forward(record, now=0.0)
    effects = welcomed(agent)
    assert sent(effects) == []
    (failed,) = [e for e in effects if isinstance(e, c.Failed)]
    assert isinstance(failed.error, TunnelRefused) and failed.error.code == RefusalCode.UNSUPPORTED
    assert "tunnel names" in str(failed.error)


def test_name_not_allowed_fails_the_forward_with_its_code() -> None:
    agent = core()
    record = c.ForwardRecord(ForwardSpec(8000, name="web"))
    agent.forward(record, now=0.0)
    (request,) = sent(welcomed(agent, ("name",)))
    effects = agent.received(
        Refused(request.request_id, RefusalCode.NAME_NOT_ALLOWED, "the token does not allow it")
    )
    (failed,) = [e for e in effects if isinstance(e, c.Failed)]
    assert isinstance(failed.error, TunnelRefused)
    assert failed.error.code == "name_not_allowed" and "does not allow" in str(failed.error)
