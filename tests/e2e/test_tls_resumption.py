"""
TLS session resumption through the relay: a client that returns with the session of an
earlier connection to the same tunnel skips the full handshake (no certificate, no key
exchange with the certificate's key), with a real relay and agent and `openssl s_client`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.clientcerts import make_client_pki
from tests.e2e.conftest import World
from tests.e2e.harness import DEADLINE, LOOPBACK, Procs, require_tool, run

pytestmark = pytest.mark.e2e


def _s_client(world: World, host: str, *args: str) -> str:
    """One `openssl s_client` connection to `host` on the relay's TLS port that sends an
    HTTP request asking the server to close, and reads until it does (TLS 1.3 tickets
    arrive after the handshake, so a client must read to get one)."""
    request = f"GET /hello HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    result = run(
        [require_tool("openssl"), "s_client", "-connect", f"{LOOPBACK}:{world.relay.port}",
         "-CAfile", str(world.relay.ca), "-servername", host, "-ign_eof", *args],
        input=request,
        timeout=DEADLINE,
    )  # fmt: skip
    return (result.stdout + result.stderr).decode(errors="replace")


@pytest.mark.parametrize("version", ["-tls1_3", "-tls1_2"])
def test_returning_client_resumes_its_session(world: World, tmp_path: Path, version: str):
    session = tmp_path / "session.pem"
    first = _s_client(world, world.http.host, version, "-sess_out", str(session))
    assert "hello /hello" in first, first
    assert "\nNew, TLSv1." in first, first
    assert session.stat().st_size > 0
    second = _s_client(world, world.http.host, version, "-sess_in", str(session))
    # The server accepted the session: the handshake was abbreviated, and the tunnel served.
    assert "\nReused, TLSv1." in second, second
    assert "hello /hello" in second, second


def test_a_session_without_a_client_certificate_does_not_resume_on_a_mtls_tunnel(
    world: World, procs: Procs, tmp_path: Path
):
    """A session made on a tunnel that asks for no client certificate is bound to that
    tunnel's context: offered to a ``--client-ca`` tunnel of the same relay it is not
    resumed, so the client-certificate check still runs (and refuses a client without one),
    while a session made there with a certificate resumes there."""
    pki = make_client_pki(tmp_path / "pki", "ours")
    backend = procs.backend("http")
    agent = procs.agent(world.relay, [str(backend.port)], extra=["--client-ca", str(pki.ca)])
    mtls = agent.ready(str(backend.port)).host
    plain = tmp_path / "plain.pem"
    assert "hello /hello" in _s_client(world, world.http.host, "-sess_out", str(plain))

    refused = _s_client(world, mtls, "-sess_in", str(plain))
    assert "Reused, TLSv1." not in refused, refused
    assert "hello /hello" not in refused, refused
    assert "certificate required" in refused.lower() or "alert number 116" in refused, refused

    with_cert = tmp_path / "mtls.pem"
    cert = ("-cert", str(pki.cert), "-key", str(pki.key))
    first = _s_client(world, mtls, *cert, "-sess_out", str(with_cert))
    assert "hello /hello" in first, first
    second = _s_client(world, mtls, *cert, "-sess_in", str(with_cert))
    assert "\nReused, TLSv1." in second, second
    assert "hello /hello" in second, second
