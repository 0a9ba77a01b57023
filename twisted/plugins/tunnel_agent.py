"""Twisted plugin: ``twistd tunnelagent`` (the agent that dials out to a relay)."""

from twisted.application.service import ServiceMaker

tunnelagent = ServiceMaker(
    "Tunnels agent",
    "tunnel.agent.tap",
    "Agent: dials a relay and forwards local ports",
    "tunnelagent",
)
