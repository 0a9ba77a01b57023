"""
Mutual TLS end to end: a tunnel made with ``--client-ca`` admits only public clients with a
certificate from that authority; others get a clear TLS alert; other tunnels are unaffected.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.clientcerts import make_client_pki
from tests.e2e.harness import Procs, Relay, curl

pytestmark = pytest.mark.e2e


def test_only_clients_with_a_certificate_from_the_ca_get_through(
    procs: Procs, relay: Relay, tmp_path: Path
) -> None:
    ours = make_client_pki(tmp_path / "pki", "ours")
    theirs = make_client_pki(tmp_path / "pki", "theirs")
    backend = procs.backend("http")
    agent = procs.agent(relay, [str(backend.port)], extra=["--client-ca", str(ours.ca)])
    tunnel = agent.ready(str(backend.port))
    relay.wait_log(r"client certificates required")
    url = tunnel.url + "/hello"

    ok = curl(relay, tunnel, "--cert", str(ours.cert), "--key", str(ours.key), url)
    assert ok.stdout == b"hello /hello\n", ok.stderr

    none = curl(relay, tunnel, url)
    assert none.returncode != 0 and none.stdout == b""
    assert b"certificate required" in none.stderr.lower(), none.stderr

    wrong = curl(relay, tunnel, "--cert", str(theirs.cert), "--key", str(theirs.key), url)
    assert wrong.returncode != 0 and wrong.stdout == b""
    assert b"unknown ca" in wrong.stderr.lower(), wrong.stderr

    # A tunnel without --client-ca on the same relay needs no certificate.
    open_backend = procs.backend("http")
    plain = procs.agent(relay, [str(open_backend.port)])
    open_tunnel = plain.ready(str(open_backend.port))
    assert curl(relay, open_tunnel, open_tunnel.url + "/hello").stdout == b"hello /hello\n"


def test_client_ca_with_a_raw_tcp_forward_is_refused(procs: Procs, relay: Relay, tmp_path: Path):
    ours = make_client_pki(tmp_path / "pki", "ours")
    agent = procs.agent(relay, ["8000:tcp"], wait=False, extra=["--client-ca", str(ours.ca)])
    agent.proc.wait_log(r"--client-ca: client certificates need a TLS tunnel")
    agent.proc.wait(lambda: not agent.proc.alive(), "the agent to exit")
