"""HEAD on every REST GET route, through the real Envoy: the GET's status and headers, the
Content-Length of the body the GET gets, and no body; a download's HEAD does not read the file.

The API declares GET bindings only; Envoy's Lua filter sends a HEAD on as the GET it mirrors and
empties the answer (envoy/envoy.yaml). The cases are checked against the descriptor's GET bindings,
so a GET route added without a case here fails `test_every_get_route_has_a_case`.
"""

from __future__ import annotations

import hashlib
import random
import socket
import sqlite3
import time
from typing import NamedTuple

import grpc
import httpx
import pytest

from gallery.v1 import gallery_pb2 as pb
from gallery.v1 import gallery_pb2_grpc
from gallery_server import auth, envoy_config
from gallery_server.local_stack import Stack

from ..conftest import JWT_SECRET
from .test_downloads import JPEG, MiB, multipart_upload, new_device, upload_with_thumbnail

# Headers that differ between any two answers, that only say how the body is framed, or that
# grpc-core adds to what the transcoder answers (a file Envoy sends itself has none).
PER_ANSWER = {
    "date", "x-envoy-upstream-service-time", "content-length", "transfer-encoding", "grpc-accept-encoding",
    "x-request-id",  # each answer names its own request
}


class Case(NamedTuple):
    method: str  # the RPC whose GET binding the path takes
    path: str
    headers: dict[str, str]
    status: int


class Stored(NamedTuple):
    device: str
    event_id: str  # 2 MiB + 3 bytes of media, with a thumbnail
    bare_id: str  # 10 bytes, no thumbnail
    data: bytes
    token: str


def _bearer(scope: str) -> dict[str, str]:
    token = auth.mint(JWT_SECRET, subject="head", devices=["*"], scope=scope)
    return {"Authorization": f"Bearer {token}"}


READ = _bearer(f"{auth.READ} {auth.WRITE}")


@pytest.fixture(scope="module")
def stored(stack: Stack) -> Stored:
    device = new_device()
    data = random.Random(11).randbytes(2 * MiB + 3)
    with httpx.Client(base_url=stack.base_url, timeout=60) as http:
        event_id = upload_with_thumbnail(http, device, READ, data, JPEG)
        bare_id = multipart_upload(http, device, READ, "bare.bin", b"0123456789", 10)
    return Stored(device, event_id, bare_id, data, READ["Authorization"].split()[1])


def _cases(s: Stored, signed_url: str) -> list[Case]:
    base = f"/api/gallery/{s.device}"
    content = f"{base}/events/{s.event_id}/content"
    thumbnail = f"{base}/events/{s.event_id}/thumbnail"
    etag = f'"{hashlib.sha256(s.data).hexdigest()}"'
    missing = "evt_AAAAAAAAAAAAAAAAAAAAAA"
    return [
        Case("GetDevicePaths", f"{base}/paths", READ, 200),
        Case("ListEventsJson", f"{base}/events?limit=1", READ, 200),
        Case("ListEventsJson", f"{base}/events?limit=0", READ, 400),
        Case("GetEvent", f"{base}/events/{s.event_id}", READ, 200),
        Case("GetEvent", f"{base}/events/{missing}", READ, 404),
        Case("GetStats", f"{base}/stats", READ, 200),
        Case("GetStats", f"{base}/stats", {}, 401),
        Case("CreateUploadUrl", f"{base}/upload-url?filename=a.jpg", READ, 200),
        Case("GetSignedUploadStatus", signed_url, {}, 200),
        Case("GetAdminStatus", "/api/admin/status", _bearer(auth.ADMIN), 200),
        Case("GetAdminStatus", "/api/admin/status", READ, 403),
        Case("GetEventContent", content, READ, 200),
        Case("GetEventContent", content, {**READ, "Range": "bytes=1048570-1048580"}, 206),
        Case("GetEventContent", content, {**READ, "Range": "bytes=-7"}, 206),
        Case("GetEventContent", content, {**READ, "If-None-Match": etag}, 304),
        Case("GetEventContent", content, {**READ, "If-None-Match": '"other"'}, 200),
        Case("GetEventContent", content, {**READ, "Range": "bytes=0-9", "If-Range": '"other"'}, 200),
        Case("GetEventContent", content, {**READ, "Range": f"bytes={len(s.data)}-"}, 416),
        Case("GetEventContent", f"{base}/events/{missing}/content", READ, 404),
        Case("GetEventContent", content, {}, 401),
        Case("GetEventThumbnail", thumbnail, READ, 200),
        Case("GetEventThumbnail", thumbnail, {**READ, "Range": "bytes=0-3"}, 206),
        Case("GetEventThumbnail", f"{base}/events/{s.bare_id}/thumbnail", READ, 404),
    ]


@pytest.fixture(scope="module")
def signed_url(stack: Stack, stored: Stored) -> str:
    with httpx.Client(base_url=stack.base_url, timeout=30) as http:
        r = http.get(f"/api/gallery/{stored.device}/upload-url", params={"filename": "s.bin"}, headers=READ)
    assert r.status_code == 200, r.text
    return str(r.json()["upload_url"])  # absolute: the stack's own public URL


def test_every_get_route_has_a_case(stored: Stored) -> None:
    gets = {method for method, verb, _ in envoy_config.http_bindings() if verb == "GET"}
    assert {case.method for case in _cases(stored, "/")} == gets


def test_head_answers_what_get_answers_without_the_body(stack: Stack, stored: Stored, signed_url: str) -> None:
    with httpx.Client(base_url=stack.base_url, timeout=30) as http:
        for case in _cases(stored, signed_url):
            get = http.get(case.path, headers=case.headers)
            head = http.head(case.path, headers=case.headers)
            where = (case.method, case.path, case.headers.keys() - {"Authorization"})
            assert get.status_code == head.status_code == case.status, (where, get.status_code, head.status_code)
            assert head.content == b"", where
            assert ({k: v for k, v in head.headers.items() if k not in PER_ANSWER}
                    == {k: v for k, v in get.headers.items() if k not in PER_ANSWER}), where
            if case.status == 304:  # RFC 9110: a 304 names no length but the 200's
                assert "content-length" not in head.headers and "content-length" not in get.headers, where
            else:
                assert head.headers["content-length"] == str(len(get.content)), where
            assert not any(name.startswith("x-gallery-") or name == "x-http-status" for name in head.headers), where


def test_a_head_of_upload_url_issues_no_url(stack: Stack, http: httpx.Client) -> None:
    """A HEAD is safe (RFC 9110 9.2.1): a link checker's HEAD of upload-url answers the GET's
    headers but records no grant (one would count against the device's unused URLs for a day)."""
    device = new_device()
    path = f"/api/gallery/{device}/upload-url"

    def grants() -> int:
        with sqlite3.connect(stack.data_dir / "gallery.db") as db:
            return db.execute("SELECT count(*) FROM upload_grants WHERE device = ?", (device,)).fetchone()[0]

    head = http.head(path, params={"filename": "a.jpg", "thumbnail": "true"}, headers=READ)
    assert (head.status_code, head.content, grants()) == (200, b"", 0)
    get = http.get(path, params={"filename": "a.jpg", "thumbnail": "true"}, headers=READ)
    assert (get.status_code, grants()) == (200, 1)
    assert head.headers["content-length"] == str(len(get.content))
    # A GET naming Envoy's HEAD marker itself still gets its URL recorded.
    marked = http.get(path, params={"filename": "a.jpg"}, headers={**READ, "x-gallery-head": "1"})
    assert (marked.status_code, grants()) == (200, 2)
    assert marked.json()["upload_url"]


def test_a_head_of_paths_makes_no_folders(stack: Stack, http: httpx.Client) -> None:
    """A HEAD is safe: with a token that may store, GET .../paths makes the device's drop folders
    (scanned by the importer every second), and its HEAD answers the same headers making none."""
    device = new_device()
    root = stack.data_dir / "gallery" / device
    path = f"/api/gallery/{device}/paths"
    head = http.head(path, headers=READ)
    assert (head.status_code, head.content, root.exists()) == (200, b"", False)
    get = http.get(path, headers=READ)
    assert get.status_code == 200 and (root / "incoming").is_dir() and (root / "thumbnails").is_dir()
    assert head.headers["content-length"] == str(len(get.content))


def _read_chars(pid: int) -> int:
    """Bytes the process has read with read-like system calls (/proc/<pid>/io, rchar)."""
    with open(f"/proc/{pid}/io") as io:
        return next(int(line.split()[1]) for line in io if line.startswith("rchar:"))


def test_a_download_head_does_not_read_the_file(stack: Stack, http: httpx.Client) -> None:
    device = new_device()
    size = 16 * MiB
    event_id = multipart_upload(http, device, READ, "big.bin", random.Random(3).randbytes(size), size)
    content = f"/api/gallery/{device}/events/{event_id}/content"
    for extra, status in [({}, 200), ({"Range": "bytes=0-"}, 206),
                          ({"Range": "bytes=0-9", "If-Range": '"other"'}, 200)]:
        before = _read_chars(stack.server_pid)
        head = http.head(content, headers={**READ, **extra})
        assert head.status_code == status and head.headers["content-length"] == str(size), extra
        assert _read_chars(stack.server_pid) - before < MiB, extra
    # The control: a GET the server streams itself (a conditional one) reads the whole file.
    before = _read_chars(stack.server_pid)
    get = http.get(content, headers={**READ, "If-None-Match": '"other"'})
    assert get.status_code == 200 and len(get.content) == size
    assert _read_chars(stack.server_pid) - before >= size


def _answer_head(sock: socket.socket) -> bytes:
    """The status line and headers of one HTTP/1.1 answer, read a byte at a time (nothing more)."""
    received = b""
    while not received.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        assert byte, received
        received += byte
    return received


def test_head_leaves_the_connection_usable(stack: Stack, stored: Stored) -> None:
    """No body follows a HEAD answer on the connection, and the next request is answered whole."""
    content = f"/api/gallery/{stored.device}/events/{stored.event_id}/content"
    request = f"{{}} {content} HTTP/1.1\r\nHost: gallery\r\nAuthorization: Bearer {stored.token}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", stack.http_port), timeout=10) as sock:
        for path in (f"/api/gallery/{stored.device}/stats", content):
            sock.sendall(request.replace(content, path).format("HEAD").encode())
            assert _answer_head(sock).startswith(b"HTTP/1.1 200 ")
            time.sleep(0.3)
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)  # nothing after the headers
            sock.setblocking(True)
        sock.sendall(request.format("GET").encode())
        head = _answer_head(sock).decode()
        assert head.startswith("HTTP/1.1 200 ") and f"content-length: {len(stored.data)}\r\n" in head.lower()
        body = b""
        while len(body) < len(stored.data):
            piece = sock.recv(MiB)
            assert piece
            body += piece
        assert body == stored.data


@pytest.mark.parametrize(("path", "status"), [("/api/gallery/{device}/upload", 405), ("/no/such/path", 404)])
def test_head_where_no_get_is_bound_answers_as_the_get(
    stack: Stack, http: httpx.Client, stored: Stored, path: str, status: int
) -> None:
    """A POST-only path (405) or an unknown one (404): the GET's answer, whose body Envoy writes
    itself, with its Content-Length (it was 0) and no body, and the connection still answers."""
    path = path.format(device=stored.device)
    get = http.get(path, headers=READ)
    assert get.status_code == status and get.content
    request = f"{{}} {{}} HTTP/1.1\r\nHost: gallery\r\nAuthorization: Bearer {stored.token}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", stack.http_port), timeout=10) as sock:
        sock.sendall(request.format("HEAD", path).encode())
        head = _answer_head(sock).decode().lower()
        assert head.startswith(f"http/1.1 {status} ") and f"content-length: {len(get.content)}\r\n" in head, head
        time.sleep(0.3)
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            sock.recv(1)  # nothing after the headers
        sock.setblocking(True)
        sock.sendall(request.format("GET", f"/api/gallery/{stored.device}/stats").encode())
        assert _answer_head(sock).startswith(b"HTTP/1.1 200 ")


@pytest.mark.parametrize("content_type", [None, "application/grpc-web", "application/grpc; x", "text/plain"])
def test_a_clients_own_head_marker_is_ignored(http: httpx.Client, stored: Stored, content_type: str | None) -> None:
    """Only Envoy says a request is a HEAD: a GET naming Envoy's marker itself still gets the bytes,
    on the route the server streams and on the one Envoy sends itself, whatever its Content-Type
    (the transcoder takes any but application/grpc and application/grpc+... as REST)."""
    content = f"/api/gallery/{stored.device}/events/{stored.event_id}/content"
    marker = {"x-gallery-head": "1", **({"content-type": content_type} if content_type else {})}
    for extra, status, body in [({"If-None-Match": '"other"'}, 200, stored.data), ({}, 200, stored.data),
                                ({"If-None-Match": '"other"', "Range": "bytes=1-3"}, 206, stored.data[1:4])]:
        r = http.get(content, headers={**READ, **extra, **marker})
        assert (r.status_code, r.content) == (status, body), (extra, r.status_code, len(r.content))
        assert not any(name.startswith("x-gallery-") or name == "x-http-status" for name in r.headers), r.headers


def test_a_native_clients_head_marker_is_removed_by_envoy(stack: Stack, stored: Stored) -> None:
    """Through Envoy a native gRPC call gets its bytes too; only the server's own port believes it."""
    request = pb.GetEventContentRequest(device=stored.device, event_id=stored.event_id)
    metadata = (("authorization", f"Bearer {stored.token}"), ("x-gallery-head", "1"))
    with grpc.insecure_channel(stack.envoy_grpc_address) as channel:
        answers = list(gallery_pb2_grpc.GalleryServiceStub(channel).GetEventContent(request, metadata=metadata))
    assert b"".join(answer.data for answer in answers) == stored.data
