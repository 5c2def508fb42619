"""A page of events as the REST listing's JSON (GET /api/gallery/{device}/events, ListEventsJson).

The bytes must read exactly as Envoy's transcoder printed the `Event` messages of the streamed
ListEvents that the route used to map to (print_options in envoy/envoy.yaml): fields in
field-number order under their JSON names, every scalar present even when empty or false, `size`
a JSON number, `created` RFC 3339 in UTC with 0, 3 or 6 fractional digits, and `metadata` and
`pull` absent (a listing leaves them unset). tests/e2e/test_listing.py holds the listing against
Envoy's own printing of the same events by GetEvent, byte for byte.

Three printers of that one format: Python's, from rows (`listing`), and the database's, which
prints a whole page inside the query: SQLite's (`sqlite_array`) and PostgreSQL's
(`postgres_array`). SQLite hands rows to Python one at a time and lets go of the GIL for each;
with concurrent requests, every such hand-off is contended, and a page of 50 rows cost ~1 ms of CPU
in hand-offs alone (BENCHMARKS.md). On PostgreSQL, loading 50 rows of 10 columns through psycopg and
printing them took ~1,270 µs of the server's CPU per page, the page printed by PostgreSQL ~430
(in process, medians of 5 interleaved rounds, 2026-11-29). Printed by the database, the page is one
value. tests/unit/test_listing_json.py holds the printers to each other on both databases.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Iterable, Sequence
from typing import Any

# What a listing returns of each event, in this order (the listing's select, listing._listing_statement).
LISTED_COLUMNS = (
    "id", "device", "name", "media_type", "mime_type", "size", "sha256", "has_thumbnail", "created", "state",
)

# Compact, and non-ASCII text as UTF-8, like protobuf's printer.
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
# What protobuf's JSON printer escapes beyond JSON's own rules (its writer's MustEscape), spelled as
# it spells them: `<`, `>`, DEL and the C1 controls, and Unicode's invisible formatting characters.
# Names refuse control, format and separator characters (validation.py), but a few of these are
# other categories (U+17B4 and U+17B5 are combining marks, which Khmer names may hold), and rows
# written by other tools may hold any of them.
_PROTOBUF_ESCAPED = (
    "<>\x7f-\x9f\xad\u0600-\u0603\u06dd\u070f\u17b4\u17b5\u200b-\u200f\u2028-\u202e"
    "\u2060-\u2064\u206a-\u206f\ufeff\ufff9-\ufffb\U000e0001\U000e0020-\U000e007f"
    "\U0001d173-\U0001d17a"
)
_NEEDS_ESCAPE = re.compile(f"[{_PROTOBUF_ESCAPED}]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    high, low = divmod(code - 0x10000, 0x400)  # JSON spells the others as a surrogate pair
    return f"\\u{0xD800 + high:04x}\\u{0xDC00 + low:04x}"


def timestamp(moment: datetime.datetime) -> str:
    """RFC 3339 in UTC, as protobuf prints a google.protobuf.Timestamp (naive means UTC)."""
    if moment.utcoffset():
        moment = moment.astimezone(datetime.UTC)
    # isoformat() is C code: "auto" omits a zero fraction and prints 6 digits otherwise.
    whole_millis = moment.microsecond % 1000 == 0 and moment.microsecond
    text = moment.isoformat(timespec="milliseconds" if whole_millis else "auto")
    return (text[:-6] if moment.tzinfo is not None else text) + "Z"  # drop "+00:00"


# Rows come in LISTED_COLUMNS order; indexing a row is much cheaper than its named attributes.
_ID, _NAME, _TYPE, _MIME, _SIZE, _SHA256, _THUMBNAIL, _CREATED, _STATE = (
    LISTED_COLUMNS.index(name) for name in (
        "id", "name", "media_type", "mime_type", "size", "sha256", "has_thumbnail", "created",
        "state",
    )
)


def listing(rows: Iterable[Sequence[Any]]) -> bytes:
    """The JSON array of a page of rows of LISTED_COLUMNS.

    `size` is printed as an integer: the transcoder prints the proto's double the same way for
    every size below 10^15 bytes, past which it would switch to exponent notation."""
    return finish(_encode([
        {
            "id": row[_ID],
            "name": row[_NAME],
            "media_type": row[_TYPE],
            "size": int(row[_SIZE]),
            "has_thumbnail": bool(row[_THUMBNAIL]),
            "created": timestamp(row[_CREATED]),
            "mime_type": row[_MIME],
            "sha256": row[_SHA256],
            "state": row[_STATE],
        }
        for row in rows
    ]))


def finish(text: str) -> bytes:
    """JSON text from either printer with protobuf's extra escapes applied, as bytes."""
    # A page is ~15 KB and nearly always ASCII, where only three of the escaped characters can
    # occur: str.isascii and `in` scan it in a few µs, the regex's wide character class in ~125.
    if text.isascii():
        if "<" not in text and ">" not in text and "\x7f" not in text:
            return text.encode()
    elif not _NEEDS_ESCAPE.search(text):
        return text.encode()
    return _NEEDS_ESCAPE.sub(_escape, text).encode()


# SQLAlchemy stores a DATETIME in SQLite as "YYYY-MM-DD HH:MM:SS.ffffff" (UTC here: models.py).
SQLITE_STORED_LENGTH = 26
_STORED_TIME = (
    "typeof(created) = 'text' AND created GLOB "
    "'[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9] [0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9][0-9][0-9][0-9][0-9][0-9]'"
)
# A row's `created` cut to RFC 3339 with protobuf's 0, 3 or 6 fractional digits, or NULL when the
# stored time has another shape. It is a column of the page's subquery (CREATED_RFC3339), so each
# row's GLOB and cuts run once for both `sqlite_array` and `sqlite_regular`: ~30 of the query's
# ~190 µs per page of 50 when the two evaluated it apart.
CREATED_RFC3339 = "created_rfc3339"
sqlite_created = f"""CASE WHEN {_STORED_TIME}
    THEN substr(created, 1, 10) || 'T' || substr(created, 12, 8)
        || CASE WHEN substr(created, 21, 6) = '000000' THEN ''
                WHEN substr(created, 24, 3) = '000' THEN '.' || substr(created, 21, 3)
                ELSE '.' || substr(created, 21, 6) END
        || 'Z' END"""
# The page printed by SQLite's JSON functions, over a subquery of LISTED_COLUMNS and CREATED_RFC3339
# in listing order (SQLite aggregates a LIMITed subquery's rows in its ORDER BY: it cannot flatten
# it into the aggregate). json_object keeps the keys in the order given. A row the server did not
# write itself (a time of another shape, a size or flag that is not an integer) is counted by
# `sqlite_regular`, and its page goes to the Python printer instead.
sqlite_array = f"""json_group_array(json_object(
    'id', id, 'name', name, 'media_type', media_type, 'size', size,
    'has_thumbnail', CASE WHEN has_thumbnail THEN json('true') ELSE json('false') END,
    'created', {CREATED_RFC3339},
    'mime_type', mime_type, 'sha256', sha256, 'state', state))"""
sqlite_regular = (
    f"sum({CREATED_RFC3339} IS NOT NULL AND typeof(size) = 'integer' AND typeof(has_thumbnail) = 'integer')"
    " = count(*)"
)


# PostgreSQL's printer. Its to_json() of a text escapes what Python's encoder does (the quote, the
# backslash, \b \f \n \r \t, and the other controls as lowercase \u00xx) and leaves the rest as
# UTF-8; finish() adds protobuf's escapes to both. `size` and `has_thumbnail` are typed columns
# (bigint, boolean). `created` is a timestamptz, printed in UTC whatever the session's time zone,
# cut to 0, 3 or 6 fractional digits once per row as a column of the page's subquery
# (CREATED_RFC3339). A time no Python datetime holds (infinity, a year BC or past 9999, written by
# another tool) would print wrongly or, as NULL, drop its row from the aggregate: `postgres_regular`
# counts such rows, and their page goes to the Python printer, whose driver refuses them as before.
_UTC = "created AT TIME ZONE 'UTC'"
postgres_created = f"""to_char({_UTC}, 'YYYY-MM-DD"T"HH24:MI:SS')
    || CASE WHEN to_char({_UTC}, 'US') = '000000' THEN ''
        WHEN right(to_char({_UTC}, 'US'), 3) = '000' THEN to_char({_UTC}, '.MS')
        ELSE to_char({_UTC}, '.US') END || 'Z'"""
postgres_regular = (
    "coalesce(bool_and(isfinite(created) AND created >= '0001-01-01 00:00:00+00' "
    "AND created < '10000-01-01 00:00:00+00'), true)"
)


def postgres_array(order: str) -> str:
    """The page as one JSON text, its events aggregated in `order` (the page's ORDER BY); NULL
    for an empty page."""
    return f"""'[' || string_agg('{{"id":' || to_json(id)::text || ',"name":' || to_json(name)::text
    || ',"media_type":' || to_json(media_type)::text || ',"size":' || size::text
    || ',"has_thumbnail":' || CASE WHEN has_thumbnail THEN 'true' ELSE 'false' END
    || ',"created":"' || {CREATED_RFC3339} || '"'
    || ',"mime_type":' || to_json(mime_type)::text || ',"sha256":' || to_json(sha256)::text
    || ',"state":' || to_json(state)::text || '}}', ',' ORDER BY {order}) || ']'"""
