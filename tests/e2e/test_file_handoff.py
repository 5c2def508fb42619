"""REST downloads sent by Envoy itself (server/gallery_server/rpc/file_handoff.py).

Who answered is read from the server's access log: a download Envoy sent shows a Check and no
GetEventContent (or GetEventThumbnail); one the server streamed shows that. What is checked: the
status, bytes and headers of whole files, thumbnails and ranges of every form (the same as the
streamed answer's, but for how the length is framed), that every request the handoff does not take
(conditional requests, unsatisfiable ranges, errors, a file that no longer matches its record)
still gets the server's answer, that an error Envoy answers after a handoff does not carry the
file's headers, that the file path Envoy reads is reachable by no client (raw requests, so that
`..` is sent as is), that Envoy's Check call is not open to clients, and
GALLERY_ENVOY_SENDS_FILES=false.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import time
from collections.abc import Callable, Iterator

import grpc
import httpx
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from gallery_server.downloads import content_headers, reply

from .conftest import Stack, access_line, start_stack
from .test_downloads import JPEG, MiB, assert_error, content_url, multipart_upload, new_device, upload_with_thumbnail

CHECK = "/envoy.service.auth.v3.Authorization/Check"
GET_CONTENT = "/gallery.v1.GalleryService/GetEventContent"
GET_THUMBNAIL = "/gallery.v1.GalleryService/GetEventThumbnail"
# How the two answers frame the body, what only an answer from upstream carries, and each
# answer's own request id.
TRANSPORT_HEADERS = {"content-length", "transfer-encoding", "date", "x-envoy-upstream-service-time",
                     "grpc-accept-encoding", "x-request-id"}


def comparable(r: httpx.Response) -> dict[str, str]:
    """An answer's headers but for those of its transport (TRANSPORT_HEADERS)."""
    return {k: v for k, v in r.headers.items() if k not in TRANSPORT_HEADERS}


def rpcs(stack: Stack) -> list[str]:
    """The methods of the access log's lines so far, in order."""
    methods = []
    for line in stack.log().split("\n")[:-1]:  # whole lines: the last may be half-written
        if line.startswith("{") and '"gallery.access"' in line:
            entry = json.loads(line)
            if entry.get("message") == "rpc":
                methods.append(entry["method"])
    return methods


class Answered:
    """The RPCs the server logged while the block ran (one request at a time in these tests).

    An access line is written as its handler returns, which can be just after the client has its
    answer (a 304 is complete with its headers): the lines are read once none has come for
    QUIET_S."""

    QUIET_S = 0.3

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.methods: list[str] = []

    def __enter__(self) -> Answered:
        self._before = len(rpcs(self.stack))
        return self

    def __exit__(self, *exc: object) -> None:
        deadline = time.monotonic() + 10
        seen, quiet_since = rpcs(self.stack), time.monotonic()
        while time.monotonic() - quiet_since < self.QUIET_S and time.monotonic() < deadline:
            time.sleep(0.05)
            now = rpcs(self.stack)
            if len(now) != len(seen):
                seen, quiet_since = now, time.monotonic()
        self.methods = seen[self._before:]


@pytest.fixture(scope="module")
def stored(stack: Stack) -> Iterator[tuple[str, str, bytes, Callable[..., dict[str, str]]]]:
    from gallery_server import auth

    from ..conftest import JWT_SECRET

    def headers(devices: list[str] | None = None) -> dict[str, str]:
        token = auth.mint(JWT_SECRET, subject="t", devices=devices or ["*"],
                          scope="gallery:read gallery:write")
        return {"Authorization": f"Bearer {token}"}

    device = new_device()
    data = random.Random(11).randbytes(3 * MiB + 7)
    with httpx.Client(base_url=stack.base_url, timeout=60) as http:
        event_id = multipart_upload(http, device, headers(), "clip é \"1\".mp4", data, len(data))
    yield device, event_id, data, headers


def test_envoy_sends_a_whole_file(stack, http, stored):
    device, event_id, data, headers = stored
    with Answered(stack) as answered:
        r = http.get(content_url(device, event_id), headers=headers())
    assert r.status_code == 200
    assert r.content == data
    assert answered.methods == [CHECK]  # no GetEventContent: the server sent no byte
    sent = [json.loads(line) for line in stack.log().splitlines() if "download handed to envoy" in line]
    assert {k: sent[-1][k] for k in ("device", "event_id", "bytes", "subject")} == {
        "device": device, "event_id": event_id, "bytes": len(data), "subject": "t"}
    # The request's id (Envoy's, in its answer too), not that of Envoy's Check call, and its caller.
    assert sent[-1]["request_id"] == r.headers["x-request-id"]
    check = access_line(stack, r.headers["x-request-id"])
    assert check is not None and (check["method"], check["subject"], check["code"]) == (CHECK, "t", "OK")
    assert check["call_request_id"] not in ("", check["request_id"])  # Envoy's call's own id, kept
    sha256 = hashlib.sha256(data).hexdigest()
    assert r.headers["content-length"] == str(len(data))
    assert "transfer-encoding" not in r.headers
    assert r.headers["etag"] == f'"{sha256}"'
    assert r.headers["x-content-length"] == str(len(data))
    assert r.headers["x-content-sha256"] == sha256
    assert r.headers["accept-ranges"] == "bytes"
    assert r.headers["content-type"] == "video/mp4"  # from the name
    assert r.headers["content-disposition"] == (
        "attachment; filename=\"clip _ _1_.mp4\"; filename*=UTF-8''clip%20%C3%A9%20%221%22.mp4"
    )
    for name in ("x-http-status", "grpc-status", "grpc-accept-encoding", "x-gallery-handoff"):
        assert name not in r.headers


SIZE = 3 * MiB + 7  # the stored fixture's size


@pytest.mark.parametrize(("range_header", "status", "window"), [
    (None, 200, (0, SIZE)),
    ("bytes=10-19", 206, (10, 20)),
    ("bytes=0-", 206, (0, SIZE)),  # file_server alone would answer this 200
    ("bytes=-5", 206, (SIZE - 5, SIZE)),  # a suffix: file_server alone would ignore it
    (f"bytes={MiB - 1}-{2 * MiB}", 206, (MiB - 1, 2 * MiB + 1)),
    ("bytes=5-99999999999", 206, (5, SIZE)),
    ("BYTES=3-4", 206, (3, 5)),
    ("bytes=0-1,5-6", 200, (0, SIZE)),  # several ranges: ignored, the whole file
    ("bytes=9-3", 200, (0, SIZE)),  # malformed: ignored
    ("items=0-1", 200, (0, SIZE)),  # another unit: ignored
    ("bytes=1-2-3", 200, (0, SIZE)),  # malformed here; file_server alone would send 1-2
    ("bytes=2-" + "9" * 5000, 206, (2, SIZE)),  # beyond what int() takes from text
], ids=["whole", "range", "open", "suffix", "across-messages", "past-end", "unit-case", "multi",
        "backwards", "other-unit", "three-numbers", "huge-number"])
def test_envoy_answers_as_the_server_would(stack, http, stored, range_header, status, window):
    """Status, bytes and headers (but for how the length is framed) equal to the server's own
    answer to the same request, which a non-matching If-None-Match makes it give."""
    device, event_id, data, headers = stored
    request = {**headers(), **({"Range": range_header} if range_header else {})}
    with Answered(stack) as sent:
        handed_off = http.get(content_url(device, event_id), headers=request)
    with Answered(stack) as streamed:
        from_server = http.get(content_url(device, event_id),
                               headers={**request, "If-None-Match": '"something else"'})
    assert (sent.methods, streamed.methods) == ([CHECK], [GET_CONTENT])
    assert from_server.headers["transfer-encoding"] == "chunked"
    assert handed_off.status_code == from_server.status_code == status
    assert handed_off.content == from_server.content == data[window[0]:window[1]]
    assert handed_off.headers["content-length"] == str(window[1] - window[0])

    assert comparable(handed_off) == comparable(from_server)
    if status == 206:
        assert handed_off.headers["content-range"] == f"bytes {window[0]}-{window[1] - 1}/{SIZE}"


def test_envoy_sends_a_thumbnail_as_the_server_describes_it(stack, http, stored):
    """A gallery's page asks for dozens of thumbnails: Envoy sends them after a Check, with a
    Content-Length (streamed, they came chunked), and the headers of the server's own answer. A
    window of one is the server's (a thumbnail may be replaced between Check and Envoy's read)."""
    device, _, _, headers = stored
    event_id = upload_with_thumbnail(http, device, headers(), b"clip", JPEG)
    url = f"/api/gallery/{device}/events/{event_id}/thumbnail"
    with Answered(stack) as sent:
        handed_off = http.get(url, headers=headers())
    with Answered(stack) as streamed:
        from_server = http.get(url, headers={**headers(), "If-None-Match": '"something else"'})
    with Answered(stack) as ranged:
        window = http.get(url, headers={**headers(), "Range": "bytes=2-9"})
    assert (sent.methods, streamed.methods, ranged.methods) == ([CHECK], [GET_THUMBNAIL], [CHECK, GET_THUMBNAIL])
    assert handed_off.status_code == from_server.status_code == 200
    assert handed_off.content == from_server.content == JPEG
    assert handed_off.headers["content-length"] == str(len(JPEG))
    assert "transfer-encoding" not in handed_off.headers
    assert handed_off.headers["content-type"] == "image/jpeg"  # from its bytes
    assert handed_off.headers["etag"] == f'"{hashlib.sha256(JPEG).hexdigest()}"'
    assert "content-disposition" not in handed_off.headers
    assert comparable(handed_off) == comparable(from_server)
    assert (window.status_code, window.content) == (206, JPEG[2:10])


@pytest.mark.parametrize(("extra", "status", "size"), [
    ({"If-Range": '"x"', "Range": "bytes=0-9"}, 200, SIZE),
    ({"If-Modified-Since": "Sun, 29 Nov 2026 00:00:00 GMT"}, 200, SIZE),
    ({"Range": f"bytes={SIZE}-"}, 416, 0),
], ids=["if-range", "if-modified-since", "unsatisfiable"])
def test_conditions_and_unsatisfiable_ranges_are_the_servers(stack, http, stored, extra, status, size):
    device, event_id, data, headers = stored
    with Answered(stack) as answered:
        r = http.get(content_url(device, event_id), headers={**headers(), **extra})
    assert answered.methods == ([CHECK, GET_CONTENT] if status == 416 else [GET_CONTENT])
    assert (r.status_code, r.content) == (status, data[:size])


def test_not_modified_is_the_servers(stack, http, stored):
    device, event_id, data, headers = stored
    etag = f'"{hashlib.sha256(data).hexdigest()}"'
    with Answered(stack) as answered:
        r = http.get(content_url(device, event_id), headers={**headers(), "If-None-Match": etag})
    assert (r.status_code, r.content, answered.methods) == (304, b"", [GET_CONTENT])


def test_refusals_are_the_servers(stack, http, stored):
    """Check lets the server answer what it would refuse: the same statuses and error bodies."""
    device, event_id, _, headers = stored
    for request_headers, status, reason in (
        ({}, 401, "TOKEN_MISSING"),
        ({"Authorization": "Bearer nope"}, 401, "TOKEN_INVALID"),
        (headers(devices=["another-device"]), 403, "DEVICE_NOT_ALLOWED"),
    ):
        with Answered(stack) as answered:
            assert_error(http.get(content_url(device, event_id), headers=request_headers), status, reason)
        assert answered.methods == [CHECK, GET_CONTENT], reason
    with Answered(stack) as answered:
        assert_error(http.get(content_url(device, "evt_" + "B" * 22), headers=headers()), 404,
                     "EVENT_NOT_FOUND")
    assert answered.methods == [CHECK, GET_CONTENT]


def test_a_file_that_no_longer_matches_its_record_is_not_sent(stack, http, stored):
    """A stored file cut or removed behind the server's back is not sent, and the answer says so:
    500 DATA_LOSS with MEDIA_DAMAGED or MEDIA_MISSING, for GET and HEAD alike. A missing file is
    not "no such event" (404: it was answered before), since the event is still listed."""
    device = new_device()
    data = b"x" * 5000
    event_id = multipart_upload(http, device, stored[3](), "short.bin", data, len(data))
    path = stack.data_dir / "media" / device / event_id

    def assert_lost(r: httpx.Response, reason: str) -> None:
        assert r.status_code == 500, (r.status_code, r.text)
        if r.request.method == "GET":
            body = r.json()
            assert (body["code"], body["details"][0]["reason"]) == (15, reason), body
            assert event_id in body["message"], body

    path.write_bytes(data[:100])  # cut behind the server's back
    with Answered(stack) as answered:
        assert_lost(http.get(content_url(device, event_id), headers=stored[3]()), "MEDIA_DAMAGED")
    assert answered.methods == [CHECK, GET_CONTENT]
    assert_lost(http.head(content_url(device, event_id), headers=stored[3]()), "MEDIA_DAMAGED")
    path.unlink()
    with Answered(stack) as answered:
        assert_lost(http.get(content_url(device, event_id), headers=stored[3]()), "MEDIA_MISSING")
    assert answered.methods == [CHECK, GET_CONTENT]
    assert_lost(http.head(content_url(device, event_id), headers=stored[3]()), "MEDIA_MISSING")
    r = http.get(f"/api/gallery/{device}/events/{event_id}", headers=stored[3]())
    assert (r.status_code, r.json()["id"]) == (200, event_id)


def test_an_error_envoy_answers_after_a_handoff_does_not_describe_the_file(stack, http, stored):
    """The Check passed, then Envoy could not send the file: here it became a folder of the same
    size (Envoy refuses a folder with 403). Neither the file's type nor its ETag or size headers
    may label that answer."""
    device, headers = new_device(), stored[3]
    folder = stack.data_dir / "media" / "probe-folder"
    folder.mkdir()
    size = os.stat(folder).st_size  # an empty folder, as the one made below
    folder.rmdir()
    if size == 0:
        pytest.skip("folders have no size on this filesystem")
    event_id = multipart_upload(http, device, headers(), "clip.mp4", b"v" * size, size)
    media = stack.data_dir / "media" / device / event_id
    media.unlink()
    media.mkdir()
    try:
        with Answered(stack) as answered:  # a range, so that Check also names a Content-Range
            r = http.get(content_url(device, event_id), headers={**headers(), "Range": "bytes=0-1"})
    finally:
        media.rmdir()
    assert answered.methods == [CHECK]  # handed off: Check looks at the size, Envoy found a folder
    assert r.status_code == 403
    # Envoy's own answer, in the server's error shape (envoy_config.LOCAL_REPLIES).
    assert r.headers["content-type"] == "application/json"
    assert r.json()["details"][0]["reason"] == "REQUEST_FAILED"
    partial = reply(10, "0" * 64, range_header="bytes=0-1")  # a 206 has the most headers
    file_headers = {name for name, _ in content_headers(partial, "video/mp4", "clip.mp4")}
    for name in file_headers - {"content-type"} | {"x-gallery-handoff"}:
        assert name not in r.headers, name


def raw_get(stack: Stack, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
    """A GET with the path sent byte for byte (httpx would remove its dot segments)."""
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{stack.http_port}", "Connection: close",
             *(f"{k}: {v}" for k, v in headers.items())]
    with socket.create_connection(("127.0.0.1", stack.http_port), timeout=30) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        response = b""
        while chunk := sock.recv(1 << 16):
            response += chunk
    status = int(response.split(b" ", 2)[1])
    return status, response.partition(b"\r\n\r\n")[2]


@pytest.mark.parametrize("path", [
    "/_gallery_media/{device}/{event_id}",
    "/_gallery_media/../media/{device}/{event_id}",
    "/api/gallery/{device}/events/{event_id}/content/../../../../../../_gallery_media/{device}/{event_id}",
    "/api/gallery/{device}/events/{event_id}/content/..%2F..%2F..%2F..%2F..%2F_gallery_media/{device}/{event_id}",
    "/api/gallery/{device}/events/../../../../_gallery_media/{device}/{event_id}/content",
])
def test_no_client_reaches_the_files_envoy_reads(stack, stored, path):
    device, event_id, data, headers = stored
    status, body = raw_get(stack, path.format(device=device, event_id=event_id), headers())
    assert status in (400, 404)
    assert data[:64] not in body


def test_check_is_not_open_through_envoy(envoy_channel, stored):
    device, event_id, _, headers = stored
    check = external_auth_pb2_grpc.AuthorizationStub(envoy_channel).Check
    request = external_auth_pb2.CheckRequest()
    request.attributes.request.http.method = "GET"
    request.attributes.request.http.path = content_url(device, event_id)
    request.attributes.request.http.headers["authorization"] = headers()["Authorization"]
    with pytest.raises(grpc.RpcError) as err:
        check(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_envoy_sends_no_file_when_told_not_to(tmp_path, mint):
    stack = start_stack(tmp_path / "data", tmp_path / "gallery.log",
                        extra_env={"GALLERY_ENVOY_SENDS_FILES": "false", "GALLERY_MAKE_THUMBNAILS": "false"})
    try:
        headers = {"Authorization": f"Bearer {mint()}"}
        data = random.Random(3).randbytes(MiB + 3)
        with httpx.Client(base_url=stack.base_url, timeout=60) as http:
            event_id = multipart_upload(http, "cam1", headers, "a.bin", data, len(data))
            with Answered(stack) as answered:
                r = http.get(content_url("cam1", event_id), headers=headers)
        assert (r.status_code, r.content, answered.methods) == (200, data, [GET_CONTENT])
        assert r.headers["transfer-encoding"] == "chunked"
    finally:
        from gallery_server.local_stack import stop_stack

        stop_stack(stack)
