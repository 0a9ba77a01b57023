"""
The relay's ACME schedule (`AcmeService`, `RenewalPolicy`) on a fake clock with a fake ACME
client, the DNS hook runner, and the log lines of failures (`describe_error`).
"""

from __future__ import annotations

import datetime
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from acme import challenges, messages
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from tests.servercerts import TestCA
from tunnel.relay._acme import (
    BAD_NONCE_RETRIES,
    RETRY_INITIAL,
    AcmeError,
    AcmeService,
    AcmeStore,
    DNSHook,
    PatientNetwork,
    RenewalPolicy,
    _directory_slug,
    describe_error,
)
from tunnel.relay._certificate import CertificatePair

DOMAIN = "tunnel.example"
DIRECTORY = "https://acme.test/dir"
DAY = 86400.0


class FakeCA:
    """Signs each CSR the service sends (when told to), for `validity` seconds from now."""

    def __init__(self, clock: Clock, validity: float = 90 * DAY) -> None:
        self.clock = clock
        self.ca = TestCA("Fake ACME CA")
        self.validity = validity
        self.pending: list[tuple[bytes, defer.Deferred[str]]] = []
        self.names: list[str] | None = None  # names to issue for (default: the CSR's)

    def issue(self, csr_pem: bytes) -> defer.Deferred[str]:
        d: defer.Deferred[str] = defer.Deferred()
        self.pending.append((csr_pem, d))
        return d

    def answer(self) -> x509.Certificate:
        csr_pem, d = self.pending.pop(0)
        csr = x509.load_pem_x509_csr(csr_pem)
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = self.names or san.get_values_for_type(x509.DNSName)
        now = datetime.datetime.fromtimestamp(self.clock.seconds(), datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(self.ca.cert.subject)
            .issuer_name(self.ca.cert.subject)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(seconds=self.validity))
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
            )
            .sign(self.ca.key, hashes.SHA256())
        )
        pem = cert.public_bytes(serialization.Encoding.PEM) + self.ca.pem()
        d.callback(pem.decode())
        return cert

    def fail(self, error: Exception) -> None:
        _, d = self.pending.pop(0)
        d.errback(error)


@pytest.fixture
def logged() -> Iterator[list[dict[str, object]]]:
    events: list[dict[str, object]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def errors_in(events: list[dict[str, object]]) -> list[str]:
    return [formatEvent(e) for e in events if e.get("log_level") == LogLevel.error]


class World:
    def __init__(self, tmp_path: Path, policy: RenewalPolicy | None = None) -> None:
        self.clock = Clock()
        self.clock.advance(datetime.datetime.now(datetime.UTC).timestamp())
        self.ca = FakeCA(self.clock)
        self.store = AcmeStore(str(tmp_path), DIRECTORY)
        self.installed: list[CertificatePair] = []
        self.policy = policy or RenewalPolicy(check_interval=12 * 3600)
        self.service = self.new_service()

    def new_service(self) -> AcmeService:
        return AcmeService(
            self.clock,
            DOMAIN,
            self.store,
            self.ca.issue,
            self.installed.append,
            self.policy,
            rand=lambda: 0.5,
        )

    def run(self, seconds: float = 0) -> None:
        self.clock.advance(seconds)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.service.stopService()


# -- the policy --------------------------------------------------------------------------------


def test_renewal_is_due_with_a_third_of_the_validity_left(world: World) -> None:
    world.service.startService()
    world.run()
    cert = world.ca.answer()
    pair = world.installed[0]
    start = cert.not_valid_before_utc.timestamp()
    policy = RenewalPolicy()
    assert policy.renew_at(pair) == pytest.approx(start + 60 * DAY)
    assert not policy.due(pair, start + 59 * DAY)
    assert policy.due(pair, start + 60 * DAY)
    assert policy.due(None, 0)
    assert RenewalPolicy(renew_before=7 * DAY).renew_at(pair) == pytest.approx(start + 83 * DAY)


def test_retries_back_off_with_jitter_up_to_a_ceiling() -> None:
    policy = RenewalPolicy(check_interval=12 * 3600)
    delays = [policy.retry_delay(n, 0.999999) for n in range(1, 12)]
    assert delays[0] == pytest.approx(RETRY_INITIAL, rel=1e-3)
    assert delays[1] == pytest.approx(2 * RETRY_INITIAL, rel=1e-3)
    assert max(delays) == pytest.approx(3600, rel=1e-3)
    assert policy.retry_delay(1, 0.0) == pytest.approx(RETRY_INITIAL / 2)
    # A short check interval bounds the retries too (how the tests run the relay).
    assert RenewalPolicy(check_interval=2).retry_delay(5, 0.999999) == pytest.approx(2, rel=1e-3)


# -- the service ---------------------------------------------------------------------------------


def test_first_certificate_is_requested_at_start_and_kept(world: World) -> None:
    world.service.startService()
    assert world.ca.pending == []  # not before the reactor runs
    world.run()
    assert len(world.ca.pending) == 1
    assert world.installed == []  # nothing until it is issued
    cert = world.ca.answer()
    assert [p.leaf for p in world.installed] == [cert]
    assert world.installed[0].names == [DOMAIN, "*." + DOMAIN]
    key = Path(world.store.key_path)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert x509.load_pem_x509_certificates(Path(world.store.cert_path).read_bytes())[0] == cert
    # Not due: the next checks ask for nothing.
    world.run(world.policy.check_interval)
    world.run(world.policy.check_interval)
    assert world.ca.pending == []


def test_a_kept_certificate_is_served_at_start_without_an_order(world: World) -> None:
    world.service.startService()
    world.run()
    cert = world.ca.answer()
    world.service.stopService()
    again = world.new_service()
    world.service = again
    again.startService()
    assert [p.leaf for p in world.installed] == [cert, cert]
    world.run()
    assert world.ca.pending == []


def test_an_issued_certificate_for_another_domain_is_refused_and_retried(
    world: World, logged: list[dict[str, object]]
) -> None:
    world.ca.names = ["other.example", "*.other.example"]
    world.service.startService()
    world.run()
    world.ca.answer()  # refused: does not cover the domain
    assert world.installed == []
    assert "not usable" in errors_in(logged)[0] and "does not cover" in errors_in(logged)[0]
    world.ca.names = None
    world.run(60)
    world.ca.answer()
    assert len(world.installed) == 1


def test_a_failure_is_logged_and_retried_with_backoff(
    world: World, logged: list[dict[str, object]]
) -> None:
    world.service.startService()
    world.run()
    world.ca.fail(AcmeError("the DNS hook `hook set _acme-challenge.x. …` exited with status 3"))
    errors = errors_in(logged)
    assert len(errors) == 1
    assert "attempt 1" in errors[0] and "exited with status 3" in errors[0]
    assert "retrying in 45s" in errors[0]  # 60 s x jitter 0.75
    assert "no certificate in service yet" in errors[0]
    world.run(44)
    assert world.ca.pending == []
    world.run(1)
    assert len(world.ca.pending) == 1
    world.ca.fail(AcmeError("again"))
    assert "attempt 2" in errors_in(logged)[1] and "retrying in 90s" in errors_in(logged)[1]
    world.run(90)
    world.ca.answer()
    assert len(world.installed) == 1
    assert world.service.failures == 0


def test_renewal_replaces_the_certificate_when_due(world: World) -> None:
    world.service.startService()
    world.run()
    first = world.ca.answer()
    world.run(59 * DAY)  # checks along the way find nothing due
    assert world.ca.pending == []
    world.run(1 * DAY)
    assert len(world.ca.pending) == 1
    second = world.ca.answer()
    assert [p.leaf for p in world.installed] == [first, second]
    assert first.serial_number != second.serial_number


def test_a_failed_renewal_keeps_the_working_certificate(
    world: World, logged: list[dict[str, object]]
) -> None:
    world.service.startService()
    world.run()
    world.ca.answer()
    kept = world.installed[0]
    world.run(60 * DAY)
    world.ca.fail(requests.exceptions.ConnectionError("refused"))
    assert world.service.pair is kept and len(world.installed) == 1
    error = errors_in(logged)[0]
    assert "still serving the certificate that expires" in error
    world.run(60)
    world.ca.answer()
    assert len(world.installed) == 2


def test_sighup_checks_now_but_renews_only_when_due(world: World) -> None:
    world.service.startService()
    world.run()
    world.service.reload()  # busy: ignored
    assert len(world.ca.pending) == 1
    world.ca.answer()
    world.service.reload()
    world.run()
    assert world.ca.pending == []  # not due


def test_sighup_brings_a_pending_retry_forward(world: World) -> None:
    world.service.startService()
    world.run()
    world.ca.fail(AcmeError("no"))
    world.service.reload()
    world.run()
    assert len(world.ca.pending) == 1


def test_a_threshold_past_the_validity_renews_on_every_check(tmp_path: Path) -> None:
    w = World(tmp_path, RenewalPolicy(renew_before=1000 * DAY, check_interval=5))
    w.service.startService()
    w.run()
    w.ca.answer()
    w.run(4.9)
    assert w.ca.pending == []
    w.run(0.1)
    w.ca.answer()
    assert len(w.installed) == 2
    w.service.stopService()


def test_stop_cancels_the_next_check(world: World) -> None:
    world.service.startService()
    world.run()
    world.ca.answer()
    world.service.stopService()
    assert world.clock.getDelayedCalls() == []


def test_a_result_after_stop_is_not_scheduled_again(world: World) -> None:
    world.service.startService()
    world.run()
    world.service.stopService()
    world.ca.answer()
    assert world.clock.getDelayedCalls() == []


# -- the store ------------------------------------------------------------------------------------


def test_each_directory_has_its_own_account_and_certificate(tmp_path: Path) -> None:
    staging = AcmeStore(str(tmp_path), "https://acme-staging-v02.api.letsencrypt.org/directory")
    production = AcmeStore(str(tmp_path), "https://acme-v02.api.letsencrypt.org/directory")
    assert staging.dir != production.dir
    assert staging.dir.basename() == "acme-staging-v02.api.letsencrypt.org_directory"
    key = staging.account_key()
    assert staging.account_key().private_numbers() == key.private_numbers()
    assert stat.S_IMODE(os.stat(staging.dir.child("account-key.pem").path).st_mode) == 0o600
    assert staging.account_uri() is None
    staging.save_account("https://acme.test/acct/1")
    assert staging.account_uri() == "https://acme.test/acct/1"
    staging.forget_account()
    assert staging.account_uri() is None
    assert _directory_slug("https://127.0.0.1:14000/dir") == "127.0.0.1_14000_dir"


# -- the DNS hook and the log lines ------------------------------------------------------------


def test_a_hook_that_fails_says_how(tmp_path: Path) -> None:
    hook = tmp_path / "hook.py"
    hook.write_text(
        "import sys\nprint('zone example: permission denied', file=sys.stderr)\nsys.exit(3)\n"
    )
    with pytest.raises(AcmeError, match="exited with status 3: zone example: permission denied"):
        DNSHook(f"{sys.executable} {hook}").run("set", "_acme-challenge.x.", "v")
    with pytest.raises(AcmeError, match="cannot be run"):
        DNSHook(str(tmp_path / "missing")).run("set", "_acme-challenge.x.", "v")
    slow = tmp_path / "slow.py"
    slow.write_text("import time\ntime.sleep(30)\n")
    with pytest.raises(AcmeError, match="took more than"):
        DNSHook(f"{sys.executable} {slow}", timeout=0.2).run("set", "n.", "v")


def test_a_hook_gets_its_arguments_without_a_shell(tmp_path: Path) -> None:
    out = tmp_path / "args"
    hook = tmp_path / "hook.py"
    hook.write_text(f"import sys\nopen({str(out)!r}, 'w').write(repr(sys.argv[1:]))\n")
    DNSHook(f"{sys.executable} {hook} --zone 'my zone'").run("set", "_acme-challenge.x.", "v$1")
    assert out.read_text() == repr(["--zone", "my zone", "set", "_acme-challenge.x.", "v$1"])


def test_failures_are_described_in_one_line() -> None:
    limited = messages.Error(
        typ="urn:ietf:params:acme:error:rateLimited", detail="too many certificates"
    )
    assert describe_error(limited) == (
        "rate limited by the ACME server (rateLimited): too many certificates"
    )
    down = requests.exceptions.ConnectionError("refused")
    assert "does not answer" in describe_error(down, DIRECTORY) and DIRECTORY in describe_error(
        down, DIRECTORY
    )
    authz = messages.AuthorizationResource(
        uri="https://acme.test/authz/1",
        body=messages.Authorization(
            identifier=messages.Identifier(typ=messages.IDENTIFIER_FQDN, value=DOMAIN),
            challenges=[
                messages.ChallengeBody(
                    chall=challenges.DNS01(token=b"t" * 16),
                    uri="https://acme.test/chall/1",
                    status=messages.STATUS_INVALID,
                    error=messages.Error(
                        typ="urn:ietf:params:acme:error:unauthorized",
                        detail="Incorrect TXT record found",
                    ),
                )
            ],
        ),
    )
    from acme import errors

    text = describe_error(errors.ValidationError([authz]))
    assert text == (
        "the ACME server rejected the DNS-01 challenge: tunnel.example: Incorrect TXT record found"
    )


class _Refusing(PatientNetwork):
    """A network whose first `refusals` posts are refused with `code`."""

    def __init__(self, refusals: int, code: str = "badNonce") -> None:
        self.refusals = refusals
        self.code = code
        self.posts = 0

    def _post_once(self, *args: object, **kwargs: object) -> requests.Response:
        self.posts += 1
        if self.posts <= self.refusals:
            raise messages.Error.with_code(self.code, detail="refused")
        response = requests.Response()
        response.status_code = 200
        return response


def test_a_refused_nonce_is_retried_several_times() -> None:
    # The library alone retries once: two refusals in a row would fail the order.
    net = _Refusing(BAD_NONCE_RETRIES)
    assert net.post("https://acme.test/order", None).status_code == 200
    assert net.posts == BAD_NONCE_RETRIES + 1


def test_refused_nonces_end_after_the_retries() -> None:
    net = _Refusing(BAD_NONCE_RETRIES + 1)
    with pytest.raises(messages.Error) as refused:
        net.post("https://acme.test/order", None)
    assert refused.value.code == "badNonce" and net.posts == BAD_NONCE_RETRIES + 1


def test_other_errors_are_not_retried() -> None:
    net = _Refusing(1, code="unauthorized")
    with pytest.raises(messages.Error):
        net.post("https://acme.test/order", None)
    assert net.posts == 1
