"""The device's own event id through the real stack: REST multipart field `device_event_id` and the
native UploadHeader field. A re-sent capture answers the existing event; concurrent re-sends make
one event; the same id with other content is 409 DEVICE_EVENT_ID_CONFLICT and stores nothing."""

from __future__ import annotations

import concurrent.futures
import hashlib
import pathlib
from collections.abc import Callable, Iterator

import grpc
import httpx

from gallery.v1 import gallery_pb2 as pb
from gallery.v1 import gallery_pb2_grpc

from ..conftest import random_bytes, rich_error, stored_files
from .conftest import Stack
from .test_resumable_cuts import Server
from .test_signed_urls import error_reason, new_device


def post(stack: Stack, token: str, device: str, data: bytes, device_event_id: str) -> httpx.Response:
    with httpx.Client(base_url=stack.base_url, timeout=60) as http:
        return http.post(
            f"/api/gallery/{device}/upload", headers={"Authorization": f"Bearer {token}"},
            data={"name": "capture.jpg", "device_event_id": device_event_id},
            files={"event": ("capture.jpg", data)},
        )


def test_rest_resend_race_and_conflict(stack: Stack, mint: Callable[..., str]) -> None:
    token = mint()
    device = new_device()
    data = random_bytes(300_000)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda _: post(stack, token, device, data, "DCIM/0042"), range(4)))
    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
    ids = {r.json()["eventId"] for r in responses}
    assert len(ids) == 1 and all(r.json()["success"] is True for r in responses)
    [event_id] = ids
    with httpx.Client(base_url=stack.base_url, timeout=60) as http:
        events = http.get(f"/api/gallery/{device}/events", headers={"Authorization": f"Bearer {token}"}).json()
    assert [e["id"] for e in events] == [event_id]
    assert [p.name for p in (stack.data_dir / "media" / device).iterdir()] == [event_id]
    files = stored_files(stack.data_dir)

    again = post(stack, token, device, data, "DCIM/0042")
    assert again.status_code == 200 and again.json() == {"success": True, "eventId": event_id}
    conflict = post(stack, token, device, random_bytes(1000), "DCIM/0042")
    assert conflict.status_code == 409, conflict.text
    assert error_reason(conflict) == "DEVICE_EVENT_ID_CONFLICT"
    assert stored_files(stack.data_dir) == files


def test_native_header_field(stack: Stack, envoy_channel: grpc.Channel, mint: Callable[..., str]) -> None:
    stub = gallery_pb2_grpc.GalleryServiceStub(envoy_channel)
    metadata = [("authorization", f"Bearer {mint()}")]
    device = new_device()

    def parts(data: bytes) -> Iterator[pb.UploadEventRequest]:
        yield pb.UploadEventRequest(header=pb.UploadHeader(
            device=device, name="clip.mp4", device_event_id="clip-7", sha256=hashlib.sha256(data).hexdigest()))
        yield pb.UploadEventRequest(media_chunk=data)
        yield pb.UploadEventRequest(finish=pb.UploadFinish())

    data = random_bytes(100_000)
    first = stub.UploadEvent(parts(data), metadata=metadata)
    assert stub.UploadEvent(parts(data), metadata=metadata).event_id == first.event_id
    try:
        stub.UploadEvent(parts(b"different"), metadata=metadata)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.ALREADY_EXISTS
        assert rich_error(error)[0].reason == "DEVICE_EVENT_ID_CONFLICT"
    else:
        raise AssertionError("a conflicting device_event_id was accepted")
    events = list(stub.ListEvents(pb.ListEventsRequest(device=device), metadata=metadata))
    assert [e.id for e in events] == [first.event_id]


def test_replicas_race_on_postgresql(postgres_url: str, tmp_path: pathlib.Path, mint: Callable[..., str]) -> None:
    """Two server processes (replicas) on one PostgreSQL and one data root; re-sends of a capture
    race across both: one event, one file, every caller told its id."""
    replicas = [Server(tmp_path, name=f"replica-{n}", env={"GALLERY_DATABASE_URL": postgres_url})
                for n in range(2)]
    for replica in replicas:
        replica.start()  # one after the other: each creates the tables if missing
    try:
        metadata = [("authorization", f"Bearer {mint()}")]
        device = new_device()
        data = random_bytes(400_000)

        def upload(n: int) -> str:
            def parts() -> Iterator[pb.UploadEventRequest]:
                yield pb.UploadEventRequest(header=pb.UploadHeader(
                    device=device, name="race.jpg", device_event_id="IMG_0001"))
                for i in range(0, len(data), 64 * 1024):
                    yield pb.UploadEventRequest(media_chunk=data[i:i + 64 * 1024])
                yield pb.UploadEventRequest(finish=pb.UploadFinish())

            with grpc.insecure_channel(replicas[n % 2].address) as channel:
                stub = gallery_pb2_grpc.GalleryServiceStub(channel)
                return stub.UploadEvent(parts(), metadata=metadata, timeout=60).event_id

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            ids = set(pool.map(upload, range(8)))
        assert len(ids) == 1, ids
        with grpc.insecure_channel(replicas[1].address) as channel:
            events = list(gallery_pb2_grpc.GalleryServiceStub(channel).ListEvents(
                pb.ListEventsRequest(device=device), metadata=metadata))
        assert [e.id for e in events] == list(ids)
        assert [p.name for p in (replicas[0].data_dir / "media" / device).iterdir()] == list(ids)
        assert not [p for p in (replicas[0].data_dir / "staging").rglob("*") if p.is_file()]
    finally:
        for replica in replicas:
            replica.stop()
