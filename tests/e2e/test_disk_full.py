"""A full disk, for real: the data root of a real stack is a small tmpfs (64 MiB) that the test fills.

* Below the headroom (GALLERY_MIN_FREE_BYTES) uploads are refused before any byte is stored: REST
  507 with reason INSUFFICIENT_STORAGE (JSON google.rpc.Status), native gRPC RESOURCE_EXHAUSTED.
* An upload that starts above the headroom is stopped while it streams, before the disk is full.
* With no headroom at all, the real ENOSPC is the same clean error, on every path: multipart,
  native resumable WriteUpload and pre-signed Content-Range PUT (whose committed bytes stay intact).
* No partial file is left in staging/ or media/; reads keep working; once space returns, uploads
  work again.
* A file dropped into an incoming folder is copied only when the copy fits above the headroom: it
  waits in place until then, and is imported once space returns.

Needs root (mount -t tmpfs); skipped with the reason otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import time
from collections.abc import Callable, Iterator

import grpc
import httpx
import pytest

from gallery.v1 import gallery_pb2 as pb
from gallery.v1 import gallery_pb2_grpc
from gallery_server import auth

from ..conftest import random_bytes, rich_error, small_disk, stored_files
from .conftest import Stack, start_stack, stop_stack

MiB = 1 << 20
SIZE = "64m"
HEADROOM = 16 * MiB


@pytest.fixture
def tmpfs(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    with small_disk(tmp_path / "small-disk", SIZE) as mount:
        yield mount


def free(path: pathlib.Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill_to(path: pathlib.Path, ballast: pathlib.Path, left: int) -> None:
    """Grow `ballast` until `left` bytes (or fewer) are free."""
    with ballast.open("ab") as f:
        while (gap := free(path) - left) > 0:
            try:
                f.write(b"\0" * min(gap, 4 * MiB))
                f.flush()
            except OSError:  # ENOSPC: as full as it gets
                return


def multipart(http: httpx.Client, headers: dict[str, str], device: str, data: bytes) -> httpx.Response:
    return http.post(f"/api/gallery/{device}/upload", headers=headers,
                     files={"event": ("f.bin", data, "application/octet-stream")}, data={"name": "f.bin"})


def native(stub: gallery_pb2_grpc.GalleryServiceStub, md, device: str, chunks: Iterator[bytes]) -> str:
    def parts() -> Iterator[pb.UploadEventRequest]:
        yield pb.UploadEventRequest(header=pb.UploadHeader(device=device, name="n.bin"))
        for chunk in chunks:
            yield pb.UploadEventRequest(media_chunk=chunk)
        yield pb.UploadEventRequest(finish=pb.UploadFinish())

    return str(stub.UploadEvent(parts(), metadata=md, timeout=60).event_id)


def assert_refused_507(r: httpx.Response, headroom: int, free_below: int) -> None:
    """Refused for want of space, telling the headroom and the space left (below `free_below`)."""
    assert r.status_code == 507, r.text
    assert r.headers["content-type"] == "application/json"
    assert "retry-after" not in r.headers  # waiting alone frees no space
    body = r.json()
    assert set(body) == {"code", "message", "details"}
    assert body["code"] == 8  # RESOURCE_EXHAUSTED
    [info] = body["details"]
    assert info["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"
    assert info["reason"] == "INSUFFICIENT_STORAGE"
    assert set(info["metadata"]) == {"free_bytes", "min_free_bytes"}
    assert info["metadata"]["min_free_bytes"] == str(headroom)
    assert 0 <= int(info["metadata"]["free_bytes"]) < free_below


def no_partial_files(stack: Stack, stored: set[pathlib.Path]) -> None:
    assert set(stored_files(stack.data_dir)) == stored


def test_full_disk_refuses_uploads_cleanly_and_recovers(tmpfs: pathlib.Path, mint: Callable[..., str]) -> None:
    data_dir = tmpfs / "data"
    log_dir = tmpfs.parent
    env = {"GALLERY_MAKE_THUMBNAILS": "false", "GALLERY_MIN_FREE_BYTES": str(HEADROOM)}
    stack = start_stack(data_dir, log_dir / "gallery.log", extra_env=env)
    token = mint(scope=f"{auth.READ} {auth.WRITE} {auth.ADMIN}")
    headers = {"Authorization": f"Bearer {token}"}
    md = [("authorization", f"Bearer {token}")]
    ballast = tmpfs / "ballast"
    try:
        with httpx.Client(base_url=stack.base_url, timeout=60) as http, \
                grpc.insecure_channel(stack.envoy_grpc_address) as channel:
            stub = gallery_pb2_grpc.GalleryServiceStub(channel)
            kept = random_bytes(MiB)
            r = multipart(http, headers, "disk1", kept)
            assert r.status_code == 200, r.text
            kept_id = r.json()["eventId"]
            stored = set(stored_files(stack.data_dir))

            # 1. Below the headroom: refused before a byte is stored, on every path.
            session = stub.StartUpload(pb.StartUploadRequest(device="disk1", name="r.bin", size=10),
                                       metadata=md)  # before: its writes are refused below
            fill_to(tmpfs, ballast, HEADROOM - 4 * MiB)
            assert_refused_507(multipart(http, headers, "disk1", random_bytes(100_000)), HEADROOM, HEADROOM)
            with pytest.raises(grpc.RpcError) as refused:
                native(stub, md, "disk1", iter([random_bytes(1000)]))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert rich_error(refused.value)[0].reason == "INSUFFICIENT_STORAGE"
            with pytest.raises(grpc.RpcError) as no_session:  # a session is a file kept for a day
                stub.StartUpload(pb.StartUploadRequest(device="disk1", name="s.bin", size=10), metadata=md)
            assert no_session.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert rich_error(no_session.value)[0].reason == "INSUFFICIENT_STORAGE"
            with pytest.raises(grpc.RpcError) as resumable:
                stub.WriteUpload(iter([pb.WriteUploadRequest(
                    device="disk1", upload_id=session.upload_id, data=b"0123456789", finish_write=True,
                )]), metadata=md)
            assert rich_error(resumable.value)[0].reason == "INSUFFICIENT_STORAGE"
            url = http.get("/api/gallery/disk1/upload-url?filename=p.bin", headers=headers).json()["upload_url"]
            path = httpx.URL(url).path
            assert_refused_507(http.put(path, content=random_bytes(1000)), HEADROOM, HEADROOM)
            assert_refused_507(http.put(path, content=random_bytes(1000),
                                        headers={"Content-Range": "bytes 0-999/2000"}), HEADROOM, HEADROOM)
            status = http.get(path).json()
            assert (status["committedSize"], status["complete"]) == (0, False)
            # The session started before exists (empty, resumable once space returns); the range
            # PUT's was never made; nothing else was written.
            sessions = stack.data_dir / "staging" / "sessions" / "disk1"
            stored |= {sessions / session.upload_id}
            assert [p.name for p in sessions.iterdir()] == [session.upload_id]
            assert all(p.stat().st_size == 0 for p in sessions.iterdir())
            no_partial_files(stack, stored)

            # Reads keep working, and the admin status says why uploads are refused.
            listed = http.get("/api/gallery/disk1/events", headers=headers)
            assert listed.status_code == 200 and [e["id"] for e in listed.json()] == [kept_id]
            content = http.get(f"/api/gallery/disk1/events/{kept_id}/content", headers=headers)
            assert content.status_code == 200 and content.content == kept
            status = http.get("/api/admin/status", headers=headers).json()
            assert status["disk"]["accepting_uploads"] is False
            assert status["disk"]["min_free_bytes"] == HEADROOM
            assert status["disk"]["free_bytes"] < HEADROOM

            # 2. Space returns: uploads work again.
            ballast.unlink()
            r = multipart(http, headers, "disk1", random_bytes(200_000))
            assert r.status_code == 200, r.text
            assert http.get("/api/admin/status", headers=headers).json()["disk"]["accepting_uploads"] is True
            stored = set(stored_files(stack.data_dir))

            # 3. Above the headroom at the start, but too big to fit above it: stopped mid-stream,
            # before the disk is full, with nothing left behind.
            fill_to(tmpfs, ballast, HEADROOM + 12 * MiB)
            lowest = [free(tmpfs)]

            def big() -> Iterator[bytes]:
                for _ in range(40):
                    lowest[0] = min(lowest[0], free(tmpfs))
                    yield random_bytes(MiB)

            with pytest.raises(grpc.RpcError) as stopped:
                native(stub, md, "disk1", big())
            assert stopped.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert rich_error(stopped.value)[0].reason == "INSUFFICIENT_STORAGE"
            assert lowest[0] > HEADROOM - 9 * MiB  # at most one check interval below the headroom
            no_partial_files(stack, stored)
            ballast.unlink()
    finally:
        stop_stack(stack)
        ballast.unlink(missing_ok=True)
    assert stack.process.returncode == 0, stack.log()

    # 4. No headroom configured and a truly full disk: ENOSPC is the same clean 507.
    stack = start_stack(data_dir, log_dir / "gallery2.log",
                        extra_env={**env, "GALLERY_MIN_FREE_BYTES": "0"}, ports=stack.ports)
    try:
        with httpx.Client(base_url=stack.base_url, timeout=60) as http, \
                grpc.insecure_channel(stack.envoy_grpc_address) as channel:
            stub = gallery_pb2_grpc.GalleryServiceStub(channel)
            # Two resumable uploads with 1 MiB committed each: native, and a pre-signed range PUT.
            first = random_bytes(MiB)
            native_id = stub.StartUpload(pb.StartUploadRequest(
                device="disk1", name="r.bin", size=8 * MiB), metadata=md).upload_id

            def write(offset: int, data: bytes, finish: bool) -> pb.UploadSession:
                return stub.WriteUpload(iter([pb.WriteUploadRequest(
                    device="disk1", upload_id=native_id, write_offset=offset + i,
                    data=data[i:i + MiB], finish_write=finish and i + MiB >= len(data),
                ) for i in range(0, len(data), MiB)]), metadata=md, timeout=60)

            assert write(0, first, False).committed_size == MiB
            url = http.get("/api/gallery/disk1/upload-url?filename=q.bin", headers=headers).json()["upload_url"]
            put_path = httpx.URL(url).path
            r = http.put(put_path, content=first, headers={"Content-Range": f"bytes 0-{MiB - 1}/{8 * MiB}"})
            assert r.status_code == 308, r.text
            stored = set(stored_files(stack.data_dir))

            fill_to(tmpfs, ballast, 2 * MiB)
            assert_refused_507(multipart(http, headers, "disk1", random_bytes(4 * MiB)), 0, 2 * MiB)
            # The real ENOSPC on the resumable paths (write and fsync) is the same clean error.
            with pytest.raises(grpc.RpcError) as full:
                write(MiB, random_bytes(4 * MiB), False)
            assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            info = rich_error(full.value)[0]
            assert info.reason == "INSUFFICIENT_STORAGE"
            assert info.metadata["min_free_bytes"] == "0" and int(info.metadata["free_bytes"]) < 2 * MiB
            assert_refused_507(http.put(put_path, content=random_bytes(4 * MiB),
                                        headers={"Content-Range": f"bytes {MiB}-{5 * MiB - 1}/{8 * MiB}"}),
                               0, 2 * MiB)
            no_partial_files(stack, stored)
            # What was committed is intact: a query answers 1 MiB at least, and the file holds it.
            sessions = stack.data_dir / "staging" / "sessions" / "disk1"
            committed = stub.QueryUpload(pb.QueryUploadRequest(device="disk1", upload_id=native_id),
                                         metadata=md).committed_size
            assert committed >= MiB
            kept_prefix = (sessions / native_id).read_bytes()[:committed]
            assert kept_prefix[:MiB] == first
            put_status = http.get(put_path).json()
            assert put_status["committedSize"] >= MiB
            assert (sessions / f"url.{put_status['eventId']}").read_bytes()[:MiB] == first
            ballast.unlink()
            # Space is back: the native upload resumes from its committed size and completes.
            rest = random_bytes(8 * MiB - committed)
            whole = kept_prefix + rest
            assert write(committed, rest, True).event_id
            listed = http.get("/api/gallery/disk1/events", headers=headers)
            assert listed.status_code == 200 and len(listed.json()) == 3
            assert hashlib.sha256(whole).hexdigest() in {e["sha256"] for e in listed.json()}
            r = multipart(http, headers, "disk1", random_bytes(4 * MiB))
            assert r.status_code == 200, r.text
            stored_hash = hashlib.sha256(
                (stack.data_dir / "media" / "disk1" / r.json()["eventId"]).read_bytes()
            ).hexdigest()
            assert json.loads(http.get(f"/api/gallery/disk1/events/{r.json()['eventId']}",
                                       headers=headers).text)["sha256"] == stored_hash
    finally:
        stop_stack(stack)
    assert stack.process.returncode == 0, stack.log()


def test_incoming_files_wait_for_room_above_the_headroom(tmpfs: pathlib.Path, mint: Callable[..., str]) -> None:
    """A dropped file is copied into the store only when the copy leaves the headroom free: until
    then it waits in incoming (one warning), nothing is copied, and uploads that fit go on."""
    env = {"GALLERY_MAKE_THUMBNAILS": "false", "GALLERY_MIN_FREE_BYTES": str(HEADROOM),
           "GALLERY_INCOMING_SCAN_SECONDS": "0.1", "GALLERY_INCOMING_SETTLE_SECONDS": "0.3"}
    stack = start_stack(tmpfs / "data", tmpfs.parent / "gallery-incoming.log", extra_env=env)
    headers = {"Authorization": f"Bearer {mint(scope=f'{auth.READ} {auth.WRITE}')}"}
    ballast = tmpfs / "ballast"
    try:
        with httpx.Client(base_url=stack.base_url, timeout=60) as http:
            def events() -> list[dict[str, object]]:
                r = http.get("/api/gallery/disk2/events", headers=headers)
                assert r.status_code == 200, r.text
                return r.json()  # type: ignore[no-any-return]

            paths = http.get("/api/gallery/disk2/paths", headers=headers)
            assert paths.status_code == 200, paths.text
            inbox = pathlib.Path(paths.json()["paths"]["incoming"])
            data = random_bytes(20 * MiB)
            (inbox / ".big.bin.part").write_bytes(data)
            # Above the headroom, so uploads are accepted, but with less than the file's size to spare.
            fill_to(tmpfs, ballast, HEADROOM + 10 * MiB)
            stored = set(stored_files(stack.data_dir))
            (inbox / ".big.bin.part").rename(inbox / "big.bin")

            refused = "no room on the disk above its headroom"
            deadline = time.monotonic() + 20
            while refused not in stack.log() and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1.0)  # ~10 more scans: the file stays, and the warning is not repeated
            assert events() == [], stack.log()
            assert (inbox / "big.bin").read_bytes() == data
            no_partial_files(stack, stored)
            assert stack.log().count(refused) == 1, stack.log()
            small = multipart(http, headers, "disk2", random_bytes(100_000))
            assert small.status_code == 200, small.text

            # Room returns: the file is imported whole, and leaves incoming.
            ballast.unlink()
            deadline = time.monotonic() + 20
            while len(found := events()) < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert len(found) == 2, stack.log()
            [imported] = [e for e in found if e["name"] == "big.bin"]
            assert imported["sha256"] == hashlib.sha256(data).hexdigest()
            assert (stack.data_dir / "media" / "disk2" / str(imported["id"])).read_bytes() == data
            assert not (inbox / "big.bin").exists()
    finally:
        stop_stack(stack)
        ballast.unlink(missing_ok=True)
    assert stack.process.returncode == 0, stack.log()
