"""
Putting a certificate into service without dropping anything, and watching ``--cert`` /
``--key`` for a new one.

`put_in_service` is the one way a certificate reaches the relay's handshakes: it installs a
checked `CertificatePair` in the relay's `RelayTLS` (new handshakes get it at once; every
connection and link already established keeps the context it started with) and rebuilds the
contexts of tunnels that demand client certificates, so that they too serve the new one.

`CertificateWatch` rereads the two files when they change (checked every
`CERT_CHECK_INTERVAL` seconds, as the tokens file is) and at once on SIGHUP.  A pair that does
not parse, does not match its key, does not cover the domain or has expired is refused with a
log line that says why, and the certificate in service stays.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from typing import Any, Protocol

from OpenSSL import SSL
from twisted.application import service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from tunnel.relay._certificate import CertificatePair, CertificateRefused, read_pair
from tunnel.relay._tls import RelayTLS

__all__ = ["CERT_CHECK_INTERVAL", "CertificateWatch", "put_in_service"]

CERT_CHECK_INTERVAL = 2.0
"""Seconds between checks of the ``--cert`` and ``--key`` files for a change."""

_log = Logger()


class _Relay(Protocol):
    """What `put_in_service` needs of the relay: its TLS contexts and its tunnels."""

    tls: RelayTLS
    registry: Any


def put_in_service(relay: _Relay, pair: CertificatePair) -> None:
    """
    Serve `pair` to every new handshake of `relay`, and log it (names, issuer, expiry).

    @raise CertificateRefused: OpenSSL refuses the pair; the certificate in service stays.
    """
    try:
        relay.tls.install(pair)
    except SSL.Error as e:
        raise CertificateRefused(f"{pair.source}: OpenSSL refuses the pair: {e}") from None
    refreshed = 0
    for record in relay.registry.all():
        if record.context is None:
            continue
        new = relay.tls.refresh(record.context)
        if new is not None:
            record.context = new
            refreshed += 1
    _log.info(
        "certificate in service: {description}{tunnels}",
        description=pair.describe(),
        tunnels=f" ({refreshed} client-certificate tunnels updated)" if refreshed else "",
    )


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class CertificateWatch(service.Service):
    """
    The ``--cert``/``--key`` files: put into service at start with `install_first`, then
    reread whenever either changes (its modification time, size or inode: an editor's save,
    an ``mv`` of a new file, certbot's ``live/`` symlinks moving on) or on `reload`
    (SIGHUP).

    `install` puts a checked pair into service (`put_in_service` bound to the relay).  A
    refused pair is logged once per version of the files, not on every check.
    """

    def __init__(
        self,
        reactor: Any,
        cert_path: str,
        key_path: str,
        domain: str,
        install: Callable[[CertificatePair], None],
        interval: float = CERT_CHECK_INTERVAL,
    ) -> None:
        self.reactor = reactor
        self.cert_path = cert_path
        self.key_path = key_path
        self.domain = domain
        self.install = install
        self.interval = interval
        #: The pair of these files in service.
        self.installed: CertificatePair | None = None
        #: Of the files, as last read (refused or not).
        self._stamp: tuple[object, object] | None = None
        self._loop: LoopingCall | None = None

    def _now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.reactor.seconds(), datetime.UTC)

    def _stamps(self) -> tuple[object, object]:
        return (_stamp(self.cert_path), _stamp(self.key_path))

    def load(self) -> CertificatePair:
        """
        Read and check the files (blocking), without putting the pair into service.

        @raise CertificateRefused: they cannot be read, or `check_pair` refuses them.
        """
        # The stamp first: a change while reading is seen by the next check.
        self._stamp = self._stamps()
        return read_pair(self.cert_path, self.key_path, self.domain, self._now())

    def install_first(self) -> CertificatePair:
        """
        Read, check and install the pair (at start-up, blocking).

        @raise CertificateRefused: `load` or `install` refuses it.
        """
        pair = self.load()
        self.install(pair)
        self.installed = pair
        return pair

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.check)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def check(self) -> None:
        """Reload when the files changed since they were last read."""
        cert, key = stamps = _stamp(self.cert_path), _stamp(self.key_path)
        if stamps == self._stamp or cert is None or key is None:
            # Unchanged, or one of them is missing (mid-replacement): the next check sees it.
            return
        self.reload("changed on disk")

    def reload(self, why: str = "SIGHUP") -> None:
        """Reread the files now and put the pair into service if it passes the checks."""
        _log.info(
            "certificate: checking {cert} and {key} ({why})",
            cert=self.cert_path,
            key=self.key_path,
            why=why,
        )
        try:
            pair = self.load()
            if _same(pair, self.installed):
                _log.info("certificate unchanged: {d}", d=pair.describe())
                return
            self.install(pair)
        except CertificateRefused as e:
            _log.error(
                "certificate NOT reloaded: {reason}; still serving {current}",
                reason=str(e),
                current=self.installed.describe() if self.installed is not None else "nothing",
            )
            return
        self.installed = pair


def _same(a: CertificatePair, b: CertificatePair | None) -> bool:
    return b is not None and a.chain == b.chain and a.key.public_key() == b.key.public_key()
