"""Resumable pre-signed PUTs through the real Envoy: Content-Range chunks, a chunk cut mid-body on a
raw socket, the status GET/HEAD, resuming, and exactly one event whose bytes equal the source.
With httpx and with curl (a subprocess), as clients in the field would do it."""

from __future__ import annotations

import hashlib
import pathlib
import socket
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable

import httpx
import pytest

from ..conftest import random_bytes
from .conftest import Stack
from .test_signed_urls import error_reason, new_device, put_access_lines, wait_for_put_access

MIB = 1024 * 1024
STATUS_KEYS = {"success", "eventId", "committedSize", "size", "complete", "expires_at"}


def status(url: str) -> dict:
    with httpx.Client(timeout=30) as http:
        response = http.get(url)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == STATUS_KEYS, body
    assert isinstance(body["committedSize"], int) and isinstance(body["size"], int)
    assert isinstance(body["complete"], bool) and isinstance(body["eventId"], str)
    # The same facts as headers (what HEAD carries).
    assert response.headers["x-committed-size"] == str(body["committedSize"])
    assert response.headers["x-upload-complete"] == ("true" if body["complete"] else "false")
    assert response.headers["x-event-id"] == body["eventId"]
    return body


def put_range(url: str, data: bytes, first: int, total: int) -> httpx.Response:
    headers = {"Content-Range": f"bytes {first}-{first + len(data) - 1}/{total}"}
    with httpx.Client(timeout=60) as http:
        return http.put(url, content=data, headers=headers)


def assert_incomplete(response: httpx.Response, committed: int) -> None:
    """308 "resume incomplete", GCS-style: the committed size in Range and x-committed-size."""
    assert response.status_code == 308, response.text
    assert response.headers["x-committed-size"] == str(committed)
    assert response.headers.get("range") == (f"bytes=0-{committed - 1}" if committed else None)
    assert response.json() == {"success": True, "eventId": ""}
    assert "x-envoy-upstream-service-time" not in response.headers  # the servers' timing is the logs'


def open_put(stack: Stack, url: str, declared: bytes, sent: int,
             content_range: str | None = None) -> socket.socket:
    """A raw HTTP/1.1 PUT declaring `declared` (with `content_range`, if any), of which only the
    first `sent` bytes are sent; the caller finishes it (finish_put) or closes the socket."""
    host, port = stack.base_url.removeprefix("http://").rsplit(":", 1)
    path = urllib.parse.urlsplit(url).path
    head = f"PUT {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: {len(declared)}\r\n"
    if content_range:
        head += f"Content-Range: {content_range}\r\n"
    sock = socket.create_connection((host, int(port)))
    sock.sendall(head.encode() + b"\r\n" + declared[:sent])
    return sock


def finish_put(sock: socket.socket, rest: bytes) -> tuple[int, bytes]:
    """Send the rest of an open_put body; the (status, body) of the answer (Content-Length)."""
    with sock:
        sock.sendall(rest)
        sock.settimeout(30)
        received = b""
        while b"\r\n\r\n" not in received:
            more = sock.recv(65536)
            assert more, received
            received += more
        head, _, body = received.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            more = sock.recv(65536)
            assert more, (lines, body)
            body += more
    return int(lines[0].split()[1]), body


def session_path(stack: Stack, device: str, event_id: str) -> pathlib.Path:
    return stack.data_dir / "staging" / "sessions" / device / f"url.{event_id}"


def wait_for(condition: Callable[[], bool], what: str, seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def file_size(path: pathlib.Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def session_files(stack: Stack) -> list[pathlib.Path]:
    return [p for p in (stack.data_dir / "staging").rglob("*") if p.is_file()]


def test_chunks_cut_query_resume_complete(
    stack: Stack, http: httpx.Client, auth_headers: Callable[..., dict[str, str]]
) -> None:
    device = new_device()
    headers = auth_headers()
    urls = http.get(f"/api/gallery/{device}/upload-url", params={"filename": "clip.mp4"},
                    headers=headers).json()
    url, event_id = urls["upload_url"], urls["eventId"]
    data = random_bytes(5 * MIB + 321)
    total = len(data)

    body = status(url)
    assert body == {"success": True, "eventId": event_id, "committedSize": 0, "size": 0,
                    "complete": False, "expires_at": urls["expires_at"]}

    assert_incomplete(put_range(url, data[:MIB], 0, total), MIB)
    assert status(url)["committedSize"] == MIB and status(url)["size"] == total

    # A chunk cut mid-body: every byte that reached the server counts (each message was whole),
    # the rest is resumed. The cut comes once the server has written all `sent` bytes.
    seen = put_access_lines(stack)
    sent = MIB + 300_000
    cut = open_put(stack, url, data[MIB:3 * MIB], sent, f"bytes {MIB}-{3 * MIB - 1}/{total}")
    staged = session_path(stack, device, event_id)
    wait_for(lambda: file_size(staged) == MIB + sent, "the sent bytes never reached the session")
    cut.close()
    code, reason = wait_for_put_access(stack, seen)
    assert (code, reason) in {("CANCELLED", ""), ("INVALID_ARGUMENT", "BODY_INCOMPLETE")}, (code, reason)
    committed = status(url)["committedSize"]
    assert committed == MIB + sent, committed
    with httpx.Client(timeout=30) as raw:
        head = raw.head(url)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["x-committed-size"] == str(committed)
    assert head.headers["x-upload-complete"] == "false"

    # Resuming anywhere but the committed size is 409 WRONG_OFFSET, naming the committed size.
    wrong = put_range(url, data[:MIB], 0, total)
    assert wrong.status_code == 409, wrong.text
    assert error_reason(wrong) == "WRONG_OFFSET"
    [info] = [d for d in wrong.json()["details"] if d["@type"].endswith("ErrorInfo")]
    assert info["metadata"]["committed_size"] == str(committed)

    # GCS's query form: `bytes */total` with no body.
    with httpx.Client(timeout=30) as raw:
        query = raw.put(url, headers={"Content-Range": f"bytes */{total}"})
    assert_incomplete(query, committed)

    offset = committed
    while offset + 2 * MIB < total:
        assert_incomplete(put_range(url, data[offset:offset + 2 * MIB], offset, total), offset + 2 * MIB)
        offset += 2 * MIB
    done = put_range(url, data[offset:], offset, total)
    assert done.status_code == 200, done.text
    assert done.json() == {"success": True, "eventId": event_id}

    assert status(url) == {"success": True, "eventId": event_id, "committedSize": total,
                           "size": total, "complete": True, "expires_at": urls["expires_at"]}
    stored = stack.data_dir / "media" / device / event_id
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
    events = http.get(f"/api/gallery/{device}/events", headers=headers).json()
    assert [(e["id"], e["size"], e["name"]) for e in events] == [(event_id, total, "clip.mp4")]
    assert not [p for p in session_files(stack) if device in str(p)]

    # The URL completed its one event: a repeated final chunk answers it and stores nothing; a
    # single-shot PUT keeps its rule (used URL).
    again = put_range(url, data[offset:], offset, total)
    assert again.status_code == 200 and again.json() == {"success": True, "eventId": event_id}
    with httpx.Client(timeout=30) as raw:
        plain = raw.put(url, content=data)
    assert plain.status_code == 403 and error_reason(plain) == "URL_ALREADY_USED"
    assert len(http.get(f"/api/gallery/{device}/events", headers=headers).json()) == 1
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()

    # Deleted since: the repeated chunk is told so, as a native session is (it said 200 before),
    # and stores nothing.
    assert http.delete(f"/api/gallery/{device}/events/{event_id}", headers=headers).status_code == 200
    gone = put_range(url, data[offset:], offset, total)
    assert gone.status_code == 404 and error_reason(gone) == "UPLOAD_EVENT_DELETED", gone.text
    with httpx.Client(timeout=30) as raw:
        for answer in (raw.get(url), raw.put(url, headers={"Content-Range": f"bytes */{total}"})):
            assert answer.status_code == 404 and error_reason(answer) == "UPLOAD_EVENT_DELETED", answer.text
        assert raw.head(url).status_code == 404
    assert http.get(f"/api/gallery/{device}/events", headers=headers).json() == []
    assert not stored.exists() and not [p for p in session_files(stack) if device in str(p)]


def curl(*args: str) -> tuple[int, dict[str, str], bytes]:
    """curl in a subprocess: (status, headers, body) of the last response."""
    result = subprocess.run(["curl", "-s", "-D", "-", *args], capture_output=True, timeout=60)
    head, _, body = result.stdout.partition(b"\r\n\r\n")
    while head.split(b" ")[1:2] == [b"100"]:  # curl's Expect: 100-continue, then the answer
        head, _, body = body.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status_code = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status_code, headers, body


def test_resume_with_curl(stack: Stack, http: httpx.Client, tmp_path: pathlib.Path,
                          auth_headers: Callable[..., dict[str, str]]) -> None:
    device = new_device()
    headers = auth_headers()
    urls = http.get(f"/api/gallery/{device}/upload-url", params={"filename": "drone.bin"},
                    headers=headers).json()
    url, event_id = urls["upload_url"], urls["eventId"]
    data = random_bytes(3 * MIB + 5)
    total = len(data)
    chunk = tmp_path / "chunk"

    chunk.write_bytes(data[:MIB])
    code, got, _ = curl("-X", "PUT", "--upload-file", str(chunk), "-H",
                        f"Content-Range: bytes 0-{MIB - 1}/{total}", url)
    assert code == 308 and got["range"] == f"bytes=0-{MIB - 1}" and got["x-committed-size"] == str(MIB)

    # curl is stopped mid-chunk on a slow link, once the server has written part of the chunk:
    # at least that part counts.
    chunk.write_bytes(data[MIB:])
    seen = put_access_lines(stack)
    slow = subprocess.Popen(["curl", "-s", "-o", "/dev/null", "--limit-rate", "256k",
                             "-X", "PUT", "--upload-file", str(chunk), "-H",
                             f"Content-Range: bytes {MIB}-{total - 1}/{total}", url])
    staged = session_path(stack, device, event_id)
    try:
        wait_for(lambda: file_size(staged) > MIB + 200_000, "curl's bytes never reached the session")
        arrived = file_size(staged)
    finally:
        slow.terminate()
        slow.wait(10)
    wait_for_put_access(stack, seen)  # the server commits the cut stream's bytes, then logs it
    code, got, body = curl(url)
    assert code == 200, body
    committed = int(got["x-committed-size"])
    assert arrived <= committed < total, (arrived, committed)
    code, got, _ = curl("-I", url)
    assert code == 200 and got["x-committed-size"] == str(committed)
    code, got, _ = curl("-X", "PUT", "-H", f"Content-Range: bytes */{total}", url)
    assert code == 308 and got["range"] == f"bytes=0-{committed - 1}"

    chunk.write_bytes(data[committed:])
    code, _, body = curl("-X", "PUT", "--upload-file", str(chunk), "-H",
                         f"Content-Range: bytes {committed}-{total - 1}/{total}", url)
    assert code == 200, body
    assert httpx.Response(200, content=body).json() == {"success": True, "eventId": event_id}
    stored = stack.data_dir / "media" / device / event_id
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
    assert [e["id"] for e in http.get(f"/api/gallery/{device}/events", headers=headers).json()] == [event_id]


@pytest.mark.parametrize(
    ("content_range", "body", "reason"),
    [
        ("bytes 0-9", b"x" * 10, "INVALID_CONTENT_RANGE"),  # no total
        ("bytes 0-9/*", b"x" * 10, "INVALID_CONTENT_RANGE"),  # unknown total: not supported
        ("bytes 5-2/10", b"x" * 4, "INVALID_CONTENT_RANGE"),  # last before first
        ("bytes 0-10/10", b"x" * 11, "INVALID_CONTENT_RANGE"),  # past the total
        ("bytes 0-9/20", b"x" * 5, "INVALID_CONTENT_RANGE"),  # disagrees with Content-Length
    ],
)
def test_bad_content_range_is_400_and_stores_nothing(
    stack: Stack, http: httpx.Client, auth_headers: Callable[..., dict[str, str]],
    content_range: str, body: bytes, reason: str,
) -> None:
    device = new_device()
    urls = http.get(f"/api/gallery/{device}/upload-url", params={"filename": "a.bin"},
                    headers=auth_headers()).json()
    with httpx.Client(timeout=30) as raw:
        response = raw.put(urls["upload_url"], content=body, headers={"Content-Range": content_range})
    assert response.status_code == 400, response.text
    assert error_reason(response) == reason
    assert status(urls["upload_url"])["committedSize"] == 0
    assert not (stack.data_dir / "media" / device).exists()
    assert not [p for p in session_files(stack) if device in str(p)]


def test_a_total_over_the_limit_is_413_and_stores_nothing(stack: Stack, http: httpx.Client,
                                                          auth_headers: Callable[..., dict[str, str]]) -> None:
    """Not 429: a client that retries on 429 would send the same too-large total for ever."""
    device = new_device()
    urls = http.get(f"/api/gallery/{device}/upload-url", params={"filename": "a.bin"},
                    headers=auth_headers()).json()
    response = put_range(urls["upload_url"], b"x" * 10, 0, 17 * 1024**3)  # the default limit: 16 GiB
    assert response.status_code == 413, response.text
    assert error_reason(response) == "UPLOAD_TOO_LARGE"
    assert response.json()["code"] == 8  # RESOURCE_EXHAUSTED, as native clients see it
    assert status(urls["upload_url"])["committedSize"] == 0
    assert not [p for p in session_files(stack) if device in str(p)]


def test_total_change_and_thumbnail_url(
    stack: Stack, http: httpx.Client, auth_headers: Callable[..., dict[str, str]]
) -> None:
    device = new_device()
    headers = auth_headers()
    urls = http.get(f"/api/gallery/{device}/upload-url", params={"filename": "a.jpg", "thumbnail": "true"},
                    headers=headers).json()
    assert_incomplete(put_range(urls["upload_url"], b"abc", 0, 10), 3)
    changed = put_range(urls["upload_url"], b"defg", 3, 11)
    assert changed.status_code == 400 and error_reason(changed) == "INVALID_CONTENT_RANGE"
    thumb = put_range(urls["thumbnail_upload_url"], b"jpeg", 0, 4)
    assert thumb.status_code == 400 and error_reason(thumb) == "RESUMABLE_MEDIA_ONLY"
    # The thumbnail, PUT whole, attaches whenever the resumable media completes.
    with httpx.Client(timeout=30) as raw:
        assert raw.put(urls["thumbnail_upload_url"], content=b"jpeg").status_code == 200
    assert status(urls["thumbnail_upload_url"])["complete"] is True  # before its media: no event yet, none deleted
    done = put_range(urls["upload_url"], b"defghij", 3, 10)
    assert done.status_code == 200, done.text
    [event] = http.get(f"/api/gallery/{device}/events", headers=headers).json()
    assert event["id"] == urls["eventId"] and event["has_thumbnail"] is True and event["size"] == 10
    # Deleted: both URLs of the pair say so.
    assert http.delete(f"/api/gallery/{device}/events/{event['id']}", headers=headers).status_code == 200
    with httpx.Client(timeout=30) as raw:
        for url in (urls["upload_url"], urls["thumbnail_upload_url"]):
            gone = raw.get(url)
            assert gone.status_code == 404 and error_reason(gone) == "UPLOAD_EVENT_DELETED", gone.text


# -- races between PUTs of one URL -----------------------------------------------------------------


def new_url(http: httpx.Client, headers: dict[str, str], device: str) -> tuple[str, str]:
    urls = http.get(f"/api/gallery/{device}/upload-url", params={"filename": "race.bin"},
                    headers=headers).json()
    return urls["upload_url"], urls["eventId"]


def one_event(stack: Stack, http: httpx.Client, headers: dict[str, str], device: str,
              event_id: str, data: bytes) -> None:
    events = http.get(f"/api/gallery/{device}/events", headers=headers).json()
    assert [(e["id"], e["size"]) for e in events] == [(event_id, len(data))]
    stored = stack.data_dir / "media" / device / event_id
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
    assert [p.name for p in (stack.data_dir / "media" / device).iterdir()] == [event_id]


def test_single_shot_put_completes_the_url_while_the_last_chunk_is_in_flight(
    stack: Stack, http: httpx.Client, auth_headers: Callable[..., dict[str, str]]
) -> None:
    """The last chunk finds the URL done by a single-shot PUT: it is answered 200 with the URL's
    event (not 409, not 5xx), and the event holds the single-shot PUT's bytes."""
    device, headers = new_device(), auth_headers()
    url, event_id = new_url(http, headers, device)
    data, other = random_bytes(2 * MIB), random_bytes(2 * MIB)
    assert_incomplete(put_range(url, data[:MIB], 0, len(data)), MIB)
    last = open_put(stack, url, data[MIB:], 100_000, f"bytes {MIB}-{len(data) - 1}/{len(data)}")
    staged = session_path(stack, device, event_id)
    wait_for(lambda: file_size(staged) >= MIB + 100_000, "the last chunk never started")
    with httpx.Client(timeout=60) as raw:
        single = raw.put(url, content=other)
    assert single.status_code == 200, single.text
    assert single.json() == {"success": True, "eventId": event_id}
    code, body = finish_put(last, data[MIB + 100_000:])
    assert code == 200, body
    assert httpx.Response(200, content=body).json() == {"success": True, "eventId": event_id}
    one_event(stack, http, headers, device, event_id, other)
    body = status(url)
    assert (body["complete"], body["committedSize"]) == (True, len(other))
    assert not staged.exists()  # the chunks can never be stored under the URL: removed


def test_chunk_put_while_a_single_shot_put_is_in_flight(
    stack: Stack, http: httpx.Client, auth_headers: Callable[..., dict[str, str]]
) -> None:
    """A whole PUT takes nothing while it streams: a chunk meanwhile is answered as any chunk
    (308), the whole PUT that completes first stores the URL's event, and chunks after it are
    answered with that event."""
    device, headers = new_device(), auth_headers()
    url, event_id = new_url(http, headers, device)
    data, other = random_bytes(2 * MIB), random_bytes(2 * MIB)
    staging = stack.data_dir / "staging"
    before = {p for p in staging.iterdir() if p.is_file()}
    single = open_put(stack, url, other, 100_000)
    # A new staged file: the whole PUT is streaming. Its bytes need not show yet: direct writes
    # gather 128 KiB first (_direct_io.py).
    wait_for(lambda: bool({p for p in staging.iterdir() if p.is_file()} - before),
             "the single-shot PUT never started")
    chunk = put_range(url, data[:MIB], 0, len(data))
    assert chunk.status_code == 308, chunk.text
    assert file_size(session_path(stack, device, event_id)) == MIB
    code, body = finish_put(single, other[100_000:])
    assert code == 200, body
    assert not session_path(stack, device, event_id).exists()  # it can never be stored: gone
    # Chunks after it are answered with its event; nothing more is stored.
    again = put_range(url, data[MIB:], MIB, len(data))
    assert again.status_code == 200 and again.json() == {"success": True, "eventId": event_id}
    one_event(stack, http, headers, device, event_id, other)


def test_two_chunk_puts_of_one_url_at_once(
    stack: Stack, http: httpx.Client, auth_headers: Callable[..., dict[str, str]]
) -> None:
    """One session writer at a time: the second chunk PUT waits for the session's lock, then gets
    409 UPLOAD_BUSY (or WRONG_OFFSET, had the first ended meanwhile); the first, slow but sending
    (a silent one would be replaced: the next test), completes."""
    device, headers = new_device(), auth_headers()
    url, event_id = new_url(http, headers, device)
    data = random_bytes(2 * MIB)
    first = open_put(stack, url, data, 100_000, f"bytes 0-{len(data) - 1}/{len(data)}")
    staged = session_path(stack, device, event_id)
    wait_for(lambda: file_size(staged) >= 100_000, "the first chunk PUT never started")
    sent, stop = 100_000, threading.Event()

    def trickle() -> None:
        nonlocal sent
        while not stop.wait(0.25):
            first.sendall(data[sent:sent + 1000])
            sent += 1000

    trickling = threading.Thread(target=trickle)
    trickling.start()
    try:
        second = put_range(url, data[:1000], 0, len(data))
    finally:
        stop.set()
        trickling.join()
    assert second.status_code == 409, second.text
    assert error_reason(second) in {"UPLOAD_BUSY", "WRONG_OFFSET"}
    code, body = finish_put(first, data[sent:])
    assert code == 200, body
    assert httpx.Response(200, content=body).json() == {"success": True, "eventId": event_id}
    one_event(stack, http, headers, device, event_id, data)
    assert not staged.exists()


def test_a_chunk_put_replaces_a_silent_one_holding_its_session(
    stack: Stack, http: httpx.Client, auth_headers: Callable[..., dict[str, str]]
) -> None:
    """A chunk PUT whose connection died without a FIN holds the session's lock, with one of its
    URLs' two places: every retry waited 5 s for the lock and got 409 UPLOAD_BUSY until the idle
    limit (120 s) ended it. Once it has sent nothing for 5 s, a retry waiting for the lock aborts
    it (UPLOAD_REPLACED), and the client resumes from the committed size as it would after any 409."""
    device, headers = new_device(), auth_headers()
    url, event_id = new_url(http, headers, device)
    data = random_bytes(2 * MIB)
    with open_put(stack, url, data, 100_000, f"bytes 0-{len(data) - 1}/{len(data)}"):
        staged = session_path(stack, device, event_id)
        wait_for(lambda: file_size(staged) >= 100_000, "the chunk PUT never started")
        deadline = time.monotonic() + 30
        while True:
            committed = status(url)["committedSize"]
            answer = put_range(url, data[committed:], committed, len(data))
            if answer.status_code == 200:
                break
            assert answer.status_code == 409 and time.monotonic() < deadline, answer.text
            assert error_reason(answer) in {"UPLOAD_BUSY", "WRONG_OFFSET"}
        assert answer.json() == {"success": True, "eventId": event_id}
    one_event(stack, http, headers, device, event_id, data)
    assert not staged.exists()


def test_status_reads_change_nothing(
    stack: Stack, http: httpx.Client, auth_headers: Callable[..., dict[str, str]]
) -> None:
    """GET/HEAD of a URL never create a session, and a `bytes */total` query of a fresh URL is
    308 with nothing committed, opening none."""
    device, headers = new_device(), auth_headers()
    url, event_id = new_url(http, headers, device)
    with httpx.Client(timeout=30) as raw:
        assert raw.head(url).status_code == 200
        query = raw.put(url, headers={"Content-Range": "bytes */1000"})
    assert_incomplete(query, 0)
    assert status(url)["size"] == 0
    assert not session_path(stack, device, event_id).exists()
