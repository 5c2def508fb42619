"""Bearer tokens: verification (HS256 by default; RS256/ES256 from a PEM key or a JWKS, pinned
per key type), and per-device, per-scope authorization."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import json
import threading
import time
from collections.abc import Iterator

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from gallery_server import auth
from gallery_server.errors import PermissionDenied, Unauthenticated, Unavailable
from gallery_server.settings import ConfigError, Settings

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
        auth.Verifier(secret=secret).verify(token)
    assert info.value.reason == reason
    return info.value


# -- verify -------------------------------------------------------------------------------------


def test_verify_valid_token() -> None:
    claims = _claims()
    token = _encode(claims)
    principal = auth.Verifier(secret=JWT_SECRET).verify(token)
    assert principal == auth.Principal(
        "alice", frozenset({"cam1", "cam2"}), frozenset({auth.READ, auth.WRITE}),
        expires_at=claims["exp"] + auth.LEEWAY_SECONDS,  # a device's channel ends then
        # A digest, never the token: what the token holds of the server's shares goes by it.
        token_id=hashlib.sha256(token.encode()).hexdigest()[:32],
    )
    assert principal.holder == principal.token_id and principal.token_id not in token


def test_verify_minted_token(mint) -> None:  # type: ignore[no-untyped-def]
    principal = auth.Verifier(secret=JWT_SECRET).verify(mint(devices=["d1"], scope=auth.READ, sub="bob"))
    assert principal.subject == "bob"
    assert principal.devices == frozenset({"d1"})
    assert principal.scopes == frozenset({auth.READ})


def test_verify_defaults_for_missing_devices_and_scope() -> None:
    principal = auth.Verifier(secret=JWT_SECRET).verify(_encode(_claims(devices=None, scope=None)))
    assert principal.devices == frozenset()
    assert principal.scopes == frozenset()
    with pytest.raises(PermissionDenied):
        principal.require("cam1", auth.READ)


def test_verify_expired_token() -> None:
    now = int(time.time())
    token = _encode(_claims(iat=now - 7200, exp=now - 3600))
    error = _unauthenticated(token, "TOKEN_EXPIRED")
    assert token not in error.message


class _Clock:
    """Stands in for auth's `time` module: wall time moves only when a test says so."""

    def __init__(self) -> None:
        self.now = time.time()
        self.skew = 0.0

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.skew += seconds

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return time.monotonic() + self.skew


def test_a_remembered_token_skips_the_signature_until_its_entry_ages_out(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    clock, checks, decode = _Clock(), [], jwt.decode
    monkeypatch.setattr(auth, "time", clock)
    monkeypatch.setattr(auth.jwt, "decode", lambda *a, **k: checks.append(1) or decode(*a, **k))
    verifier, token = auth.Verifier(secret=JWT_SECRET), _encode(_claims())
    first = verifier.verify(token)
    assert verifier.verify(token) == first and len(checks) == 1
    clock.advance(auth.VERIFIED_TTL_SECONDS + 1)
    assert verifier.verify(token) == first and len(checks) == 2


def test_a_remembered_token_still_expires(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    clock = _Clock()
    monkeypatch.setattr(auth, "time", clock)
    verifier = auth.Verifier(secret=JWT_SECRET)
    token = _encode(_claims(exp=int(clock.now) + 5))
    verifier.verify(token)
    clock.advance(5 + auth.LEEWAY_SECONDS)  # PyJWT's boundary: expired; still within the entry's lifetime
    with pytest.raises(Unauthenticated) as info:
        verifier.verify(token)
    assert info.value.reason == "TOKEN_EXPIRED"


def test_remembering_a_token_never_vouches_for_other_bytes() -> None:
    verifier, token = auth.Verifier(secret=JWT_SECRET), _encode(_claims())
    verifier.verify(token)
    header, payload, signature = token.split(".")
    forged_payload = _b64(json.dumps(_claims(devices=["*"])).encode())
    for forged in (f"{header}.{forged_payload}.{signature}", token + "x", token[:-2]):
        with pytest.raises(Unauthenticated):
            verifier.verify(forged)


def test_remembered_tokens_are_bounded(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(auth, "VERIFIED_MAX_ENTRIES", 3)
    verifier = auth.Verifier(secret=JWT_SECRET)
    tokens = [_encode(_claims(sub=f"user{i}")) for i in range(10)]
    for token in tokens:
        verifier.verify(token)
    assert len(verifier._verified) == 3
    assert list(verifier._verified) == tokens[-3:]  # the oldest went first


def test_a_remembered_token_is_verified_again_within_a_minute(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A key withdrawn from a JWKS stops being honoured within a minute of the set's refresh."""
    clock, checks, decode = _Clock(), [], jwt.decode
    monkeypatch.setattr(auth, "time", clock)
    monkeypatch.setattr(auth.jwt, "decode", lambda *a, **k: checks.append(1) or decode(*a, **k))
    verifier, token = auth.Verifier(secret=JWT_SECRET), _encode(_claims())
    verifier.verify(token)
    clock.advance(59)
    verifier.verify(token)
    assert len(checks) == 1
    clock.advance(2)
    verifier.verify(token)
    assert len(checks) == 2


def test_at_most_4096_tokens_are_remembered() -> None:
    verifier = auth.Verifier(secret=JWT_SECRET)
    tokens = [_encode(_claims(sub=f"user{i}")) for i in range(4097)]
    for token in tokens:
        verifier.verify(token)
    assert len(verifier._verified) == 4096
    assert tokens[0] not in verifier._verified


def test_verify_expired_within_leeway_is_accepted() -> None:
    token = _encode(_claims(exp=int(time.time()) - 5))
    assert auth.Verifier(secret=JWT_SECRET).verify(token).subject == "alice"


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
def test_verify_hs384_refused() -> None:
    # With the shared secret only HS256 is accepted, not HMAC with another hash.
    _unauthenticated(_encode(_claims(), algorithm="HS384"), "TOKEN_INVALID")


@pytest.mark.parametrize("token", ["\ud800", "é.é.é", _b64(b'{"alg":"HS256"}') + ".\u00e9.x"])
def test_verify_non_ascii_token_refused(token: str) -> None:
    _unauthenticated(token, "TOKEN_INVALID")


def test_verify_a_boolean_nbf_refused() -> None:
    # true is no NumericDate, though Python counts it as the integer 1.
    _unauthenticated(_encode(_claims(nbf=True)), "TOKEN_INVALID")


@hs512
def test_verify_header_alg_swapped_refused() -> None:
    # An HS512 MAC relabelled HS256 does not verify.
    token = _encode(_claims(), algorithm="HS512")
    _, payload, signature = token.split(".")
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    _unauthenticated(f"{header}.{payload}.{signature}", "TOKEN_INVALID")


def test_verify_missing_exp_refused() -> None:
    _unauthenticated(_encode(_claims(exp=None)), "TOKEN_INVALID")


@pytest.mark.parametrize("claim", ["exp", "nbf"])
def test_verify_a_lifetime_written_as_text_refused(claim: str) -> None:
    """RFC 7519's NumericDate is a JSON number; PyJWT alone took int() of a string."""
    valid = {"exp": int(time.time()) + 600, "nbf": int(time.time()) - 60}[claim]
    assert auth.Verifier(secret=JWT_SECRET).verify(_encode(_claims(**{claim: valid}))).subject == "alice"
    _unauthenticated(_encode(_claims(**{claim: str(valid)})), "TOKEN_INVALID")


@pytest.mark.parametrize("sub", [None, "", "   "], ids=["missing", "empty", "blank"])
def test_verify_missing_or_blank_sub_refused(sub: object) -> None:
    """A token must name its subject: the access log says who did what by it."""
    _unauthenticated(_encode(_claims(sub=sub)), "TOKEN_INVALID")


@pytest.mark.parametrize("devices", ["cam1", {"cam1": True}, 1, [1, 2], ["cam1", None], [["cam1"]]])
def test_verify_devices_not_a_list_of_strings_refused(devices: object) -> None:
    _unauthenticated(_encode(_claims(devices=devices)), "TOKEN_INVALID")


@pytest.mark.parametrize("devices", [["cam1", "*"], ["*", "cam1"]])
def test_verify_wildcard_beside_device_ids_refused(devices: list[str]) -> None:
    """Granting every device would guess the wider meaning of a list the issuer got wrong."""
    _unauthenticated(_encode(_claims(devices=devices)), "TOKEN_INVALID")


def test_verify_repeated_wildcard_grants_every_device() -> None:
    principal = auth.Verifier(secret=JWT_SECRET).verify(_encode(_claims(devices=["*", "*"])))
    assert principal.devices == frozenset({"*"})


@pytest.mark.parametrize("scope", [["gallery:read"], 1, {"gallery:read": 1}])
def test_verify_scope_not_a_string_refused(scope: object) -> None:
    _unauthenticated(_encode(_claims(scope=scope)), "TOKEN_INVALID")


@pytest.mark.parametrize(
    "token", ["", "x", "a.b", "a.b.c", "not a token at all", "Bearer abc", "....", "\x00"]
)
def test_verify_garbage_refused(token: str) -> None:
    _unauthenticated(token, "TOKEN_INVALID")


@pytest.mark.parametrize("token", [
    "a.b.c", "abc.def.ghi", "x", _b64(b"[1]") + ".e30.sig", "e30." + _b64(b"\xff") + ".s",
])
def test_a_token_that_is_no_jwt_is_told_so_in_plain_words(token: str) -> None:
    """Not PyJWT's parser's words ("'utf-8' codec can't decode byte 0xb7 ...")."""
    assert _unauthenticated(token, "TOKEN_INVALID").message == auth.MALFORMED_JWT


def test_a_bad_signature_is_named() -> None:
    header, payload, _ = _encode(_claims()).split(".")
    forged = f"{header}.{payload}.{_b64(b'x' * 32)}"
    assert "Signature verification failed" in _unauthenticated(forged, "TOKEN_INVALID").message


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
    principal = auth.Verifier(secret=JWT_SECRET).verify(_encode(_claims(scope="gallery:read gallery:writer")))
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


# -- asymmetric keys: PEM public key and JWKS ---------------------------------------------------
# Real keys, generated here; a real HTTP server on a thread serves the JWKS and counts requests.


def _rsa_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def _ec_key(curve: ec.EllipticCurve | None = None) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(curve or ec.SECP256R1())


def _public_pem(private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


@pytest.fixture(scope="module")
def rsa_private() -> rsa.RSAPrivateKey:
    return _rsa_key()


@pytest.fixture(scope="module")
def ec_private() -> ec.EllipticCurvePrivateKey:
    return _ec_key()


def _hand_signed(header: dict, claims: dict, key: bytes) -> str:
    """An HS256 token made by hand: PyJWT itself refuses to HMAC with a PEM key."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def _refused(verifier: auth.Verifier, token: str, reason: str) -> None:
    with pytest.raises(Unauthenticated) as info:
        verifier.verify(token)
    assert info.value.reason == reason, info.value.message


def test_rs256_public_key_accepts_its_tokens(rsa_private) -> None:  # type: ignore[no-untyped-def]
    verifier = auth.Verifier(secret=JWT_SECRET, public_key=_public_pem(rsa_private))
    claims = _claims()
    token = jwt.encode(claims, rsa_private, algorithm="RS256")
    principal = verifier.verify(token)
    assert principal == auth.Principal(
        "alice", frozenset({"cam1", "cam2"}), frozenset({auth.READ, auth.WRITE}),
        expires_at=claims["exp"] + auth.LEEWAY_SECONDS, token_id=hashlib.sha256(token.encode()).hexdigest()[:32],
    )


def test_es256_public_key_accepts_its_tokens(ec_private) -> None:  # type: ignore[no-untyped-def]
    verifier = auth.Verifier(secret=JWT_SECRET, public_key=_public_pem(ec_private))
    assert verifier.verify(jwt.encode(_claims(), ec_private, algorithm="ES256")).subject == "alice"


def test_public_key_refuses_another_keys_tokens(rsa_private) -> None:  # type: ignore[no-untyped-def]
    verifier = auth.Verifier(secret=JWT_SECRET, public_key=_public_pem(rsa_private))
    _refused(verifier, jwt.encode(_claims(), _rsa_key(), algorithm="RS256"), "TOKEN_INVALID")


def test_hs256_signed_with_the_public_key_is_refused(rsa_private) -> None:  # type: ignore[no-untyped-def]
    pem = _public_pem(rsa_private)
    verifier = auth.Verifier(secret=JWT_SECRET, public_key=pem)
    forged = _hand_signed({"alg": "HS256", "typ": "JWT"}, _claims(), pem.encode())
    _refused(verifier, forged, "TOKEN_INVALID")


def test_hs256_with_the_secret_is_refused_once_a_public_key_is_configured(rsa_private) -> None:  # type: ignore[no-untyped-def]
    verifier = auth.Verifier(secret=JWT_SECRET, public_key=_public_pem(rsa_private))
    _refused(verifier, _encode(_claims()), "TOKEN_INVALID")


def test_algorithm_pinned_to_the_key_type(rsa_private, ec_private) -> None:  # type: ignore[no-untyped-def]
    # A P-256 key verifies ES256 only; an RSA key RS256 only (no PS256, RS512...).
    ec_verifier = auth.Verifier(secret=JWT_SECRET, public_key=_public_pem(ec_private))
    _refused(ec_verifier, jwt.encode(_claims(), rsa_private, algorithm="RS256"), "TOKEN_INVALID")
    rsa_verifier = auth.Verifier(secret=JWT_SECRET, public_key=_public_pem(rsa_private))
    for algorithm in ("RS512", "PS256"):
        _refused(rsa_verifier, jwt.encode(_claims(), rsa_private, algorithm=algorithm), "TOKEN_INVALID")
    _refused(rsa_verifier, jwt.encode(_claims(), ec_private, algorithm="ES256"), "TOKEN_INVALID")


@pytest.mark.parametrize("mode", ["secret", "public_key", "jwks"])
def test_alg_none_refused_in_every_mode(mode: str, rsa_private, jwks_server) -> None:  # type: ignore[no-untyped-def]
    kwargs = {"secret": {}, "public_key": {"public_key": _public_pem(rsa_private)},
              "jwks": {"jwks_url": jwks_server.url}}[mode]
    jwks_server.publish("k1", rsa_private)  # the kid the forged token names exists
    verifier = auth.Verifier(secret=JWT_SECRET, **kwargs)
    header = _b64(json.dumps({"alg": "none", "typ": "JWT", "kid": "k1"}).encode())
    body = _b64(json.dumps(_claims()).encode())
    for token in (f"{header}.{body}.", f"{header}.{body}.{_b64(b'x' * 32)}"):
        _refused(verifier, token, "TOKEN_INVALID")


def test_issuer_and_audience_checked_when_configured(rsa_private) -> None:  # type: ignore[no-untyped-def]
    verifier = auth.Verifier(
        secret=JWT_SECRET, public_key=_public_pem(rsa_private),
        issuer="https://id.example", audience="gallery",
    )

    def token(**claims: object) -> str:
        return jwt.encode(_claims(**claims), rsa_private, algorithm="RS256")

    assert verifier.verify(token(iss="https://id.example", aud="gallery")).subject == "alice"
    assert verifier.verify(token(iss="https://id.example", aud=["other", "gallery"])).subject == "alice"
    _refused(verifier, token(aud="gallery"), "TOKEN_INVALID")  # no iss
    _refused(verifier, token(iss="https://id.example"), "TOKEN_INVALID")  # no aud
    _refused(verifier, token(iss="https://evil.example", aud="gallery"), "TOKEN_INVALID")
    _refused(verifier, token(iss="https://id.example", aud="other"), "TOKEN_INVALID")


def test_a_public_key_and_a_jwks_url_together_are_refused(rsa_private) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="not both"):
        auth.Verifier(public_key=_public_pem(rsa_private), jwks_url="https://id.example/jwks.json")


def test_issuer_and_audience_unchecked_by_default() -> None:
    verifier = auth.Verifier(secret=JWT_SECRET)
    assert verifier.verify(_encode(_claims(iss="anyone"))).subject == "alice"
    # PyJWT's rule, kept: a token meant for a named audience is not for a server that has none.
    _refused(verifier, _encode(_claims(aud="gallery")), "TOKEN_INVALID")


def test_leeway_applies_to_asymmetric_tokens(rsa_private) -> None:  # type: ignore[no-untyped-def]
    verifier = auth.Verifier(secret=JWT_SECRET, public_key=_public_pem(rsa_private))
    now = int(time.time())
    assert verifier.verify(jwt.encode(_claims(exp=now - 10), rsa_private, algorithm="RS256"))
    _refused(verifier, jwt.encode(_claims(exp=now - 120), rsa_private, algorithm="RS256"),
             "TOKEN_EXPIRED")


@pytest.mark.parametrize(
    "make_pem",
    [
        lambda: "not a key",
        lambda: _rsa_key().private_bytes(  # a private key is not what is asked for
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode(),
        lambda: _public_pem(_rsa_key(1024)),  # too short
        lambda: _public_pem(_ec_key(ec.SECP384R1())),  # ES384: not allowed
        lambda: ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode(),
    ],
    ids=["garbage", "private-key", "rsa-1024", "p384", "ed25519"],
)
def test_unusable_public_keys_refused_at_startup(make_pem, tmp_path) -> None:  # type: ignore[no-untyped-def]
    pem = make_pem()
    with pytest.raises(ValueError):
        auth.public_key_algorithm(pem)
    with pytest.raises(ConfigError):
        Settings.from_env({"GALLERY_DATA_DIR": str(tmp_path), "GALLERY_JWT_SECRET": JWT_SECRET,
                           "GALLERY_JWT_PUBLIC_KEY": pem})


def test_settings_read_the_token_keys(rsa_private, tmp_path) -> None:  # type: ignore[no-untyped-def]
    pem_file = tmp_path / "idp.pem"
    pem_file.write_text(_public_pem(rsa_private))
    base = {"GALLERY_DATA_DIR": str(tmp_path), "GALLERY_JWT_SECRET": JWT_SECRET}
    settings = Settings.from_env({
        **base, "GALLERY_JWT_PUBLIC_KEY_FILE": str(pem_file), "GALLERY_JWT_ISSUER": "https://id",
        "GALLERY_JWT_AUDIENCE": "gallery",
    })
    assert settings.jwt_public_key == _public_pem(rsa_private)
    assert (settings.jwt_issuer, settings.jwt_audience) == ("https://id", "gallery")
    verifier = auth.Verifier.from_settings(settings)
    token = jwt.encode(_claims(iss="https://id", aud="gallery"), rsa_private, algorithm="RS256")
    assert verifier.verify(token).subject == "alice"
    settings = Settings.from_env({**base, "GALLERY_JWT_JWKS_URL": "https://id/jwks.json",
                                  "GALLERY_JWT_JWKS_COOLDOWN": "5"})
    assert (settings.jwt_jwks_url, settings.jwt_jwks_cooldown) == ("https://id/jwks.json", 5.0)
    for bad in (
        {"GALLERY_JWT_PUBLIC_KEY": _public_pem(rsa_private), "GALLERY_JWT_JWKS_URL": "https://id/j"},
        {"GALLERY_JWT_PUBLIC_KEY": "x", "GALLERY_JWT_PUBLIC_KEY_FILE": str(pem_file)},
        {"GALLERY_JWT_PUBLIC_KEY_FILE": str(tmp_path / "missing.pem")},
        {"GALLERY_JWT_JWKS_URL": "file:///etc/passwd"},
        {"GALLERY_JWT_JWKS_URL": "https://id/j", "GALLERY_JWT_JWKS_COOLDOWN": "-1"},
        {"GALLERY_JWT_JWKS_URL": "https://id/j", "GALLERY_JWT_JWKS_LIFESPAN": "0"},
        {"GALLERY_JWT_JWKS_URL": "https://id/j", "GALLERY_JWT_JWKS_COOLDOWN": "nan"},
    ):
        with pytest.raises(ConfigError):
            Settings.from_env({**base, **bad})


class JwksServer:
    """A real HTTP server on a thread that serves a JWKS and counts its requests."""

    def __init__(self) -> None:
        self.keys: list[dict] = []
        self.requests = 0
        self.down = False
        self.body: bytes | None = None  # served instead of the key set when set
        self.release = threading.Event()  # cleared: every request hangs until it is set
        self.release.set()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                server.requests += 1
                server.release.wait(timeout=30)
                if server.down:
                    self.send_error(503)
                    return
                body = server.body if server.body is not None else json.dumps({"keys": server.keys}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:  # keep pytest's output clean
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/.well-known/jwks.json"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def publish(self, kid: str, private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> None:
        rsa_key = isinstance(private, rsa.RSAPrivateKey)
        algorithm = jwt.algorithms.RSAAlgorithm if rsa_key else jwt.algorithms.ECAlgorithm
        jwk = algorithm.to_jwk(private.public_key(), as_dict=True)
        self.keys.append({**jwk, "kid": kid, "use": "sig"})

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    server = JwksServer()
    yield server
    server.close()


def _kid_token(private: object, kid: str, algorithm: str = "RS256", **claims: object) -> str:
    return jwt.encode(_claims(**claims), private, algorithm=algorithm, headers={"kid": kid})


def test_jwks_accepts_rs256_and_es256_by_kid(jwks_server, rsa_private, ec_private) -> None:  # type: ignore[no-untyped-def]
    jwks_server.publish("rsa-1", rsa_private)
    jwks_server.publish("ec-1", ec_private)
    verifier = auth.Verifier(secret=JWT_SECRET, jwks_url=jwks_server.url)
    assert verifier.verify(_kid_token(rsa_private, "rsa-1")).subject == "alice"
    assert verifier.verify(_kid_token(ec_private, "ec-1", "ES256")).subject == "alice"
    assert jwks_server.requests == 1  # cached
    # A token signed by one published key but naming the other's kid fails its signature.
    _refused(verifier, _kid_token(rsa_private, "ec-1"), "TOKEN_INVALID")
    _refused(verifier, _kid_token(ec_private, "rsa-1", "ES256"), "TOKEN_INVALID")
    # An HS256 token "signed" with the RSA key's PEM, naming its kid.
    forged = _hand_signed({"alg": "HS256", "kid": "rsa-1"}, _claims(), _public_pem(rsa_private).encode())
    _refused(verifier, forged, "TOKEN_INVALID")
    _refused(verifier, _encode(_claims()), "TOKEN_INVALID")  # no kid at all


def test_jwks_unknown_kids_cannot_flood_the_identity_provider(jwks_server, rsa_private) -> None:  # type: ignore[no-untyped-def]
    # Tokens are signed up front and the cooldown is 2 s, so a slow CI machine cannot turn
    # signing time into a passed cooldown.
    rotated = _rsa_key()
    random_kids = [_kid_token(rsa_private, f"random-{n}") for n in range(50)]
    other_kids = [_kid_token(rsa_private, f"again-{n}") for n in range(50)]
    rotated_token = _kid_token(rotated, "rsa-2")
    jwks_server.publish("rsa-1", rsa_private)
    verifier = auth.Verifier(secret=JWT_SECRET, jwks_url=jwks_server.url, jwks_cooldown=2.0)
    assert verifier.verify(_kid_token(rsa_private, "rsa-1")).subject == "alice"
    assert jwks_server.requests == 1
    for token in random_kids:  # within the cooldown of that fetch: no refetch at all
        _refused(verifier, token, "TOKEN_KEY_UNKNOWN")
    assert jwks_server.requests == 1
    time.sleep(2.1)
    # After the cooldown, a burst of unknown kids costs exactly one refetch.
    for token in other_kids:
        _refused(verifier, token, "TOKEN_KEY_UNKNOWN")
    assert jwks_server.requests == 2
    # A rotated-in key is found by the next refetch the cooldown allows.
    jwks_server.publish("rsa-2", rotated)
    _refused(verifier, rotated_token, "TOKEN_KEY_UNKNOWN")
    assert jwks_server.requests == 2
    time.sleep(2.1)
    assert verifier.verify(rotated_token).subject == "alice"
    assert jwks_server.requests == 3


def test_jwks_outage_never_locks_out_cached_keys(jwks_server, rsa_private) -> None:  # type: ignore[no-untyped-def]
    """Made-up kids during an identity-provider outage get 503 (and then fail fast), but cannot
    take the tokens of keys already fetched down with them."""
    jwks_server.publish("rsa-1", rsa_private)
    good = _kid_token(rsa_private, "rsa-1")
    made_up = [_kid_token(rsa_private, f"made-up-{n}") for n in range(5)]
    verifier = auth.Verifier(secret=JWT_SECRET, jwks_url=jwks_server.url, jwks_cooldown=2.0)
    assert verifier.verify(good).subject == "alice"
    time.sleep(2.1)  # past the cooldown: an unknown kid may refetch
    jwks_server.down = True
    for token in made_up:  # the first refetch fails; the rest fail fast without fetching
        with pytest.raises(Unavailable):
            verifier.verify(token)
        assert verifier.verify(good).subject == "alice"
    assert jwks_server.requests == 2


def test_a_hanging_identity_provider_holds_one_request_not_all(jwks_server, rsa_private) -> None:  # type: ignore[no-untyped-def]
    """Requests needing a key while another request's fetch hangs are told to retry at once
    (503) instead of queueing behind it: reads run on a few threads (rpc/server.py)."""
    jwks_server.publish("rsa-1", rsa_private)
    good = _kid_token(rsa_private, "rsa-1")
    verifier = auth.Verifier(secret=JWT_SECRET, jwks_url=jwks_server.url, jwks_cooldown=0.0)
    assert verifier.verify(good).subject == "alice"
    jwks_server.release.clear()
    fetching = threading.Thread(target=lambda: _refused_or_unavailable(verifier, _kid_token(rsa_private, "new-1")))
    fetching.start()
    deadline = time.monotonic() + 5
    while jwks_server.requests < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert jwks_server.requests == 2  # the fetch is under way, hanging
    started = time.monotonic()
    for kid in ("new-2", "new-3", "new-4"):
        with pytest.raises(Unavailable):
            verifier.verify(_kid_token(rsa_private, kid))
    assert time.monotonic() - started < 3 * auth.JWKS_WAIT_SECONDS + 1.0
    assert verifier.verify(good).subject == "alice"  # a cached key needs no fetch
    jwks_server.release.set()
    fetching.join(timeout=10)
    assert not fetching.is_alive()


def _refused_or_unavailable(verifier: auth.Verifier, token: str) -> None:
    with pytest.raises((Unauthenticated, Unavailable)):
        verifier.verify(token)


def test_jwks_symmetric_key_is_never_used(jwks_server) -> None:  # type: ignore[no-untyped-def]
    # An `oct` key in the set (a shared secret) must not verify HS256 tokens.
    secret = b"s" * 32
    jwks_server.keys.append({"kty": "oct", "k": _b64(secret), "kid": "oct-1", "alg": "HS256"})
    verifier = auth.Verifier(secret=JWT_SECRET, jwks_url=jwks_server.url)
    token = jwt.encode(_claims(), secret, algorithm="HS256", headers={"kid": "oct-1"})
    _refused(verifier, token, "TOKEN_KEY_UNKNOWN")


def test_jwks_unreachable_is_unavailable_not_unauthenticated(jwks_server, rsa_private) -> None:  # type: ignore[no-untyped-def]
    jwks_server.down = True
    jwks_server.publish("rsa-1", rsa_private)
    token = _kid_token(rsa_private, "rsa-1")
    verifier = auth.Verifier(secret=JWT_SECRET, jwks_url=jwks_server.url, jwks_cooldown=2.0)
    told = []
    for _ in range(20):  # one fetch fails; the next requests fail fast without fetching
        with pytest.raises(Unavailable) as info:
            verifier.verify(token)
        assert info.value.reason == "JWKS_UNAVAILABLE"
        told.append(info.value.retry_after)
    assert jwks_server.requests == 1
    # Each is told when the next fetch will be made (Retry-After): the window's end, drawing near.
    assert told[0] == 2.0 and all(0 < later <= earlier for earlier, later in zip(told, told[1:], strict=False)), told
    jwks_server.down = False
    time.sleep(2.1)
    assert verifier.verify(token).subject == "alice"
    assert jwks_server.requests == 2


@pytest.mark.parametrize("odd_key", [
    {"kty": "oct", "kid": "none-1", "alg": "none"},  # PyJWT raised NotImplementedError for it
    {"kty": "oct", "kid": "oct-1"},  # no `k`
    {"kty": "RSA", "kid": "rsa-bad", "n": "AQAB"},  # no `e`
    "not an object",
], ids=["alg-none", "oct-without-k", "rsa-without-e", "string"])
def test_a_key_pyjwt_cannot_load_leaves_the_rest_of_the_set_usable(jwks_server, rsa_private, odd_key) -> None:  # type: ignore[no-untyped-def]
    """One key in the identity provider's set that PyJWT cannot load made every request a 500
    that fetched the set again; the other keys now verify, from one fetch."""
    jwks_server.publish("rsa-1", rsa_private)
    jwks_server.keys.append(odd_key)
    verifier = auth.Verifier(secret=JWT_SECRET, jwks_url=jwks_server.url, jwks_cooldown=2.0)
    for n in range(5):
        assert verifier.verify(_kid_token(rsa_private, "rsa-1", sub=f"user-{n}")).subject == f"user-{n}"
    assert jwks_server.requests == 1


@pytest.mark.parametrize("body", [
    b"<html><body>maintenance</body></html>", b'{"keys": []}', b"[1, 2]", b'{"keys": "none"}',
    b'{"keys": [{"kty": "oct", "kid": "none-1", "alg": "none"}]}',
], ids=["html", "empty", "array", "keys-not-a-list", "no-loadable-key"])
def test_an_unusable_key_set_is_unavailable_and_fails_fast(jwks_server, rsa_private, body, caplog) -> None:  # type: ignore[no-untyped-def]
    """A set the server cannot use is the identity provider failing: 503 JWKS_UNAVAILABLE (a
    500, or a 401 with a fetch per request, before), one fetch and one log line per retry
    window, and tokens verify again once it serves a good set (checked for one case)."""
    jwks_server.body = body
    token = _kid_token(rsa_private, "rsa-1")
    verifier = auth.Verifier(secret=JWT_SECRET, jwks_url=jwks_server.url, jwks_cooldown=2.0)
    with caplog.at_level("WARNING", logger="gallery_server.auth"):
        for _ in range(10):
            with pytest.raises(Unavailable) as info:
                verifier.verify(token)
            assert info.value.reason == "JWKS_UNAVAILABLE"
    assert jwks_server.requests == 1
    assert len([r for r in caplog.records if "key set" in r.getMessage()]) == 1
    if body.startswith(b"<html>"):  # one case waits out the retry window (2 s)
        jwks_server.body = None
        jwks_server.publish("rsa-1", rsa_private)
        time.sleep(2.1)
        assert verifier.verify(token).subject == "alice"
        assert jwks_server.requests == 2


def test_jwks_keys_not_for_signing_are_never_used(jwks_server, rsa_private) -> None:  # type: ignore[no-untyped-def]
    """A key the set publishes for encryption (`use: enc`) verifies no token, even once the set
    is cached."""
    jwks_server.publish("rsa-1", rsa_private)
    jwks_server.publish("enc-1", rsa_private)
    jwks_server.keys[-1]["use"] = "enc"
    verifier = auth.Verifier(secret=JWT_SECRET, jwks_url=jwks_server.url, jwks_cooldown=2.0)
    assert verifier.verify(_kid_token(rsa_private, "rsa-1")).subject == "alice"
    for _ in range(2):
        _refused(verifier, _kid_token(rsa_private, "enc-1"), "TOKEN_KEY_UNKNOWN")


@pytest.mark.parametrize("change", [{"use": "enc"}, {"kid": None}], ids=["only-encryption-keys", "no-kid"])
def test_a_key_set_with_no_signing_key_named_by_a_kid_is_unavailable(jwks_server, rsa_private, change) -> None:  # type: ignore[no-untyped-def]
    jwks_server.publish("rsa-1", rsa_private)
    jwks_server.keys[0].update(change)
    jwks_server.keys[0] = {k: v for k, v in jwks_server.keys[0].items() if v is not None}
    verifier = auth.Verifier(secret=JWT_SECRET, jwks_url=jwks_server.url, jwks_cooldown=2.0)
    with pytest.raises(Unavailable) as info:
        verifier.verify(_kid_token(rsa_private, "rsa-1"))
    assert info.value.reason == "JWKS_UNAVAILABLE"
