"""The REST listing's JSON: the databases' printers against Python's, on SQLite and PostgreSQL.

Gallery.list_page_json has the database print a whole page (listing_json.sqlite_array and
postgres_array); for rows SQLite cannot print, and where SQLite lacks its JSON functions, Python
prints the rows of list_page. All must give the same bytes and the same next-page token for every
request a client can make. (Python's printer is held to Envoy's own printing by
tests/e2e/test_listing.py.)
"""

from __future__ import annotations

import datetime
import json

import psycopg
import pytest
import sqlalchemy as sa

from gallery_server import listing_json
from gallery_server.db import Database
from gallery_server.models import Event
from gallery_server.service import Gallery

from ..conftest import statements_run

DEVICE = "cam-json"
T0 = datetime.datetime(2024, 3, 20, 10, 0, 0, tzinfo=datetime.UTC)
# The last, as another tool might have written it: the controls JSON escapes, DEL and U+2028.
NAMES = ['quote " backslash \\ <b>&amp;', "café 📷 カメラ.jpg", "plain.mp4", "x" * 255, "a<b>c",
         "ctl \x01\x1f\t\n\r\b\f del\x7f sep\u2028"]
FRACTIONS = [0, 120_000, 123_456, 1, 999_000]


@pytest.fixture
def rows(gallery):
    """25 events with every shape of name, size, time and flag, some sharing a timestamp."""
    values = [
        {
            "id": f"evt_json{i:018d}", "device": DEVICE, "name": NAMES[i % len(NAMES)],
            "media_type": ("video", "image", "other")[i % 3], "mime_type": "" if i % 4 else "video/mp4",
            "size": (0, 1, 999_999_999_999_999, 2**53, 12345)[i % 5], "sha256": f"{i:064x}" if i % 2 else "",
            "has_thumbnail": i % 3 == 0, "metadata_json": "{}",
            "created": T0 + datetime.timedelta(seconds=i // 2, microseconds=FRACTIONS[i % len(FRACTIONS)]),
            "state": "stored" if i % 2 else "on_device", "thumbnail_state": "", "thumbnail_attempts": 0,
            "media_info_json": "",
        }
        for i in range(25)
    ]
    with gallery.db.engine.begin() as connection:
        connection.execute(sa.insert(Event.__table__), values)  # type: ignore[attr-defined]
    return values


REQUESTS = [
    {},
    {"limit": 7},
    {"limit": 7, "order": "oldest"},
    {"media_type": "video", "limit": 3},
    {"since": "2024-03-20T10:00:03Z", "until": "2024-03-20T10:00:09.5Z"},
    {"limit": 4, "offset": 5},
    {"limit": 1000},
    {"media_type": "audio"},  # an empty page
]


@pytest.mark.parametrize("request_args", REQUESTS, ids=[json.dumps(r) for r in REQUESTS])
def test_both_printers_give_the_same_page_and_token(gallery, principal, rows, request_args):
    token, json_token = "", ""
    while True:
        events, token = gallery.list_page(principal, DEVICE, page_token=token, **request_args)
        page, json_token = gallery.list_page_json(principal, DEVICE, page_token=json_token, **request_args)
        assert page == listing_json.listing(events)
        assert json_token == token
        if not token or "offset" in request_args:
            break


def test_the_pages_hold_every_event_once_in_order(gallery, principal, rows):
    seen, token = [], ""
    while True:
        page, token = gallery.list_page_json(principal, DEVICE, limit=6, page_token=token)
        seen += [event["id"] for event in json.loads(page)]
        if not token:
            break
    newest_first = sorted(rows, key=lambda r: (r["created"], r["id"]), reverse=True)
    assert seen == [r["id"] for r in newest_first]


def test_sqlite_prints_a_regular_page_in_one_statement(gallery, principal, rows):
    if gallery.db.engine.dialect.name != "sqlite":
        pytest.skip("the SQLite printer")
    gallery.list_page_json(principal, DEVICE, limit=10)  # the first also checks SQLite's JSON functions
    with statements_run(gallery.db) as statements:
        gallery.list_page_json(principal, DEVICE, limit=11)  # a page not kept (listing.PageCache)
    assert len(statements) == 1 and "json_group_array" in statements[0] and "listing_versions" in statements[0]


def test_postgres_prints_a_page_in_one_statement(gallery, principal, rows):
    if gallery.db.engine.dialect.name != "postgresql":
        pytest.skip("the PostgreSQL printer")
    assert gallery.listing.versions_current()  # looked at by a server's first listing (and every 30 s)
    with statements_run(gallery.db) as statements:
        page, token = gallery.list_page_json(principal, DEVICE, limit=10)
    assert len(statements) == 1 and "string_agg" in statements[0] and "listing_versions" in statements[0]
    assert len(json.loads(page)) == 10 and token


@pytest.mark.parametrize("created", ["infinity", "-infinity", "0044-03-15 12:00:00+00 BC", "12024-03-20 10:00:00+00",
                                     "10000-01-01 00:00:00+00"])
def test_a_time_python_cannot_hold_is_never_printed_by_postgres(gallery, principal, rows, created):
    """Written by another tool: PostgreSQL would print it wrongly or drop its row; the page goes to
    the Python printer, whose driver refuses the row, as for the native listing."""
    if gallery.db.engine.dialect.name != "postgresql":
        pytest.skip("the PostgreSQL printer")
    with gallery.db.engine.begin() as connection:
        connection.exec_driver_sql(
            "UPDATE events SET created = %(created)s::timestamptz WHERE id = %(id)s",
            {"created": created, "id": rows[-1]["id"]},
        )
    with pytest.raises(psycopg.DataError):
        gallery.list_page(principal, DEVICE, limit=1000)
    with pytest.raises(psycopg.DataError):
        gallery.list_page_json(principal, DEVICE, limit=1000)
    page, _ = gallery.list_page_json(principal, DEVICE, limit=1000, media_type="image")  # without that row
    assert page == listing_json.listing(gallery.list_page(principal, DEVICE, limit=1000, media_type="image")[0])


def test_postgres_prints_times_in_utc_whatever_the_session_time_zone(settings, principal, rows, gallery):
    """`created` is a timestamptz: a session in another zone must print the same page."""
    if gallery.db.engine.dialect.name != "postgresql":
        pytest.skip("the PostgreSQL printer")
    url = sa.make_url(settings.database_url)
    elsewhere = Database(
        url.update_query_dict({"options": "-c timezone=Asia/Kolkata"}).render_as_string(hide_password=False)
    )
    try:
        with elsewhere.read() as connection:
            assert connection.exec_driver_sql("SHOW timezone").scalar() == "Asia/Kolkata"
        there = Gallery(settings, elsewhere, gallery.storage)
        for request_args in ({"limit": 7}, {"limit": 7, "order": "oldest"}):
            page, token = there.list_page_json(principal, DEVICE, **request_args)
            assert (page, token) == gallery.list_page_json(principal, DEVICE, **request_args)
            assert page == listing_json.listing(gallery.list_page(principal, DEVICE, **request_args)[0])
    finally:
        elsewhere.dispose()


@pytest.mark.parametrize("column, value, created", [
    ("created", "2024-03-20 10:00:30", "2024-03-20T10:00:30Z"),
    ("created", "2024-03-20 10:00:30.123+00", "2024-03-20T10:00:30.123Z"),
    ("created", "2024-03-20 10:00:30.12345Z", "2024-03-20T10:00:30.123450Z"),
    ("created", "2024-03-20 10:00:30.1+0530", "2024-03-20T04:30:30.100Z"),
    ("has_thumbnail", "true", None),
    ("size", 5.0, None),
    ("size", 5.5, None),  # a REAL: SQLite keeps it (5.0 it makes an integer)
])
def test_a_row_sqlite_did_not_write_itself_is_printed_by_python(gallery, principal, rows, column, value, created):
    """Rows as another tool might have written them: the page goes to the Python printer (review
    finding: times of other shapes were cut wrongly, and their token lost its offset)."""
    if gallery.db.engine.dialect.name != "sqlite":
        pytest.skip("only SQLite keeps what another tool wrote as is")
    with gallery.db.engine.begin() as connection:
        connection.exec_driver_sql(f"UPDATE events SET {column} = ? WHERE id = ?", (value, rows[-1]["id"]))
    for limit in (1, 3):
        page, token = gallery.list_page_json(principal, DEVICE, limit=limit)
        events, expected_token = gallery.list_page(principal, DEVICE, limit=limit)
        assert page == listing_json.listing(events)
        assert token == expected_token
    if created is not None:
        page, _ = gallery.list_page_json(principal, DEVICE, limit=1000)
        assert created in {event["created"] for event in json.loads(page)}


def test_protobuf_escapes_apply_to_both_printers(gallery, principal, rows):
    page, _ = gallery.list_page_json(principal, DEVICE, limit=1000)
    assert b"a\\u003cb\\u003ec" in page and b"<" not in page and b">" not in page


@pytest.mark.parametrize("text", [
    '[{"name":"plain"}]', "a<b", "a>b", "del\x7f", "é<", "é>", "é\x7f", "é", "\x85", "\u200b", "\U000e0001",
    "カメラ\u2028", "",
])
def test_finish_escapes_the_same_on_its_ascii_fast_path(text):
    """finish() skips the regex for ASCII text; what it returns must not depend on that."""
    everything = listing_json._NEEDS_ESCAPE.sub(listing_json._escape, text).encode()
    assert listing_json.finish(text) == everything


def test_finish_escapes_what_protobufs_printer_escapes_and_nothing_beside():
    """Every end of every escaped range, spelled as protobuf's JSON printer spells it (astral
    characters as a surrogate pair), and their neighbours left as they are."""
    escaped = ("<>\x7f\x80\x9f\xad\u0600\u0603\u06dd\u070f\u17b4\u17b5\u200b\u200f\u2028\u202e"
               "\u2060\u2064\u206a\u206f\ufeff\ufff9\ufffb\U000e0001\U000e0020\U000e007f\U0001d173\U0001d17a")
    assert listing_json.finish(escaped) == (
        b"\\u003c\\u003e\\u007f\\u0080\\u009f\\u00ad\\u0600\\u0603\\u06dd\\u070f\\u17b4\\u17b5\\u200b\\u200f"
        b"\\u2028\\u202e\\u2060\\u2064\\u206a\\u206f\\ufeff\\ufff9\\ufffb\\udb40\\udc01\\udb40\\udc20"
        b"\\udb40\\udc7f\\ud834\\udd73\\ud834\\udd7a"
    )
    kept = "~=\xa0\xac\xae\u05ff\u0604\u17b6\u200a\u2010\u2027\u202f\u205f\u2070\ufefe\ufffc\U000e0002\U0001d17b é"
    assert listing_json.finish(kept) == kept.encode()
    assert listing_json.finish("a<b") == b"a\\u003cb"  # the ASCII path


@pytest.mark.parametrize(("moment", "printed"), [
    (datetime.datetime(2024, 3, 20, 10, 0, 30), "2024-03-20T10:00:30Z"),  # naive: UTC
    (datetime.datetime(2024, 3, 20, 10, 0, 30, tzinfo=datetime.UTC), "2024-03-20T10:00:30Z"),
    (datetime.datetime(2024, 3, 20, 10, 0, 30, 120_000, tzinfo=datetime.UTC), "2024-03-20T10:00:30.120Z"),
    (datetime.datetime(2024, 3, 20, 10, 0, 30, 100, tzinfo=datetime.UTC), "2024-03-20T10:00:30.000100Z"),
    (datetime.datetime(2024, 3, 20, 10, 0, 30, 1000), "2024-03-20T10:00:30.001Z"),
    (datetime.datetime(2024, 3, 20, 15, 30, 30, 5, tzinfo=datetime.timezone(datetime.timedelta(hours=5, minutes=30))),
     "2024-03-20T10:00:30.000005Z"),
])
def test_created_prints_in_utc_with_0_3_or_6_fractional_digits(moment, printed):
    assert listing_json.timestamp(moment) == printed


def test_python_prints_each_event_with_its_keys_in_order_and_typed():
    """`size` a JSON number and `has_thumbnail` a boolean whatever the row holds (5.0, 1), the keys
    in the field-number order of `Event`, no metadata and no pull."""
    row = ("evt_a", DEVICE, "a.jpg", "image", "image/jpeg", 5.0, "ab" * 32, 1,
           datetime.datetime(2024, 3, 20, 10, 0, 30, tzinfo=datetime.UTC), "stored")
    assert listing_json.listing([row, row[:5] + (0, "", 0) + row[8:]]) == (
        b'[{"id":"evt_a","name":"a.jpg","media_type":"image","size":5,"has_thumbnail":true,'
        b'"created":"2024-03-20T10:00:30Z","mime_type":"image/jpeg","sha256":"' + b"ab" * 32 + b'","state":"stored"},'
        b'{"id":"evt_a","name":"a.jpg","media_type":"image","size":0,"has_thumbnail":false,'
        b'"created":"2024-03-20T10:00:30Z","mime_type":"image/jpeg","sha256":"","state":"stored"}]'
    )
    assert listing_json.listing([]) == b"[]"
