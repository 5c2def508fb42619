"""The real gRPC server in-process: interceptor (auth, status mapping), servicer, health, reflection."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from google.api import httpbody_pb2
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from gallery.v1 import gallery_pb2 as pb
from gallery.v1 import gallery_pb2_grpc
from gallery_server.rpc.interceptor import MAX_REFLECTION_STREAMS
from gallery_server.settings import Settings

from .conftest import rich_error, stored_files, wait_until

SERVICE_NAME = "gallery.v1.GalleryService"
GENERIC_INTERNAL = "internal error; the server log has the details"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 64


@dataclasses.dataclass
class Running:
    settings: Settings
    port: int
    channel: grpc.Channel
    stub: gallery_pb2_grpc.GalleryServiceStub
    token: Callable[..., str]

    def auth(self, **mint_kwargs: Any) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token(**mint_kwargs)}")]

    def files(self) -> list:
        return stored_files(self.settings.data_dir)


@pytest.fixture
def running(settings: Settings, mint, grpc_port: int) -> Iterator[Running]:  # type: ignore[no-untyped-def]
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    try:
        yield Running(settings, grpc_port, channel, gallery_pb2_grpc.GalleryServiceStub(channel), mint)
    finally:
        channel.close()


def error_info(error: grpc.RpcError) -> tuple[grpc.StatusCode, error_details_pb2.ErrorInfo, list]:
    info, violations = rich_error(error)
    return error.code(), info, violations


def expect_error(
    call: Callable[[], Any], code: grpc.StatusCode, reason: str
) -> tuple[error_details_pb2.ErrorInfo, list]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    got_code, details, violations = error_info(info.value)
    assert (got_code, details.reason) == (code, reason), info.value.details()
    return details, violations


def upload_requests(data: bytes, chunk: int = 64 << 10, thumbnail: bytes | None = None,
                    **header: Any) -> Iterator[pb.UploadEventRequest]:
    header.setdefault("device", "cam1")
    header.setdefault("name", "photo.png")
    yield pb.UploadEventRequest(header=pb.UploadHeader(**header))
    for start in range(0, len(data), chunk):
        yield pb.UploadEventRequest(media_chunk=data[start : start + chunk])
    if thumbnail is not None:
        yield pb.UploadEventRequest(thumbnail_chunk=thumbnail)
    yield pb.UploadEventRequest(finish=pb.UploadFinish())


def list_ids(running: Running, device: str = "cam1") -> list[str]:
    return [e.id for e in running.stub.ListEvents(pb.ListEventsRequest(device=device), metadata=running.auth())]


# -- health and reflection ------------------------------------------------------------------------


def test_health_answers_without_a_token(running: Running) -> None:
    health = health_pb2_grpc.HealthStub(running.channel)
    for service in ("", SERVICE_NAME):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as info:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    assert info.value.code() is grpc.StatusCode.NOT_FOUND


def test_reflection_answers_with_a_token_only(running: Running) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(running.channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME),
    ]
    listed, found = list(stub.ServerReflectionInfo(iter(requests), timeout=5, metadata=running.auth()))
    names = {s.name for s in listed.list_services_response.service}
    assert names >= {SERVICE_NAME, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
    assert found.file_descriptor_response.file_descriptor_proto
    with pytest.raises(grpc.RpcError) as info:
        list(stub.ServerReflectionInfo(iter(requests), timeout=5))
    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED


def test_reflection_streams_are_counted(running: Running) -> None:
    """A reflection stream holds a server thread while it waits for the next question: past
    MAX_REFLECTION_STREAMS open at once, another is refused at once, and one that ends frees its
    place (without the count, a few hundred idle streams took every thread)."""
    stub = reflection_pb2_grpc.ServerReflectionStub(running.channel)
    question = reflection_pb2.ServerReflectionRequest(list_services="")

    def asks_then_waits(done: threading.Event) -> Iterator[reflection_pb2.ServerReflectionRequest]:
        yield question
        done.wait(30)

    ends = [threading.Event() for _ in range(MAX_REFLECTION_STREAMS)]
    streams = [stub.ServerReflectionInfo(asks_then_waits(end), timeout=30, metadata=running.auth())
               for end in ends]
    try:
        for stream in streams:  # each has its answer: its handler runs, and waits
            assert next(stream).list_services_response.service
        with pytest.raises(grpc.RpcError) as info:
            list(stub.ServerReflectionInfo(iter([question]), timeout=5, metadata=running.auth()))
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert rich_error(info.value)[0].reason == "TOO_MANY_REFLECTION_STREAMS"
        ends[0].set()
        assert list(streams[0]) == []
        answers = list(stub.ServerReflectionInfo(iter([question]), timeout=5, metadata=running.auth()))
        assert answers[0].list_services_response.service
    finally:
        for end in ends:
            end.set()
        for stream in streams:
            stream.cancel()


# -- authentication -------------------------------------------------------------------------------


def test_unauthenticated_without_token(running: Running) -> None:
    info, _ = expect_error(lambda: running.stub.GetStats(pb.GetStatsRequest(device="cam1")),
                           grpc.StatusCode.UNAUTHENTICATED, "TOKEN_MISSING")
    assert info.metadata == {}


def test_unauthenticated_bad_header(running: Running) -> None:
    for authorization, reason in [
        ("Bearer", "TOKEN_MALFORMED"),
        ("Basic dXNlcjpwYXNz", "TOKEN_MALFORMED"),
        ("Bearer not.a.jwt", "TOKEN_INVALID"),
    ]:
        expect_error(lambda a=authorization: running.stub.GetStats(pb.GetStatsRequest(device="cam1"),
                                                                     metadata=[("authorization", a)]),
                     grpc.StatusCode.UNAUTHENTICATED, reason)


def test_unauthenticated_expired_and_wrong_secret(running: Running) -> None:
    for kwargs, reason in (({"ttl": -3600}, "TOKEN_EXPIRED"), ({"secret": "w" * 48}, "TOKEN_INVALID")):
        info, _ = expect_error(
            lambda kw=kwargs: running.stub.GetStats(pb.GetStatsRequest(device="cam1"), metadata=running.auth(**kw)),
            grpc.StatusCode.UNAUTHENTICATED, reason,
        )


def test_unauthenticated_on_every_kind_of_method(running: Running) -> None:
    code, reason = grpc.StatusCode.UNAUTHENTICATED, "TOKEN_MISSING"
    expect_error(lambda: list(running.stub.ListEvents(pb.ListEventsRequest(device="cam1"))), code, reason)
    expect_error(lambda: running.stub.UploadEvent(upload_requests(PNG)), code, reason)
    expect_error(lambda: running.stub.DeleteEvent(pb.DeleteEventRequest(device="cam1", event_id="evt_" + "a" * 22)),
                 code, reason)
    assert running.files() == []


# -- status mapping -------------------------------------------------------------------------------


def test_permission_denied_mapping(running: Running) -> None:
    info, _ = expect_error(
        lambda: running.stub.GetStats(pb.GetStatsRequest(device="cam1"), metadata=running.auth(devices=["cam2"])),
        grpc.StatusCode.PERMISSION_DENIED, "DEVICE_NOT_ALLOWED",
    )
    assert info.metadata["device"] == "cam1"
    expect_error(
        lambda: running.stub.UploadEvent(upload_requests(PNG), metadata=running.auth(scope="gallery:read")),
        grpc.StatusCode.PERMISSION_DENIED, "SCOPE_MISSING",
    )
    assert running.files() == []


def test_invalid_argument_mapping_has_field_violation(running: Running) -> None:
    _, violations = expect_error(
        lambda: running.stub.GetStats(pb.GetStatsRequest(device="../x"), metadata=running.auth()),
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_DEVICE_ID",
    )
    assert [(v.field, v.reason) for v in violations] == [("device", "INVALID_DEVICE_ID")]


def test_streaming_response_error_mapping(running: Running) -> None:
    _, violations = expect_error(
        lambda: list(running.stub.ListEvents(pb.ListEventsRequest(device="cam1", limit=5000), metadata=running.auth())),
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_LIMIT",
    )
    assert [v.field for v in violations] == ["limit"]


def test_not_found_mapping(running: Running) -> None:
    info, _ = expect_error(
        lambda: running.stub.GetEvent(pb.GetEventRequest(device="cam1", event_id="evt_" + "a" * 22),
                                      metadata=running.auth()),
        grpc.StatusCode.NOT_FOUND, "EVENT_NOT_FOUND",
    )
    assert info.metadata["event_id"] == "evt_" + "a" * 22


def test_metadata_too_large_mapping(running: Running) -> None:
    metadata = struct_pb2.Struct()
    metadata.update({"blob": "x" * (running.settings.max_metadata_bytes + 10)})
    _, violations = expect_error(
        lambda: running.stub.UploadEvent(upload_requests(PNG, metadata=metadata), metadata=running.auth()),
        grpc.StatusCode.INVALID_ARGUMENT, "METADATA_TOO_LARGE",
    )
    assert [v.field for v in violations] == ["metadata"]
    assert running.files() == []


@pytest.mark.parametrize(
    "value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "infinity", "minus-infinity"]
)
def test_non_finite_metadata_mapping(running: Running, value: float) -> None:
    metadata = struct_pb2.Struct()
    metadata.update({"ok": 1, "bad": value})
    _, violations = expect_error(
        lambda: running.stub.UploadEvent(upload_requests(PNG, metadata=metadata), metadata=running.auth()),
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_METADATA",
    )
    assert [v.field for v in violations] == ["metadata"]
    assert running.files() == []
    assert list_ids(running) == []


def test_too_large_mapping(running: Running) -> None:
    limit = running.settings.max_thumbnail_bytes
    chunk = b"t" * (4 << 20)

    def requests() -> Iterator[pb.UploadEventRequest]:
        yield pb.UploadEventRequest(header=pb.UploadHeader(device="cam1", name="a.png"))
        yield pb.UploadEventRequest(media_chunk=PNG)
        for _ in range(limit // len(chunk) + 1):
            yield pb.UploadEventRequest(thumbnail_chunk=chunk)
        yield pb.UploadEventRequest(finish=pb.UploadFinish())

    info, _ = expect_error(lambda: running.stub.UploadEvent(requests(), metadata=running.auth(), timeout=30),
                           grpc.StatusCode.RESOURCE_EXHAUSTED, "UPLOAD_TOO_LARGE")
    assert info.metadata["limit"] == str(limit)
    assert running.files() == []


@pytest.mark.parametrize(
    "declared",
    [{}, {"size": len(PNG)}, {"size": len(PNG), "sha256": hashlib.sha256(PNG).hexdigest()}, {"size": 5 * len(PNG)}],
    ids=["nothing-declared", "right-size", "right-size-and-sha256", "larger-size"],
)
def test_unfinished_stream_is_refused(running: Running, declared: dict[str, Any]) -> None:
    # A declared size does not replace the finish (it proves neither the thumbnail nor intent), and
    # the finish check comes before the size check: a larger declared size is still UPLOAD_NOT_FINISHED.
    def unfinished() -> Iterator[pb.UploadEventRequest]:
        yield pb.UploadEventRequest(header=pb.UploadHeader(device="cam1", name="a.png", **declared))
        yield pb.UploadEventRequest(media_chunk=PNG)
        yield pb.UploadEventRequest(thumbnail_chunk=b"thumb")

    _, violations = expect_error(lambda: running.stub.UploadEvent(unfinished(), metadata=running.auth()),
                                 grpc.StatusCode.INVALID_ARGUMENT, "UPLOAD_NOT_FINISHED")
    assert [v.field for v in violations] == ["finish"]
    assert running.files() == []
    assert list_ids(running) == []


def test_upload_failure_mid_stream_leaves_nothing(running: Running) -> None:
    expect_error(lambda: running.stub.UploadEvent(upload_requests(PNG, chunk=1000, size=5000),
                                                  metadata=running.auth()),
                 grpc.StatusCode.INVALID_ARGUMENT, "SIZE_MISMATCH")
    expect_error(lambda: running.stub.UploadEvent(upload_requests(PNG, sha256="0" * 64), metadata=running.auth()),
                 grpc.StatusCode.INVALID_ARGUMENT, "SHA256_MISMATCH")
    assert running.files() == []
    assert list_ids(running) == []


def test_internal_error_is_generic(running: Running, caplog: pytest.LogCaptureFixture) -> None:
    # A real failure outside the domain: the staging folder disappears under the server.
    shutil.rmtree(running.settings.data_dir / "staging")
    with caplog.at_level(logging.INFO, logger="gallery.access"):
        with pytest.raises(grpc.RpcError) as info:
            running.stub.UploadEvent(upload_requests(PNG), metadata=running.auth())
        # The access line is written as the handler returns, possibly just after the client has
        # its status.
        assert wait_until(lambda: any(r.getMessage() == "rpc" for r in caplog.records))
    error = info.value
    assert error.code() is grpc.StatusCode.INTERNAL
    assert error.details() == GENERIC_INTERNAL
    assert "staging" not in error.details() and str(running.settings.data_dir) not in error.details()
    status = rpc_status.from_call(error)
    assert status is not None and status.message == GENERIC_INTERNAL and list(status.details) == []
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and r.name == "gallery.access"]
    assert len(errors) == 1 and errors[0].exc_info and isinstance(errors[0].exc_info[1], FileNotFoundError)
    access = [r for r in caplog.records if r.getMessage() == "rpc"]
    assert [getattr(r, "code", None) for r in access] == ["INTERNAL"]


def test_short_reads_run_on_their_own_threads(running: Running, caplog: pytest.LogCaptureFixture) -> None:
    """Lists, stats and gets run on the few read threads (GALLERY_GRPC_READ_WORKERS), uploads and
    streams on the server's pool. grpcio honours a per-method pool through an attribute of the
    handler (rpc/interceptor.py); this fails if an upgrade stops honouring it."""
    from gallery_server.rpc.server import QUICK_READS

    metadata = running.auth()
    with caplog.at_level(logging.INFO, logger="gallery.access"):
        running.stub.UploadEvent(upload_requests(PNG), metadata=metadata)
        running.stub.GetStats(pb.GetStatsRequest(device="cam1"), metadata=metadata)
        running.stub.ListEventsJson(pb.ListEventsRequest(device="cam1"), metadata=metadata)
        running.stub.GetDevicePaths(pb.GetDevicePathsRequest(device="cam1"), metadata=metadata)
        list(running.stub.ListEvents(pb.ListEventsRequest(device="cam1"), metadata=metadata))
        assert wait_until(lambda: len([r for r in caplog.records if r.getMessage() == "rpc"]) == 5)
    threads = {r.method: r.threadName for r in caplog.records if r.getMessage() == "rpc"}
    assert len(threads) == 5
    for method, thread in threads.items():
        assert thread.startswith("read" if method in QUICK_READS else "rpc"), (method, thread)
    assert sum(method in QUICK_READS for method in threads) == 3


def test_database_error_is_generic(running: Running) -> None:
    engine = sa.create_engine(running.settings.database_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE events")
            conn.exec_driver_sql("DROP TABLE event_counts")  # what GetStats reads
    finally:
        engine.dispose()
    with pytest.raises(grpc.RpcError) as info:
        running.stub.GetStats(pb.GetStatsRequest(device="cam1"), metadata=running.auth())
    assert info.value.code() is grpc.StatusCode.INTERNAL
    assert info.value.details() == GENERIC_INTERNAL
    assert "events" not in info.value.details() and "event_counts" not in info.value.details()


# -- round trips ----------------------------------------------------------------------------------


def test_streaming_upload_round_trip(running: Running) -> None:
    stub, auth = running.stub, running.auth()
    data = PNG * 40  # ~640 KiB
    thumbnail = b"\xff\xd8\xff\xe0" + b"t" * 1000
    metadata = struct_pb2.Struct()
    metadata.update({"where": {"lat": 48.1, "lon": 11.5}, "tags": ["x"]})
    response = stub.UploadEvent(
        upload_requests(data, chunk=100_000, thumbnail=thumbnail, size=len(data),
                        sha256=hashlib.sha256(data).hexdigest(), metadata=metadata),
        metadata=auth, timeout=30,
    )
    assert response.success and response.event_id.startswith("evt_")
    event = stub.GetEvent(pb.GetEventRequest(device="cam1", event_id=response.event_id), metadata=auth)
    assert (event.name, event.media_type, event.mime_type, event.size, event.has_thumbnail) == (
        "photo.png", "image", "image/png", float(len(data)), True
    )
    assert event.sha256 == hashlib.sha256(data).hexdigest()
    assert event.metadata == metadata
    assert abs(event.created.ToDatetime().timestamp() - time.time()) < 120
    media_path = running.settings.data_dir / "media" / "cam1" / response.event_id
    assert media_path.read_bytes() == data
    assert list_ids(running) == [response.event_id]
    stats = stub.GetStats(pb.GetStatsRequest(device="cam1"), metadata=auth)
    assert (stats.total_events, stats.total_size) == (1, len(data))
    assert stub.DeleteEvent(pb.DeleteEventRequest(device="cam1", event_id=response.event_id), metadata=auth).success
    assert running.files() == []
    expect_error(lambda: stub.DeleteEvent(pb.DeleteEventRequest(device="cam1", event_id=response.event_id),
                                          metadata=auth),
                 grpc.StatusCode.NOT_FOUND, "EVENT_NOT_FOUND")


def test_large_chunks_upload(running: Running) -> None:
    data = bytes(range(256)) * (4 << 12)  # 4 MiB in one message, as native clients may send
    response = running.stub.UploadEvent(upload_requests(data * 2, chunk=len(data)), metadata=running.auth(),
                                        timeout=30)
    path = running.settings.data_dir / "media" / "cam1" / response.event_id
    assert path.stat().st_size == 2 * len(data)


def test_device_paths(running: Running) -> None:
    response = running.stub.GetDevicePaths(pb.GetDevicePathsRequest(device="device123"), metadata=running.auth())
    root = running.settings.data_dir / "gallery" / "device123"
    assert response.paths.incoming == str(root / "incoming")
    assert response.paths.thumbnails == str(root / "thumbnails")


def test_signed_upload_is_public(running: Running) -> None:
    urls = running.stub.CreateUploadUrl(pb.CreateUploadUrlRequest(device="cam1", filename="s.png"),
                                        metadata=running.auth())
    token = urls.upload_url.rsplit("/", 1)[1]

    def put(token: str, data: bytes) -> pb.UploadEventResponse:
        return running.stub.PutSignedUpload(iter([
            pb.PutSignedUploadRequest(device="cam1", token=token, http_body=httpbody_pb2.HttpBody(data=data[:10])),
            pb.PutSignedUploadRequest(http_body=httpbody_pb2.HttpBody(data=data[10:])),
        ]), metadata=[("x-gallery-content-length", str(len(data)))])  # no authorization: the token is the proof

    payload, signature = token.split(".")
    expect_error(lambda: put(payload[:-1] + ("A" if payload[-1] != "A" else "B") + "." + signature, PNG),
                 grpc.StatusCode.PERMISSION_DENIED, "URL_SIGNATURE_INVALID")
    assert put(token, PNG).event_id == urls.event_id
    expect_error(lambda: put(token, PNG), grpc.StatusCode.PERMISSION_DENIED, "URL_ALREADY_USED")
    assert list_ids(running) == [urls.event_id]


# -- cancellation ---------------------------------------------------------------------------------
#
# The server sees a cancelled (or timed-out) stream as a request iterator that stops. Whether it was a
# normal end or a cancellation is known only once gRPC has processed the cancellation, so these tests
# repeat the scenario: one lucky round proves little.

ROUNDS = 4


def staged(running: Running) -> list:
    return sorted((running.settings.data_dir / "staging").iterdir())


def assert_nothing_left(running: Running, round_: int) -> None:
    # Once staging is empty the server has either discarded the upload or moved it into media/.
    assert wait_until(lambda: not staged(running)), f"round {round_}: staged files left: {staged(running)}"
    time.sleep(0.05)  # a row, if any, is committed right after the move
    assert running.files() == [], f"round {round_}: a cancelled upload was stored"
    assert list_ids(running) == [], f"round {round_}: a cancelled upload became an event"


def cut_short(declared_size: int | None, release: threading.Event) -> Iterator[pb.UploadEventRequest]:
    """An upload whose client stops mid-stream, before its finish. With a declared size of len(PNG)
    all the media has arrived and only the rest of the thumbnail (and the finish) is missing."""
    header = pb.UploadHeader(device="cam1", name="cut.png")
    if declared_size is not None:
        header.size = declared_size
    yield pb.UploadEventRequest(header=header)
    yield pb.UploadEventRequest(media_chunk=PNG)
    yield pb.UploadEventRequest(thumbnail_chunk=b"thumb")
    release.wait(10)  # hold the stream open, as a slow client would


@pytest.mark.parametrize("declared_size", [None, 10 * len(PNG), len(PNG)], ids=["no-size", "larger-size", "media-size"])
def test_client_cancel_mid_stream_leaves_nothing(running: Running, declared_size: int | None) -> None:
    for round_ in range(ROUNDS):
        release = threading.Event()
        future = running.stub.UploadEvent.future(cut_short(declared_size, release), metadata=running.auth())
        try:
            assert wait_until(lambda: len(staged(running)) == 2), "the server never staged the upload"
            assert future.cancel()
            with pytest.raises(grpc.FutureCancelledError):
                future.result()
            assert_nothing_left(running, round_)
        finally:
            release.set()


@pytest.mark.parametrize("declared_size", [None, 10 * len(PNG), len(PNG)], ids=["no-size", "larger-size", "media-size"])
def test_deadline_mid_stream_leaves_nothing(running: Running, declared_size: int | None) -> None:
    for round_ in range(ROUNDS):
        release = threading.Event()
        try:
            with pytest.raises(grpc.RpcError) as info:
                running.stub.UploadEvent(cut_short(declared_size, release), metadata=running.auth(), timeout=0.15)
            assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            assert_nothing_left(running, round_)
        finally:
            release.set()
