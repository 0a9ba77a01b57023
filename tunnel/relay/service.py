"""
The relay as a Twisted service: the public TLS listener, the admin endpoint, the tokens
file watch, and graceful drain on stop.

The relay's pieces live in modules of one job each, re-exported here under the names they
always had: `config` (`RelayConfig`), `_state` (`Relay`: the registry and the relay-wide
decisions), `_control` (the control plane of one link, sans-IO), `_link` (`RelayLink`, its
Twisted adapter) and `_public` (`PublicProtocol`: the public data path).
"""

from __future__ import annotations

import gc
import signal
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from tunnel.relay import _memory
from tunnel.relay._accept import server_endpoint
from tunnel.relay._control import FEATURES
from tunnel.relay._link import RelayLink
from tunnel.relay._public import PublicProtocol
from tunnel.relay._sni import SNIDispatchFactory
from tunnel.relay._state import Relay
from tunnel.relay.admin import admin_site
from tunnel.relay.config import (
    RATE_STRIKES,
    RECLAIM_PROBE_TIMEOUT,
    REFUSALS,
    TOKENS_CHECK_INTERVAL,
    RelayConfig,
    parse_port_range,
)

__all__ = [
    "FEATURES",
    "RATE_STRIKES",
    "RECLAIM_PROBE_TIMEOUT",
    "REFUSALS",
    "TOKENS_CHECK_INTERVAL",
    "PublicProtocol",
    "Relay",
    "RelayConfig",
    "RelayLink",
    "RelayService",
    "parse_port_range",
]

_log = Logger()


class RelayService(service.MultiService):
    """
    The relay as a Twisted service: the public TLS listener plus drain on stop.
    """

    def __init__(self, reactor: Any, relay: Relay, listen: str, admin: str | None = None) -> None:
        super().__init__()
        self.admin = admin
        self.reactor = reactor
        self.relay = relay
        self.front = SNIDispatchFactory(
            relay.route,
            reactor,
            handshake_timeout=relay.config.handshake_timeout,
            client_hello_timeout=relay.config.client_hello_timeout,
            max_pending_handshakes=relay.config.max_pending_handshakes,
            max_pending_per_source=relay.config.max_pending_per_source,
        )
        self.endpoint = server_endpoint(reactor, listen)
        self.port: Any = None
        self.admin_port: Any = None
        self._collector: LoopingCall | None = None
        self._token_watch: LoopingCall | None = None
        #: Called on SIGHUP, before the tokens file is checked (the certificate's reload).
        self.reload_hooks: list[Callable[[], None]] = []
        #: Running inside another program (`tunnel.testing.local_relay`) rather than as the
        #: process: nothing process-wide (no SIGHUP handler, no collector settings, no
        #: reactor stop when the port cannot be had).
        self.embedded = False

    def startService(self) -> None:
        super().startService()
        if not self.embedded:
            # Memory freed under churn goes back to the system every 30 s (see `_memory`);
            # the start-up objects are frozen out of the collector's scans.
            gc.freeze()
            self._collector = LoopingCall(_memory.collect)
            self._collector.clock = self.reactor
            self._collector.start(_memory.INTERVAL, now=False)
        config = self.relay.config
        if config.tokens_file or config.revoked_file or config.token_verifier:
            # Token changes (added, revoked) and expiries apply within TOKENS_CHECK_INTERVAL,
            # or at once on SIGHUP; no restart.
            self._token_watch = LoopingCall(self.relay.check_credentials)
            self._token_watch.clock = self.reactor
            self._token_watch.start(TOKENS_CHECK_INTERVAL, now=False)
        if not self.embedded:
            # SIGHUP means "reload" to operators; by default it would end the process.
            signal.signal(
                signal.SIGHUP, lambda signum, frame: self.reactor.callFromThread(self._sighup)
            )
        if self.admin:

            def admin_listening(port: Any) -> None:
                self.admin_port = port
                address = port.getHost()
                _log.info(
                    "admin on http://{host}:{port}/metrics",
                    host=getattr(address, "host", address),
                    port=getattr(address, "port", ""),
                )

            serverFromString(self.reactor, self.admin).listen(
                admin_site(self.relay, self.front, lambda: self.port is not None)
            ).addCallbacks(admin_listening, lambda f: _log.failure("cannot listen for admin", f))
        d = self.endpoint.listen(self.front)

        def listening(port: Any) -> None:
            self.port = port
            address = port.getHost()
            if not self.relay.config.public_port:
                self.relay.config.public_port = address.port
            _log.info(
                "relay listening on {host}:{port} for *.{domain}",
                host=address.host,
                port=address.port,
                domain=self.relay.domain,
            )

        def failed(reason: Failure) -> None:
            _log.failure("cannot listen on the public port", reason)
            if not self.embedded:
                self.reactor.stop()

        d.addCallbacks(listening, failed)

    def _sighup(self) -> None:
        for hook in self.reload_hooks:
            hook()
        config = self.relay.config
        files = [f.path for f in (config.tokens_file, config.revoked_file) if f is not None]
        if not files and config.token_verifier is None:
            _log.info("SIGHUP: nothing to reload (no --tokens or --revoked file)")
            return
        _log.info("SIGHUP: checking {paths}", paths=", ".join(files) or "token expiries")
        self.relay.check_credentials()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        _log.info(
            "relay draining: no new connections, {grace}s grace",
            grace=self.relay.config.drain_grace,
        )
        port = self.port
        self.port = None
        for loop in (self._collector, self._token_watch):
            if loop is not None and loop.running:
                loop.stop()
        if self.admin_port is not None:
            self.admin_port.stopListening()
            self.admin_port = None
        stopped: defer.Deferred[Any] = (
            defer.maybeDeferred(port.stopListening) if port is not None else defer.succeed(None)
        )
        stopped.addCallback(lambda _: self.relay.drain())
        return stopped
