"""Limits through the real stack: uploads in flight per device and in total (429 with distinct
reasons), an idle upload stream aborted and cleaned, and the admin status (GET /api/admin/status,
scope gallery:admin) with its exact JSON shape."""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import httpx
import pytest

from gallery.v1 import admin_pb2, admin_pb2_grpc, gallery_pb2_grpc
from gallery.v1 import gallery_pb2 as pb
from gallery_server import auth, envoy_config
from gallery_server.settings import MAX_METADATA_BYTES
from gallery_server.validation import MAX_METADATA_VALUES

from ..conftest import rich_error, stored_files, wait_until
from .conftest import Stack, log_entries, start_stack, stop_stack

# Long enough that a held upload's keep-alive (every IDLE_SECONDS / 6) survives scheduling stalls
# of a loaded 2-CPU machine; the abort is checked against a generous upper bound for the same reason.
IDLE_SECONDS = 3.0
FIRST_MESSAGE_SECONDS = 0.5
ADMIN_SCOPES = f"{auth.READ} {auth.WRITE} {auth.ADMIN}"


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("limits")
    stack = start_stack(root / "data", root / "gallery.log", extra_env={
        "GALLERY_MAKE_THUMBNAILS": "false",
        "GALLERY_MAX_UPLOADS_PER_DEVICE": "1",
        "GALLERY_MAX_UPLOADS_TOTAL": "3",
        "GALLERY_MAX_UPLOAD_URLS_PER_DEVICE": "2",
        "GALLERY_MAX_UPLOAD_SESSIONS_PER_DEVICE": "2",
        "GALLERY_UPLOAD_IDLE_SECONDS": str(IDLE_SECONDS),
        "GALLERY_UPLOAD_FIRST_MESSAGE_SECONDS": str(FIRST_MESSAGE_SECONDS),
        "GALLERY_MAX_METADATA_BYTES": str(MAX_METADATA_BYTES),  # the highest it may be
    })
    yield stack
    stop_stack(stack)


class HeldUpload:
    """A native upload kept open (sending a byte now and then) until released."""

    def __init__(self, stub: gallery_pb2_grpc.GalleryServiceStub, md, device: str, *, keep_alive: bool = True):
        self.release = threading.Event()
        self.keep_alive = keep_alive
        self.future = stub.UploadEvent.future(self._parts(device), metadata=md, timeout=60)

    def _parts(self, device: str) -> Iterator[pb.UploadEventRequest]:
        yield pb.UploadEventRequest(header=pb.UploadHeader(device=device, name="held.bin"))
        yield pb.UploadEventRequest(media_chunk=b"x" * 1000)
        while not self.release.wait(IDLE_SECONDS / 6 if self.keep_alive else 60):
            yield pb.UploadEventRequest(media_chunk=b"x")
        yield pb.UploadEventRequest(finish=pb.UploadFinish())


def admin_status(http: httpx.Client, token: str) -> dict:
    r = http.get("/api/admin/status", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    return dict(r.json())


def wait_in_flight(http: httpx.Client, token: str, expected: int) -> None:
    deadline = time.monotonic() + 10
    while admin_status(http, token)["counts"]["uploads_in_flight"] != expected:
        assert time.monotonic() < deadline, f"uploads in flight never became {expected}"
        time.sleep(0.05)


def rest_upload(http: httpx.Client, token: str, device: str) -> httpx.Response:
    return http.post(f"/api/gallery/{device}/upload", headers={"Authorization": f"Bearer {token}"},
                     files={"event": ("a.bin", b"abc")}, data={"name": "a.bin"})


def assert_429(r: httpx.Response, reason: str, retry_after: str | None = "1") -> None:
    """Refused 429 for `reason`; a place the server frees as calls end says when to come back
    (Retry-After), a limit the client must act on does not."""
    assert r.status_code == 429, r.text
    body = r.json()
    assert body["code"] == 8
    assert body["details"][0]["reason"] == reason
    assert r.headers.get("retry-after") == retry_after, r.headers


def test_uploads_in_flight_are_limited_per_device_and_in_total(limited: Stack, mint: Callable[..., str]) -> None:
    token = mint(scope=ADMIN_SCOPES)
    md = [("authorization", f"Bearer {token}")]
    with httpx.Client(base_url=limited.base_url, timeout=30) as http, \
            grpc.insecure_channel(limited.envoy_grpc_address) as channel:
        stub = gallery_pb2_grpc.GalleryServiceStub(channel)
        held = [HeldUpload(stub, md, "lim-a")]
        try:
            wait_in_flight(http, token, 1)
            assert_429(rest_upload(http, token, "lim-a"), "TOO_MANY_DEVICE_UPLOADS")
            assert rest_upload(http, token, "lim-b").status_code == 200  # another device may
            # One at a time: with a total of 3, a token for every device may have one stream
            # awaiting its first message (half the total), and two started at once could race.
            held.append(HeldUpload(stub, md, "lim-c"))
            wait_in_flight(http, token, 2)
            held.append(HeldUpload(stub, md, "lim-d"))
            wait_in_flight(http, token, 3)
            assert_429(rest_upload(http, token, "lim-e"), "TOO_MANY_UPLOADS")
            with pytest.raises(grpc.RpcError) as native:
                stub.UploadEvent(iter([pb.UploadEventRequest(header=pb.UploadHeader(device="lim-e", name="n")),
                                       pb.UploadEventRequest(finish=pb.UploadFinish())]), metadata=md)
            assert native.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert rich_error(native.value)[0].reason == "TOO_MANY_UPLOADS"
            assert ("retry-after", "1") in native.value.trailing_metadata()
        finally:
            for upload in held:
                upload.release.set()
        for upload in held:
            assert upload.future.result(timeout=30).success
        wait_in_flight(http, token, 0)
        assert rest_upload(http, token, "lim-e").status_code == 200


def test_an_idle_upload_is_aborted_and_leaves_nothing(limited: Stack, mint: Callable[..., str]) -> None:
    token = mint(scope=ADMIN_SCOPES)
    md = [("authorization", f"Bearer {token}")]
    before = set(stored_files(limited.data_dir))
    with httpx.Client(base_url=limited.base_url, timeout=30) as http, \
            grpc.insecure_channel(limited.grpc_address) as channel:
        stub = gallery_pb2_grpc.GalleryServiceStub(channel)
        started = time.monotonic()
        silent = HeldUpload(stub, md, "lim-idle", keep_alive=False)
        try:
            with pytest.raises(grpc.RpcError) as aborted:
                silent.future.result(timeout=30)
        finally:
            silent.release.set()
        took = time.monotonic() - started
        assert aborted.value.code() == grpc.StatusCode.CANCELLED
        assert IDLE_SECONDS <= took < IDLE_SECONDS + 20
        wait_in_flight(http, token, 0)
    assert set(stored_files(limited.data_dir)) == before
    assert not (limited.data_dir / "media" / "lim-idle").exists() or not any(
        (limited.data_dir / "media" / "lim-idle").iterdir()
    )


def test_a_stream_that_never_sends_its_first_message_is_aborted(
    limited: Stack, mint: Callable[..., str]
) -> None:
    # It holds a server thread without an upload slot: a shorter limit than the idle time.
    md = [("authorization", f"Bearer {mint()}")]
    never = threading.Event()

    def nothing() -> Iterator[pb.UploadEventRequest]:
        never.wait(60)
        yield pb.UploadEventRequest(finish=pb.UploadFinish())

    with grpc.insecure_channel(limited.grpc_address) as channel:
        stub = gallery_pb2_grpc.GalleryServiceStub(channel)
        started = time.monotonic()
        try:
            with pytest.raises(grpc.RpcError) as aborted:
                stub.UploadEvent(nothing(), metadata=md, timeout=60)
        finally:
            never.set()
    assert aborted.value.code() == grpc.StatusCode.CANCELLED
    assert FIRST_MESSAGE_SECONDS <= time.monotonic() - started < IDLE_SECONDS


def test_streams_that_send_nothing_cannot_take_every_thread(
    tmp_path_factory: pytest.TempPathFactory, mint: Callable[..., str]
) -> None:
    """A pre-signed PUT needs no token, and each stream holds a server thread until its first
    message (up to GALLERY_UPLOAD_FIRST_MESSAGE_SECONDS): silent ones count with the uploads in
    flight, those without a token for at most half of GALLERY_MAX_UPLOADS_TOTAL. Past that they
    are 429 at once, the server's other threads stay free for every other call, and uploads with
    a token still have their places."""
    root = tmp_path_factory.mktemp("silent")
    workers, total = 8, 4
    stack = start_stack(root / "data", root / "gallery.log", extra_env={
        "GALLERY_MAKE_THUMBNAILS": "false",
        "GALLERY_GRPC_WORKERS": str(workers),
        "GALLERY_MAX_UPLOADS_TOTAL": str(total),
        "GALLERY_UPLOAD_FIRST_MESSAGE_SECONDS": "60",
    })
    headers = {"Authorization": f"Bearer {mint()}"}

    def upload(http: httpx.Client) -> httpx.Response:
        return http.post("/api/gallery/silent-dev/upload", headers=headers,
                         files={"event": ("a.bin", b"abc")}, data={"name": "a.bin"})

    try:
        with contextlib.ExitStack() as silent, httpx.Client(base_url=stack.base_url, timeout=10) as http:
            # Headers announcing a body that never comes, without a token but with a genuine URL
            # (a made-up one is refused at once): more than every thread.
            url = http.get("/api/gallery/silent-dev/upload-url", params={"filename": "s.bin"}, headers=headers)
            put = httpx.URL(url.json()["upload_url"]).raw_path
            sockets = []
            for _ in range(workers + 4):
                s = silent.enter_context(socket.create_connection(("127.0.0.1", stack.http_port)))
                s.sendall(b"PUT " + put + b" HTTP/1.1\r\nHost: gallery\r\nContent-Length: 100\r\n\r\n")
                sockets.append(s)
            # total / 2 of them wait for their body; every other one is refused at once.
            expected = workers + 4 - total // 2
            refused: dict[socket.socket, bytes] = {}
            deadline = time.monotonic() + 10
            while len(refused) < expected and time.monotonic() < deadline:
                readable, _, _ = select.select([s for s in sockets if s not in refused], [], [], 0.1)
                refused.update((s, s.recv(4096)) for s in readable)
            time.sleep(0.3)
            late = select.select([s for s in sockets if s not in refused], [], [], 0)[0]
            assert not late, [s.recv(4096) for s in late]
            assert len(refused) == expected, refused
            assert all(r.startswith(b"HTTP/1.1 429 ") and b"TOO_MANY_UPLOADS" in r
                       for r in refused.values()), refused
            # Calls on the upload threads' pool are answered meanwhile, and uploads with a token.
            r = http.get("/api/gallery/silent-dev/upload-url", params={"filename": "a.jpg"}, headers=headers)
            assert r.status_code == 200, r.text
            first = upload(http)
            assert first.status_code == 200, first.text
        # The clients went: their streams end and give their places back.
        with httpx.Client(base_url=stack.base_url, timeout=10) as http:
            second = upload(http)
            assert second.status_code == 200, second.text
    finally:
        stop_stack(stack)
    assert sorted(p.name for p in stored_files(stack.data_dir)) == sorted(
        r.json()["eventId"] for r in (first, second))


def test_one_tokens_silent_streams_cannot_refuse_other_devices_uploads(
    tmp_path_factory: pytest.TempPathFactory, mint: Callable[..., str]
) -> None:
    """Streams awaiting their first message name no device yet, so they are counted by token: a
    token may have its grant's part of them (GALLERY_MAX_UPLOADS_PER_DEVICE for each device it
    grants, threads.grant_share), and a token that can store nothing none at all. Before, any
    valid token, a read-only one included, held every upload place and refused every device."""
    root = tmp_path_factory.mktemp("silent-token")
    stack = start_stack(root / "data", root / "gallery.log", extra_env={
        "GALLERY_MAKE_THUMBNAILS": "false", "GALLERY_GRPC_WORKERS": "24",
        "GALLERY_MAX_UPLOADS_TOTAL": "8", "GALLERY_MAX_UPLOADS_PER_DEVICE": "2",
        "GALLERY_UPLOAD_FIRST_MESSAGE_SECONDS": "60",
    })
    reader = mint(devices=["cam-a"], scope="gallery:read")
    writer = mint(devices=["cam-a"], scope="gallery:write")

    def silent(token: str, sockets: contextlib.ExitStack) -> socket.socket:
        s = sockets.enter_context(socket.create_connection(("127.0.0.1", stack.http_port)))
        s.sendall(f"POST /api/gallery/cam-a/upload HTTP/1.1\r\nHost: gallery\r\n"
                  f"Authorization: Bearer {token}\r\nContent-Type: multipart/form-data; boundary=zz\r\n"
                  "Content-Length: 1000\r\n\r\n".encode())
        return s

    def answer(s: socket.socket) -> bytes:
        s.settimeout(10)
        return s.recv(4096)

    try:
        with contextlib.ExitStack() as sockets, httpx.Client(base_url=stack.base_url, timeout=10) as http:
            # A read-only token is refused at once, without waiting for a body.
            refused = answer(silent(reader, sockets))
            assert refused.startswith(b"HTTP/1.1 403 ") and b"SCOPE_MISSING" in refused, refused
            # A writer's token for one device: two wait for their body, the third is refused.
            waiting = [silent(writer, sockets) for _ in range(2)]
            time.sleep(0.5)
            third = answer(silent(writer, sockets))
            assert third.startswith(b"HTTP/1.1 429 ") and b"TOO_MANY_UPLOADS" in third, third
            assert b"this token has 2 uploads open" in third
            assert not select.select(waiting, [], [], 0)[0]  # still waiting
            # Another device's uploads still have their places.
            r = http.post("/api/gallery/cam-b/upload", headers={"Authorization": f"Bearer {mint(devices=['cam-b'])}"},
                          files={"event": ("b.bin", b"bee")}, data={"name": "b.bin"})
            assert r.status_code == 200, r.text
    finally:
        stop_stack(stack)
    assert [p.name for p in stored_files(stack.data_dir)] == [r.json()["eventId"]]


def test_a_tokens_uploads_in_flight_silent_streams_and_urls_take_one_part(
    tmp_path_factory: pytest.TempPathFactory, mint: Callable[..., str]
) -> None:
    """A token's uploads in flight, its streams awaiting their first message and the PUTs of the
    URLs it asked for count against one part of the total (threads.grant_share), and pre-signed
    PUTs whose URL is not named in their path (native calls) against an eighth. Before, they
    added up: a token for 3 devices trickling 2 uploads per device, with its part of silent
    streams and silent PUTs of its URLs, filled the total, and another device's upload was
    refused (the re-probe's reproduction, at smaller limits)."""
    root = tmp_path_factory.mktemp("one-part")
    stack = start_stack(root / "data", root / "gallery.log", extra_env={
        "GALLERY_MAKE_THUMBNAILS": "false", "GALLERY_GRPC_WORKERS": "40",
        "GALLERY_MAX_UPLOADS_TOTAL": "16", "GALLERY_MAX_UPLOADS_PER_DEVICE": "2",
        "GALLERY_UPLOAD_FIRST_MESSAGE_SECONDS": "60", "GALLERY_UPLOAD_IDLE_SECONDS": str(IDLE_SECONDS),
    })
    devices = ["cam1", "cam2", "cam3"]  # a part of 6
    attacker = mint(devices=devices, scope="gallery:write")
    md = [("authorization", f"Bearer {attacker}")]
    admin = mint(scope=ADMIN_SCOPES)
    never = threading.Event()

    def silent(sockets: contextlib.ExitStack, head: str) -> socket.socket:
        s = sockets.enter_context(socket.create_connection(("127.0.0.1", stack.http_port)))
        s.sendall(f"{head} HTTP/1.1\r\nHost: gallery\r\nContent-Length: 1000\r\n".encode())
        return s

    def answer(s: socket.socket) -> bytes:
        s.settimeout(10)
        return s.recv(4096)

    def nothing() -> Iterator[pb.PutSignedUploadRequest]:
        never.wait(60)
        yield pb.PutSignedUploadRequest()

    try:
        with contextlib.ExitStack() as sockets, httpx.Client(base_url=stack.base_url, timeout=10) as http, \
                grpc.insecure_channel(stack.envoy_grpc_address) as channel:
            stub = gallery_pb2_grpc.GalleryServiceStub(channel)
            held: list[HeldUpload] = []
            try:
                puts = [httpx.URL(http.get(f"/api/gallery/{device}/upload-url", params={"filename": "a.bin"},
                                           headers={"Authorization": f"Bearer {attacker}"}).json()["upload_url"])
                        for device in devices]
                for device in devices * 2:  # two trickling uploads per device: the token's part
                    held.append(HeldUpload(stub, md, device))
                    wait_in_flight(http, admin, len(held))
                post = silent(sockets, "POST /api/gallery/cam1/upload")
                post.sendall(f"Authorization: Bearer {attacker}\r\n"
                             "Content-Type: multipart/form-data; boundary=zz\r\n\r\n".encode())
                refused = answer(post)
                assert refused.startswith(b"HTTP/1.1 429 ") and b"this token has 6 uploads open" in refused, refused
                for url in puts:
                    put = silent(sockets, f"PUT {url.raw_path.decode()}")
                    put.sendall(b"\r\n")
                    refused = answer(put)
                    assert refused.startswith(b"HTTP/1.1 429 "), refused
                    assert b"the token that asked for this URL has 6 uploads open" in refused, refused
                # A native call names its URL in its first message, and then counts against its part.
                token = puts[0].path.rsplit("/", 1)[1]
                with pytest.raises(grpc.RpcError) as named:
                    stub.PutSignedUpload(iter([pb.PutSignedUploadRequest(device="cam1", token=token)]), timeout=30,
                                         metadata=[("content-range", "bytes */3")])  # needs no length
                assert named.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "the token that asked for this URL has 6 uploads open" in named.value.details()
                # Before that message, such calls may await it for an eighth of the total (2).
                anonymous = [stub.PutSignedUpload.future(nothing(), timeout=60) for _ in range(3)]
                assert wait_until(lambda: sum(f.done() for f in anonymous) == 1)
                [late] = [f for f in anonymous if f.done()]
                assert late.exception().code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "uploads by pre-signed URL not named in their path" in late.exception().details()
                # The token and the nameless PUTs hold 8 of 16: another device's upload is stored.
                assert admin_status(http, admin)["counts"]["uploads_in_flight"] == 6
                other = rest_upload(http, mint(devices=["cam9"]), "cam9")
                assert other.status_code == 200, other.text
            finally:
                never.set()
                for upload in held:
                    upload.release.set()
                results = [upload.future.result(timeout=30) for upload in held]
    finally:
        stop_stack(stack)
    assert all(r.success for r in results)
    assert sorted(p.name for p in stored_files(stack.data_dir)) == sorted(
        [other.json()["eventId"], *(r.event_id for r in results)])


def test_one_events_urls_are_put_by_two_streams_at_most_and_a_used_one_by_none(
    tmp_path_factory: pytest.TempPathFactory, mint: Callable[..., str]
) -> None:
    """Whoever holds one event's URLs must not take their token's whole part with silent PUTs: a
    used URL is refused before its PUT waits for a body (403), and so is what the headers alone
    refuse (the re-probe: each waited its 30 s), and one event's URLs (media and
    thumbnail) have at most two PUTs at once (a retry may overlap the one it replaces), 429 past
    them. Before, 12 PUTs of one used URL, headers only, held a 3-device token's whole part (the
    review)."""
    root = tmp_path_factory.mktemp("one-url")
    stack = start_stack(root / "data", root / "gallery.log", extra_env={
        "GALLERY_MAKE_THUMBNAILS": "false", "GALLERY_UPLOAD_FIRST_MESSAGE_SECONDS": "60",
    })
    headers = {"Authorization": f"Bearer {mint(devices=['cam1', 'cam2', 'cam3'], scope='gallery:write')}"}

    def silent_put(sockets: contextlib.ExitStack, url: httpx.URL,
                   head: bytes = b"Content-Length: 3\r\n") -> socket.socket:
        s = sockets.enter_context(socket.create_connection(("127.0.0.1", stack.http_port)))
        s.sendall(b"PUT " + url.raw_path + b" HTTP/1.1\r\nHost: gallery\r\n" + head + b"\r\n")
        return s

    def answer(s: socket.socket) -> bytes:
        s.settimeout(10)
        return s.recv(4096)

    try:
        with httpx.Client(base_url=stack.base_url, timeout=10) as http:
            used, pair = (http.get("/api/gallery/cam1/upload-url", params={"filename": "a.bin", "thumbnail": "true"},
                                   headers=headers).json() for _ in range(2))
            used, fresh, thumbnail = (httpx.URL(u) for u in (used["upload_url"], pair["upload_url"],
                                                             pair["thumbnail_upload_url"]))
            stored = http.put(used.raw_path.decode(), content=b"abc")
            assert stored.status_code == 200, stored.text
            with contextlib.ExitStack() as sockets:
                refused = answer(silent_put(sockets, used))
                assert refused.startswith(b"HTTP/1.1 403 ") and b"URL_ALREADY_USED" in refused, refused
                # So is what the headers alone refuse: a size over the limit (the thumbnail's, 10 MiB),
                # a malformed Content-Range, a range PUT of a thumbnail URL.
                for url, head, status, reason in (
                    (thumbnail, b"Content-Length: 20000000\r\n", b"413", b"UPLOAD_TOO_LARGE"),
                    (fresh, b"Content-Length: 3\r\nContent-Range: bytes 5-1/9\r\n", b"400", b"INVALID_CONTENT_RANGE"),
                    (thumbnail, b"Content-Length: 3\r\nContent-Range: bytes 0-2/9\r\n", b"400",
                     b"RESUMABLE_MEDIA_ONLY"),
                ):
                    refused = answer(silent_put(sockets, url, head))
                    assert refused.startswith(b"HTTP/1.1 " + status) and reason in refused, refused
                # Three at once of one event's URLs (Envoy may pass them on in any order): one is refused.
                puts = [silent_put(sockets, url) for url in (fresh, fresh, thumbnail)]
                assert select.select(puts, [], [], 10)[0]
                time.sleep(0.3)
                readable = select.select(puts, [], [], 0)[0]
                assert len(readable) == 1, [s.recv(4096) for s in readable]
                third = readable[0].recv(4096)
                assert third.startswith(b"HTTP/1.1 429 "), third
                assert b"the URLs of this event have 2 PUTs in progress already" in third, third
            # The dropped PUTs gave their places back: a retry of the URL is stored.
            deadline = time.monotonic() + 10
            while (retry := http.put(fresh.raw_path.decode(), content=b"def")).status_code == 429:
                assert time.monotonic() < deadline, retry.text
                time.sleep(0.1)
            assert retry.status_code == 200, retry.text
    finally:
        stop_stack(stack)
    assert sorted(p.read_bytes() for p in stored_files(stack.data_dir)) == [b"abc", b"def"]


@pytest.mark.parametrize("drops", ["two PUTs of one URL", "one PUT of each of 4 URLs"])
def test_a_silent_put_gives_its_place_to_a_retry_of_its_url(stack: Stack, mint: Callable[..., str], drops: str) -> None:
    """PUTs whose connections died without a FIN (a device out of coverage: over HTTP/1.1 nothing
    tells Envoy or the server) kept every retry at 429 until the idle limit, 120 s: two of one URL
    (its event's 2 places), or one of each of 4 URLs of a device (its token's part of 4). Once the
    URL's dead PUT has sent nothing for 5 s (REPLACE_SILENT_PUT_SECONDS), a retry takes its place
    and it is aborted (UPLOAD_REPLACED): the event holds the retry's bytes."""
    device = f"silent-put-{len(drops)}"
    headers = {"Authorization": f"Bearer {mint(devices=[device], scope='gallery:read gallery:write')}"}
    with httpx.Client(base_url=stack.base_url, timeout=10) as http, contextlib.ExitStack() as sockets:
        def new_url() -> httpx.URL:
            got = http.get(f"/api/gallery/{device}/upload-url", params={"filename": "a.bin"}, headers=headers)
            return httpx.URL(got.json()["upload_url"])

        url = new_url()
        dead_urls = [url, url] if drops.startswith("two") else [url, *(new_url() for _ in range(3))]
        dead = []
        for dead_url in dead_urls:
            s = sockets.enter_context(socket.create_connection(("127.0.0.1", stack.http_port)))
            s.sendall(b"PUT " + dead_url.raw_path + b" HTTP/1.1\r\nHost: gallery\r\nContent-Length: 6\r\n\r\nabc")
            dead.append(s)
        sent = time.monotonic()
        admin = mint(scope=ADMIN_SCOPES)  # all counted (their first bytes asked for) before the retry
        assert wait_until(lambda: admin_status(http, admin)["counts"]["uploads_in_flight"] >= len(dead), seconds=10)
        assert_429(http.put(url.raw_path.decode(), content=b"abcdef"), "TOO_MANY_UPLOADS")
        while (retry := http.put(url.raw_path.decode(), content=b"abcdef")).status_code == 429:
            assert time.monotonic() - sent < 20, retry.text
            time.sleep(0.25)
        assert retry.status_code == 200, retry.text
        assert time.monotonic() - sent > 4.5  # not before the dead PUTs were silent for 5 s
        # One dead PUT was aborted, the first URL's: Envoy ends its connection.
        readable = select.select(dead, [], [], 10)[0]
        assert len(readable) == 1 and dead.index(readable[0]) in (0, 1)
        with contextlib.suppress(ConnectionResetError):
            assert not readable[0].recv(4096).startswith(b"HTTP/1.1 2")
        event = http.get(f"/api/gallery/{device}/events/{retry.json()['eventId']}/content", headers=headers)
        assert event.status_code == 200 and event.content == b"abcdef"
    ours = [e for e in log_entries(stack) if e.get("device") == device]
    assert len([e for e in ours if e.get("message") == "this PUT replaces a silent one of its URLs"]) == 1
    assert wait_until(lambda: any(e.get("reason") == "UPLOAD_REPLACED" for e in log_entries(stack)
                                  if e.get("device") == device), seconds=10)


def test_upload_urls_and_sessions_waiting_are_bounded_per_device(limited: Stack, mint: Callable[..., str]) -> None:
    """Each unused URL and open session is a row kept for a day: a device holds at most
    GALLERY_MAX_UPLOAD_URLS_PER_DEVICE / GALLERY_MAX_UPLOAD_SESSIONS_PER_DEVICE (2 here), 429
    past them, over REST and natively through Envoy."""
    token = mint()
    headers = {"Authorization": f"Bearer {token}"}
    md = [("authorization", f"Bearer {token}")]
    with httpx.Client(base_url=limited.base_url, timeout=30) as http, \
            grpc.insecure_channel(limited.envoy_grpc_address) as channel:
        urls = [http.get("/api/gallery/lim-rows/upload-url", params={"filename": "a.jpg"}, headers=headers)
                for _ in range(3)]
        assert [r.status_code for r in urls[:2]] == [200, 200]
        assert_429(urls[2], "TOO_MANY_UPLOAD_URLS", retry_after=None)  # use some first, or let them expire
        # A used URL no longer counts.
        put = http.put(httpx.URL(urls[0].json()["upload_url"]).path, content=b"abc")
        assert put.status_code == 200, put.text
        assert http.get("/api/gallery/lim-rows/upload-url", params={"filename": "b.jpg"},
                        headers=headers).status_code == 200

        stub = gallery_pb2_grpc.GalleryServiceStub(channel)
        for upload_id in ("lim-rows-01", "lim-rows-02"):
            stub.StartUpload(pb.StartUploadRequest(device="lim-rows", name="r.bin", upload_id=upload_id), metadata=md)
        with pytest.raises(grpc.RpcError) as full:
            stub.StartUpload(pb.StartUploadRequest(device="lim-rows", name="r.bin", upload_id="lim-rows-03"),
                             metadata=md)
        assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert rich_error(full.value)[0].reason == "TOO_MANY_UPLOAD_SESSIONS"
        assert "retry-after" not in dict(full.value.trailing_metadata())
        # Starting an open one again is no new session.
        stub.StartUpload(pb.StartUploadRequest(device="lim-rows", name="r.bin", upload_id="lim-rows-02"), metadata=md)


def test_admin_status_shape_and_scope(limited: Stack, mint: Callable[..., str]) -> None:
    with httpx.Client(base_url=limited.base_url, timeout=30) as http:
        assert http.get("/api/admin/status").status_code == 401
        denied = http.get("/api/admin/status", headers={"Authorization": f"Bearer {mint()}"})
        assert denied.status_code == 403
        assert denied.json()["details"][0]["reason"] == "SCOPE_MISSING"
        # The reconciler ran at start-up; its findings are in the status.
        body = admin_status(http, mint(scope=auth.ADMIN))
    assert set(body) == {"last_reconcile", "disk", "counts", "device_storage", "database_up", "incoming"}
    assert set(body["incoming"]) == {"files", "bytes", "oldest", "scanned"}  # the first scan's
    assert body["database_up"] is True
    run = body["last_reconcile"]
    assert set(run) == {
        "started", "finished", "replica", "staging_removed", "orphan_media_removed",
        "orphan_thumbnails_removed", "expired_grants_removed", "closed_commands_removed", "deleted_captures_forgotten",
        "bytes_reclaimed", "rows_checked", "missing_media", "size_mismatch", "examples",
    }
    assert isinstance(run["started"], str) and run["started"].endswith("Z")
    assert isinstance(run["examples"], list)
    assert all(isinstance(run[k], int | float) for k in set(run) - {"started", "finished", "replica", "examples"})
    assert run["missing_media"] == 0
    assert set(body["disk"]) == {"total_bytes", "free_bytes", "min_free_bytes", "accepting_uploads"}
    assert body["disk"]["accepting_uploads"] is True
    assert body["disk"]["min_free_bytes"] == 1 << 30
    assert body["disk"]["total_bytes"] >= body["disk"]["free_bytes"] > 0
    assert set(body["counts"]) == {
        "events_stored", "events_on_device", "stored_bytes", "upload_sessions", "upload_grants",
        "uploads_in_flight", "thumbnails_pending", "pulls_open",
    }
    assert all(isinstance(v, int | float) for v in body["counts"].values())
    storage = body["device_storage"]  # no quota here: its figures are 0 (test_quota.py has one)
    assert set(storage) == {"quota_bytes", "devices_at_quota", "devices_near_quota", "largest"}
    assert (storage["quota_bytes"], storage["devices_at_quota"], storage["devices_near_quota"]) == (0, 0, 0)
    assert isinstance(storage["largest"], list) and len(storage["largest"]) <= 10
    for entry in storage["largest"]:
        assert set(entry) == {"device", "used_bytes"}
        assert isinstance(entry["device"], str) and isinstance(entry["used_bytes"], int) and entry["used_bytes"] > 0


def test_admin_status_natively(limited: Stack, mint: Callable[..., str]) -> None:
    with grpc.insecure_channel(limited.envoy_grpc_address) as channel:
        stub = admin_pb2_grpc.GalleryAdminServiceStub(channel)
        reply = stub.GetAdminStatus(admin_pb2.GetAdminStatusRequest(),
                                    metadata=[("authorization", f"Bearer {mint(scope=auth.ADMIN)}")])
        assert reply.HasField("last_reconcile") and reply.disk.total_bytes > 0
        with pytest.raises(grpc.RpcError) as denied:
            stub.GetAdminStatus(admin_pb2.GetAdminStatusRequest(),
                                metadata=[("authorization", f"Bearer {mint()}")])
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_edge_refuses_oversized_headers_and_keeps_paths_canonical(limited: Stack, mint: Callable[..., str]) -> None:
    token = {"Authorization": f"Bearer {mint()}"}
    with httpx.Client(base_url=limited.base_url, timeout=30) as http:
        assert http.get("/api/gallery/cam1/stats", headers=token).status_code == 200
        # At most 32 KiB of request headers, and at most 64 of them (envoy/envoy.yaml).
        big = http.get("/api/gallery/cam1/stats", headers={**token, "x-big": "a" * (40 << 10)})
        assert big.status_code == 431
        many = http.get("/api/gallery/cam1/stats", headers={**token, **{f"x-h{i}": "1" for i in range(70)}})
        assert many.status_code == 431
        # Merged slashes reach the same route (merge_slashes); an encoded slash is refused.
        assert http.get("/api//gallery//cam1/stats", headers=token).status_code == 200
        assert http.get("/api/gallery/cam%2F1/stats", headers=token).status_code == 400


def test_a_rest_download_whose_client_stopped_reading_is_counted_then_cancelled(
    tmp_path_factory: pytest.TempPathFactory, mint: Callable[..., str]
) -> None:
    """A REST download the server sends itself (a conditional GET: Envoy hands plain ones to its
    file server) holds a server thread: past the downloads' share it is 429 TOO_MANY_DOWNLOADS, and
    one whose client reads nothing is cancelled after GALLERY_DOWNLOAD_IDLE_SECONDS."""
    root = tmp_path_factory.mktemp("stalled")
    stack = start_stack(root / "data", root / "gallery.log", extra_env={
        "GALLERY_MAKE_THUMBNAILS": "false",
        "GALLERY_GRPC_WORKERS": "10", "GALLERY_MAX_UPLOADS_TOTAL": "2",  # a share of 1 download
        "GALLERY_DOWNLOAD_IDLE_SECONDS": "3",
    })
    headers = {"Authorization": f"Bearer {mint()}"}
    try:
        with httpx.Client(base_url=stack.base_url, timeout=30) as http:
            r = http.post("/api/gallery/dl-dev/upload", headers=headers, data={"name": "big.bin"},
                          files={"event": ("big.bin", b"x" * (64 << 20))})
            assert r.status_code == 200, r.text
            path = f"/api/gallery/dl-dev/events/{r.json()['eventId']}/content"
            conditional = {**headers, "If-None-Match": '"another"'}
            with socket.socket() as stalled:
                stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                stalled.connect(("127.0.0.1", stack.http_port))
                stalled.sendall(f"GET {path} HTTP/1.1\r\nHost: gallery\r\nAuthorization: {headers['Authorization']}"
                                f"\r\nIf-None-Match: \"another\"\r\n\r\n".encode())
                assert stalled.recv(12) == b"HTTP/1.1 200"  # then reads no more
                assert_429(http.get(path, headers=conditional), "TOO_MANY_DOWNLOADS")
                assert http.get(path, headers=headers).status_code == 200  # Envoy sends it
                deadline = time.monotonic() + 20
                while (r := http.get(path, headers=conditional)).status_code == 429:
                    assert time.monotonic() < deadline, "the stalled download was never cancelled"
                    time.sleep(0.2)
                assert r.status_code == 200 and len(r.content) == 64 << 20
    finally:
        stop_stack(stack)
    assert "download stream idle: aborting" in stack.log()


def test_requests_that_never_end_hold_no_server_thread(
    tmp_path_factory: pytest.TempPathFactory, mint: Callable[..., str]
) -> None:
    """grpcio's sync server waits for a unary request's message on one of its threads: a client
    sending headers and part of a body (no token needed) held one, and 4 took every read thread.
    Envoy passes only whole requests on (its buffer filter), so the server never waits for one."""
    root = tmp_path_factory.mktemp("unended")
    stack = start_stack(root / "data", root / "gallery.log", extra_env={
        "GALLERY_MAKE_THUMBNAILS": "false", "GALLERY_GRPC_WORKERS": "8", "GALLERY_MAX_UPLOADS_TOTAL": "3",
    })
    headers = {"Authorization": f"Bearer {mint()}"}
    try:
        with contextlib.ExitStack() as unended, httpx.Client(base_url=stack.base_url, timeout=10) as http:
            # More than every thread, on the read pool's calls and the main pool's, without a token.
            for method, path in ([("POST", "/api/gallery/stalled/checksums")] * 3
                                 + [("GET", "/api/gallery/stalled/upload/not-a-token")] * 5
                                 + [("POST", "/api/gallery/stalled/pull/evt_x")] * 10):
                s = unended.enter_context(socket.create_connection(("127.0.0.1", stack.http_port)))
                s.sendall(f"{method} {path} HTTP/1.1\r\nHost: gallery\r\nContent-Type: application/json\r\n"
                          "Content-Length: 100000\r\n\r\n{\"sha256s\": [".encode())
            time.sleep(0.5)
            assert http.get("/api/gallery/stalled/stats", headers=headers).status_code == 200
            assert http.get("/api/gallery/stalled/upload-url", params={"filename": "a.jpg"},
                            headers=headers).status_code == 200
            # Uploads are streams, passed on as they come: a large one is not held whole in Envoy.
            r = http.post("/api/gallery/stalled/upload", headers=headers, data={"name": "big.bin"},
                          files={"event": ("big.bin", b"x" * (12 << 20))})
            assert r.status_code == 200, r.text
    finally:
        stop_stack(stack)


def test_the_largest_metadata_allowed_reads_back_over_rest_and_grpc(limited: Stack, mint: Callable[..., str]) -> None:
    """Metadata of the largest shape at GALLERY_MAX_METADATA_BYTES' highest value, as many values
    as it may hold (validation.MAX_METADATA_VALUES: the array and 2,047 strings, which fill the
    bytes): its Struct fits Envoy's transcoding buffer, or a REST GET of the event answered 500,
    and a gRPC client's default 4 MiB receive limit. (A list of zeros, 5.5x its JSON as a Struct,
    was that shape until values were counted: now at most 2,048 of them.)"""
    head, tail, items = '{"a":[', "]}", MAX_METADATA_VALUES - 1
    room = MAX_METADATA_BYTES - len(head) - len(tail) - (items - 1) - 2 * items  # the strings' characters
    strings = ["x" * (room // items + (i < room % items)) for i in range(items)]
    metadata = head + ",".join(f'"{text}"' for text in strings) + tail
    assert len(metadata) == MAX_METADATA_BYTES
    token = mint()
    with httpx.Client(base_url=limited.base_url, timeout=60) as http:
        r = http.post("/api/gallery/meta1/upload", headers={"Authorization": f"Bearer {token}"},
                      files={"event": ("m.txt", b"metadata")}, data={"name": "m.txt", "metadata": metadata})
        assert r.status_code == 200, r.text
        event_id = r.json()["eventId"]
        r = http.get(f"/api/gallery/meta1/events/{event_id}", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text[:300]
        assert r.json()["metadata"]["a"] == strings
    with grpc.insecure_channel(limited.envoy_grpc_address) as channel:  # the client's default limits
        event = gallery_pb2_grpc.GalleryServiceStub(channel).GetEvent(
            pb.GetEventRequest(device="meta1", event_id=event_id),
            metadata=[("authorization", f"Bearer {token}")], timeout=30)
    assert list(event.metadata["a"]) == strings


def _answer_to_headers_only(stack: Stack, head: str, seconds: float = 5.0) -> bytes:
    """What Envoy answers to a request whose headers promise a body that never comes (b"" if
    nothing within `seconds`)."""
    with socket.create_connection(("127.0.0.1", stack.http_port)) as s:
        s.sendall(head.encode())
        s.settimeout(seconds)
        try:
            return s.recv(1 << 16)
        except TimeoutError:
            return b""


@pytest.mark.parametrize("authorization", ["", "Authorization: Bearer not-a-jwt\r\n"], ids=["none", "bad"])
@pytest.mark.parametrize("request_line", [
    "POST /api/gallery/cam1/checksums", "POST /api/gallery/cam1/pull/evt_aaaaaaaaaaaaaaaaaaaaaa",
    "DELETE /api/gallery/cam1/events/evt_aaaaaaaaaaaaaaaaaaaaaa",
])
def test_a_body_without_a_token_that_verifies_is_refused_before_it_comes(
    stack: Stack, mint: Callable[..., str], request_line: str, authorization: str,
) -> None:
    """Envoy held such a body whole (the buffer filter) before the server saw the token: a
    thousand tokenless connections sending 1 MiB bodies slowly took Envoy past its overload limit,
    and every other request got 503. Now the token is checked first (rpc/token_check.py)."""
    head = (f"{request_line} HTTP/1.1\r\nHost: gallery\r\n{authorization}Content-Type: application/json\r\n"
            "Content-Length: 1000000\r\n\r\n")
    answer = _answer_to_headers_only(stack, head)
    assert answer.startswith(b"HTTP/1.1 401 "), answer
    reason = "TOKEN_INVALID" if authorization else "TOKEN_MISSING"
    assert f'"reason":"{reason}"'.encode() in answer
    # A token that verifies: the body is waited for (the server says what the token may do).
    assert _answer_to_headers_only(stack, head.replace(
        "Host: gallery\r\n" + authorization, f"Host: gallery\r\nAuthorization: Bearer {mint()}\r\n"), 1.0) == b""


def test_the_token_refused_before_the_body_is_answered_as_the_server_answers_it(stack: Stack) -> None:
    """Same status, body and www-authenticate as the server's own refusal, natively too (its
    details), and the refusal is on the access line of Envoy's Check, not of a call that never came."""
    with httpx.Client(base_url=stack.base_url, timeout=10) as http:
        for headers, reason in (({}, "TOKEN_MISSING"), ({"Authorization": "Basic abc"}, "TOKEN_MALFORMED"),
                                ({"Authorization": "Bearer x.y.z"}, "TOKEN_INVALID")):
            by_server = http.get("/api/gallery/cam1/stats", headers=headers)  # a GET: no body, no check
            by_envoy = http.post("/api/gallery/cam1/checksums", headers=headers, json={"sha256s": []})
            assert (by_envoy.status_code, by_server.status_code) == (401, 401)
            assert by_envoy.json() == by_server.json() and by_envoy.json()["details"][0]["reason"] == reason
            assert by_envoy.headers["www-authenticate"] == by_server.headers["www-authenticate"]
            assert by_envoy.headers["content-type"] == "application/json"
    with grpc.insecure_channel(stack.envoy_grpc_address) as channel, pytest.raises(grpc.RpcError) as refused:
        gallery_pb2_grpc.GalleryServiceStub(channel).GetStats(pb.GetStatsRequest(device="cam1"), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert rich_error(refused.value)[0].reason == "TOKEN_MISSING"
    trailers = dict(refused.value.trailing_metadata())
    assert trailers["www-authenticate"] == 'Bearer realm="gallery"'
    request_id = trailers["x-request-id"]

    def lines() -> list[dict]:
        return [e for e in log_entries(stack) if e.get("request_id") == request_id and e.get("message") == "rpc"]

    assert wait_until(lines, 10)
    assert [(e["method"], e.get("token_refused")) for e in lines()] == [
        ("/envoy.service.auth.v3.Authorization/Check", "TOKEN_MISSING")]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("path", ["/api/gallery/cam1/events", "/api/gallery/cam1/upload-url?filename=a.jpg",
                                  "/api/gallery/cam1/events/evt_aaaaaaaaaaaaaaaaaaaaaa/content"])
def test_what_envoy_holds_of_a_gets_body_is_capped(stack: Stack, path: str, chunked: bool) -> None:
    """The API's GETs have none, but the transcoder read one as JSON into the request, holding up
    to a MiB, with no token checked: past envoy_config.GET_BODY_BYTES it is 413 at once."""
    piece = b'{"pageToken":"' + b"a" * envoy_config.GET_BODY_BYTES  # never ended
    framing = (f"Transfer-Encoding: chunked\r\n\r\n{len(piece):x}\r\n" if chunked
               else f"Content-Length: {1 << 20}\r\n\r\n")
    with socket.create_connection(("127.0.0.1", stack.http_port)) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: gallery\r\n{framing}".encode() + piece)
        s.settimeout(5)
        answer = s.recv(1 << 16)
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    assert b'"reason":"BODY_TOO_LARGE"' in answer


@pytest.mark.parametrize(("request_line", "refused"), [
    ("POST /gallery.v1.GalleryService/GetEventContent", b"grpc-status: 16"),  # native downloads
    ("POST /gallery.v1.GalleryService/ReadEventContent", b"grpc-status: 16"),
    ("GET /gallery.v1.GalleryService/DeleteEvent", b"grpc-status: 16"),  # a native call of any method
    ("GET /api/gallery/cam1/stats", b"grpc-status: 16"),  # gRPC on a REST read's path
    ("POST /grpc.health.v1.Health/Watch", b"grpc-status: 12"),  # answered at its headers
    ("POST /envoy.service.auth.v3.Authorization/Check", b"grpc-status: 12"),
])
def test_no_route_holds_a_body_whose_token_was_not_checked(stack: Stack, request_line: str, refused: bytes) -> None:
    """Each of these held up to 3 MiB of a tokenless body (a black-box review of the check)."""
    head = f"{request_line} HTTP/1.1\r\nHost: gallery\r\nContent-Type: application/grpc\r\n"
    answer = _answer_to_headers_only(stack, head + "Content-Length: 3000000\r\n\r\n")
    assert refused in answer, answer


@pytest.mark.parametrize("path", ["/grpc.health.v1.Health/Check", "/gallery.v1.GalleryService/GetSignedUploadStatus"])
def test_a_call_that_takes_no_token_has_at_most_16_kib_held(stack: Stack, path: str) -> None:
    """A health check and a pre-signed URL's status carry no token to check: past SMALL_BODY_BYTES
    of their body Envoy refuses them (RESOURCE_EXHAUSTED), holding no more."""
    with socket.create_connection(("127.0.0.1", stack.http_port)) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: gallery\r\nContent-Type: application/grpc\r\n"
                  f"Content-Length: 3000000\r\n\r\n".encode() + b"\x00" * (envoy_config.SMALL_BODY_BYTES + 1024))
        s.settimeout(5)
        answer = s.recv(1 << 16)
    assert b"grpc-status: 8" in answer, answer
