"""Native gRPC clients, both straight to the gRPC server and through Envoy (h2c on the REST port).

An upload stream is a header, chunks, then a `finish` message, always: grpcio can report a
cancelled client stream as a normal end of stream, so a stream without its finish is refused
(UPLOAD_NOT_FINISHED) even when the header declares `size`, which proves neither that the
thumbnail is complete nor that the client meant to end there.

Every upload that fails (bad header, size or sha256 mismatch, no finish, no token, a client that
cancels) must leave nothing behind: no file in media/ or staging/ and no event row.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
from google.protobuf import json_format, struct_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gallery.v1 import gallery_pb2 as pb
from gallery.v1 import gallery_pb2_grpc

from ..conftest import new_device, random_bytes, rich_error, stored_files
from .conftest import Stack

EVENT_ID_RE = re.compile(r"evt_[A-Za-z0-9_-]{22}")
MiB = 1024 * 1024
SERVICE = "gallery.v1.GalleryService"
TIMEOUT = 60


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def error_details(err: grpc.RpcError) -> tuple[error_details_pb2.ErrorInfo, list[str]]:
    """The ErrorInfo and the BadRequest violated fields carried by a failed call."""
    info, violations = rich_error(err)
    return info, [v.field for v in violations]


def header_message(device: str, name: str = "capture.mp4", **fields: object) -> pb.UploadEventRequest:
    return pb.UploadEventRequest(header=pb.UploadHeader(device=device, name=name, **fields))


def finish_message(**fields: object) -> pb.UploadEventRequest:
    return pb.UploadEventRequest(finish=pb.UploadFinish(**fields))


FINISH = finish_message()


def chunks(data: bytes, size: int = MiB) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


@pytest.fixture(params=["direct", "envoy"])
def channel(request: pytest.FixtureRequest, stack: Stack) -> Iterator[grpc.Channel]:
    if request.param == "envoy":
        yield request.getfixturevalue("envoy_channel")
        return
    with grpc.insecure_channel(stack.grpc_address) as direct:
        yield direct


@pytest.fixture
def stub(channel: grpc.Channel) -> gallery_pb2_grpc.GalleryServiceStub:
    return gallery_pb2_grpc.GalleryServiceStub(channel)


@pytest.fixture
def token(mint: Callable[..., str]) -> str:
    return mint()


def list_events(stub: gallery_pb2_grpc.GalleryServiceStub, token: str, device: str) -> list[pb.Event]:
    return list(stub.ListEvents(pb.ListEventsRequest(device=device), metadata=bearer(token),
                                timeout=TIMEOUT))


# -- the happy path -------------------------------------------------------------------------------


def test_upload_list_get_stats_delete(
    stub: gallery_pb2_grpc.GalleryServiceStub, token: str, stack: Stack
) -> None:
    device = new_device()
    media = random_bytes(6 * MiB)
    thumbnail = random_bytes(150_000)
    metadata = {
        "timestamp": "2024-03-20T10:00:00Z",
        "count": 3,
        "nested": {"list": [1, "x", True, None], "ratio": 0.5},
    }
    struct = struct_pb2.Struct()
    struct.update(metadata)
    thumb_parts = chunks(thumbnail, 100_000)

    def requests() -> Iterator[pb.UploadEventRequest]:
        yield header_message(
            device, "capture.mp4", media_type="video", metadata=struct, size=len(media),
            sha256=hashlib.sha256(media).hexdigest(),
        )
        # Media and thumbnail chunks may interleave.
        for i, piece in enumerate(chunks(media)):
            yield pb.UploadEventRequest(media_chunk=piece)
            if i < len(thumb_parts):
                yield pb.UploadEventRequest(thumbnail_chunk=thumb_parts[i])
        yield FINISH

    response = stub.UploadEvent(requests(), metadata=bearer(token), timeout=TIMEOUT)
    assert response.success is True
    assert EVENT_ID_RE.fullmatch(response.event_id), response
    event_id = response.event_id

    # Bytes on disk are the bytes sent; nothing left in staging.
    media_path = stack.data_dir / "media" / device / event_id
    thumb_path = stack.data_dir / "media" / device / f"{event_id}.thumb"
    assert media_path.read_bytes() == media
    assert thumb_path.read_bytes() == thumbnail
    assert not list((stack.data_dir / "staging").iterdir())

    # A second, small event of another type for the stats.
    doc = b"%PDF-1.4\n" + random_bytes(1000)
    second = stub.UploadEvent(
        iter([header_message(device, "report.pdf"), pb.UploadEventRequest(media_chunk=doc), FINISH]),
        metadata=bearer(token), timeout=TIMEOUT,
    )
    assert second.success is True

    events = list_events(stub, token, device)
    assert [e.id for e in events] == [second.event_id, event_id]  # newest first
    listed = events[1]
    assert listed.name == "capture.mp4"
    assert listed.media_type == "video"
    assert listed.size == len(media)
    assert listed.has_thumbnail is True
    assert listed.sha256 == hashlib.sha256(media).hexdigest()
    assert listed.mime_type == "video/mp4"
    assert listed.created.seconds > 0
    assert not listed.HasField("metadata")  # ListEvents leaves metadata unset
    assert events[0].media_type == "document"
    assert events[0].mime_type == "application/pdf"
    assert events[0].has_thumbnail is False

    got = stub.GetEvent(pb.GetEventRequest(device=device, event_id=event_id),
                        metadata=bearer(token), timeout=TIMEOUT)
    assert got.id == event_id
    assert got.size == len(media)
    assert json_format.MessageToDict(got.metadata) == metadata
    got_second = stub.GetEvent(pb.GetEventRequest(device=device, event_id=second.event_id),
                               metadata=bearer(token), timeout=TIMEOUT)
    assert got_second.HasField("metadata")
    assert json_format.MessageToDict(got_second.metadata) == {}

    # Media type filter.
    videos = list(stub.ListEvents(pb.ListEventsRequest(device=device, media_type="video"),
                                  metadata=bearer(token), timeout=TIMEOUT))
    assert [e.id for e in videos] == [event_id]

    stats = stub.GetStats(pb.GetStatsRequest(device=device), metadata=bearer(token), timeout=TIMEOUT)
    assert stats.total_events == 2
    assert stats.total_size == len(media) + len(doc)
    assert dict(stats.by_type) == {
        "video": pb.TypeStats(count=1, size=len(media)),
        "document": pb.TypeStats(count=1, size=len(doc)),
    }

    deleted = stub.DeleteEvent(pb.DeleteEventRequest(device=device, event_id=event_id),
                               metadata=bearer(token), timeout=TIMEOUT)
    assert deleted.success is True
    assert not media_path.exists()
    assert not thumb_path.exists()
    assert [e.id for e in list_events(stub, token, device)] == [second.event_id]
    stats = stub.GetStats(pb.GetStatsRequest(device=device), metadata=bearer(token), timeout=TIMEOUT)
    assert stats.total_events == 1
    assert dict(stats.by_type) == {"document": pb.TypeStats(count=1, size=len(doc))}

    for call, request in (
        (stub.GetEvent, pb.GetEventRequest(device=device, event_id=event_id)),
        (stub.DeleteEvent, pb.DeleteEventRequest(device=device, event_id=event_id)),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call(request, metadata=bearer(token), timeout=TIMEOUT)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        info, _ = error_details(err.value)
        assert info.reason == "EVENT_NOT_FOUND"
        assert info.metadata["event_id"] == event_id


def test_empty_stats_and_list(stub: gallery_pb2_grpc.GalleryServiceStub, token: str) -> None:
    device = new_device()
    assert list_events(stub, token, device) == []
    stats = stub.GetStats(pb.GetStatsRequest(device=device), metadata=bearer(token), timeout=TIMEOUT)
    assert stats.total_events == 0
    assert stats.total_size == 0
    assert dict(stats.by_type) == {}


# -- errors ---------------------------------------------------------------------------------------


def test_read_errors(
    stub: gallery_pb2_grpc.GalleryServiceStub, token: str, mint: Callable[..., str]
) -> None:
    device = new_device()
    missing = "evt_" + "A" * 22
    cases = [
        (stub.GetEvent, pb.GetEventRequest(device=device, event_id=missing), bearer(token),
         grpc.StatusCode.NOT_FOUND, "EVENT_NOT_FOUND"),
        (stub.DeleteEvent, pb.DeleteEventRequest(device=device, event_id=missing), bearer(token),
         grpc.StatusCode.NOT_FOUND, "EVENT_NOT_FOUND"),
        (stub.GetEvent, pb.GetEventRequest(device=device, event_id="nope"), bearer(token),
         grpc.StatusCode.INVALID_ARGUMENT, "INVALID_EVENT_ID"),
        (stub.GetStats, pb.GetStatsRequest(device="bad/device"), bearer(token),
         grpc.StatusCode.INVALID_ARGUMENT, "INVALID_DEVICE_ID"),
        (stub.GetStats, pb.GetStatsRequest(device=device), None,
         grpc.StatusCode.UNAUTHENTICATED, "TOKEN_MISSING"),
        (stub.GetStats, pb.GetStatsRequest(device=device), [("authorization", "Basic abc")],
         grpc.StatusCode.UNAUTHENTICATED, "TOKEN_MALFORMED"),
        (stub.GetStats, pb.GetStatsRequest(device=device), bearer(mint(ttl=-120)),
         grpc.StatusCode.UNAUTHENTICATED, "TOKEN_EXPIRED"),
        (stub.GetStats, pb.GetStatsRequest(device=device), bearer(mint(secret="other-" + "y" * 40)),
         grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID"),
        (stub.GetStats, pb.GetStatsRequest(device=device), bearer(mint(devices=["other"])),
         grpc.StatusCode.PERMISSION_DENIED, "DEVICE_NOT_ALLOWED"),
        # Permission is checked before existence.
        (stub.GetEvent, pb.GetEventRequest(device=device, event_id=missing),
         bearer(mint(devices=["other"])), grpc.StatusCode.PERMISSION_DENIED, "DEVICE_NOT_ALLOWED"),
        (stub.DeleteEvent, pb.DeleteEventRequest(device=device, event_id=missing),
         bearer(mint(scope="gallery:read")), grpc.StatusCode.PERMISSION_DENIED, "SCOPE_MISSING"),
    ]
    for call, request, metadata, code, reason in cases:
        with pytest.raises(grpc.RpcError) as err:
            call(request, metadata=metadata, timeout=TIMEOUT)
        assert err.value.code() == code, (request, err.value)
        info, _ = error_details(err.value)
        assert info.reason == reason, (request, info)

    with pytest.raises(grpc.RpcError) as err:
        list(stub.ListEvents(pb.ListEventsRequest(device=device), timeout=TIMEOUT))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_details(err.value)[0].reason == "TOKEN_MISSING"

    with pytest.raises(grpc.RpcError) as err:
        list(stub.ListEvents(pb.ListEventsRequest(device=device, limit=0), metadata=bearer(token),
                             timeout=TIMEOUT))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info, fields = error_details(err.value)
    assert info.reason == "INVALID_LIMIT"
    assert fields == ["limit"]


MEDIA = random_bytes(2 * MiB + 17)
MEDIA_SHA = hashlib.sha256(MEDIA).hexdigest()
MEDIA_CHUNKS = [pb.UploadEventRequest(media_chunk=c) for c in chunks(MEDIA)]


def upload_error_cases(device: str) -> list[tuple[str, list[pb.UploadEventRequest], grpc.StatusCode, str, str]]:
    """(id, messages, code, ErrorInfo reason, BadRequest field or "")"""
    big_metadata = struct_pb2.Struct()
    big_metadata.update({"blob": "x" * (70 * 1024)})
    other_sha = hashlib.sha256(b"something else").hexdigest()
    thumb = pb.UploadEventRequest(thumbnail_chunk=b"thumb")
    return [
        ("chunk-first", [*MEDIA_CHUNKS, header_message(device)],
         grpc.StatusCode.INVALID_ARGUMENT, "HEADER_REQUIRED", "header"),
        ("thumbnail-first", [pb.UploadEventRequest(thumbnail_chunk=b"t"), header_message(device)],
         grpc.StatusCode.INVALID_ARGUMENT, "HEADER_REQUIRED", "header"),
        ("finish-first", [FINISH, header_message(device)],
         grpc.StatusCode.INVALID_ARGUMENT, "HEADER_REQUIRED", "header"),
        ("empty-stream", [], grpc.StatusCode.INVALID_ARGUMENT, "EMPTY_STREAM", ""),
        ("header-repeated", [header_message(device), MEDIA_CHUNKS[0], header_message(device)],
         grpc.StatusCode.INVALID_ARGUMENT, "HEADER_REPEATED", "header"),
        # A message with no part set (empty, or a part only a newer client knows) is named as such.
        ("empty-message", [header_message(device), MEDIA_CHUNKS[0], pb.UploadEventRequest(), FINISH],
         grpc.StatusCode.INVALID_ARGUMENT, "PART_REQUIRED", "part"),
        # A declared size over the limit is refused at the header, before its bytes come.
        ("declared-size-over-the-limit", [header_message(device, size=1 << 50), MEDIA_CHUNKS[0], FINISH],
         grpc.StatusCode.RESOURCE_EXHAUSTED, "UPLOAD_TOO_LARGE", "size"),
        ("finish-size-over-the-limit", [header_message(device), MEDIA_CHUNKS[0], finish_message(size=1 << 50)],
         grpc.StatusCode.RESOURCE_EXHAUSTED, "UPLOAD_TOO_LARGE", "size"),
        ("declared-size-smaller", [header_message(device, size=len(MEDIA) - 1), *MEDIA_CHUNKS, FINISH],
         grpc.StatusCode.INVALID_ARGUMENT, "SIZE_MISMATCH", "size"),
        ("declared-size-larger", [header_message(device, size=len(MEDIA) + 1), *MEDIA_CHUNKS, FINISH],
         grpc.StatusCode.INVALID_ARGUMENT, "SIZE_MISMATCH", "size"),
        # Media beyond the declared size is refused as it arrives, before the stream ends.
        ("declared-size-smaller-not-finished", [header_message(device, size=len(MEDIA) - 1), *MEDIA_CHUNKS],
         grpc.StatusCode.INVALID_ARGUMENT, "SIZE_MISMATCH", "size"),
        ("sha256-mismatch", [header_message(device, sha256=other_sha), *MEDIA_CHUNKS, thumb, FINISH],
         grpc.StatusCode.INVALID_ARGUMENT, "SHA256_MISMATCH", "sha256"),
        ("sha256-not-hex", [header_message(device, sha256=MEDIA_SHA.upper()), *MEDIA_CHUNKS, FINISH],
         grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SHA256", "sha256"),
        ("bad-media-type", [header_message(device, media_type="movie"), *MEDIA_CHUNKS, FINISH],
         grpc.StatusCode.INVALID_ARGUMENT, "INVALID_MEDIA_TYPE", "media_type"),
        ("no-name", [header_message(device, name=""), *MEDIA_CHUNKS, FINISH],
         grpc.StatusCode.INVALID_ARGUMENT, "NAME_REQUIRED", "name"),
        ("bad-device", [header_message("../etc"), *MEDIA_CHUNKS, FINISH],
         grpc.StatusCode.INVALID_ARGUMENT, "INVALID_DEVICE_ID", "device"),
        # Too large is a bad argument now (HTTP 400), no longer RESOURCE_EXHAUSTED.
        ("metadata-too-large", [header_message(device, metadata=big_metadata), *MEDIA_CHUNKS, FINISH],
         grpc.StatusCode.INVALID_ARGUMENT, "METADATA_TOO_LARGE", "metadata"),
        # No finish: the stream may have been cut short, whatever the header declared.
        ("not-finished", [header_message(device), *MEDIA_CHUNKS],
         grpc.StatusCode.INVALID_ARGUMENT, "UPLOAD_NOT_FINISHED", "finish"),
        ("not-finished-thumbnail-last", [header_message(device), *MEDIA_CHUNKS, thumb],
         grpc.StatusCode.INVALID_ARGUMENT, "UPLOAD_NOT_FINISHED", "finish"),
        ("not-finished-header-only", [header_message(device)],
         grpc.StatusCode.INVALID_ARGUMENT, "UPLOAD_NOT_FINISHED", "finish"),
        # A sha256 alone proves nothing about the end: a matching hash is only checked once finished.
        ("not-finished-with-sha256", [header_message(device, sha256=MEDIA_SHA), *MEDIA_CHUNKS],
         grpc.StatusCode.INVALID_ARGUMENT, "UPLOAD_NOT_FINISHED", "finish"),
        # Nor does a declared size, even a right one: the finish check comes before the size check.
        ("not-finished-with-size", [header_message(device, size=len(MEDIA)), *MEDIA_CHUNKS],
         grpc.StatusCode.INVALID_ARGUMENT, "UPLOAD_NOT_FINISHED", "finish"),
        ("not-finished-with-size-and-sha256",
         [header_message(device, size=len(MEDIA), sha256=MEDIA_SHA), *MEDIA_CHUNKS, thumb],
         grpc.StatusCode.INVALID_ARGUMENT, "UPLOAD_NOT_FINISHED", "finish"),
        ("not-finished-with-larger-size", [header_message(device, size=len(MEDIA) + 1), *MEDIA_CHUNKS],
         grpc.StatusCode.INVALID_ARGUMENT, "UPLOAD_NOT_FINISHED", "finish"),
        ("not-finished-header-size-zero", [header_message(device, size=0)],
         grpc.StatusCode.INVALID_ARGUMENT, "UPLOAD_NOT_FINISHED", "finish"),
        # Nothing may follow the finish.
        ("chunk-after-finish", [header_message(device), *MEDIA_CHUNKS, FINISH, MEDIA_CHUNKS[0]],
         grpc.StatusCode.INVALID_ARGUMENT, "FINISH_NOT_LAST", "finish"),
        ("thumbnail-after-finish", [header_message(device), *MEDIA_CHUNKS, FINISH, thumb],
         grpc.StatusCode.INVALID_ARGUMENT, "FINISH_NOT_LAST", "finish"),
        ("finish-twice", [header_message(device), *MEDIA_CHUNKS, FINISH, FINISH],
         grpc.StatusCode.INVALID_ARGUMENT, "FINISH_NOT_LAST", "finish"),
        ("header-after-finish", [header_message(device), *MEDIA_CHUNKS, FINISH, header_message(device)],
         grpc.StatusCode.INVALID_ARGUMENT, "FINISH_NOT_LAST", "finish"),
        ("finish-not-last-with-size", [header_message(device, size=len(MEDIA)), *MEDIA_CHUNKS,
                                       finish_message(size=len(MEDIA)), finish_message()],
         grpc.StatusCode.INVALID_ARGUMENT, "FINISH_NOT_LAST", "finish"),
        # Size and sha256 declared at the end must match the bytes.
        ("finish-size-smaller", [header_message(device), *MEDIA_CHUNKS, finish_message(size=len(MEDIA) - 1)],
         grpc.StatusCode.INVALID_ARGUMENT, "SIZE_MISMATCH", "size"),
        ("finish-size-larger", [header_message(device), *MEDIA_CHUNKS, finish_message(size=len(MEDIA) + 1)],
         grpc.StatusCode.INVALID_ARGUMENT, "SIZE_MISMATCH", "size"),
        ("finish-size-zero", [header_message(device), *MEDIA_CHUNKS, finish_message(size=0)],
         grpc.StatusCode.INVALID_ARGUMENT, "SIZE_MISMATCH", "size"),
        ("finish-sha256-mismatch", [header_message(device), *MEDIA_CHUNKS, thumb,
                                    finish_message(size=len(MEDIA), sha256=other_sha)],
         grpc.StatusCode.INVALID_ARGUMENT, "SHA256_MISMATCH", "sha256"),
        ("finish-sha256-not-hex", [header_message(device), *MEDIA_CHUNKS,
                                   finish_message(sha256=MEDIA_SHA.upper())],
         grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SHA256", "sha256"),
        # Header and finish must agree with each other, even when one of them is right.
        ("header-finish-size-disagree", [header_message(device, size=len(MEDIA)), *MEDIA_CHUNKS,
                                         finish_message(size=len(MEDIA) + 1)],
         grpc.StatusCode.INVALID_ARGUMENT, "SIZE_MISMATCH", "size"),
        ("header-wrong-finish-right-size", [header_message(device, size=len(MEDIA) - 1), *MEDIA_CHUNKS,
                                            finish_message(size=len(MEDIA))],
         grpc.StatusCode.INVALID_ARGUMENT, "SIZE_MISMATCH", "size"),
        ("header-finish-agree-on-wrong-size", [header_message(device, size=len(MEDIA) + 1), *MEDIA_CHUNKS,
                                               finish_message(size=len(MEDIA) + 1)],
         grpc.StatusCode.INVALID_ARGUMENT, "SIZE_MISMATCH", "size"),
        ("header-finish-sha256-disagree", [header_message(device, sha256=MEDIA_SHA), *MEDIA_CHUNKS,
                                           finish_message(sha256=other_sha)],
         grpc.StatusCode.INVALID_ARGUMENT, "SHA256_MISMATCH", "sha256"),
        ("header-wrong-finish-right-sha256", [header_message(device, sha256=other_sha), *MEDIA_CHUNKS,
                                              finish_message(sha256=MEDIA_SHA)],
         grpc.StatusCode.INVALID_ARGUMENT, "SHA256_MISMATCH", "sha256"),
    ]


def test_upload_errors_leave_nothing(
    stub: gallery_pb2_grpc.GalleryServiceStub, token: str, stack: Stack
) -> None:
    device = new_device()
    for case_id, messages, code, reason, field in upload_error_cases(device):
        before = stored_files(stack.data_dir)
        with pytest.raises(grpc.RpcError) as err:
            stub.UploadEvent(iter(messages), metadata=bearer(token), timeout=TIMEOUT)
        assert err.value.code() == code, (case_id, err.value)
        info, fields = error_details(err.value)
        assert info.reason == reason, (case_id, info)
        if field:
            assert fields == [field], (case_id, fields)
        assert stored_files(stack.data_dir) == before, case_id
        assert list_events(stub, token, device) == [], case_id

    # The same bytes with a correct header and a finish are accepted.
    response = stub.UploadEvent(
        iter([header_message(device, size=len(MEDIA), sha256=MEDIA_SHA), *MEDIA_CHUNKS, FINISH]),
        metadata=bearer(token), timeout=TIMEOUT,
    )
    assert [e.id for e in list_events(stub, token, device)] == [response.event_id]
    assert (stack.data_dir / "media" / device / response.event_id).read_bytes() == MEDIA


FINISH_HAPPY_PATHS: dict[str, tuple[tuple[str, ...], Callable[[bytes], list[pb.UploadEventRequest]]]] = {
    # id: (what the header declares, the messages after the header for the given media)
    "finish-empty": ((), lambda media: [*media_messages(media), FINISH]),
    "finish-size-and-sha256": ((), lambda media: [
        *media_messages(media), finish_message(size=len(media), sha256=sha(media))]),
    "finish-size-only": ((), lambda media: [*media_messages(media), finish_message(size=len(media))]),
    "finish-sha256-only": ((), lambda media: [*media_messages(media), finish_message(sha256=sha(media))]),
    "header-sha256-finish-size": (("sha256",), lambda media: [
        *media_messages(media), finish_message(size=len(media))]),
    "header-and-finish-agree": (("size", "sha256"), lambda media: [
        *media_messages(media), finish_message(size=len(media), sha256=sha(media))]),
    "header-size-finish-sha256": (("size",), lambda media: [
        *media_messages(media), finish_message(sha256=sha(media))]),
}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def media_messages(media: bytes, thumbnail: bytes = b"") -> list[pb.UploadEventRequest]:
    return [pb.UploadEventRequest(media_chunk=c) for c in chunks(media)] + [
        pb.UploadEventRequest(thumbnail_chunk=c) for c in chunks(thumbnail, 10_000)
    ]


@pytest.mark.parametrize("case", list(FINISH_HAPPY_PATHS))
def test_finish_declares_size_and_sha256_at_the_end(
    stub: gallery_pb2_grpc.GalleryServiceStub, token: str, stack: Stack, case: str
) -> None:
    """A client that learns the size and hash only while sending declares them in `finish`."""
    header_fields, tail = FINISH_HAPPY_PATHS[case]
    device = new_device()
    for media in (random_bytes(2 * MiB + 333), b""):
        declared = {"size": len(media), "sha256": sha(media)}
        fields = {name: declared[name] for name in header_fields}
        response = stub.UploadEvent(
            iter([header_message(device, "clip.bin", **fields), *tail(media)]),
            metadata=bearer(token), timeout=TIMEOUT,
        )
        assert response.success is True
        assert (stack.data_dir / "media" / device / response.event_id).read_bytes() == media
        [event] = [e for e in list_events(stub, token, device) if e.id == response.event_id]
        assert event.size == len(media)
        assert event.sha256 == sha(media)
        assert event.has_thumbnail is False
    assert not list((stack.data_dir / "staging").iterdir())


@pytest.mark.parametrize("header_fields", [("size",), ("size", "sha256")], ids=["size", "size-and-sha256"])
@pytest.mark.parametrize("with_thumbnail", [False, True], ids=["media-only", "with-thumbnail"])
def test_header_size_without_finish_is_not_finished(
    stub: gallery_pb2_grpc.GalleryServiceStub, token: str, stack: Stack,
    header_fields: tuple[str, ...], with_thumbnail: bool,
) -> None:
    """A size (and sha256) declared up front does not replace `finish`: every byte the header
    announced may have arrived, yet the stream is refused and nothing is stored."""
    device = new_device()
    thumbnail = random_bytes(25_000) if with_thumbnail else b""
    for media in (random_bytes(2 * MiB + 333), b""):
        declared = {"size": len(media), "sha256": sha(media)}
        fields = {name: declared[name] for name in header_fields}
        before = stored_files(stack.data_dir)
        with pytest.raises(grpc.RpcError) as err:
            stub.UploadEvent(
                iter([header_message(device, "clip.bin", **fields), *media_messages(media, thumbnail)]),
                metadata=bearer(token), timeout=TIMEOUT,
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
        info, violations = error_details(err.value)
        assert info.reason == "UPLOAD_NOT_FINISHED", (len(media), info)
        assert violations == ["finish"]
        assert stored_files(stack.data_dir) == before
    assert list_events(stub, token, device) == []
    assert not list((stack.data_dir / "staging").iterdir())


def test_finish_after_interleaved_media_and_thumbnail(
    stub: gallery_pb2_grpc.GalleryServiceStub, token: str, stack: Stack
) -> None:
    device = new_device()
    media, thumbnail = random_bytes(3 * MiB + 1), random_bytes(25_000)
    thumb_parts = [pb.UploadEventRequest(thumbnail_chunk=c) for c in chunks(thumbnail, 10_000)]
    media_parts = [pb.UploadEventRequest(media_chunk=c) for c in chunks(media)]
    interleaved = [m for pair in zip(media_parts, thumb_parts, strict=False) for m in pair]
    interleaved += media_parts[len(thumb_parts):]
    response = stub.UploadEvent(
        iter([header_message(device, "clip.mp4"), *interleaved,
              finish_message(size=len(media), sha256=sha(media))]),
        metadata=bearer(token), timeout=TIMEOUT,
    )
    event_id = response.event_id
    assert (stack.data_dir / "media" / device / event_id).read_bytes() == media
    assert (stack.data_dir / "media" / device / f"{event_id}.thumb").read_bytes() == thumbnail
    [event] = list_events(stub, token, device)
    assert (event.id, event.size, event.sha256, event.has_thumbnail) == (
        event_id, len(media), sha(media), True)


# Metadata a Struct can carry and the gallery refuses: NaN and the infinities, and more values
# than validation.MAX_METADATA_VALUES (each costs every read of the event).
REFUSED_METADATA = pytest.mark.parametrize(
    "value", [float("nan"), float("inf"), float("-inf"), [0] * 2048],
    ids=["nan", "infinity", "minus-infinity", "too-many-values"],
)


def refused_metadata_upload(
    stub: gallery_pb2_grpc.GalleryServiceStub, token: str, stack: Stack, value: object
) -> grpc.RpcError:
    """Upload with `value` in its metadata Struct; it must store nothing."""
    device = new_device()
    metadata = struct_pb2.Struct()
    metadata.update({"ok": 1, "bad": value})
    before = stored_files(stack.data_dir)
    with pytest.raises(grpc.RpcError) as err:
        stub.UploadEvent(iter([header_message(device, metadata=metadata), *MEDIA_CHUNKS, FINISH]),
                         metadata=bearer(token), timeout=TIMEOUT)
    assert stored_files(stack.data_dir) == before
    assert list_events(stub, token, device) == []
    return err.value


@REFUSED_METADATA
def test_refused_metadata_is_invalid_metadata_and_stores_nothing(
    stub: gallery_pb2_grpc.GalleryServiceStub, token: str, stack: Stack, value: object
) -> None:
    err = refused_metadata_upload(stub, token, stack, value)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    info, fields = error_details(err)
    assert info.reason == "INVALID_METADATA"
    assert fields == ["metadata"]


@pytest.mark.parametrize(
    ("metadata_of", "code", "reason"),
    [
        (lambda mint, device: None, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_MISSING"),
        (lambda mint, device: bearer(mint(ttl=-120)), grpc.StatusCode.UNAUTHENTICATED, "TOKEN_EXPIRED"),
        (lambda mint, device: bearer(mint(devices=["someone-else"])),
         grpc.StatusCode.PERMISSION_DENIED, "DEVICE_NOT_ALLOWED"),
        (lambda mint, device: bearer(mint(devices=[device], scope="gallery:read")),
         grpc.StatusCode.PERMISSION_DENIED, "SCOPE_MISSING"),
    ],
    ids=["no-token", "expired-token", "wrong-device", "read-only"],
)
def test_upload_auth_errors_leave_nothing(
    stub: gallery_pb2_grpc.GalleryServiceStub, token: str, stack: Stack, mint: Callable[..., str],
    metadata_of: Callable, code: grpc.StatusCode, reason: str,
) -> None:
    device = new_device()
    before = stored_files(stack.data_dir)
    with pytest.raises(grpc.RpcError) as err:
        stub.UploadEvent(iter([header_message(device), *MEDIA_CHUNKS, FINISH]),
                         metadata=metadata_of(mint, device), timeout=TIMEOUT)
    assert err.value.code() == code
    assert error_details(err.value)[0].reason == reason
    assert stored_files(stack.data_dir) == before
    assert list_events(stub, token, device) == []


# -- a client that goes away ----------------------------------------------------------------------

CANCEL_ATTEMPTS = 4
CANCEL_SENT = 3 * MiB  # what reaches the server before the cancel
CANCEL_FULL = 4 * MiB  # the size of the file the client meant to send
# What the server's access log may record for a cancelled upload: grpcio reported the cancel, the
# servicer saw the client gone at the end of the stream, or the stream just ended without finish.
CANCEL_OUTCOMES = {("CANCELLED", ""), ("INVALID_ARGUMENT", "UPLOAD_CANCELLED"),
                   ("INVALID_ARGUMENT", "UPLOAD_NOT_FINISHED")}


def upload_access(stack: Stack) -> list[dict]:
    """The server's access-log entries for UploadEvent, oldest first."""
    entries = []
    for line in stack.log().splitlines():
        if line.startswith("{") and f'"method": "/{SERVICE}/UploadEvent"' in line:
            entries.append(json.loads(line))
    return entries


def upload_access_lines(stack: Stack) -> int:
    return len(upload_access(stack))


@pytest.mark.parametrize(
    "variant", ["no-finish", "finish-never-sent", "header-size"],
)
def test_cancel_mid_stream_leaves_nothing(
    stub: gallery_pb2_grpc.GalleryServiceStub, token: str, stack: Stack, variant: str
) -> None:
    """Cancel an upload after some chunks: no event, no file in media/ or staging/.

    grpcio may show the server a cancelled stream as a normal end of stream, so what protects the
    server is that the stream lacks its `finish` (no-finish: the client's stream simply ends
    without one; finish-never-sent: the rest of the file and the finish were still to come;
    header-size: the same, with the full size declared in the header, which no longer exempts
    the stream from `finish`). Fewer bytes than declared arrive, so the size check in store()
    (SIZE_MISMATCH) is never reached: the finish check comes first. The outcome depends on
    timing, hence several attempts.
    """
    attempts = []
    for _ in range(CANCEL_ATTEMPTS):
        device = new_device()
        before = stored_files(stack.data_dir)
        seen = upload_access_lines(stack)
        sent, release = threading.Event(), threading.Event()
        media = random_bytes(CANCEL_FULL)
        header = (header_message(device, "partial.bin", size=CANCEL_FULL) if variant == "header-size"
                  else header_message(device, "partial.bin"))

        def requests(header: pb.UploadEventRequest = header, media: bytes = media,
                     sent: threading.Event = sent,
                     release: threading.Event = release) -> Iterator[pb.UploadEventRequest]:
            yield header
            for piece in chunks(media[:CANCEL_SENT]):
                yield pb.UploadEventRequest(media_chunk=piece)
            yield pb.UploadEventRequest(thumbnail_chunk=random_bytes(10_000))
            sent.set()
            release.wait(timeout=30)  # the call is cancelled meanwhile: nothing below is sent
            if variant == "no-finish":
                return
            for piece in chunks(media[CANCEL_SENT:]):
                yield pb.UploadEventRequest(media_chunk=piece)
            yield FINISH

        future = stub.UploadEvent.future(requests(), metadata=bearer(token), timeout=TIMEOUT)
        try:
            assert sent.wait(timeout=30)
            # Give the server time to receive what was sent (the chunks are in staging by now).
            deadline = time.monotonic() + 10
            while not list((stack.data_dir / "staging").iterdir()) and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.2)
            assert future.cancel()
        finally:
            release.set()
        assert future.cancelled()
        with pytest.raises(grpc.FutureCancelledError):
            future.result()

        # Wait for the server to finish with the call (its access-log line), then look.
        deadline = time.monotonic() + 10
        while upload_access_lines(stack) == seen:
            assert time.monotonic() < deadline, stack.log()[-3000:]
            time.sleep(0.05)
        entry = upload_access(stack)[seen]
        attempts.append((device, before, list_events(stub, token, device),
                         stored_files(stack.data_dir), (entry["code"], entry["reason"])))

    stored = {device: [(e.id, e.size) for e in events] for device, _, events, _, _ in attempts if events}
    assert not stored, f"{len(stored)} of {CANCEL_ATTEMPTS} cancelled uploads became events: {stored}"
    for device, before, _, after, _ in attempts:
        assert after == before, device
    assert not list((stack.data_dir / "staging").iterdir())
    # The server never answered OK: it saw the cancel, or a stream without its finish.
    outcomes = [outcome for *_, outcome in attempts]
    assert set(outcomes) <= CANCEL_OUTCOMES, outcomes


def test_cancel_during_thumbnail_with_declared_size_leaves_nothing(
    stub: gallery_pb2_grpc.GalleryServiceStub, token: str, stack: Stack
) -> None:
    """The header declares the media size and all the media arrives, then the client cancels
    while its thumbnail is still coming (the rest of it and the finish were still to come): the
    stream was cancelled, so nothing may be stored. The declared size proves only the media
    complete; the missing finish is what keeps a truncated thumbnail out."""
    outcomes = []
    for attempt in range(20):
        device = new_device()
        before = stored_files(stack.data_dir)
        seen = upload_access_lines(stack)
        media, thumbnail = random_bytes(2 * MiB), random_bytes(300_000)
        sent, release = threading.Event(), threading.Event()

        def requests(device: str = device, media: bytes = media, thumbnail: bytes = thumbnail,
                     sent: threading.Event = sent,
                     release: threading.Event = release) -> Iterator[pb.UploadEventRequest]:
            yield header_message(device, "clip.mp4", size=len(media))
            for piece in chunks(media):
                yield pb.UploadEventRequest(media_chunk=piece)
            yield pb.UploadEventRequest(thumbnail_chunk=thumbnail[:100_000])
            sent.set()
            release.wait(timeout=30)  # the call is cancelled meanwhile: the rest is never sent
            yield pb.UploadEventRequest(thumbnail_chunk=thumbnail[100_000:])
            yield FINISH

        future = stub.UploadEvent.future(requests(), metadata=bearer(token), timeout=TIMEOUT)
        try:
            assert sent.wait(timeout=30)
            time.sleep(0.2)  # let the server receive what was sent
            assert future.cancel()
        finally:
            release.set()
        deadline = time.monotonic() + 10
        while upload_access_lines(stack) == seen:
            assert time.monotonic() < deadline, stack.log()[-3000:]
            time.sleep(0.05)
        events = list_events(stub, token, device)
        thumbs = [(stack.data_dir / "media" / device / f"{e.id}.thumb").stat().st_size
                  for e in events if e.has_thumbnail]
        assert events == [], (
            f"attempt {attempt}: cancelled upload stored; thumbnail sizes {thumbs} of {len(thumbnail)}"
        )
        assert stored_files(stack.data_dir) == before, attempt
        entry = upload_access(stack)[seen]
        outcomes.append((entry["code"], entry["reason"]))
    assert set(outcomes) <= CANCEL_OUTCOMES, outcomes


# -- health and reflection ------------------------------------------------------------------------


def test_health(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as err:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_watch_is_not_routed_from_outside(stack: Stack, envoy_channel: grpc.Channel) -> None:
    """Watch stays open without a token: through Envoy it is UNIMPLEMENTED (each held one of the
    cluster's requests; ~1,000 locked every client out), on the trusted gRPC port it answers."""
    with pytest.raises(grpc.RpcError) as err:
        next(health_pb2_grpc.HealthStub(envoy_channel).Watch(health_pb2.HealthCheckRequest(), timeout=TIMEOUT))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with grpc.insecure_channel(stack.grpc_address) as direct:
        watch = health_pb2_grpc.HealthStub(direct).Watch(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()


def test_reflection(channel: grpc.Channel, token: str) -> None:
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE),
    ]
    with pytest.raises(grpc.RpcError) as err:
        list(reflection.ServerReflectionInfo(iter(requests), timeout=TIMEOUT))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    responses = list(reflection.ServerReflectionInfo(iter(requests), timeout=TIMEOUT, metadata=bearer(token)))
    assert len(responses) == 2
    services = {s.name for s in responses[0].list_services_response.service}
    assert services >= {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
    files = responses[1].file_descriptor_response.file_descriptor_proto
    assert files, responses[1]
    assert any(b"gallery/v1/gallery.proto" in f for f in files)


def test_large_chunks_and_empty_media(
    stub: gallery_pb2_grpc.GalleryServiceStub, token: str, stack: Stack
) -> None:
    """4 MiB chunks (the documented native maximum) pass, and a header and finish alone are an
    empty file."""
    device = new_device()
    media = random_bytes(8 * MiB + 5)
    response = stub.UploadEvent(
        iter([header_message(device, "big.bin", size=len(media)),
              *(pb.UploadEventRequest(media_chunk=c) for c in chunks(media, 4 * MiB)), FINISH]),
        metadata=bearer(token), timeout=TIMEOUT,
    )
    assert (stack.data_dir / "media" / device / response.event_id).read_bytes() == media

    empty = stub.UploadEvent(iter([header_message(device, "empty.txt", size=0), FINISH]),
                             metadata=bearer(token), timeout=TIMEOUT)
    assert (stack.data_dir / "media" / device / empty.event_id).read_bytes() == b""
    events = {e.id: e for e in list_events(stub, token, device)}
    assert events[empty.event_id].size == 0
    assert events[empty.event_id].sha256 == hashlib.sha256(b"").hexdigest()
    assert events[response.event_id].size == len(media)
    assert events[response.event_id].media_type == "other"
