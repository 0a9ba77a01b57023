"""
``tunnel run`` with real child processes: the environment the command sees, the lines and
JSON lines printed, the exit status passed on (a signal's included), signals passed on, and
a tunnel that waits for the command to open its port.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import (
    DEADLINE,
    LOOPBACK,
    Endpoint,
    Proc,
    Procs,
    Relay,
    clean_env,
    curl,
    free_port,
    wait_for,
)

pytestmark = pytest.mark.e2e

TUNNEL = str(Path(sys.executable).parent / "tunnel")

#: The child: records its TUNNEL_* environment, says it is ready, then (by its arguments)
#: exits with a status, waits for a signal (exiting 40+N on it), or serves HTTP on a port
#: once a file appears.
CHILD = textwrap.dedent(
    """
    import http.server, json, os, signal, sys, time
    mode, out = sys.argv[1], sys.argv[2]
    with open(out, "w") as f:
        json.dump({k: v for k, v in os.environ.items() if k.startswith("TUNNEL_")}, f)
    if mode == "exit":
        sys.exit(int(sys.argv[3]))
    if mode == "kill-self":
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "signals":
        def ended(n, frame):
            print(f"child got signal {n}", flush=True)
            sys.exit(40 + n)
        for n in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(n, ended)
        print("child waiting for a signal", flush=True)
        while True:
            signal.pause()
    if mode == "serve-later":
        port, go = int(sys.argv[3]), sys.argv[4]
        print("child started", flush=True)
        deadline = time.monotonic() + 60
        while not os.path.exists(go) and time.monotonic() < deadline:
            time.sleep(0.02)

        class Hello(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = b"served by the child"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        server = http.server.HTTPServer(("127.0.0.1", port), Hello)
        print("child listening", flush=True)
        server.serve_forever()
    """
)


@pytest.fixture
def tunnel_command() -> str:
    if not os.path.exists(TUNNEL):
        pytest.skip("the tunnel command is not installed next to this interpreter")
    return TUNNEL


def start_run(procs: Procs, relay: Relay, args: list[str], name: str = "tunnel-run") -> Proc:
    """``tunnel run ARGS`` in its own session (no terminal: every signal is ours to send),
    the relay given by the environment as a user would."""
    env = clean_env({"TUNNEL_RELAY": f"localhost:{relay.port}", "TUNNEL_CA": str(relay.ca)})
    proc = Proc(
        [TUNNEL, "run", *args],
        procs.dir / f"{procs.next_id():02d}-{name}.log",
        env=env,
        cwd=procs.dir,
        new_session=True,
    )
    procs.procs.append(proc)
    return proc


def child(tmp: Path, *args: str) -> list[str]:
    script = tmp / "child.py"
    script.write_text(CHILD)
    return [sys.executable, str(script), *args]


def exit_code(proc: Proc, timeout: float = DEADLINE) -> int:
    wait_for(lambda: proc.returncode is not None, "tunnel run to exit", timeout)
    code = proc.returncode
    assert code is not None
    return code


def json_lines(proc: Proc) -> list[dict[str, Any]]:
    return [json.loads(line) for line in proc.text().splitlines() if line.startswith("{")]


def test_child_sees_the_tunnels_and_its_status_is_ours(
    procs: Procs, relay: Relay, tunnel_command: str, tmp_path: Path
) -> None:
    web, ssh = free_port(), free_port()
    env_file = tmp_path / "env.json"
    run = start_run(
        procs,
        relay,
        ["--json", str(web), f"{ssh}:tcp", "--", *child(tmp_path, "exit", str(env_file), "3")],
    )
    assert exit_code(run) == 3, run.text()
    lines = json_lines(run)
    assert [line["port"] for line in lines] == [web, ssh]
    seen = json.loads(env_file.read_text())
    for line in lines:
        assert line["url"] == f"https://{line['tls_socket'][0]}:{relay.port}"
        for name, value in line["env"].items():
            assert seen[name] == value
    assert lines[0]["tcp_socket"] is None and f"TUNNEL_TCP_{web}" not in seen
    host, port = lines[1]["tcp_socket"]
    assert seen[f"TUNNEL_TCP_{ssh}"] == f"{host}:{port}" and host == "tunnel.localhost"
    assert seen[f"TUNNEL_URL_{web}"].endswith(f".tunnel.localhost:{relay.port}")
    # The tunnels were closed on the way out, not left to time out.
    for line in lines:
        tunnel_id = line["tls_socket"][0].split(".")[0]
        relay.wait_log(rf"tunnel {tunnel_id} closed by its agent")


def test_a_signal_that_ends_the_child_is_128_plus_n(
    procs: Procs, relay: Relay, tunnel_command: str, tmp_path: Path
) -> None:
    run = start_run(
        procs, relay, [str(free_port()), "--", *child(tmp_path, "kill-self", str(tmp_path / "e"))]
    )
    assert exit_code(run) == 128 + signal.SIGKILL, run.text()
    # Plain lines (no --json): the tunnel command's format.
    run.wait_log(rf"https://[a-z0-9]+\.tunnel\.localhost:{relay.port} -> 127\.0\.0\.1:\d+")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signals_are_passed_on_to_the_child(
    procs: Procs, relay: Relay, tunnel_command: str, tmp_path: Path, signum: int
) -> None:
    run = start_run(
        procs, relay, [str(free_port()), "--", *child(tmp_path, "signals", str(tmp_path / "e"))]
    )
    run.wait_log("child waiting for a signal")
    run.signal(signum)
    # The child handled it (it was not we who died of it) and its status is ours.
    assert exit_code(run) == 40 + signum, run.text()
    assert f"child got signal {int(signum)}" in run.text()


def test_a_port_the_child_has_not_opened_yet_waits_for_it(
    procs: Procs, relay: Relay, tunnel_command: str, tmp_path: Path
) -> None:
    port = free_port()
    go = tmp_path / "go"
    run = start_run(
        procs,
        relay,
        [
            "--json",
            str(port),
            "--",
            *child(tmp_path, "serve-later", str(tmp_path / "e"), str(port), str(go)),
        ],
    )
    run.wait_log("child started")
    line = json_lines(run)[0]
    tunnel = Endpoint(line["tls_socket"][0], line["tls_socket"][1], None)
    # Nothing listens yet: the clean close a public client gets today (an empty reply).
    early = curl(relay, tunnel, tunnel.url + "/", timeout=30)
    assert early.returncode == 52, (early.returncode, early.stderr)
    go.touch()
    run.wait_log("child listening")
    page = curl(relay, tunnel, tunnel.url + "/", timeout=30)
    assert page.returncode == 0 and page.stdout == b"served by the child", page.stderr
    # SIGINT with no terminal: passed on; Python's KeyboardInterrupt ends the child by SIGINT.
    run.signal(signal.SIGINT)
    assert exit_code(run) == 128 + signal.SIGINT, run.text()
    with pytest.raises(OSError):
        socket.create_connection((LOOPBACK, port), timeout=2).close()


def test_relay_down_exits_1_without_starting_the_command(
    procs: Procs, tunnel_command: str, tmp_path: Path
) -> None:
    marker = tmp_path / "started"
    env = clean_env({"TUNNEL_RELAY": f"localhost:{free_port()}"})
    proc = Proc(
        [TUNNEL, "run", "8000", "--", sys.executable, "-c", f"open({str(marker)!r}, 'w')"],
        procs.dir / "run-relay-down.log",
        env=env,
        new_session=True,
    )
    procs.procs.append(proc)
    assert exit_code(proc) == 1
    assert "cannot connect to localhost" in proc.text()
    assert not marker.exists()
