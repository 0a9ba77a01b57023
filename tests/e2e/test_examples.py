"""
The programs in ``examples/``, each run as a user would (a subprocess, the relay given by
``TUNNEL_RELAY``/``TUNNEL_CA``) against a real relay, with real clients: JupyterLab and a
kernel's websocket, the startup hub with curl-like requests, sshd with the ``ssh`` client.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import (
    DEADLINE,
    LOOPBACK,
    Proc,
    Procs,
    Relay,
    clean_env,
    free_port,
    require_tool,
    run,
)

pytestmark = pytest.mark.e2e

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
URL = re.compile(r"https://(?P<host>[a-z0-9]+\.tunnel\.localhost):(?P<port>\d+)")


def start_example(procs: Procs, relay: Relay, name: str, args: list[str], **env: str) -> Proc:
    """``python examples/NAME ARGS`` in its own session, finding the relay as a user's
    program would: through ``TUNNEL_RELAY`` and ``TUNNEL_CA``."""
    environ = clean_env(
        {"TUNNEL_RELAY": f"localhost:{relay.port}", "TUNNEL_CA": str(relay.ca), **env}
    )
    proc = Proc(
        [sys.executable, str(EXAMPLES / name), *args],
        procs.dir / f"{procs.next_id():02d}-{name}.log",
        env=environ,
        cwd=procs.dir,
        new_session=True,
    )
    procs.procs.append(proc)
    return proc


class _ThroughRelay(http.client.HTTPSConnection):
    """HTTPS to a tunnel's name, connecting to the relay on loopback (``*.localhost``
    names need no DNS in browsers and curl, but do in Python's resolver)."""

    def connect(self) -> None:
        raw = socket.create_connection((LOOPBACK, self.port), self.timeout)
        self.sock = self._context.wrap_socket(raw, server_hostname=self.host)  # type: ignore[attr-defined]


def https(
    relay: Relay,
    host: str,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTPS request through the relay; (status, headers, body)."""
    conn = _ThroughRelay(
        host, relay.port, timeout=DEADLINE, context=ssl.create_default_context(cafile=relay.ca)
    )
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def answers(relay: Relay, host: str, path: str, headers: dict[str, str]) -> int | None:
    """The status of GET `path`, or None while nothing answers behind the tunnel (the clean
    close a client gets before the local server listens)."""
    try:
        return https(relay, host, "GET", path, headers)[0]
    except (OSError, http.client.HTTPException):
        return None


# ---------------------------------------------------------------------------------------------
# examples/jupyter.py


def execute(ws: Any, code: str, timeout: float = 60.0) -> str:
    """Run `code` on the kernel behind websocket `ws` (Jupyter's JSON protocol); the
    ``text/plain`` of its ``execute_result``."""
    msg_id = uuid.uuid4().hex
    ws.send(
        json.dumps(
            {
                "header": {
                    "msg_id": msg_id,
                    "msg_type": "execute_request",
                    "username": "test",
                    "session": uuid.uuid4().hex,
                    "version": "5.3",
                },
                "parent_header": {},
                "metadata": {},
                "content": {
                    "code": code,
                    "silent": False,
                    "store_history": False,
                    "user_expressions": {},
                    "allow_stdin": False,
                    "stop_on_error": True,
                },
                "channel": "shell",
                "buffers": [],
            }
        )
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = json.loads(ws.recv())
        if message.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        if message["msg_type"] == "error":
            raise AssertionError(f"the kernel failed: {message['content']}")
        if message["msg_type"] == "execute_result":
            return str(message["content"]["data"]["text/plain"])
    raise AssertionError(f"no execute_result within {timeout}s")


@pytest.mark.slow
def test_jupyter_example_runs_code_on_a_kernel_through_the_tunnel(
    procs: Procs, relay: Relay, tmp_path: Path
) -> None:
    pytest.importorskip("jupyterlab", reason="pip install -e '.[test]' brings jupyterlab")
    websocket = pytest.importorskip("websocket", reason="pip install websocket-client")
    token = secrets.token_urlsafe(16)
    lab_port = free_port()
    home = tmp_path / "jupyter"
    lab = start_example(
        procs,
        relay,
        "jupyter.py",
        ["--port", str(lab_port), f"--token={token}", "--root-dir", str(tmp_path)],
        JUPYTER_RUNTIME_DIR=str(home / "runtime"),
        JUPYTER_CONFIG_DIR=str(home / "config"),
        IPYTHONDIR=str(home / "ipython"),
    )
    m = lab.wait_log(rf"JupyterLab: ({URL.pattern})/lab\?token={re.escape(token)}", 60)
    origin, host = m.group(1), m.group("host")
    auth = {"Authorization": f"token {token}"}
    lab.wait(
        lambda: answers(relay, host, "/api/status", auth) == 200,
        "JupyterLab to answer through the tunnel",
        90,
    )
    # The token guards it.
    assert answers(relay, host, "/api/kernels", {}) == 403

    status, _, body = https(
        relay, host, "POST", "/api/kernels", {**auth, "Content-Type": "application/json"},
        json.dumps({"name": "python3"}).encode(),
    )  # fmt: skip
    assert status == 201, body
    kernel = json.loads(body)["id"]

    raw = socket.create_connection((LOOPBACK, relay.port), timeout=DEADLINE)
    tls = ssl.create_default_context(cafile=relay.ca).wrap_socket(raw, server_hostname=host)
    ws = websocket.create_connection(
        f"wss://{host}:{relay.port}/api/kernels/{kernel}/channels?token={token}",
        socket=tls,
        origin=origin,
        timeout=60,
    )
    try:
        assert execute(ws, "1+1") == "2"
    finally:
        ws.close()

    # SIGTERM to the example ends JupyterLab (and its kernel) with it, then the tunnel.
    lab.stop(timeout=45)
    assert lab.popen.returncode == 0, lab.tail()
    with pytest.raises(OSError):
        socket.create_connection((LOOPBACK, lab_port), timeout=2).close()


# ---------------------------------------------------------------------------------------------
# examples/hub.py


def hub_request(
    port: int, method: str, path: str, token: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=DEADLINE)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        conn.request(method, path, headers=headers)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def test_hub_example_hands_out_and_closes_tunnels(procs: Procs, relay: Relay) -> None:
    token = secrets.token_urlsafe(16)
    hub = start_example(
        procs, relay, "hub.py", ["--listen", f"tcp:0:interface={LOOPBACK}"], HUB_TOKEN=token
    )
    port = int(hub.wait_log(r"hub listening on http://127\.0\.0\.1:(\d+)/tunnels").group(1))

    assert hub_request(port, "POST", "/tunnels")[0] == 401
    status, headers, _ = hub_request(port, "POST", "/tunnels", token="not-" + token)
    assert status == 401 and headers["www-authenticate"].startswith("Bearer")

    status, headers, body = hub_request(port, "POST", "/tunnels", token)
    assert status == 303, body
    m = URL.match(headers["location"])
    assert m is not None and headers["location"] == json.loads(body)["url"] + "/"
    host = m.group("host")
    # Where the 303 sends the caller: that session's own server.
    status, _, page = https(relay, host, "GET", "/")
    assert (status, page) == (200, b"hello from session 1\n")
    second = hub_request(port, "POST", "/tunnels", token)[1]["location"]
    assert second != headers["location"]
    listing = json.loads(hub_request(port, "GET", "/tunnels", token)[2])
    assert sorted(listing.values()) == sorted([headers["location"][:-1], second[:-1]])

    key = host.split(".", 1)[0]
    assert hub_request(port, "DELETE", f"/tunnels/{key}")[0] == 401
    assert hub_request(port, "DELETE", f"/tunnels/{key}", token)[0] == 204
    relay.wait_log(rf"tunnel {key} closed by its agent")
    with pytest.raises(ssl.SSLError):  # the name no longer answers (unrecognized_name)
        https(relay, host, "GET", "/")
    assert hub_request(port, "DELETE", f"/tunnels/{key}", token)[0] == 404

    hub.stop()
    assert hub.popen.returncode == 0, hub.tail()


# ---------------------------------------------------------------------------------------------
# examples/ssh.py


def sshd(procs: Procs, tmp_path: Path) -> tuple[int, Path, Path]:
    """A real OpenSSH server on a loopback port, with its own host key and one authorized
    key made here; (port, the client's key, a known_hosts file pinning the host key)."""
    binary = shutil.which("sshd") or (
        "/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None
    )
    if binary is None:
        pytest.skip("sshd is not installed (make deps installs openssh-server)")
    keygen = require_tool("ssh-keygen")
    if os.geteuid() == 0 and not os.path.isdir("/run/sshd"):
        # sshd run by root insists on its privilege separation directory (which the
        # package's service unit creates at boot).
        try:
            os.makedirs("/run/sshd", mode=0o755)
        except OSError as e:
            pytest.skip(f"sshd needs /run/sshd, which cannot be made: {e}")
    d = tmp_path / "sshd"
    d.mkdir()
    for name in ("host", "user"):
        run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)]).check_returncode()
    (d / "authorized_keys").write_text((d / "user.pub").read_text())
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress {LOOPBACK}\nHostKey {d / 'host'}\nPidFile none\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        "PermitRootLogin prohibit-password\n"
    )
    server = procs.start("sshd", [binary, "-D", "-e", "-f", str(d / "sshd_config")])
    server.wait_log(rf"Server listening on {re.escape(LOOPBACK)} port {port}")
    known = d / "known_hosts"
    known.write_text(f"tunneled-sshd {(d / 'host.pub').read_text()}")
    return port, d / "user", known


def test_ssh_example_logs_in_through_the_raw_tcp_port(
    procs: Procs, relay: Relay, tmp_path: Path
) -> None:
    ssh = require_tool("ssh")
    port, key, known = sshd(procs, tmp_path)
    user = subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    example = start_example(procs, relay, "ssh.py", ["--port", str(port), "--user", user])
    m = example.wait_log(rf"ssh -p (\d+) {re.escape(user)}@tunnel\.localhost")
    tcp_port = int(m.group(1))
    assert tcp_port != port
    result = run(
        [
            ssh, "-F", "/dev/null", "-p", str(tcp_port), "-i", str(key),
            "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            # The host key is checked as usual: the tunnel passes SSH's bytes untouched.
            "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known}",
            "-o", "HostKeyAlias=tunneled-sshd", "-o", "ConnectTimeout=20",
            f"{user}@{LOOPBACK}", "echo hello over the tunnel",
        ],
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stdout == b"hello over the tunnel\n"

    example.stop()
    assert example.popen.returncode == 0, example.tail()
    # The tunnel was closed on the way out (the relay confirms once its port is closed).
    with pytest.raises(OSError):
        socket.create_connection((LOOPBACK, tcp_port), timeout=2).close()
