"""Settings.from_env: every value is checked at start, and a refused one is a ConfigError naming
the variable, the value and what is accepted (never a traceback, never a failure later on)."""

from __future__ import annotations

import dataclasses
import datetime
import pathlib
import re
import threading

import pytest

from gallery_server import settings as settings_module
from gallery_server.settings import ConfigError, Settings

SECRET = "s" * 40


def env(tmp_path, **values: str) -> dict[str, str]:
    return {"GALLERY_DATA_DIR": str(tmp_path), "GALLERY_JWT_SECRET": SECRET, **values}


def refusal(tmp_path, variable: str, value: str) -> str:
    with pytest.raises(ConfigError) as refused:
        Settings.from_env(env(tmp_path, **{variable: value}))
    return str(refused.value)


# -- numbers -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("variable", "value"), [
    ("GALLERY_UPLOAD_URL_TTL", "-5"),  # every URL issued already expired
    ("GALLERY_UPLOAD_URL_TTL", "0"),
    ("GALLERY_UPLOAD_URL_TTL", "99999999999999999"),  # every upload-url call a 500 (datetime)
    ("GALLERY_INCOMING_SCAN_SECONDS", "0"),  # the importer spins
    ("GALLERY_INCOMING_SCAN_SECONDS", "nan"),
    ("GALLERY_INCOMING_SCAN_SECONDS", "-1"),
    ("GALLERY_INCOMING_SCAN_SECONDS", "inf"),
    ("GALLERY_RECONCILE_INTERVAL_SECONDS", "1e12"),  # the reconciler thread died (OverflowError)
    ("GALLERY_RECONCILE_INTERVAL_SECONDS", "0"),
    ("GALLERY_MAX_UPLOAD_BYTES", "0"),
    ("GALLERY_MAX_UPLOAD_BYTES", "-1"),
    ("GALLERY_MAX_UPLOAD_BYTES", str(2**63)),
    ("GALLERY_MAX_THUMBNAIL_BYTES", "0"),
    ("GALLERY_MAX_THUMBNAIL_BYTES", "-1"),
    ("GALLERY_MAX_METADATA_BYTES", "0"),
    ("GALLERY_MAX_METADATA_BYTES", "1"),  # less than `{}`: every upload refused
    ("GALLERY_MAX_METADATA_BYTES", str((512 << 10) + 1)),  # its Struct could pass 4 MiB
    ("GALLERY_PULL_TTL", "0"),
    ("GALLERY_PULL_TTL", "-1"),
    ("GALLERY_PULL_TTL", "99999999999999999"),
    ("GALLERY_UPLOAD_SESSION_TTL", "0"),
    ("GALLERY_UPLOAD_SESSION_TTL", "-1"),
    ("GALLERY_UPLOAD_SESSION_TTL", "99999999999999999"),
    ("GALLERY_INCOMING_SETTLE_SECONDS", "-1"),
    ("GALLERY_INCOMING_SETTLE_SECONDS", "nan"),
    ("GALLERY_KEEPALIVE_SECONDS", "0.001"),
    ("GALLERY_KEEPALIVE_SECONDS", "1e12"),  # OverflowError (gRPC's int32 milliseconds)
    ("GALLERY_KEEPALIVE_SECONDS", "0"),
    ("GALLERY_DRAIN_SECONDS", "1e12"),
    ("GALLERY_DRAIN_SECONDS", "-1"),
    ("GALLERY_UPLOAD_IDLE_SECONDS", "0"),
    ("GALLERY_UPLOAD_IDLE_SECONDS", "1e12"),
    ("GALLERY_DOWNLOAD_IDLE_SECONDS", "1e12"),
    ("GALLERY_JWT_JWKS_LIFESPAN", "1e12"),
    ("GALLERY_RECONCILE_GRACE_SECONDS", "1e12"),
    ("GALLERY_MAX_UPLOAD_URLS_PER_DEVICE", str(2**63)),  # a SQL LIMIT overflows
    ("GALLERY_GRPC_READ_WORKERS", "0"),
    ("GALLERY_GRPC_READ_WORKERS", "1.5"),
    ("GALLERY_ENVOY_ADMIN_PORT", "0"),
    ("GALLERY_ENVOY_ADMIN_PORT", "70000"),
])
def test_a_number_out_of_its_range_is_refused_with_its_variable_value_and_range(tmp_path, variable, value):
    message = refusal(tmp_path, variable, value)
    assert message.startswith(f"{variable}={value}: must be ")
    assert " and " in message  # the accepted range


def test_the_message_says_the_range(tmp_path):
    assert refusal(tmp_path, "GALLERY_UPLOAD_URL_TTL", "-5") == (
        "GALLERY_UPLOAD_URL_TTL=-5: must be between 1 and 31536000 seconds"
    )
    assert refusal(tmp_path, "GALLERY_UPLOAD_IDLE_SECONDS", "0") == (
        "GALLERY_UPLOAD_IDLE_SECONDS=0: must be above 0 and at most 31536000 seconds"
    )
    assert refusal(tmp_path, "GALLERY_ENVOY_ADMIN_PORT", "70000") == (
        "GALLERY_ENVOY_ADMIN_PORT=70000: must be between 1 and 65535"
    )
    assert refusal(tmp_path, "GALLERY_RECONCILE_GRACE_SECONDS", "299") == (
        "GALLERY_RECONCILE_GRACE_SECONDS=299: must be between 300 and 31536000 seconds"
    )
    assert refusal(tmp_path, "GALLERY_INCOMING_SCAN_SECONDS", " 0 ") == (
        "GALLERY_INCOMING_SCAN_SECONDS=0: must be between 0.01 and 31536000 seconds"
    )


@pytest.mark.parametrize("variable", [
    "GALLERY_UPLOAD_URL_TTL", "GALLERY_MAX_UPLOAD_BYTES", "GALLERY_GRPC_WORKERS", "GALLERY_PULL_TTL",
    "GALLERY_ENVOY_ADMIN_PORT", "GALLERY_MAX_UPLOADS_TOTAL", "GALLERY_INCOMING_SCAN_SECONDS",
    "GALLERY_KEEPALIVE_SECONDS", "GALLERY_JWT_JWKS_COOLDOWN",
])
def test_a_value_that_is_not_a_number_names_its_variable(tmp_path, variable):
    message = refusal(tmp_path, variable, "abc")
    assert message.startswith(f"{variable}=abc: must be a ")
    assert "number between" in message


@pytest.mark.parametrize(("variable", "value", "field", "expected"), [
    ("GALLERY_UPLOAD_URL_TTL", "1", "upload_url_ttl", 1),
    ("GALLERY_UPLOAD_URL_TTL", "31536000", "upload_url_ttl", 31536000),
    ("GALLERY_INCOMING_SCAN_SECONDS", "0.05", "incoming_scan_seconds", 0.05),
    # 0: a file is taken at first sight, for writers that all rename complete files in.
    ("GALLERY_INCOMING_SETTLE_SECONDS", "0", "incoming_settle_seconds", 0),
    ("GALLERY_MIN_FREE_BYTES", "0", "min_free_bytes", 0),  # no headroom
    ("GALLERY_MAX_DEVICE_BYTES", "0", "max_device_bytes", 0),  # no quota
    ("GALLERY_MAX_DEVICE_BYTES", "1099511627776", "max_device_bytes", 1 << 40),
    ("GALLERY_DRAIN_SECONDS", "0", "drain_seconds", 0),
    ("GALLERY_JWT_JWKS_COOLDOWN", "0", "jwt_jwks_cooldown", 0),
    ("GALLERY_KEEPALIVE_SECONDS", "1", "keepalive_seconds", 1),
    ("GALLERY_KEEPALIVE_SECONDS", "86400", "keepalive_seconds", 86400),
    ("GALLERY_RECONCILE_INTERVAL_SECONDS", str(7 * 86400), "reconcile_interval_seconds", 7 * 86400),
    ("GALLERY_MAX_METADATA_BYTES", "2", "max_metadata_bytes", 2),
    ("GALLERY_MAX_UPLOAD_BYTES", str(2**63 - 1), "max_upload_bytes", 2**63 - 1),
    ("GALLERY_ENVOY_ADMIN_PORT", "65535", "envoy_admin_port", 65535),
    ("GALLERY_UPLOAD_FIRST_MESSAGE_SECONDS", "0.5", "upload_first_message_seconds", 0.5),
])
def test_values_within_their_range_are_taken(tmp_path, variable, value, field, expected):
    assert getattr(Settings.from_env(env(tmp_path, **{variable: value})), field) == expected


def test_every_numeric_field_is_checked_and_its_bounds_fit_what_uses_it():
    numbers = settings_module._NUMBERS
    numeric = {f.name for f in Settings.__dataclass_fields__.values() if f.type in ("int", "float")}
    assert set(numbers) == numeric
    now = datetime.datetime.now(datetime.UTC)
    for field, bounds in numbers.items():
        default = Settings.__dataclass_fields__[field].default
        assert bounds.low <= default <= bounds.high, field  # the default is within its range
        if bounds.unit == "seconds":
            now + datetime.timedelta(seconds=bounds.high)  # expiries: no OverflowError
            now - datetime.timedelta(seconds=bounds.high)  # the reconciler's cutoff
            assert bounds.high <= threading.TIMEOUT_MAX, field  # waits of threads
    keepalive = numbers["keepalive_seconds"].high
    assert 6 * round(keepalive * 1000) < 2**31  # gRPC's int32 milliseconds (rpc/server.py)


def test_the_checks_that_existed_still_hold(tmp_path):
    for values in (
        {"GALLERY_RECONCILE_GRACE_SECONDS": "299"},
        {"GALLERY_UPLOAD_IDLE_SECONDS": "1801"},  # the default grace is below 2 x idle
        {"GALLERY_MAX_UPLOADS_TOTAL": "256"},
        {"GALLERY_JWT_JWKS_COOLDOWN": "-1"},
        {"GALLERY_JWT_JWKS_LIFESPAN": "0"},
        {"GALLERY_UPLOAD_MESSAGES_IN_FLIGHT": "0"},
    ):
        with pytest.raises(ConfigError):
            Settings.from_env(env(tmp_path, **values))



A_YEAR, INT64_MAX = 31536000, 2**63 - 1
# README "Configuration": variable, whole numbers or not, the least and the most accepted, and
# whether the least itself is refused (durations that must be above 0).
RANGES = [
    ("GALLERY_UPLOAD_URL_TTL", int, 1, A_YEAR, False),
    ("GALLERY_ENVOY_ADMIN_PORT", int, 1, 65535, False),
    ("GALLERY_MAX_UPLOAD_BYTES", int, 1, INT64_MAX, False),
    ("GALLERY_MAX_THUMBNAIL_BYTES", int, 1, INT64_MAX, False),
    ("GALLERY_MAX_METADATA_BYTES", int, 2, 512 << 10, False),
    ("GALLERY_GRPC_WORKERS", int, 2, INT64_MAX, False),
    ("GALLERY_GRPC_READ_WORKERS", int, 1, INT64_MAX, False),
    ("GALLERY_PULL_TTL", int, 1, A_YEAR, False),
    ("GALLERY_INCOMING_SCAN_SECONDS", float, 0.01, A_YEAR, False),
    ("GALLERY_INCOMING_SETTLE_SECONDS", float, 0, A_YEAR, False),
    ("GALLERY_UPLOAD_SESSION_TTL", int, 1, A_YEAR, False),
    ("GALLERY_JWT_JWKS_COOLDOWN", float, 0, A_YEAR, False),
    ("GALLERY_JWT_JWKS_LIFESPAN", float, 0, A_YEAR, True),
    ("GALLERY_MAX_UPLOADS_PER_DEVICE", int, 1, INT64_MAX, False),
    ("GALLERY_MAX_UPLOADS_TOTAL", int, 1, INT64_MAX, False),
    ("GALLERY_UPLOAD_IDLE_SECONDS", float, 0, A_YEAR, True),
    ("GALLERY_UPLOAD_FIRST_MESSAGE_SECONDS", float, 0, A_YEAR, True),
    ("GALLERY_DOWNLOAD_IDLE_SECONDS", float, 0, A_YEAR, True),
    ("GALLERY_MAX_UPLOAD_SESSIONS_PER_DEVICE", int, 1, INT64_MAX, False),
    ("GALLERY_MAX_UPLOAD_URLS_PER_DEVICE", int, 1, INT64_MAX, False),
    ("GALLERY_UPLOAD_MESSAGES_IN_FLIGHT", int, 1, INT64_MAX, False),
    ("GALLERY_MIN_FREE_BYTES", int, 0, INT64_MAX, False),
    ("GALLERY_MAX_DEVICE_BYTES", int, 0, INT64_MAX, False),
    ("GALLERY_RETENTION_DAYS", float, 0, 36500, False),
    ("GALLERY_DELETED_CAPTURE_DAYS", float, 0, 36500, False),
    ("GALLERY_RECONCILE_INTERVAL_SECONDS", float, 1, A_YEAR, False),
    ("GALLERY_RECONCILE_GRACE_SECONDS", float, 300, A_YEAR, False),
    ("GALLERY_KEEPALIVE_SECONDS", float, 1, 86400, False),
    ("GALLERY_DRAIN_SECONDS", float, 0, A_YEAR, False),
]


@pytest.mark.parametrize(("variable", "kind", "low", "high", "above_low"), RANGES, ids=[r[0] for r in RANGES])
def test_each_number_is_taken_exactly_within_its_range(variable, kind, low, high, above_low):
    (bounds,) = [b for b in settings_module._NUMBERS.values() if b.variable == variable]
    step = 1 if kind is int else low / 100 or 0.001
    if above_low:
        with pytest.raises(ConfigError):
            bounds.check(str(low))
        assert bounds.check(str(low + step)) == low + step
    else:
        assert bounds.check(str(low)) == low
    with pytest.raises(ConfigError):
        bounds.check(str(low - step))
    assert bounds.check(str(high)) == high
    assert type(bounds.check(str(high))) is kind
    with pytest.raises(ConfigError):
        bounds.check(str(high + 1))
    if kind is int:
        with pytest.raises(ConfigError, match="a whole number"):
            bounds.check(f"{low + 1}.5")


def test_the_grace_must_be_twice_the_upload_idle_time_and_the_uploads_fewer_than_the_workers(tmp_path):
    taken = Settings.from_env(env(tmp_path, GALLERY_UPLOAD_IDLE_SECONDS="200", GALLERY_RECONCILE_GRACE_SECONDS="400",
                                  GALLERY_MAX_UPLOADS_TOTAL="9", GALLERY_GRPC_WORKERS="10"))
    assert (taken.reconcile_grace_seconds, taken.max_uploads_total, taken.grpc_workers) == (400, 9, 10)
    assert Settings.from_env(env(tmp_path, GALLERY_RECONCILE_GRACE_SECONDS="300")).reconcile_grace_seconds == 300
    with pytest.raises(ConfigError, match="at least 400 "):
        Settings.from_env(env(tmp_path, GALLERY_UPLOAD_IDLE_SECONDS="200", GALLERY_RECONCILE_GRACE_SECONDS="399"))
    below = r"^GALLERY_MAX_UPLOADS_TOTAL \(10\) must be below GALLERY_GRPC_WORKERS \(10\)"
    with pytest.raises(ConfigError, match=below):
        Settings.from_env(env(tmp_path, GALLERY_MAX_UPLOADS_TOTAL="10", GALLERY_GRPC_WORKERS="10"))
    with pytest.raises(ConfigError, match=r"\(48\) must be below GALLERY_GRPC_WORKERS \(40\)"):  # the default
        Settings.from_env(env(tmp_path, GALLERY_GRPC_WORKERS="40"))


def test_a_retention_is_none_or_a_day_at_least(tmp_path):
    assert Settings.from_env(env(tmp_path)).retention_days == 0  # kept for ever
    assert Settings.from_env(env(tmp_path, GALLERY_RETENTION_DAYS="1")).retention_days == 1
    assert Settings.from_env(env(tmp_path, GALLERY_RETENTION_DAYS="30.5")).retention_days == 30.5
    with pytest.raises(ConfigError, match=r"^GALLERY_RETENTION_DAYS=0.5: must be 0 \(keep for ever\) or at least 1"):
        Settings.from_env(env(tmp_path, GALLERY_RETENTION_DAYS="0.5"))


def test_deleted_captures_are_remembered_for_ever_or_a_day_at_least(tmp_path):
    assert Settings.from_env(env(tmp_path)).deleted_capture_days == 90
    assert Settings.from_env(env(tmp_path, GALLERY_DELETED_CAPTURE_DAYS="0")).deleted_capture_days == 0
    assert Settings.from_env(env(tmp_path, GALLERY_DELETED_CAPTURE_DAYS="1")).deleted_capture_days == 1
    with pytest.raises(ConfigError, match=r"^GALLERY_DELETED_CAPTURE_DAYS=0.9: must be 0 \(for ever\) or at least 1"):
        Settings.from_env(env(tmp_path, GALLERY_DELETED_CAPTURE_DAYS="0.9"))


def test_the_defaults_are_the_readmes():
    """README's tables give each variable's default; Settings' field defaults are the real ones."""
    root = pathlib.Path(settings_module.__file__).resolve().parents[2]
    readme = (root / "README.md").read_text(encoding="utf-8")
    documented = dict(re.findall(r"^\| `(GALLERY_[A-Z_]+)` \| `([^`]*)`", readme, re.MULTILINE))
    fields = Settings.__dataclass_fields__
    checked = 0
    for variable, text in documented.items():
        field = fields.get(variable.removeprefix("GALLERY_").lower())
        if field is None or field.default is dataclasses.MISSING or variable == "GALLERY_PUBLIC_URL":
            continue  # the public URL's default follows GALLERY_HTTP_ADDRESS (tested above)
        default = field.default
        if isinstance(default, bool):
            assert text == str(default).lower(), variable
        elif isinstance(default, (int, float)):
            assert float(text) == default, variable
        else:
            assert text == default, variable
        checked += 1
    assert checked >= 25
    assert fields["max_upload_bytes"].default == 16 << 30  # "16 GiB" in the table


# -- addresses and ports ----------------------------------------------------------------------


@pytest.mark.parametrize("variable", ["GALLERY_HTTP_ADDRESS", "GALLERY_GRPC_ADDRESS", "GALLERY_METRICS_ADDRESS"])
@pytest.mark.parametrize("value", ["garbage", "127.0.0.1:99999", "127.0.0.1:0", "127.0.0.1:", "::1:8001",
                                   "127.0.0.1:http"])
def test_an_address_needs_a_port_in_range(tmp_path, variable, value):
    message = refusal(tmp_path, variable, value)
    assert message.startswith(f"{variable}={value}: must be host:port")
    assert "between 1 and 65535" in message


@pytest.mark.parametrize("value", ["127.0.0.1:28441", "[::1]:28441", "0.0.0.0:1", "localhost:65535"])
def test_addresses_with_a_port_in_range_are_taken(tmp_path, value):
    settings = Settings.from_env(env(tmp_path, GALLERY_HTTP_ADDRESS=value, GALLERY_GRPC_ADDRESS=value,
                                     GALLERY_METRICS_ADDRESS=value))
    assert settings.http_address == settings.grpc_address == settings.metrics_address == value


def test_no_metrics_address_serves_no_metrics(tmp_path):
    assert Settings.from_env(env(tmp_path)).metrics_address == ""


# -- the public URL ------------------------------------------------------------------------------


@pytest.mark.parametrize(("http_address", "public_url"), [
    ("127.0.0.1:28441", "http://127.0.0.1:28441"),
    ("0.0.0.0:28441", "http://localhost:28441"),
    ("[::]:28441", "http://localhost:28441"),
    ("[::1]:28441", "http://[::1]:28441"),
    ("gallery.example:8080", "http://gallery.example:8080"),
])
def test_the_public_url_follows_the_http_address(tmp_path, http_address, public_url):
    assert Settings.from_env(env(tmp_path, GALLERY_HTTP_ADDRESS=http_address)).public_url == public_url


def test_a_public_url_given_wins_and_the_default_stays(tmp_path):
    given = env(tmp_path, GALLERY_HTTP_ADDRESS="127.0.0.1:28441", GALLERY_PUBLIC_URL="https://photos.example/")
    assert Settings.from_env(given).public_url == "https://photos.example"
    assert Settings.from_env(env(tmp_path)).public_url == "http://localhost:8001"


@pytest.mark.parametrize("url", [
    "notaurl", "ftp://gallery.example", "https://", "http:///path", "https://gallery.example/?token=1",
    "https://gallery.example/#top", "http://gallery.example:99999", "localhost:8001",
])
def test_a_public_url_that_no_client_could_use_is_refused(tmp_path, url):
    """Every pre-signed upload URL starts with it: a bad one made URLs that nobody could use."""
    message = refusal(tmp_path, "GALLERY_PUBLIC_URL", url)
    assert message.startswith(f"GALLERY_PUBLIC_URL={url}: ")


@pytest.mark.parametrize("url", [
    "sqlite:////var/lib/gallery/gallery.db", "postgresql+psycopg://gallery@db.example:5432/gallery",
])
def test_sqlite_and_postgresql_urls_are_taken(tmp_path, url):
    assert Settings.from_env(env(tmp_path, GALLERY_DATABASE_URL=url)).database_url == url


@pytest.mark.parametrize(("url", "shown"), [
    ("mysql://gallery@db/gallery", "mysql://gallery@db/gallery"),
    ("not a url", "not a url"),
    ("postgresql+nosuchdriver://gallery:hunter2@db/gallery", "postgresql+nosuchdriver://gallery:***@db/gallery"),
    ("postgresql+asyncpg://gallery:hunter2@db/gallery", "postgresql+asyncpg://gallery:***@db/gallery"),
    ("mysql://gallery@db/gallery?password=hunter2&sslPassword=hunter2&charset=utf8",
     "mysql://gallery@db/gallery?charset=utf8"),  # libpq's other places for it
])
def test_a_database_url_the_server_cannot_use_is_refused_without_its_password(tmp_path, url, shown):
    message = refusal(tmp_path, "GALLERY_DATABASE_URL", url)
    assert message.startswith(f"GALLERY_DATABASE_URL={shown}: must be a SQLite or PostgreSQL URL")
    assert "hunter2" not in message


@pytest.mark.parametrize("url", [
    "postgresql+psycopg://gallery:hunt@er2@db/gallery",  # the rest of the password became the host
    "postgresql+psycopg://gallery:hu@nt:er2@db:5432/gallery",  # ... and its port: not a number
    "postgresql+psycopg://gallery:er2@db:notaport/gallery",
])
def test_a_database_url_a_password_cuts_wrongly_is_one_line_without_the_password(tmp_path, url):
    """An '@' or ':' in a password that is not percent-encoded: its rest was shown as the host in
    every connection error, or the URL's port failed int() with a traceback quoting it."""
    message = refusal(tmp_path, "GALLERY_DATABASE_URL", url)
    assert message.startswith("GALLERY_DATABASE_URL=(not shown: it may hold a password): ")
    assert "er2" not in message


def test_a_data_dir_that_cannot_be_made_is_one_line(tmp_path):
    from gallery_server.settings import prepare_data_dir

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=rf"^GALLERY_DATA_DIR={blocker / 'data'}: cannot create it \("):
        prepare_data_dir(blocker / "data")
    prepare_data_dir(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir()


# -- the JWT secret ------------------------------------------------------------------------------


@pytest.mark.parametrize("secret", ["s", "x" * 31, " " * 40, "\t\n" * 20], ids=["1", "31", "spaces", "blank"])
def test_a_short_or_blank_secret_is_refused(tmp_path, secret):
    """Whoever guesses the secret mints tokens and signs URLs for every device (RFC 7518 3.2)."""
    assert "at least 32 bytes" in refusal(tmp_path, "GALLERY_JWT_SECRET", secret)


def test_a_short_secret_file_is_refused(tmp_path):
    (tmp_path / "jwt-secret").write_text("short\n")
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        Settings.from_env({"GALLERY_DATA_DIR": str(tmp_path)})


def test_a_secret_file_of_raw_bytes_is_one_line_without_them(tmp_path):
    """`head -c 48 /dev/urandom > jwt-secret`: the decoder's traceback quoted a byte of it."""
    (tmp_path / "jwt-secret").write_bytes(b"\xff\xfe" + b"\x9c" * 46)
    with pytest.raises(ConfigError, match="jwt-secret is not UTF-8 text: write the secret as text") as refused:
        Settings.from_env({"GALLERY_DATA_DIR": str(tmp_path)})
    assert "0xff" not in str(refused.value) and refused.value.__suppress_context__


def test_a_jwks_url_alone_makes_tokens_the_identity_providers(tmp_path):
    """As with a public key: `gallery token` then mints none (cli.py), `gallery run` prints none."""
    assert Settings.from_env(env(tmp_path, GALLERY_JWT_JWKS_URL="https://id.example/jwks.json")).issuer_tokens
    assert not Settings.from_env(env(tmp_path)).issuer_tokens


def test_a_public_key_file_that_is_not_text_is_refused(tmp_path):
    (tmp_path / "key.pem").write_bytes(b"\xff\xfe-----BEGIN PUBLIC KEY-----\n")
    message = refusal(tmp_path, "GALLERY_JWT_PUBLIC_KEY_FILE", str(tmp_path / "key.pem"))
    assert message.startswith("GALLERY_JWT_PUBLIC_KEY_FILE: ")


def test_no_secret_at_all_says_where_to_put_one(tmp_path):
    with pytest.raises(ConfigError, match="no JWT secret: set GALLERY_JWT_SECRET or create"):
        Settings.from_env({"GALLERY_DATA_DIR": str(tmp_path)})


def test_a_secret_file_is_read_without_its_line_break(tmp_path):
    (tmp_path / "jwt-secret").write_text(SECRET + "\n")
    assert Settings.from_env({"GALLERY_DATA_DIR": str(tmp_path)}).jwt_secret == SECRET


def test_the_development_secret_is_made_once_64_characters_long_and_readable_by_its_owner_only(tmp_path):
    secret = settings_module.ensure_secret_file(tmp_path / "data")
    path = tmp_path / "data" / "jwt-secret"
    assert len(secret) == 64 and path.read_text() == secret + "\n"
    assert path.stat().st_mode & 0o777 == 0o600
    assert settings_module.ensure_secret_file(tmp_path / "data") == secret


def test_a_secret_of_32_bytes_is_taken(tmp_path):
    secret = "é" * 16  # 16 characters, 32 bytes: the hash's length counts bytes
    assert Settings.from_env(env(tmp_path, GALLERY_JWT_SECRET=secret)).jwt_secret == secret


# -- browsers' origins ---------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "origins"), [
    ("https://app.example", ("https://app.example",)),
    ("https://app.example, http://localhost:3000", ("https://app.example", "http://localhost:3000")),
    ("http://[::1]:8080 https://a.example:8443", ("http://[::1]:8080", "https://a.example:8443")),
    ("*", ("*",)),
    ("", ()),
])
def test_cors_origins_are_taken_as_browsers_send_them(tmp_path, value, origins):
    assert Settings.from_env(env(tmp_path, GALLERY_CORS_ORIGINS=value)).cors_origins == origins


@pytest.mark.parametrize(("value", "says"), [
    # A browser's Origin is compared whole: each of these would match no request.
    ("https://app.example/", "write https://app.example"),
    ("https://App.Example", "write https://app.example"),
    ("HTTPS://app.example", "write https://app.example"),
    ("https://app.example:443", "write https://app.example"),
    ("http://app.example:80", "write http://app.example"),
    ("https://app.example/gallery", "no path)"),
    ("https://app.example?x=1", "no path)"),
    ("https://user@app.example", "no path)"),
    ("app.example", "no path)"),
    ("ftp://app.example", "http or https"),
    ("https://bücher.example", "an ASCII host"),
    ("https://app.example:99999", "'https://app.example:99999' is not an origin"),
    ("null", "'null' is not an origin"),
    ("*, https://app.example", "'*' allows every origin and must stand alone"),
])
def test_a_cors_origin_a_browser_would_never_send_is_refused_with_the_right_form(tmp_path, value, says):
    assert says in refusal(tmp_path, "GALLERY_CORS_ORIGINS", value)



@pytest.mark.parametrize("value", [
    "app.example", "https://", "https://user@app.example", "https://app.example/gallery", "https://app.example?x=1",
    "https://app.example#top",
])
def test_a_value_with_no_origin_in_it_is_refused_without_a_suggestion(tmp_path, value):
    message = refusal(tmp_path, "GALLERY_CORS_ORIGINS", value)
    assert message.startswith(f"GALLERY_CORS_ORIGINS: {value!r} is not an origin")
    assert message.endswith("no path)")

# -- log level -----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["verbose", "10", "NOTSET"])
def test_an_unknown_log_level_is_refused_with_the_levels(tmp_path, value):
    assert refusal(tmp_path, "GALLERY_LOG_LEVEL", value) == (
        f"GALLERY_LOG_LEVEL={value}: must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL"
    )


def test_log_levels_are_taken_in_any_case(tmp_path):
    assert Settings.from_env(env(tmp_path, GALLERY_LOG_LEVEL="debug")).log_level == "DEBUG"
    assert Settings.from_env(env(tmp_path, GALLERY_LOG_LEVEL="warn")).log_level == "WARN"  # logging's alias



@pytest.mark.parametrize(("value", "expected"), [
    ("true", True), ("1", True), ("yes", True), ("on", True), ("ON", True), (" True ", True),
    ("false", False), ("0", False), ("no", False), ("off", False), ("OFF", False), (" False ", False),
])
def test_booleans_are_taken_in_every_spelling_and_case(tmp_path, value, expected):
    assert Settings.from_env(env(tmp_path, GALLERY_MAKE_THUMBNAILS=value)).make_thumbnails is expected
    assert Settings.from_env(env(tmp_path, GALLERY_DIRECT_IO=value)).direct_io is expected

# -- empty values --------------------------------------------------------------------------------

EVERY_VARIABLE = [
    "GALLERY_DATABASE_URL", "GALLERY_PUBLIC_URL", "GALLERY_UPLOAD_URL_TTL", "GALLERY_GRPC_ADDRESS",
    "GALLERY_HTTP_ADDRESS", "GALLERY_ENVOY_ADMIN_PORT", "GALLERY_ENVOY_SENDS_FILES",
    "GALLERY_MAX_UPLOAD_BYTES", "GALLERY_MAX_THUMBNAIL_BYTES", "GALLERY_MAX_METADATA_BYTES",
    "GALLERY_GRPC_WORKERS", "GALLERY_GRPC_READ_WORKERS", "GALLERY_LOG_LEVEL", "GALLERY_PULL_TTL",
    "GALLERY_INCOMING_SCAN_SECONDS", "GALLERY_INCOMING_SETTLE_SECONDS", "GALLERY_MAKE_THUMBNAILS",
    "GALLERY_DIRECT_IO", "GALLERY_UPLOAD_SESSION_TTL", "GALLERY_JWT_PUBLIC_KEY",
    "GALLERY_JWT_PUBLIC_KEY_FILE", "GALLERY_JWT_JWKS_URL", "GALLERY_JWT_JWKS_COOLDOWN",
    "GALLERY_JWT_JWKS_LIFESPAN", "GALLERY_JWT_ISSUER", "GALLERY_JWT_AUDIENCE",
    "GALLERY_MAX_UPLOADS_PER_DEVICE", "GALLERY_MAX_UPLOADS_TOTAL", "GALLERY_UPLOAD_IDLE_SECONDS",
    "GALLERY_UPLOAD_FIRST_MESSAGE_SECONDS", "GALLERY_DOWNLOAD_IDLE_SECONDS",
    "GALLERY_MAX_UPLOAD_SESSIONS_PER_DEVICE", "GALLERY_MAX_UPLOAD_URLS_PER_DEVICE",
    "GALLERY_UPLOAD_MESSAGES_IN_FLIGHT", "GALLERY_MIN_FREE_BYTES", "GALLERY_MAX_DEVICE_BYTES",
    "GALLERY_RECONCILE_INTERVAL_SECONDS",
    "GALLERY_RECONCILE_GRACE_SECONDS", "GALLERY_KEEPALIVE_SECONDS", "GALLERY_DRAIN_SECONDS",
]


@pytest.mark.parametrize("empty", ["", "  "])
def test_an_empty_variable_means_its_default(tmp_path, empty):
    """An operator's `export GALLERY_X=` in a script."""
    defaults = Settings.from_env(env(tmp_path))
    assert Settings.from_env(env(tmp_path, **dict.fromkeys(EVERY_VARIABLE, empty))) == defaults


def test_an_empty_data_dir_means_the_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = Settings.from_env({"GALLERY_DATA_DIR": "", "GALLERY_JWT_SECRET": SECRET})
    assert settings.data_dir == tmp_path / "data"
    # Where `gallery run` makes the secret before reading its settings: the same folder.
    assert settings_module.data_dir_from_env({"GALLERY_DATA_DIR": " "}) == tmp_path / "data"


def test_a_bad_boolean_names_its_variable(tmp_path):
    assert refusal(tmp_path, "GALLERY_MAKE_THUMBNAILS", "maybe") == (
        "GALLERY_MAKE_THUMBNAILS=maybe: must be true or false"
    )


def test_every_variable_read_is_in_the_readmes_configuration_and_the_reverse():
    """README's "Configuration" is the one table of the variables (settings.py points to it)."""
    root = pathlib.Path(settings_module.__file__).resolve().parents[2]
    readme = (root / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("\n## Configuration"):readme.index("\n## Reliability and security")]
    documented = set(re.findall(r"`(GALLERY_[A-Z_]+)`", section))
    read = set(re.findall(r'"(GALLERY_[A-Z_]+)"', pathlib.Path(settings_module.__file__).read_text()))
    assert read - documented == set()
    assert documented - read == set()


def test_metadata_at_its_largest_allowed_size_still_goes_out_in_one_grpc_message():
    """GALLERY_MAX_METADATA_BYTES' bound: the JSON that grows most as a protobuf Struct (a list
    of zeros, 2 bytes each in JSON, 11 in the Struct) still fits GetEvent's 8 MiB answer."""
    from gallery_server.models import Event
    from gallery_server.rpc.server import MAX_MESSAGE_BYTES
    from gallery_server.rpc.servicer import event_message

    limit = int(settings_module._NUMBERS["max_metadata_bytes"].high)
    worst = '{"a":[' + ",".join(["0"] * ((limit - 8) // 2)) + "]}"
    assert limit - 2 <= len(worst) <= limit
    event = Event(id="evt_" + "A" * 22, device="cam1", name="n", media_type="other",
                  mime_type="application/octet-stream", size=0, metadata_json=worst,
                  created=datetime.datetime.now(datetime.UTC), sha256="0" * 64)
    answer = event_message(event, with_metadata=True).ByteSize()
    assert answer > 5 * limit  # it is the worst case
    assert answer < MAX_MESSAGE_BYTES - (64 << 10)  # with room for the rest of the answer


def test_a_command_that_needs_no_secret_reads_its_settings_without_one_and_builds_nothing_keyed(tmp_path):
    """`gallery reconcile` and `gallery envoy` sign nothing; what derives keys from the secret (signed
    URLs, drop-folder event ids) refuses to be built from an empty one."""
    settings = Settings.from_env({"GALLERY_DATA_DIR": str(tmp_path)}, needs_secret=False)
    assert settings.jwt_secret == ""
    with pytest.raises(ConfigError, match="no JWT secret"):
        settings.key_secret  # noqa: B018
    with pytest.raises(ConfigError, match="no JWT secret"):
        Settings.from_env({"GALLERY_DATA_DIR": str(tmp_path)})
    assert Settings.from_env(env(tmp_path)).key_secret == SECRET.encode()


@pytest.mark.parametrize(("url", "uri", "env"), [
    ("postgresql+psycopg://u:pw@h:5433/db", "postgresql://u@h:5433/db", {"PGPASSWORD": "pw"}),
    ("postgresql+psycopg://u@/db?password=s3cret&host=127.0.0.1", "postgresql://u@/db?host=127.0.0.1",
     {"PGPASSWORD": "s3cret"}),
    ("postgresql+psycopg://u@h/db?passfile=/etc/pgpass&sslmode=require", "postgresql://u@h/db?sslmode=require",
     {"PGPASSFILE": "/etc/pgpass"}),
    ("postgresql+psycopg://u@/db?host=h1:5432&host=h2:5433", "postgresql://u@/db?host=h1%2Ch2&port=5432%2C5433", {}),
    ("postgresql+psycopg://u@/db?host=/var/run/postgresql", "postgresql://u@/db?host=%2Fvar%2Frun%2Fpostgresql", {}),
])
def test_a_database_url_as_pg_dump_takes_it_keeps_secrets_off_its_command_line(url, uri, env):
    assert settings_module.libpq_connection(url) == (uri, env)


def test_a_url_with_an_ssl_key_passphrase_cannot_be_given_to_pg_dump():
    with pytest.raises(ConfigError, match="sslpassword"):
        settings_module.libpq_connection("postgresql+psycopg://u@h/db?sslpassword=secret")


def test_a_data_folder_whose_name_reads_as_a_url_keeps_its_database_inside(tmp_path):
    """The default database URL is made from GALLERY_DATA_DIR: a "?", "%41" or "#" in the
    folder's name stays in the path (pasted into a URL, "r?q" put the database at "r")."""
    import sqlalchemy as sa

    for name in ("r?q", "r%41", "r#x"):
        settings = Settings.from_env({"GALLERY_DATA_DIR": str(tmp_path / name), "GALLERY_JWT_SECRET": "x" * 40})
        assert sa.make_url(settings.database_url).database == str(tmp_path / name / "gallery.db")
