"""Time windows, order and page tokens through the real Envoy."""

from __future__ import annotations

import datetime
import sqlite3
import uuid

from gallery.v1 import gallery_pb2 as pb
from gallery.v1 import gallery_pb2_grpc


def upload(http, headers, device, name):
    r = http.post(f"/api/gallery/{device}/upload", headers=headers,
                  files={"event": (name, b"x" * 10)}, data={"name": name})
    assert r.status_code == 200, r.text
    return r.json()["eventId"]


def test_page_tokens_across_inserts_return_every_event_once(http, auth_headers):
    device, headers = f"list-{uuid.uuid4().hex[:8]}", auth_headers()
    before = [upload(http, headers, device, f"{i}.txt") for i in range(7)]
    seen, token, pages = [], "", 0
    while True:
        params = {"limit": 3, **({"page_token": token} if token else {})}
        r = http.get(f"/api/gallery/{device}/events", params=params, headers=headers)
        assert r.status_code == 200, r.text
        assert isinstance(r.json(), list)  # the documented top-level array, unchanged
        seen += [e["id"] for e in r.json()]
        token = r.headers["x-next-page-token"]
        pages += 1
        if pages == 1:
            upload(http, headers, device, "late.txt")  # newer than the cursor: not in later pages
        if not token:
            break
    assert seen == list(reversed(before))
    assert pages == 3


def test_order_and_time_window(http, auth_headers):
    device, headers = f"list-{uuid.uuid4().hex[:8]}", auth_headers()
    ids = [upload(http, headers, device, f"{i}.txt") for i in range(4)]
    listed = http.get(f"/api/gallery/{device}/events?order=oldest", headers=headers).json()
    assert [e["id"] for e in listed] == ids
    second = listed[1]["created"]
    window = http.get(f"/api/gallery/{device}/events", headers=headers,
                      params={"order": "oldest", "since": second, "until": listed[3]["created"]}).json()
    assert [e["id"] for e in window] == ids[1:3]
    future = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1)).isoformat()
    assert http.get(f"/api/gallery/{device}/events", params={"since": future}, headers=headers).json() == []


def test_bad_listing_parameters_are_json_400s(http, auth_headers):
    device, headers = f"list-{uuid.uuid4().hex[:8]}", auth_headers()
    for params, reason in (({"order": "sideways"}, "INVALID_ORDER"), ({"since": "today"}, "INVALID_TIME"),
                           ({"page_token": "nope"}, "INVALID_PAGE_TOKEN")):
        r = http.get(f"/api/gallery/{device}/events", params=params, headers=headers)
        assert r.status_code == 400, r.text
        assert r.json()["details"][0]["reason"] == reason


# Events as a device announces them (no file on the server), with the timestamps, sizes and names
# whose JSON spelling could differ between the server's printers and Envoy's: (created UTC, size,
# name, has_thumbnail).
ANNOUNCED = [
    ("2024-03-20 10:00:00.000000", 0, 'quote " backslash \\ <b>&amp; a<b', 0),
    ("2024-03-20 10:00:00.120000", 999_999_999_999_999, "café 📷 カメラ.jpg", 1),
    ("2024-03-20 10:00:00.123456", 2**53, "plain.mp4", 0),
    ("1999-12-31 23:59:59.000001", 1, "x" * 300, 1),
    # Characters protobuf's printer escapes; names refuse all but < and >, but a row written
    # by anything else must still print as Envoy printed it.
    ("2024-03-20 10:00:01.000000", 7, "del\x7f soft\u00ad zw\u200b ls\u2028 ps\u2029 bom\ufeff", 0),
    ("2024-03-20 10:00:02.000000", 8, "c1\x85 ar\u0600 kh\u17b4\u17b5 bidi\u202a wj\u2060 ann\ufff9"
     " tag\U000e0001\U000e0041 music\U0001d173 ok", 0),
    ("2024-03-20 10:00:03.000000", 9, "ក\u17b4.jpg", 0),  # a name the names policy accepts
    # Controls that JSON itself escapes, as another tool might have written them.
    ("2024-03-20 10:00:04.000000", 10, "ctl \x01\x1f\t\n\r\b\f end", 0),
]
ANNOUNCE_SQL = (
    "INSERT INTO events (id, device, name, media_type, mime_type, size, sha256, has_thumbnail,"
    " metadata_json, created, state, thumbnail_state, thumbnail_attempts, media_info_json)"
    " VALUES ({id}, {device}, {name}, 'video', '', {size}, '', {thumbnail}, '{{}}', {created}, 'on_device', '', 0, '')"
)


def _seed_announced(stack, device: str) -> None:
    with sqlite3.connect(stack.data_dir / "gallery.db", timeout=30) as db:
        db.executemany(
            ANNOUNCE_SQL.format(id="?", device="?", name="?", size="?", thumbnail="?", created="?"),
            [(f"evt_{uuid.uuid4().hex[:22]}", device, name, size, thumbnail, created)
             for created, size, name, thumbnail in ANNOUNCED],
        )


def assert_listing_is_envoys_printing(http, headers, device: str) -> None:
    """Byte for byte: a page of events without metadata is the events as Envoy prints GetEvent,
    minus their (empty) `metadata`, joined into an array."""
    page = http.get(f"/api/gallery/{device}/events", headers=headers)
    assert page.status_code == 200, page.text
    assert len(page.json()) == len(ANNOUNCED)
    printed = []
    for event in page.json():
        one = http.get(f"/api/gallery/{device}/events/{event['id']}", headers=headers).content
        assert one.count(b',"metadata":{},') == 1, one
        printed.append(one.replace(b',"metadata":{},', b","))
    assert page.content == b"[" + b",".join(printed) + b"]"
    assert b"\\u003cb\\u003e" in page.content and b"\\u2028" in page.content and b"\\u0001\\u001f\\t\\n" in page.content


def test_listed_events_read_exactly_as_envoy_prints_an_event(stack, http, auth_headers):
    """The listing's JSON is printed by the server (ListEventsJson, one message per page); each
    event must read as Envoy's transcoder prints the same Event for GetEvent, without the two
    fields a listing leaves unset: same keys in the same order, same values, same JSON types."""
    device, headers = f"list-{uuid.uuid4().hex[:8]}", auth_headers()
    upload(http, headers, device, "upload.txt")
    r = http.post(f"/api/gallery/{device}/upload", headers=headers, data={"name": "with-thumb.jpg"},
                  files={"event": ("a.jpg", b"\xff\xd8\xff" + b"0" * 100), "thumbnail": ("t.jpg", b"\xff\xd8\xff")})
    assert r.status_code == 200, r.text
    _seed_announced(stack, device)
    r = http.get(f"/api/gallery/{device}/events", params={"limit": 1000}, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.headers["x-next-page-token"] == ""
    listed = r.json()
    assert len(listed) == 2 + len(ANNOUNCED)
    for event in listed:
        one = http.get(f"/api/gallery/{device}/events/{event['id']}", headers=headers)
        assert one.status_code == 200, one.text
        printed = {key: value for key, value in one.json().items() if key not in ("metadata", "pull")}
        assert list(event) == list(printed)
        assert event == printed
        assert [type(v) for v in event.values()] == [type(v) for v in printed.values()]
    sizes = {e["size"] for e in listed}
    assert {0, 999_999_999_999_999, 2**53} <= sizes
    assert {e["created"] for e in listed} >= {
        "2024-03-20T10:00:00Z", "2024-03-20T10:00:00.120Z", "2024-03-20T10:00:00.123456Z",
        "1999-12-31T23:59:59.000001Z",
    }


def test_listing_bytes_are_envoys_bytes(stack, http, auth_headers):
    """SQLite's printer (tests/e2e/test_postgres_stack.py holds PostgreSQL's)."""
    device, headers = f"list-{uuid.uuid4().hex[:8]}", auth_headers()
    _seed_announced(stack, device)
    assert_listing_is_envoys_printing(http, headers, device)


def test_native_list_and_rest_list_are_the_same_page(stack, http, auth_headers, envoy_channel):
    """ListEvents (native, streamed) and the REST listing share one query: same events, same
    order, same next-page token, for every filter combination the REST route takes."""
    device, headers = f"list-{uuid.uuid4().hex[:8]}", auth_headers()
    for i in range(5):
        upload(http, headers, device, f"{i}.txt")
    _seed_announced(stack, device)
    stub = gallery_pb2_grpc.GalleryServiceStub(envoy_channel)
    metadata = [("authorization", headers["Authorization"])]
    first = http.get(f"/api/gallery/{device}/events", params={"limit": 2}, headers=headers)
    cases = [
        {"limit": 2},
        {"limit": 3, "order": "oldest"},
        {"media_type": "video"},
        {"since": "2024-03-20T10:00:00.100Z", "until": "2024-03-21T00:00:00Z", "order": "oldest"},
        {"limit": 2, "page_token": first.headers["x-next-page-token"]},
        {"offset": 3, "limit": 4},
    ]
    for params in cases:
        r = http.get(f"/api/gallery/{device}/events", params=params, headers=headers)
        assert r.status_code == 200, (params, r.text)
        responses = stub.ListEvents(pb.ListEventsRequest(device=device, **params), metadata=metadata)
        native = list(responses)
        token = dict(responses.initial_metadata())["x-next-page-token"]
        assert [e["id"] for e in r.json()] == [e.id for e in native], params
        assert r.headers["x-next-page-token"] == token, params
