"""The control codes: the strings docs/protocol.md names, equal to them on both sides."""

from __future__ import annotations

import json

from tunnel.wire.codes import ErrorReason, RefusalCode
from tunnel.wire.control import ErrorMessage, TunnelRefused, decode_message, encode_message


def test_error_reasons_are_the_documented_strings() -> None:
    assert {c.value for c in ErrorReason} == {"unauthorized", "timeout", "bad_message", "limit"}


def test_refusal_codes_are_the_documented_strings() -> None:
    assert {c.value for c in RefusalCode} == {
        "limit",
        "bad_request",
        "reclaim_refused",
        "no_ports",
        "draining",
        "name_not_allowed",
        "unsupported",
        # certificate_refused
        "no_issuer",
        "not_held",
        "issue_failed",
    }


def test_a_code_is_its_string_on_the_wire() -> None:
    payload = encode_message(TunnelRefused(7, RefusalCode.NO_PORTS, "none free"))
    assert json.loads(payload)["code"] == "no_ports"
    decoded = decode_message(payload)
    assert isinstance(decoded, TunnelRefused)
    assert decoded.code == RefusalCode.NO_PORTS
    assert RefusalCode(decoded.code) is RefusalCode.NO_PORTS


def test_a_plain_string_code_from_the_peer_matches_the_enum() -> None:
    decoded = decode_message(encode_message(ErrorMessage("unauthorized", "no")))
    assert isinstance(decoded, ErrorMessage)
    assert decoded.code == ErrorReason.UNAUTHORIZED
    assert decoded.code != ErrorReason.TIMEOUT
