"""
The stable, machine-readable codes of the control messages, shared by relay and agent.

Sans-IO. They are `StrEnum`s, so a code compares equal to (and is encoded as) the string
that docs/protocol.md names: the wire does not change, and a code either side does not know
still decodes (as a plain string) and is handled as the protocol says (an unknown `error`
code is fatal; an unknown refusal fails the request).
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["ErrorReason", "RefusalCode"]


class ErrorReason(StrEnum):
    """
    The ``code`` of an ``error`` control message: why the relay ends the link.
    """

    #: The token is missing, unknown or revoked, or the first message was not a hello.
    #: Retrying cannot help.
    UNAUTHORIZED = "unauthorized"
    #: No hello within the relay's handshake time.
    TIMEOUT = "timeout"
    #: A control message that does not decode.
    BAD_MESSAGE = "bad_message"
    #: A bound of the relay was reached: the links of one token (or, on a relay without
    #: tokens, of one address) are at their limit. The link ends with GOAWAY
    #: ENHANCE_YOUR_CALM; a later attempt may succeed once other links have gone.
    LIMIT = "limit"


class RefusalCode(StrEnum):
    """
    The ``code`` of a ``tunnel_refused`` answer: why one request was not granted.
    """

    #: Too many tunnels for this agent.
    LIMIT = "limit"
    #: An invalid kind or option (the message says which).
    BAD_REQUEST = "bad_request"
    #: A reclaim with the wrong secret, or for an id a live link still holds.
    RECLAIM_REFUSED = "reclaim_refused"
    #: No free port in the relay's raw TCP range.
    NO_PORTS = "no_ports"
    #: The relay is draining: it grants nothing new.
    DRAINING = "draining"
    #: Reserved: a tunnel name the token does not allow.
    NAME_NOT_ALLOWED = "name_not_allowed"
    #: ``certificate_refused``: the relay has no certificate issuer (it runs with a
    #: certificate of its own and no ACME).
    NO_ISSUER = "no_issuer"
    #: ``certificate_refused``: the tunnel is not a passthrough tunnel held by this link.
    NOT_HELD = "not_held"
    #: ``certificate_refused``: the issuer failed (an ACME order that did not complete).
    ISSUE_FAILED = "issue_failed"
    #: Never on the wire: the agent's own refusal to send a restricting option to a relay
    #: whose ``welcome.features`` lack it (which would let everyone in).
    UNSUPPORTED = "unsupported"
