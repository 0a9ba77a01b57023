"""
The ``tunnel`` command, as a user runs it in a terminal.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.harness import LOOPBACK, Endpoint, Procs, curl, free_port, wait_for
from tunnel.testing._daemons import RelayProcess

pytestmark = pytest.mark.e2e

TUNNEL = str(Path(sys.executable).parent / "tunnel")


@pytest.fixture
def tunnel_command() -> str:
    if not os.path.exists(TUNNEL):
        pytest.skip("the tunnel command is not installed next to this interpreter")
    return TUNNEL


def test_forwards_until_interrupted(procs: Procs, tunnel_command: str) -> None:
    web = procs.backend("http")
    echo = procs.backend("echo")
    relay = procs.relay()
    cli = procs.start(
        "tunnel",
        [
            tunnel_command, "--relay", f"localhost:{relay.port}", "--ca", str(relay.ca),
            str(web.port), f"{echo.port}:tcp",
        ],
    )  # fmt: skip
    https = cli.wait_log(
        rf"https://([a-z0-9]+\.tunnel\.localhost):(\d+) -> 127\.0\.0\.1:{web.port}"
    )
    tcp = cli.wait_log(rf"-> 127\.0\.0\.1:{echo.port}\s+tcp://tunnel\.localhost:(\d+)")
    cli.wait_log("press Ctrl-C to stop")

    tunnel = Endpoint(host=https.group(1), port=int(https.group(2)), tcp_port=None)
    page = curl(relay, tunnel, tunnel.url + "/hello")
    assert page.returncode == 0, page.stderr
    with socket.create_connection((LOOPBACK, int(tcp.group(1))), timeout=10) as s:
        s.sendall(b"ping")
        assert s.recv(4) == b"ping"

    os.kill(cli.pid, signal.SIGINT)
    assert cli.popen.wait(20) == 0
    # The tunnels were closed on the way out, not left to time out.
    relay.wait_log(rf"tunnel {tunnel.id} closed by its agent")


def test_relay_down_is_a_clear_error(procs: Procs, tunnel_command: str) -> None:
    cli = procs.start("tunnel", [tunnel_command, "--relay", f"localhost:{free_port()}", "8000"])
    wait_for(lambda: cli.popen.poll() is not None or None, "the command to exit")
    assert cli.popen.returncode == 1
    assert "cannot connect to localhost" in cli.text()


def test_bad_arguments(procs: Procs, tunnel_command: str) -> None:
    cli = procs.start("tunnel", [tunnel_command, "--relay", "localhost:1", "eighty"])
    wait_for(lambda: cli.popen.poll() is not None or None, "the command to exit")
    assert cli.popen.returncode == 2
    assert "'eighty': not a port" in cli.text()


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_says_what_happens_and_closes_cleanly(procs: Procs, tunnel_command: str) -> None:
    """Events on stderr: a refusing target, the link lost and back; Ctrl-C closes cleanly."""
    web = procs.backend("http")
    nothing = free_port()
    relay = procs.relay()
    cli = procs.start(
        "tunnel",
        [
            tunnel_command, "--relay", f"localhost:{relay.port}", "--ca", str(relay.ca),
            str(web.port), str(nothing),
        ],
    )  # fmt: skip
    dead = cli.wait_log(rf"https://([a-z0-9]+\.tunnel\.localhost):(\d+) -> 127\.0\.0\.1:{nothing}")
    cli.wait_log("press Ctrl-C to stop")
    tunnel = Endpoint(host=dead.group(1), port=int(dead.group(2)), tcp_port=None)
    for _ in range(3):
        curl(relay, tunnel, tunnel.url + "/")
    cli.wait_log(rf"nothing is listening on 127\.0\.0\.1:{nothing} \(a connection from ")
    # Said once, not once per connection.
    assert cli.count("nothing is listening") == 1, cli.text()

    assert isinstance(relay.proc, RelayProcess)
    relay.proc.kill()
    cli.wait_log(r"link to relay lost; reconnecting")
    restarted = relay.proc.restart()
    procs.procs.append(restarted)
    cli.wait_log(r"reconnected to the relay: tunnels back")
    assert "came back as" not in cli.text()
    # No object reprs, no long floats, no Twisted internals at the default verbosity.
    for line in _lines(cli.text()):
        assert " object at 0x" not in line and not re.search(r"\d\.\d{4,}", line), line

    at = restarted.size()
    os.kill(cli.pid, signal.SIGINT)
    assert cli.popen.wait(20) == 0
    end = restarted.wait_log(r"agent 127\.0\.0\.1:\d+ disconnected", start=at)
    closing = restarted.text()[at : end.end()]
    assert "non-clean" not in closing, closing
    assert "link ended by peer: NO_ERROR" in closing, closing


def test_quiet_prints_the_urls_only(procs: Procs, tunnel_command: str) -> None:
    web = procs.backend("http")
    relay = procs.relay()
    cli = procs.start(
        "tunnel",
        [tunnel_command, "-q", "--relay", f"localhost:{relay.port}", "--ca", str(relay.ca),
         str(web.port)],
    )  # fmt: skip
    cli.wait_log(rf"-> 127\.0\.0\.1:{web.port}")
    os.kill(cli.pid, signal.SIGINT)
    assert cli.popen.wait(20) == 0
    lines = _lines(cli.text())
    assert len(lines) == 1 and lines[0].startswith("https://"), lines


def test_ctrl_c_works_when_sigint_was_ignored(procs: Procs, tunnel_command: str) -> None:
    """A script's background job inherits SIGINT ignored; the command still stops on it."""
    web = procs.backend("http")
    relay = procs.relay()
    cli = procs.start(
        "tunnel",
        [
            "sh", "-c", 'trap "" INT; exec "$@"', "sh", tunnel_command,
            "--relay", f"localhost:{relay.port}", "--ca", str(relay.ca), str(web.port),
        ],
    )  # fmt: skip
    cli.wait_log("press Ctrl-C to stop")
    os.kill(cli.pid, signal.SIGINT)
    assert cli.popen.wait(20) == 0
    relay.wait_log(r"closed by its agent")


def test_refused_token_exits_1(procs: Procs, tunnel_command: str) -> None:
    relay = procs.relay(tokens=["right-token-1234"])
    cli = procs.start(
        "tunnel",
        [tunnel_command, "--relay", f"localhost:{relay.port}", "--ca", str(relay.ca),
         "--token", "wrong-token-5678", "8000"],
    )  # fmt: skip
    wait_for(lambda: cli.popen.poll() is not None or None, "the command to exit")
    assert cli.popen.returncode == 1
    assert "does not accept this token" in cli.text()


def test_version() -> None:
    if not os.path.exists(TUNNEL):
        pytest.skip("the tunnel command is not installed next to this interpreter")
    from tunnel import __version__

    result = subprocess.run([TUNNEL, "--version"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert result.stdout.strip() == f"tunnel {__version__}"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["8000x"], "'8000x': not a port"),
        (["web:80x"], "'web:80x': '80x' is not a port"),
        (["22:tcp:h2"], "'22:tcp:h2': tcp and h2 together"),
        (["8000", "127.0.0.1:8000:tcp"], "'8000' and '127.0.0.1:8000:tcp' both forward"),
    ],
)
def test_argument_errors_name_what_was_written(argv: list[str], message: str) -> None:
    """Errors quote the spec as written (no --forward), before any tunnel is asked for."""
    if not os.path.exists(TUNNEL):
        pytest.skip("the tunnel command is not installed next to this interpreter")
    # Nothing listens on the relay port: a tunnel asked for would fail with status 1.
    relay = f"localhost:{free_port()}"
    result = subprocess.run(
        [TUNNEL, "--relay", relay, *argv], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr, result.stderr
    assert "--forward" not in result.stderr
