"""Tests for tunnel.relay._certs: the development CA and wildcard certificate."""

from __future__ import annotations

import datetime
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.verification import PolicyBuilder, Store
from OpenSSL import SSL, crypto
from service_identity import VerificationError
from service_identity.cryptography import verify_certificate_hostname
from twisted.python.filepath import FilePath

from tunnel.relay import _certs
from tunnel.relay._certs import DevCertificates, ensure_dev_certificates

DOMAIN = "tunnel.localhost"


def _chain(path: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(Path(path).read_bytes())


def _verify(certs: DevCertificates, hostname: str) -> None:
    """Verify the chain as a TLS client would (cryptography's X.509 path validation)."""
    ca = x509.load_pem_x509_certificate(Path(certs.ca_path).read_bytes())
    leaf, *intermediates = _chain(certs.cert_path)
    verifier = (
        PolicyBuilder()
        .store(Store([ca]))
        .time(datetime.datetime.now(datetime.UTC))
        .build_server_verifier(x509.DNSName(hostname))
    )
    verifier.verify(leaf, intermediates)


def test_creates_ca_and_wildcard_leaf(tmp_path: Path) -> None:
    certs = ensure_dev_certificates(str(tmp_path / "state"), DOMAIN)
    assert certs.created
    for p in (certs.ca_path, certs.cert_path, certs.key_path):
        assert Path(p).is_file()
    assert stat.S_IMODE(os.stat(certs.key_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "state" / "ca-key.pem").st_mode) == 0o600

    leaf, ca_in_chain = _chain(certs.cert_path)
    ca = x509.load_pem_x509_certificate(Path(certs.ca_path).read_bytes())
    assert ca_in_chain == ca
    cn = ca.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    assert [a.value for a in cn] == ["Tunnels development CA"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {DOMAIN, "*." + DOMAIN, "localhost"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert datetime.timedelta(days=360) < lifetime < datetime.timedelta(days=370)
    ca_life = ca.not_valid_after_utc - ca.not_valid_before_utc
    assert ca_life > datetime.timedelta(days=3600)

    key = serialization.load_pem_private_key(Path(certs.key_path).read_bytes(), None)
    assert key.public_key() == leaf.public_key()


@pytest.mark.parametrize("hostname", [DOMAIN, "k3j5h2g7d9q1xwzp." + DOMAIN, "a." + DOMAIN])
def test_chain_verifies_for_covered_names(tmp_path: Path, hostname: str) -> None:
    certs = ensure_dev_certificates(FilePath(str(tmp_path)), DOMAIN)
    _verify(certs, hostname)
    leaf = _chain(certs.cert_path)[0]
    verify_certificate_hostname(leaf, hostname)


@pytest.mark.parametrize("hostname", ["a.b." + DOMAIN, "example.com", "tunnel.localhost.evil"])
def test_names_not_covered(tmp_path: Path, hostname: str) -> None:
    certs = ensure_dev_certificates(str(tmp_path), DOMAIN)
    leaf = _chain(certs.cert_path)[0]
    with pytest.raises(VerificationError):
        verify_certificate_hostname(leaf, hostname)


def test_reuses_existing(tmp_path: Path) -> None:
    first = ensure_dev_certificates(str(tmp_path), DOMAIN)
    before = {p: Path(p).read_bytes() for p in (first.ca_path, first.cert_path, first.key_path)}
    second = ensure_dev_certificates(str(tmp_path), DOMAIN.upper() + ".")
    assert not second.created
    assert (second.ca_path, second.cert_path, second.key_path) == (
        first.ca_path,
        first.cert_path,
        first.key_path,
    )
    after = {p: Path(p).read_bytes() for p in before}
    assert before == after


def test_new_domain_reissues_leaf_with_same_ca(tmp_path: Path) -> None:
    first = ensure_dev_certificates(str(tmp_path), DOMAIN)
    ca_before = Path(first.ca_path).read_bytes()
    second = ensure_dev_certificates(str(tmp_path), "example.test")
    assert second.created
    assert Path(second.ca_path).read_bytes() == ca_before
    _verify(second, "x.example.test")


def test_expiring_leaf_is_renewed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_certs, "LEAF_VALIDITY", datetime.timedelta(days=3))
    first = ensure_dev_certificates(str(tmp_path), DOMAIN)
    leaf_before = Path(first.cert_path).read_bytes()
    monkeypatch.setattr(_certs, "LEAF_VALIDITY", datetime.timedelta(days=365))
    second = ensure_dev_certificates(str(tmp_path), DOMAIN)
    assert second.created
    assert Path(second.cert_path).read_bytes() != leaf_before
    leaf = _chain(second.cert_path)[0]
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc > datetime.timedelta(days=300)


def test_mismatched_key_is_replaced(tmp_path: Path) -> None:
    first = ensure_dev_certificates(str(tmp_path), DOMAIN)
    shutil.copy(tmp_path / "ca-key.pem", first.key_path)  # wrong key for the leaf
    second = ensure_dev_certificates(str(tmp_path), DOMAIN)
    assert second.created
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.use_certificate_chain_file(second.cert_path)
    ctx.use_privatekey_file(second.key_path)
    ctx.check_privatekey()


def test_idn_domain(tmp_path: Path) -> None:
    certs = ensure_dev_certificates(str(tmp_path), "bücher.test")
    leaf = _chain(certs.cert_path)[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "xn--bcher-kva.test" in san.get_values_for_type(x509.DNSName)


def test_empty_domain_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        ensure_dev_certificates(str(tmp_path), " . ")


def test_pyopenssl_loads_chain(tmp_path: Path) -> None:
    certs = ensure_dev_certificates(str(tmp_path), DOMAIN)
    store = crypto.X509Store()
    store.add_cert(crypto.load_certificate(crypto.FILETYPE_PEM, Path(certs.ca_path).read_bytes()))
    leaf = crypto.load_certificate(crypto.FILETYPE_PEM, Path(certs.cert_path).read_bytes())
    crypto.X509StoreContext(store, leaf).verify_certificate()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
def test_openssl_verify(tmp_path: Path) -> None:
    certs = ensure_dev_certificates(str(tmp_path), DOMAIN)
    leaf = tmp_path / "leaf.pem"
    leaf.write_bytes(_chain(certs.cert_path)[0].public_bytes(serialization.Encoding.PEM))
    result = subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            certs.ca_path,
            "-verify_hostname",
            "abc." + DOMAIN,
            "-purpose",
            "sslserver",
            str(leaf),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert ": OK" in result.stdout
