"""The agent's control core without I/O: messages and the clock in, effects out."""

from __future__ import annotations

import pytest

from tunnel.agent import _control as c
from tunnel.agent.settings import ForwardSpec
from tunnel.errors import AuthenticationError, RelayUnavailable, TunnelRefused
from tunnel.wire.codes import ErrorReason, RefusalCode
from tunnel.wire.control import (
    AgentHello,
    ErrorMessage,
    RelayWelcome,
    TunnelClose,
    TunnelGranted,
    TunnelRequest,
)
from tunnel.wire.control import TunnelRefused as Refused
from tunnel.wire.errors import LocalProtocolError


def core(fail_fast: bool = True) -> c.AgentControl:
    return c.AgentControl(token="T", agent_name="test", version=1, fail_fast=fail_fast)


def sent(effects: list[c.Effect]) -> list[object]:
    return [e.message for e in effects if isinstance(e, c.Send)]


def welcomed(agent: c.AgentControl, features: tuple[str, ...] = ()) -> list[c.Effect]:
    hello = agent.connected()
    assert isinstance(sent(hello)[0], AgentHello)
    return agent.received(RelayWelcome("d", 443, features=list(features)))


def grant(request: TunnelRequest, tunnel_id: str = "abc", port: int | None = None) -> TunnelGranted:
    return TunnelGranted(
        request.request_id,
        tunnel_id,
        f"{tunnel_id}.d",
        443,
        tcp_host="d" if port else None,
        tcp_port=port,
        secret="s3cret",
    )


def test_first_forward_dials_then_requests_once_welcomed() -> None:
    agent = core()
    record = c.ForwardRecord(ForwardSpec(8000))
    assert agent.forward(record, now=0.0) == [c.Dial()]
    assert agent.state is c.SessionState.CONNECTING
    (request,) = sent(welcomed(agent))
    assert isinstance(request, TunnelRequest) and request.kind == "tls"
    assert request.reclaim_id is None
    effects = agent.received(grant(request))
    assert [type(e) for e in effects] == [c.Granted]
    assert not record.waiting and record.tunnel_id == "abc"


def test_reclaim_after_reconnect_keeps_id_secret_and_port() -> None:
    agent = core()
    record = c.ForwardRecord(ForwardSpec(22, unencrypted=True))
    agent.forward(record, 0.0)
    (request,) = sent(welcomed(agent))
    agent.received(grant(request, "t1", port=20001))
    agent.link_lost("connection reset")
    assert agent.state is c.SessionState.CONNECTING
    (again,) = sent(welcomed(agent))
    assert isinstance(again, TunnelRequest)
    assert (again.reclaim_id, again.reclaim_secret, again.reclaim_port) == ("t1", "s3cret", 20001)
    (effect,) = agent.received(grant(again, "t1", port=20001))
    assert isinstance(effect, c.Granted) and effect.previous is not None


def test_reclaim_refused_asks_for_a_new_tunnel() -> None:
    agent = core()
    record = c.ForwardRecord(ForwardSpec(8000))
    agent.forward(record, 0.0)
    (request,) = sent(welcomed(agent))
    agent.received(grant(request, "t1"))
    agent.link_lost("gone")
    (again,) = sent(welcomed(agent))
    effects = agent.received(Refused(again.request_id, RefusalCode.RECLAIM_REFUSED, "no"))
    (fresh,) = sent(effects)
    assert isinstance(fresh, TunnelRequest) and fresh.reclaim_id is None


def test_token_refused_stops_retrying_and_fails_every_forward() -> None:
    agent = core(fail_fast=False)
    record = c.ForwardRecord(ForwardSpec(8000))
    agent.forward(record, 0.0)
    agent.connected()
    effects = agent.received(ErrorMessage(ErrorReason.UNAUTHORIZED, "bad token"))
    assert agent.state is c.SessionState.REFUSED
    (failed,) = [e for e in effects if isinstance(e, c.Failed)]
    assert isinstance(failed.error, AuthenticationError)
    assert c.StopDialing() in effects
    assert c.StopRetrying("the relay refused the agent: bad token") in effects
    assert agent.link_lost("closed") == []  # no second failure
    # The next forward starts again.
    assert agent.forward(c.ForwardRecord(ForwardSpec(8001)), 1.0) == [c.Dial()]


def test_drain_moves_to_the_next_relay_and_holds_new_requests() -> None:
    agent = core()
    agent.forward(c.ForwardRecord(ForwardSpec(8000)), 0.0)
    (request,) = sent(welcomed(agent))
    agent.received(grant(request, "t1"))
    effects = agent.drain("relay stopping")
    assert c.Drain() in effects and agent.state is c.SessionState.DRAINING
    assert agent.relay_index == 1
    assert sent(agent.forward(c.ForwardRecord(ForwardSpec(8001)), 0.0)) == []
    agent.link_lost("drained")
    requests = sent(welcomed(agent))
    assert [r.reclaim_id for r in requests] == ["t1", None]  # type: ignore[attr-defined]


def test_failover_advances_on_each_failed_dial() -> None:
    agent = core(fail_fast=False)
    record = c.ForwardRecord(ForwardSpec(8000))
    agent.forward(record, 0.0)
    assert [e for e in agent.dial_failed("refused") if isinstance(e, c.Failed)] == []
    agent.dial_failed("refused")
    assert agent.relay_index == 2 and agent.last_error == "refused"
    # The clock: past the deadline, the waiting forward fails.
    assert agent.next_deadline() == 10.0
    assert agent.tick(9.9) == []
    (failed,) = [e for e in agent.tick(10.0) if isinstance(e, c.Failed)]
    assert isinstance(failed.error, RelayUnavailable) and "refused" in str(failed.error)


def test_fail_fast_fails_waiting_forwards_at_the_first_failed_attempt() -> None:
    agent = core(fail_fast=True)
    agent.forward(c.ForwardRecord(ForwardSpec(8000)), 0.0)
    (failed,) = [e for e in agent.dial_failed("refused") if isinstance(e, c.Failed)]
    assert isinstance(failed.error, RelayUnavailable)


@pytest.mark.parametrize("code", [RefusalCode.LIMIT, RefusalCode.NO_PORTS, RefusalCode.DRAINING])
def test_refusals_fail_the_forward_with_the_code(code: RefusalCode) -> None:
    agent = core()
    record = c.ForwardRecord(ForwardSpec(8000))
    agent.forward(record, 0.0)
    (request,) = sent(welcomed(agent))
    (failed,) = agent.received(Refused(request.request_id, code, "no"))
    assert isinstance(failed, c.Failed) and isinstance(failed.error, TunnelRefused)
    assert failed.error.code == code and agent.forwards == []


def test_restricting_options_are_not_sent_to_a_relay_without_the_feature() -> None:
    agent = core()
    agent.forward(c.ForwardRecord(ForwardSpec(8000, allow=("10.0.0.0/8",))), 0.0)
    effects = welcomed(agent, features=())
    assert sent(effects) == []
    (failed,) = [e for e in effects if isinstance(e, c.Failed)]
    assert isinstance(failed.error, TunnelRefused)
    assert failed.error.code == RefusalCode.UNSUPPORTED


def test_close_sends_close_and_waits_for_the_relay() -> None:
    agent = core()
    record = c.ForwardRecord(ForwardSpec(8000))
    agent.forward(record, 0.0)
    (request,) = sent(welcomed(agent))
    agent.received(grant(request, "t1"))
    effects = agent.close(record)
    assert sent(effects) == [TunnelClose("t1")] and c.AbortStreams("t1") in effects
    assert agent.closing("t1")
    assert agent.link_lost("gone")[0] == c.CloseConfirmed("t1")


def test_inputs_not_in_the_table_are_protocol_errors() -> None:
    agent = core()
    agent.start()
    agent.connected()
    with pytest.raises(LocalProtocolError):
        agent.connected()  # a second link while one is up
    (violation,) = agent.received(Refused(1, RefusalCode.LIMIT, "before welcome"))
    assert isinstance(violation, c.Violation)


def test_every_state_can_stop() -> None:
    for state in c.SessionState:
        assert c.TRANSITIONS[(state, c.Input.STOP)] is c.SessionState.IDLE
