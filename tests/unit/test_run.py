"""``tunnel run``'s pieces without processes: its arguments, the command's environment, the
lines it prints, and the exit status it passes on."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from tunnel import cli
from tunnel._run import (
    NOT_EXECUTABLE,
    NOT_FOUND,
    child_environment,
    exit_status,
    find_executable,
    split_command,
    tunnel_line,
    tunnel_record,
)
from tunnel._tunnel import Tunnel
from tunnel.agent.settings import ForwardSpec

WEB = Tunnel("abc.tunnel.localhost", 8443)
SSH = Tunnel("def.tunnel.localhost", 443, "tunnel.localhost", 23447)


def test_the_command_follows_the_double_dash() -> None:
    assert split_command(["--json", "8000", "--", "ls", "--", "-l"]) == (
        ["--json", "8000"],
        ["ls", "--", "-l"],
    )
    with pytest.raises(ValueError, match="give the command after --"):
        split_command(["8000", "ls"])
    with pytest.raises(ValueError, match="no command after --"):
        split_command(["8000", "--"])


def test_the_command_sees_a_url_per_port_and_a_tcp_address_per_raw_tunnel() -> None:
    env = child_environment({8000: WEB, 22: SSH}, {"PATH": "/bin", "TUNNEL_RELAY": "r:1"})
    assert env == {
        "PATH": "/bin",
        "TUNNEL_RELAY": "r:1",
        "TUNNEL_URL_8000": "https://abc.tunnel.localhost:8443",
        "TUNNEL_URL_22": "https://def.tunnel.localhost",
        "TUNNEL_TCP_22": "tunnel.localhost:23447",
    }
    assert "TUNNEL_TCP_8000" not in env


def test_lines_and_json_lines() -> None:
    assert (
        tunnel_line(ForwardSpec(8000), WEB) == "https://abc.tunnel.localhost:8443 -> 127.0.0.1:8000"
    )
    assert tunnel_line(ForwardSpec(22, unencrypted=True), SSH) == (
        "https://def.tunnel.localhost -> 127.0.0.1:22   tcp://tunnel.localhost:23447"
    )
    record = tunnel_record(ForwardSpec(22, unencrypted=True), SSH)
    assert json.loads(json.dumps(record)) == {
        "port": 22,
        "target": "127.0.0.1:22",
        "url": "https://def.tunnel.localhost",
        "tls_socket": ["def.tunnel.localhost", 443],
        "tcp_socket": ["tunnel.localhost", 23447],
        "env": {
            "TUNNEL_URL_22": "https://def.tunnel.localhost",
            "TUNNEL_TCP_22": "tunnel.localhost:23447",
        },
    }
    assert tunnel_record(ForwardSpec(8000), WEB)["tcp_socket"] is None


def test_exit_status_is_a_shells() -> None:
    assert exit_status(0, None) == 0
    assert exit_status(3, None) == 3
    assert exit_status(None, signal.SIGTERM) == 128 + 15
    assert exit_status(None, signal.SIGKILL) == 137


def test_find_executable(tmp_path: Path) -> None:
    script = tmp_path / "serve"
    script.write_text("#!/bin/sh\n")
    assert find_executable("serve", {"PATH": str(tmp_path)}) == (None, NOT_FOUND)
    script.chmod(0o755)
    assert find_executable("serve", {"PATH": str(tmp_path)}) == (str(script), 0)
    assert find_executable("nope-not-here", {"PATH": str(tmp_path)}) == (None, NOT_FOUND)
    plain = tmp_path / "plain"
    plain.write_text("x")
    if os.geteuid() != 0:  # root may execute anything with an x bit, and reads everything
        assert find_executable(str(plain), {}) == (None, NOT_EXECUTABLE)
    plain.chmod(0o644)
    assert find_executable(str(plain), {})[1] == NOT_EXECUTABLE
    assert find_executable(str(tmp_path / "missing"), {}) == (None, NOT_FOUND)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "8000", "ls"], "give the command after --"),
        (["run", "8000", "--"], "no command after --"),
        (["run", "eighty", "--", "ls"], "'eighty': not a port"),
        (["run", "8000", "8000:tcp", "--", "ls"], "port 8000 is given twice"),
        (["run", "--", "ls"], "required: FORWARD"),
    ],
)
def test_bad_arguments_exit_2_before_any_io(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main([*argv[:1], "--relay", "localhost:1", *argv[1:]])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_a_missing_command_exits_127_before_any_tunnel(capsys: pytest.CaptureFixture[str]):
    # The relay does not exist: only a check before any I/O can answer like this.
    assert cli.main(["run", "--relay", "localhost:1", "8000", "--", "no-such-cmd-x"]) == 127
    assert "no-such-cmd-x: command not found" in capsys.readouterr().err
