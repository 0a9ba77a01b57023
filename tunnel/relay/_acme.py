"""
ACME, built in: the relay obtains and renews its own ``<domain>`` + ``*.<domain>``
certificate with the DNS-01 challenge (``twistd tunnelrelay --acme DIRECTORY_URL
--acme-dns-hook CMD``).

Three layers, each usable alone:

- `DNSHook`: the operator's command, run as ``CMD set NAME VALUE`` and ``CMD clear NAME
  VALUE`` (``NAME`` the ``_acme-challenge.<domain>.`` record; it may hold two values at
  once, for ``<domain>`` and for ``*.<domain>``).  Blocking.
- `AcmeIssuer`: one ACME account (its key kept in the state directory) at one directory, and
  `AcmeIssuer.issue` -- a CSR in, the issued chain out, every name of the CSR validated
  through the hook.  The protocol (JWS, nonces, orders, polling) is certbot's ``acme``
  library.  Blocking: run it with `issue_in_thread`, never on the reactor thread.  This is
  also what obtaining a certificate for an agent's own CSR takes: one call,
  ``issue_in_thread(reactor, issuer, csr_pem, allowed=names)``.
- `AcmeService`: the schedule.  At start it serves the certificate kept from last time (if
  it is still good), checks at once and then every ``check_interval`` whether renewal is due
  (a third of the validity left, or ``renew_before`` seconds), and retries failures with a
  jittered exponential backoff.  A failed attempt logs why and changes nothing else: the
  certificate in service (if any) stays in service.  The decisions are `RenewalPolicy`, pure
  arithmetic on a clock, tested with a fake clock and a fake issuer.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import re
import shlex
import subprocess
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import requests
from acme import challenges, client, crypto_util, errors, messages
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from josepy.jwa import ES256
from josepy.jwk import JWKEC
from twisted.application import service
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

from tunnel.relay._certificate import (
    CertificatePair,
    CertificateRefused,
    check_pair,
    parse_pair,
    required_names,
)
from tunnel.relay._certs import _atomic_write

__all__ = [
    "AcmeCSRIssuer",
    "AcmeError",
    "AcmeIssuer",
    "AcmeService",
    "AcmeStore",
    "DNSHook",
    "RenewalPolicy",
    "describe_error",
    "issue_in_thread",
    "new_key_and_csr",
]

_log = Logger()

HOOK_TIMEOUT = 300.0
"""Seconds the DNS hook may take (it may wait for the record to propagate)."""
ORDER_TIMEOUT = 180.0
"""Seconds from answering the challenges until the certificate must be issued."""
NETWORK_TIMEOUT = 30
"""Seconds each HTTP request to the ACME server may take."""
CHECK_INTERVAL = 12 * 3600.0
"""Default seconds between renewal checks (certbot's twice a day)."""
RETRY_INITIAL = 60.0
"""Seconds before the first retry of a failed attempt (doubling after each failure)."""
RETRY_MAX = 3600.0
"""Most seconds between retries (ACME CAs limit failed validations per hour)."""


class AcmeError(Exception):
    """An attempt to obtain a certificate failed; the message says why, for the log."""


# -- the DNS hook ------------------------------------------------------------------------------


class DNSHook:
    """
    The operator's DNS command: ``argv + ["set"|"clear", NAME, VALUE]``, no shell.

    ``set`` must publish the TXT value (adding to any already there: ``<domain>`` and
    ``*.<domain>`` have the same record name and two values) and return once it is visible
    to the world; ``clear`` removes that one value.  Exit status 0 is success.
    """

    def __init__(self, command: str, timeout: float = HOOK_TIMEOUT) -> None:
        self.argv = shlex.split(command)
        if not self.argv:
            raise ValueError("the DNS hook command is empty")
        self.timeout = timeout

    def run(self, action: str, name: str, value: str) -> None:
        """
        Run the hook (blocking).

        @raise AcmeError: it cannot be started, exits non-zero, or takes too long.
        """
        argv = [*self.argv, action, name, value]
        shown = f"`{shlex.join(self.argv)} {action} {name} …`"
        try:
            done = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=self.timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise AcmeError(f"the DNS hook {shown} took more than {self.timeout:g}s") from None
        except OSError as e:
            raise AcmeError(f"the DNS hook {shown} cannot be run: {e.strerror}") from None
        if done.returncode != 0:
            said = (done.stderr or done.stdout).decode("utf-8", "replace").strip()
            said = said.splitlines()[-1][:300] if said else "no output"
            raise AcmeError(f"the DNS hook {shown} exited with status {done.returncode}: {said}")


# -- the ACME client -------------------------------------------------------------------------


def _directory_slug(url: str) -> str:
    """A directory name for an ACME directory URL (its host and path, filename-safe)."""
    parts = urllib.parse.urlsplit(url)
    text = f"{parts.hostname or 'acme'}{('_' + str(parts.port)) if parts.port else ''}"
    text += parts.path.replace("/", "_")
    return re.sub(r"[^A-Za-z0-9._-]", "_", text).strip("_.") or "acme"


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class AcmeStore:
    """
    What the relay keeps of one ACME directory, in ``<state-dir>/acme/<directory>/``:
    ``account-key.pem`` (the account's key, mode 0600), ``account.json`` (the account's URL
    at the CA), ``fullchain.pem`` and ``privkey.pem`` (the certificate in service, and its
    key, mode 0600).  Another directory (staging, then production) gets its own account and
    certificate.  Blocking file I/O, a few small files.
    """

    def __init__(self, state_dir: str, directory_url: str) -> None:
        self.directory_url = directory_url
        self.dir = FilePath(state_dir).child("acme").child(_directory_slug(directory_url))

    def _ensure(self) -> None:
        self.dir.makedirs(ignoreExistingDirectory=True)
        os.chmod(self.dir.path, 0o700)

    def account_key(self) -> ec.EllipticCurvePrivateKey:
        """The account's key, created (EC P-256) on first use."""
        path = self.dir.child("account-key.pem")
        try:
            key = serialization.load_pem_private_key(path.getContent(), password=None)
        except FileNotFoundError:
            key = None
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key
        if key is not None:
            raise AcmeError(f"{path.path} is not an EC private key")
        self._ensure()
        new = ec.generate_private_key(ec.SECP256R1())
        _atomic_write(path, _key_pem(new), 0o600)
        return new

    def account_uri(self) -> str | None:
        """The account's URL at the CA, once registered."""
        try:
            doc = json.loads(self.dir.child("account.json").getContent())
        except (OSError, ValueError):
            return None
        uri = doc.get("uri") if isinstance(doc, dict) else None
        ok = isinstance(uri, str) and doc.get("directory") == self.directory_url
        return uri if ok else None

    def forget_account(self) -> None:
        """The CA no longer knows the account: register again next time (same key)."""
        try:
            self.dir.child("account.json").remove()
        except OSError:
            pass

    def save_account(self, uri: str) -> None:
        self._ensure()
        doc = {"directory": self.directory_url, "uri": uri}
        _atomic_write(self.dir.child("account.json"), json.dumps(doc).encode() + b"\n", 0o644)

    @property
    def cert_path(self) -> str:
        return self.dir.child("fullchain.pem").path

    @property
    def key_path(self) -> str:
        return self.dir.child("privkey.pem").path

    def save_certificate(self, fullchain_pem: bytes, key_pem: bytes) -> None:
        """Keep the pair (the key first: a chain without its key on disk is useless)."""
        self._ensure()
        _atomic_write(self.dir.child("privkey.pem"), key_pem, 0o600)
        _atomic_write(self.dir.child("fullchain.pem"), fullchain_pem, 0o644)


#: Times a request refused with ``badNonce`` is sent again, each time with the fresh nonce
#: that came with the refusal (RFC 8555, 6.5: the client should retry). The ACME library
#: retries once; CAs may refuse a few nonces in a row (pebble refuses 5 % of them).
BAD_NONCE_RETRIES = 5


class PatientNetwork(client.ClientNetwork):
    """`acme.client.ClientNetwork` that retries a ``badNonce`` refusal `BAD_NONCE_RETRIES`
    times, not once."""

    def post(self, *args: Any, **kwargs: Any) -> requests.Response:
        for _ in range(BAD_NONCE_RETRIES):
            try:
                return self._post_once(*args, **kwargs)
            except messages.Error as error:
                if error.code != "badNonce":
                    raise
                _log.debug("ACME: a nonce was refused; sending again with the fresh one")
        return self._post_once(*args, **kwargs)


class AcmeIssuer:
    """
    One ACME account at `directory_url`, obtaining certificates through DNS-01 with `hook`.

    `issue` is blocking and serialised (one order at a time per issuer, so that the
    account's nonces are never shared between threads).  `ca_bundle` is the CA file to
    trust for the ACME server's own HTTPS (None: the system's).
    """

    def __init__(
        self,
        store: AcmeStore,
        hook: DNSHook,
        email: str | None = None,
        ca_bundle: str | None = None,
        order_timeout: float = ORDER_TIMEOUT,
    ) -> None:
        self.store = store
        self.hook = hook
        self.email = email
        self.ca_bundle = ca_bundle
        self.order_timeout = order_timeout
        self._client: client.ClientV2 | None = None
        self._lock = threading.Lock()

    @property
    def directory_url(self) -> str:
        return self.store.directory_url

    def _connect(self) -> client.ClientV2:
        """The directory, and the account (registered on first use, then remembered)."""
        if self._client is not None:
            return self._client
        jwk = JWKEC(key=self.store.account_key())
        net = PatientNetwork(
            jwk,
            alg=ES256,
            # requests takes a CA file where the annotation says bool.
            verify_ssl=self.ca_bundle or True,  # type: ignore[arg-type]
            user_agent="tunnels-relay (acme-python)",
            timeout=NETWORK_TIMEOUT,
        )
        directory = client.ClientV2.get_directory(self.directory_url, net)
        acme = client.ClientV2(directory, net)
        uri = self.store.account_uri()
        if uri is None:
            registration = messages.NewRegistration.from_data(
                email=self.email, terms_of_service_agreed=True
            )
            try:
                regr = acme.new_account(registration)
                uri = regr.uri
                _log.info("ACME: registered account {uri}", uri=uri)
            except errors.ConflictError as e:
                # The key already has an account there (account.json was lost): use it.
                uri = e.location
            self.store.save_account(uri)
        net.account = messages.RegistrationResource(uri=uri, body=messages.Registration())
        self._client = acme
        return acme

    def issue(self, csr_pem: bytes, allowed: Collection[str] | None = None) -> str:
        """
        Obtain a certificate for the names of `csr_pem` (PEM), proving control of each with
        a DNS-01 TXT record set (and then cleared) through the hook.  Returns the chain
        (PEM, leaf first).  With `allowed`, every name of the CSR must be one of those.

        Blocking; raises `AcmeError` (whose message is fit for the log) on every failure.
        """
        with self._lock:
            try:
                return self._issue(csr_pem, allowed)
            except BaseException as e:
                # Connect afresh next time: a new directory, new nonces.
                self._client = None
                if isinstance(e, messages.Error) and e.code == "accountDoesNotExist":
                    self.store.forget_account()
                if isinstance(e, AcmeError) or not isinstance(e, Exception):
                    raise
                raise AcmeError(describe_error(e, self.directory_url)) from e

    def _issue(self, csr_pem: bytes, allowed: Collection[str] | None) -> str:
        if allowed is not None:
            csr = x509.load_pem_x509_csr(csr_pem)
            names, ips = crypto_util.get_identifiers_from_x509(csr.subject, csr.extensions)
            extra = sorted({n.lower() for n in names} - {a.lower() for a in allowed})
            if extra or ips:
                raise AcmeError(f"the CSR asks for names it may not have: {extra or ips}")
        acme = self._connect()
        order = acme.new_order(csr_pem)
        key = acme.net.key
        answers: list[tuple[messages.ChallengeBody, challenges.ChallengeResponse]] = []
        published: list[tuple[str, str]] = []
        try:
            for authz in order.authorizations:
                if authz.body.status == messages.STATUS_VALID:
                    continue  # validated recently; the CA reuses it
                identifier = authz.body.identifier.value
                challb = next(
                    (c for c in authz.body.challenges if isinstance(c.chall, challenges.DNS01)),
                    None,
                )
                if challb is None:
                    raise AcmeError(f"the ACME server offers no dns-01 challenge for {identifier}")
                response, validation = challb.response_and_validation(key)
                name = challb.chall.validation_domain_name(identifier) + "."
                self.hook.run("set", name, validation)
                published.append((name, validation))
                answers.append((challb, response))
            for challb, response in answers:
                acme.answer_challenge(challb, response)
            deadline = datetime.datetime.now() + datetime.timedelta(seconds=self.order_timeout)
            order = acme.poll_and_finalize(order, deadline)
        finally:
            for name, value in published:
                try:
                    self.hook.run("clear", name, value)
                except AcmeError as e:
                    _log.warn("ACME: {error} (the TXT record stays)", error=str(e))
        if not order.fullchain_pem:
            raise AcmeError("the ACME server issued no certificate")
        return str(order.fullchain_pem)


def describe_error(error: BaseException, directory_url: str = "") -> str:
    """One line for the log saying why an ACME attempt failed."""
    if isinstance(error, AcmeError):
        return str(error)
    if isinstance(error, errors.ValidationError):
        problems = []
        for authz in error.failed_authzrs:
            for challb in authz.body.challenges:
                if challb.error is not None:
                    detail = challb.error.detail or challb.error.typ
                    name = authz.body.identifier.value
                    name = f"*.{name}" if authz.body.wildcard else name
                    problems.append(f"{name}: {detail}")
        return "the ACME server rejected the DNS-01 challenge: " + (
            "; ".join(problems) or "no detail given"
        )
    if isinstance(error, errors.IssuanceError):
        return "the ACME server refused to issue: " + describe_error(error.error)
    if isinstance(error, CertificateRefused):
        return f"the issued certificate is not usable: {error}"
    if isinstance(error, messages.Error):
        code = error.code or error.typ
        kind = "rate limited by the ACME server" if code == "rateLimited" else "ACME error"
        return f"{kind} ({code}): {error.detail or error.description or ''}".rstrip(": ")
    if isinstance(error, errors.TimeoutError):
        return "the ACME server did not finish validating and issuing in time"
    if isinstance(error, requests.exceptions.SSLError):
        return f"cannot verify the ACME server's certificate at {directory_url} (--acme-ca?)"
    if isinstance(error, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
        return f"the ACME directory {directory_url} does not answer ({type(error).__name__})"
    if isinstance(error, requests.exceptions.RequestException | errors.Error):
        return f"ACME request failed: {error}"
    return f"{type(error).__name__}: {error}"


def new_key_and_csr(names: Collection[str]) -> tuple[bytes, bytes]:
    """A new EC P-256 key (PEM, PKCS#8) and a CSR for `names` signed with it."""
    key_pem = _key_pem(ec.generate_private_key(ec.SECP256R1()))
    return key_pem, crypto_util.make_csr(key_pem, list(names))


def issue_in_thread(
    reactor: Any, issuer: AcmeIssuer, csr_pem: bytes, allowed: Collection[str] | None = None
) -> defer.Deferred[str]:
    """`AcmeIssuer.issue` in the reactor's thread pool: a Deferred of the chain (PEM)."""
    return deferToThreadPool(reactor, reactor.getThreadPool(), issuer.issue, csr_pem, allowed)


# -- the schedule ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RenewalPolicy:
    """When to renew and when to try again (seconds; times are seconds since the epoch)."""

    renew_before: float | None = None
    """Renew this long before expiry; None: when a third of the validity is left."""
    check_interval: float = CHECK_INTERVAL
    """Between checks of whether renewal is due."""

    def renew_at(self, pair: CertificatePair) -> float:
        """When `pair` is due for renewal."""
        not_after = pair.not_after.timestamp()
        lifetime = not_after - pair.not_before.timestamp()
        before = self.renew_before if self.renew_before is not None else lifetime / 3
        return not_after - before

    def due(self, pair: CertificatePair | None, now: float) -> bool:
        """Whether a certificate must be obtained now (there is none, or it is due)."""
        return pair is None or now >= self.renew_at(pair)

    def retry_delay(self, failures: int, rand: float) -> float:
        """
        Seconds before the next attempt after `failures` failures in a row (1, 2, ...):
        `RETRY_INITIAL` doubling, at most `RETRY_MAX` (both at most the check interval),
        scaled by a jitter factor in [0.5, 1) from `rand` in [0, 1).
        """
        initial = min(RETRY_INITIAL, self.check_interval)
        ceiling = min(RETRY_MAX, self.check_interval)
        base = min(ceiling, initial * 2 ** min(failures - 1, 32))
        return float(base * (0.5 + rand / 2))


class AcmeService(service.Service):
    """
    Keeps the relay's certificate for ``<domain>`` and ``*.<domain>`` from an ACME CA.

    `issue` is how a CSR becomes a chain (`issue_in_thread` with an `AcmeIssuer`; a fake in
    tests), `install` puts a checked pair into service (`put_in_service` bound to the
    relay).  Until the first certificate is installed the relay has none, and its handshakes
    fail.
    """

    def __init__(
        self,
        reactor: Any,
        domain: str,
        store: AcmeStore,
        issue: Callable[[bytes], defer.Deferred[str]],
        install: Callable[[CertificatePair], None],
        policy: RenewalPolicy | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.reactor = reactor
        self.domain = domain
        self.store = store
        self.issue = issue
        self.install = install
        self.policy = policy or RenewalPolicy()
        self.rand = rand
        self.pair: CertificatePair | None = None
        self.failures = 0
        self.renewals = 0
        self._busy = False
        self._call: Any = None

    @property
    def source(self) -> str:
        return f"ACME {self.store.directory_url}"

    def _now(self) -> float:
        return float(self.reactor.seconds())

    def _utc(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self._now(), datetime.UTC)

    def load(self) -> CertificatePair | None:
        """
        The certificate kept from last time, if it still serves the domain (blocking).
        Anything else (none, unreadable, expired, for another domain) is logged and None.
        """
        if not os.path.exists(self.store.cert_path):
            return None
        try:
            with open(self.store.cert_path, "rb") as f:
                cert_pem = f.read()
            with open(self.store.key_path, "rb") as f:
                key_pem = f.read()
            chain, key = parse_pair(cert_pem, key_pem)
            return check_pair(chain, key, self.domain, self._utc(), self.source)
        except (OSError, CertificateRefused) as e:
            _log.warn("ACME: not using the kept certificate: {error}", error=str(e))
            return None

    def startService(self) -> None:
        super().startService()
        kept = self.load()
        if kept is not None:
            try:
                self.install(kept)
                self.pair = kept
            except CertificateRefused as e:
                _log.warn("ACME: not using the kept certificate: {error}", error=str(e))
        else:
            _log.info(
                "ACME: no certificate yet; TLS handshakes fail until one for {names} is issued",
                names=" and ".join(required_names(self.domain)),
            )
        self._schedule(0)

    def stopService(self) -> None:
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _schedule(self, delay: float) -> None:
        if not self.running:
            return
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = self.reactor.callLater(delay, self.check)

    def reload(self) -> None:
        """SIGHUP: check now (a renewal happens only if due; a pending retry comes now)."""
        if self._busy:
            _log.info("SIGHUP: ACME order already in progress")
            return
        _log.info("SIGHUP: checking the ACME certificate")
        self._schedule(0)

    def check(self) -> defer.Deferred[None] | None:
        """Obtain a certificate if there is none or renewal is due; else check again later."""
        self._call = None
        if self._busy or not self.running:
            return None
        if not self.policy.due(self.pair, self._now()):
            self._schedule(self.policy.check_interval)
            return None
        return self._obtain()

    def _obtain(self) -> defer.Deferred[None]:
        self._busy = True
        names = required_names(self.domain)
        if self.pair is None:
            why = "no certificate yet"
        else:
            why = f"renewal due, the certificate expires {self.pair.not_after.isoformat()}"
        _log.info(
            "ACME: requesting a certificate for {names} from {directory} ({why})",
            names=", ".join(names),
            directory=self.store.directory_url,
            why=why,
        )
        key_pem, csr_pem = new_key_and_csr(names)
        d: defer.Deferred[Any] = defer.maybeDeferred(self.issue, csr_pem)
        d.addCallback(self._issued, key_pem)
        d.addErrback(self._failed)

        def done(result: object) -> None:
            self._busy = False

        d.addBoth(done)
        return d

    def _issued(self, fullchain: str, key_pem: bytes) -> None:
        chain, key = parse_pair(fullchain.encode(), key_pem)
        pair = check_pair(chain, key, self.domain, self._utc(), self.source)
        # In service first: a full disk must not keep a good certificate from the handshakes.
        self.install(pair)
        self.pair = pair
        self.failures = 0
        self.renewals += 1
        try:
            self.store.save_certificate(fullchain.encode(), key_pem)
        except OSError as e:
            _log.error(
                "ACME: cannot keep the certificate in {dir}: {error} (it is in service; "
                "a restart will obtain a new one)",
                dir=self.store.dir.path,
                error=e,
            )
        self._schedule(self.policy.check_interval)

    def _failed(self, failure: Failure) -> None:
        self.failures += 1
        delay = self.policy.retry_delay(self.failures, self.rand())
        reason = describe_error(failure.value or Exception(), self.store.directory_url)
        if self.pair is None:
            still = "no certificate in service yet, TLS handshakes fail"
        else:
            still = f"still serving the certificate that expires {self.pair.not_after.isoformat()}"
        _log.error(
            "ACME: could not obtain a certificate (attempt {n}): {reason}; retrying in "
            "{delay:.3g}s; {still}",
            n=self.failures,
            reason=reason,
            delay=delay,
            still=still,
        )
        self._schedule(delay)


#: Certificate orders an `AcmeCSRIssuer` runs at once; more are refused until one ends.
MAX_ACME_ORDERS = 2
#: Chains an `AcmeCSRIssuer` keeps, to answer a repeated request without a new order.
ACME_CACHE_SIZE = 256


class AcmeCSRIssuer:
    """
    A relay with ``--acme``'s issuer: the agent's CSR goes to the relay's ACME CA, proved
    through the relay's DNS-01 hook (so end-to-end TLS needs no DNS access by the user), for
    the tunnel's host only.

    CAs limit certificates per domain (Let's Encrypt: 50 a week), so a chain issued for the
    same host and key is handed out again while two thirds of its validity remain, and at
    most `MAX_ACME_ORDERS` orders run at once.
    """

    def __init__(
        self,
        order: Callable[[bytes, list[str]], defer.Deferred[str]],
        clock: Callable[[], float] = time.time,
        max_orders: int = MAX_ACME_ORDERS,
    ) -> None:
        """
        @param order: obtains a chain for a PEM CSR whose names must be among the list
            (`tunnel.relay._acme.issue_in_thread` bound to the relay's `AcmeIssuer`).
        """
        self._order = order
        self._clock = clock
        self.max_orders = max_orders
        self._running = 0
        self._cache: OrderedDict[tuple[str, bytes], str] = OrderedDict()

    def issue(self, csr: x509.CertificateSigningRequest, host: str) -> defer.Deferred[str]:
        spki = csr.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        key = (host, spki)
        chain = self._cache.get(key)
        if chain is not None and self._fresh(chain):
            self._cache.move_to_end(key)
            return defer.succeed(chain)
        if self._running >= self.max_orders:
            return defer.fail(
                RuntimeError("the relay's CA is busy with other certificate orders: ask again")
            )
        self._running += 1
        d = self._order(csr.public_bytes(serialization.Encoding.PEM), [host])

        def done(chain: str) -> str:
            self._cache[key] = chain
            self._cache.move_to_end(key)
            while len(self._cache) > ACME_CACHE_SIZE:
                self._cache.popitem(last=False)
            return chain

        def ended(result: Any) -> Any:
            self._running -= 1
            return result

        return d.addCallback(done).addBoth(ended)

    def _fresh(self, chain: str) -> bool:
        """Whether the chain's leaf still has two thirds of its validity."""
        try:
            leaf = x509.load_pem_x509_certificate(chain.encode("ascii"))
        except ValueError:
            return False
        start = leaf.not_valid_before_utc.timestamp()
        end = leaf.not_valid_after_utc.timestamp()
        return self._clock() < start + (end - start) / 3
