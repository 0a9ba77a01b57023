"""
The relay's certificate end to end: issued by a real ACME server (pebble, validating DNS-01
against pebble-challtestsrv, all on loopback), renewed while a download runs, and reloaded
from ``--cert``/``--key`` files while a connection stays open; and the failure paths of ACME
(a hook that fails, a directory that does not answer, a challenge the server rejects).
"""

from __future__ import annotations

import hashlib
import signal
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from tests.e2e.harness import (
    DEADLINE,
    DOMAIN,
    LOOPBACK,
    Endpoint,
    Proc,
    ProcGroup,
    Procs,
    clean_env,
    free_port,
    random_file,
    recv_exact,
    require_tool,
    run,
    tcp_port_range,
    wait_for,
)
from tests.e2e.pebble import AcmeWorld
from tests.servercerts import TestCA
from tunnel.testing._daemons import RelayProcess, twistd_command

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NAMES = {DOMAIN, "*." + DOMAIN}


@pytest.fixture(scope="module")
def acme(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AcmeWorld]:
    group = ProcGroup(tmp_path_factory.mktemp("pebble"))
    try:
        yield AcmeWorld.start(group, group.dir / "acme")
    finally:
        group.stop_all()


def start_relay(
    procs: Procs, extra: list[str], *, wait: bool = True, name: str = "relay"
) -> RelayProcess:
    """A relay with raw TCP ports and `extra` options, kept in `procs` (ready, with `wait`)."""
    n = procs.next_id()
    options = dict(
        state_dir=procs.dir / f"{name}-state-{n}",
        tcp_ports=tcp_port_range(),
        extra=["--drain-grace", "1", *extra],
        cwd=procs.dir,
    )
    log = procs.dir / f"{n:02d}-{name}.log"
    if wait:
        relay = RelayProcess.start(log, **options)  # type: ignore[arg-type]
    else:
        relay = RelayProcess(
            log,
            port=free_port(),
            admin_port=free_port(),
            **options,  # type: ignore[arg-type]
        )
    procs.procs.append(relay)
    return relay


def served_certificate(port: int, cafile: Path | None) -> x509.Certificate:
    """The certificate a new handshake with the relay's own name gets (verified if `cafile`)."""
    ctx = (
        ssl.create_default_context(cafile=str(cafile))
        if cafile
        else ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    )
    if cafile is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection((LOOPBACK, port), timeout=DEADLINE) as raw,
        ctx.wrap_socket(raw, server_hostname=DOMAIN) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def sans(cert: x509.Certificate) -> set[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(san.get_values_for_type(x509.DNSName))


def curl(ca: Path, relay: RelayProcess, tunnel: Endpoint, path: str, *args: str) -> bytes:
    """curl a tunnel's URL, verifying with `ca` (``*.localhost`` resolves to loopback)."""
    result = run(
        [require_tool("curl"), "-sS", "--fail", "--cacert", str(ca), *args, tunnel.url + path],
        timeout=120,
    )
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout


# -- ACME --------------------------------------------------------------------------------------


def test_acme_certificate_serves_tunnels(acme: AcmeWorld, procs: Procs) -> None:
    relay = start_relay(procs, acme.relay_options())
    root = acme.root()
    cert = served_certificate(relay.port, root)
    assert sans(cert) == NAMES
    status = relay.status()
    assert set(status["certificate"]["names"]) == NAMES
    assert status["certificate"]["issuer"].startswith("Pebble Intermediate")
    assert status["certificate_expiry_timestamp_seconds"] == int(
        cert.not_valid_after_utc.timestamp()
    )
    relay.wait_log(r"certificate in service: tunnel\.localhost, \*\.tunnel\.localhost issued by")
    backend = procs.backend("http")
    agent = procs.agent(f"{DOMAIN}:{relay.port}", [str(backend.port)], ca=root)
    tunnel = agent.ready(str(backend.port))
    assert curl(root, relay, tunnel, "/hello").startswith(b"hello")
    # What the relay keeps: the account and the certificate, keys private.
    kept = next((relay.state_dir / "acme").iterdir())
    assert {p.name for p in kept.iterdir()} >= {
        "account-key.pem",
        "account.json",
        "fullchain.pem",
        "privkey.pem",
    }
    assert (kept / "privkey.pem").stat().st_mode & 0o077 == 0
    # A restart serves the kept certificate without a new order.
    relay.stop()
    mark = relay.size()
    again = relay.restart()
    procs.procs.append(again)
    assert served_certificate(again.port, root).serial_number == cert.serial_number
    assert "requesting a certificate" not in again.text()[mark:]


def test_acme_renewal_during_a_download(acme: AcmeWorld, procs: Procs) -> None:
    # pebble's certificates last 5 years: a threshold past that makes every check renew.
    relay = start_relay(
        procs,
        [*acme.relay_options(), "--acme-renew-before", "1e10", "--acme-check-interval", "2"],
    )
    root = acme.root()
    first = served_certificate(relay.port, root)
    files = procs.dir / "files"
    files.mkdir()
    digest = random_file(files / "big", 16 * 1024 * 1024, seed=7)
    backend = procs.backend("http", "--root", str(files))
    agent = procs.agent(f"{DOMAIN}:{relay.port}", [str(backend.port)], ca=root)
    tunnel = agent.ready(str(backend.port))
    before = relay.count(r"certificate in service")
    out = procs.dir / "download"
    download = subprocess.Popen(
        [
            require_tool("curl"),
            *("-sS", "--fail", "--limit-rate", "2M", "--cacert", str(root)),
            *("-o", str(out), tunnel.url + "/file/big"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=clean_env(),
    )
    try:
        relay.wait(
            lambda: relay.count(r"certificate in service") > before,
            "a renewal while the download runs",
            timeout=30,
        )
        assert download.poll() is None, "the download finished before the renewal"
        assert download.wait(120) == 0, download.stderr.read() if download.stderr else ""
    finally:
        if download.poll() is None:
            download.kill()
            download.wait()
    assert hashlib.sha256(out.read_bytes()).hexdigest() == digest
    renewed = served_certificate(relay.port, root)
    assert renewed.serial_number != first.serial_number
    assert sans(renewed) == NAMES
    assert curl(root, relay, tunnel, "/hello").startswith(b"hello")


@pytest.mark.parametrize(
    "case, pattern",
    [
        (
            "hook",
            r"the DNS hook `.*set _acme-challenge\.tunnel\.localhost\. …` exited with "
            r"status 3: dns hook: the provider refused the update",
        ),
        ("directory", r"the ACME directory https://127\.0\.0\.1:\d+/dir does not answer"),
        (
            "challenge",
            r"the ACME server rejected the DNS-01 challenge: (\*\.)?tunnel\.localhost: "
            r"Correct value not found",
        ),
    ],
)
def test_acme_failures_are_logged_and_retried(
    acme: AcmeWorld, procs: Procs, case: str, pattern: str
) -> None:
    options = acme.relay_options({"hook": "--fail", "challenge": "--wrong"}.get(case, ""))
    if case == "directory":
        options[1] = f"https://{LOOPBACK}:{free_port()}/dir"  # nothing listens there
    relay = start_relay(procs, [*options, "--acme-check-interval", "1"], wait=False)
    first = relay.wait_log(
        r"ACME: could not obtain a certificate \(attempt 1\): " + pattern, timeout=60
    )
    relay.wait_log(r"could not obtain a certificate \(attempt 2\)", timeout=60, start=first.end())
    assert "retrying in" in first.string[first.start() : first.start() + 600]
    # Nothing else is disturbed: the admin endpoint answers, not ready; TLS is refused
    # rather than served with anything else.
    assert relay.alive()
    assert relay.status()["certificate"] is None
    assert not relay.ready()
    with pytest.raises((ssl.SSLError, ConnectionError)):
        served_certificate(relay.port, None)
    assert relay.alive()


# -- --cert / --key reload ----------------------------------------------------------------------


class CertFiles:
    """The relay's ``--cert``/``--key`` files, replaced as an operator would (``mv``)."""

    def __init__(self, directory: Path) -> None:
        self.ca = TestCA()
        self.dir = directory
        self.ca_path = directory / "ca.pem"
        self.ca_path.write_bytes(self.ca.pem())
        self.cert = directory / "fullchain.pem"
        self.key = directory / "privkey.pem"
        self.serial = self.replace()

    def replace(self, mismatched: bool = False) -> int:
        cert_path, key_path, cert = self.ca.write(self.dir, sorted(NAMES), stem="new")
        if mismatched:
            _, other_key, _ = self.ca.write(self.dir, sorted(NAMES), stem="other")
            other_key.replace(key_path)
        key_path.replace(self.key)
        cert_path.replace(self.cert)
        return cert.serial_number


def echo(sock: ssl.SSLSocket, data: bytes) -> None:
    sock.sendall(data)
    assert recv_exact(sock, len(data)) == data


def test_cert_files_reload_without_dropping_connections(procs: Procs) -> None:
    files = CertFiles(procs.dir)
    relay = start_relay(procs, ["--cert", str(files.cert), "--key", str(files.key)])
    assert served_certificate(relay.port, files.ca_path).serial_number == files.serial
    backend = procs.backend("echo")
    agent = procs.agent(f"{DOMAIN}:{relay.port}", [str(backend.port)], ca=files.ca_path)
    tunnel = agent.ready(str(backend.port))
    ctx = ssl.create_default_context(cafile=str(files.ca_path))
    raw = socket.create_connection((LOOPBACK, relay.port), timeout=DEADLINE)
    with ctx.wrap_socket(raw, server_hostname=tunnel.host) as long_lived:
        echo(long_lived, b"before\n")

        # Replaced on disk: in service within the poll interval.
        second = files.replace()
        wait_for(
            lambda: served_certificate(relay.port, files.ca_path).serial_number == second,
            "the new certificate on new handshakes",
            timeout=10,
        )
        echo(long_lived, b"after the file changed\n")
        assert relay.status()["certificate"]["serial"] == f"{second:X}"

        # SIGHUP: at once (the watch's own check would also see it, so look at the log).
        mark = relay.size()
        third = files.replace()
        relay.signal(signal.SIGHUP)
        relay.wait_log(r"checking .* \(SIGHUP\)", start=mark)
        relay.wait_log(rf"certificate in service: .*\(serial {third:X}\)", start=mark)
        assert served_certificate(relay.port, files.ca_path).serial_number == third

        # A key that is not the certificate's: refused, the old one serves on.
        mark = relay.size()
        files.replace(mismatched=True)
        relay.signal(signal.SIGHUP)
        relay.wait_log(
            r"certificate NOT reloaded: .*the private key does not belong to the certificate"
            rf".*still serving .*\(serial {third:X}\)",
            start=mark,
        )
        assert served_certificate(relay.port, files.ca_path).serial_number == third
        echo(long_lived, b"still here\n")
        # The agent's link was never dropped.
        assert agent.proc.status()["links_made"] == 1
    assert relay.alive()


def test_cert_and_acme_are_mutually_exclusive(procs: Procs) -> None:
    files = CertFiles(procs.dir)
    proc = Proc(
        twistd_command(
            "tunnelrelay",
            *("--state-dir", str(procs.dir / "state")),
            *("--cert", str(files.cert), "--key", str(files.key)),
            *("--acme", "https://127.0.0.1:1/dir", "--acme-dns-hook", "true"),
        ),
        procs.dir / "usage.log",
    )
    procs.procs.append(proc)
    assert proc.popen.wait(DEADLINE) != 0
    assert "--acme and --cert/--key are mutually exclusive" in proc.text()


def test_acme_issues_passthrough_certificates(acme: AcmeWorld, procs: Procs) -> None:
    """
    A passthrough tunnel's certificate through the relay's ACME CA and DNS-01 hook: the
    agent sends only a CSR; what it gets back names exactly the tunnel's host, chains to the
    ACME server's root, and curl verifies the local server with it through the relay.
    """
    import re
    import sys

    from tests.e2e.test_passthrough import SCRIPT

    openssl = require_tool("openssl")
    relay = start_relay(procs, acme.relay_options())
    root = acme.root()
    port = free_port()
    script = procs.dir / "passthrough_agent.py"
    script.write_text(SCRIPT)
    agent = procs.start(
        "agent-api",
        [
            sys.executable,
            str(script),
            str(port),
            f"{DOMAIN}:{relay.port}",
            str(root),
            str(procs.dir),
        ],
    )
    host = agent.wait_log(r'READY \{"host": "([^"]+)"', timeout=120).group(1)
    chain = (procs.dir / "chain.pem").read_text()
    pems = re.findall(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\n", chain, re.S)
    leaf = x509.load_pem_x509_certificate(pems[0].encode())
    assert sans(leaf) == {host}
    assert leaf.issuer.rfc4514_string().startswith("CN=Pebble Intermediate")
    relay.wait_log(r"issuing a certificate for " + re.escape(host))
    (procs.dir / "leaf.pem").write_text(pems[0])
    (procs.dir / "issuer.pem").write_text("".join(pems[1:]))
    server = procs.start(
        "s_server",
        [
            *(openssl, "s_server", "-accept", f"{LOOPBACK}:{port}", "-www"),
            *("-cert", str(procs.dir / "leaf.pem"), "-cert_chain", str(procs.dir / "issuer.pem")),
            *("-key", str(procs.dir / "key.pem")),
        ],
    )
    server.wait_log(r"ACCEPT")
    tunnel = Endpoint(host, relay.port, None)
    page = curl(root, relay, tunnel, "/", "--resolve", f"{host}:{relay.port}:{LOOPBACK}")
    assert b"s_server" in page
