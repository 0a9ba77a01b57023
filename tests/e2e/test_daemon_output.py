"""
What the daemons tell operators: their exit status, their version, JSON logs.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from tests.e2e.harness import Procs, curl, free_port, wait_for
from tunnel import __version__
from tunnel.testing._daemons import AgentProcess, child_env, twistd_command

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("plugin", ["tunnelrelay", "tunnelagent"])
def test_help_names_the_version(plugin: str) -> None:
    command = twistd_command(plugin, "--help")
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, env=child_env())
    assert f"Tunnels {__version__}" in result.stdout, result.stdout + result.stderr
    assert "[default: ]" not in result.stdout


def test_agent_exits_1_when_the_token_is_refused(procs: Procs) -> None:
    """systemd's Restart=on-failure and scripts must see the failure."""
    relay = procs.relay(tokens=["right-token-1234"])
    agent = procs.agent(relay, [str(free_port())], token="wrong-token-5678", wait=False)
    agent.proc.wait(lambda: not agent.proc.alive(), "the agent to exit")
    assert agent.proc.returncode == 1, agent.proc.tail()
    assert "Server Shut Down." in agent.proc.text()


def _records(text: str) -> list[dict[str, Any]]:
    records = []
    for line in text.splitlines():
        if line.strip():
            records.append(json.loads(line))
    return records


def test_json_logs(procs: Procs) -> None:
    """--log-format json: one JSON object per line, with the agent's fields."""
    web = procs.backend("http")
    nothing = free_port()
    relay = procs.relay(extra=["--log-format", "json"])
    n = procs.next_id()
    proc = AgentProcess(
        procs.dir / f"{n:02d}-agent.log",
        relay=f"localhost:{relay.port}",
        ca=relay.ca,
        forwards=[str(web.port), str(nothing)],
        extra=["--log-format", "json"],
        cwd=procs.dir,
    )
    procs.procs.append(proc)
    proc.wait_ready()
    dead = proc.tunnel(f"127.0.0.1:{nothing}")
    assert curl(relay, dead, dead.url + "/").returncode != 0
    proc.wait_log(r'"event_type": "target_refused"')

    agent = _records(proc.text())
    assert all({"time", "level", "text", "log_namespace"} <= r.keys() for r in agent)
    ready = [r for r in agent if r.get("event_type") == "tunnel_ready"]
    assert {r["target"] for r in ready} == {f"127.0.0.1:{web.port}", f"127.0.0.1:{nothing}"}
    assert all(len(r["tunnel_id"]) == 16 and r["url"].startswith("https://") for r in ready)
    refused = next(r for r in agent if r.get("event_type") == "target_refused")
    assert refused["client"].startswith("127.0.0.1:") and refused["level"] == "warn"
    assert refused["tunnel_id"] == dead.host.split(".")[0]
    assert f"cannot connect to 127.0.0.1:{nothing}" in refused["text"]

    wait_for(lambda: "granted" in relay.proc.text(), "the relay's grant log line")
    relay_records = _records(relay.proc.text())
    assert any("granted tls tunnel" in r["text"] for r in relay_records)
