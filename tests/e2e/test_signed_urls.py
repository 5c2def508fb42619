"""Pre-signed upload URLs end to end: issued through Envoy, then used like `curl --upload-file`.

The PUTs carry no Authorization header and no Content-Type: the token in the URL is the only proof.
They must carry a Content-Length (a raw body has no terminator, so the declared length is what
tells a complete body from one cut short): a chunked PUT is LENGTH_REQUIRED, a body shorter than
its Content-Length stores nothing. Every rejected PUT must leave nothing behind (no file in media/
or staging/, no event), and a URL is consumed only by a PUT that succeeded.
"""

from __future__ import annotations

import base64
import concurrent.futures
import datetime
import hashlib
import json
import pathlib
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator

import httpx
import pytest

from ..conftest import new_device, random_bytes, stored_files
from .conftest import Stack, start_stack, stop_stack

EVENT_ID_RE = re.compile(r"evt_[A-Za-z0-9_-]{22}")
SMALL_MEDIA_LIMIT = 64 * 1024
SMALL_THUMBNAIL_LIMIT = 16 * 1024


# -- helpers ------------------------------------------------------------------------------------


def error_reason(response: httpx.Response) -> str:
    """The google.rpc.ErrorInfo reason of a transcoded error (Envoy's convert_grpc_status body)."""
    body = response.json()
    infos = [d for d in body.get("details", []) if d.get("@type", "").endswith("google.rpc.ErrorInfo")]
    assert len(infos) == 1, body
    assert infos[0]["domain"] == "gallery", body
    return str(infos[0]["reason"])


def raw_put(
    url: str, content: bytes | Iterator[bytes], headers: dict[str, str] | None = None
) -> httpx.Response:
    """What `curl -X PUT --upload-file f <url>` does: no bearer token, no Content-Type.

    bytes are sent with their Content-Length; an iterator is sent chunked unless `headers` give
    a Content-Length.
    """
    with httpx.Client(timeout=60) as client:
        response = client.put(url, content=content, headers=headers)
    assert "authorization" not in response.request.headers
    assert "content-type" not in response.request.headers
    return response


def tamper(text: str, index: int) -> str:
    """Replace one base64url character by another one (never the same)."""
    replacement = "A" if text[index] != "A" else "B"
    return text[:index] + replacement + text[index + 1:]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Client:
    """The REST calls these tests make, through Envoy, with a read+write bearer token."""

    def __init__(self, stack: Stack, http: httpx.Client, headers: dict[str, str]) -> None:
        self.stack = stack
        self.http = http
        self.headers = headers

    def upload_urls(self, device: str, filename: str = "video.mp4", thumbnail: bool = True) -> dict:
        params = {"filename": filename}
        if thumbnail:
            params["thumbnail"] = "true"
        r = self.http.get(f"/api/gallery/{device}/upload-url", params=params, headers=self.headers)
        assert r.status_code == 200, r.text
        return r.json()

    def events(self, device: str) -> list[dict]:
        r = self.http.get(f"/api/gallery/{device}/events", headers=self.headers)
        assert r.status_code == 200, r.text
        body = r.json()
        assert isinstance(body, list), body
        return body

    def media_path(self, device: str, event_id: str) -> pathlib.Path:
        return self.stack.data_dir / "media" / device / event_id

    def thumbnail_path(self, device: str, event_id: str) -> pathlib.Path:
        return self.stack.data_dir / "media" / device / f"{event_id}.thumb"


@pytest.fixture
def client(stack: Stack, http: httpx.Client, auth_headers: Callable[..., dict[str, str]]) -> Client:
    return Client(stack, http, auth_headers())


@pytest.fixture(scope="module")
def extra_stacks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Stack]]:
    """Two more stacks, started side by side: tiny size limits, and a 1-second URL lifetime."""
    envs = {
        "small": {
            "GALLERY_MAX_UPLOAD_BYTES": str(SMALL_MEDIA_LIMIT),
            "GALLERY_MAX_THUMBNAIL_BYTES": str(SMALL_THUMBNAIL_LIMIT),
        },
        "ttl": {"GALLERY_UPLOAD_URL_TTL": "1"},
    }

    def start(name: str) -> Stack:
        root = tmp_path_factory.mktemp(f"{name}-stack")
        return start_stack(root / "data", root / "gallery.log", extra_env=envs[name])

    with concurrent.futures.ThreadPoolExecutor(len(envs)) as pool:
        futures = {name: pool.submit(start, name) for name in envs}
    stacks = {}
    errors = []
    for name, future in futures.items():
        try:
            stacks[name] = future.result()
        except Exception as exc:  # noqa: BLE001  (stop whichever started, then fail)
            errors.append(exc)
    try:
        if errors:
            raise errors[0]
        yield stacks
    finally:
        with concurrent.futures.ThreadPoolExecutor(len(envs)) as pool:
            list(pool.map(stop_stack, stacks.values()))
    for stack in stacks.values():
        assert stack.process.returncode == 0, stack.log()


@pytest.fixture
def small_stack(extra_stacks: dict[str, Stack]) -> Stack:
    return extra_stacks["small"]


@pytest.fixture
def ttl_stack(extra_stacks: dict[str, Stack]) -> Stack:
    return extra_stacks["ttl"]


# -- issuing URLs ---------------------------------------------------------------------------------


def test_upload_url_response_shape(client: Client, stack: Stack) -> None:
    device = new_device()
    before = datetime.datetime.now(datetime.UTC)
    body = client.upload_urls(device, "video.mp4", thumbnail=True)
    assert set(body) == {"success", "upload_url", "thumbnail_upload_url", "eventId", "expires_at"}
    assert body["success"] is True
    assert EVENT_ID_RE.fullmatch(body["eventId"]), body
    prefix = f"{stack.base_url}/api/gallery/{device}/upload/"
    for key in ("upload_url", "thumbnail_upload_url"):
        assert isinstance(body[key], str)
        assert body[key].startswith(prefix), body
        assert "/" not in body[key][len(prefix):]
    assert body["upload_url"] != body["thumbnail_upload_url"]
    # Default TTL: 900 s.
    expires = datetime.datetime.fromisoformat(body["expires_at"].replace("Z", "+00:00"))
    assert before + datetime.timedelta(seconds=890) <= expires
    assert expires <= before + datetime.timedelta(seconds=910)
    # Issuing URLs creates no event.
    assert client.events(device) == []

    # Without thumbnail=true there is no thumbnail URL.
    body = client.upload_urls(device, "video.mp4", thumbnail=False)
    assert body["success"] is True
    assert body["upload_url"].startswith(prefix)
    assert not body.get("thumbnail_upload_url"), body
    assert EVENT_ID_RE.fullmatch(body["eventId"])


def test_upload_url_requires_write_scope_and_device(
    http: httpx.Client, auth_headers: Callable[..., dict[str, str]]
) -> None:
    device = new_device()
    url = f"/api/gallery/{device}/upload-url"
    params = {"filename": "video.mp4", "thumbnail": "true"}

    r = http.get(url, params=params, headers=auth_headers(scope="gallery:read"))
    assert r.status_code == 403, r.text
    assert error_reason(r) == "SCOPE_MISSING"

    r = http.get(url, params=params, headers=auth_headers(devices=["someone-else"]))
    assert r.status_code == 403, r.text
    assert error_reason(r) == "DEVICE_NOT_ALLOWED"

    r = http.get(url, params=params)
    assert r.status_code == 401, r.text

    # A token for exactly this device with write scope works.
    r = http.get(url, params=params, headers=auth_headers(devices=[device], scope="gallery:write"))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"filename": ""}, "NAME_REQUIRED"),
        ({}, "NAME_REQUIRED"),
        ({"filename": "x" * 256}, "NAME_TOO_LONG"),
        ({"filename": "bad\x01name.mp4"}, "NAME_INVALID"),
    ],
)
def test_upload_url_bad_filename(
    http: httpx.Client, auth_headers: Callable[..., dict[str, str]], params: dict, reason: str
) -> None:
    r = http.get(f"/api/gallery/{new_device()}/upload-url", params=params, headers=auth_headers())
    assert r.status_code == 400, r.text
    assert error_reason(r) == reason


def test_upload_url_bad_device(http: httpx.Client, auth_headers: Callable[..., dict[str, str]]) -> None:
    r = http.get("/api/gallery/-bad-/upload-url", params={"filename": "a.mp4"}, headers=auth_headers())
    assert r.status_code == 400, r.text
    assert error_reason(r) == "INVALID_DEVICE_ID"


# -- successful PUTs ------------------------------------------------------------------------------


def test_media_then_thumbnail(client: Client, stack: Stack) -> None:
    device = new_device()
    urls = client.upload_urls(device, "video.mp4", thumbnail=True)
    event_id = urls["eventId"]
    media = random_bytes(3 * 1024 * 1024 + 123)  # several HttpBody chunks through Envoy
    thumbnail = random_bytes(20_000)

    r = raw_put(urls["upload_url"], media)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json() == {"success": True, "eventId": event_id}

    [event] = client.events(device)
    assert event["id"] == event_id
    assert event["name"] == "video.mp4"
    assert event["size"] == len(media)
    assert isinstance(event["size"], int)
    assert event["has_thumbnail"] is False
    assert event["media_type"] == "video"
    assert event["sha256"] == hashlib.sha256(media).hexdigest()
    assert client.media_path(device, event_id).read_bytes() == media
    assert not client.thumbnail_path(device, event_id).exists()

    r = raw_put(urls["thumbnail_upload_url"], thumbnail)
    assert r.status_code == 200, r.text
    assert r.json() == {"success": True, "eventId": event_id}

    [event] = client.events(device)
    assert event["id"] == event_id
    assert event["has_thumbnail"] is True
    assert event["size"] == len(media)  # the thumbnail does not change the event's media
    assert client.media_path(device, event_id).read_bytes() == media
    assert client.thumbnail_path(device, event_id).read_bytes() == thumbnail

    r = client.http.get(f"/api/gallery/{device}/events/{event_id}", headers=client.headers)
    assert r.status_code == 200, r.text
    assert r.json()["has_thumbnail"] is True
    assert r.json()["metadata"] == {}

    # Nothing left in staging.
    assert not list((stack.data_dir / "staging").iterdir())


def test_thumbnail_before_media(client: Client, stack: Stack) -> None:
    device = new_device()
    urls = client.upload_urls(device, "clip.mp4", thumbnail=True)
    event_id = urls["eventId"]
    media = random_bytes(200_000)
    thumbnail = random_bytes(5_000)

    r = raw_put(urls["thumbnail_upload_url"], thumbnail)
    assert r.status_code == 200, r.text
    assert r.json() == {"success": True, "eventId": event_id}
    # The event exists only once the media has arrived.
    assert client.events(device) == []
    assert client.thumbnail_path(device, event_id).read_bytes() == thumbnail

    r = raw_put(urls["upload_url"], media)
    assert r.status_code == 200, r.text
    assert r.json() == {"success": True, "eventId": event_id}

    [event] = client.events(device)
    assert event["id"] == event_id
    assert event["name"] == "clip.mp4"
    assert event["size"] == len(media)
    assert event["has_thumbnail"] is True
    assert client.media_path(device, event_id).read_bytes() == media
    assert client.thumbnail_path(device, event_id).read_bytes() == thumbnail


def test_filename_is_kept_exactly(client: Client) -> None:
    """The filename travels inside the signed token; percent-encoded UTF-8 and spaces survive."""
    device = new_device()
    name = "Été 2024 clip (1).mp4"
    query = urllib.parse.quote(name, safe="")
    r = client.http.get(
        f"/api/gallery/{device}/upload-url?filename={query}&thumbnail=1", headers=client.headers
    )
    assert r.status_code == 200, r.text
    urls = r.json()
    assert raw_put(urls["upload_url"], random_bytes(1_000)).status_code == 200
    [event] = client.events(device)
    assert event["name"] == name


@pytest.mark.parametrize(("query", "name"), [
    ("my+summer+clip.mp4", "my summer clip.mp4"),  # as forms, URLSearchParams and urlencode write a space
    ("a%2Bb+c.mp4", "a+b c.mp4"),  # a plus sign itself is %2B
    ("100%25+done.mp4", "100% done.mp4"),
])
def test_a_plus_in_the_query_is_a_space(client: Client, query: str, name: str) -> None:
    device = new_device()
    r = client.http.get(f"/api/gallery/{device}/upload-url?filename={query}", headers=client.headers)
    assert r.status_code == 200, r.text
    assert raw_put(r.json()["upload_url"], b"clip").status_code == 200
    [event] = client.events(device)
    assert event["name"] == name
    assert urllib.parse.urlencode({"filename": name}) == f"filename={query}"  # what clients send


def test_media_without_thumbnail_url_and_empty_body(client: Client) -> None:
    device = new_device()
    urls = client.upload_urls(device, "notes.txt", thumbnail=False)
    r = raw_put(urls["upload_url"], b"")
    assert r.status_code == 200, r.text
    assert r.json() == {"success": True, "eventId": urls["eventId"]}
    [event] = client.events(device)
    assert event["size"] == 0
    assert event["has_thumbnail"] is False
    assert event["name"] == "notes.txt"
    assert client.media_path(device, urls["eventId"]).read_bytes() == b""


def test_a_url_with_a_trailing_slash_takes_no_token_either(client: Client) -> None:
    """The transcoder takes `.../upload/<token>/`; the route that passes PUTs on as streams took it
    for another request, whose token Envoy checked (none: 401)."""
    device = new_device()
    urls = client.upload_urls(device, "slash.bin", thumbnail=False)
    r = raw_put(urls["upload_url"] + "/", b"slash")
    assert r.status_code == 200, r.text
    assert client.media_path(device, urls["eventId"]).read_bytes() == b"slash"


# -- rejected PUTs --------------------------------------------------------------------------------


def raw_put_with_type(url: str, content: bytes, headers: dict[str, str]) -> httpx.Response:
    with httpx.Client(timeout=60) as http:
        return http.put(url, content=content, headers=headers)


@pytest.mark.parametrize(("which", "content_range"), [
    ("upload_url", False), ("upload_url", True), ("thumbnail_upload_url", False),  # a thumbnail's PUT is whole
], ids=["media", "media-range", "thumbnail"])
def test_a_form_put_is_refused_and_its_url_kept(client: Client, stack: Stack, which: str, content_range: bool) -> None:
    """`curl -F file=@clip.mp4 -X PUT <url>` (or a browser's FormData) sends a form: its bytes,
    boundaries and all, were stored as the file. 415 before anything is written; the URL then
    takes the file's own bytes."""
    device = new_device()
    urls = client.upload_urls(device, "clip.mp4", thumbnail=True)
    media = random_bytes(5_000)
    files = stored_files(stack.data_dir)
    form = httpx.Request("PUT", urls[which], files={"file": ("clip.mp4", media)})
    headers = {"Content-Type": form.headers["content-type"]}
    body = form.read()
    if content_range:
        headers["Content-Range"] = f"bytes 0-{len(body) - 1}/{len(body)}"
    r = raw_put_with_type(urls[which], body, headers)
    assert r.status_code == 415, r.text
    assert error_reason(r) == "MULTIPART_PUT"
    assert r.json()["code"] == 3  # INVALID_ARGUMENT natively
    assert stored_files(stack.data_dir) == files
    assert client.events(device) == []
    r = raw_put(urls[which], media)
    assert r.status_code == 200, r.text
    path = client.media_path if which == "upload_url" else client.thumbnail_path
    assert path(device, urls["eventId"]).read_bytes() == media


def test_used_url_is_refused(client: Client, stack: Stack) -> None:
    device = new_device()
    urls = client.upload_urls(device, "video.mp4", thumbnail=True)
    event_id = urls["eventId"]
    media, thumbnail = random_bytes(10_000), random_bytes(1_000)
    assert raw_put(urls["upload_url"], media).status_code == 200
    assert raw_put(urls["thumbnail_upload_url"], thumbnail).status_code == 200
    files = stored_files(stack.data_dir)
    [event] = client.events(device)

    for url in (urls["upload_url"], urls["thumbnail_upload_url"]):
        r = raw_put(url, random_bytes(2_000))
        assert r.status_code == 403, r.text
        assert error_reason(r) == "URL_ALREADY_USED"

    assert stored_files(stack.data_dir) == files
    assert client.events(device) == [event]
    assert client.media_path(device, event_id).read_bytes() == media
    assert client.thumbnail_path(device, event_id).read_bytes() == thumbnail


def test_tampered_tokens_are_refused(client: Client, stack: Stack) -> None:
    device = new_device()
    urls = client.upload_urls(device, "video.mp4", thumbnail=True)
    base, _, token = urls["upload_url"].rpartition("/")
    payload_b64, _, signature_b64 = token.partition(".")
    payload = json.loads(b64url_decode(payload_b64))
    other = client.upload_urls(device, "other.mp4", thumbnail=False)
    other_signature = other["upload_url"].rpartition(".")[2]

    # A payload that names another purpose, a later expiry, another filename: same signature.
    forged_thumbnail = list(payload)
    forged_thumbnail[3] = "thumbnail"
    forged_expiry = list(payload)
    forged_expiry[4] = payload[4] + 86400
    forged_name = list(payload)
    forged_name[5] = "evil.mp4"

    tampered = [
        f"{payload_b64}.{tamper(signature_b64, len(signature_b64) // 2)}",  # one char of the signature
        f"{tamper(payload_b64, len(payload_b64) // 2)}.{signature_b64}",  # one char of the payload
        *(f"{b64url(json.dumps(p, separators=(',', ':')).encode())}.{signature_b64}"
          for p in (forged_thumbnail, forged_expiry, forged_name)),
        f"{payload_b64}.{other_signature}",  # another URL's signature
        payload_b64,  # no signature at all
        f"{payload_b64}.",
        "not-a-token",
    ]
    files = stored_files(stack.data_dir)
    for bad in tampered:
        r = raw_put(f"{base}/{bad}", random_bytes(4_000))
        assert r.status_code == 403, (bad, r.status_code, r.text)
        assert error_reason(r) == "URL_SIGNATURE_INVALID", bad
    assert stored_files(stack.data_dir) == files
    assert client.events(device) == []

    # The genuine URL was not consumed by the forgeries.
    media = random_bytes(4_000)
    r = raw_put(urls["upload_url"], media)
    assert r.status_code == 200, r.text
    assert r.json() == {"success": True, "eventId": urls["eventId"]}
    [event] = client.events(device)
    assert event["name"] == "video.mp4"
    assert client.media_path(device, urls["eventId"]).read_bytes() == media


def test_made_up_urls_are_refused_before_they_wait_for_a_body(client: Client, stack: Stack) -> None:
    """The URL is checked from the REST path Envoy keeps (x-envoy-original-path) before the
    stream waits: made-up URLs sent with headers only took every place of the pre-signed PUTs
    (half the upload total, 24) and refused every device's PUT with 429 (a re-probe: 1 in 683
    stored)."""
    device = new_device()
    urls = client.upload_urls(device, "clip.mp4")
    made_up = urls["upload_url"].rpartition("/")[0] + "/WzFd.bm90LWEtc2lnbmF0dXJl"
    target = httpx.URL(made_up)
    answers: list[bytes] = []
    for _ in range(30):  # more than the pre-signed PUTs' places
        with socket.create_connection(("127.0.0.1", stack.http_port), timeout=10) as s:
            s.sendall(f"PUT {target.raw_path.decode()} HTTP/1.1\r\nHost: gallery\r\n"
                      "Content-Length: 1000\r\n\r\n".encode())
            answers.append(s.recv(4096))  # no body sent: answered at once, or the test times out
    assert all(a.startswith(b"HTTP/1.1 403 ") and b"URL_SIGNATURE_INVALID" in a for a in answers), answers[0]
    media = random_bytes(2_000)
    r = raw_put(urls["upload_url"], media)
    assert r.status_code == 200, r.text
    assert client.media_path(device, urls["eventId"]).read_bytes() == media


def test_url_for_another_device_is_refused(client: Client, stack: Stack) -> None:
    device_a, device_b = new_device(), new_device()
    urls = client.upload_urls(device_a, "video.mp4", thumbnail=True)
    files = stored_files(stack.data_dir)
    for key in ("upload_url", "thumbnail_upload_url"):
        token = urls[key].rpartition("/")[2]
        r = raw_put(f"{stack.base_url}/api/gallery/{device_b}/upload/{token}", random_bytes(3_000))
        assert r.status_code == 403, r.text
        assert error_reason(r) == "URL_DEVICE_MISMATCH"
    assert stored_files(stack.data_dir) == files
    assert client.events(device_a) == []
    assert client.events(device_b) == []
    assert not (stack.data_dir / "media" / device_b).exists()

    # Still usable on its own device.
    r = raw_put(urls["upload_url"], b"hello")
    assert r.status_code == 200, r.text
    assert [e["id"] for e in client.events(device_a)] == [urls["eventId"]]
    assert client.events(device_b) == []


def test_thumbnail_for_deleted_event_is_refused(client: Client, stack: Stack) -> None:
    """Once its event is deleted, an unused thumbnail URL must not recreate a file for it.

    Otherwise `<id>.thumb` lands in media/ with no event row: nothing lists it and nothing can
    delete it (DeleteEvent is then NOT_FOUND).
    """
    device = new_device()
    urls = client.upload_urls(device, "video.mp4", thumbnail=True)
    event_id = urls["eventId"]
    assert raw_put(urls["upload_url"], random_bytes(1_000)).status_code == 200
    r = client.http.delete(f"/api/gallery/{device}/events/{event_id}", headers=client.headers)
    assert r.status_code == 200, r.text
    files = stored_files(stack.data_dir)

    # Refused every time: the failed PUT gives the URL back, but there is still no event.
    for _ in range(2):
        r = raw_put(urls["thumbnail_upload_url"], random_bytes(1_000))
        assert r.status_code == 404, r.text
        assert error_reason(r) == "EVENT_NOT_FOUND"
        assert client.events(device) == []
        assert not client.thumbnail_path(device, event_id).exists()
        assert stored_files(stack.data_dir) == files


def test_bearer_token_does_not_replace_signature(
    client: Client, stack: Stack, auth_headers: Callable[..., dict[str, str]]
) -> None:
    device = new_device()
    files = stored_files(stack.data_dir)
    with httpx.Client(timeout=60) as raw:
        r = raw.put(
            f"{stack.base_url}/api/gallery/{device}/upload/garbage.token",
            content=b"data", headers=auth_headers(),
        )
    assert r.status_code == 403, r.text
    assert error_reason(r) == "URL_SIGNATURE_INVALID"
    assert stored_files(stack.data_dir) == files
    assert client.events(device) == []


def test_concurrent_puts_of_one_url_store_once(client: Client, stack: Stack) -> None:
    """Two PUTs racing on one URL: exactly one wins, the other is URL_ALREADY_USED."""
    device = new_device()
    urls = client.upload_urls(device, "race.mp4", thumbnail=False)
    slow_media = random_bytes(2 * 1024 * 1024)
    fast_media = random_bytes(50_000)
    proceed = threading.Event()

    def slow_body() -> Iterator[bytes]:
        yield slow_media[: 1024 * 1024]
        proceed.wait(timeout=30)
        yield slow_media[1024 * 1024:]

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        # A PUT needs a Content-Length; the slow one declares it and streams its body in two parts.
        slow = pool.submit(raw_put, urls["upload_url"], slow_body(),
                           {"Content-Length": str(len(slow_media))})
        time.sleep(0.5)  # let the slow PUT claim the URL first (the assertions hold either way)
        fast = pool.submit(raw_put, urls["upload_url"], fast_media)
        fast_response = fast.result(timeout=30)
        proceed.set()
        slow_response = slow.result(timeout=30)

    codes = sorted([slow_response.status_code, fast_response.status_code])
    assert codes == [200, 403], (slow_response.text, fast_response.text)
    loser = slow_response if slow_response.status_code == 403 else fast_response
    assert error_reason(loser) == "URL_ALREADY_USED"
    winner_bytes = slow_media if slow_response.status_code == 200 else fast_media
    [event] = client.events(device)
    assert event["id"] == urls["eventId"]
    assert event["size"] == len(winner_bytes)
    assert client.media_path(device, urls["eventId"]).read_bytes() == winner_bytes
    assert not list((stack.data_dir / "staging").iterdir())


def put_access(stack: Stack) -> list[dict]:
    """The server's access-log entries for PutSignedUpload, oldest first."""
    return [
        json.loads(line) for line in stack.log().splitlines()
        if line.startswith("{") and '"method": "/gallery.v1.GalleryService/PutSignedUpload"' in line
    ]


def put_access_lines(stack: Stack) -> int:
    return len(put_access(stack))


def wait_for_put_access(stack: Stack, seen: int) -> tuple[str, str]:
    """Wait until the server has logged the PUT after the `seen` first ones: its (code, reason)."""
    deadline = time.monotonic() + 10
    while put_access_lines(stack) == seen:
        assert time.monotonic() < deadline, stack.log()[-3000:]
        time.sleep(0.05)
    entry = put_access(stack)[seen]
    return entry["code"], entry["reason"]


# What the server may answer a PUT cut short: it saw the reset, or a body shorter than declared.
CUT_SHORT_OUTCOMES = {
    ("CANCELLED", ""), ("INVALID_ARGUMENT", "UPLOAD_CANCELLED"), ("INVALID_ARGUMENT", "BODY_INCOMPLETE"),
}


class Abort(Exception):
    """Raised by a request body generator: httpx drops the connection mid-body."""


ABORT_ATTEMPTS = 5


def test_client_abort_mid_put_stores_nothing_and_releases_url(client: Client, stack: Stack) -> None:
    """A PUT whose client goes away mid-body stores nothing and leaves the URL usable.

    The PUT declares its whole length and sends part of it: the server may see the reset, or (as
    grpcio can report a cancelled stream as a normal end) a body shorter than its Content-Length.
    The race between the two is timing-dependent, hence several attempts.
    """
    attempts = []
    for _ in range(ABORT_ATTEMPTS):
        device = new_device()
        urls = client.upload_urls(device, "video.mp4", thumbnail=False)
        seen = put_access_lines(stack)

        def aborting_body() -> Iterator[bytes]:
            yield random_bytes(1024 * 1024)
            yield random_bytes(1024 * 1024)
            time.sleep(0.2)  # let the first pieces reach the server
            raise Abort

        with pytest.raises(Abort):
            raw_put(urls["upload_url"], aborting_body(), {"Content-Length": str(3 * 1024 * 1024)})

        # The server notices the reset asynchronously: wait for its access-log line.
        attempts.append((device, urls, wait_for_put_access(stack, seen)))

    stored = {device: client.events(device) for device, _, _ in attempts}
    truncated = {device: events for device, events in stored.items() if events}
    assert not truncated, (
        f"{len(truncated)} of {ABORT_ATTEMPTS} aborted PUTs were stored as events: {truncated}"
    )
    for device, _, _ in attempts:
        assert not list((stack.data_dir / "media").glob(f"{device}/*")), device
    assert not list((stack.data_dir / "staging").iterdir())
    outcomes = [outcome for *_, outcome in attempts]
    assert set(outcomes) <= CUT_SHORT_OUTCOMES, outcomes

    # Every URL is still usable.
    for device, urls, _ in attempts:
        media = random_bytes(100_000)
        r = raw_put(urls["upload_url"], media)
        assert r.status_code == 200, r.text
        assert r.json() == {"success": True, "eventId": urls["eventId"]}
        assert client.media_path(device, urls["eventId"]).read_bytes() == media
    assert not list((stack.data_dir / "staging").iterdir())


# -- Content-Length: required, and checked against the body -------------------------------------


def chunked_bodies() -> dict[str, Callable[[], Iterator[bytes]]]:
    return {
        "several-chunks": lambda: iter([random_bytes(70_000), random_bytes(70_000), b"end"]),
        "one-chunk": lambda: iter([random_bytes(5_000)]),
        "empty": lambda: iter([]),
    }


@pytest.mark.parametrize("key", ["upload_url", "thumbnail_upload_url"])
def test_chunked_put_is_length_required_and_url_stays_usable(
    client: Client, stack: Stack, key: str
) -> None:
    """A PUT without Content-Length (Transfer-Encoding: chunked) is refused before any byte is
    stored, even with a forged x-gallery-content-length header, and does not use up the URL."""
    device = new_device()
    urls = client.upload_urls(device, "video.mp4", thumbnail=True)
    files = stored_files(stack.data_dir)
    forged = {"x-gallery-content-length": "5000"}
    for name, body in chunked_bodies().items():
        for headers in (None, forged):
            r = raw_put(urls[key], body(), headers)
            assert r.request.headers.get("transfer-encoding") == "chunked", name
            assert "content-length" not in r.request.headers, name
            assert r.status_code == 411, (name, headers, r.text)  # Length Required
            assert error_reason(r) == "LENGTH_REQUIRED", (name, headers)
            assert r.json()["code"] == 3  # INVALID_ARGUMENT
            assert stored_files(stack.data_dir) == files, (name, headers)
            assert client.events(device) == [], (name, headers)

    # The URL was not used up: the same URL with a Content-Length succeeds.
    data = random_bytes(20_000)
    r = raw_put(urls[key], data)
    assert r.status_code == 200, r.text
    assert r.json() == {"success": True, "eventId": urls["eventId"]}
    path = client.media_path if key == "upload_url" else client.thumbnail_path
    assert path(device, urls["eventId"]).read_bytes() == data
    assert not list((stack.data_dir / "staging").iterdir())
    # ... and that one did use it up.
    r = raw_put(urls[key], data)
    assert r.status_code == 403, r.text
    assert error_reason(r) == "URL_ALREADY_USED"


def test_client_content_length_metadata_is_ignored(client: Client, stack: Stack) -> None:
    """Envoy overwrites a client-sent x-gallery-content-length with the real Content-Length."""
    device = new_device()
    urls = client.upload_urls(device, "video.mp4", thumbnail=True)
    media, thumbnail = random_bytes(30_000), random_bytes(3_000)
    for url, data, forged in ((urls["upload_url"], media, "999999"),
                              (urls["thumbnail_upload_url"], thumbnail, "1")):
        r = raw_put(url, data, {"x-gallery-content-length": forged})
        assert r.status_code == 200, r.text
        assert r.json() == {"success": True, "eventId": urls["eventId"]}
    [event] = client.events(device)
    assert event["size"] == len(media)
    assert event["has_thumbnail"] is True
    assert client.media_path(device, urls["eventId"]).read_bytes() == media
    assert client.thumbnail_path(device, urls["eventId"]).read_bytes() == thumbnail


def truncated_put(stack: Stack, url: str, sent: bytes, declared: int) -> None:
    """A raw HTTP/1.1 PUT that declares `declared` bytes, sends `sent`, then closes."""
    assert declared > len(sent)
    host, port = stack.base_url.removeprefix("http://").rsplit(":", 1)
    path = urllib.parse.urlsplit(url).path
    head = f"PUT {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: {declared}\r\n\r\n"
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(head.encode() + sent)
        time.sleep(0.25)  # let Envoy and the server receive everything that was sent


TRUNCATED_ATTEMPTS = 5


@pytest.mark.parametrize(
    ("key", "size", "missing"),
    [
        ("upload_url", 300_000, 200_000),
        ("upload_url", 300_000, 1),  # one byte short: nothing but the length can tell
        ("upload_url", 0, 10),  # headers only
        ("thumbnail_upload_url", 20_000, 1),
    ],
    ids=["media-mostly-missing", "media-one-byte-short", "media-no-body", "thumbnail-one-byte-short"],
)
def test_raw_put_shorter_than_content_length_stores_nothing(
    client: Client, stack: Stack, key: str, size: int, missing: int
) -> None:
    """A raw PUT that declares more bytes than it sends, then closes: nothing stored, URL kept."""
    attempts = []
    for _ in range(TRUNCATED_ATTEMPTS):
        device = new_device()
        urls = client.upload_urls(device, "video.mp4", thumbnail=True)
        before = stored_files(stack.data_dir)
        seen = put_access_lines(stack)
        truncated_put(stack, urls[key], random_bytes(size), size + missing)
        outcome = wait_for_put_access(stack, seen)
        attempts.append((device, urls, outcome, client.events(device), before,
                         stored_files(stack.data_dir)))

    stored = {device: events for device, _, _, events, _, _ in attempts if events}
    assert not stored, f"{len(stored)} of {TRUNCATED_ATTEMPTS} truncated PUTs were stored: {stored}"
    for device, urls, _, _, before, after in attempts:
        assert after == before, device
        assert not client.thumbnail_path(device, urls["eventId"]).exists()
    outcomes = [outcome for _, _, outcome, *_ in attempts]
    allowed = set(CUT_SHORT_OUTCOMES)
    if size == 0:
        # Envoy's transcoder had no body to forward: the server saw a stream with no message.
        allowed.add(("INVALID_ARGUMENT", "EMPTY_STREAM"))
    assert set(outcomes) <= allowed, outcomes
    assert not list((stack.data_dir / "staging").iterdir())

    # Every URL is still usable.
    path = client.media_path if key == "upload_url" else client.thumbnail_path
    for device, urls, *_ in attempts:
        data = random_bytes(size + missing)
        r = raw_put(urls[key], data)
        assert r.status_code == 200, r.text
        assert r.json() == {"success": True, "eventId": urls["eventId"]}
        assert path(device, urls["eventId"]).read_bytes() == data
    assert not list((stack.data_dir / "staging").iterdir())


def test_expired_url_is_refused(ttl_stack: Stack, auth_headers: Callable[..., dict[str, str]]) -> None:
    with httpx.Client(base_url=ttl_stack.base_url, timeout=60) as http:
        client = Client(ttl_stack, http, auth_headers())
        device = new_device()
        before = datetime.datetime.now(datetime.UTC)
        urls = client.upload_urls(device, "video.mp4", thumbnail=True)
        expires = datetime.datetime.fromisoformat(urls["expires_at"].replace("Z", "+00:00"))
        assert expires <= before + datetime.timedelta(seconds=3)
        time.sleep(2.1)
        files = stored_files(ttl_stack.data_dir)
        for key in ("upload_url", "thumbnail_upload_url"):
            r = raw_put(urls[key], random_bytes(5_000))
            assert r.status_code == 403, r.text
            assert error_reason(r) == "URL_EXPIRED"
        assert stored_files(ttl_stack.data_dir) == files
        assert client.events(device) == []


# -- size limits: a failed PUT gives its URL back -------------------------------------------------


def test_media_over_limit_is_413_and_url_stays_usable(
    small_stack: Stack, auth_headers: Callable[..., dict[str, str]]
) -> None:
    with httpx.Client(base_url=small_stack.base_url, timeout=60) as http:
        client = Client(small_stack, http, auth_headers())
        device = new_device()
        urls = client.upload_urls(device, "video.mp4", thumbnail=True)
        files = stored_files(small_stack.data_dir)

        for size in (SMALL_MEDIA_LIMIT + 1, 4 * SMALL_MEDIA_LIMIT, 3 * 1024 * 1024):
            r = raw_put(urls["upload_url"], random_bytes(size))
            assert r.status_code == 413, (size, r.text)  # not 429: retrying cannot help
            assert error_reason(r) == "UPLOAD_TOO_LARGE"
            assert r.json()["code"] == 8  # RESOURCE_EXHAUSTED
            assert stored_files(small_stack.data_dir) == files
            assert client.events(device) == []

        # The failures did not consume the URL: a body at the limit succeeds.
        media = random_bytes(SMALL_MEDIA_LIMIT)
        r = raw_put(urls["upload_url"], media)
        assert r.status_code == 200, r.text
        assert r.json() == {"success": True, "eventId": urls["eventId"]}
        [event] = client.events(device)
        assert event["size"] == SMALL_MEDIA_LIMIT
        assert client.media_path(device, urls["eventId"]).read_bytes() == media

        # ... and now it is consumed.
        r = raw_put(urls["upload_url"], b"again")
        assert r.status_code == 403, r.text
        assert error_reason(r) == "URL_ALREADY_USED"


def test_a_content_length_over_the_limit_is_refused_before_the_body(
    small_stack: Stack, auth_headers: Callable[..., dict[str, str]]
) -> None:
    """The PUT's Content-Length is the media's size: one over the limit is answered at once, not
    after the client sent the limit's worth of bytes (16 GiB by default)."""
    with httpx.Client(base_url=small_stack.base_url, timeout=60) as http:
        client = Client(small_stack, http, auth_headers())
        device = new_device()
        upload_url = client.upload_urls(device, "video.mp4")["upload_url"]
    path = urllib.parse.urlsplit(upload_url).path
    with socket.create_connection(("127.0.0.1", small_stack.http_port), timeout=10) as sock:
        sock.sendall(f"PUT {path} HTTP/1.1\r\nHost: gallery\r\n"
                     f"Content-Length: {1000 * SMALL_MEDIA_LIMIT}\r\n\r\n".encode() + b"p" * 4096)
        answer = ""  # no more of the body is ever sent
        while '"UPLOAD_TOO_LARGE"' not in answer and (piece := sock.recv(65536)):
            answer += piece.decode("latin-1")
    assert answer.startswith("HTTP/1.1 413 "), answer
    assert '"UPLOAD_TOO_LARGE"' in answer


def test_thumbnail_over_limit_is_413_and_url_stays_usable(
    small_stack: Stack, auth_headers: Callable[..., dict[str, str]]
) -> None:
    with httpx.Client(base_url=small_stack.base_url, timeout=60) as http:
        client = Client(small_stack, http, auth_headers())
        device = new_device()
        urls = client.upload_urls(device, "photo.jpg", thumbnail=True)
        media = random_bytes(1_000)
        assert raw_put(urls["upload_url"], media).status_code == 200
        files = stored_files(small_stack.data_dir)

        r = raw_put(urls["thumbnail_upload_url"], random_bytes(SMALL_THUMBNAIL_LIMIT + 1))
        assert r.status_code == 413, r.text
        assert error_reason(r) == "UPLOAD_TOO_LARGE"
        assert stored_files(small_stack.data_dir) == files
        [event] = client.events(device)
        assert event["has_thumbnail"] is False

        thumbnail = random_bytes(SMALL_THUMBNAIL_LIMIT)
        r = raw_put(urls["thumbnail_upload_url"], thumbnail)
        assert r.status_code == 200, r.text
        assert r.json() == {"success": True, "eventId": urls["eventId"]}
        [event] = client.events(device)
        assert event["has_thumbnail"] is True
        assert client.thumbnail_path(device, urls["eventId"]).read_bytes() == thumbnail
        assert client.media_path(device, urls["eventId"]).read_bytes() == media


def test_an_empty_thumbnail_put_is_400_and_its_url_stays_usable(client: Client) -> None:
    """An empty body is no thumbnail (it used to be stored as a 0-byte image): 400
    THUMBNAIL_MISSING, the event keeps no thumbnail, and the URL still takes the real one."""
    device = new_device()
    urls = client.upload_urls(device, "photo.jpg", thumbnail=True)
    assert raw_put(urls["upload_url"], random_bytes(4000)).status_code == 200
    r = raw_put(urls["thumbnail_upload_url"], b"")
    assert r.request.headers["content-length"] == "0"
    assert r.status_code == 400, r.text
    assert error_reason(r) == "THUMBNAIL_MISSING"
    [event] = client.events(device)
    assert event["has_thumbnail"] is False
    assert not client.thumbnail_path(device, event["id"]).exists()
    thumbnail = random_bytes(300)
    assert raw_put(urls["thumbnail_upload_url"], thumbnail).status_code == 200
    assert client.thumbnail_path(device, event["id"]).read_bytes() == thumbnail
