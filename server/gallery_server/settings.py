"""Configuration, read once from GALLERY_* environment variables into an immutable Settings object.

README.md's "Configuration" section is the table of every variable, its default and what it means
(the defaults themselves are Settings' field defaults below); "Durability, limits and faults"
explains the limits and reconciliation. With a public key or a JWKS URL, bearer tokens must be
RS256/ES256 from it and HS256 tokens are refused (auth.py); the secret (GALLERY_JWT_SECRET or
<data>/jwt-secret, which `gallery run` creates) is still needed: it signs the pre-signed URLs.

Threads: each upload holds a gRPC worker for its whole stream, and so do a device's Connect
stream and a PullEvent waiting for content; GALLERY_MAX_UPLOADS_TOTAL < GALLERY_GRPC_WORKERS keeps
threads for other calls only if devices and pull waits are fewer than the difference: size
GALLERY_GRPC_WORKERS for uploads + connected devices + open pulls + reads.

Every numeric setting is checked at start against a range chosen from what uses it (_NUMBERS);
an empty variable (`export GALLERY_X=`) means its default, like an unset one.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import pathlib
import secrets
import urllib.parse

from .addresses import ANY_HOST, MAX_PORT, split_address
from .auth import public_key_algorithm
from .folder_claims import claimed_by
from .storage import make_folders

SECRET_FILE_NAME = "jwt-secret"
RESTORE_IN_PROGRESS = ".restore-in-progress"  # `gallery restore` is filling the data folder


class ConfigError(Exception):
    """The environment does not describe a usable configuration."""


@dataclasses.dataclass(frozen=True)
class Settings:
    data_dir: pathlib.Path
    database_url: str
    jwt_secret: str = dataclasses.field(repr=False)
    secret_file: bool = False  # jwt_secret was read from <data>/jwt-secret (GALLERY_JWT_SECRET unset)
    public_url: str = "http://localhost:8001"
    upload_url_ttl: int = 900
    grpc_address: str = "127.0.0.1:50051"
    http_address: str = "0.0.0.0:8001"
    envoy_admin_port: int = 9901
    max_upload_bytes: int = 16 << 30
    max_thumbnail_bytes: int = 10 << 20
    # An event's JSON metadata (a request's headers are limited by rpc/server.py MAX_HEADER_LIST_BYTES).
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
    # (receiving.py). 4 and 8 measured the same on 2 vCPUs while the CPU was what uploads waited
    # for; on a VM with a faster disk and hashing, 8 left the CPUs ~30% idle at 64 uploads at once
    # (a permit covers a message's hashing and direct write, which waits for the disk) and 16 took
    # them from ~525 to ~660 MB/s, at 16 uploads the same (by hand, 2026-12-01, interleaved rounds
    # of 8, 12, 16, 24 and 32; BENCHMARKS.md). Past 16, the peak RSS rose with no more speed.
    upload_messages_in_flight: int = 16
    min_free_bytes: int = 1 << 30
    # Listing pages read lately, kept while their device's events stay as they were (listing.py):
    # ~500 REST pages of 50 events. 0 keeps none.
    list_cache_bytes: int = 8 << 20
    # Bytes of media one device may keep stored (quota.py); 0: no quota.
    max_device_bytes: int = 0
    # Events created longer ago than this are deleted (retention.py); 0: kept for ever.
    retention_days: float = 0.0
    # A deleted capture is remembered while its device announces it, and this long after
    # (devices.py, reconcile.py); 0: for ever.
    deleted_capture_days: float = 90.0
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
    # Web pages on these origins may call the REST API from a browser (envoy_config.cors_policy);
    # none by default, ("*",) for any.
    cors_origins: tuple[str, ...] = ()
    # Where this process serves its Prometheus metrics (metrics.py); "" serves none.
    metrics_address: str = ""

    @property
    def key_secret(self) -> bytes:
        """The JWT secret as the key that signed URLs and drop-folder event ids derive from. A
        command read without one (`needs_secret=False`) must not build what needs it."""
        if not self.jwt_secret:
            raise ConfigError("no JWT secret: this needs GALLERY_JWT_SECRET or the data folder's jwt-secret")
        return self.jwt_secret.encode()

    @property
    def issuer_tokens(self) -> bool:
        """Bearer tokens come from an identity provider (RS256/ES256); HS256 ones are refused."""
        return bool(self.jwt_public_key or self.jwt_jwks_url)

    @classmethod
    def from_env(cls, env: os._Environ[str] | dict[str, str] = os.environ, *, needs_secret: bool = True) -> Settings:
        """`needs_secret` False: for a command that signs and checks nothing (`gallery reconcile`,
        `gallery verify`, `gallery envoy`, `gallery backup`, `gallery restore`), a missing secret is no
        error, nor one this user may not read."""
        data_dir = data_dir_from_env(env)
        secret = env.get("GALLERY_JWT_SECRET", "")
        secret_file = not secret
        if secret_file:
            try:
                secret = read_secret_file(data_dir)
            except PermissionError:
                if needs_secret:
                    raise ConfigError(f"cannot read {data_dir / SECRET_FILE_NAME} (0600): run as the server's"
                                      " user, or set GALLERY_JWT_SECRET") from None
                secret = ""  # a command that needs none (run by the server's group): no secret
        if not secret and needs_secret:
            raise ConfigError(
                f"no JWT secret: set GALLERY_JWT_SECRET or create {data_dir / SECRET_FILE_NAME}"
                " (`gallery run` creates one)"
            )
        if secret:
            _check_secret_strength(secret)
        public_key, jwks_url = _token_keys(env)
        http_address = _address(env, "GALLERY_HTTP_ADDRESS", cls.http_address)
        return cls(
            data_dir=data_dir,
            database_url=_database_url(env, data_dir),
            jwt_secret=secret,
            secret_file=secret_file and bool(secret),
            public_url=_public_url(env, http_address),
            grpc_address=_address(env, "GALLERY_GRPC_ADDRESS", cls.grpc_address),
            http_address=http_address,
            log_level=_log_level(env, cls.log_level),
            make_thumbnails=_flag(env, "GALLERY_MAKE_THUMBNAILS", default=cls.make_thumbnails),
            direct_io=_flag(env, "GALLERY_DIRECT_IO", default=cls.direct_io),
            envoy_sends_files=_flag(env, "GALLERY_ENVOY_SENDS_FILES", default=cls.envoy_sends_files),
            jwt_public_key=public_key,
            jwt_jwks_url=jwks_url,
            jwt_issuer=_text(env, "GALLERY_JWT_ISSUER", ""),
            jwt_audience=_text(env, "GALLERY_JWT_AUDIENCE", ""),
            cors_origins=_cors_origins(env),
            metrics_address=(
                _address(env, "GALLERY_METRICS_ADDRESS", "") if _text(env, "GALLERY_METRICS_ADDRESS", "") else ""
            ),
            **_numbers(env),
        )


def data_dir_from_env(env: os._Environ[str] | dict[str, str] = os.environ) -> pathlib.Path:
    """GALLERY_DATA_DIR, absolute (`gallery run` makes the secret there before Settings reads it)."""
    return pathlib.Path(_text(env, "GALLERY_DATA_DIR", "./data")).resolve()


def prepare_data_dir(path: pathlib.Path) -> None:
    """Create the data folder if needed; one that cannot be made is a ConfigError, not a traceback."""
    try:
        make_folders(path)
    except OSError as exc:
        raise ConfigError(f"GALLERY_DATA_DIR={path}: cannot create it ({exc.strerror or exc})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"GALLERY_DATA_DIR={path}: not writable by this user")


def refuse_while_restoring(data_dir: pathlib.Path) -> None:
    """No server or other command may use a data folder `gallery restore` is filling (or was, and
    was killed)."""
    who = claimed_by(data_dir, RESTORE_IN_PROGRESS)
    if who is not None:
        raise ConfigError(f"GALLERY_DATA_DIR={data_dir}: a backup is being restored into it, or its restore was"
                          f" stopped ({RESTORE_IN_PROGRESS}: process {who}); if that process is gone, remove the"
                          " folder and restore again")


def _database_url(env: os._Environ[str] | dict[str, str], data_dir: pathlib.Path) -> str:
    """GALLERY_DATABASE_URL: SQLite or PostgreSQL, through a driver that is installed (checked
    now: a URL for another database, or for a driver this install lacks, failed at the first
    connection with an import error's traceback)."""
    import sqlalchemy as sa  # here: `gallery agent`, which never reads these settings, needs none

    # Made as a URL, not pasted into one: a "?" or "%" in the folder's name stays in the path.
    # A name that is not UTF-8 cannot be quoted: kept as it is (`gallery run` says what it
    # cannot do with it).
    try:
        default = sa.URL.create("sqlite", database=str(data_dir / "gallery.db")).render_as_string()
    except UnicodeEncodeError:
        default = f"sqlite:///{data_dir / 'gallery.db'}"
    text = _text(env, "GALLERY_DATABASE_URL", default)

    try:
        url = sa.make_url(text)
        if url.get_backend_name() not in ("sqlite", "postgresql"):
            raise ValueError
        url.get_dialect().import_dbapi()
    except (ValueError, ImportError, sa.exc.ArgumentError, sa.exc.NoSuchModuleError):
        raise ConfigError(
            f"GALLERY_DATABASE_URL={shown_database_url(text)}: must be a SQLite or PostgreSQL URL with an"
            " installed driver (sqlite:///path/gallery.db or postgresql+psycopg://user@host/db)"
        ) from None
    if "@" in (url.host or ""):
        # A password holding "@" that is not percent-encoded: the URL is cut at its first "@", and
        # the rest of the password became the host, which every connection error then named.
        raise ConfigError(
            "GALLERY_DATABASE_URL=(not shown: it may hold a password): its host holds '@': an '@' in"
            " the user name or password must be written %40"
        )
    return text


# libpq takes secrets in the query string too (postgresql://host/db?password=...).
_SECRET_QUERY_KEYS = frozenset({"password", "passfile", "sslpassword"})


def shown_database_url(text: str) -> str:
    """GALLERY_DATABASE_URL as an error message may show it: no password, wherever the URL holds one."""
    import sqlalchemy as sa

    hidden = "(not shown: it may hold a password)"
    try:
        url = sa.make_url(text)
    except (sa.exc.ArgumentError, ValueError):  # ValueError: a port that is no number (a ':' in a password)
        return text if "@" not in text and "password" not in text.lower() else hidden
    if "@" in (url.host or ""):  # the rest of a password that holds '@' (_database_url)
        return hidden
    url = url.difference_update_query([key for key in url.query if key.lower() in _SECRET_QUERY_KEYS])
    return url.render_as_string(hide_password=True)


def libpq_connection(text: str) -> tuple[str, dict[str, str]]:
    """A PostgreSQL GALLERY_DATABASE_URL as libpq's tools (pg_dump) take it: the connection URI,
    and the environment variables that carry its secrets, since a command line is visible to every
    local user (ps). SQLAlchemy's form of several hosts (`?host=h1:5432&host=h2:5433`) becomes
    libpq's (`host=h1,h2&port=5432,5433`)."""
    import sqlalchemy as sa

    url = sa.make_url(text)
    env = {"PGPASSWORD": url.password} if url.password else {}
    query: dict[str, str] = {}
    for key, value in url.query.items():
        values = list(value) if isinstance(value, tuple) else [value]
        if key.lower() == "password":
            env["PGPASSWORD"] = values[-1]
        elif key.lower() == "passfile":
            env["PGPASSFILE"] = values[-1]
        elif key.lower() == "sslpassword":  # libpq reads it from the connection string only
            raise ConfigError("GALLERY_DATABASE_URL: a URL with sslpassword cannot be passed to pg_dump"
                              " without showing it to every local user; use a key without a passphrase")
        elif key == "host" and any(":" in v and not v.startswith("/") for v in values):
            hosts, ports = zip(*(v.rsplit(":", 1) if ":" in v and not v.startswith("/") else (v, "")
                                 for v in values), strict=True)
            query["host"], query["port"] = ",".join(hosts), ",".join(ports)
        else:
            query[key] = ",".join(values)
    bare = sa.URL.create("postgresql", url.username, None, url.host, url.port, url.database, query)
    return bare.render_as_string(hide_password=False), env


def _text(env: os._Environ[str] | dict[str, str], name: str, default: str) -> str:
    """The variable's value; empty (an operator's `export GALLERY_X=`) or unset is the default."""
    value = env.get(name, "")
    return value if value.strip() else default


def _token_keys(env: os._Environ[str] | dict[str, str]) -> tuple[str, str]:
    """The PEM public key and the JWKS URL of bearer tokens, checked now rather than at the
    first request."""
    public_key = _text(env, "GALLERY_JWT_PUBLIC_KEY", "")
    key_file = _text(env, "GALLERY_JWT_PUBLIC_KEY_FILE", "")
    jwks_url = _text(env, "GALLERY_JWT_JWKS_URL", "")
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


def _address(env: os._Environ[str] | dict[str, str], name: str, default: str) -> str:
    """host:port ([host]:port for IPv6), checked here: a bad port otherwise fails in Envoy, after
    thousands of lines of its configuration, or as a traceback."""
    text = _text(env, name, default)
    try:
        _, port = split_address(text, default_host="")
    except ValueError:
        port = 0  # not host:port: refused below, as port 0 (any free one) is: clients must know it
    if not port:
        raise ConfigError(
            f"{name}={text}: must be host:port ([host]:port for IPv6) with a port between 1 and"
            f" {MAX_PORT}"
        )
    return text


def _cors_origins(env: os._Environ[str] | dict[str, str]) -> tuple[str, ...]:
    """GALLERY_CORS_ORIGINS: origins separated by commas or spaces, each as a browser sends it in
    its Origin header, or "*" alone. A browser's Origin is compared whole: `https://app.example/`
    or a capital letter would match no request, so such a value is refused with the right one."""
    names = tuple(_text(env, "GALLERY_CORS_ORIGINS", "").replace(",", " ").split())
    if "*" in names and names != ("*",):
        raise ConfigError("GALLERY_CORS_ORIGINS: '*' allows every origin and must stand alone")
    for name in names:
        if name != "*" and (serialized := _serialized_origin(name)) != name:
            raise ConfigError(
                f"GALLERY_CORS_ORIGINS: {name!r} is not an origin as a browser sends it"
                " (scheme://host[:port]: http or https, lower case, an ASCII host, no default"
                " port, no path)" + (f"; write {serialized}" if serialized else "")
            )
    return names


def _serialized_origin(url: str) -> str:
    """The origin of an http(s) URL of no path, as RFC 6454 serializes it; "" for anything else."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:  # a port out of range or not a number
        return ""
    scheme, host = parts.scheme.lower(), parts.hostname or ""
    default_port = {"http": 80, "https": 443}.get(scheme)
    if (
        default_port is None or not host or not host.isascii() or parts.username is not None
        or parts.path.strip("/") or parts.query or parts.fragment
    ):
        return ""
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}" + ("" if port in (None, default_port) else f":{port}")


def _public_url(env: os._Environ[str] | dict[str, str], http_address: str) -> str:
    """GALLERY_PUBLIC_URL, else Envoy's own address: a second gallery on a shared host, given only
    another GALLERY_HTTP_ADDRESS, must not hand out URLs that lead to the first one."""
    text = _text(env, "GALLERY_PUBLIC_URL", "")
    if text:
        parts = urllib.parse.urlsplit(text.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ConfigError(
                f"GALLERY_PUBLIC_URL={text.strip()}: must be an http:// or https:// URL with a host and no"
                " query (e.g. https://gallery.example): pre-signed upload URLs start with it"
            )
        try:
            parts.port  # noqa: B018 - raises on a port that is not one
        except ValueError:
            raise ConfigError(f"GALLERY_PUBLIC_URL={text.strip()}: the port is not a number from 0 to 65535") from None
        return text.strip().rstrip("/")
    return listen_url(http_address)


def listen_url(http_address: str) -> str:
    """The URL of Envoy's listener on this host (a wildcard address is reached as localhost)."""
    host, port = split_address(http_address, default_host=ANY_HOST)
    try:
        wildcard = ipaddress.ip_address(host).is_unspecified
    except ValueError:  # a name
        wildcard = False
    return f"http://localhost:{port}" if wildcard else f"http://{http_address}"


# logging's level names (logs.configure() hands the level to logging, which raises on any other
# name: a traceback at start-up); WARN and FATAL are logging's aliases of WARNING and CRITICAL.
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_LOG_LEVEL_ALIASES = ("WARN", "FATAL")


def _log_level(env: os._Environ[str] | dict[str, str], default: str) -> str:
    text = _text(env, "GALLERY_LOG_LEVEL", default)
    level = text.strip().upper()
    if level not in LOG_LEVELS + _LOG_LEVEL_ALIASES:
        raise ConfigError(f"GALLERY_LOG_LEVEL={text}: must be one of {', '.join(LOG_LEVELS)}")
    return level


# -- numeric settings -------------------------------------------------------------------------
# Every one is checked here, against a range chosen from what consumes it, before anything starts.

A_YEAR = 365 * 86400
INT64_MAX = 2**63 - 1
# An event's metadata goes out as a protobuf Struct, up to 5.5 times the size of its JSON
# (`[0,0,...]`: each 2-byte element is an 11-byte Value): within 4 MiB, Envoy's transcoding buffer
# for a REST GetEvent (envoy.yaml's max_response_body_size) and a gRPC client's default receive limit.
MAX_METADATA_BYTES = 512 << 10

# The least grace period a server reconciles with (reconcile.py): files in use are locked, so the
# grace guards what locks do not cover (incoming imports, filesystems without locks).
MIN_RECONCILE_GRACE_SECONDS = 300.0


def min_reconcile_grace(upload_idle_seconds: float) -> float:
    """The least safe grace period: twice the upload idle time, and at least 300 s."""
    return max(2 * upload_idle_seconds, MIN_RECONCILE_GRACE_SECONDS)


@dataclasses.dataclass(frozen=True)
class _Range:
    variable: str
    kind: type[int] | type[float]
    low: float
    high: float
    unit: str = "seconds"
    above_low: bool = False  # low itself is refused: any positive duration works

    def check(self, text: str) -> int | float:
        try:
            value = self.kind(text)
        except ValueError:  # not a number, or not a whole one
            raise self.refused(text, say_kind=True) from None
        # nan fails every comparison, and the infinities are beyond the finite bounds.
        above = value > self.low if self.above_low else value >= self.low
        if not (above and value <= self.high):
            raise self.refused(text)
        return value

    def refused(self, text: str, *, say_kind: bool = False) -> ConfigError:
        """E.g. `GALLERY_UPLOAD_URL_TTL=-5: must be between 1 and 31536000 seconds`."""
        low, high = _plain(self.low), _plain(self.high)
        span = f"above {low} and at most {high}" if self.above_low else f"between {low} and {high}"
        kind = ("a whole number " if self.kind is int else "a number ") if say_kind else ""
        return ConfigError(f"{self.variable}={text.strip()}: must be {kind}{span} {self.unit}".rstrip())


def _plain(number: float) -> str:
    """31536000, not 3.1536e+07 or 31536000.0."""
    return str(int(number)) if isinstance(number, float) and number.is_integer() else str(number)


# Bounds, by what a value meets (README "Configuration"):
# * durations: at most a year. Added to now as datetimes (URL, pull and session expiries, the
#   grace's cutoff) and waited for by threads (threading.TIMEOUT_MAX, ~292 years): far larger
#   values overflow (every upload-url call was a 500 at 1e17; the reconciler thread died at 1e12).
# * sizes and counts: at most 2**63 - 1, the 64-bit integers of the database (a count's LIMIT),
#   of SQLite's driver and of protobuf (the admin status's min_free_bytes).
# * the keep-alive: at most a day. gRPC takes it in int32 milliseconds, times 6 for the answer's
#   wait (rpc/server.py): above 357913 s that overflows. At least 1 s: PINGs more often only cost.
# 0 is allowed where it means something: no disk headroom, no settle wait (writers that only
# rename complete files in), no JWKS refetch cooldown, no drain.
_NUMBERS: dict[str, _Range] = {
    "upload_url_ttl": _Range("GALLERY_UPLOAD_URL_TTL", int, 1, A_YEAR),
    "envoy_admin_port": _Range("GALLERY_ENVOY_ADMIN_PORT", int, 1, MAX_PORT, unit=""),
    "max_upload_bytes": _Range("GALLERY_MAX_UPLOAD_BYTES", int, 1, INT64_MAX, unit="bytes"),
    "max_thumbnail_bytes": _Range("GALLERY_MAX_THUMBNAIL_BYTES", int, 1, INT64_MAX, unit="bytes"),
    # Every event stores at least `{}`. An event's metadata goes out in one gRPC message (8 MiB,
    # rpc/server.py MAX_MESSAGE_BYTES) as a protobuf Struct, up to 5.5 times its JSON (a list of
    # zeros: 2 bytes of JSON, 11 of Struct each): above 1 MiB, metadata could be stored and never
    # read back.
    "max_metadata_bytes": _Range("GALLERY_MAX_METADATA_BYTES", int, 2, MAX_METADATA_BYTES, unit="bytes"),
    # Uploads take fewer than all of them (checked in _check_together): at least 2.
    "grpc_workers": _Range("GALLERY_GRPC_WORKERS", int, 2, INT64_MAX, unit=""),
    "grpc_read_workers": _Range("GALLERY_GRPC_READ_WORKERS", int, 1, INT64_MAX, unit=""),
    "pull_ttl": _Range("GALLERY_PULL_TTL", int, 1, A_YEAR),
    # Shorter than 10 ms is a spin: each scan lists every device's folders.
    "incoming_scan_seconds": _Range("GALLERY_INCOMING_SCAN_SECONDS", float, 0.01, A_YEAR),
    "incoming_settle_seconds": _Range("GALLERY_INCOMING_SETTLE_SECONDS", float, 0, A_YEAR),
    "upload_session_ttl": _Range("GALLERY_UPLOAD_SESSION_TTL", int, 1, A_YEAR),
    "jwt_jwks_cooldown": _Range("GALLERY_JWT_JWKS_COOLDOWN", float, 0, A_YEAR),
    "jwt_jwks_lifespan": _Range("GALLERY_JWT_JWKS_LIFESPAN", float, 0, A_YEAR, above_low=True),
    "max_uploads_per_device": _Range("GALLERY_MAX_UPLOADS_PER_DEVICE", int, 1, INT64_MAX, unit=""),
    "max_uploads_total": _Range("GALLERY_MAX_UPLOADS_TOTAL", int, 1, INT64_MAX, unit=""),
    "upload_idle_seconds": _Range("GALLERY_UPLOAD_IDLE_SECONDS", float, 0, A_YEAR, above_low=True),
    "upload_first_message_seconds": _Range(
        "GALLERY_UPLOAD_FIRST_MESSAGE_SECONDS", float, 0, A_YEAR, above_low=True
    ),
    "download_idle_seconds": _Range("GALLERY_DOWNLOAD_IDLE_SECONDS", float, 0, A_YEAR, above_low=True),
    "max_upload_sessions_per_device": _Range(
        "GALLERY_MAX_UPLOAD_SESSIONS_PER_DEVICE", int, 1, INT64_MAX, unit=""
    ),
    "max_upload_urls_per_device": _Range("GALLERY_MAX_UPLOAD_URLS_PER_DEVICE", int, 1, INT64_MAX, unit=""),
    "upload_messages_in_flight": _Range("GALLERY_UPLOAD_MESSAGES_IN_FLIGHT", int, 1, INT64_MAX, unit=""),
    "min_free_bytes": _Range("GALLERY_MIN_FREE_BYTES", int, 0, INT64_MAX, unit="bytes"),
    "list_cache_bytes": _Range("GALLERY_LIST_CACHE_BYTES", int, 0, 1 << 40, unit="bytes"),
    "max_device_bytes": _Range("GALLERY_MAX_DEVICE_BYTES", int, 0, INT64_MAX, unit="bytes"),
    # Up to a century: beyond, a cutoff before year 1 is no date at all.
    "retention_days": _Range("GALLERY_RETENTION_DAYS", float, 0, 36500, unit="days"),
    "deleted_capture_days": _Range("GALLERY_DELETED_CAPTURE_DAYS", float, 0, 36500, unit="days"),
    # A pass walks every file and row: more often than each second is a spin.
    "reconcile_interval_seconds": _Range("GALLERY_RECONCILE_INTERVAL_SECONDS", float, 1, A_YEAR),
    "reconcile_grace_seconds": _Range(
        "GALLERY_RECONCILE_GRACE_SECONDS", float, MIN_RECONCILE_GRACE_SECONDS, A_YEAR
    ),  # and at least twice the upload idle time (_check_together)
    "keepalive_seconds": _Range("GALLERY_KEEPALIVE_SECONDS", float, 1, 86400),
    "drain_seconds": _Range("GALLERY_DRAIN_SECONDS", float, 0, A_YEAR),
}


def _numbers(env: os._Environ[str] | dict[str, str]) -> dict[str, int | float]:
    """Every numeric setting given (not empty), each within its range, then checked together."""
    values = {
        field: bounds.check(text)
        for field, bounds in _NUMBERS.items()
        if (text := env.get(bounds.variable, "")).strip()
    }
    _check_together(values)
    return values


def _check_together(values: dict[str, int | float]) -> None:
    """The grace period at least min_reconcile_grace(), a retention and a memory of deleted
    captures of a day or more, and the uploads in total fewer than the gRPC workers."""
    defaults = Settings.__dataclass_fields__
    get = lambda field: values.get(field, defaults[field].default)  # noqa: E731
    floor = min_reconcile_grace(get("upload_idle_seconds"))
    if get("reconcile_grace_seconds") < floor:
        raise ConfigError(
            f"GALLERY_RECONCILE_GRACE_SECONDS must be at least {floor:g} (twice "
            "GALLERY_UPLOAD_IDLE_SECONDS, and 300): a shorter grace may remove an upload's files"
        )
    if 0 < get("retention_days") < 1:
        raise ConfigError(
            f"GALLERY_RETENTION_DAYS={get('retention_days'):g}: must be 0 (keep for ever) or at least 1:"
            " a fraction of a day deletes what was uploaded hours ago, most likely not what was meant"
        )
    if 0 < get("deleted_capture_days") < 1:
        raise ConfigError(
            f"GALLERY_DELETED_CAPTURE_DAYS={get('deleted_capture_days'):g}: must be 0 (for ever) or at least"
            " 1: a device announcing its folder once a day would get back what was deleted"
        )
    if get("max_uploads_total") >= get("grpc_workers"):
        raise ConfigError(
            f"GALLERY_MAX_UPLOADS_TOTAL ({get('max_uploads_total')}) must be below GALLERY_GRPC_WORKERS"
            f" ({get('grpc_workers')}): uploads must leave threads for reads"
        )


def _flag(env: os._Environ[str] | dict[str, str], name: str, *, default: bool) -> bool:
    text = env.get(name, "")
    value = text.strip().lower()
    if not value:
        return default
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={text}: must be true or false")


# RFC 7518 3.2: an HS256 key must be at least as long as the hash, 256 bits. A shorter one (or
# spaces) lets anyone who guesses it mint tokens and sign URLs for every device.
MIN_SECRET_BYTES = 32


def _check_secret_strength(secret: str) -> None:
    if not secret.strip() or len(secret.encode()) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"the JWT secret must be at least {MIN_SECRET_BYTES} bytes and not blank"
            " (e.g. `python3 -c 'import secrets; print(secrets.token_urlsafe(48))'`)"
        )


def read_secret_file(data_dir: pathlib.Path) -> str:
    path = data_dir / SECRET_FILE_NAME
    try:
        return path.read_text(encoding="utf-8").strip() if path.exists() else ""
    except UnicodeDecodeError:
        # One line, and none of the secret: the decoder's own words quote a byte of it.
        raise ConfigError(f"{path} is not UTF-8 text: write the secret as text (for example"
                          " `openssl rand -base64 48`), not raw random bytes") from None


def ensure_secret_file(data_dir: pathlib.Path) -> str:
    """Return the development secret under data_dir, creating it (mode 0600) if missing."""
    existing = read_secret_file(data_dir)
    if existing:
        return existing
    make_folders(data_dir)
    secret = secrets.token_urlsafe(48)
    write_secret_file(data_dir, secret)
    return secret


def write_secret_file(data_dir: pathlib.Path, secret: str) -> None:
    """A new <data>/jwt-secret, 0600 from its creation (never readable by others, even briefly),
    synced."""
    fd = os.open(data_dir / SECRET_FILE_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
        f.flush()
        os.fsync(f.fileno())
