"""
A real ACME server on loopback for the end-to-end tests: Let's Encrypt's ``pebble`` and its
``pebble-challtestsrv`` (the DNS server pebble asks when it validates a DNS-01 challenge, with
an HTTP API to set and clear TXT records).

`AcmeWorld.start` makes pebble's own listener certificate (a throw-away CA, with
`cryptography`), starts both servers on free 127.0.0.1 ports and returns once pebble's
directory answers. `hook` writes a DNS hook script for ``--acme-dns-hook`` that sets and
clears the TXT record through challtestsrv. Tests that need pebble skip when it is not
installed (``make deps`` installs Debian's ``pebble`` package).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import shutil
import ssl
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.e2e.harness import LOOPBACK, Proc, ProcGroup, clean_env, free_port, wait_for

__all__ = ["AcmeWorld", "require_pebble"]


def require_pebble() -> tuple[str, str]:
    """The paths of ``pebble`` and ``pebble-challtestsrv``, or skip the test."""
    pebble = shutil.which("pebble")
    challtestsrv = shutil.which("pebble-challtestsrv")
    if pebble is None or challtestsrv is None:
        pytest.skip("pebble / pebble-challtestsrv are not installed (run `make deps`)")
    return pebble, challtestsrv


def _listener_certificate(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a certificate for 127.0.0.1 / localhost signed by it: (ca, cert, key)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pebble listener test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.IPv4Address(LOOPBACK))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "listener-ca.pem", directory / "listener.pem", directory / "listener.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


#: The DNS hook the relay runs (``HOOK set|clear NAME VALUE``), talking to challtestsrv's
#: management API. With ``--wrong`` it publishes a value that is not the one asked for (so
#: that pebble rejects the challenge); with ``--fail`` it exits 3 without doing anything.
_HOOK = """\
import json, sys, urllib.request
argv = sys.argv[1:]
mode = argv.pop(0) if argv and argv[0].startswith("--") else ""
api, action, name, value = argv
if mode == "--fail":
    print("dns hook: the provider refused the update (test)", file=sys.stderr)
    sys.exit(3)
if mode == "--wrong" and action == "set":
    value = "not-the-right-value"
path = "/set-txt" if action == "set" else "/clear-txt"
body = {"host": name, "value": value} if action == "set" else {"host": name}
req = urllib.request.Request(api + path, data=json.dumps(body).encode(), method="POST")
urllib.request.urlopen(req, timeout=10).read()
"""


@dataclass
class AcmeWorld:
    """pebble and challtestsrv, started by `start` in a test's `ProcGroup`."""

    dir: Path
    pebble: Proc
    challtestsrv: Proc
    #: ``https://127.0.0.1:PORT/dir``, for ``--acme``.
    directory: str
    #: The CA of pebble's listener certificate, for ``--acme-ca``.
    listener_ca: Path
    management_port: int
    challtestsrv_api: str

    @classmethod
    def start(cls, group: ProcGroup, directory: Path) -> AcmeWorld:
        pebble_bin, challtestsrv_bin = require_pebble()
        directory.mkdir(parents=True, exist_ok=True)
        ca, cert, key = _listener_certificate(directory)
        dns_port, api_port = free_port(), free_port()
        challtestsrv = group.start(
            "challtestsrv",
            [
                challtestsrv_bin,
                *("-dns01", f"{LOOPBACK}:{dns_port}"),
                *("-management", f"{LOOPBACK}:{api_port}"),
                *("-http01", ""),
                *("-https01", ""),
                *("-tlsalpn01", ""),
                *("-defaultIPv4", LOOPBACK),
                *("-defaultIPv6", ""),
            ],
        )
        acme_port, management_port = free_port(), free_port()
        config = directory / "pebble-config.json"
        config.write_text(
            json.dumps(
                {
                    "pebble": {
                        "listenAddress": f"{LOOPBACK}:{acme_port}",
                        "managementListenAddress": f"{LOOPBACK}:{management_port}",
                        "certificate": str(cert),
                        "privateKey": str(key),
                        # Unused by DNS-01; ports that nothing listens on.
                        "httpPort": free_port(),
                        "tlsPort": free_port(),
                        "ocspResponderURL": "",
                        "externalAccountBindingRequired": False,
                    }
                }
            )
        )
        pebble = Proc(
            [pebble_bin, "-config", str(config), "-dnsserver", f"{LOOPBACK}:{dns_port}"],
            group.dir / f"{group.next_id():02d}-pebble.log",
            # No artificial validation delays; every order asks for fresh authorizations,
            # so that every issuance runs the DNS hook.
            env=clean_env({"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_AUTHZREUSE": "0"}),
            cwd=group.dir,
        )
        group.procs.append(pebble)
        world = cls(
            dir=directory,
            pebble=pebble,
            challtestsrv=challtestsrv,
            directory=f"https://{LOOPBACK}:{acme_port}/dir",
            listener_ca=ca,
            management_port=management_port,
            challtestsrv_api=f"http://{LOOPBACK}:{api_port}",
        )
        pebble.wait(world._answers, "pebble's directory to answer")
        challtestsrv.wait(world._api_answers, "challtestsrv's API to answer")
        return world

    def _context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.listener_ca))

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.directory, timeout=2, context=self._context()) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def _api_answers(self) -> bool:
        req = urllib.request.Request(
            self.challtestsrv_api + "/clear-txt",
            data=json.dumps({"host": "probe.invalid."}).encode(),
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def root(self) -> Path:
        """pebble's issuing root (from its management API, ``/roots/0``), as a PEM file."""
        url = f"https://{LOOPBACK}:{self.management_port}/roots/0"

        def fetch() -> bytes | None:
            try:
                with urllib.request.urlopen(url, timeout=5, context=self._context()) as r:
                    return bytes(r.read())
            except OSError:
                return None

        path = self.dir / "pebble-root.pem"
        path.write_bytes(wait_for(fetch, "pebble's root (/roots/0)"))
        return path

    def hook(self, mode: str = "") -> str:
        """A ``--acme-dns-hook`` command; `mode` ``--wrong`` or ``--fail`` (see `_HOOK`)."""
        script = self.dir / "dns-hook.py"
        if not script.exists():
            script.write_text(_HOOK)
        parts = [sys.executable, str(script), *([mode] if mode else []), self.challtestsrv_api]
        return " ".join(parts)

    def relay_options(self, hook_mode: str = "") -> list[str]:
        """The relay's ACME options for this pebble."""
        return [
            *("--acme", self.directory),
            *("--acme-email", "ops@example.com"),
            *("--acme-dns-hook", self.hook(hook_mode)),
            *("--acme-ca", str(self.listener_ca)),
        ]
