"""The bound on upload messages in flight (receiving.py) on the real gRPC server, in-process: more
uploads at once than permits, on every upload path, all stored whole; a silent client holds no one up."""

from __future__ import annotations

import hashlib
import pathlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from google.api import httpbody_pb2

from gallery.v1 import gallery_pb2 as pb
from gallery.v1 import gallery_pb2_grpc
from gallery_server.settings import Settings

from .conftest import make_settings, random_bytes

PERMITS = 2
CHUNK = 64 << 10


@pytest.fixture
def settings(tmp_path: pathlib.Path, database_url: str) -> Settings:
    data = tmp_path / "data"
    data.mkdir()
    return make_settings(
        data, database_url, upload_messages_in_flight=PERMITS, max_uploads_per_device=16,
        max_uploads_total=32,
    )


@pytest.fixture
def stub(grpc_port: int) -> Iterator[gallery_pb2_grpc.GalleryServiceStub]:
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    try:
        yield gallery_pb2_grpc.GalleryServiceStub(channel)
    finally:
        channel.close()


@pytest.fixture
def auth(mint: Callable[..., str]) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {mint()}")]


def chunks(data: bytes) -> Iterator[bytes]:
    for start in range(0, len(data), CHUNK):
        yield data[start : start + CHUNK]


# Each path: prepare(stub, auth, device, data) makes what the upload needs (a session, a URL) and
# returns the upload itself, so that only the uploads run at once (SQLite serializes writers).


def native(stub: Any, auth: list, device: str, data: bytes) -> Callable[[], str]:
    def requests() -> Iterator[pb.UploadEventRequest]:
        yield pb.UploadEventRequest(header=pb.UploadHeader(device=device, name="n.bin", size=len(data)))
        for chunk in chunks(data):
            yield pb.UploadEventRequest(media_chunk=chunk)
        yield pb.UploadEventRequest(finish=pb.UploadFinish(sha256=hashlib.sha256(data).hexdigest()))

    return lambda: stub.UploadEvent(requests(), metadata=auth, timeout=60).event_id


def resumable(stub: Any, auth: list, device: str, data: bytes) -> Callable[[], str]:
    session = stub.StartUpload(pb.StartUploadRequest(device=device, name="r.bin", size=len(data)),
                               metadata=auth, timeout=30)

    def requests() -> Iterator[pb.WriteUploadRequest]:
        for i, chunk in enumerate(chunks(data)):
            first = i == 0
            yield pb.WriteUploadRequest(
                device=device if first else "", upload_id=session.upload_id if first else "",
                write_offset=0, data=chunk,
            )
        yield pb.WriteUploadRequest(finish_write=True)

    return lambda: stub.WriteUpload(requests(), metadata=auth, timeout=60).event_id


def form(stub: Any, auth: list, device: str, data: bytes) -> Callable[[], str]:
    boundary = "permits-boundary"
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nf.bin\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"event\"; filename=\"f.bin\"\r\n"
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + data + f"\r\n--{boundary}--\r\n".encode()

    def requests() -> Iterator[pb.UploadEventFormRequest]:
        for i, chunk in enumerate(chunks(body)):
            yield pb.UploadEventFormRequest(
                device=device if i == 0 else "",
                http_body=httpbody_pb2.HttpBody(
                    content_type=f"multipart/form-data; boundary={boundary}" if i == 0 else "", data=chunk,
                ),
            )

    return lambda: stub.UploadEventForm(requests(), metadata=auth, timeout=60).event_id


def signed_put(stub: Any, auth: list, device: str, data: bytes) -> Callable[[], str]:
    url = stub.CreateUploadUrl(pb.CreateUploadUrlRequest(device=device, filename="s.bin"), metadata=auth,
                               timeout=30).upload_url
    token = url.rsplit("/", 1)[-1]

    def requests() -> Iterator[pb.PutSignedUploadRequest]:
        for i, chunk in enumerate(chunks(data)):
            yield pb.PutSignedUploadRequest(
                device=device if i == 0 else "", token=token if i == 0 else "",
                http_body=httpbody_pb2.HttpBody(data=chunk),
            )

    metadata = [("x-gallery-content-length", str(len(data)))]
    return lambda: stub.PutSignedUpload(requests(), metadata=metadata, timeout=60).event_id


PATHS = {"native": native, "resumable": resumable, "form": form, "signed_put": signed_put}


def test_more_uploads_than_permits_on_every_path_all_stored_whole(
    stub: Any, auth: list, settings: Settings
) -> None:
    jobs = [(name, f"cam{i % 3}", random_bytes((1 << 20) + 1000 * i))
            for i, name in enumerate(list(PATHS) * 3)]  # 12 uploads at once, 2 permits
    uploads = [PATHS[name](stub, auth, device, data) for name, device, data in jobs]
    results: list[Any] = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def one(index: int) -> None:
        barrier.wait()
        try:
            results[index] = uploads[index]()
        except BaseException as exc:  # noqa: BLE001 - reported below
            results[index] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    failures = [(jobs[i][0], r) for i, r in enumerate(results) if not isinstance(r, str) or not r]
    assert not failures, failures
    for (name, device, data), event_id in zip(jobs, results, strict=True):
        event = stub.GetEvent(pb.GetEventRequest(device=device, event_id=event_id), metadata=auth)
        assert (event.size, event.sha256) == (len(data), hashlib.sha256(data).hexdigest()), name
        stored = settings.data_dir / "media" / device / event_id
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == event.sha256, name


def test_a_silent_upload_holds_no_other_upload_up(stub: Any, auth: list) -> None:
    release = threading.Event()

    def silent() -> Iterator[pb.UploadEventRequest]:
        yield pb.UploadEventRequest(header=pb.UploadHeader(device="cam1", name="silent.bin"))
        yield pb.UploadEventRequest(media_chunk=b"x" * 1000)
        release.wait(30)  # connected, sending nothing

    silent_calls = [stub.UploadEvent.future(silent(), metadata=auth) for _ in range(PERMITS + 1)]
    try:
        time.sleep(0.5)  # every permit is with a silent stream now, or was
        data = random_bytes(2 << 20)
        started = time.monotonic()
        event_id = native(stub, auth, "cam2", data)()
        assert event_id and time.monotonic() - started < 10
    finally:
        release.set()
        for call in silent_calls:
            call.cancel()
