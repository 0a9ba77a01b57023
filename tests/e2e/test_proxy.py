"""
Agents behind an HTTP proxy: the link goes through ``CONNECT``, the relay's certificate is
still verified end to end, and a proxy's refusal is a clear error in the agent's log.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.harness import SERVERS, Proc, Procs, Relay, curl

pytestmark = pytest.mark.e2e


@dataclass
class ConnectProxy:
    proc: Proc
    port: int


def connect_proxy(procs: Procs, *args: str) -> ConnectProxy:
    proc = procs.start("connectproxy", [sys.executable, str(SERVERS / "connectproxy.py"), *args])
    return ConnectProxy(proc, int(proc.wait_log(r"listening on (\d+)").group(1)))


def test_agent_reaches_the_relay_through_a_connect_proxy(procs: Procs, relay: Relay) -> None:
    proxy = connect_proxy(procs, "--auth", "me:s3cret")
    backend = procs.backend("http")
    agent = procs.agent(
        relay, [str(backend.port)], extra=["--proxy", f"http://me:s3cret@127.0.0.1:{proxy.port}"]
    )
    tunnel = agent.ready(str(backend.port))
    proxy.proc.wait_log(rf"CONNECT localhost:{relay.port} -> 200")
    result = curl(relay, tunnel, tunnel.url + "/hello")
    assert result.stdout == b"hello /hello\n", result.stderr
    assert "s3cret" not in agent.proc.text(), "the agent logged the proxy password"


@pytest.mark.parametrize(
    ("proxy_args", "credentials", "expected"),
    [
        (["--auth", "me:s3cret"], "", r"refused CONNECT: 407 .*give credentials"),
        (["--auth", "me:s3cret"], "me:wrong@", r"refused CONNECT: 407"),
        (["--deny"], "", r"refused CONNECT: 403 Forbidden"),
    ],
)
def test_a_proxy_refusal_is_a_clear_error(
    procs: Procs, relay: Relay, proxy_args: list[str], credentials: str, expected: str
) -> None:
    proxy = connect_proxy(procs, *proxy_args)
    backend = procs.backend("http")
    agent = procs.agent(
        relay,
        [str(backend.port)],
        wait=False,
        extra=["--proxy", f"http://{credentials}127.0.0.1:{proxy.port}"],
    )
    agent.proc.wait_log(rf"cannot connect to localhost:{relay.port}: the proxy .*{expected}")
    assert "tunnel ready" not in agent.proc.text()


def test_something_that_is_not_an_http_proxy(procs: Procs, relay: Relay, tmp_path: Path) -> None:
    banner = tmp_path / "banner"
    banner.write_bytes(b"SSH-2.0-OpenSSH_9.2p1\r\n")
    not_a_proxy = procs.backend("send", "--file", str(banner))  # an SSH server's greeting
    backend = procs.backend("http")
    agent = procs.agent(
        relay,
        [str(backend.port)],
        wait=False,
        extra=["--proxy", f"http://127.0.0.1:{not_a_proxy.port}"],
    )
    agent.proc.wait_log(r"the proxy did not answer in HTTP: is it an HTTP proxy\?")
