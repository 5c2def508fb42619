"""Bearer tokens: verification (PyJWT, HS256 pinned) and per-device, per-scope authorization.

Claims: `sub` (required), `exp` (required), `devices` (list of device ids, or ["*"]) and `scope`
(space-separated: `gallery:read`, `gallery:write`, `gallery:device`).
"""

from __future__ import annotations

import dataclasses
import time

import jwt

from .errors import PermissionDenied, Unauthenticated

READ = "gallery:read"
WRITE = "gallery:write"
DEVICE = "gallery:device"  # a device: announce, keep the command channel, upload pulled content
ADMIN = "gallery:admin"  # operators: the admin status (reconcile.py)
ALGORITHM = "HS256"
LEEWAY_SECONDS = 30


@dataclasses.dataclass(frozen=True)
class Principal:
    subject: str
    devices: frozenset[str]
    scopes: frozenset[str]

    def require(self, device: str, scope: str) -> None:
        """Raise PermissionDenied unless this principal may use `scope` on `device`."""
        if scope not in self.scopes:
            raise PermissionDenied(
                "SCOPE_MISSING", f"token lacks scope {scope!r}", scope=scope
            )
        if "*" not in self.devices and device not in self.devices:
            raise PermissionDenied(
                "DEVICE_NOT_ALLOWED", f"token does not grant device {device!r}", device=device
            )


def bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise Unauthenticated("TOKEN_MISSING", "missing bearer token")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("TOKEN_MALFORMED", "authorization must be 'Bearer <token>'")
    return token.strip()


def verify(token: str, secret: str) -> Principal:
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            options={"require": ["exp", "sub"]},
            leeway=LEEWAY_SECONDS,
        )
    except jwt.ExpiredSignatureError:
        raise Unauthenticated("TOKEN_EXPIRED", "token has expired") from None
    except jwt.InvalidTokenError as exc:
        # The exception text names the failed check, never the token or the key.
        raise Unauthenticated("TOKEN_INVALID", f"invalid token: {exc}") from None
    devices = claims.get("devices", [])
    scope = claims.get("scope", "")
    if not isinstance(devices, list) or not all(isinstance(d, str) for d in devices):
        raise Unauthenticated("TOKEN_INVALID", "invalid token: 'devices' must be a list of strings")
    if not isinstance(scope, str):
        raise Unauthenticated("TOKEN_INVALID", "invalid token: 'scope' must be a string")
    return Principal(
        subject=str(claims["sub"]), devices=frozenset(devices), scopes=frozenset(scope.split())
    )


def mint(
    secret: str, *, subject: str, devices: list[str], scope: str, ttl_seconds: int = 86400
) -> str:
    now = int(time.time())
    claims = {
        "sub": subject,
        "devices": devices,
        "scope": scope,
        "iat": now,
        "exp": now + ttl_seconds,
    }
    return jwt.encode(claims, secret, algorithm=ALGORITHM)
