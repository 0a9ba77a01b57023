"""
TLS passthrough end to end: a relay process routes a public TLS connection by its SNI name
to ``openssl s_server``, which terminates it with a certificate the relay's development CA
signed through the plain Python API (``tunnel.forward(..., passthrough=True)`` and
``Tunnel.issue_certificate``, in a subprocess: it runs the reactor in a thread); curl and
``openssl s_client`` through the relay see that certificate, not the relay's wildcard.
"""

from __future__ import annotations

import json
import re
import sys
import textwrap

import pytest

from tests.e2e.harness import LOOPBACK, Procs, Relay, free_port, require_tool, run

pytestmark = pytest.mark.e2e

SCRIPT = textwrap.dedent(
    """
    import json, signal, sys
    from pathlib import Path
    import tunnel

    port, relay, ca, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with tunnel.forward(port, passthrough=True, relay=relay, ca=ca) as t:
        key, csr = tunnel.make_csr(t.host)
        chain = t.issue_certificate(csr)          # blocks: the plain API
        (out / "key.pem").write_text(key)
        (out / "chain.pem").write_text(chain)
        print("READY " + json.dumps({"host": t.host, "port": t.port}), flush=True)
        signal.pause()
    """
)


def test_clients_see_the_local_servers_certificate(procs: Procs, relay: Relay) -> None:
    openssl = require_tool("openssl")
    port = free_port()
    script = procs.dir / "passthrough_agent.py"
    script.write_text(SCRIPT)
    agent = procs.start(
        "agent-api",
        [
            sys.executable,
            str(script),
            str(port),
            f"localhost:{relay.port}",
            str(relay.ca),
            str(procs.dir),
        ],
    )
    tunnel = json.loads(agent.wait_log(r"READY (\{.*\})").group(1))
    host = tunnel["host"]
    leaf = serve_chain(procs, openssl, port)

    result = run(
        [
            require_tool("curl"),
            "-sS",
            "-v",
            "--max-time",
            "20",
            "--cacert",
            str(relay.ca),
            "--resolve",
            f"{host}:{relay.port}:{LOOPBACK}",
            f"https://{host}:{relay.port}/",
        ]
    )
    assert result.returncode == 0, result.stderr
    assert b"s_server" in result.stdout  # the page openssl's -www serves
    # The certificate curl verified is the local server's, for the tunnel's own name.
    assert re.search(rf"subject: CN ?= ?{re.escape(host)}".encode(), result.stderr), result.stderr
    assert not re.search(rb"subject: CN ?= ?tunnel\.localhost\n", result.stderr)  # the relay's

    shown = run(
        [
            openssl,
            "s_client",
            "-connect",
            f"{LOOPBACK}:{relay.port}",
            "-servername",
            host,
            "-CAfile",
            str(relay.ca),
            "-verify_hostname",
            host,
            "-verify_return_error",
            "-showcerts",
        ],
        input=b"",
        timeout=20,
    )
    text = shown.stdout.decode(errors="replace")
    assert "Verify return code: 0 (ok)" in text, text + shown.stderr.decode()
    first = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\n", text, re.S)
    assert first is not None and first.group(0) == leaf
    relay_cert = (relay.ca.parent / "fullchain.pem").read_text()
    assert leaf not in relay_cert

    # The daemon's spelling: the same local server through `--forward PORT:passthrough`. Its
    # tunnel has another name, which that certificate does not cover: curl says so, then,
    # told not to check, reaches the same server.
    daemon = procs.agent(relay, [f"{port}:passthrough"])
    other = daemon.ready(f"{port}")
    assert other.host != host
    resolve = ["--resolve", f"{other.host}:{relay.port}:{LOOPBACK}"]
    url = f"https://{other.host}:{relay.port}/"
    checked = run([require_tool("curl"), "-sS", "--cacert", str(relay.ca), *resolve, url])
    assert checked.returncode == 60, checked.stderr  # the name does not match
    unchecked = run([require_tool("curl"), "-sS", "-k", *resolve, url])
    assert b"s_server" in unchecked.stdout, unchecked.stderr


def serve_chain(procs: Procs, openssl: str, port: int) -> str:
    """Serve the agent's passthrough chain (``chain.pem``, its ``key.pem``) with ``openssl
    s_server`` on `port`, until it accepts; the leaf certificate (PEM)."""
    certs = (procs.dir / "chain.pem").read_text()
    leaf, ca = re.findall(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\n", certs, re.S)
    (procs.dir / "leaf.pem").write_text(leaf)
    (procs.dir / "issuer.pem").write_text(ca)
    server = procs.start(
        "s_server",
        [
            openssl,
            "s_server",
            "-accept",
            f"{LOOPBACK}:{port}",
            "-www",
            *("-cert", str(procs.dir / "leaf.pem")),
            *("-cert_chain", str(procs.dir / "issuer.pem")),
            *("-key", str(procs.dir / "key.pem")),
        ],
    )
    server.wait_log(r"ACCEPT")
    return leaf
