"""Twisted plugin: ``twistd tunnelrelay`` (the public relay)."""

from twisted.application.service import ServiceMaker

tunnelrelay = ServiceMaker(
    "Tunnels relay", "tunnel.relay.tap", "Public relay: TLS by SNI, raw TCP ports", "tunnelrelay"
)
