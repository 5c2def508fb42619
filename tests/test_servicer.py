"""GalleryServicer in isolation with grpcio-testing: messages in, domain calls, messages out.

There is no interceptor here, so a domain error is not mapped to its status: grpc_testing reports
any exception escaping the servicer as UNKNOWN with the exception text. The status mapping is
covered by test_grpc_server.py, which runs the real server.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import time
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Any

import grpc
import grpc_testing
import pytest
from google.api import httpbody_pb2
from google.protobuf import message_factory, struct_pb2

from gallery.v1 import gallery_pb2 as pb
from gallery_server import auth
from gallery_server.devices import Devices
from gallery_server.rpc.chunks import Encoded
from gallery_server.rpc.servicer import GalleryServicer
from gallery_server.service import Gallery
from gallery_server.signed_urls import SignedUploads
from gallery_server.uploads import Uploader

from .conftest import stored_files, wait_until

SERVICE = pb.DESCRIPTOR.services_by_name["GalleryService"]
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x07" * 300
BOUNDARY = "XyZzY-boundary"


def method(name: str) -> Any:
    return SERVICE.methods_by_name[name]


@pytest.fixture
def database_url(tmp_path: pathlib.Path) -> str:
    """SQLite only: the servicer only translates messages, the domain below it is tested on both
    databases (tests/unit/test_service.py, test_signed_urls.py) and so is the real server
    (test_grpc_server.py)."""
    return f"sqlite:///{tmp_path / 'gallery.db'}"


@pytest.fixture
def make_server(gallery: Gallery) -> Callable[[auth.Principal], grpc_testing.Server]:
    def make(who: auth.Principal) -> grpc_testing.Server:
        servicer = GalleryServicer(gallery, SignedUploads(gallery), Devices(gallery), principal=lambda: who)
        return grpc_testing.server_from_dictionary({SERVICE: servicer}, grpc_testing.strict_real_time())

    return make


@pytest.fixture
def server(make_server, principal: auth.Principal) -> grpc_testing.Server:  # type: ignore[no-untyped-def]
    return make_server(principal)


def unary(server: grpc_testing.Server, name: str, request: Any) -> tuple[Any, grpc.StatusCode, str]:
    rpc = server.invoke_unary_unary(method(name), (), request, None)
    response, _, code, details = rpc.termination()
    return response, code, details


def stream_unary(server: grpc_testing.Server, name: str, requests: Iterable[Any],
                 metadata: tuple = ()) -> tuple[Any, grpc.StatusCode, str]:
    rpc = server.invoke_stream_unary(method(name), metadata, None)
    for request in requests:
        rpc.send_request(request)
    rpc.requests_closed()
    response, _, code, details = rpc.termination()
    return response, code, details


def list_events(server: grpc_testing.Server, request: pb.ListEventsRequest) -> tuple[list[pb.Event], grpc.StatusCode]:
    rpc = server.invoke_unary_stream(method("ListEvents"), (), request, None)
    events = []
    while True:
        try:
            events.append(rpc.take_response())
        except ValueError:  # "No more responses!" once the RPC has terminated
            break
    _, code, _ = rpc.termination()
    return events, code


def header(device: str = "cam1", name: str = "photo.png", **kwargs: Any) -> pb.UploadEventRequest:
    return pb.UploadEventRequest(header=pb.UploadHeader(device=device, name=name, **kwargs))


def media(data: bytes) -> pb.UploadEventRequest:
    return pb.UploadEventRequest(media_chunk=data)


def thumb(data: bytes) -> pb.UploadEventRequest:
    return pb.UploadEventRequest(thumbnail_chunk=data)


def finish(**kwargs: Any) -> pb.UploadEventRequest:
    return pb.UploadEventRequest(finish=pb.UploadFinish(**kwargs))


def chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def upload(server: grpc_testing.Server, data: bytes = PNG, thumbnail: bytes | None = None,
           **header_kwargs: Any) -> str:
    requests = [header(**header_kwargs)] + [media(c) for c in chunks(data, 100)]
    if thumbnail is not None:
        requests += [thumb(c) for c in chunks(thumbnail, 100)]
    requests.append(finish())
    response, code, details = stream_unary(server, "UploadEvent", requests)
    assert code is grpc.StatusCode.OK, details
    assert response.success
    return response.event_id


def assert_failed(code: grpc.StatusCode, details: str, *fragments: str) -> None:
    assert code is not grpc.StatusCode.OK
    assert code is grpc.StatusCode.UNKNOWN  # an unmapped exception, as grpc_testing reports it
    for fragment in fragments:
        assert fragment in details, details


# -- reads ----------------------------------------------------------------------------------------


def test_get_device_paths(server: grpc_testing.Server, gallery: Gallery) -> None:
    response, code, _ = unary(server, "GetDevicePaths", pb.GetDevicePathsRequest(device="device123"))
    assert code is grpc.StatusCode.OK
    root = gallery.settings.data_dir / "gallery" / "device123"
    assert response == pb.GetDevicePathsResponse(
        success=True, paths=pb.DevicePaths(incoming=str(root / "incoming"), thumbnails=str(root / "thumbnails"))
    )
    assert (root / "incoming").is_dir() and (root / "thumbnails").is_dir()


def test_get_device_paths_invalid_device(server: grpc_testing.Server, gallery: Gallery) -> None:
    _, code, details = unary(server, "GetDevicePaths", pb.GetDevicePathsRequest(device="../etc"))
    assert_failed(code, details, "device must match")
    assert not (gallery.settings.data_dir / "etc").exists()


def test_get_stats_empty(server: grpc_testing.Server) -> None:
    response, code, _ = unary(server, "GetStats", pb.GetStatsRequest(device="cam1"))
    assert code is grpc.StatusCode.OK
    assert response == pb.GetStatsResponse(total_events=0, total_size=0)
    assert dict(response.by_type) == {}


def test_get_stats(server: grpc_testing.Server) -> None:
    upload(server, PNG)
    upload(server, JPEG, name="b.jpg")
    upload(server, b"%PDF-1.4\n" + b"z" * 10, name="c.pdf")
    upload(server, b"elsewhere", device="cam2", name="x.bin")
    response, code, _ = unary(server, "GetStats", pb.GetStatsRequest(device="cam1"))
    assert code is grpc.StatusCode.OK
    assert response.total_events == 3
    assert response.total_size == len(PNG) + len(JPEG) + 19
    assert dict(response.by_type) == {
        "image": pb.TypeStats(count=2, size=len(PNG) + len(JPEG)),
        "document": pb.TypeStats(count=1, size=19),
    }


def test_list_events(server: grpc_testing.Server) -> None:
    ids = [upload(server, PNG, name=f"{i}.png") for i in range(3)]
    doc = upload(server, b"%PDF-1.4\n", name="d.pdf")
    events, code = list_events(server, pb.ListEventsRequest(device="cam1"))
    assert code is grpc.StatusCode.OK
    assert {e.id for e in events} == {*ids, doc}
    assert [(e.created.ToDatetime(), e.id) for e in events] == sorted(
        ((e.created.ToDatetime(), e.id) for e in events), reverse=True
    )
    for event in events:
        assert not event.HasField("metadata")  # ListEvents leaves metadata unset
        assert event.created.seconds > 0
    image = next(e for e in events if e.id == ids[0])
    assert (image.name, image.media_type, image.mime_type, image.size, image.sha256, image.has_thumbnail) == (
        "0.png", "image", "image/png", float(len(PNG)), hashlib.sha256(PNG).hexdigest(), False
    )
    events, _ = list_events(server, pb.ListEventsRequest(device="cam1", media_type="document"))
    assert [e.id for e in events] == [doc]
    events, _ = list_events(server, pb.ListEventsRequest(device="cam1", limit=2))
    assert len(events) == 2
    page2, _ = list_events(server, pb.ListEventsRequest(device="cam1", limit=2, offset=2))
    assert len(page2) == 2 and not {e.id for e in events} & {e.id for e in page2}
    events, _ = list_events(server, pb.ListEventsRequest(device="cam1", offset=4))
    assert events == []


def test_list_events_invalid(server: grpc_testing.Server) -> None:
    for request, fragment in [
        (pb.ListEventsRequest(device="cam1", limit=0), "limit"),  # explicitly 0 is not "unset"
        (pb.ListEventsRequest(device="cam1", limit=1001), "limit"),
        (pb.ListEventsRequest(device="cam1", offset=-1), "offset"),
        (pb.ListEventsRequest(device="cam1", media_type="pictures"), "media_type"),
        (pb.ListEventsRequest(device=""), "device"),
    ]:
        rpc = server.invoke_unary_stream(method("ListEvents"), (), request, None)
        _, code, details = rpc.termination()
        assert_failed(code, details, fragment)


def test_get_event_with_metadata(server: grpc_testing.Server) -> None:
    metadata = struct_pb2.Struct()
    metadata.update({"gps": {"lat": 1.5, "lon": -2}, "tags": ["a", "b"], "ok": True, "none": None})
    event_id = upload(server, PNG, JPEG, name="cafe\u0301.png", metadata=metadata)
    response, code, _ = unary(server, "GetEvent", pb.GetEventRequest(device="cam1", event_id=event_id))
    assert code is grpc.StatusCode.OK
    assert response.id == event_id
    assert response.name == "caf\u00e9.png"
    assert response.has_thumbnail
    assert response.metadata == metadata


def test_get_event_empty_metadata_is_present(server: grpc_testing.Server) -> None:
    event_id = upload(server, PNG)
    response, _, _ = unary(server, "GetEvent", pb.GetEventRequest(device="cam1", event_id=event_id))
    assert response.HasField("metadata")
    assert response.metadata == struct_pb2.Struct()


def test_get_event_not_found(server: grpc_testing.Server) -> None:
    _, code, details = unary(server, "GetEvent", pb.GetEventRequest(device="cam1", event_id="evt_" + "a" * 22))
    assert_failed(code, details, "not found")


# -- delete ---------------------------------------------------------------------------------------


def test_delete_event(server: grpc_testing.Server, gallery: Gallery) -> None:
    event_id = upload(server, PNG, JPEG)
    assert len(stored_files(gallery.settings.data_dir)) == 2
    response, code, _ = unary(server, "DeleteEvent", pb.DeleteEventRequest(device="cam1", event_id=event_id))
    assert code is grpc.StatusCode.OK
    assert response == pb.DeleteEventResponse(success=True)
    assert stored_files(gallery.settings.data_dir) == []
    _, code, details = unary(server, "DeleteEvent", pb.DeleteEventRequest(device="cam1", event_id=event_id))
    assert_failed(code, details, "not found")


def test_permission_denied_before_existence(make_server, server: grpc_testing.Server) -> None:  # type: ignore[no-untyped-def]
    event_id = upload(server, PNG)
    outsider = make_server(auth.Principal("o", frozenset({"cam2"}), frozenset({auth.READ, auth.WRITE})))
    for eid in (event_id, "evt_" + "b" * 22):
        for name, request in (
            ("GetEvent", pb.GetEventRequest(device="cam1", event_id=eid)),
            ("DeleteEvent", pb.DeleteEventRequest(device="cam1", event_id=eid)),
        ):
            _, code, details = unary(outsider, name, request)
            assert_failed(code, details, "does not grant device")
    _, code, details = unary(outsider, "GetStats", pb.GetStatsRequest(device="cam1"))
    assert_failed(code, details, "does not grant device")
    _, code, _ = unary(server, "GetEvent", pb.GetEventRequest(device="cam1", event_id=event_id))
    assert code is grpc.StatusCode.OK


def test_read_only_principal_cannot_write(make_server, gallery: Gallery) -> None:  # type: ignore[no-untyped-def]
    reader = make_server(auth.Principal("r", frozenset({"*"}), frozenset({auth.READ})))
    _, code, details = stream_unary(reader, "UploadEvent", [header(), media(PNG), finish()])
    assert_failed(code, details, "gallery:write")
    _, code, details = unary(reader, "CreateUploadUrl", pb.CreateUploadUrlRequest(device="cam1", filename="a"))
    assert_failed(code, details, "gallery:write")
    assert stored_files(gallery.settings.data_dir) == []


# -- native streaming upload ----------------------------------------------------------------------


def test_upload_event_roundtrip(server: grpc_testing.Server, gallery: Gallery, principal: auth.Principal) -> None:
    requests = [header(size=len(PNG), sha256=hashlib.sha256(PNG).hexdigest(), media_type="document")]
    # Media and thumbnail chunks interleaved, in any order.
    media_chunks, thumb_chunks = chunks(PNG, 97), chunks(JPEG, 41)
    while media_chunks or thumb_chunks:
        if thumb_chunks:
            requests.append(thumb(thumb_chunks.pop(0)))
        if media_chunks:
            requests.append(media(media_chunks.pop(0)))
    requests.append(finish(size=len(PNG), sha256=hashlib.sha256(PNG).hexdigest()))
    response, code, details = stream_unary(server, "UploadEvent", requests)
    assert code is grpc.StatusCode.OK, details
    assert response.success and response.event_id.startswith("evt_")
    event = gallery.get_event(principal, "cam1", response.event_id)
    assert (event.size, event.sha256, event.media_type, event.has_thumbnail) == (
        len(PNG), hashlib.sha256(PNG).hexdigest(), "document", True
    )
    assert gallery.storage.media_path("cam1", event.id).read_bytes() == PNG
    assert gallery.storage.thumbnail_path("cam1", event.id).read_bytes() == JPEG
    assert list(gallery.storage.staging_root.iterdir()) == []


def test_an_empty_thumbnail_chunk_is_no_thumbnail(server: grpc_testing.Server, gallery: Gallery,
                                                  principal: auth.Principal) -> None:
    """As an empty multipart part: the event has no thumbnail (not a 0-byte one) and, an image,
    is queued for a server-made one."""
    response, code, details = stream_unary(
        server, "UploadEvent", [header(), thumb(b""), media(PNG), thumb(b""), finish()])
    assert code is grpc.StatusCode.OK, details
    event = gallery.get_event(principal, "cam1", response.event_id)
    assert (event.has_thumbnail, event.thumbnail_state) == (False, "pending")
    assert not gallery.storage.thumbnail_path("cam1", event.id).exists()
    assert list(gallery.storage.staging_root.iterdir()) == []


def test_upload_event_header_only_is_an_empty_file(server: grpc_testing.Server, gallery: Gallery,
                                                   principal: auth.Principal) -> None:
    response, code, _ = stream_unary(server, "UploadEvent", [header(name="empty.txt"), finish()])
    assert code is grpc.StatusCode.OK
    event = gallery.get_event(principal, "cam1", response.event_id)
    assert event.size == 0 and event.sha256 == hashlib.sha256(b"").hexdigest()


UPLOAD_FAILURES = [
    ([], "no message"),
    ([media(PNG), finish()], "first message"),
    ([thumb(JPEG), header(), finish()], "first message"),
    ([header(), media(PNG), header(), finish()], "only the first"),
    ([header(), media(PNG), pb.UploadEventRequest(), finish()], "must carry one of"),
    ([header(size=len(PNG) - 1), media(PNG), finish()], "declared size"),
    ([header(size=len(PNG) + 1), media(PNG), finish()], "declared"),
    ([header(), media(PNG), finish(size=len(PNG) + 1)], "declared"),
    ([header(size=len(PNG)), media(PNG), finish(size=len(PNG) + 1)], "disagree"),
    ([header(sha256="0" * 64), media(PNG), finish()], "sha256"),
    ([header(), media(PNG), finish(sha256="0" * 64)], "sha256"),
    ([header(sha256=hashlib.sha256(PNG).hexdigest()), media(PNG), finish(sha256="1" * 64)], "disagree"),
    ([header(sha256="ABC"), media(PNG), finish()], "sha256"),
    ([header(), media(PNG), finish(sha256="ABC")], "sha256"),
    ([header(name=""), media(PNG), finish()], "name is required"),
    ([header(name="a\nb"), media(PNG), finish()], "control"),
    ([header(media_type="photo"), media(PNG), finish()], "media_type"),
    ([header(device="a/b"), media(PNG), finish()], "device must match"),
    # A stream that simply stops may have been cut short: nothing is stored without a finish,
    # whatever the header declared (the finish check comes before the size and sha256 checks).
    ([header(), media(PNG)], "without a finish message"),
    ([header()], "without a finish message"),
    ([header(size=len(PNG)), media(PNG)], "without a finish message"),
    ([header(size=len(PNG), sha256=hashlib.sha256(PNG).hexdigest()), media(PNG)], "without a finish message"),
    ([header(size=len(PNG) + 1), media(PNG)], "without a finish message"),
    ([header(size=0)], "without a finish message"),
    # Media beyond a declared size is refused as it arrives, finish or not.
    ([header(size=len(PNG) - 1), media(PNG)], "larger than the declared size"),
    ([header(), media(PNG), finish(), media(b"more")], "nothing may follow the finish"),
    ([header(), finish(), finish()], "nothing may follow the finish"),
    ([header(), finish(), header()], "nothing may follow the finish"),
]


def test_upload_event_failures_leave_nothing(server: grpc_testing.Server, gallery: Gallery,
                                             principal: auth.Principal) -> None:
    for requests, fragment in UPLOAD_FAILURES:
        if len(requests) > 1:
            requests = requests[:1] + [thumb(JPEG)] + requests[1:]
        _, code, details = stream_unary(server, "UploadEvent", requests)
        assert_failed(code, details, fragment)
        assert stored_files(gallery.settings.data_dir) == [], fragment
    assert gallery.list_events(principal, "cam1") == []


def test_upload_event_declared_size_without_finish(server: grpc_testing.Server, gallery: Gallery,
                                                   principal: auth.Principal) -> None:
    # A size declared up front proves only the media complete, not the thumbnail nor that the
    # client meant to end there: the finish message is required all the same.
    for requests in (
        [header(size=len(PNG)), media(PNG)],
        [header(size=len(PNG)), media(PNG), thumb(JPEG[:100])],  # the rest of the thumbnail never came
        [header(size=len(PNG)), thumb(JPEG), media(PNG)],
    ):
        _, code, details = stream_unary(server, "UploadEvent", requests)
        assert_failed(code, details, "without a finish message")
        assert stored_files(gallery.settings.data_dir) == []
    assert gallery.list_events(principal, "cam1") == []
    # The same stream with its finish is stored.
    response, code, details = stream_unary(server, "UploadEvent", [header(size=len(PNG)), media(PNG), finish()])
    assert code is grpc.StatusCode.OK, details
    assert gallery.get_event(principal, "cam1", response.event_id).size == len(PNG)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_upload_event_non_finite_metadata(server: grpc_testing.Server, gallery: Gallery, value: float) -> None:
    metadata = struct_pb2.Struct()
    metadata.update({"ok": 1, "bad": value})
    _, code, details = stream_unary(server, "UploadEvent", [header(metadata=metadata), media(PNG), finish()])
    assert_failed(code, details, "metadata numbers must be finite")
    assert stored_files(gallery.settings.data_dir) == []


def test_upload_event_size_and_sha256_in_finish(server: grpc_testing.Server, gallery: Gallery,
                                                principal: auth.Principal) -> None:
    digest = hashlib.sha256(PNG).hexdigest()
    for requests in (
        [header(), media(PNG), finish(size=len(PNG), sha256=digest)],
        [header(size=len(PNG), sha256=digest), media(PNG), finish(size=len(PNG), sha256=digest)],
        [header(sha256=digest), media(PNG), finish()],
    ):
        response, code, details = stream_unary(server, "UploadEvent", requests)
        assert code is grpc.StatusCode.OK, details
        assert gallery.get_event(principal, "cam1", response.event_id).sha256 == digest


def test_upload_event_metadata_too_large(make_server, gallery: Gallery, principal: auth.Principal) -> None:  # type: ignore[no-untyped-def]
    metadata = struct_pb2.Struct()
    metadata.update({"blob": "x" * (gallery.settings.max_metadata_bytes + 1)})
    requests = [header(metadata=metadata), media(PNG), finish()]
    _, code, details = stream_unary(make_server(principal), "UploadEvent", requests)
    assert_failed(code, details, "metadata is larger")
    assert stored_files(gallery.settings.data_dir) == []


@pytest.mark.parametrize("declared_size", [None, len(PNG)], ids=["no-size", "media-size"])
def test_upload_event_client_cancel_leaves_nothing(server: grpc_testing.Server, gallery: Gallery,
                                                   principal: auth.Principal, declared_size: int | None) -> None:
    # With media-size all the declared media has arrived when the client cancels during its thumbnail.
    rpc = server.invoke_stream_unary(method("UploadEvent"), (), None)
    rpc.send_request(header() if declared_size is None else header(size=declared_size))
    rpc.send_request(media(PNG))
    rpc.send_request(thumb(JPEG))
    deadline = time.monotonic() + 5
    while len(stored_files(gallery.settings.data_dir)) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(stored_files(gallery.settings.data_dir)) == 2  # staged while in flight
    rpc.cancel()
    while stored_files(gallery.settings.data_dir) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stored_files(gallery.settings.data_dir) == []
    assert gallery.list_events(principal, "cam1") == []


# -- REST multipart form --------------------------------------------------------------------------


def form_body(**fields: bytes) -> bytes:
    out = b""
    for name, value in fields.items():
        out += f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; filename="f"\r\n\r\n'.encode()
        out += value + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def form_requests(body: bytes, size: int, device: str = "cam1",
                  content_type: str = f"multipart/form-data; boundary={BOUNDARY}") -> list:
    pieces = chunks(body, size)
    first = pb.UploadEventFormRequest(device=device, http_body=httpbody_pb2.HttpBody(
        content_type=content_type, data=pieces[0]))
    return [first] + [pb.UploadEventFormRequest(http_body=httpbody_pb2.HttpBody(data=p)) for p in pieces[1:]]


def test_upload_event_form(server: grpc_testing.Server, gallery: Gallery, principal: auth.Principal) -> None:
    body = form_body(event=PNG, media_type=b"image", name=b"form.png", thumbnail=JPEG,
                     has_thumbnail=b"true", metadata=b'{"k": [1, 2]}')
    response, code, details = stream_unary(server, "UploadEventForm", form_requests(body, 33))
    assert code is grpc.StatusCode.OK, details
    event = gallery.get_event(principal, "cam1", response.event_id)
    assert (event.name, event.size, event.has_thumbnail, event.metadata_json) == (
        "form.png", len(PNG), True, '{"k":[1,2]}'
    )
    assert list(gallery.storage.staging_root.iterdir()) == []


def test_upload_event_form_content_length(server: grpc_testing.Server, gallery: Gallery) -> None:
    body = form_body(event=PNG, name=b"form.png")
    for declared in (len(body) - 1, len(body) + 1):
        _, code, details = stream_unary(server, "UploadEventForm", form_requests(body, 40),
                                        ((LENGTH, str(declared)),))
        assert_failed(code, details, f"of {declared} body bytes")
        assert stored_files(gallery.settings.data_dir) == []
    response, code, details = stream_unary(server, "UploadEventForm", form_requests(body, 40),
                                           ((LENGTH, str(len(body))),))
    assert code is grpc.StatusCode.OK, details


def test_upload_event_form_failures(server: grpc_testing.Server, gallery: Gallery) -> None:
    for body, content_type, fragment in [
        (form_body(event=PNG, name=b"a", extra=b"x" * 70_000), None, "'extra' is longer than"),
        (form_body(event=PNG, name=b"a")[:-10], None, "closing boundary"),
        (form_body(event=PNG, name=b"a"), "application/json", "multipart/form-data"),
        (form_body(name=b"a"), None, "event file is missing"),
        (form_body(event=PNG, name=b"a", has_thumbnail=b"true"), None, "no thumbnail"),
        (form_body(event=PNG, name=b"a", metadata=b"[1]"), None, "JSON object"),
    ]:
        kwargs = {"content_type": content_type} if content_type else {}
        _, code, details = stream_unary(server, "UploadEventForm", form_requests(body, 50, **kwargs))
        assert_failed(code, details, fragment)
        assert stored_files(gallery.settings.data_dir) == [], fragment


# -- signed URLs ----------------------------------------------------------------------------------


LENGTH = "x-gallery-content-length"  # Envoy passes the HTTP Content-Length as this metadata


def put(server: grpc_testing.Server, device: str, url: str, data: bytes,
        length: int | None = -1) -> tuple[Any, grpc.StatusCode, str]:
    """A transcoded PUT; `length` is the declared Content-Length (default: the body's, None: absent)."""
    declared = len(data) if length == -1 else length
    metadata = () if declared is None else ((LENGTH, str(declared)),)
    return stream_unary(server, "PutSignedUpload", put_requests(device, url, data), metadata)


def put_requests(device: str, url: str, data: bytes, size: int = 64) -> list:
    token = url.rsplit("/", 1)[1]
    pieces = chunks(data, size) or [b""]
    first = pb.PutSignedUploadRequest(device=device, token=token, http_body=httpbody_pb2.HttpBody(data=pieces[0]))
    return [first] + [pb.PutSignedUploadRequest(http_body=httpbody_pb2.HttpBody(data=p)) for p in pieces[1:]]


@pytest.mark.parametrize("declared", ["\u00b2", "\u0661\u0662"], ids=["superscript-two", "arabic-indic-12"])
def test_a_declared_length_in_other_digits_than_ascii_is_none(server: grpc_testing.Server, declared: str) -> None:
    """On the direct port the header is the client's own, read before any token: "²" passed
    str.isdigit() and failed int() (INTERNAL, and an ERROR traceback anyone could write), "١٢"
    read as 12. Neither is a length: the PUT is refused as one without (LENGTH_REQUIRED, 411)."""
    urls, code, _ = unary(server, "CreateUploadUrl", pb.CreateUploadUrlRequest(device="cam1", filename="d.png"))
    assert code is grpc.StatusCode.OK
    _, _, details = stream_unary(server, "PutSignedUpload", put_requests("cam1", urls.upload_url, PNG),
                                 ((LENGTH, declared),))
    assert "a PUT upload needs a Content-Length header" in details  # no interceptor here to map it


def test_create_upload_url_and_put(server: grpc_testing.Server, gallery: Gallery, principal: auth.Principal) -> None:
    response, code, _ = unary(server, "CreateUploadUrl",
                              pb.CreateUploadUrlRequest(device="cam1", filename="signed.png", thumbnail=True))
    assert code is grpc.StatusCode.OK
    assert response.success and response.event_id.startswith("evt_")
    assert response.HasField("thumbnail_upload_url")
    assert response.expires_at.seconds > time.time()
    result, code, details = put(server, "cam1", response.upload_url, PNG)
    assert code is grpc.StatusCode.OK, details
    assert result == pb.UploadEventResponse(success=True, event_id=response.event_id)
    result, code, _ = put(server, "cam1", response.thumbnail_upload_url, JPEG)
    assert code is grpc.StatusCode.OK
    event = gallery.get_event(principal, "cam1", response.event_id)
    assert (event.name, event.size, event.has_thumbnail) == ("signed.png", len(PNG), True)
    # Used once: a second PUT of either URL is refused.
    for url in (response.upload_url, response.thumbnail_upload_url):
        _, code, details = put(server, "cam1", url, b"again")
        assert_failed(code, details, "already been used")
    _, code, details = put(server, "cam2", response.upload_url, b"x")
    assert_failed(code, details, "another device")


def test_resumable_writes_take_one_upload_slot(gallery: Gallery, principal: auth.Principal) -> None:
    """With one upload per device, a WriteUpload and a ranged PUT still store: the session's
    writer holds the device's one slot, and nothing around it takes a second."""
    single = Gallery(dataclasses.replace(gallery.settings, max_uploads_per_device=1), gallery.db, gallery.storage)
    server = grpc_testing.server_from_dictionary(
        {SERVICE: GalleryServicer(single, SignedUploads(single), Devices(single), principal=lambda: principal)},
        grpc_testing.strict_real_time(),
    )
    _, code, details = unary(server, "StartUpload",
                             pb.StartUploadRequest(device="cam1", name="a.png", upload_id="one-slot-01"))
    assert code is grpc.StatusCode.OK, details
    written, code, details = stream_unary(server, "WriteUpload", [pb.WriteUploadRequest(
        device="cam1", upload_id="one-slot-01", write_offset=0, data=PNG, finish_write=True)])
    assert code is grpc.StatusCode.OK, details
    assert written.event_id
    urls, _, _ = unary(server, "CreateUploadUrl", pb.CreateUploadUrlRequest(device="cam1", filename="b.png"))
    ranged = ((LENGTH, str(len(PNG))), ("content-range", f"bytes 0-{len(PNG) - 1}/{len(PNG)}"))
    stored, code, details = stream_unary(server, "PutSignedUpload", put_requests("cam1", urls.upload_url, PNG), ranged)
    assert code is grpc.StatusCode.OK, details
    assert stored.event_id == urls.event_id
    assert single.slots.in_flight == 0
    assert gallery.storage.media_path("cam1", urls.event_id).read_bytes() == PNG


def test_a_put_counts_against_the_token_that_asked_for_its_url(gallery: Gallery) -> None:
    """A PUT takes a place of the uploads of the token that asked for its URL: known from the
    REST path Envoy keeps before anything is read, else from the first message (a native call).
    Past that token's part, 429 TOO_MANY_UPLOADS, and the URL stays unused."""
    single = Gallery(dataclasses.replace(gallery.settings, max_uploads_per_device=1), gallery.db, gallery.storage)
    owner = auth.Principal("owner", frozenset({"cam1"}), frozenset({auth.READ, auth.WRITE}), token_id="ab" * 16)
    server = grpc_testing.server_from_dictionary(
        {SERVICE: GalleryServicer(single, SignedUploads(single), Devices(single), principal=lambda: owner)},
        grpc_testing.strict_real_time(),
    )
    urls = [unary(server, "CreateUploadUrl", pb.CreateUploadUrlRequest(device="cam1", filename="a.png"))[0].upload_url
            for _ in range(2)]

    def put_at(url: str, path: str | None = None) -> tuple[Any, grpc.StatusCode, str]:
        metadata: tuple = ((LENGTH, str(len(PNG))),)
        if path is not None:
            metadata += (("x-envoy-original-path", urllib.parse.urlsplit(path).path),)
        return stream_unary(server, "PutSignedUpload", put_requests("cam1", url, PNG), metadata)

    release = single.slots.hold(Uploader.of(owner))  # the owner's one upload, in flight
    for path in (None, urls[0]):
        _, code, details = put_at(urls[0], path)  # the status is the interceptor's (e2e)
        assert_failed(code, details, "the token that asked for this URL has 1 uploads open")
    release()
    _, code, details = put_at(urls[0], urls[1])  # counted as the path's URL, but not that one
    assert_failed(code, details, "not the one in the request's path")
    # Given back when the RPC ends (grpc_testing runs its callbacks on a thread of their own).
    assert wait_until(lambda: single.slots.counted_by_token == 0)
    assert stored_files(gallery.settings.data_dir) == []
    for url, path in ((urls[0], None), (urls[1], urls[1])):
        stored, code, details = put_at(url, path)
        assert code is grpc.StatusCode.OK, details
        assert single.storage.media_path("cam1", stored.event_id).read_bytes() == PNG
    single.slots.hold(Uploader.of(owner))()  # every PUT gave its place back


def test_create_upload_url_without_thumbnail(server: grpc_testing.Server) -> None:
    response, code, _ = unary(server, "CreateUploadUrl", pb.CreateUploadUrlRequest(device="cam1", filename="a"))
    assert code is grpc.StatusCode.OK
    assert not response.HasField("thumbnail_upload_url")


def test_failed_put_can_be_retried(make_server, gallery: Gallery, principal: auth.Principal) -> None:  # type: ignore[no-untyped-def]
    small = dataclasses.replace(gallery.settings, max_thumbnail_bytes=100)
    tiny = Gallery(small, gallery.db, gallery.storage)
    server = grpc_testing.server_from_dictionary(
        {SERVICE: GalleryServicer(tiny, SignedUploads(tiny), Devices(tiny), principal=lambda: principal)},
        grpc_testing.strict_real_time(),
    )
    response, _, _ = unary(server, "CreateUploadUrl",
                           pb.CreateUploadUrlRequest(device="cam1", filename="a.png", thumbnail=True))
    _, code, details = put(server, "cam1", response.thumbnail_upload_url, b"t" * 101)
    assert_failed(code, details, "thumbnail is larger than 100")  # the body is a thumbnail
    assert stored_files(gallery.settings.data_dir) == []
    _, code, _ = put(server, "cam1", response.thumbnail_upload_url, b"t" * 100)
    assert code is grpc.StatusCode.OK


def test_put_needs_a_content_length_and_all_of_the_body(server: grpc_testing.Server, gallery: Gallery,
                                                        principal: auth.Principal) -> None:
    response, _, _ = unary(server, "CreateUploadUrl", pb.CreateUploadUrlRequest(device="cam1", filename="a.png"))
    _, code, details = put(server, "cam1", response.upload_url, PNG, length=None)
    assert_failed(code, details, "Content-Length")
    for declared in (len(PNG) + 1, len(PNG) - 1, 0):
        _, code, details = put(server, "cam1", response.upload_url, PNG, length=declared)
        assert_failed(code, details, f"of {declared} body bytes")
        assert stored_files(gallery.settings.data_dir) == []
    assert gallery.list_events(principal, "cam1") == []
    # Each failed PUT gave the URL back: a complete one still works.
    _, code, details = put(server, "cam1", response.upload_url, PNG)
    assert code is grpc.StatusCode.OK, details


# -- downloads ------------------------------------------------------------------------------------


def download(server: grpc_testing.Server, name: str, request: Any,
             metadata: tuple = ()) -> tuple[list[Any], dict[str, str], grpc.StatusCode]:
    rpc = server.invoke_unary_stream(method(name), metadata, request, None)
    try:
        initial = dict(rpc.initial_metadata())
    except ValueError:  # failed before sending any
        initial = {}
    # grpc_testing does not serialize: decode what the interceptor's serializer would send as is.
    response_type = message_factory.GetMessageClass(SERVICE.methods_by_name[name].output_type)
    messages = []
    while True:
        try:
            message = rpc.take_response()
        except ValueError:
            break
        if isinstance(message, Encoded):
            message = response_type.FromString(message.wire)
        messages.append(message)
    _, code, _ = rpc.termination()
    return messages, initial, code


def test_get_event_content_headers_in_and_out(server: grpc_testing.Server) -> None:
    data = PNG * 1500  # > 1 MiB: two messages
    event_id = upload(server, data, name="ü.png")
    request = pb.GetEventContentRequest(device="cam1", event_id=event_id)
    etag = f'"{hashlib.sha256(data).hexdigest()}"'

    messages, initial, code = download(server, "GetEventContent", request)
    assert code is grpc.StatusCode.OK
    assert [len(m.data) for m in messages] == [1 << 20, len(data) - (1 << 20)]
    assert [m.content_type for m in messages] == ["image/png", ""]  # the first names the type
    assert initial["x-http-status"] == "200" and initial["etag"] == etag
    assert initial["content-disposition"] == "attachment; filename=\"_.png\"; filename*=UTF-8''%C3%BC.png"

    messages, initial, _ = download(server, "GetEventContent", request, (("range", "bytes=-3"),))
    assert b"".join(m.data for m in messages) == data[-3:]
    size = len(data)
    assert (initial["x-http-status"], initial["content-range"]) == ("206", f"bytes {size - 3}-{size - 1}/{size}")

    # Repeated metadata is one list, as repeated HTTP headers are.
    messages, initial, _ = download(server, "GetEventContent", request,
                                    (("if-none-match", '"a"'), ("if-none-match", etag)))
    assert initial["x-http-status"] == "304"
    assert [(m.content_type, m.data) for m in messages] == [("image/png", b"")]  # one empty message

    messages, initial, _ = download(server, "GetEventContent", request, (("range", "bytes=-0"),))
    assert initial["x-http-status"] == "416" and [m.data for m in messages] == [b""]


def test_read_event_content(server: grpc_testing.Server) -> None:
    event_id = upload(server, PNG)
    messages, initial, code = download(server, "ReadEventContent", pb.ReadEventContentRequest(
        device="cam1", event_id=event_id, read_offset=10, read_limit=20))
    assert code is grpc.StatusCode.OK
    assert [m.data for m in messages] == [PNG[10:30]]
    assert initial["x-content-length"] == str(len(PNG)) and "x-http-status" not in initial
    messages, _, code = download(server, "ReadEventContent", pb.ReadEventContentRequest(
        device="cam1", event_id=event_id, read_offset=len(PNG)))
    assert (messages, code) == ([], grpc.StatusCode.OK)
    _, _, code = download(server, "ReadEventContent", pb.ReadEventContentRequest(
        device="cam1", event_id=event_id, read_offset=len(PNG) + 1))
    assert code is grpc.StatusCode.UNKNOWN  # OutOfRange, unmapped without the interceptor
