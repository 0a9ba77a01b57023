"""
``twistd tunnelagent``: options and service construction.
"""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from tunnel import __version__
from tunnel._daemon import LOG_FORMAT_OPTION, apply_log_format, exit_status
from tunnel._malloc import tune_allocator
from tunnel._reactor import lean_dispatch
from tunnel.agent import settings
from tunnel.agent.session import Agent, ForwardSpec
from tunnel.errors import AuthenticationError
from tunnel.wire import LinkSettings
from tunnel.wire.options import TunnelOption

__all__ = ["AgentService", "Options", "makeService"]

_log = Logger()


class Options(usage.Options):
    """
    Options of the agent.
    """

    synopsis = (
        "--relay HOST:PORT --forward PORT[:tcp] [--forward ...] [--allow NETWORK] "
        "[--deny NETWORK] [--token T] [--ca CA]"
    )
    longdesc = (
        f"The agent of Tunnels {__version__}: dials out to a relay over TLS and forwards "
        "public connections of each tunnel to a local port. --admin also serves the "
        "inspector page (its tunnels and a live table of connections) at /."
    )
    optParameters = [
        ["relay", None, None, "Relay HOST:PORT, or a comma-separated list (TUNNEL_RELAY)."],
        ["token", None, None, "Agent token (TUNNEL_TOKEN)."],
        ["ca", None, None, "PEM CA bundle to trust for the relay (TUNNEL_CA)."],
        ["proxy", None, None, "HTTP proxy to reach the relay through (TUNNEL_PROXY)."],
        [
            "admin",
            None,
            None,
            "Endpoint for the inspector page at /, /metrics, /status and /ready "
            "(e.g. tcp:9091:interface=127.0.0.1).",
        ],
        ["max-streams", None, 16384, "Public connections the relay may open at once.", int],
        [
            "drain-grace",
            None,
            10.0,
            "Seconds connections in flight may finish on SIGTERM, after a GOAWAY that sends "
            "new ones to the other agents serving the same names; 0: close at once.",
            float,
        ],
        ["max-window", None, 16, "MiB a stream's receive window may auto-tune up to.", int],
        LOG_FORMAT_OPTION,
    ]

    def __init__(self) -> None:
        super().__init__()
        self["forward"] = []
        #: The values given to each tunnel option's flag (`tunnel.wire.options`), by name.
        self["flags"] = {}

    def opt_forward(self, value: str) -> None:
        """Forward PORT or HOST:PORT, then :tcp, :h2 or :passthrough, then :proxy1 or
        :proxy2, then :rate=RATE (repeatable)."""
        try:
            self["forward"].append(settings.parse_forward(value))
        except ValueError as e:
            raise usage.UsageError(str(e)) from None

    def postOptions(self) -> None:
        apply_log_format(self)
        try:
            connection = settings.connection_settings(
                self["relay"],
                self["token"],
                self["ca"],
                self["proxy"],
                no_relay="give --relay HOST:PORT",
            )
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        self["relays"] = list(connection.relays)
        self["token"] = connection.token
        self["ca"] = connection.ca
        self["proxy"] = connection.proxy
        if not self["forward"]:
            raise usage.UsageError("give at least one --forward PORT")
        targets = [(f.host, f.port) for f in self["forward"]]
        if len(set(targets)) != len(targets):
            raise usage.UsageError("the same target is forwarded twice")
        try:
            values = settings.flag_values(self["flags"])
            self["forward"] = settings.with_flags(self["forward"], values)
        except ValueError as e:
            raise usage.UsageError(str(e)) from None


def _flag_handler(option: TunnelOption) -> Any:
    def handler(self: Options, value: str) -> None:
        self["flags"].setdefault(option.name, []).append(value)

    handler.__doc__ = option.doc + (" (a,b too)" if option.repeatable else "")
    return handler


# Each tunnel option's flag, from the table.
settings.add_flags(
    lambda option: setattr(
        Options, "opt_" + (option.flag or "").replace("-", "_"), _flag_handler(option)
    )
)


class AgentService(service.Service):
    """
    The agent as a Twisted service: asks for every forward, retrying until granted.
    """

    def __init__(
        self, agent: Agent, forwards: list[ForwardSpec], exit_on_refusal: bool = False
    ) -> None:
        self.agent = agent
        self.forwards = forwards
        #: Under twistd: leave with status 1 once stopped for a refused token.
        self.exit_on_refusal = exit_on_refusal

    def startService(self) -> None:
        super().startService()
        self.agent.on_refused.append(self._refused)
        for spec in self.forwards:
            self._ask(spec)

    def _refused(self, reason: str) -> None:
        # A refused (or revoked) token is not fixed by retrying.
        if not self.running:
            return
        _log.error(
            "{why}; stopping: check --token / TUNNEL_TOKEN", why=reason, event_type="token_refused"
        )
        self.running = False
        if self.exit_on_refusal:
            exit_status(1)
        self.agent.reactor.stop()

    def _ask(self, spec: ForwardSpec) -> None:
        if not self.running:
            return

        def failed(reason: Failure) -> None:
            if reason.check(AuthenticationError):
                return  # `_refused` stops the agent
            _log.error(
                "tunnel for {target} not granted: {why}", target=spec.target, why=reason.value
            )
            self.agent.reactor.callLater(2.0, self._ask, spec)

        self.agent.forward(spec).addErrback(failed)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return self.agent.stop()


def makeService(options: Options, reactor: Any = None) -> service.IService:
    """
    Build the agent's service from parsed options.
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
        # twistd's own reactor (the daemon owns it): drop the per-event log context from its
        # dispatch, and keep socket-read buffers off mmap. A reactor passed in (a test's, an
        # embedding program's) and its process are left alone.
        lean_dispatch(reactor)
        tune_allocator()
    agent = Agent(
        reactor,
        options["relays"],
        token=options["token"],
        ca=options["ca"],
        proxy=options["proxy"],
        fail_fast=False,
        stop_grace=options["drain-grace"],
        settings=LinkSettings(
            max_streams=options["max-streams"], max_window=options["max-window"] * 1024 * 1024
        ),
    )
    # Options parsed by twistd have it as parent; only then is this process the daemon's own.
    agent_service = AgentService(
        agent, options["forward"], exit_on_refusal=getattr(options, "parent", None) is not None
    )
    if not options["admin"]:
        return agent_service
    from twisted.application.internet import StreamServerEndpointService
    from twisted.internet.endpoints import serverFromString

    from tunnel.agent.admin import admin_site

    top = service.MultiService()
    agent_service.setServiceParent(top)
    admin = StreamServerEndpointService(
        serverFromString(reactor, options["admin"]), admin_site(agent)
    )
    admin._raiseSynchronously = True
    admin.setServiceParent(top)
    return top
