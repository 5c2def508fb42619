"""Downloads end to end: REST through the real Envoy (httpx, HTTP/1.1) and native gRPC reads, direct
and through Envoy.

What is checked: the bytes (equal to what was uploaded, for sizes around the 1 MiB message size and
a 100 MiB file streamed and hashed incrementally), the headers a client relies on (Content-Type,
Content-Disposition, ETag, the size and checksum headers, Accept-Ranges), the HTTP statuses Envoy's
Lua filter makes from the server's `x-http-status` (206, 304, 412, 416; their bodies), the error
statuses that come from the error tree, and ReadEventContent's offset/limit rules.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import struct
import time
import urllib.parse
import urllib.request
import uuid
import zlib
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc
import httpx
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from gallery.v1 import device_pb2 as dpb
from gallery.v1 import device_pb2_grpc, gallery_pb2_grpc
from gallery.v1 import gallery_pb2 as pb
from gallery_server import auth

from ..conftest import JWT_SECRET, new_device
from .conftest import Stack

MiB = 1 << 20
GRPC_CODES = {400: 9, 401: 16, 403: 7, 404: 5}  # 400 here is EVENT_ON_DEVICE: FAILED_PRECONDITION
DOWNLOAD_METHODS = ("GetEventContent", "GetEventThumbnail", "ReadEventContent")


# -- helpers ------------------------------------------------------------------------------------


def pieces(size: int, seed: int) -> Iterator[bytes]:
    """`size` deterministic bytes in 1 MiB pieces, each different (a dropped or repeated piece
    changes the hash), without holding them all."""
    block = random.Random(seed).randbytes(MiB)
    for i, offset in enumerate(range(0, size, MiB)):
        yield (i.to_bytes(8, "big") + block[8:])[: min(MiB, size - offset)]


def multipart_upload(http: httpx.Client, device: str, headers: dict[str, str], name: str,
                     body: Iterator[bytes] | bytes, size: int) -> str:
    """A multipart POST with a Content-Length, streamed from `body`; returns the event id."""
    boundary = uuid.uuid4().hex
    head = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\n{name}\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"event\"; filename=\"f\"\r\n"
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def stream() -> Iterator[bytes]:
        yield head
        yield from ([body] if isinstance(body, bytes) else body)
        yield tail

    r = http.post(
        f"/api/gallery/{device}/upload", content=stream(),
        headers={**headers, "Content-Type": f"multipart/form-data; boundary={boundary}",
                 "Content-Length": str(len(head) + size + len(tail))},
    )
    assert r.status_code == 200, r.text
    return str(r.json()["eventId"])


def signed_put_upload(http: httpx.Client, device: str, headers: dict[str, str], name: str,
                      body: Iterator[bytes], size: int) -> str:
    r = http.get(f"/api/gallery/{device}/upload-url", params={"filename": name}, headers=headers)
    assert r.status_code == 200, r.text
    urls = r.json()
    put = httpx.put(urls["upload_url"], content=body, headers={"Content-Length": str(size)}, timeout=120)
    assert put.status_code == 200, put.text
    return str(urls["eventId"])


def png_bytes() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00"))
            + chunk(b"IEND", b""))


JPEG = (b"\xff\xd8\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
        + b"\x00" * 64 + b"\xff\xd9")


def upload_with_thumbnail(http: httpx.Client, device: str, headers: dict[str, str], data: bytes,
                          thumbnail: bytes) -> str:
    boundary = uuid.uuid4().hex
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nclip.mp4\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"event\"; filename=\"clip.mp4\"\r\n\r\n"
    ).encode() + data + (
        f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"thumbnail\"; filename=\"t\"\r\n\r\n"
    ).encode() + thumbnail + f"\r\n--{boundary}--\r\n".encode()
    r = http.post(f"/api/gallery/{device}/upload", content=body,
                  headers={**headers, "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 200, r.text
    return str(r.json()["eventId"])


def content_url(device: str, event_id: str, what: str = "content") -> str:
    return f"/api/gallery/{device}/events/{event_id}/{what}"


def assert_error(r: httpx.Response, status: int, reason: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert body["code"] == GRPC_CODES[status], body
    infos = [d for d in body["details"] if d["@type"].endswith("google.rpc.ErrorInfo")]
    assert [i["reason"] for i in infos] == [reason], body


def assert_download_headers(r: httpx.Response, size: int, sha256: str) -> None:
    assert r.headers["etag"] == f'"{sha256}"'
    assert r.headers["x-content-length"] == str(size)
    assert r.headers["x-content-sha256"] == sha256
    assert r.headers["accept-ranges"] == "bytes"
    assert "x-http-status" not in r.headers  # consumed by Envoy's Lua filter


@pytest.fixture(scope="module")
def stored(stack: Stack) -> tuple[str, str, bytes]:
    """(device, event id, bytes) of a 3 MiB + 5 file: ranges cross the 1 MiB message boundaries."""
    device = new_device()
    data = random.Random(7).randbytes(3 * MiB + 5)
    token = auth.mint(JWT_SECRET, subject="t", devices=["*"], scope="gallery:read gallery:write")
    with httpx.Client(base_url=stack.base_url, timeout=60) as http:
        event_id = multipart_upload(http, device, {"Authorization": f"Bearer {token}"}, "data.bin",
                                    data, len(data))
    return device, event_id, data


# -- whole downloads ----------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "how"), [
    (0, "multipart"), (1, "multipart"), (5 * MiB + 1, "signed-put"), (100 * MiB, "multipart"),
], ids=["0B", "1B", "5MiB+1-put", "100MiB"])
def test_download_equals_upload(http, auth_headers, size, how):
    device, headers = new_device(), auth_headers()
    sent = hashlib.sha256()
    for piece in pieces(size, seed=size):
        sent.update(piece)
    upload = multipart_upload if how == "multipart" else signed_put_upload
    event_id = upload(http, device, headers, "f.bin", pieces(size, seed=size), size)

    received, count, messages = hashlib.sha256(), 0, 0
    with http.stream("GET", content_url(device, event_id), headers=headers) as r:
        assert r.status_code == 200
        assert_download_headers(r, size, sent.hexdigest())
        assert r.headers["content-type"] == "application/octet-stream"
        for chunk in r.iter_raw():
            received.update(chunk)
            count += len(chunk)
            messages += 1
    assert (count, received.hexdigest()) == (size, sent.hexdigest())
    if size == 100 * MiB:
        assert messages > 10  # streamed as it was read (by Envoy, file_handoff.py), not in one piece
        assert http.delete(f"/api/gallery/{device}/events/{event_id}", headers=headers).status_code == 200


def test_headers(http, auth_headers):
    device, headers = new_device(), auth_headers()
    name = 'Überraschung "1"; 東京 ok.png'
    data = png_bytes()
    event_id = multipart_upload(http, device, headers, name, data, len(data))
    r = http.get(content_url(device, event_id), headers=headers)
    assert r.status_code == 200 and r.content == data
    assert r.headers["content-type"] == "image/png"  # the stored mime_type
    assert_download_headers(r, len(data), hashlib.sha256(data).hexdigest())
    disposition = r.headers["content-disposition"]
    assert disposition.isascii()
    fallback = re.fullmatch(r'attachment; filename="([^"\\]*)"; filename\*=UTF-8\'\'(\S+)', disposition)
    assert fallback, disposition
    assert fallback.group(1) == "_berraschung _1_; __ ok.png"
    assert urllib.parse.unquote(fallback.group(2), errors="strict") == name


# -- ranges and conditional requests --------------------------------------------------------------


def test_ranges(http, auth_headers, stored):
    device, event_id, data = stored
    size, headers, sha = len(data), auth_headers(), hashlib.sha256(data).hexdigest()
    cases = {
        "bytes=0-0": (0, 0),  # first byte
        "bytes=0-99": (0, 99),
        f"bytes={MiB - 10}-{MiB + 10}": (MiB - 10, MiB + 10),  # middle, across a message boundary
        f"bytes={size - 1}-{size - 1}": (size - 1, size - 1),  # last byte
        f"bytes={size - 5}-{size + 100}": (size - 5, size - 1),  # last-pos past the end
        "bytes=-100": (size - 100, size - 1),  # suffix
        f"bytes=-{size * 2}": (0, size - 1),  # suffix longer than the file
        f"bytes={2 * MiB}-": (2 * MiB, size - 1),  # open-ended
    }
    for header, (start, end) in cases.items():
        r = http.get(content_url(device, event_id), headers={**headers, "Range": header})
        assert r.status_code == 206, (header, r.status_code, r.text[:200])
        assert r.headers["content-range"] == f"bytes {start}-{end}/{size}", header
        assert r.headers["content-type"] == "application/octet-stream"
        assert_download_headers(r, size, sha)
        assert r.content == data[start:end + 1], header

    # If-Range: the range applies only while the client's copy is the current one.
    r = http.get(content_url(device, event_id), headers={**headers, "Range": "bytes=0-9", "If-Range": f'"{sha}"'})
    assert (r.status_code, r.content) == (206, data[:10])
    r = http.get(content_url(device, event_id), headers={**headers, "Range": "bytes=0-9", "If-Range": '"stale"'})
    assert (r.status_code, len(r.content)) == (200, size)


@pytest.mark.parametrize("header", [f"bytes={3 * MiB + 5}-", f"bytes={10 * MiB}-{11 * MiB}", "bytes=-0"])
def test_unsatisfiable_range(http, auth_headers, stored, header):
    device, event_id, data = stored
    r = http.get(content_url(device, event_id), headers={**auth_headers(), "Range": header})
    assert r.status_code == 416
    assert r.headers["content-range"] == f"bytes */{len(data)}"
    assert r.content == b""
    assert "x-http-status" not in r.headers
    assert_refused_without_body(r)


def assert_refused_without_body(r: httpx.Response) -> None:
    """A download's 412 or 416: no body, so no type (not the file's), a GET's length 0 and not
    chunked; the server's marker for Envoy does not reach the client."""
    assert "content-type" not in r.headers, r.headers
    assert r.headers["content-length"] == "0" and "transfer-encoding" not in r.headers, r.headers
    assert "x-gallery-body-length" not in r.headers


@pytest.mark.parametrize("header", ["bytes=0-1,5-6", "bytes=9-2", "bytes=abc", "items=0-1", "0-1"])
def test_malformed_or_multi_range_is_ignored(http, auth_headers, stored, header):
    device, event_id, data = stored
    r = http.get(content_url(device, event_id), headers={**auth_headers(), "Range": header})
    assert r.status_code == 200
    assert "content-range" not in r.headers
    assert r.content == data


def test_if_none_match(http, auth_headers, stored):
    device, event_id, data = stored
    sha, headers = hashlib.sha256(data).hexdigest(), auth_headers()
    for header in (f'"{sha}"', "*", f'"other", "{sha}"', f'W/"{sha}"'):
        r = http.get(content_url(device, event_id), headers={**headers, "If-None-Match": header})
        assert r.status_code == 304, header
        assert r.content == b""
        assert r.headers["etag"] == f'"{sha}"'
        assert "transfer-encoding" not in r.headers and r.headers.get("content-length", "0") == "0"
    # 304 wins over a Range.
    r = http.get(content_url(device, event_id), headers={**headers, "If-None-Match": f'"{sha}"', "Range": "bytes=0-1"})
    assert (r.status_code, r.content) == (304, b"")
    # A non-matching tag gets the content, whole or ranged.
    r = http.get(content_url(device, event_id), headers={**headers, "If-None-Match": '"other"'})
    assert (r.status_code, r.content) == (200, data)
    r = http.get(content_url(device, event_id), headers={**headers, "If-None-Match": '"other"', "Range": "bytes=1-2"})
    assert (r.status_code, r.content) == (206, data[1:3])


def test_if_match(http, auth_headers, stored):
    """RFC 9110: a GET whose If-Match names other content is 412 with no body (it was ignored:
    200 and the content); a match, or `*`, goes on to the rest of the request."""
    device, event_id, data = stored
    sha, headers = hashlib.sha256(data).hexdigest(), auth_headers()
    with_thumbnail = upload_with_thumbnail(http, device, headers, b"clip", JPEG)
    for path, tag in ((content_url(device, event_id), sha),
                      (f"/api/gallery/{device}/events/{with_thumbnail}/thumbnail", hashlib.sha256(JPEG).hexdigest()),
                      (f"/api/gallery/{device}/events/{event_id}/thumbnail", None)):
        for method in ("GET", "HEAD"):
            r = http.request(method, path, headers={**headers, "If-Match": '"other"', "Range": "bytes=0-1"})
            if tag is None:  # no thumbnail: that is told first
                assert r.status_code == 404, r.text
                continue
            assert (r.status_code, r.content) == (412, b""), (path, method, r.text)  # as a 416, an empty body
            assert r.headers["etag"] == f'"{tag}"' and "content-range" not in r.headers
            assert_refused_without_body(r)
    for header in (f'"{sha}"', "*", f'"other", "{sha}"'):
        r = http.get(content_url(device, event_id), headers={**headers, "If-Match": header, "Range": "bytes=1-2"})
        assert (r.status_code, r.content) == (206, data[1:3]), header
    for header in (f'W/"{sha}"', '"*"', ""):  # strong comparison; a quoted "*" is a tag; an empty list
        r = http.get(content_url(device, event_id), headers={**headers, "If-Match": header})
        assert (r.status_code, r.content) == (412, b""), header
        assert_refused_without_body(r)


def test_a_delete_whose_if_match_names_other_content_is_412_and_deletes_nothing(http, auth_headers):
    device, headers = new_device(), auth_headers()
    data = b"kept unless asked right"
    event_id = multipart_upload(http, device, headers, "a.bin", data, len(data))
    path, sha = f"/api/gallery/{device}/events/{event_id}", hashlib.sha256(data).hexdigest()
    for header in ('"other"', f'W/"{sha}"', '"*"', ""):
        r = http.delete(path, headers={**headers, "If-Match": header})
        assert r.status_code == 412, (header, r.text)
        assert r.json()["details"][0]["reason"] == "PRECONDITION_FAILED"
        assert http.get(path, headers=headers).status_code == 200  # still there
    r = http.delete(f"/api/gallery/{device}/events/evt_{'Q' * 22}", headers={**headers, "If-Match": "*"})
    assert r.status_code == 404  # no event: that is told first
    r = http.delete(path, headers={**headers, "If-Match": f'"other", "{sha}"'})
    assert (r.status_code, r.json()) == (200, {"success": True})
    assert http.get(path, headers=headers).status_code == 404


def test_a_delete_whose_if_none_match_names_the_content_is_412_and_deletes_nothing(http, auth_headers):
    """RFC 9110 13.1.2: `*`, or a tag of the content by weak comparison, fails the condition of a
    method other than GET and HEAD; If-Match is looked at first (13.2.2)."""
    device, headers = new_device(), auth_headers()
    data = b"kept unless asked right"
    event_id = multipart_upload(http, device, headers, "a.bin", data, len(data))
    path, sha = f"/api/gallery/{device}/events/{event_id}", hashlib.sha256(data).hexdigest()
    for header in ("*", f'"{sha}"', f'W/"{sha}"', f'"other", "{sha}"'):
        r = http.delete(path, headers={**headers, "If-None-Match": header})
        assert r.status_code == 412, (header, r.text)
        assert r.json()["details"][0]["reason"] == "PRECONDITION_FAILED"
        assert "If-None-Match" in r.json()["message"]
        assert http.get(path, headers=headers).status_code == 200  # still there
    r = http.delete(path, headers={**headers, "If-Match": '"other"', "If-None-Match": '"other"'})
    assert r.status_code == 412 and r.json()["message"].startswith("If-Match names other content")
    r = http.delete(f"/api/gallery/{device}/events/evt_{'Q' * 22}", headers={**headers, "If-None-Match": "*"})
    assert r.status_code == 404  # no event: that is told first
    r = http.delete(path, headers={**headers, "If-None-Match": '"other", W/"another"'})
    assert (r.status_code, r.json()) == (200, {"success": True})
    assert http.get(path, headers=headers).status_code == 404


def test_empty_answers_keep_the_connection_usable(stack, auth_headers, stored):
    device, event_id, data = stored
    sha = hashlib.sha256(data).hexdigest()
    with httpx.Client(base_url=stack.base_url, timeout=30, limits=httpx.Limits(max_connections=1)) as one:
        for extra, status in [({"If-None-Match": f'"{sha}"'}, 304), ({"Range": "bytes=-0"}, 416),
                              ({"If-Match": '"other"'}, 412), ({}, 200), ({"Range": "bytes=0-0"}, 206), ({}, 200)]:
            r = one.get(content_url(device, event_id), headers={**auth_headers(), **extra})
            assert r.status_code == status
            assert len(r.content) == {304: 0, 412: 0, 416: 0, 206: 1, 200: len(data)}[status]


# -- thumbnails -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("thumbnail", "mime"), [(JPEG, "image/jpeg"), (png_bytes(), "image/png")])
def test_thumbnail(http, auth_headers, thumbnail, mime):
    device, headers = new_device(), auth_headers()
    event_id = upload_with_thumbnail(http, device, headers, b"not a thumbnail", thumbnail)
    sha = hashlib.sha256(thumbnail).hexdigest()
    r = http.get(content_url(device, event_id, "thumbnail"), headers=headers)
    assert r.status_code == 200 and r.content == thumbnail
    assert r.headers["content-type"] == mime  # from the bytes, not from the event's name
    assert_download_headers(r, len(thumbnail), sha)
    assert "content-disposition" not in r.headers
    r = http.get(content_url(device, event_id, "thumbnail"), headers={**headers, "If-None-Match": f'"{sha}"'})
    assert (r.status_code, r.content) == (304, b"")


def test_thumbnail_absent(http, auth_headers):
    device, headers = new_device(), auth_headers()
    event_id = multipart_upload(http, device, headers, "a.bin", b"abc", 3)
    assert_error(http.get(content_url(device, event_id, "thumbnail"), headers=headers), 404, "THUMBNAIL_NOT_FOUND")


# -- errors -------------------------------------------------------------------------------------


def test_errors(http, auth_headers, stored):
    device, event_id, _ = stored
    unknown = "evt_" + "A" * 22
    for what in ("content", "thumbnail"):
        url = content_url(device, event_id, what)
        assert_error(http.get(url), 401, "TOKEN_MISSING")
        assert_error(http.get(url, headers={"Authorization": "Bearer nope"}), 401, "TOKEN_INVALID")
        assert_error(http.get(url, headers=auth_headers(devices=["other"])), 403, "DEVICE_NOT_ALLOWED")
        assert_error(http.get(url, headers=auth_headers(scope="gallery:write")), 403, "SCOPE_MISSING")
        # Permission before existence.
        assert_error(http.get(content_url(device, unknown, what), headers=auth_headers(devices=["other"])),
                     403, "DEVICE_NOT_ALLOWED")
        assert_error(http.get(content_url(device, unknown, what), headers=auth_headers()), 404, "EVENT_NOT_FOUND")
        assert_error(http.get(content_url("other-device", event_id, what), headers=auth_headers()),
                     404, "EVENT_NOT_FOUND")


def test_announced_event(http, auth_headers, mint, envoy_channel):
    """An event still on the device: no content yet (400 EVENT_ON_DEVICE), its thumbnail is there."""
    device = new_device()
    devices = device_pb2_grpc.DeviceServiceStub(envoy_channel)
    token = mint(devices=[device], scope=auth.DEVICE)
    reply = devices.AnnounceEvents(dpb.AnnounceEventsRequest(device=device, events=[
        dpb.AnnouncedEvent(device_key="dcim/1.mp4", name="1.mp4", size=1234, thumbnail=JPEG)]),
        metadata=[("authorization", f"Bearer {token}")], timeout=30)
    event_id = reply.results[0].event_id
    r = http.get(content_url(device, event_id), headers=auth_headers())
    assert_error(r, 400, "EVENT_ON_DEVICE")
    assert "pull" in r.json()["message"]
    r = http.get(content_url(device, event_id, "thumbnail"), headers=auth_headers())
    assert (r.status_code, r.content, r.headers["content-type"]) == (200, JPEG, "image/jpeg")

    gallery = gallery_pb2_grpc.GalleryServiceStub(envoy_channel)
    with pytest.raises(grpc.RpcError) as err:
        list(gallery.ReadEventContent(pb.ReadEventContentRequest(device=device, event_id=event_id),
                                      metadata=[("authorization", f"Bearer {mint()}")], timeout=30))
    assert (err.value.code(), reason(err.value)) == (grpc.StatusCode.FAILED_PRECONDITION, "EVENT_ON_DEVICE")


def test_download_routes_have_no_overall_timeout(stack):
    """A slow client reading a large file must not hit the 60 s default route timeout."""
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.admin_port}/config_dump") as r:
        dump = json.load(r)
    routes = {}

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if "match" in node and "route" in node:
                routes[node["match"].get("prefix")] = node["route"]
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(dump)
    for method in DOWNLOAD_METHODS:
        assert routes[f"/gallery.v1.GalleryService/{method}"]["timeout"] == "0s", method


# -- native gRPC ------------------------------------------------------------------------------------


def reason(err: grpc.RpcError) -> str:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, err
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    raise AssertionError(status)


@pytest.fixture(params=["direct", "envoy"])
def stub(request: pytest.FixtureRequest, stack: Stack) -> Iterator[gallery_pb2_grpc.GalleryServiceStub]:
    address = stack.grpc_address if request.param == "direct" else stack.envoy_grpc_address
    with grpc.insecure_channel(address) as channel:
        yield gallery_pb2_grpc.GalleryServiceStub(channel)


def test_read_event_content(stub, mint: Callable[..., str], stored):
    device, event_id, data = stored
    size, auth_md = len(data), [("authorization", f"Bearer {mint(scope='gallery:read')}")]

    def read(offset: int = 0, limit: int = 0) -> tuple[bytes, dict[str, str]]:
        call = stub.ReadEventContent(
            pb.ReadEventContentRequest(device=device, event_id=event_id, read_offset=offset, read_limit=limit),
            metadata=auth_md, timeout=30)
        messages = [m.data for m in call]
        assert all(0 < len(m) <= MiB for m in messages)
        return b"".join(messages), dict(call.initial_metadata())

    whole, metadata = read()
    assert whole == data
    sha = hashlib.sha256(data).hexdigest()
    assert metadata["etag"] == f'"{sha}"'
    assert (metadata["x-content-length"], metadata["x-content-sha256"]) == (str(size), sha)
    for offset, limit in [(0, 1), (1, 10), (MiB - 3, 7), (MiB, MiB), (2 * MiB + 1, 0), (size - 1, 0),
                          (size - 1, 100), (5, 3 * MiB)]:
        got, _ = read(offset, limit)
        assert got == (data[offset:offset + limit] if limit else data[offset:]), (offset, limit)
    assert read(size)[0] == b""  # at the end: nothing, not an error

    for offset, limit, code, why in [
        (size + 1, 0, grpc.StatusCode.OUT_OF_RANGE, "READ_OFFSET_OUT_OF_RANGE"),
        (-1, 0, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_READ_OFFSET"),
        (0, -1, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_READ_LIMIT"),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            read(offset, limit)
        assert (err.value.code(), reason(err.value)) == (code, why), (offset, limit)


def test_read_event_content_errors(stub, mint: Callable[..., str], stored):
    device, event_id, _ = stored
    unknown = "evt_" + "A" * 22
    cases = [
        (event_id, None, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_MISSING"),
        (event_id, mint(scope="gallery:write"), grpc.StatusCode.PERMISSION_DENIED, "SCOPE_MISSING"),
        (unknown, mint(devices=["other"]), grpc.StatusCode.PERMISSION_DENIED, "DEVICE_NOT_ALLOWED"),
        (unknown, mint(), grpc.StatusCode.NOT_FOUND, "EVENT_NOT_FOUND"),
    ]
    for target, token, code, why in cases:
        metadata = [("authorization", f"Bearer {token}")] if token else None
        with pytest.raises(grpc.RpcError) as err:
            list(stub.ReadEventContent(pb.ReadEventContentRequest(device=device, event_id=target),
                                       metadata=metadata, timeout=30))
        assert (err.value.code(), reason(err.value)) == (code, why)


def test_native_get_event_content_keeps_grpc_semantics(stub, mint: Callable[..., str], stored):
    """Through Envoy too, a native call with a Range gets status OK and `x-http-status` as metadata:
    the Lua filter maps the status only for REST requests."""
    device, event_id, data = stored
    call = stub.GetEventContent(pb.GetEventContentRequest(device=device, event_id=event_id),
                                metadata=[("authorization", f"Bearer {mint()}"), ("range", "bytes=10-19")],
                                timeout=30)
    messages = list(call)
    assert b"".join(m.data for m in messages) == data[10:20]
    assert messages[0].content_type == "application/octet-stream"
    metadata = dict(call.initial_metadata())
    assert (metadata["x-http-status"], metadata["content-range"]) == ("206", f"bytes 10-19/{len(data)}")
    assert call.code() == grpc.StatusCode.OK


def test_readers_that_stop_reading_hold_up_no_other_client(stack, mint: Callable[..., str]):
    """Native downloads through Envoy whose client stops reading (a phone on a poor link, a paused
    player) must not stall anyone else's calls. Envoy's connections to the server are shared by
    every client; a stalled stream keeps its data in Envoy, unconsumed, and when that counted
    against a connection-wide HTTP/2 window of 4 MiB, four or so such streams on one connection
    took the whole window and every answer on it stopped: GetStats timed out."""
    device = new_device()
    size = 12 * MiB
    token = mint(scope="gallery:read gallery:write")
    with httpx.Client(base_url=stack.base_url, timeout=60) as http:
        event_id = multipart_upload(http, device, {"Authorization": f"Bearer {token}"}, "big.bin",
                                    pieces(size, 3), size)
    auth_md = [("authorization", f"Bearer {token}")]
    # Small fixed receive windows, and no message asked for: the readers take next to nothing.
    options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 65536)]
    readers = [grpc.insecure_channel(stack.envoy_grpc_address, options=options) for _ in range(4)]
    request = pb.ReadEventContentRequest(device=device, event_id=event_id)
    # A token of its own for each reader: one token holds at most its grant's part of the
    # downloads' share (threads.grant_share; 4 for each device it grants).
    grants = [[("authorization", f"Bearer {mint(devices=[device, f'{device}-{n}'], scope='gallery:read')}")]
              for n in range(len(readers))]
    paused = [gallery_pb2_grpc.GalleryServiceStub(channel).ReadEventContent(request, metadata=md, timeout=60)
              for channel, md in zip(readers, grants, strict=True)
              for _ in range(4)]  # Envoy's workers each have a connection
    try:
        time.sleep(1.5)  # the server sends what Envoy lets it meanwhile
        # New connections, so both of Envoy's workers are asked; a stalled one never answers.
        for attempt in range(8):
            with grpc.insecure_channel(stack.envoy_grpc_address) as channel:
                stats = gallery_pb2_grpc.GalleryServiceStub(channel).GetStats(
                    pb.GetStatsRequest(device=device), metadata=auth_md, timeout=10)
            assert stats.total_events == 1, attempt
        # And the paused ones themselves go on once read.
        with futures.ThreadPoolExecutor(len(paused)) as pool:
            firsts = [pool.submit(next, call) for call in paused]
            assert [len(first.result(timeout=20).data) for first in firsts] == [MiB] * len(paused)
    finally:
        for call in paused:
            call.cancel()
        for channel in readers:
            channel.close()
