"""Signed agent tokens (`tunnel._signedtokens`), the relay's check of credentials
(`tunnel.relay._auth`), and what the relay's core does with them: names from the claims,
the subject as principal, revocation and expiry of connected links."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.unit.test_relay_control import Link, ask, goaways, make_relay, sent
from tunnel import _signedtokens as signed
from tunnel._token_cli import main as token_main
from tunnel.relay._auth import ANYONE, authenticate
from tunnel.relay._control import LinkState
from tunnel.wire import ErrorCode
from tunnel.wire.codes import ErrorReason, RefusalCode
from tunnel.wire.control import AgentHello, ErrorMessage, TunnelGranted, TunnelRequest

NOW = 1_800_000_000.0
KEY = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()
VERIFIER = signed.TokenVerifier([KEY.public_key()])


def token(subject: str = "alice", key: Ed25519PrivateKey = KEY, **kw: object) -> str:
    return signed.issue_token(key, subject, now=NOW, **kw)  # type: ignore[arg-type]


def check(value: str, now: float = NOW, **kw: object) -> object:
    return authenticate(value, now, tokens=None, verifier=VERIFIER, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("15m", 900), ("2h", 7200)])
def test_durations(text: str, seconds: int) -> None:
    assert signed.parse_duration(text) == seconds
    assert signed.parse_duration("30d") == 30 * 86400


@pytest.mark.parametrize("text", ["", "0s", "5", "1w", "-1d", "1.5h"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        signed.parse_duration(text)


def test_an_issued_token_is_accepted_with_its_claims() -> None:
    value = token(names=["web", "alice-*"], expires_in=3600, max_tunnels=3, token_id="t1")
    assert signed.looks_signed(value)
    permit = check(value)
    assert not isinstance(permit, str)
    assert permit.principal == "sub:alice" and permit.subject == "alice"
    assert permit.names == ("web", "alice-*") and permit.max_tunnels == 3
    assert permit.expires == NOW + 3600 and permit.token_id == "t1"
    assert permit.allows("web") and permit.allows("alice-dev") and not permit.allows("bob")
    # Without names, random ids only.
    plain = check(token())
    assert not isinstance(plain, str) and plain.names == () and not plain.allows("web")


def test_expired_not_yet_valid_wrong_key_and_tampered_tokens_are_refused() -> None:
    assert "expired" in str(check(token(expires_in=60), now=NOW + 60))
    early = token(not_before=NOW + 3600)
    assert "not valid for another" in str(check(early))
    assert not isinstance(check(early, now=NOW + 3600), str)
    assert "does not verify" in str(check(token(key=OTHER)))
    header, payload, signature = token(names=["web"]).split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["names"] = ["*"]
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    assert "does not verify" in str(check(f"{header}.{forged}.{signature}"))
    # Another algorithm (none, HS256 with the public key as secret) is never accepted.
    unsigned = jwt.encode({"sub": "alice"}, None, algorithm="none")  # type: ignore[arg-type]
    assert isinstance(check(unsigned), str)  # no signature: not even taken for a JWT
    hs = jwt.encode({"sub": "alice"}, "secret", algorithm="HS256")
    assert "algorithm" in str(check(hs))
    assert check("not-a-jwt") == "wrong token"
    assert check("") == "no token"


@pytest.mark.parametrize(
    "claims",
    [
        {},
        {"sub": 7},
        {"sub": "a b"},
        {"sub": "a", "names": "web"},
        {"sub": "a", "names": ["A"]},
        {"sub": "a", "max_tunnels": 0},
        {"sub": "a", "exp": "soon"},
        {"sub": "a", "jti": 5},
    ],
)
def test_malformed_claims_are_refused(claims: dict[str, object]) -> None:
    value = jwt.encode(claims, KEY, algorithm="EdDSA")
    assert isinstance(check(value), str)


def test_revoked_subjects_and_token_ids() -> None:
    value = token(token_id="id-1")
    assert "revoked" in str(check(value, revoked={"alice"}))
    assert "revoked" in str(check(value, revoked={"id-1"}))
    assert not isinstance(check(value, revoked={"bob", "id-2"}), str)


def test_file_tokens_and_signed_ones_side_by_side_and_a_relay_without_either() -> None:
    both = {"file-token": ("web",)}
    permit = authenticate("file-token", NOW, tokens=both, verifier=VERIFIER)
    assert not isinstance(permit, str) and permit.principal.startswith("token:")
    assert permit.names == ("web",)
    signed_permit = authenticate(token(), NOW, tokens=both, verifier=VERIFIER)
    assert not isinstance(signed_permit, str) and signed_permit.principal == "sub:alice"
    assert authenticate(token(), NOW, tokens=both, verifier=None) == "wrong token"
    assert authenticate(None, NOW, tokens=None, verifier=None) is ANYONE
    assert ANYONE.allows("anything")


def test_keys_on_disk_and_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert token_main(["keygen", str(tmp_path / "k")]) == 0
    private = tmp_path / "k" / signed.PRIVATE_KEY_FILE
    public = tmp_path / "k" / signed.PUBLIC_KEY_FILE
    assert private.stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):
        signed.generate_key_pair(str(tmp_path / "k"))
    capsys.readouterr()
    args = ["issue", "--key", str(private), "--subject", "alice", "--names", "web, alice-*"]
    assert token_main([*args, "--expires", "30d", "--max-tunnels", "2", "--id", "x1"]) == 0
    value = capsys.readouterr().out.strip()
    verifier = signed.TokenVerifier.from_files([str(public)])
    claims = verifier.verify(value, __import__("time").time())
    assert claims.subject == "alice" and claims.names == ("web", "alice-*")
    assert claims.max_tunnels == 2 and claims.token_id == "x1" and claims.expires is not None
    with pytest.raises(SystemExit):
        token_main([*args, "--expires", "forever"])
    with pytest.raises(ValueError, match="no PEM public key"):
        signed.TokenVerifier.from_files([str(private)])


# -- in the relay's core -------------------------------------------------------------------


def signed_relay(**changes: object) -> object:
    return make_relay(tokens=None, token_verifier=VERIFIER, **changes)


def signed_hello(relay: object, value: str) -> tuple[Link, list[object]]:
    link = Link(relay)  # type: ignore[arg-type]
    return link, link.session.received(AgentHello(1, value, "test"))


def test_the_claims_decide_the_names_and_the_subject_is_the_principal() -> None:
    relay = signed_relay()
    relay.reactor.advance(NOW)  # type: ignore[attr-defined]
    one, _ = signed_hello(relay, token(names=["web"]))
    two, _ = signed_hello(relay, token(names=["api"]))  # another token, the same subject
    assert one.session.principal == two.session.principal == "sub:alice"
    assert relay.principal_links.count("sub:alice") == 2  # type: ignore[attr-defined]
    assert isinstance(ask(one, TunnelRequest(1, "tls", {"name": "web"})), TunnelGranted)
    refused = ask(two, TunnelRequest(1, "tls", {"name": "web"}))
    assert refused.code == RefusalCode.NAME_NOT_ALLOWED
    # An expired token is refused at hello like any wrong token.
    late, effects = signed_hello(relay, token(expires_in=-1))
    (error,) = sent(effects)  # type: ignore[arg-type]
    assert isinstance(error, ErrorMessage) and error.code == ErrorReason.UNAUTHORIZED
    assert late.session.state is LinkState.ENDING


def test_links_are_closed_at_expiry_and_on_revocation() -> None:
    relay = signed_relay()
    relay.reactor.advance(NOW)  # type: ignore[attr-defined]
    expiring, _ = signed_hello(relay, token(expires_in=60))
    revoked, _ = signed_hello(relay, token("bob", token_id="b1"))
    kept, _ = signed_hello(relay, token("carol"))
    relay.expire_links()  # type: ignore[attr-defined]
    assert expiring.performed == []
    relay.reactor.advance(60)  # type: ignore[attr-defined]
    relay.expire_links()  # type: ignore[attr-defined]
    (error,) = sent(expiring.performed)
    assert error.message == "the token expired" and goaways(expiring.performed) == [
        ErrorCode.UNAUTHORIZED
    ]
    relay.set_revoked(frozenset({"b1"}))  # type: ignore[attr-defined]
    (error,) = sent(revoked.performed)
    assert "no longer accepts" in error.message
    assert kept.performed == []
