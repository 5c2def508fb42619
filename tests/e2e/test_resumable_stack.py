"""Resumable uploads through the real stack: the server is SIGKILLed mid-upload at random points and
restarted on the same ports; the upload resumes from QueryUpload and completes exactly once.
Plus the checksum pre-check through Envoy, REST and native."""

from __future__ import annotations

import hashlib
import os
import pathlib
import random
import signal
from collections.abc import Callable, Iterator

import grpc
import httpx
import pytest

from gallery.v1 import gallery_pb2 as pb
from gallery.v1 import gallery_pb2_grpc

from ..conftest import random_bytes, rich_error
from .conftest import Stack, start_stack, stop_stack

CHUNK = 128 * 1024
DATA = random_bytes(6 * 1024 * 1024 + 17)
SHA = hashlib.sha256(DATA).hexdigest()


def messages(upload_id: str, offset: int, stop_after: int | None,
             kill: Callable[[], None]) -> Iterator[pb.WriteUploadRequest]:
    for n, start in enumerate(range(offset, len(DATA), CHUNK)):
        if stop_after is not None and n == stop_after:
            kill()
            return
        piece = DATA[start:start + CHUNK]
        yield pb.WriteUploadRequest(device="cam1", upload_id=upload_id, write_offset=offset,
                                    data=piece, finish_write=start + len(piece) == len(DATA))


def test_kill_restart_resume(tmp_path: pathlib.Path, mint: Callable[..., str]) -> None:
    rng = random.Random()
    metadata = [("authorization", f"Bearer {mint()}")]
    env = {"GALLERY_MAKE_THUMBNAILS": "false"}
    stack = start_stack(tmp_path / "data", tmp_path / "gallery.log", extra_env=env)
    upload_id = "kill-restart-0001"
    try:
        for round_ in range(4):
            with grpc.insecure_channel(stack.envoy_grpc_address) as channel:
                stub = gallery_pb2_grpc.GalleryServiceStub(channel)
                if round_ == 0:
                    stub.StartUpload(pb.StartUploadRequest(
                        device="cam1", name="movie.bin", size=len(DATA), sha256=SHA,
                        upload_id=upload_id,
                    ), metadata=metadata)
                committed = stub.QueryUpload(
                    pb.QueryUploadRequest(device="cam1", upload_id=upload_id), metadata=metadata
                ).committed_size
                remaining = (len(DATA) - committed + CHUNK - 1) // CHUNK
                last = round_ == 3
                stop_after = None if last else rng.randrange(1, max(2, remaining // 2))
                server_pid = stack.server_pid

                def kill(pid: int = server_pid) -> None:
                    os.kill(pid, signal.SIGKILL)

                try:
                    session = stub.WriteUpload(
                        messages(upload_id, committed, stop_after, kill), metadata=metadata,
                        timeout=60,
                    )
                except grpc.RpcError:
                    assert not last
                else:
                    assert last and session.event_id
                    event = stub.GetEvent(pb.GetEventRequest(device="cam1", event_id=session.event_id),
                                          metadata=metadata)
                    assert event.sha256 == SHA and event.size == len(DATA)
                    events = list(stub.ListEvents(pb.ListEventsRequest(device="cam1"), metadata=metadata))
                    assert [e.id for e in events] == [session.event_id]
                    stored = stack.data_dir / "media" / "cam1" / session.event_id
                    assert hashlib.sha256(stored.read_bytes()).hexdigest() == SHA
                    again = stub.StartUpload(pb.StartUploadRequest(
                        device="cam1", name="movie.bin", size=len(DATA), sha256=SHA,
                        upload_id=upload_id,
                    ), metadata=metadata)
                    assert again.event_id == session.event_id
            if not last:
                stop_stack(stack)
                stack = start_stack(tmp_path / "data", tmp_path / "gallery.log", extra_env=env,
                                    ports=stack.ports)
                with grpc.insecure_channel(stack.envoy_grpc_address) as channel:
                    after = gallery_pb2_grpc.GalleryServiceStub(channel).QueryUpload(
                        pb.QueryUploadRequest(device="cam1", upload_id=upload_id), metadata=metadata
                    ).committed_size
                assert committed <= after <= committed + stop_after * CHUNK  # type: ignore[operator]
    finally:
        stop_stack(stack)


def test_checksums_rest_and_native(stack: Stack, envoy_channel: grpc.Channel,
                                   mint: Callable[..., str]) -> None:
    token = mint()
    metadata = [("authorization", f"Bearer {token}")]
    stub = gallery_pb2_grpc.GalleryServiceStub(envoy_channel)
    device = "checksums-cam"
    stored: dict[str, str] = {}
    for n in range(3):
        body = f"checksum file {n}".encode()
        sha = hashlib.sha256(body).hexdigest()
        stub.StartUpload(pb.StartUploadRequest(device=device, name=f"{n}.txt", upload_id=f"checks-{n:04d}",
                                               sha256=sha), metadata=metadata)
        done = stub.WriteUpload(iter([pb.WriteUploadRequest(
            device=device, upload_id=f"checks-{n:04d}", data=body, finish_write=True)]),
            metadata=metadata)
        stored[sha] = done.event_id
    wanted = [hashlib.sha256(f"absent {i}".encode()).hexdigest() for i in range(997)] + list(stored)
    native = stub.FindExistingChecksums(
        pb.FindExistingChecksumsRequest(device=device, sha256s=wanted), metadata=metadata
    )
    assert dict(native.existing) == stored
    with httpx.Client(base_url=stack.base_url, timeout=60) as http:
        response = http.post(f"/api/gallery/{device}/checksums", json={"sha256s": wanted},
                             headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200, response.text
        assert response.json() == {"existing": stored}
        # A body naming the path's own device is still taken (only another device is refused:
        # tests/e2e/test_bad_input.py, checksums-device-in-body).
        same = http.post(f"/api/gallery/{device}/checksums", json={"sha256s": wanted, "device": device},
                         headers={"Authorization": f"Bearer {token}"})
        assert (same.status_code, same.json()) == (200, {"existing": stored}), same.text
        too_many = http.post(f"/api/gallery/{device}/checksums", json={"sha256s": wanted + ["0" * 64]},
                             headers={"Authorization": f"Bearer {token}"})
        assert too_many.status_code == 400
        reader = mint(scope="gallery:read")
        ok = http.post(f"/api/gallery/{device}/checksums", json={"sha256s": wanted[-1:]},
                       headers={"Authorization": f"Bearer {reader}"})
        assert ok.status_code == 200 and ok.json() == {"existing": {wanted[-1]: stored[wanted[-1]]}}


def test_upload_of_a_deleted_event(stack: Stack, envoy_channel: grpc.Channel,
                                   mint: Callable[..., str]) -> None:
    """Through Envoy: once the event of a completed upload is deleted (over REST), Query and Write
    answer NOT_FOUND UPLOAD_EVENT_DELETED naming it; StartUpload with the id starts afresh."""
    token = mint()
    metadata = [("authorization", f"Bearer {token}")]
    stub = gallery_pb2_grpc.GalleryServiceStub(envoy_channel)
    device, upload_id = "deleted-cam", "deleted-0001"
    stub.StartUpload(pb.StartUploadRequest(device=device, name="a.txt", upload_id=upload_id),
                     metadata=metadata)
    done = stub.WriteUpload(iter([pb.WriteUploadRequest(
        device=device, upload_id=upload_id, data=b"gone soon", finish_write=True)]), metadata=metadata)
    with httpx.Client(base_url=stack.base_url, timeout=60) as http:
        deleted = http.delete(f"/api/gallery/{device}/events/{done.event_id}",
                              headers={"Authorization": f"Bearer {token}"})
    assert deleted.status_code == 200, deleted.text
    for call in (
        lambda: stub.QueryUpload(pb.QueryUploadRequest(device=device, upload_id=upload_id),
                                 metadata=metadata),
        lambda: stub.WriteUpload(iter([pb.WriteUploadRequest(
            device=device, upload_id=upload_id, data=b"x", finish_write=True)]), metadata=metadata),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        info, _ = rich_error(caught.value)
        assert info.reason == "UPLOAD_EVENT_DELETED" and info.metadata["event_id"] == done.event_id
    fresh = stub.StartUpload(pb.StartUploadRequest(device=device, name="a.txt", upload_id=upload_id),
                             metadata=metadata)
    assert (fresh.committed_size, fresh.event_id) == (0, "")
    # The fresh session is a real upload: it completes as a new event (and leaves the shared
    # stack's staging/ empty, as the other tests expect).
    again = stub.WriteUpload(iter([pb.WriteUploadRequest(
        device=device, upload_id=upload_id, data=b"back again", finish_write=True)]), metadata=metadata)
    assert again.event_id and again.event_id != done.event_id
    assert not (stack.data_dir / "staging" / "sessions" / device).exists()
