"""
The relay's certificate reload decisions: which pairs are refused and why
(`tunnel.relay._certificate`), swapping the certificate in `RelayTLS`, and the file watch
(`CertificateWatch`) on a fake clock.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher

from tests.servercerts import TestCA, key_pem
from tunnel.relay._certificate import (
    CertificatePair,
    CertificateRefused,
    check_pair,
    covers,
    parse_pair,
    read_pair,
)
from tunnel.relay._certwatch import CertificateWatch, put_in_service
from tunnel.relay._tls import ALPN_HTTP1, RelayTLS

DOMAIN = "tunnel.example"
NAMES = [DOMAIN, "*." + DOMAIN]
NOW = datetime.datetime.now(datetime.UTC)


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA()


def pair_of(ca: TestCA, names: list[str] = NAMES) -> CertificatePair:
    cert, key = ca.leaf(names)
    return check_pair([cert, ca.cert], key, DOMAIN, NOW, "test")


# -- the checks -------------------------------------------------------------------------------


def test_a_good_pair_passes_with_its_names_issuer_and_expiry(ca: TestCA) -> None:
    cert, key = ca.leaf(NAMES)
    pair = check_pair([cert, ca.cert], key, DOMAIN, NOW, "f.pem")
    assert pair.names == NAMES
    assert pair.issuer == ca.name
    assert pair.not_after == cert.not_valid_after_utc
    assert pair.serial == f"{cert.serial_number:X}"
    line = pair.describe()
    assert DOMAIN in line and ca.name in line and pair.serial in line and "f.pem" in line
    assert pair.status()["names"] == NAMES


def test_a_key_of_another_certificate_is_refused(ca: TestCA) -> None:
    cert, _ = ca.leaf(NAMES)
    _, other = ca.leaf(NAMES)
    with pytest.raises(CertificateRefused, match="private key does not belong"):
        check_pair([cert], other, DOMAIN, NOW)


@pytest.mark.parametrize(
    "names, missing",
    [
        ([DOMAIN], "\\*.tunnel.example"),
        (["*." + DOMAIN], "tunnel.example \\(it"),
        (["other.example", "*.other.example"], "tunnel.example and \\*.tunnel.example"),
        # A name under the domain is no wildcard: tunnel ids are random.
        ([DOMAIN, "www." + DOMAIN], "\\*.tunnel.example"),
    ],
)
def test_a_certificate_not_covering_the_domain_is_refused(
    ca: TestCA, names: list[str], missing: str
) -> None:
    cert, key = ca.leaf(names)
    with pytest.raises(CertificateRefused, match=f"does not cover {missing}"):
        check_pair([cert], key, DOMAIN, NOW)


def test_covers_ignores_case_and_trailing_dots() -> None:
    assert covers(["Tunnel.Example.", "*.TUNNEL.example"], "tunnel.example.")
    assert not covers(["*.tunnel.example"], "tunnel.example")


def test_an_expired_certificate_is_refused(ca: TestCA) -> None:
    cert, key = ca.leaf(NAMES, not_after=NOW - datetime.timedelta(minutes=1))
    with pytest.raises(CertificateRefused, match="expired"):
        check_pair([cert], key, DOMAIN, NOW)


def test_a_chain_out_of_order_is_refused(ca: TestCA) -> None:
    cert, key = ca.leaf(NAMES)
    other = TestCA("another CA")
    with pytest.raises(CertificateRefused, match="out of order"):
        check_pair([cert, other.cert], key, DOMAIN, NOW)


def test_files_that_do_not_parse_are_refused(ca: TestCA, tmp_path: Path) -> None:
    cert, key = ca.leaf(NAMES)
    good_cert = cert.public_bytes(serialization.Encoding.PEM)
    with pytest.raises(CertificateRefused, match="certificate file does not parse"):
        parse_pair(b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n", b"")
    with pytest.raises(CertificateRefused, match="key file does not parse"):
        parse_pair(good_cert, b"garbage")
    (tmp_path / "c.pem").write_bytes(b"no PEM at all\n")
    (tmp_path / "k.pem").write_bytes(key_pem(key))
    with pytest.raises(CertificateRefused, match=r"c\.pem"):
        read_pair(str(tmp_path / "c.pem"), str(tmp_path / "k.pem"), DOMAIN, NOW)
    with pytest.raises(CertificateRefused, match="cannot read"):
        read_pair(str(tmp_path / "missing.pem"), str(tmp_path / "k.pem"), DOMAIN, NOW)


# -- RelayTLS -------------------------------------------------------------------------------------


def _served(ctx: SSL.Context) -> x509.Certificate:
    conn = SSL.Connection(ctx, None)
    cert = conn.get_certificate()
    assert cert is not None
    return cert.to_cryptography()


def test_install_swaps_the_certificate_of_new_contexts_only(ca: TestCA) -> None:
    first, second = pair_of(ca), pair_of(ca)
    tls = RelayTLS()
    tls.install(first)
    old = tls.context_for(ALPN_HTTP1)
    assert tls.context_for(ALPN_HTTP1) is old  # cached
    tls.install(second)
    new = tls.context_for(ALPN_HTTP1)
    assert new is not old
    assert _served(new) == second.leaf
    # What a connection established before holds is untouched.
    assert _served(old) == first.leaf
    assert tls.certificate == second.leaf


def test_install_of_a_pair_openssl_refuses_keeps_the_old_one(ca: TestCA) -> None:
    good = pair_of(ca)
    tls = RelayTLS()
    tls.install(good)
    cert, _ = ca.leaf(NAMES)
    _, other_key = ca.leaf(NAMES)
    with pytest.raises(SSL.Error):
        tls.install(CertificatePair((cert,), other_key))  # unchecked: mismatched
    assert tls.pair is good and _served(tls.context_for(())) == good.leaf


def test_without_a_certificate_handshakes_fail() -> None:
    tls = RelayTLS()
    assert tls.pair is None
    with pytest.raises(LookupError):
        _ = tls.certificate
    server = SSL.Connection(tls.context_for(ALPN_HTTP1), None)
    server.set_accept_state()
    client_ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    client = SSL.Connection(client_ctx, None)
    client.set_connect_state()
    client.set_tlsext_host_name(b"x." + DOMAIN.encode())
    with pytest.raises(SSL.WantReadError):
        client.do_handshake()
    server.bio_write(client.bio_read(65536))
    with pytest.raises(SSL.Error):
        server.do_handshake()


def test_client_verifying_contexts_are_rebuilt_with_the_new_certificate(ca: TestCA) -> None:
    first, second = pair_of(ca), pair_of(ca)
    client_ca = TestCA("client CA")
    tls = RelayTLS()
    tls.install(first)
    ctx = tls.client_verifying_context(ALPN_HTTP1, [client_ca.cert])
    assert tls.refresh(ctx) is None  # already current
    record = SimpleNamespace(context=ctx)
    plain = SimpleNamespace(context=None)
    relay = SimpleNamespace(tls=tls, registry=SimpleNamespace(all=lambda: [record, plain]))
    put_in_service(relay, second)  # type: ignore[arg-type]
    assert record.context is not ctx
    assert _served(record.context) == second.leaf
    assert plain.context is None
    assert tls.refresh(tls.context_for(())) is None  # not a client-verifying one


# -- the file watch ---------------------------------------------------------------------------


class Files:
    """``--cert``/``--key`` files in `directory`, replaced the way an operator would."""

    def __init__(self, ca: TestCA, directory: Path) -> None:
        self.ca = ca
        self.cert = directory / "fullchain.pem"
        self.key = directory / "privkey.pem"
        self.serial = 0
        self.write(NAMES)

    def write(self, names: list[str], mismatched: bool = False) -> None:
        cert, key = self.ca.leaf(names)
        if mismatched:
            _, key = self.ca.leaf(names)
        for path, data in (
            (self.key, key_pem(key)),
            (self.cert, cert.public_bytes(serialization.Encoding.PEM) + self.ca.pem()),
        ):
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)  # a new inode: seen even within one mtime tick
        self.serial = cert.serial_number


@pytest.fixture
def logged() -> list[dict[str, object]]:
    events: list[dict[str, object]] = []
    globalLogPublisher.addObserver(events.append)
    yield events  # type: ignore[misc]
    globalLogPublisher.removeObserver(events.append)


def _errors(events: list[dict[str, object]]) -> list[str]:
    from twisted.logger import formatEvent

    return [formatEvent(e) for e in events if e.get("log_level") == LogLevel.error]


def _watch(ca: TestCA, tmp_path: Path) -> tuple[Files, CertificateWatch, list[CertificatePair]]:
    files = Files(ca, tmp_path)
    installed: list[CertificatePair] = []
    clock = Clock()
    clock.advance(NOW.timestamp())
    watch = CertificateWatch(clock, str(files.cert), str(files.key), DOMAIN, installed.append)
    watch.install_first()
    watch.startService()
    return files, watch, installed


def test_watch_installs_a_changed_pair_at_the_next_check(ca: TestCA, tmp_path: Path) -> None:
    files, watch, installed = _watch(ca, tmp_path)
    first = installed[0]
    watch.check()
    assert installed == [first]  # nothing changed
    files.write(NAMES)
    watch.check()
    assert len(installed) == 2 and installed[1].leaf.serial_number == files.serial
    assert watch.installed is installed[1]
    watch.stopService()


def test_watch_refuses_a_mismatched_pair_once_and_keeps_the_old(
    ca: TestCA, tmp_path: Path, logged: list[dict[str, object]]
) -> None:
    files, watch, installed = _watch(ca, tmp_path)
    files.write(NAMES, mismatched=True)
    watch.check()
    watch.check()
    assert len(installed) == 1
    errors = _errors(logged)
    assert len(errors) == 1, errors
    assert "NOT reloaded" in errors[0] and "does not belong" in errors[0]
    assert installed[0].serial in errors[0]  # says what is still served
    # The fixed pair is taken at the next check.
    files.write(NAMES)
    watch.check()
    assert len(installed) == 2
    watch.stopService()


def test_watch_refuses_a_pair_for_another_domain(
    ca: TestCA, tmp_path: Path, logged: list[dict[str, object]]
) -> None:
    files, watch, installed = _watch(ca, tmp_path)
    files.write(["other.example", "*.other.example"])
    watch.check()
    assert len(installed) == 1
    assert "does not cover" in _errors(logged)[0]
    watch.stopService()


def test_watch_waits_while_a_file_is_missing(ca: TestCA, tmp_path: Path) -> None:
    files, watch, installed = _watch(ca, tmp_path)
    files.key.unlink()
    watch.check()
    assert len(installed) == 1
    files.write(NAMES)
    watch.check()
    assert len(installed) == 2
    watch.stopService()


def test_sighup_rereads_at_once_and_skips_an_unchanged_pair(ca: TestCA, tmp_path: Path) -> None:
    files, watch, installed = _watch(ca, tmp_path)
    watch.reload()
    assert len(installed) == 1  # same pair: not installed again
    files.write(NAMES)
    watch.reload()
    assert len(installed) == 2
    watch.stopService()


def test_watch_checks_on_its_interval(ca: TestCA, tmp_path: Path) -> None:
    files, watch, installed = _watch(ca, tmp_path)
    clock = watch.reactor
    files.write(NAMES)
    clock.advance(watch.interval - 0.1)
    assert len(installed) == 1
    clock.advance(0.2)
    assert len(installed) == 2
    watch.stopService()
    files.write(NAMES)
    clock.advance(watch.interval * 2)
    assert len(installed) == 2
