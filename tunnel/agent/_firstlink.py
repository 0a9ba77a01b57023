"""
The plain API's first forward in a process: the link made with the standard library in a
background thread (`tunnel.agent._bootstrap`), the URL handed to the caller, then Twisted
imported and its reactor run in that same thread, where an `Agent` adopts the live link.

The caller waits only for the link: importing Twisted (most of a cold start) happens after
it has its URL. Public connections that arrive before the reactor runs wait at the relay
(as stream OPENs on the link, in the socket's buffer) and are served once it does.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from tunnel._tunnel import Tunnel
from tunnel.agent._bootstrap import Bootstrapped, LinkLostEarly, bootstrap
from tunnel.agent._records import AgentForward
from tunnel.agent.settings import ForwardSpec, RelayAddress

__all__ = ["FirstLink"]

#: Seconds to wait for the reactor to start once the link is up.
_START_TIMEOUT = 30.0


class FirstLink:
    """
    One first forward (or `forward_many`) of the plain API, from the link to its adoption.

    @param started: set once the reactor runs (with the link adopted), for every other
        caller of the API.
    @param finished: called (in the background thread) if the link failed, before the
        caller is told: the next forward may try again.
    """

    def __init__(
        self,
        relay: RelayAddress,
        connection: dict[str, Any],
        specs: Sequence[ForwardSpec],
        started: threading.Event,
        finished: Callable[[], None],
    ) -> None:
        self.relay = relay
        self.connection = connection
        self.specs = list(specs)
        self.started = started
        self.finished = finished
        self._answered = threading.Event()
        self._adopted = threading.Event()
        self.boot: Bootstrapped | None = None
        self.error: BaseException | None = None
        #: The link was lost before the answers: the caller takes the Twisted path.
        self.fallback = False
        self.agent: Any = None
        self.reactor: Any = None
        self.thread = threading.Thread(target=self._run, name="tunnel-reactor", daemon=True)

    # -- the caller's side -------------------------------------------------------------------

    def tunnels(self) -> dict[int, Tunnel] | None:
        """
        Start, and wait for the link's answers: ``{port: Tunnel}``, or None if the forwards
        are to be asked the Twisted way (the link was lost after the welcome).

        @raise RelayUnavailable, AuthenticationError, TunnelRefused: as `tunnel.forward`.
        """
        self.thread.start()
        self._answered.wait()
        if self.error is not None:
            raise self.error
        if self.fallback:
            return None
        boot = self.boot
        assert boot is not None
        result = {}
        for record in boot.records:
            grant = record.granted
            assert grant is not None
            result[record.spec.port] = Tunnel(
                host=grant.host,
                port=grant.port,
                unencrypted_host=grant.tcp_host,
                unencrypted_port=grant.tcp_port,
                _issue=self._issuer(record),
            )
        return result

    def close(self) -> None:
        """
        Close the tunnels (blocking until the relay is told), once the link is adopted.
        """
        if not self._adopted.wait(_START_TIMEOUT) or self.agent is None:
            return  # the link never reached the reactor: nothing of it is left open
        from twisted.internet.threads import blockingCallFromThread

        from tunnel import client

        boot = self.boot
        assert boot is not None
        tunnels = {r.spec.port: r.tunnel for r in boot.records if r.tunnel is not None}
        blockingCallFromThread(self.reactor, client.close_all, tunnels)  # type: ignore[arg-type]

    def _issuer(self, record: AgentForward) -> Callable[[str | bytes], Any]:
        def issue(csr: str | bytes) -> Any:
            from tunnel.errors import RelayUnavailable

            if not self._adopted.wait(_START_TIMEOUT) or self.agent is None:
                raise RelayUnavailable("the link to the relay is gone")
            from twisted.internet.threads import blockingCallFromThread

            return blockingCallFromThread(self.reactor, self.agent.issue_certificate, record, csr)

        return issue

    # -- the background thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.boot = bootstrap(
                self.relay, self.connection.get("token"), self.connection.get("ca"), self.specs
            )
        except LinkLostEarly:
            self.fallback = True
        except BaseException as e:
            self.error = e
            self.finished()
            self._answered.set()
            return
        self._answered.set()
        from twisted.internet import reactor

        from tunnel._reactor import lean_dispatch

        # This thread runs the reactor, so it may trim the reactor's event dispatch.
        lean_dispatch(reactor)
        self.reactor = reactor
        reactor.callWhenRunning(self._adopt)
        reactor.callWhenRunning(self.started.set)
        reactor.run(installSignalHandlers=False)  # type: ignore[call-arg]

    def _adopt(self) -> None:
        try:
            if self.boot is None:
                return
            from tunnel import client

            c = self.connection
            agent = client.agent_for(self.reactor, c.get("relay"), c.get("token"), c.get("ca"))
            agent.adopt(self.boot)
            self.agent = agent
        except Exception:
            from twisted.logger import Logger

            Logger().failure("the first link could not be adopted")
            if self.boot is not None:
                self.boot.sock.close()
        finally:
            self._adopted.set()
