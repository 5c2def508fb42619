"""The REST contract of media-api-reference, checked end to end: real `gallery run` (gRPC server and
Envoy), real bearer tokens, real multipart bodies, bytes compared on disk.

Every key and JSON type the reference names is a promise. Each test works on its own uuid-based
device so the tests do not depend on their order (the reference's own curl examples use the literal
`device123`; those tests only assert what they themselves created).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import random
import re
import socket
import struct
import time
import uuid
import zlib
from collections.abc import Callable

import httpx
import pytest

from ..conftest import new_device, random_bytes, stored_files
from .conftest import access_line

READ = "gallery:read"
WRITE = "gallery:write"
DEVICE = "gallery:device"
OTHER_SECRET = "other-secret-" + "y" * 40  # long enough that PyJWT does not warn about it
BOUNDARY = "gallery-test-boundary-7c1d0f"
EVENT_ID_RE = re.compile(r"^evt_[A-Za-z0-9_-]{22}$")
RFC3339_UTC_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
UNKNOWN_EVENT_ID = "evt_" + "A" * 22  # well-formed, never issued (ids are 128 random bits)
GRPC_CODES = {400: 3, 401: 16, 403: 7, 404: 5}
EVENT_KEYS = {"id", "name", "media_type", "size", "has_thumbnail", "created", "mime_type", "sha256", "state"}


# -- helpers ------------------------------------------------------------------------------------


def is_number(value: object) -> bool:
    """A JSON number (not a string, not a boolean)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_int_number(value: object) -> bool:
    return is_number(value) and float(value) == int(value)  # type: ignore[arg-type]


def png_bytes() -> bytes:
    """A real 1x1 PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00\xff\x00\x00")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def jpeg_bytes() -> bytes:
    """A JPEG/JFIF header (SOI + APP0) followed by filler and EOI."""
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    return b"\xff\xd8" + app0 + b"\x00" * 64 + b"\xff\xd9"


# Deterministic, content-sniffing-neutral bytes (no known magic number at their start).
OPAQUE_BYTES = random.Random(20240320).randbytes(8192)

Part = tuple[str, "str | bytes | tuple[str, bytes]"]


def multipart(parts: list[Part], *, boundary: str = BOUNDARY, close: bool = True) -> bytes:
    """A multipart/form-data body with the parts in exactly the given order.

    A part is (field, text) for a text field or (field, (filename, bytes)) for a file.
    """
    out = bytearray()
    for field, value in parts:
        out += f"--{boundary}\r\n".encode()
        if isinstance(value, tuple):
            filename, data = value
            out += f'Content-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'.encode()
            out += b"Content-Type: application/octet-stream\r\n\r\n"
            out += data
        else:
            out += f'Content-Disposition: form-data; name="{field}"\r\n\r\n'.encode()
            out += value.encode() if isinstance(value, str) else value
        out += b"\r\n"
    if close:
        out += f"--{boundary}--\r\n".encode()
    return bytes(out)


def post_form(
    http: httpx.Client,
    device: str,
    headers: dict[str, str],
    parts: list[Part],
    *,
    close: bool = True,
    content_type: str | None = None,
) -> httpx.Response:
    return http.post(
        f"/api/gallery/{device}/upload",
        content=multipart(parts, close=close),
        headers={
            **headers,
            "Content-Type": content_type or f"multipart/form-data; boundary={BOUNDARY}",
        },
    )


def upload(
    http: httpx.Client,
    device: str,
    headers: dict[str, str],
    *,
    name: str = "file.bin",
    data: bytes = b"payload",
    media_type: str | None = None,
    metadata: str | None = None,
    thumbnail: bytes | None = None,
    has_thumbnail: str | None = None,
) -> str:
    """Upload one event, assert the contract's success shape, return its id."""
    parts: list[Part] = [("name", name), ("event", (name, data))]
    if media_type is not None:
        parts.append(("media_type", media_type))
    if metadata is not None:
        parts.append(("metadata", metadata))
    if thumbnail is not None:
        parts.append(("thumbnail", ("thumb.jpg", thumbnail)))
    if has_thumbnail is not None:
        parts.append(("has_thumbnail", has_thumbnail))
    r = post_form(http, device, headers, parts)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body.keys() == {"success", "eventId"}, body
    assert body["success"] is True
    assert isinstance(body["eventId"], str) and EVENT_ID_RE.match(body["eventId"]), body
    return str(body["eventId"])


def list_events(http: httpx.Client, device: str, headers: dict[str, str], **params: object) -> list[dict]:
    r = http.get(f"/api/gallery/{device}/events", params=params, headers=headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body, list), body
    return body


def get_event(http: httpx.Client, device: str, event_id: str, headers: dict[str, str]) -> dict:
    r = http.get(f"/api/gallery/{device}/events/{event_id}", headers=headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body, dict), body
    return body


def error_infos(body: dict) -> list[dict]:
    return [d for d in body.get("details", []) if d.get("@type", "").endswith("google.rpc.ErrorInfo")]


def assert_error(r: httpx.Response, status: int, reason: str | None = None) -> dict:
    """A server-produced error: the HTTP status, a JSON google.rpc.Status, an ErrorInfo reason."""
    assert r.status_code == status, (r.status_code, r.headers.get("content-type"), r.text)
    assert r.headers.get("content-type", "").startswith("application/json"), (r.headers, r.text)
    body = r.json()
    assert isinstance(body, dict), body
    assert body.get("code") == GRPC_CODES[status], body
    assert isinstance(body.get("message"), str) and body["message"], body
    assert isinstance(body.get("details"), list), body
    infos = error_infos(body)
    assert len(infos) == 1, body
    assert infos[0].get("domain") == "gallery", body
    assert isinstance(infos[0].get("reason"), str) and infos[0]["reason"], body
    if reason is not None:
        assert infos[0]["reason"] == reason, body
    return body


def assert_event_object(event: dict) -> None:
    """Keys and JSON types of an event as the list renders it (no metadata there)."""
    assert set(event) == EVENT_KEYS, event
    assert event["state"] == "stored"
    assert isinstance(event["id"], str) and EVENT_ID_RE.match(event["id"])
    assert isinstance(event["name"], str)
    assert event["media_type"] in ("image", "video", "audio", "document", "other")
    assert is_int_number(event["size"]) and event["size"] >= 0, event
    assert isinstance(event["has_thumbnail"], bool), event
    assert isinstance(event["mime_type"], str) and event["mime_type"], event
    assert isinstance(event["sha256"], str) and re.fullmatch(r"[0-9a-f]{64}", event["sha256"]), event
    assert isinstance(event["created"], str) and RFC3339_UTC_RE.match(event["created"]), event
    created = datetime.datetime.fromisoformat(event["created"])
    assert created.utcoffset() == datetime.timedelta(0)
    now = datetime.datetime.now(datetime.UTC)
    assert now - datetime.timedelta(minutes=10) < created < now + datetime.timedelta(minutes=1), event


# -- the reference's curl examples, replayed ------------------------------------------------------


def test_example_paths(http, auth_headers, stack):
    r = http.get("/api/gallery/device123/paths", headers=auth_headers())
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body == {
        "success": True,
        "paths": {
            "incoming": str(stack.data_dir / "gallery" / "device123" / "incoming"),
            "thumbnails": str(stack.data_dir / "gallery" / "device123" / "thumbnails"),
        },
    }
    assert isinstance(body["paths"]["incoming"], str) and isinstance(body["paths"]["thumbnails"], str)
    assert (stack.data_dir / "gallery" / "device123" / "thumbnails").is_dir()


def test_example_upload(http, auth_headers, stack):
    # The curl example's field order: name, event, media_type, metadata.
    data = jpeg_bytes()
    metadata = '{"timestamp":"2024-03-20T10:00:00Z"}'
    r = post_form(http, "device123", auth_headers(), [
        ("name", "capture.jpg"),
        ("event", ("capture.jpg", data)),
        ("media_type", "image"),
        ("metadata", metadata),
    ])
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body.keys() == {"success", "eventId"}, body
    assert body["success"] is True
    assert isinstance(body["eventId"], str) and EVENT_ID_RE.match(body["eventId"])
    event_id = body["eventId"]

    assert (stack.data_dir / "media" / "device123" / event_id).read_bytes() == data
    event = get_event(http, "device123", event_id, auth_headers())
    assert event["metadata"] == {"timestamp": "2024-03-20T10:00:00Z"}
    assert event["name"] == "capture.jpg"
    assert event["media_type"] == "image"
    assert event["size"] == len(data)
    assert event["has_thumbnail"] is False


def test_example_list_events_video_filter(http, auth_headers):
    headers = auth_headers()
    video = upload(http, "device123", headers, name="clip.mp4", data=OPAQUE_BYTES, media_type="video")
    image = upload(http, "device123", headers, name="pic.png", data=png_bytes(), media_type="image")
    r = http.get("/api/gallery/device123/events?media_type=video", headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    events = r.json()
    assert isinstance(events, list)
    assert events, "the video just uploaded must be listed"
    for event in events:
        assert_event_object(event)
        assert event["media_type"] == "video"
    ids = [e["id"] for e in events]
    assert video in ids
    assert image not in ids


def test_example_upload_url_with_thumbnail(http, auth_headers):
    r = http.get("/api/gallery/device123/upload-url?filename=video.mp4&thumbnail=true",
                 headers=auth_headers())
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body.keys() == {"success", "upload_url", "thumbnail_upload_url", "eventId", "expires_at"}, body
    assert body["success"] is True
    assert isinstance(body["upload_url"], str) and body["upload_url"].startswith("http")
    assert isinstance(body["thumbnail_upload_url"], str) and body["thumbnail_upload_url"].startswith("http")
    assert body["upload_url"] != body["thumbnail_upload_url"]
    assert "/api/gallery/device123/upload/" in body["upload_url"]
    assert isinstance(body["eventId"], str) and EVENT_ID_RE.match(body["eventId"])
    assert isinstance(body["expires_at"], str) and RFC3339_UTC_RE.match(body["expires_at"])
    expires = datetime.datetime.fromisoformat(body["expires_at"])
    assert expires > datetime.datetime.now(datetime.UTC)


@pytest.mark.parametrize("query", ["filename=video.mp4", "filename=video.mp4&thumbnail=false"])
def test_example_upload_url_without_thumbnail_omits_key(http, auth_headers, query):
    r = http.get(f"/api/gallery/device123/upload-url?{query}", headers=auth_headers())
    assert r.status_code == 200, r.text
    body = r.json()
    assert "thumbnail_upload_url" not in body, body
    assert body["success"] is True
    assert isinstance(body["upload_url"], str) and body["upload_url"]
    assert body.keys() == {"success", "upload_url", "eventId", "expires_at"}, body


def test_example_stats(http, auth_headers):
    r = http.get("/api/gallery/device123/stats", headers=auth_headers())
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body.keys() == {"total_events", "total_size", "by_type"}, body
    assert is_int_number(body["total_events"]) and is_int_number(body["total_size"]), body
    assert isinstance(body["by_type"], dict)
    for media_type, entry in body["by_type"].items():
        assert media_type in ("image", "video", "audio", "document", "other")
        assert entry.keys() == {"count", "size"}, body
        assert is_int_number(entry["count"]) and entry["count"] > 0, body
        assert is_int_number(entry["size"]), body
    assert body["total_events"] == sum(e["count"] for e in body["by_type"].values())
    assert body["total_size"] == sum(e["size"] for e in body["by_type"].values())


def test_example_delete(http, auth_headers, stack):
    headers = auth_headers()
    event_id = upload(http, "device123", headers, name="gone.jpg", data=jpeg_bytes(),
                      thumbnail=png_bytes(), has_thumbnail="true")
    media = stack.data_dir / "media" / "device123" / event_id
    assert media.is_file() and media.with_name(event_id + ".thumb").is_file()

    r = http.delete(f"/api/gallery/device123/events/{event_id}", headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json() == {"success": True}
    assert not media.exists()
    assert not media.with_name(event_id + ".thumb").exists()
    assert event_id not in [e["id"] for e in list_events(http, "device123", headers, limit=1000)]

    assert_error(http.delete(f"/api/gallery/device123/events/{event_id}", headers=headers),
                 404, "EVENT_NOT_FOUND")
    assert_error(http.get(f"/api/gallery/device123/events/{event_id}", headers=headers),
                 404, "EVENT_NOT_FOUND")


# -- event objects --------------------------------------------------------------------------------


def test_event_object_in_list_and_get(http, auth_headers):
    device, headers = new_device(), auth_headers()
    plain = upload(http, device, headers, name="plain.txt", data=b"hello\n")
    with_meta = upload(http, device, headers, name="meta.png", data=png_bytes(),
                       metadata='{"a": 1, "nested": {"b": [true, null, "x"]}, "f": 1.5}')

    events = list_events(http, device, headers)
    assert [e["id"] for e in events] == [with_meta, plain]
    for event in events:
        assert_event_object(event)
        assert "metadata" not in event
    by_id = {e["id"]: e for e in events}
    assert by_id[plain]["has_thumbnail"] is False  # present even when false
    assert by_id[plain]["size"] == 6
    assert by_id[plain]["name"] == "plain.txt"
    assert by_id[plain]["sha256"] == hashlib.sha256(b"hello\n").hexdigest()
    assert by_id[with_meta]["mime_type"] == "image/png"

    one = get_event(http, device, with_meta, headers)
    assert set(one) == EVENT_KEYS | {"metadata"}, one
    assert one["metadata"] == {"a": 1, "nested": {"b": [True, None, "x"]}, "f": 1.5}
    assert {k: v for k, v in one.items() if k != "metadata"} == by_id[with_meta]

    none = get_event(http, device, plain, headers)
    assert none["metadata"] == {}
    assert {k: v for k, v in none.items() if k != "metadata"} == by_id[plain]


def test_large_upload_with_thumbnail_and_metadata(http, auth_headers, stack):
    device, headers = new_device(), auth_headers()
    data = random_bytes(5 * 1024 * 1024 + 123)
    thumb = png_bytes() + random_bytes(300 * 1024)
    event_id = upload(http, device, headers, name="big.mov", data=data, media_type="video",
                      metadata='{"camera": "front", "frames": 300}', thumbnail=thumb,
                      has_thumbnail="true")

    media = stack.data_dir / "media" / device / event_id
    assert media.read_bytes() == data
    assert media.with_name(event_id + ".thumb").read_bytes() == thumb

    (event,) = list_events(http, device, headers)
    assert_event_object(event)
    assert event["id"] == event_id
    assert event["size"] == len(data)
    assert event["sha256"] == hashlib.sha256(data).hexdigest()
    assert event["has_thumbnail"] is True
    assert event["media_type"] == "video"
    assert event["name"] == "big.mov"
    assert get_event(http, device, event_id, headers)["metadata"] == {"camera": "front", "frames": 300}
    # Nothing of the upload is left in staging.
    assert not [p for p in stored_files(stack.data_dir) if p.parent == stack.data_dir / "staging"]


def test_thumbnail_without_has_thumbnail_flag(http, auth_headers, stack):
    device, headers = new_device(), auth_headers()
    event_id = upload(http, device, headers, name="a.jpg", data=jpeg_bytes(), thumbnail=b"thumb")
    (event,) = list_events(http, device, headers)
    assert event["has_thumbnail"] is True
    assert (stack.data_dir / "media" / device / (event_id + ".thumb")).read_bytes() == b"thumb"


def test_zero_byte_event(http, auth_headers, stack):
    device, headers = new_device(), auth_headers()
    event_id = upload(http, device, headers, name="empty.dat", data=b"")
    assert (stack.data_dir / "media" / device / event_id).read_bytes() == b""
    (event,) = list_events(http, device, headers)
    assert_event_object(event)
    assert event["size"] == 0
    assert event["sha256"] == hashlib.sha256(b"").hexdigest()
    assert event["has_thumbnail"] is False


@pytest.mark.parametrize(
    ("name", "data", "media_type", "mime_type"),
    [
        ("blob", png_bytes(), "image", "image/png"),  # content wins: no extension at all
        ("blob", jpeg_bytes(), "image", "image/jpeg"),
        ("x.mp4", OPAQUE_BYTES, "video", "video/mp4"),
        ("notes.txt", b"just some text\n", "document", "text/plain"),
    ],
    ids=["png", "jpeg", "mp4-name", "txt-name"],
)
def test_media_type_inferred_when_omitted(http, auth_headers, name, data, media_type, mime_type):
    device, headers = new_device(), auth_headers()
    event_id = upload(http, device, headers, name=name, data=data)
    (event,) = list_events(http, device, headers)
    assert event["id"] == event_id
    assert event["media_type"] == media_type
    assert event["mime_type"] == mime_type


def test_explicit_media_type_wins(http, auth_headers):
    device, headers = new_device(), auth_headers()
    upload(http, device, headers, name="x.mp4", data=png_bytes(), media_type="other")
    (event,) = list_events(http, device, headers)
    assert event["media_type"] == "other"


# -- rejected uploads leave nothing behind --------------------------------------------------------

EVENT = ("event", ("f.bin", b"some bytes"))
NAME = ("name", "f.bin")

REJECTED_UPLOADS: dict[str, tuple[list[Part], dict, str]] = {
    # id: (parts, post_form options, expected reason)
    "unknown-media-type": ([NAME, EVENT, ("media_type", "hologram")], {}, "INVALID_MEDIA_TYPE"),
    "metadata-array": ([NAME, EVENT, ("metadata", "[1]")], {}, "INVALID_METADATA"),
    "metadata-not-json": ([NAME, EVENT, ("metadata", "nope")], {}, "INVALID_METADATA"),
    "metadata-string": ([NAME, EVENT, ("metadata", '"x"')], {}, "INVALID_METADATA"),
    # Not JSON at all (RFC 8259 has no NaN/Infinity), and a number no JSON object can carry.
    "metadata-nan": ([NAME, EVENT, ("metadata", '{"a": NaN}')], {}, "INVALID_METADATA"),
    "metadata-infinity": ([NAME, EVENT, ("metadata", '{"a": -Infinity}')], {}, "INVALID_METADATA"),
    "metadata-overflow": ([NAME, EVENT, ("metadata", '{"a": 1e400}')], {}, "INVALID_METADATA"),
    "metadata-nested-nan": ([NAME, EVENT, ("metadata", '{"a": {"b": [1, NaN]}}')], {}, "INVALID_METADATA"),
    # Metadata numbers are doubles (google.protobuf.Struct): an integer beyond +/-2^53 could not be
    # read back unchanged.
    "metadata-int-above-2^53": ([NAME, EVENT, ("metadata", '{"a": 9007199254740993}')], {},
                                "INVALID_METADATA"),
    "metadata-int-below-minus-2^53": ([NAME, EVENT, ("metadata", '{"a": [-9007199254740993]}')], {},
                                      "INVALID_METADATA"),
    "metadata-huge-int": ([NAME, EVENT, ("metadata", '{"a": 1' + "0" * 400 + "}")], {},
                          "INVALID_METADATA"),
    # Too large is a bad request (400), not RESOURCE_EXHAUSTED (429).
    "metadata-field-too-large": ([NAME, EVENT, ("metadata", '{"a": "' + "x" * (64 << 10) + '"}')], {},
                                 "FORM_FIELD_TOO_LARGE"),
    "name-field-too-large": ([("name", "n" * 1021), EVENT], {}, "FORM_FIELD_TOO_LARGE"),
    "media-type-field-too-large": ([NAME, EVENT, ("media_type", "i" * 65)], {}, "FORM_FIELD_TOO_LARGE"),
    # Within the field limit as sent, beyond the metadata limit once stored (1e5 -> 100000.0).
    "metadata-too-large": ([NAME, EVENT, ("metadata", '{"p": "' + "x" * 40_000 + '", "a": ['
                                          + ",".join(["1e15"] * 2000) + "]}")],
                           {}, "METADATA_TOO_LARGE"),  # 1e15 -> 1000000000000000.0
    # Each value costs every read of the event (a Struct): 2,048 at most, the array itself one.
    "metadata-too-many-values": ([NAME, EVENT, ("metadata", '{"a": [' + ",".join(["0"] * 2048) + "]}")],
                                 {}, "INVALID_METADATA"),
    "has-thumbnail-without-part": ([NAME, EVENT, ("has_thumbnail", "true")], {}, "THUMBNAIL_MISSING"),
    "has-thumbnail-bogus": ([NAME, EVENT, ("has_thumbnail", "maybe")], {}, "INVALID_HAS_THUMBNAIL"),
    "missing-name": ([EVENT], {}, "NAME_REQUIRED"),
    "empty-name": ([("name", ""), EVENT], {}, "NAME_REQUIRED"),
    "missing-event": ([NAME, ("media_type", "image")], {}, "EVENT_FILE_REQUIRED"),
    # A browser's form whose file input was left empty: filename="" and no bytes.
    "no-file-chosen": ([NAME, ("event", ("", b""))], {}, "EVENT_FILE_REQUIRED"),
    "other-field-too-large": ([NAME, EVENT, ("color", "b" * 70_000)], {}, "FORM_FIELD_TOO_LARGE"),
    "duplicate-field": ([NAME, EVENT, ("event", ("g.bin", b"other"))], {}, "DUPLICATE_FORM_FIELD"),
    "truncated-body": ([NAME, EVENT], {"close": False}, "MALFORMED_MULTIPART"),
    "json-content-type": ([NAME, EVENT], {"content_type": "application/json"}, "NOT_MULTIPART"),
    "multipart-without-boundary": ([NAME, EVENT], {"content_type": "multipart/form-data"}, "NOT_MULTIPART"),
    "text-plain": ([NAME, EVENT], {"content_type": "text/plain"}, "NOT_MULTIPART"),
    "boundary-over-256": ([NAME, EVENT], {"content_type": "multipart/form-data; boundary=" + "b" * 257},
                          "MALFORMED_MULTIPART"),
}


@pytest.mark.parametrize("case", list(REJECTED_UPLOADS))
def test_rejected_upload_leaves_nothing(http, auth_headers, stack, case):
    parts, options, reason = REJECTED_UPLOADS[case]
    device, headers = new_device(), auth_headers()
    before = stored_files(stack.data_dir)
    r = post_form(http, device, headers, parts, **options)
    assert_error(r, 400, reason)
    assert stored_files(stack.data_dir) == before
    assert list_events(http, device, headers) == []
    assert not (stack.data_dir / "media" / device).exists() or not any((stack.data_dir / "media" / device).iterdir())


def test_accepted_metadata_stays_readable(http, auth_headers):
    """Metadata the upload accepted must come back from GET (here: an integer beyond any double)."""
    device, headers = new_device(), auth_headers()
    huge = "1" + "0" * 400
    r = post_form(http, device, headers, [NAME, EVENT, ("metadata", '{"big": ' + huge + ', "ok": 1}')])
    if r.status_code == 400:  # rejecting it is fine too
        assert_error(r, 400, "INVALID_METADATA")
        return
    assert r.status_code == 200, r.text
    event_id = r.json()["eventId"]
    g = http.get(f"/api/gallery/{device}/events/{event_id}", headers=headers)
    assert g.status_code == 200, g.text
    assert g.json()["metadata"]["ok"] == 1


def _nested(depth: int) -> str:
    """Metadata `depth` objects and arrays deep, the metadata object itself the first."""
    return '{"a":' + '[{"b":' * ((depth - 1) // 2) + ('[]' if depth % 2 == 0 else '1') + '}]' * ((depth - 1) // 2) + '}'


def test_metadata_nested_as_deep_as_allowed_reads_back_everywhere(http, auth_headers, envoy_channel):
    """The deepest metadata accepted comes back from GET through Envoy and from native GetEvent
    (the listing, which has no metadata, lists the event); one level more is refused at upload,
    never stored unreadable (Envoy's transcoder answered 502 and grpcio's client failed from ~50
    levels)."""
    from google.protobuf import json_format

    from gallery.v1 import gallery_pb2 as pb
    from gallery.v1 import gallery_pb2_grpc

    assert json.loads(_nested(3)) == {"a": [{"b": 1}]} and json.loads(_nested(4)) == {"a": [{"b": []}]}
    device, headers = new_device(), auth_headers()
    deepest = _nested(32)
    r = post_form(http, device, headers, [NAME, EVENT, ("metadata", deepest)])
    assert r.status_code == 200, r.text
    event_id = r.json()["eventId"]
    g = http.get(f"/api/gallery/{device}/events/{event_id}", headers=headers)
    assert g.status_code == 200, g.text
    assert g.json()["metadata"] == json.loads(deepest)
    assert [e["id"] for e in list_events(http, device, headers)] == [event_id]
    native = gallery_pb2_grpc.GalleryServiceStub(envoy_channel).GetEvent(
        pb.GetEventRequest(device=device, event_id=event_id), metadata=[("authorization", headers["Authorization"])],
        timeout=30)
    assert native.id == event_id and json_format.MessageToDict(native.metadata) == json.loads(deepest)
    for too_deep in (_nested(33), '{"a":' + "[" * 40 + "]" * 40 + "}"):
        assert_error(post_form(http, new_device(), headers, [NAME, EVENT, ("metadata", too_deep)]), 400,
                     "INVALID_METADATA")


@pytest.mark.parametrize("complete_multipart", [False, True], ids=["mid-body", "before-declared-end"])
def test_client_abort_leaves_nothing(http, auth_headers, stack, complete_multipart):
    """A client that disconnects before sending all of its Content-Length stores nothing, even when
    the bytes it did send happen to form a complete multipart body. What the server sees depends on
    timing, so the abort is repeated (each attempt exposed a bad server about a third of the time)."""
    device, headers = new_device(), auth_headers()
    media_dir = stack.data_dir / "media" / device
    host, port = stack.base_url.removeprefix("http://").rsplit(":", 1)
    before = stored_files(stack.data_dir)
    for _ in range(10):
        body = multipart([NAME, ("event", ("f.bin", random_bytes(256 << 10)))])
        sent = body if complete_multipart else body[: 128 << 10]
        declared = len(body) + (1000 if complete_multipart else 0)
        head = (
            f"POST /api/gallery/{device}/upload HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: {headers['Authorization']}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {declared}\r\n\r\n"
        )
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(head.encode() + sent)
            time.sleep(0.25)  # let the server receive and parse everything that was sent
        time.sleep(0.05)
        if media_dir.exists():
            break
    deadline = time.monotonic() + 10  # the server notices the aborts, then cleans up staging
    while stored_files(stack.data_dir) != before and time.monotonic() < deadline and not media_dir.exists():
        time.sleep(0.05)
    stored = list_events(http, device, headers)
    assert stored == [], "an aborted upload was stored as an event"
    assert stored_files(stack.data_dir) == before


def test_metadata_number_limits_round_trip(http, auth_headers):
    """The largest integers a double holds exactly, and finite doubles, are kept as sent."""
    device, headers = new_device(), auth_headers()
    metadata = {"max": 2**53, "min": -(2**53), "big": 1e300, "small": 5e-324, "half": 0.5}
    event_id = upload(http, device, headers, metadata=json.dumps(metadata))
    assert get_event(http, device, event_id, headers)["metadata"] == metadata


def form_access(stack) -> list[dict]:
    """The server's access-log entries for the multipart upload, oldest first."""
    return [
        json.loads(line) for line in stack.log().splitlines()
        if line.startswith("{") and '"method": "/gallery.v1.GalleryService/UploadEventForm"' in line
    ]


@pytest.mark.parametrize("missing", [1, 1000], ids=["one-byte-short", "1000-bytes-short"])
def test_complete_multipart_shorter_than_content_length_stores_nothing(http, auth_headers, stack, missing):
    """A raw POST whose bytes form a complete multipart body (closing boundary included) but fall
    short of its Content-Length, the connection then closed: every attempt stores nothing. The
    server sees either the reset or a body shorter than declared (BODY_INCOMPLETE)."""
    headers = auth_headers()
    host, port = stack.base_url.removeprefix("http://").rsplit(":", 1)
    outcomes = []
    for _ in range(5):
        device = new_device()
        before = stored_files(stack.data_dir)
        seen = len(form_access(stack))
        body = multipart([NAME, ("event", ("f.bin", random_bytes(200 << 10))),
                          ("thumbnail", ("t.jpg", jpeg_bytes())), ("has_thumbnail", "true")])
        head = (
            f"POST /api/gallery/{device}/upload HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Authorization: {headers['Authorization']}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            f"Content-Length: {len(body) + missing}\r\n\r\n"
        )
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(head.encode() + body)
            time.sleep(0.25)  # let the server receive and parse everything that was sent
        deadline = time.monotonic() + 10  # wait for the server to be done with the call
        while len(form_access(stack)) == seen:
            assert time.monotonic() < deadline, stack.log()[-3000:]
            time.sleep(0.05)
        entry = form_access(stack)[seen]
        outcomes.append((entry["code"], entry["reason"]))
        assert list_events(http, device, headers) == [], outcomes
        assert stored_files(stack.data_dir) == before, outcomes
        assert not list((stack.data_dir / "media").glob(f"{device}/*")), outcomes
    assert set(outcomes) <= {("CANCELLED", ""), ("INVALID_ARGUMENT", "UPLOAD_CANCELLED"),
                             ("INVALID_ARGUMENT", "BODY_INCOMPLETE")}, outcomes


def test_upload_without_content_type_is_rejected(http, auth_headers, stack):
    device, headers = new_device(), auth_headers()
    before = stored_files(stack.data_dir)
    r = http.post(f"/api/gallery/{device}/upload", content=multipart([NAME, EVENT]), headers=headers)
    assert_error(r, 400, "NOT_MULTIPART")
    assert stored_files(stack.data_dir) == before
    assert list_events(http, device, headers) == []


def test_rejected_large_upload_leaves_nothing(http, auth_headers, stack):
    """A multi-MiB body, streamed in several pieces, rejected at its end (bad metadata last)."""
    device, headers = new_device(), auth_headers()
    before = stored_files(stack.data_dir)
    r = post_form(http, device, headers, [NAME, ("event", ("big", random_bytes(3 << 20))), ("metadata", "[]")])
    assert_error(r, 400, "INVALID_METADATA")
    assert stored_files(stack.data_dir) == before
    assert list_events(http, device, headers) == []


# -- listing --------------------------------------------------------------------------------------


def test_listing_newest_first_and_paging(http, auth_headers):
    device, headers = new_device(), auth_headers()
    uploaded = [upload(http, device, headers, name=f"n{i}.txt", data=str(i).encode()) for i in range(53)]
    newest_first = list(reversed(uploaded))

    everything = list_events(http, device, headers, limit=1000)
    assert [e["id"] for e in everything] == newest_first
    created = [datetime.datetime.fromisoformat(e["created"]) for e in everything]
    assert created == sorted(created, reverse=True)
    assert [e["name"] for e in everything] == [f"n{i}.txt" for i in reversed(range(53))]

    # Default limit is 50.
    assert [e["id"] for e in list_events(http, device, headers)] == newest_first[:50]

    for size in (1, 7, 20, 53):
        paged: list[str] = []
        offset = 0
        while True:
            page = list_events(http, device, headers, limit=size, offset=offset)
            assert len(page) <= size
            if not page:
                break
            paged += [e["id"] for e in page]
            offset += size
        assert paged == newest_first, size
        assert len(set(paged)) == len(paged)

    assert list_events(http, device, headers, offset=53) == []
    assert list_events(http, device, headers, offset=10_000) == []
    assert [e["id"] for e in list_events(http, device, headers, offset=50)] == newest_first[50:]


def test_listing_media_type_filter(http, auth_headers):
    device, headers = new_device(), auth_headers()
    images = [upload(http, device, headers, name=f"i{i}.png", data=png_bytes()) for i in range(3)]
    videos = [upload(http, device, headers, name=f"v{i}.mp4", data=OPAQUE_BYTES) for i in range(2)]
    docs = [upload(http, device, headers, name="d.txt", data=b"text")]

    assert [e["id"] for e in list_events(http, device, headers, media_type="image")] == images[::-1]
    assert [e["id"] for e in list_events(http, device, headers, media_type="video")] == videos[::-1]
    assert [e["id"] for e in list_events(http, device, headers, media_type="document")] == docs
    assert list_events(http, device, headers, media_type="audio") == []
    assert list_events(http, device, headers, media_type="other") == []
    assert [e["id"] for e in list_events(http, device, headers, media_type="image", limit=1, offset=1)] == [
        images[1]
    ]
    assert len(list_events(http, device, headers)) == 6


def test_listing_empty_device_is_empty_array(http, auth_headers):
    r = http.get(f"/api/gallery/{new_device()}/events", headers=auth_headers())
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json() == []


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("limit=0", "INVALID_LIMIT"),
        ("limit=1001", "INVALID_LIMIT"),
        ("limit=-5", "INVALID_LIMIT"),
        ("offset=-1", "INVALID_OFFSET"),
        ("media_type=bogus", "INVALID_MEDIA_TYPE"),
        ("media_type=IMAGE", "INVALID_MEDIA_TYPE"),
    ],
)
def test_listing_bad_parameters(http, auth_headers, query, reason):
    device, headers = new_device(), auth_headers()
    upload(http, device, headers)
    body = assert_error(http.get(f"/api/gallery/{device}/events?{query}", headers=headers), 400, reason)
    assert body["code"] == 3


@pytest.mark.parametrize("query", ["limit=1000", "limit=1", "offset=0", "limit=1000&offset=0"])
def test_listing_boundary_parameters_accepted(http, auth_headers, query):
    device, headers = new_device(), auth_headers()
    event_id = upload(http, device, headers)
    r = http.get(f"/api/gallery/{device}/events?{query}", headers=headers)
    assert r.status_code == 200, r.text
    assert [e["id"] for e in r.json()] == [event_id]


# -- stats ----------------------------------------------------------------------------------------


def test_stats_counts_sizes_and_types(http, auth_headers):
    device, headers = new_device(), auth_headers()
    empty = http.get(f"/api/gallery/{device}/stats", headers=headers)
    assert empty.status_code == 200, empty.text
    assert empty.json() == {"total_events": 0, "total_size": 0, "by_type": {}}

    image_a, image_b, video = png_bytes(), jpeg_bytes(), OPAQUE_BYTES
    upload(http, device, headers, name="a.png", data=image_a)
    upload(http, device, headers, name="b.jpg", data=image_b)
    upload(http, device, headers, name="c.mp4", data=video, thumbnail=b"t" * 1000)  # thumbnails don't count
    upload(http, device, headers, name="d.txt", data=b"")
    doomed = upload(http, device, headers, name="e.wav", data=b"x" * 10, media_type="audio")
    assert http.delete(f"/api/gallery/{device}/events/{doomed}", headers=headers).status_code == 200

    r = http.get(f"/api/gallery/{device}/stats", headers=headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body == {
        "total_events": 4,
        "total_size": len(image_a) + len(image_b) + len(video),
        "by_type": {
            "image": {"count": 2, "size": len(image_a) + len(image_b)},
            "video": {"count": 1, "size": len(video)},
            "document": {"count": 1, "size": 0},
        },
    }
    # JSON numbers, not int64 strings.
    assert is_int_number(body["total_events"]) and is_int_number(body["total_size"])
    for entry in body["by_type"].values():
        assert is_int_number(entry["count"]) and is_int_number(entry["size"])
    assert re.search(r'"total_events":\s*4[,}]', r.text), r.text


# -- bad ids --------------------------------------------------------------------------------------

DEVICE_ENDPOINTS: dict[str, Callable[[httpx.Client, str, dict], httpx.Response]] = {
    "paths": lambda http, d, h: http.get(f"/api/gallery/{d}/paths", headers=h),
    "list": lambda http, d, h: http.get(f"/api/gallery/{d}/events", headers=h),
    "get": lambda http, d, h: http.get(f"/api/gallery/{d}/events/{UNKNOWN_EVENT_ID}", headers=h),
    "stats": lambda http, d, h: http.get(f"/api/gallery/{d}/stats", headers=h),
    "upload-url": lambda http, d, h: http.get(f"/api/gallery/{d}/upload-url?filename=a.jpg", headers=h),
    "delete": lambda http, d, h: http.delete(f"/api/gallery/{d}/events/{UNKNOWN_EVENT_ID}", headers=h),
    "upload": lambda http, d, h: post_form(http, d, h, [NAME, EVENT]),
}


@pytest.mark.parametrize("endpoint", list(DEVICE_ENDPOINTS))
@pytest.mark.parametrize("device", ["bad!id", "a" * 129, "-leading-dash", ".hidden"],
                         ids=["bang", "129-chars", "leading-dash", "leading-dot"])
def test_bad_device_id(http, auth_headers, stack, endpoint, device):
    before = stored_files(stack.data_dir)
    assert_error(DEVICE_ENDPOINTS[endpoint](http, device, auth_headers()), 400, "INVALID_DEVICE_ID")
    assert stored_files(stack.data_dir) == before


def test_device_id_of_128_chars_is_valid(http, auth_headers):
    device = "d" + uuid.uuid4().hex + "e" * 95
    assert len(device) == 128
    headers = auth_headers()
    event_id = upload(http, device, headers)
    assert [e["id"] for e in list_events(http, device, headers)] == [event_id]


@pytest.mark.parametrize(
    "event_id", ["nope", "evt_short", "evt_" + "A" * 23, "xyz_" + "A" * 22, "evt_" + "A" * 21 + "!"]
)
def test_bad_event_id(http, auth_headers, event_id):
    device, headers = new_device(), auth_headers()
    upload(http, device, headers)
    assert_error(http.get(f"/api/gallery/{device}/events/{event_id}", headers=headers), 400, "INVALID_EVENT_ID")
    assert_error(http.delete(f"/api/gallery/{device}/events/{event_id}", headers=headers), 400, "INVALID_EVENT_ID")
    assert len(list_events(http, device, headers)) == 1


def test_unknown_event_id_is_not_found(http, auth_headers):
    device, headers = new_device(), auth_headers()
    upload(http, device, headers)
    assert_error(http.get(f"/api/gallery/{device}/events/{UNKNOWN_EVENT_ID}", headers=headers),
                 404, "EVENT_NOT_FOUND")
    assert_error(http.delete(f"/api/gallery/{device}/events/{UNKNOWN_EVENT_ID}", headers=headers),
                 404, "EVENT_NOT_FOUND")
    assert len(list_events(http, device, headers)) == 1


def test_event_of_another_device_is_not_found(http, auth_headers, stack):
    """An event id is scoped to its device: the same id under another device is 404 and is kept."""
    owner, stranger, headers = new_device(), new_device(), auth_headers()
    event_id = upload(http, owner, headers)
    assert_error(http.get(f"/api/gallery/{stranger}/events/{event_id}", headers=headers), 404, "EVENT_NOT_FOUND")
    assert_error(http.delete(f"/api/gallery/{stranger}/events/{event_id}", headers=headers),
                 404, "EVENT_NOT_FOUND")
    assert (stack.data_dir / "media" / owner / event_id).is_file()
    assert [e["id"] for e in list_events(http, owner, headers)] == [event_id]


# -- authentication and authorization --------------------------------------------------------------


def endpoint_call(name: str, http: httpx.Client, device: str, headers: dict[str, str], event_id: str):
    if name == "get":
        return http.get(f"/api/gallery/{device}/events/{event_id}", headers=headers)
    if name == "delete":
        return http.delete(f"/api/gallery/{device}/events/{event_id}", headers=headers)
    return DEVICE_ENDPOINTS[name](http, device, headers)


READ_ENDPOINTS = ["list", "get", "stats"]  # not paths: where to write is a writer's to know
WRITE_ENDPOINTS = ["upload", "upload-url", "delete"]

UNAUTHENTICATED: dict[str, tuple[Callable[[Callable[..., dict]], dict], str]] = {
    "no-header": (lambda auth_headers: {}, "TOKEN_MISSING"),
    "malformed-scheme": (lambda auth_headers: {"Authorization": "Token x"}, "TOKEN_MALFORMED"),
    "bearer-without-token": (lambda auth_headers: {"Authorization": "Bearer"}, "TOKEN_MALFORMED"),
    "garbage-token": (lambda auth_headers: {"Authorization": "Bearer not.a.jwt"}, "TOKEN_INVALID"),
    "bad-signature": (lambda auth_headers: auth_headers(secret=OTHER_SECRET), "TOKEN_INVALID"),
    "expired": (lambda auth_headers: auth_headers(ttl=-120), "TOKEN_EXPIRED"),
}


@pytest.fixture
def victim(http, auth_headers, stack):
    """A device with one event (media and thumbnail on disk) that unauthorized calls must not touch."""
    device = new_device()
    event_id = upload(http, device, auth_headers(), name="victim.jpg", data=jpeg_bytes(), thumbnail=b"t")
    return device, event_id


def assert_victim_intact(http, auth_headers, stack, victim) -> None:
    device, event_id = victim
    assert (stack.data_dir / "media" / device / event_id).read_bytes() == jpeg_bytes()
    assert [e["id"] for e in list_events(http, device, auth_headers())] == [event_id]


@pytest.mark.parametrize("endpoint", READ_ENDPOINTS + WRITE_ENDPOINTS)
@pytest.mark.parametrize("mode", list(UNAUTHENTICATED))
def test_unauthenticated(http, auth_headers, stack, victim, endpoint, mode):
    make_headers, reason = UNAUTHENTICATED[mode]
    device, event_id = victim
    before = stored_files(stack.data_dir)
    r = endpoint_call(endpoint, http, device, make_headers(auth_headers), event_id)
    assert_error(r, 401, reason)
    assert stored_files(stack.data_dir) == before
    assert_victim_intact(http, auth_headers, stack, victim)


def test_expiry_leeway_is_bounded(http, auth_headers):
    """Expired 10 s ago is within the 30 s leeway; 120 s ago is not."""
    device = new_device()
    assert http.get(f"/api/gallery/{device}/stats", headers=auth_headers(ttl=-10)).status_code == 200
    assert_error(http.get(f"/api/gallery/{device}/stats", headers=auth_headers(ttl=-120)), 401, "TOKEN_EXPIRED")


@pytest.mark.parametrize("endpoint", READ_ENDPOINTS + WRITE_ENDPOINTS)
def test_token_for_other_device_is_forbidden(http, auth_headers, stack, victim, endpoint):
    device, event_id = victim
    before = stored_files(stack.data_dir)
    r = endpoint_call(endpoint, http, device, auth_headers(devices=["other"]), event_id)
    assert_error(r, 403, "DEVICE_NOT_ALLOWED")
    assert stored_files(stack.data_dir) == before
    assert_victim_intact(http, auth_headers, stack, victim)


@pytest.mark.parametrize("endpoint", WRITE_ENDPOINTS)
def test_read_only_scope_cannot_write(http, auth_headers, stack, victim, endpoint):
    device, event_id = victim
    before = stored_files(stack.data_dir)
    r = endpoint_call(endpoint, http, device, auth_headers(devices=[device], scope=READ), event_id)
    assert_error(r, 403, "SCOPE_MISSING")
    assert stored_files(stack.data_dir) == before
    assert_victim_intact(http, auth_headers, stack, victim)


@pytest.mark.parametrize("endpoint", READ_ENDPOINTS)
def test_write_only_scope_cannot_read(http, auth_headers, victim, endpoint):
    device, event_id = victim
    r = endpoint_call(endpoint, http, device, auth_headers(devices=[device], scope=WRITE), event_id)
    assert_error(r, 403, "SCOPE_MISSING")


def test_scopes_grant_their_operations(http, auth_headers):
    device = new_device()
    writer = auth_headers(devices=[device], scope=WRITE)
    reader = auth_headers(devices=[device], scope=READ)
    event_id = upload(http, device, writer)
    assert http.get(f"/api/gallery/{device}/upload-url?filename=a.jpg", headers=writer).status_code == 200
    assert [e["id"] for e in list_events(http, device, reader)] == [event_id]
    assert get_event(http, device, event_id, reader)["id"] == event_id
    assert http.get(f"/api/gallery/{device}/stats", headers=reader).json()["total_events"] == 1
    for scopes in (reader, writer, auth_headers(devices=[device], scope=DEVICE)):
        assert http.get(f"/api/gallery/{device}/paths", headers=scopes).json()["success"] is True
    assert http.delete(f"/api/gallery/{device}/events/{event_id}", headers=writer).json() == {"success": True}


def test_token_listing_several_devices(http, auth_headers):
    mine, also_mine, other = new_device(), new_device(), new_device()
    headers = auth_headers(devices=[mine, also_mine])
    upload(http, mine, headers)
    upload(http, also_mine, headers)
    assert len(list_events(http, mine, headers)) == 1
    assert len(list_events(http, also_mine, headers)) == 1
    assert_error(http.get(f"/api/gallery/{other}/events", headers=headers), 403, "DEVICE_NOT_ALLOWED")


def test_wildcard_device_token(http, auth_headers, stack):
    headers = auth_headers(devices=["*"])
    for device in (new_device(), new_device()):
        event_id = upload(http, device, headers, data=b"wild")
        assert (stack.data_dir / "media" / device / event_id).read_bytes() == b"wild"
        assert [e["id"] for e in list_events(http, device, headers)] == [event_id]
        assert get_event(http, device, event_id, headers)["id"] == event_id
        assert http.get(f"/api/gallery/{device}/stats", headers=headers).json()["total_events"] == 1
        assert http.get(f"/api/gallery/{device}/paths", headers=headers).status_code == 200
        assert http.get(f"/api/gallery/{device}/upload-url?filename=a", headers=headers).status_code == 200
        assert http.delete(f"/api/gallery/{device}/events/{event_id}", headers=headers).json() == {"success": True}


@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_forbidden_does_not_reveal_existence(http, auth_headers, stack, victim, method):
    device, event_id = victim
    stranger = auth_headers(devices=["other"])
    existing = http.request(method, f"/api/gallery/{device}/events/{event_id}", headers=stranger)
    missing = http.request(method, f"/api/gallery/{device}/events/{UNKNOWN_EVENT_ID}", headers=stranger)
    a = assert_error(existing, 403, "DEVICE_NOT_ALLOWED")
    b = assert_error(missing, 403, "DEVICE_NOT_ALLOWED")
    assert a == b  # byte-for-byte the same answer
    assert event_id not in json.dumps(a)
    assert_victim_intact(http, auth_headers, stack, victim)


def test_a_query_parameter_named_after_a_path_variable_changes_nothing(http, auth_headers):
    """`?eventId=`, `?event_id=` and `?device=` are ignored: the path names the event and the
    device for every answer (the transcoder let them replace the path's, while Envoy's file
    handoff, HEAD and conditional GETs went by the path: one URL described two events)."""
    device, other, headers = new_device(), new_device(), auth_headers()
    first = upload(http, device, headers, name="a.bin", data=b"a" * 2000)
    second = upload(http, device, headers, name="b.bin", data=b"b" * 677)
    upload(http, other, headers, name="c.bin", data=b"c" * 5)
    content = f"/api/gallery/{device}/events/{first}/content"
    for query in (f"eventId={second}", f"event_id={second}", f"device={other}"):
        assert http.get(f"{content}?{query}", headers=headers).content == b"a" * 2000
        conditional = http.get(f"{content}?{query}", headers={**headers, "If-None-Match": '"other"'})
        assert conditional.content == b"a" * 2000
        assert http.head(f"{content}?{query}", headers=headers).headers["content-length"] == "2000"
        r = http.get(f"/api/gallery/{device}/events/{first}?{query}", headers=headers)
        assert (r.status_code, r.json()["id"]) == (200, first), r.text
    r = http.get(f"/api/gallery/{device}/stats?device={other}", headers=headers)
    assert r.json()["total_events"] == 2, r.text
    r = http.get(f"/api/gallery/{device}/events", params={"device": other}, headers=headers)
    assert [e["id"] for e in r.json()] == [second, first], r.text


def test_a_percent_encoded_query_parameter_name_is_refused(http, auth_headers):
    """The transcoder decodes a query parameter's name after it drops those named after a path
    variable, so `?event%5Fid=B` replaced the path's event (a DELETE of A deleted B): a name
    with a `%` is 400 through Envoy, for every method, and an encoded value still passes."""
    device, other, headers = new_device(), new_device(), auth_headers(devices=["*"])
    first = upload(http, device, headers, name="a.bin", data=b"a" * 20)
    second = upload(http, device, headers, name="b.bin", data=b"b" * 7)
    event = f"/api/gallery/{device}/events/{first}"
    for query in (f"event%5Fid={second}", f"eventI%64={second}", f"%65ventId={second}",
                  f"devic%65={other}", "limit=1&page%5Ftoken=x"):
        for method, path in (("GET", event), ("GET", f"{event}/content"), ("DELETE", event),
                             ("GET", f"/api/gallery/{device}/stats"),
                             ("GET", f"/api/gallery/{device}/events")):
            r = http.request(method, f"{path}?{query}", headers=headers)
            body = assert_error(r, 400, "MALFORMED_REQUEST")
            assert body["message"] == "query parameter names must not be percent-encoded", body
        r = http.head(f"{event}/content?{query}", headers=headers)
        assert r.status_code == 400, (query, r.status_code)
    listed = http.get(f"/api/gallery/{device}/events", headers=headers).json()
    assert [e["id"] for e in listed] == [second, first]  # nothing was deleted
    r = http.get(f"/api/gallery/{device}/events?since=2000-01-01T00%3A00%3A00Z&limit=1", headers=headers)
    assert (r.status_code, [e["id"] for e in r.json()]) == (200, [second]), r.text


def test_a_query_parameter_given_twice_is_refused(http, auth_headers):
    """The transcoder takes a repeated parameter's last value and says nothing:
    `media_type=video&media_type=image` listed images alone, `filename=a.mp4&filename=b.mp4`
    signed a URL for b.mp4. A parameter the request reads, given twice, is 400
    REPEATED_QUERY_PARAMETER, HEAD included; unknown names and those of a path variable stay
    ignored, repeated or not."""
    device, headers = new_device(), auth_headers()
    event_id = upload(http, device, headers, name="a.bin", data=b"a" * 20)
    events, upload_url = f"/api/gallery/{device}/events", f"/api/gallery/{device}/upload-url"
    for path, query, name in (
        (events, "media_type=video&media_type=image", "media_type"),
        (events, "order=oldest&since=2026-01-01T00:00:00Z&order=newest", "order"),
        (events, "until=2099-01-01T00:00:00Z&until=2000-01-01T00:00:00Z", "until"),
        (upload_url, "filename=a.mp4&filename=b.mp4", "filename"),
        (upload_url, "filename=a.mp4&thumbnail=true&thumbnail=false", "thumbnail"),
        (f"/api/gallery/{device}/events/{event_id}", "wait=1&wait=2", None),  # GetEvent reads no wait
    ):
        r = http.get(f"{path}?{query}", headers=headers)
        if name is None:
            assert r.status_code == 200, (query, r.text)
            continue
        body = assert_error(r, 400, "REPEATED_QUERY_PARAMETER")
        assert body["message"] == f"query parameter {name!r} is given more than once: give it once", body
        assert http.head(f"{path}?{query}", headers=headers).status_code == 400, query
    r = http.post(f"/api/gallery/{device}/pull/{event_id}?wait=1&wait=2", headers=headers)
    assert_error(r, 400, "REPEATED_QUERY_PARAMETER")
    sha, other = hashlib.sha256(b"a" * 20).hexdigest(), hashlib.sha256(b"other").hexdigest()
    r = http.post(f"/api/gallery/{device}/checksums?sha256s={sha}&sha256s={other}", headers=headers,
                  json={"sha256s": []})  # a repeated field takes a name more than once by design
    assert (r.status_code, r.json()["existing"]) == (200, {sha: event_id}), r.text
    r = http.get(f"{events}?other=1&other=2&device=x&device=y&limit=5", headers=headers)
    assert (r.status_code, [e["id"] for e in r.json()]) == (200, [event_id]), r.text
    assert http.get(f"{upload_url}?filename=a.mp4&thumbnail=true", headers=headers).status_code == 200


def test_form_fields_the_upload_does_not_read_are_skipped(stack, http, auth_headers):
    """A client may send more than the reference lists (a device id, a timestamp, another file):
    the upload stores what it reads, and the access line names what it skipped."""
    device, headers = new_device(), auth_headers()
    media = random_bytes(300_000)
    r = http.post(f"/api/gallery/{device}/upload", headers=headers,
                  data={"name": "clip.mp4", "device_id": device, "timestamp": "1732960000"},
                  files={"event": ("clip.mp4", media, "video/mp4"), "file": ("x.bin", b"other", "text/plain")})
    assert r.status_code == 200, r.text
    event_id = r.json()["eventId"]
    [event] = http.get(f"/api/gallery/{device}/events", headers=headers).json()
    assert (event["id"], event["name"], event["size"]) == (event_id, "clip.mp4", len(media))
    assert (stack.data_dir / "media" / device / event_id).read_bytes() == media
    line = access_line(stack, r.headers["x-request-id"])
    assert line is not None and line["ignored_form_fields"] == ["device_id", "timestamp", "file"], line


def test_a_time_offset_typed_with_its_plus_sign(http, auth_headers):
    """Envoy reads a query's `+` as a space (as forms write one); a time's offset typed as is,
    `+01:00` unencoded, is still that offset, and so is the %2B a client's encoder sends."""
    device, headers = new_device(), auth_headers()
    event_id = upload(http, device, headers)
    for since, until, listed in (("2000-01-01T01:00:00+01:00", "2999-01-01T00:00:00+01:00", [event_id]),
                                 ("2000-01-01T01:00:00%2B01:00", "2999-01-01T00:00:00%2B01:00", [event_id]),
                                 ("2999-01-01T00:00:00+01:00", "", [])):
        r = http.get(f"/api/gallery/{device}/events?since={since}&until={until}", headers=headers)
        assert r.request.url.query.decode().startswith(f"since={since}&")  # sent as typed
        assert (r.status_code, [e["id"] for e in r.json()]) == (200, listed), (since, r.text)


def test_no_answer_may_be_sniffed_or_run_as_a_page(http, auth_headers):
    """A media file or thumbnail uploaded as HTML or SVG is served with its type, never sniffed
    into another (nosniff) nor run as a page (a sandboxing CSP), and so is every other answer."""
    device, headers = new_device(), auth_headers()
    svg = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'
    event_id = upload(http, device, headers, name="page.html", data=b"<html><script>alert(1)</script></html>",
                      thumbnail=svg)
    base = f"/api/gallery/{device}/events/{event_id}"
    for r in (http.get(f"{base}/content", headers=headers), http.get(f"{base}/thumbnail", headers=headers),
              http.get(f"{base}/content", headers={**headers, "Range": "bytes=0-3"}),
              http.get(base, headers=headers), http.get(f"/api/gallery/{device}/events", headers=headers),
              http.get(f"{base}x", headers=headers),
              # Envoy's own answers: no route, a query parameter of the wrong type, the Lua 400.
              http.get("/api/nowhere", headers=headers),
              http.get(f"/api/gallery/{device}/events?limit=many", headers=headers),
              http.get(f"/api/gallery/{device}/events?lim%69t=1", headers=headers)):
        assert r.headers.get("x-content-type-options") == "nosniff", (r.request.url, r.headers)
        assert r.headers.get("content-security-policy") == "sandbox; default-src 'none'", (r.request.url, r.headers)


def http_1_0(stack, request: bytes) -> tuple[str, dict[str, str], bytes]:
    """One HTTP/1.0 request, no Host header, read to the close that ends an HTTP/1.0 answer:
    (status line, headers, body)."""
    host, port = stack.base_url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        answer = bytearray()
        while chunk := sock.recv(1 << 16):
            answer += chunk
    head, _, body = bytes(answer).partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return status, headers, body


def test_an_http_1_0_client_uploads_lists_and_downloads(http, auth_headers, stack):
    """Old embedded HTTP stacks speak HTTP/1.0, with no Host header: Envoy's default answered them
    426 Upgrade Required."""
    device, headers = new_device(), auth_headers()
    data = random_bytes(300 << 10)
    body = multipart([NAME, ("event", ("f.bin", data))])
    status, _, answer = http_1_0(stack, (
        f"POST /api/gallery/{device}/upload HTTP/1.0\r\nAuthorization: {headers['Authorization']}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body)
    assert status == "HTTP/1.0 200 OK", (status, answer)
    event_id = json.loads(answer)["eventId"]
    auth = f"Authorization: {headers['Authorization']}\r\n"
    status, _, answer = http_1_0(stack, f"GET /api/gallery/{device}/events HTTP/1.0\r\n{auth}\r\n".encode())
    assert status == "HTTP/1.0 200 OK" and [e["id"] for e in json.loads(answer)] == [event_id]
    status, _, answer = http_1_0(stack, f"GET /api/gallery/{device}/stats HTTP/1.0\r\n{auth}\r\n".encode())
    assert status == "HTTP/1.0 200 OK" and json.loads(answer)["total_events"] == 1
    content = f"/api/gallery/{device}/events/{event_id}/content"
    status, got, answer = http_1_0(stack, f"GET {content} HTTP/1.0\r\n{auth}\r\n".encode())
    assert status == "HTTP/1.0 200 OK" and answer == data, (status, got)
    status, got, answer = http_1_0(stack, f"GET {content} HTTP/1.0\r\n{auth}Range: bytes=10-19\r\n\r\n".encode())
    assert (status, got["content-range"], answer) == ("HTTP/1.0 206 Partial Content", f"bytes 10-19/{len(data)}",
                                                       data[10:20])
    status, _, answer = http_1_0(stack, f"GET /api/gallery/{device}/stats HTTP/1.0\r\n\r\n".encode())
    assert status == "HTTP/1.0 401 Unauthorized" and error_infos(json.loads(answer))[0]["reason"] == "TOKEN_MISSING"
