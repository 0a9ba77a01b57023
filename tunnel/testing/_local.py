"""
A development relay in the test's own process, for the tests of code that makes tunnels.

Code under test calls `tunnel.forward` or `tunnel.client.forward` as it does in production;
the test runs it against a relay that lives in the same process, on a loopback port, with its
own development CA in a temporary directory — no network, no other process, no settings of
the machine::

    import tunnel, tunnel.testing

    def test_my_app_publishes_its_port():
        with tunnel.testing.local_relay() as relay:   # TUNNEL_RELAY / TUNNEL_CA point at it
            with tunnel.forward(8000) as t:            # as the code under test would
                status, body = relay.get(t, "/health")
            assert status == 200

With Twisted, in a test that has a reactor (pytest-twisted, trial)::

    relay = await tunnel.testing.start_local_relay(reactor)
    t = await tunnel.client.forward(reactor, 8000, **relay.settings)
    ...
    await relay.stop()

A tunnel's host (``<id>.tunnel.localhost``) needs no DNS: `LocalRelay.connect` and
`LocalRelay.get` dial the relay on 127.0.0.1 and send the name as SNI, verifying the relay's
certificate with its CA, as a public client would.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import random
import shutil
import socket
import ssl
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, task

if TYPE_CHECKING:
    from tunnel._tunnel import Tunnel
    from tunnel.relay.service import RelayService

__all__ = ["LocalRelay", "local_relay", "start_local_relay"]

LOOPBACK = "127.0.0.1"
DOMAIN = "tunnel.localhost"
#: Seconds `start_local_relay` waits for the relay to listen.
START_TIMEOUT = 10.0


@dataclass
class LocalRelay:
    """
    A development relay running in this process on 127.0.0.1 (from `start_local_relay` or
    `local_relay`).
    """

    service: RelayService
    #: Its state directory (the development CA and keys).
    state_dir: str
    reactor: Any
    _own_dir: bool = field(default=False, repr=False)

    @property
    def port(self) -> int:
        """The relay's port on 127.0.0.1 (agents and public clients alike)."""
        return int(self.service.port.getHost().port)

    @property
    def address(self) -> str:
        """The ``relay=`` / ``TUNNEL_RELAY`` value for agents: ``localhost:<port>``."""
        return f"localhost:{self.port}"

    @property
    def ca(self) -> str:
        """The PEM file of its development CA: the ``ca=`` / ``TUNNEL_CA`` value."""
        return os.path.join(self.state_dir, "ca.pem")

    @property
    def settings(self) -> dict[str, str]:
        """``relay`` and ``ca`` keywords for `tunnel.forward` / `tunnel.client.forward`."""
        return {"relay": self.address, "ca": self.ca}

    @property
    def env(self) -> dict[str, str]:
        """``TUNNEL_RELAY`` and ``TUNNEL_CA`` for code that reads its settings from there."""
        return {"TUNNEL_RELAY": self.address, "TUNNEL_CA": self.ca}

    # -- reaching tunnels, as a public client (blocking: not on the reactor's thread) ----------

    def connect(self, tunnel: Tunnel, timeout: float = 10.0) -> socket.socket:
        """
        A connection to `tunnel` through the relay, as a public client makes it: TLS with the
        tunnel's host as SNI, verified with the relay's CA (a raw TCP tunnel: a plain TCP
        connection to its port).
        """
        if tunnel.unencrypted_port is not None:
            return socket.create_connection((LOOPBACK, tunnel.unencrypted_port), timeout=timeout)
        context = ssl.create_default_context(cafile=self.ca)
        raw = socket.create_connection((LOOPBACK, tunnel.port), timeout=timeout)
        try:
            return context.wrap_socket(raw, server_hostname=tunnel.host)
        except BaseException:
            raw.close()
            raise

    def get(self, tunnel: Tunnel, path: str = "/", timeout: float = 10.0) -> tuple[int, bytes]:
        """``GET path`` through `tunnel` (HTTP/1.1 over TLS, or plain HTTP on a raw TCP
        tunnel): the response's status and body."""
        sock = self.connect(tunnel, timeout)
        host = tunnel.unencrypted_host if tunnel.unencrypted_port is not None else tunnel.host
        connection = http.client.HTTPConnection(host or DOMAIN, timeout=timeout)
        connection.sock = sock
        try:
            connection.request("GET", path, headers={"Connection": "close"})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    # -- stopping -------------------------------------------------------------------------------

    def stop(self) -> defer.Deferred[None]:
        """
        Close the tunnels and links that agents of this process made with it, then stop the
        relay (and remove its state directory if `start_local_relay` made it). On the
        reactor's thread.
        """
        from tunnel import client

        d = client._shutdown_where(self.reactor, lambda ca: ca == self.ca)
        d.addCallback(lambda _: self.service.stopService())

        def removed(_: object) -> None:
            if self._own_dir:
                shutil.rmtree(self.state_dir, ignore_errors=True)

        return d.addCallback(removed)


def start_local_relay(
    reactor: Any, *, state_dir: str | None = None, options: Sequence[str] = ()
) -> defer.Deferred[LocalRelay]:
    """
    Start a development relay in this process on a free 127.0.0.1 port; fires once it
    listens. `options` are more ``twistd tunnelrelay`` options (e.g. ``["--tokens", path]``).
    Nothing process-wide is touched (no signal handler, no collector settings).

    @raise twisted.python.usage.UsageError: (at once) `options` are not valid.
    """
    from tunnel.relay import tap

    own = state_dir is None
    directory = state_dir or tempfile.mkdtemp(prefix="tunnel-relay-")
    low = random.randrange(20000, 32000)
    parsed = tap.Options()
    parsed.parseOptions(
        [
            *("--listen", f"tcp:0:interface={LOOPBACK}", "--state-dir", directory),
            *("--tcp-ports", f"{low}-{low + 499}", "--tcp-interface", LOOPBACK),
            *("--drain-grace", "0", "--domain", DOMAIN),
            # In this process: one relay process, never a supervisor of workers.
            *("--workers", "1"),
            *options,
        ]
    )
    service = tap.makeService(parsed, reactor)
    service.embedded = True  # type: ignore[attr-defined]
    service.startService()
    relay = LocalRelay(service, directory, reactor, own)  # type: ignore[arg-type]

    async def listening() -> LocalRelay:
        waited = 0.0
        while service.port is None:  # type: ignore[attr-defined]
            if waited > START_TIMEOUT:
                await defer.maybeDeferred(service.stopService)
                raise RuntimeError("the local relay did not listen in time")
            await task.deferLater(reactor, 0.005, lambda: None)
            waited += 0.005
        return relay

    return defer.ensureDeferred(listening())


@contextlib.contextmanager
def local_relay(*, options: Sequence[str] = (), set_env: bool = True) -> Iterator[LocalRelay]:
    """
    For plain (non-Twisted) tests: a development relay in this process, on the reactor that
    `tunnel.forward` runs in its background thread. With `set_env`, ``TUNNEL_RELAY`` and
    ``TUNNEL_CA`` point at it (and ``TUNNEL_TOKEN``/``TUNNEL_PROXY`` are unset) for the
    block, so that code calling ``tunnel.forward(port)`` with no settings uses it. Stopped,
    with the tunnels made through it, when the block ends.
    """
    from twisted.internet.threads import blockingCallFromThread

    import tunnel

    reactor = tunnel._running_reactor()
    relay: LocalRelay = blockingCallFromThread(
        reactor,
        start_local_relay,  # type: ignore[arg-type]
        reactor,
        options=list(options),
    )
    saved = {
        k: os.environ.get(k) for k in ("TUNNEL_RELAY", "TUNNEL_CA", "TUNNEL_TOKEN", "TUNNEL_PROXY")
    }
    try:
        if set_env:
            for key in ("TUNNEL_TOKEN", "TUNNEL_PROXY"):
                os.environ.pop(key, None)
            os.environ.update(relay.env)
        yield relay
    finally:
        if set_env:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        blockingCallFromThread(reactor, relay.stop)  # type: ignore[arg-type]
