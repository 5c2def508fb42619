"""Bearer tokens: verification with HS256 pinned, and per-device, per-scope authorization."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest

from gallery_server import auth
from gallery_server.errors import PermissionDenied, Unauthenticated

from ..conftest import JWT_SECRET

OTHER_SECRET = "another-secret-" + "y" * 40


def _encode(claims: dict, *, secret: str = JWT_SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, secret, algorithm=algorithm)


def _claims(**overrides: object) -> dict:
    now = int(time.time())
    claims: dict = {
        "sub": "alice",
        "devices": ["cam1", "cam2"],
        "scope": "gallery:read gallery:write",
        "iat": now,
        "exp": now + 600,
    }
    for key, value in overrides.items():
        if value is None:
            claims.pop(key, None)
        else:
            claims[key] = value
    return claims


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unauthenticated(token: str, reason: str, secret: str = JWT_SECRET) -> Unauthenticated:
    with pytest.raises(Unauthenticated) as info:
        auth.verify(token, secret)
    assert info.value.reason == reason
    return info.value


# -- verify -------------------------------------------------------------------------------------


def test_verify_valid_token() -> None:
    principal = auth.verify(_encode(_claims()), JWT_SECRET)
    assert principal == auth.Principal(
        "alice", frozenset({"cam1", "cam2"}), frozenset({auth.READ, auth.WRITE})
    )


def test_verify_minted_token(mint) -> None:  # type: ignore[no-untyped-def]
    principal = auth.verify(mint(devices=["d1"], scope=auth.READ, sub="bob"), JWT_SECRET)
    assert principal.subject == "bob"
    assert principal.devices == frozenset({"d1"})
    assert principal.scopes == frozenset({auth.READ})


def test_verify_defaults_for_missing_devices_and_scope() -> None:
    principal = auth.verify(_encode(_claims(devices=None, scope=None)), JWT_SECRET)
    assert principal.devices == frozenset()
    assert principal.scopes == frozenset()
    with pytest.raises(PermissionDenied):
        principal.require("cam1", auth.READ)


def test_verify_expired_token() -> None:
    now = int(time.time())
    token = _encode(_claims(iat=now - 7200, exp=now - 3600))
    error = _unauthenticated(token, "TOKEN_EXPIRED")
    assert token not in error.message


def test_verify_expired_within_leeway_is_accepted() -> None:
    token = _encode(_claims(exp=int(time.time()) - 5))
    assert auth.verify(token, JWT_SECRET).subject == "alice"


def test_verify_expired_beyond_leeway_is_refused() -> None:
    token = _encode(_claims(exp=int(time.time()) - auth.LEEWAY_SECONDS - 30))
    _unauthenticated(token, "TOKEN_EXPIRED")


def test_verify_wrong_secret() -> None:
    token = _encode(_claims(), secret=OTHER_SECRET)
    error = _unauthenticated(token, "TOKEN_INVALID")
    assert OTHER_SECRET not in error.message and JWT_SECRET not in error.message
    assert token not in error.message


def test_verify_alg_none_refused() -> None:
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    payload = _b64(json.dumps(_claims()).encode())
    for token in (f"{header}.{payload}.", f"{header}.{payload}"):
        _unauthenticated(token, "TOKEN_INVALID")


def test_verify_alg_none_with_valid_looking_signature_refused() -> None:
    # Header says "none", signature is a real HS256 MAC: still refused (algorithm pinned).
    good = _encode(_claims())
    _, payload, signature = good.split(".")
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    _unauthenticated(f"{header}.{payload}.{signature}", "TOKEN_INVALID")


# Signing with HS512 under the 52-byte test secret warns (key shorter than 64 bytes); irrelevant here.
hs512 = pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")


@hs512
def test_verify_hs512_refused() -> None:
    token = _encode(_claims(), algorithm="HS512")
    _unauthenticated(token, "TOKEN_INVALID")


@hs512
def test_verify_header_alg_swapped_refused() -> None:
    # An HS512 MAC relabelled HS256 does not verify.
    token = _encode(_claims(), algorithm="HS512")
    _, payload, signature = token.split(".")
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    _unauthenticated(f"{header}.{payload}.{signature}", "TOKEN_INVALID")


def test_verify_missing_exp_refused() -> None:
    _unauthenticated(_encode(_claims(exp=None)), "TOKEN_INVALID")


def test_verify_missing_sub_refused() -> None:
    _unauthenticated(_encode(_claims(sub=None)), "TOKEN_INVALID")


@pytest.mark.parametrize("devices", ["cam1", {"cam1": True}, 1, [1, 2], ["cam1", None], [["cam1"]]])
def test_verify_devices_not_a_list_of_strings_refused(devices: object) -> None:
    _unauthenticated(_encode(_claims(devices=devices)), "TOKEN_INVALID")


@pytest.mark.parametrize("scope", [["gallery:read"], 1, {"gallery:read": 1}])
def test_verify_scope_not_a_string_refused(scope: object) -> None:
    _unauthenticated(_encode(_claims(scope=scope)), "TOKEN_INVALID")


@pytest.mark.parametrize(
    "token", ["", "x", "a.b", "a.b.c", "not a token at all", "Bearer abc", "....", "\x00"]
)
def test_verify_garbage_refused(token: str) -> None:
    _unauthenticated(token, "TOKEN_INVALID")


def test_verify_tampered_payload_refused() -> None:
    header, _, signature = _encode(_claims()).split(".")
    payload = _b64(json.dumps(_claims(devices=["*"])).encode())
    _unauthenticated(f"{header}.{payload}.{signature}", "TOKEN_INVALID")


def test_verify_not_yet_valid_refused() -> None:
    now = int(time.time())
    _unauthenticated(_encode(_claims(nbf=now + 3600, exp=now + 7200)), "TOKEN_INVALID")


def test_mint_roundtrip_and_ttl() -> None:
    token = auth.mint(JWT_SECRET, subject="s", devices=["*"], scope="gallery:read", ttl_seconds=60)
    claims = jwt.decode(token, JWT_SECRET, algorithms=["HS256"])
    assert claims["exp"] - claims["iat"] == 60
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    expired = auth.mint(JWT_SECRET, subject="s", devices=["*"], scope="", ttl_seconds=-3600)
    _unauthenticated(expired, "TOKEN_EXPIRED")


# -- Principal.require ----------------------------------------------------------------------------


def _denied(principal: auth.Principal, device: str, scope: str) -> PermissionDenied:
    with pytest.raises(PermissionDenied) as info:
        principal.require(device, scope)
    return info.value


def test_require_allows_granted_device_and_scope() -> None:
    principal = auth.Principal("p", frozenset({"cam1"}), frozenset({auth.READ}))
    principal.require("cam1", auth.READ)


def test_require_wildcard_device() -> None:
    principal = auth.Principal("p", frozenset({"*"}), frozenset({auth.READ, auth.WRITE}))
    for device in ("cam1", "other", "x" * 128):
        principal.require(device, auth.READ)
        principal.require(device, auth.WRITE)


def test_require_scope_missing() -> None:
    principal = auth.Principal("p", frozenset({"*"}), frozenset({auth.READ}))
    error = _denied(principal, "cam1", auth.WRITE)
    assert error.reason == "SCOPE_MISSING"
    assert error.metadata == {"scope": auth.WRITE}


def test_require_device_not_allowed() -> None:
    principal = auth.Principal("p", frozenset({"cam1"}), frozenset({auth.READ, auth.WRITE}))
    error = _denied(principal, "cam2", auth.READ)
    assert error.reason == "DEVICE_NOT_ALLOWED"
    assert error.metadata == {"device": "cam2"}


def test_require_scope_checked_before_device() -> None:
    principal = auth.Principal("p", frozenset({"cam1"}), frozenset())
    assert _denied(principal, "cam2", auth.READ).reason == "SCOPE_MISSING"


def test_require_device_match_is_exact() -> None:
    principal = auth.Principal("p", frozenset({"cam1"}), frozenset({auth.READ}))
    for device in ("CAM1", "cam10", "cam", " cam1"):
        assert _denied(principal, device, auth.READ).reason == "DEVICE_NOT_ALLOWED"


def test_require_scope_match_is_exact() -> None:
    # "gallery:read gallery:writer" grants read, not write.
    principal = auth.verify(_encode(_claims(scope="gallery:read gallery:writer")), JWT_SECRET)
    principal.require("cam1", auth.READ)
    assert _denied(principal, "cam1", auth.WRITE).reason == "SCOPE_MISSING"


def test_require_no_devices() -> None:
    principal = auth.Principal("p", frozenset(), frozenset({auth.READ}))
    assert _denied(principal, "cam1", auth.READ).reason == "DEVICE_NOT_ALLOWED"


# -- bearer_token ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header,token",
    [
        ("Bearer abc.def.ghi", "abc.def.ghi"),
        ("bearer abc", "abc"),
        ("BEARER abc", "abc"),
        ("Bearer   abc  ", "abc"),
    ],
)
def test_bearer_token_parsed(header: str, token: str) -> None:
    assert auth.bearer_token(header) == token


@pytest.mark.parametrize("header", [None, ""])
def test_bearer_token_missing(header: str | None) -> None:
    with pytest.raises(Unauthenticated) as info:
        auth.bearer_token(header)
    assert info.value.reason == "TOKEN_MISSING"


@pytest.mark.parametrize(
    "header", ["Bearer", "Bearer ", "Bearer    ", "Basic dXNlcjpwYXNz", "Token abc", "abc.def.ghi", "Bearerabc"]
)
def test_bearer_token_malformed(header: str) -> None:
    with pytest.raises(Unauthenticated) as info:
        auth.bearer_token(header)
    assert info.value.reason == "TOKEN_MALFORMED"
