"""Bearer tokens: verification (PyJWT, algorithms pinned per key) and per-device, per-scope
authorization.

Claims: `sub` (required), `exp` (required), `devices` (list of device ids, or ["*"]) and `scope`
(space-separated: `gallery:read`, `gallery:write`, `gallery:device`); `iss` and `aud` when the
server is configured to check them.

Which tokens are accepted depends on the configured key, never on the token's own header:
- the shared secret alone: HS256 only (what `gallery token` mints);
- a PEM public key: RS256 for an RSA key, ES256 for a P-256 key, and nothing else;
- a JWKS URL: the key named by the token's `kid`, RS256 or ES256 as that key's type says.
With a public key or JWKS configured, HS256 tokens are refused: the secret then only signs
upload URLs, and an HS256 token "signed" with the public key (the classic confusion attack) can
never verify. `alg: none` is never in an allowed list, so it is always refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import threading
import time
from collections.abc import Hashable
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.jwk_set_cache import JWKSetCache

from .errors import PermissionDenied, Unauthenticated, Unavailable

log = logging.getLogger(__name__)

READ = "gallery:read"
WRITE = "gallery:write"
DEVICE = "gallery:device"  # a device: announce, keep the command channel, upload pulled content
ADMIN = "gallery:admin"  # operators: the admin status (reconcile.py)
ALGORITHM = "HS256"
LEEWAY_SECONDS = 30
# The one message for a token that does not parse as a JWT, whatever part of it failed.
MALFORMED_JWT = "invalid token: not a JWT (three base64url parts, the first two JSON objects)"
# The asymmetric algorithms accepted, by key type. Pinned: a key of one type never verifies a
# token that names another algorithm.
RS256 = "RS256"
ES256 = "ES256"
# What one JWKS fetch may take before the request that needed it fails (UNAVAILABLE).
JWKS_TIMEOUT_SECONDS = 5.0
# After a failed JWKS fetch, requests fail fast (503) for this long (or the cooldown, if shorter).
JWKS_RETRY_SECONDS = 5.0
# How long a request needing a key waits for another request's fetch of the key set before it is
# told to retry (503): fetches normally take milliseconds, and requests must not pile up behind
# an identity provider that hangs (they run on the few read threads, rpc/server.py).
JWKS_WAIT_SECONDS = 0.25
# Verified tokens are remembered, so a client sending the same token on every request pays for
# its signature once (HS256 ~50 µs, RS256/ES256 more, of a ~300 µs small request). An entry lasts
# at most this long: a key withdrawn from a JWKS stops being honoured within this time of the key
# set's next refresh (GALLERY_JWT_JWKS_LIFESPAN). At most this many are kept, the least recently
# verified going first.
VERIFIED_TTL_SECONDS = 60.0
VERIFIED_MAX_ENTRIES = 4096


@dataclasses.dataclass(frozen=True)
class Principal:
    subject: str
    devices: frozenset[str]
    scopes: frozenset[str]
    # When the token stops being valid (its exp plus the leeway), in time.time() seconds: what
    # outlives one request, a device's command channel, ends then (devices.py).
    expires_at: float = math.inf
    # A digest of the token itself, never the token: what one token holds of the server's shares
    # is counted under it (threads.Holds.held_for), so a token leaked or misused takes no part
    # of another's, even of the same devices.
    token_id: str = ""

    @property
    def holder(self) -> Hashable:
        """Whose holds these are: the token's, or (a principal made without one) its grant's."""
        return self.token_id or self.devices

    @property
    def granted(self) -> int | None:
        """How many devices the token grants; None: every device ('*')."""
        return None if "*" in self.devices else len(self.devices)

    def require(self, device: str, scope: str, *or_scopes: str) -> None:
        """Raise PermissionDenied unless this principal may use `scope`, or one of `or_scopes`, on `device`."""
        self.require_scope(scope, *or_scopes)
        if "*" not in self.devices and device not in self.devices:
            raise PermissionDenied(
                "DEVICE_NOT_ALLOWED", f"token does not grant device {device!r}", device=device
            )


    def require_scope(self, scope: str, *or_scopes: str) -> None:
        """For what comes before any device is named (a channel awaiting its device's hello, an
        upload its first message): `scope`, or one of `or_scopes`."""
        if self.scopes.isdisjoint((scope, *or_scopes)):
            wanted = " or ".join(repr(s) for s in (scope, *or_scopes))
            raise PermissionDenied("SCOPE_MISSING", f"token lacks scope {wanted}", scope=scope)

    def require_every_device(self, scope: str) -> None:
        """For what spans every device (the admin status): `scope`, in a token for all ('*')."""
        self.require_scope(scope)
        if "*" not in self.devices:
            raise PermissionDenied(
                "DEVICE_NOT_ALLOWED", f"{scope} needs a token that grants every device ('*')", device="*",
            )


def bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise Unauthenticated("TOKEN_MISSING", "missing bearer token")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("TOKEN_MALFORMED", "authorization must be 'Bearer <token>'")
    return token.strip()


def public_key_algorithm(pem: str) -> tuple[Any, str]:
    """The (key, algorithm) of a PEM public key: RSA is RS256, EC P-256 is ES256.

    Raises ValueError for anything else (a private key, another curve, Ed25519, garbage)."""
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except (ValueError, TypeError, UnicodeError) as exc:
        raise ValueError(f"not a PEM public key: {exc}") from None
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise ValueError(f"RSA key of {key.key_size} bits: at least 2048 are needed")
        return key, RS256
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key, ES256
    raise ValueError("the public key must be RSA (RS256) or EC P-256 (ES256)")


class Verifier:
    """Verifies bearer tokens against the one kind of key the server is configured with."""

    def __init__(
        self,
        *,
        secret: str = "",
        public_key: str = "",
        jwks_url: str = "",
        issuer: str = "",
        audience: str = "",
        jwks_cooldown: float = 60.0,
        jwks_lifespan: float = 300.0,
    ) -> None:
        if public_key and jwks_url:
            raise ValueError("configure a public key or a JWKS URL, not both")
        self._issuer = issuer or None
        self._audience = audience or None
        self._key: Any = None
        self._algorithms: list[str] = []
        self._jwks: jwt.PyJWKClient | None = None
        self._jwks_failed_at = -math.inf
        self._jwks_retry = min(jwks_cooldown, JWKS_RETRY_SECONDS)
        self._jwks_lock = threading.Lock()
        # token -> (principal, its exp, time.monotonic() when verified); see VERIFIED_TTL_SECONDS.
        self._verified: dict[str, tuple[Principal, int, float]] = {}
        self._verified_lock = threading.Lock()
        if jwks_url:
            # PyJWT's client caches the key set for `lifespan` and refetches it for an unknown
            # `kid` at most once per `cooldown_duration`: tokens with made-up kids cannot turn
            # into a flood of requests to the identity provider.
            self._jwks = _KeySetClient(
                jwks_url, lifespan=jwks_lifespan,
                cooldown_duration=jwks_cooldown, timeout=JWKS_TIMEOUT_SECONDS,
            )
        elif public_key:
            self._key, algorithm = public_key_algorithm(public_key)
            self._algorithms = [algorithm]
        elif secret:
            self._key, self._algorithms = secret, [ALGORITHM]
        else:
            raise ValueError("no key to verify tokens with")

    @classmethod
    def from_settings(cls, settings: Any) -> Verifier:
        return cls(
            secret=settings.jwt_secret,
            public_key=settings.jwt_public_key,
            jwks_url=settings.jwt_jwks_url,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            jwks_cooldown=settings.jwt_jwks_cooldown,
            jwks_lifespan=settings.jwt_jwks_lifespan,
        )

    def verify(self, token: str) -> Principal:
        remembered = self._verified.get(token)
        if remembered is not None:
            principal, expires, verified_at = remembered
            if time.monotonic() - verified_at < VERIFIED_TTL_SECONDS:
                if time.time() >= expires + LEEWAY_SECONDS:  # PyJWT's own rule for `exp`
                    raise Unauthenticated("TOKEN_EXPIRED", "token has expired")
                return principal
        principal, expires = self._verify_signed(token)
        with self._verified_lock:
            self._verified.pop(token, None)  # re-verified: now the most recent
            if len(self._verified) >= VERIFIED_MAX_ENTRIES:
                del self._verified[next(iter(self._verified))]
            self._verified[token] = (principal, expires, time.monotonic())
        return principal

    def _verify_signed(self, token: str) -> tuple[Principal, int]:
        if not token.isascii():  # a JWT is base64url and dots; PyJWT would choke on surrogates
            raise Unauthenticated("TOKEN_INVALID", "invalid token: not ASCII")
        key, algorithms = self._key_for(token)
        require = ["exp", "sub"]
        if self._issuer:
            require.append("iss")
        if self._audience:
            require.append("aud")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                options={"require": require},
                issuer=self._issuer,
                audience=self._audience,
                leeway=LEEWAY_SECONDS,
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("TOKEN_EXPIRED", "token has expired") from None
        except jwt.InvalidSignatureError as exc:  # a DecodeError too, but one worth naming
            raise Unauthenticated("TOKEN_INVALID", f"invalid token: {exc}") from None
        except jwt.DecodeError:
            # PyJWT's words are its parser's ("'utf-8' codec can't decode byte 0xb7 ..."): say what is wrong.
            raise Unauthenticated("TOKEN_INVALID", MALFORMED_JWT) from None
        except jwt.InvalidTokenError as exc:
            # The exception text names the failed check, never the token or the key.
            raise Unauthenticated("TOKEN_INVALID", f"invalid token: {exc}") from None
        principal = dataclasses.replace(_principal(claims), token_id=hashlib.sha256(token.encode()).hexdigest()[:32])
        return principal, int(claims["exp"])  # PyJWT compares int(exp) too

    def _key_for(self, token: str) -> tuple[Any, list[str]]:
        if self._jwks is None:
            return self._key, self._algorithms
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.DecodeError:
            raise Unauthenticated("TOKEN_INVALID", MALFORMED_JWT) from None
        except jwt.InvalidTokenError as exc:  # a JWT, with a header PyJWT refuses (a kid not a string)
            raise Unauthenticated("TOKEN_INVALID", f"invalid token: {exc}") from None
        if not isinstance(kid, str) or not kid:
            raise Unauthenticated("TOKEN_INVALID", "invalid token: the header has no 'kid'")
        # A key in the cached set needs no fetch: while the identity provider is down, tokens of
        # known keys keep working, whatever tokens with made-up kids do meanwhile.
        jwk = self._cached_key(kid) or self._fetch_key(kid)
        # The JWK's type (or its own `alg`) decides the algorithm; only the asymmetric pair is
        # allowed, so an `oct` (shared secret) key published in a JWKS is never used.
        algorithm = jwk.algorithm_name
        expected = rsa.RSAPublicKey if algorithm == RS256 else ec.EllipticCurvePublicKey
        if algorithm not in (RS256, ES256) or not isinstance(jwk.key, expected):
            raise Unauthenticated("TOKEN_KEY_UNKNOWN", "invalid token: its key is not RS256 or ES256")
        return jwk.key, [algorithm]

    def _cached_key(self, kid: str) -> jwt.PyJWK | None:
        assert self._jwks is not None
        cached = self._jwks.jwk_set_cache.get() if self._jwks.jwk_set_cache is not None else None
        return next(
            (key for key in cached.keys if key.key_id == kid and key.public_key_use in ("sig", None)), None
        ) if cached else None

    def _fetch_key(self, kid: str) -> jwt.PyJWK:
        """The key from the identity provider, one fetch at a time. PyJWT retries a failed fetch
        on every call, so while the provider is down every request would wait out a fetch (one
        after another, behind PyJWT's lock): fail fast for a few seconds instead. A request that
        finds a fetch under way waits for it only JWKS_WAIT_SECONDS, so a hanging provider holds
        one thread, not every thread that reads."""
        assert self._jwks is not None
        if not self._jwks_lock.acquire(timeout=JWKS_WAIT_SECONDS):
            # A fetch slower than that wait most likely hangs: it ends by JWKS_TIMEOUT_SECONDS.
            raise _jwks_unavailable(retry_after=1)
        try:
            if (since_failure := time.monotonic() - self._jwks_failed_at) < self._jwks_retry:
                raise _jwks_unavailable(retry_after=self._jwks_retry - since_failure)
            # The fetch we waited for may have brought this key.
            cached = self._cached_key(kid)
            if cached is not None:
                return cached
            return self._jwks.get_signing_key(kid)
        except jwt.PyJWKClientConnectionError as exc:  # _UnusableKeySet included
            self._jwks_failed_at = time.monotonic()  # logged once per retry window, not per request
            log.warning("the identity provider's key set could not be used", extra={"error": str(exc)})
            raise _jwks_unavailable(retry_after=self._jwks_retry) from None
        except jwt.PyJWTError:
            raise Unauthenticated(
                "TOKEN_KEY_UNKNOWN", "invalid token: no known key has its 'kid'"
            ) from None
        finally:
            self._jwks_lock.release()


class _UnusableKeySet(jwt.PyJWKClientConnectionError):
    """The identity provider answered, but with no key set this server can use: as unavailable
    as no answer (503, retried after a few seconds), not a reason to refuse the token (401)."""


class _FilteredSetCache(JWKSetCache):
    """PyJWT's cache of the key set, storing only the set _KeySetClient returns: PyJWT's
    fetch_data also puts the set as fetched, and parsing that raised for the keys dropped."""

    def put(self, jwk_set: Any) -> None:
        if not isinstance(jwk_set, dict):  # the parsed set get_jwk_set puts, or None (clear)
            super().put(jwk_set)


class _KeySetClient(jwt.PyJWKClient):
    """PyJWT's client, keeping only the keys PyJWT can load: one key it cannot (an `alg` of
    `none`, an `oct` key without `k`) made it refuse the whole set with an exception of its own,
    a 500 on every request, each fetching the set again. A set that is not JSON, or has no
    signing key left, is _UnusableKeySet."""

    def __init__(self, uri: str, *, lifespan: float, **kwargs: Any) -> None:
        super().__init__(uri, cache_jwk_set=True, lifespan=lifespan, **kwargs)
        self.jwk_set_cache = _FilteredSetCache(lifespan)

    def fetch_data(self) -> Any:
        try:
            data = super().fetch_data()
        except jwt.PyJWKClientConnectionError:
            raise
        except Exception as exc:  # not JSON (an error page), not an object
            raise _UnusableKeySet(f"the JWKS is not a JSON object: {exc}") from exc
        keys = data.get("keys")
        usable = [key for key in keys if _loads(key)] if isinstance(keys, list) else []
        if not any(key.get("use") in ("sig", None) and key.get("kid") for key in usable):
            raise _UnusableKeySet(f"the JWKS has no signing key with a kid ({len(usable)} usable keys)")
        return {**data, "keys": usable}


def _loads(key: object) -> bool:
    try:
        jwt.PyJWK(key)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 (PyJWT raises more than its own errors for odd keys)
        return False
    return True


def _jwks_unavailable(*, retry_after: float) -> Unavailable:
    """`retry_after`: when this server fetches the key set again."""
    return Unavailable("JWKS_UNAVAILABLE", "the token's keys could not be fetched; try again later",
                       retry_after=retry_after)


def wildcard_beside_ids(devices: list[str]) -> bool:
    """["cam-1", "*"] reads as a mistake either way: granting every device would guess the wider
    of its two meanings, so such a token is refused (and `gallery token` mints none)."""
    return "*" in devices and len(set(devices)) > 1


def _principal(claims: dict[str, Any]) -> Principal:
    for name in ("exp", "nbf"):
        # A NumericDate is a JSON number (RFC 7519). PyJWT takes int() of it, so "9999999999"
        # passed: a token whose lifetime a lenient issuer wrote as text.
        if name in claims and (isinstance(claims[name], bool) or not isinstance(claims[name], int | float)):
            raise Unauthenticated("TOKEN_INVALID", f"invalid token: '{name}' must be a number")
    devices = claims.get("devices", [])
    scope = claims.get("scope", "")
    if not isinstance(devices, list) or not all(isinstance(d, str) for d in devices):
        raise Unauthenticated("TOKEN_INVALID", "invalid token: 'devices' must be a list of strings")
    if wildcard_beside_ids(devices):
        raise Unauthenticated("TOKEN_INVALID", "invalid token: '*' in 'devices' must stand alone")
    if not isinstance(scope, str):
        raise Unauthenticated("TOKEN_INVALID", "invalid token: 'scope' must be a string")
    subject = str(claims["sub"])
    if not subject.strip():  # the access log says who did what by it
        raise Unauthenticated("TOKEN_INVALID", "invalid token: 'sub' is empty")
    return Principal(
        subject=subject, devices=frozenset(devices), scopes=frozenset(scope.split()),
        expires_at=int(claims["exp"]) + LEEWAY_SECONDS,
    )


def mint(
    secret: str, *, subject: str, devices: list[str], scope: str, ttl_seconds: int = 86400,
    issuer: str = "", audience: str = "",
) -> str:
    """An HS256 token; with the `iss` and `aud` the server requires when it is told to
    (GALLERY_JWT_ISSUER, GALLERY_JWT_AUDIENCE), or it would refuse its own tokens."""
    now = int(time.time())
    claims: dict[str, object] = {
        "sub": subject,
        "devices": devices,
        "scope": scope,
        "iat": now,
        "exp": now + ttl_seconds,
    }
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    return jwt.encode(claims, secret, algorithm=ALGORITHM)
