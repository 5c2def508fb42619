"""Configuration, read once from environment variables into an immutable Settings object.

| variable                    | default                  | meaning                                        |
|-----------------------------|--------------------------|------------------------------------------------|
| GALLERY_DATA_DIR            | ./data                   | root of the database, media and drop folders    |
| GALLERY_DATABASE_URL        | sqlite:///<data>/gallery.db | SQLAlchemy URL; postgresql+psycopg://... for PostgreSQL |
| GALLERY_JWT_SECRET          | contents of <data>/jwt-secret | HS256 key for bearer tokens and signed URLs |
| GALLERY_PUBLIC_URL          | http://localhost:8001    | base of the pre-signed upload URLs              |
| GALLERY_UPLOAD_URL_TTL      | 900                      | seconds a pre-signed URL stays valid            |
| GALLERY_GRPC_ADDRESS        | 127.0.0.1:50051          | where the gRPC server listens                   |
| GALLERY_HTTP_ADDRESS        | 0.0.0.0:8001             | where Envoy listens (REST and gRPC)             |
| GALLERY_ENVOY_ADMIN_PORT    | 9901                     | Envoy admin port (always on 127.0.0.1)          |
| GALLERY_ENVOY_SENDS_FILES   | true                     | Envoy sends downloads itself (file_handoff)     |
| GALLERY_MAX_UPLOAD_BYTES    | 17179869184 (16 GiB)     | largest media file accepted                     |
| GALLERY_MAX_THUMBNAIL_BYTES | 10485760 (10 MiB)        | largest thumbnail accepted                      |
| GALLERY_MAX_METADATA_BYTES  | 65536                    | largest metadata JSON accepted                  |
| GALLERY_GRPC_WORKERS        | 256                      | gRPC server threads (a connected device holds one) |
| GALLERY_GRPC_READ_WORKERS   | 4                        | threads of the short reads (list, stats, get)   |
| GALLERY_LOG_LEVEL           | INFO                     | log level                                       |
| GALLERY_PULL_TTL            | 3600                     | seconds an open pull request waits for content  |
| GALLERY_INCOMING_SCAN_SECONDS | 1.0                    | how often the incoming folders are scanned      |
| GALLERY_INCOMING_SETTLE_SECONDS | 2.0                  | how long a file's size and mtime must be stable |
| GALLERY_MAKE_THUMBNAILS     | true                     | this replica makes missing thumbnails (thumbnails.py) |
| GALLERY_UPLOAD_SESSION_TTL  | 86400                    | seconds a resumable upload lives after its last write |
| GALLERY_JWT_PUBLIC_KEY      | (none)                   | PEM public key of tokens (RSA: RS256, P-256: ES256) |
| GALLERY_JWT_PUBLIC_KEY_FILE | (none)                   | file holding that PEM public key                |
| GALLERY_JWT_JWKS_URL        | (none)                   | JWKS of the identity provider (key by `kid`) |
| GALLERY_JWT_JWKS_COOLDOWN   | 60                       | least seconds between refetches for an unknown `kid` |
| GALLERY_JWT_JWKS_LIFESPAN   | 300                      | seconds the fetched key set is cached           |
| GALLERY_JWT_ISSUER          | (none)                   | when set, tokens must carry this `iss`          |
| GALLERY_JWT_AUDIENCE        | (none)                   | when set, tokens must carry this `aud`          |

With a public key or a JWKS URL, bearer tokens must be RS256/ES256 from it and HS256 tokens are
refused (auth.py); the secret (GALLERY_JWT_SECRET or <data>/jwt-secret, which `gallery run`
creates) is still needed: it signs the pre-signed upload URLs.

Limits and reconciliation (README "Durability, limits and faults"); upload counts are per replica:

| variable                           | default  | meaning                                          |
|------------------------------------|----------|--------------------------------------------------|
| GALLERY_MAX_UPLOADS_PER_DEVICE     | 4        | uploads of one device at once                    |
| GALLERY_MAX_UPLOADS_TOTAL          | 48       | uploads at once, all devices; must be < GALLERY_GRPC_WORKERS |
| GALLERY_UPLOAD_IDLE_SECONDS        | 120      | an upload stream waiting this long for a message is aborted |
| GALLERY_UPLOAD_FIRST_MESSAGE_SECONDS | 30     | an upload stream must send its first message within this |
| GALLERY_DOWNLOAD_IDLE_SECONDS      | 120      | a native download whose client takes nothing this long is aborted |
| GALLERY_MAX_UPLOAD_SESSIONS_PER_DEVICE | 1000 | resumable sessions of one device open at once |
| GALLERY_MAX_UPLOAD_URLS_PER_DEVICE | 1000     | pre-signed URLs of one device not used yet and not expired |
| GALLERY_UPLOAD_MESSAGES_IN_FLIGHT  | 8        | upload messages received at once, all streams (receiving.py) |
| GALLERY_MIN_FREE_BYTES             | 1 GiB    | disk headroom: no uploads accepted below it      |
| GALLERY_RECONCILE_INTERVAL_SECONDS | 600      | how often a replica reconciles (reconcile.py)    |
| GALLERY_RECONCILE_GRACE_SECONDS    | 3600     | age before a leftover is removed; >= max(2 x idle, 300) |
| GALLERY_KEEPALIVE_SECONDS          | 20       | HTTP/2 PING interval, and the wait for its answer, on open streams |
| GALLERY_DRAIN_SECONDS              | 5        | on SIGTERM, serve this long reporting NOT_SERVING (`run`: 0) |

Threads: each upload holds a gRPC worker for its whole stream, and so do a device's Connect
stream and a PullEvent waiting for content; GALLERY_MAX_UPLOADS_TOTAL < GALLERY_GRPC_WORKERS keeps
threads for other calls only if devices and pull waits are fewer than the difference: size
GALLERY_GRPC_WORKERS for uploads + connected devices + open pulls + reads.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import secrets
import urllib.parse

from .auth import public_key_algorithm

SECRET_FILE_NAME = "jwt-secret"


class ConfigError(Exception):
    """The environment does not describe a usable configuration."""


@dataclasses.dataclass(frozen=True)
class Settings:
    data_dir: pathlib.Path
    database_url: str
    jwt_secret: str = dataclasses.field(repr=False)
    public_url: str = "http://localhost:8001"
    upload_url_ttl: int = 900
    grpc_address: str = "127.0.0.1:50051"
    http_address: str = "0.0.0.0:8001"
    envoy_admin_port: int = 9901
    max_upload_bytes: int = 16 << 30
    max_thumbnail_bytes: int = 10 << 20
    max_metadata_bytes: int = 64 << 10
    # Threads are made as calls need them; each connected device holds one, so the default leaves
    # room for ~100 devices per replica beside 48 uploads (threads.py).
    grpc_workers: int = 256
    grpc_read_workers: int = 4
    log_level: str = "INFO"
    pull_ttl: int = 3600
    incoming_scan_seconds: float = 1.0
    incoming_settle_seconds: float = 2.0
    make_thumbnails: bool = True
    direct_io: bool = True  # staged uploads written past the page cache (_direct_io.py)
    envoy_sends_files: bool = True  # `gallery run`'s Envoy sends REST downloads itself
    upload_session_ttl: int = 86400
    # -- bearer tokens beyond the HS256 secret (auth.py) --
    jwt_public_key: str = ""  # PEM text
    jwt_jwks_url: str = ""
    jwt_jwks_cooldown: float = 60.0
    jwt_jwks_lifespan: float = 300.0
    jwt_issuer: str = ""
    jwt_audience: str = ""
    # -- limits and reconciliation (one block; README "Reliability") ---------------------------
    max_uploads_per_device: int = 4
    max_uploads_total: int = 48
    upload_idle_seconds: float = 120.0
    upload_first_message_seconds: float = 30.0
    download_idle_seconds: float = 120.0
    # Rows (and, for sessions, files) one device's clients may keep waiting at once: each is kept
    # until it expires (sessions GALLERY_UPLOAD_SESSION_TTL, URLs GALLERY_UPLOAD_URL_TTL + a day).
    max_upload_sessions_per_device: int = 1000
    max_upload_urls_per_device: int = 1000
    # Bounds the messages held in Python and the threads working on them, all uploads together
    # (receiving.py). 4 and 8 measured the same on 2 vCPUs (16 and 64 concurrent uploads); 8
    # leaves room for more cores.
    upload_messages_in_flight: int = 8
    min_free_bytes: int = 1 << 30
    reconcile_interval_seconds: float = 600.0
    reconcile_grace_seconds: float = 3600.0
    # A connection whose peer went away without a word (a device out of coverage, a NAT that
    # forgot it: no FIN, no RST) is found by a PING left unanswered and its streams end: a
    # device's commands go to its next connection (devices.py) instead of waiting ~15 min for TCP
    # to give up. Envoy pings its downstream (answer within this); the gRPC server its clients
    # (answer within 6x this, rpc/server.py).
    keepalive_seconds: float = 20.0
    # On SIGTERM a replica reports NOT_SERVING and goes on serving this long before it stops:
    # Envoy's health check (every second, two failures) sends new calls elsewhere meanwhile.
    drain_seconds: float = 5.0

    @property
    def issuer_tokens(self) -> bool:
        """Bearer tokens come from an identity provider (RS256/ES256); HS256 ones are refused."""
        return bool(self.jwt_public_key or self.jwt_jwks_url)

    @classmethod
    def from_env(cls, env: os._Environ[str] | dict[str, str] = os.environ) -> Settings:
        data_dir = pathlib.Path(env.get("GALLERY_DATA_DIR", "./data")).resolve()
        secret = env.get("GALLERY_JWT_SECRET") or read_secret_file(data_dir)
        if not secret:
            raise ConfigError(
                f"no JWT secret: set GALLERY_JWT_SECRET or create {data_dir / SECRET_FILE_NAME}"
                " (`gallery run` creates one)"
            )
        public_key, jwks_url = _token_keys(env)
        try:
            return cls(
                data_dir=data_dir,
                database_url=env.get("GALLERY_DATABASE_URL") or f"sqlite:///{data_dir / 'gallery.db'}",
                jwt_secret=secret,
                public_url=env.get("GALLERY_PUBLIC_URL", cls.public_url).rstrip("/"),
                upload_url_ttl=int(env.get("GALLERY_UPLOAD_URL_TTL", cls.upload_url_ttl)),
                grpc_address=env.get("GALLERY_GRPC_ADDRESS", cls.grpc_address),
                http_address=env.get("GALLERY_HTTP_ADDRESS", cls.http_address),
                envoy_admin_port=int(env.get("GALLERY_ENVOY_ADMIN_PORT", cls.envoy_admin_port)),
                max_upload_bytes=int(env.get("GALLERY_MAX_UPLOAD_BYTES", cls.max_upload_bytes)),
                max_thumbnail_bytes=int(
                    env.get("GALLERY_MAX_THUMBNAIL_BYTES", cls.max_thumbnail_bytes)
                ),
                max_metadata_bytes=int(
                    env.get("GALLERY_MAX_METADATA_BYTES", cls.max_metadata_bytes)
                ),
                grpc_workers=int(env.get("GALLERY_GRPC_WORKERS", cls.grpc_workers)),
                grpc_read_workers=int(
                    _non_negative(env, "GALLERY_GRPC_READ_WORKERS", cls.grpc_read_workers, positive=True)
                ),
                log_level=env.get("GALLERY_LOG_LEVEL", cls.log_level).upper(),
                pull_ttl=int(env.get("GALLERY_PULL_TTL", cls.pull_ttl)),
                incoming_scan_seconds=float(
                    env.get("GALLERY_INCOMING_SCAN_SECONDS", cls.incoming_scan_seconds)
                ),
                incoming_settle_seconds=float(
                    env.get("GALLERY_INCOMING_SETTLE_SECONDS", cls.incoming_settle_seconds)
                ),
                make_thumbnails=_flag(env.get("GALLERY_MAKE_THUMBNAILS", ""), default=cls.make_thumbnails),
                direct_io=_flag(env.get("GALLERY_DIRECT_IO", ""), default=cls.direct_io),
                envoy_sends_files=_flag(
                    env.get("GALLERY_ENVOY_SENDS_FILES", ""), default=cls.envoy_sends_files
                ),
                upload_session_ttl=int(
                    env.get("GALLERY_UPLOAD_SESSION_TTL", cls.upload_session_ttl)
                ),
                jwt_public_key=public_key,
                jwt_jwks_url=jwks_url,
                jwt_jwks_cooldown=_non_negative(env, "GALLERY_JWT_JWKS_COOLDOWN", cls.jwt_jwks_cooldown),
                jwt_jwks_lifespan=_non_negative(
                    env, "GALLERY_JWT_JWKS_LIFESPAN", cls.jwt_jwks_lifespan, positive=True
                ),
                jwt_issuer=env.get("GALLERY_JWT_ISSUER", ""),
                jwt_audience=env.get("GALLERY_JWT_AUDIENCE", ""),
                drain_seconds=_non_negative(env, "GALLERY_DRAIN_SECONDS", cls.drain_seconds),
                **_limits(env),
            )
        except ValueError as exc:
            raise ConfigError(f"bad numeric setting: {exc}") from None


def _token_keys(env: os._Environ[str] | dict[str, str]) -> tuple[str, str]:
    """The PEM public key and the JWKS URL of bearer tokens, checked now rather than at the
    first request."""
    public_key = env.get("GALLERY_JWT_PUBLIC_KEY", "")
    key_file = env.get("GALLERY_JWT_PUBLIC_KEY_FILE", "")
    jwks_url = env.get("GALLERY_JWT_JWKS_URL", "")
    if public_key and key_file:
        raise ConfigError("set GALLERY_JWT_PUBLIC_KEY or GALLERY_JWT_PUBLIC_KEY_FILE, not both")
    if key_file:
        try:
            public_key = pathlib.Path(key_file).read_text()
        except (OSError, UnicodeError) as exc:
            raise ConfigError(f"GALLERY_JWT_PUBLIC_KEY_FILE: {exc}") from None
    if public_key and jwks_url:
        raise ConfigError("set a JWT public key or GALLERY_JWT_JWKS_URL, not both")
    if public_key:
        try:
            public_key_algorithm(public_key)
        except ValueError as exc:
            raise ConfigError(f"JWT public key: {exc}") from None
    if jwks_url and urllib.parse.urlsplit(jwks_url).scheme not in ("http", "https"):
        raise ConfigError("GALLERY_JWT_JWKS_URL must be an http or https URL")
    return public_key, jwks_url


def _non_negative(
    env: os._Environ[str] | dict[str, str], name: str, default: float, *, positive: bool = False
) -> float:
    value = float(env.get(name, default))
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite number {'>' if positive else '>='} 0")
    return value


_LIMITS: dict[str, tuple[str, type]] = {
    "max_uploads_per_device": ("GALLERY_MAX_UPLOADS_PER_DEVICE", int),
    "max_uploads_total": ("GALLERY_MAX_UPLOADS_TOTAL", int),
    "upload_idle_seconds": ("GALLERY_UPLOAD_IDLE_SECONDS", float),
    "upload_first_message_seconds": ("GALLERY_UPLOAD_FIRST_MESSAGE_SECONDS", float),
    "download_idle_seconds": ("GALLERY_DOWNLOAD_IDLE_SECONDS", float),
    "max_upload_sessions_per_device": ("GALLERY_MAX_UPLOAD_SESSIONS_PER_DEVICE", int),
    "max_upload_urls_per_device": ("GALLERY_MAX_UPLOAD_URLS_PER_DEVICE", int),
    "upload_messages_in_flight": ("GALLERY_UPLOAD_MESSAGES_IN_FLIGHT", int),
    "min_free_bytes": ("GALLERY_MIN_FREE_BYTES", int),
    "reconcile_interval_seconds": ("GALLERY_RECONCILE_INTERVAL_SECONDS", float),
    "reconcile_grace_seconds": ("GALLERY_RECONCILE_GRACE_SECONDS", float),
    "keepalive_seconds": ("GALLERY_KEEPALIVE_SECONDS", float),
}


# The least grace period a server reconciles with (reconcile.py): files in use are locked, so the
# grace guards what locks do not cover (incoming imports, filesystems without locks).
MIN_RECONCILE_GRACE_SECONDS = 300.0


def min_reconcile_grace(upload_idle_seconds: float) -> float:
    """The least safe grace period: twice the upload idle time, and at least 300 s."""
    return max(2 * upload_idle_seconds, MIN_RECONCILE_GRACE_SECONDS)


def _limits(env: os._Environ[str] | dict[str, str]) -> dict[str, object]:
    """The limits block; each must be positive (0 for the free-space headroom), the grace period
    at least min_reconcile_grace(), and the uploads in total fewer than the gRPC workers."""
    values: dict[str, object] = {}
    for field, (variable, kind) in _LIMITS.items():
        text = env.get(variable)
        if text is None:
            continue
        value = kind(text)
        if not math.isfinite(value) or value < 0 or (value == 0 and field != "min_free_bytes"):
            raise ConfigError(f"{variable} must be positive, not {text!r}")
        values[field] = value
    defaults = Settings.__dataclass_fields__
    get = lambda field: values.get(field, defaults[field].default)  # noqa: E731
    floor = min_reconcile_grace(get("upload_idle_seconds"))
    if get("reconcile_grace_seconds") < floor:
        raise ConfigError(
            f"GALLERY_RECONCILE_GRACE_SECONDS must be at least {floor:g} (twice "
            "GALLERY_UPLOAD_IDLE_SECONDS, and 300): a shorter grace may remove an upload's files"
        )
    workers = int(env.get("GALLERY_GRPC_WORKERS", defaults["grpc_workers"].default))
    if get("max_uploads_total") >= workers:
        raise ConfigError(
            "GALLERY_MAX_UPLOADS_TOTAL must be below GALLERY_GRPC_WORKERS: uploads must leave "
            "threads for reads"
        )
    return values


def _flag(text: str, *, default: bool) -> bool:
    value = text.strip().lower()
    if not value:
        return default
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"not a boolean: {text!r} (use true or false)")


def read_secret_file(data_dir: pathlib.Path) -> str:
    path = data_dir / SECRET_FILE_NAME
    return path.read_text().strip() if path.exists() else ""


def ensure_secret_file(data_dir: pathlib.Path) -> str:
    """Return the development secret under data_dir, creating it (mode 0600) if missing."""
    existing = read_secret_file(data_dir)
    if existing:
        return existing
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    fd = os.open(data_dir / SECRET_FILE_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return secret
