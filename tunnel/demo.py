"""
``make demo`` / ``python -m tunnel.demo``: a development relay, a small web server and an
agent on loopback, and a public HTTPS URL for the web server, fetched once with curl.

Everything runs on 127.0.0.1 with free ports. The relay keeps its development CA in
``--state-dir`` (default ``.demo-state/``), so the CA stays the same from one run to the next.
Runs until Ctrl-C or SIGTERM, then stops every process it started; ``--once`` stops right
after the fetch and exits with curl's status.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from tunnel.testing._daemons import AgentProcess, Daemon, DaemonError, RelayProcess
from tunnel.testing._daemons import free_port as _free_port

__all__ = ["main"]

DOMAIN = "tunnel.localhost"
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0

PAGE = """<!doctype html>
<meta charset="utf-8">
<title>Tunnels demo</title>
<h1>Hello from behind the tunnel!</h1>
<p>This page is served on 127.0.0.1 and reached through a Tunnels relay.</p>
"""


class DemoError(Exception):
    """
    Something the demo needs did not happen; the message says what, for the user.
    """


def tcp_port_range(seed: int, size: int = 100) -> tuple[int, int]:
    """
    `size` raw TCP ports for the demo's relay, picked by `seed`, below the kernel's
    ephemeral range: the relay warns about a range that overlaps it (a port an outgoing
    connection holds cannot be listened on).
    """
    first_ephemeral = 32768
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            first_ephemeral = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    bottom = 20000 if first_ephemeral > 20000 + 2 * size else 1024
    span = max(first_ephemeral - size - bottom, 1)
    low = bottom + (seed * 7919) % span
    return low, low + size - 1


def _fresh_log(state: str, name: str) -> Path:
    """The log file `name` in the demo's directory, emptied: each run starts a new one."""
    path = Path(state) / name
    path.write_text("")
    return path


def _display_path(path: str) -> str:
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _fetch(url: str, ca: str, port: int) -> tuple[int, str]:
    """
    GET `url` trusting `ca`: with curl when there is one, else with Python's ssl module.
    """
    curl = shutil.which("curl")
    if curl:
        result = subprocess.run(
            [curl, "-sS", "--max-time", "10", "--cacert", ca, url],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return result.returncode, result.stdout + result.stderr
    host = url.split("//", 1)[1].split(":", 1)[0].split("/", 1)[0]
    context = ssl.create_default_context(cafile=ca)
    try:
        # *.localhost is loopback; dial 127.0.0.1 and send the tunnel's name as SNI.
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            data = b""
            while b"\r\n\r\n" not in data and (chunk := tls.recv(65536)):
                data += chunk
            head, _, body_bytes = data.partition(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            # Read by Content-Length, not to EOF: a keep-alive server does not close.
            while length and len(body_bytes) < int(length.group(1)):
                chunk = tls.recv(65536)
                if not chunk:
                    break
                body_bytes += chunk
    except (OSError, ssl.SSLError) as e:
        return 1, f"fetch failed: {e}\n"
    body = body_bytes.decode("utf-8", "replace")
    return 0, body


def _indent(text: str) -> str:
    return "".join(f"    {line}\n" for line in text.rstrip("\n").splitlines())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tunnel.demo",
        description="A relay, a web server and an agent on loopback; a public URL for the server.",
    )
    parser.add_argument("--once", action="store_true", help="fetch once, stop, exit")
    parser.add_argument(
        "--state-dir", default=".demo-state", help="where the relay's CA and the logs go"
    )
    args = parser.parse_args(argv)

    state = os.path.abspath(args.state_dir)
    relay_state = os.path.join(state, "relay")
    www = os.path.join(state, "www")
    os.makedirs(www, exist_ok=True)
    with open(os.path.join(www, "index.html"), "w", encoding="utf-8") as f:
        f.write(PAGE)
    ca = os.path.join(relay_state, "ca.pem")

    stop_requested = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop_requested.set()

    previous: dict[signal.Signals, Any] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, on_signal)

    children: list[Daemon] = []
    status = 0
    try:
        print("Starting a relay, a web server and an agent on 127.0.0.1 ...")

        # The user's server: a static web server on a port the kernel picks.
        web = Daemon(
            [
                sys.executable,
                "-u",
                "-m",
                "http.server",
                "0",
                "--bind",
                "127.0.0.1",
                "--directory",
                www,
            ],
            _fresh_log(state, "web.log"),
            new_session=True,
        )
        web.name = "web server"
        children.append(web)
        web_port = int(web.wait_log(r"port (\d+)", READY_TIMEOUT).group(1))

        # The relay: started on free ports, ready when its admin endpoint says so.
        relay = RelayProcess.start(
            _fresh_log(state, "relay.log"),
            state_dir=Path(relay_state),
            tcp_ports=tcp_port_range(_free_port()),
            extra=["--drain-grace", "2"],
            new_session=True,
            attempts=3,
            timeout=READY_TIMEOUT,
        )
        children.append(relay)

        agent = AgentProcess(
            _fresh_log(state, "agent.log"),
            relay=f"localhost:{relay.port}",
            ca=relay.ca,
            forwards=[str(web_port)],
            new_session=True,
        )
        children.append(agent)
        url = agent.tunnel(f"127.0.0.1:{web_port}", READY_TIMEOUT).url
        relay_port = relay.port

        ca_shown = _display_path(ca)
        command = f"curl --cacert {ca_shown} {url}/"
        print()
        print(f"  your server   http://127.0.0.1:{web_port}/")
        print(f"  public URL    {url}")
        print()
        print("Reach it through the relay (the certificate is from the demo's own CA):")
        print()
        print(f"$ {command}")
        code, answer = _fetch(url + "/", ca, relay_port)
        print(_indent(answer), end="")
        print()
        if code != 0:
            print(f"The fetch failed (status {code}); the logs are in {_display_path(state)}/.")
        status = code

        if not args.once:
            print(f"The tunnel stays up; logs are in {_display_path(state)}/. Ctrl-C stops it.")
            while not stop_requested.wait(0.5):
                for child in children:
                    if not child.alive():
                        raise DemoError(
                            f"the {child.name} exited (status {child.returncode}); "
                            f"its log ({child.log}) ends with:\n{child.tail(1500)}"
                        )
            print()
            status = 0
    except (DemoError, DaemonError) as e:
        print(f"demo: {e}", file=sys.stderr)
        status = 1
    finally:
        # Ignore further signals while stopping, so a second Ctrl-C cannot orphan a child.
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        if children:
            print("Stopping ...", end=" ", flush=True)
            for child in reversed(children):  # agent, relay, web server
                child.stop()
            print("done.")
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return status


if __name__ == "__main__":
    sys.exit(main())
