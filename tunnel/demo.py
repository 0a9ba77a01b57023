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
import time
from types import FrameType
from typing import Any

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

#: This Python, unbuffered (the logs are read as they are written).
PY = [sys.executable, "-u"]
#: ``twistd -n`` in the foreground, logging to stdout (which is the child's log file).
TWISTD = [
    *PY,
    "-c",
    "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()",
    *("-n", "--pidfile", "", "--logfile", "-"),
]


class DemoError(Exception):
    """
    Something the demo needs did not happen; the message says what, for the user.
    """


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)\n"


class Child:
    """
    A process the demo started, its log file, and a way to wait for a line in that log.
    """

    def __init__(self, name: str, argv: list[str], log: str, env: dict[str, str] | None = None):
        self.name = name
        self.log = log
        with open(log, "w", encoding="utf-8"):
            pass  # start each run with an empty log
        self._out = open(log, "a", encoding="utf-8")  # noqa: SIM115 (closed in stop())
        # Its own session: Ctrl-C reaches the demo only, which then stops children in order.
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """
        Read the log until a line matches `pattern`; fail if the process exits or time runs
        out first.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        offset = 0
        pending = ""
        with open(self.log, encoding="utf-8", errors="replace") as f:
            while True:
                f.seek(offset)
                chunk = f.read()
                offset = f.tell()
                pending += chunk
                *complete, pending = pending.split("\n")
                for line in complete:
                    match = regex.search(line)
                    if match:
                        return match
                if self.proc.poll() is not None:
                    raise DemoError(
                        f"the {self.name} exited (status {self.proc.returncode}); "
                        f"its log ({self.log}) ends with:\n{_tail(self.log)}"
                    )
                if time.monotonic() > deadline:
                    raise DemoError(
                        f"the {self.name} was not ready after {timeout:.0f}s; "
                        f"its log ({self.log}) ends with:\n{_tail(self.log)}"
                    )
                time.sleep(0.05)

    def stop(self) -> None:
        """
        SIGTERM, then SIGKILL if it has not exited in time; by PID only.
        """
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        self._out.close()


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

    children: list[Child] = []
    status = 0
    try:
        print("Starting a relay, a web server and an agent on 127.0.0.1 ...")

        # The user's server: a static web server on a port the kernel picks.
        web = Child(
            "web server",
            [*PY, "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", www],
            os.path.join(state, "web.log"),
        )
        children.append(web)
        web_port = int(web.wait_for(r"port (\d+)", READY_TIMEOUT).group(1))

        # The relay; its port is chosen before it starts, so retry if another process took it.
        relay_port = 0
        for attempt in range(3):
            relay_port = _free_port()
            tcp_low = 30000 + (relay_port * 7919) % 9900
            relay = Child(
                "relay",
                [
                    *TWISTD,
                    "tunnelrelay",
                    *("--domain", DOMAIN, "--state-dir", relay_state, "--drain-grace", "2"),
                    *("--listen", f"tcp:{relay_port}:interface=127.0.0.1"),
                    *("--tcp-ports", f"{tcp_low}-{tcp_low + 99}", "--tcp-interface", "127.0.0.1"),
                ],
                os.path.join(state, "relay.log"),
            )
            children.append(relay)
            try:
                relay.wait_for(r"relay listening on ", READY_TIMEOUT)
                break
            except DemoError:
                relay.stop()
                children.remove(relay)
                if attempt == 2:
                    raise

        env = {k: v for k, v in os.environ.items() if not k.startswith("TUNNEL_")}
        agent = Child(
            "agent",
            [
                *TWISTD,
                "tunnelagent",
                *("--relay", f"localhost:{relay_port}", "--ca", ca, "--forward", str(web_port)),
            ],
            os.path.join(state, "agent.log"),
            env=env,
        )
        children.append(agent)
        url = agent.wait_for(r"tunnel ready: (https://\S+)", READY_TIMEOUT).group(1)

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
                    if child.proc.poll() is not None:
                        raise DemoError(
                            f"the {child.name} exited (status {child.proc.returncode}); "
                            f"its log ({child.log}) ends with:\n{_tail(child.log)}"
                        )
            print()
            status = 0
    except DemoError as e:
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
