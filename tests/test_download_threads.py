"""Downloads the server sends itself hold one of its threads each (threads.py): a client that
stops reading leaves the handler blocked in a send once the flow-control windows are full. They
are counted (RESOURCE_EXHAUSTED `TOO_MANY_DOWNLOADS` past their share) and cancelled once their
client has taken nothing for GALLERY_DOWNLOAD_IDLE_SECONDS. Thumbnails count only above what
Envoy takes from the server at once (servicer.SENT_WITHOUT_WAITING). In process, a real gRPC
server."""

from __future__ import annotations

import hashlib
import pathlib
import time

import grpc
import pytest

from gallery.v1 import gallery_pb2 as pb
from gallery.v1 import gallery_pb2_grpc
from gallery_server.rpc.servicer import SENT_WITHOUT_WAITING
from gallery_server.threads import thread_shares

from .conftest import make_settings, random_bytes, rich_error

SIZE = 32 << 20  # far more than the HTTP/2 windows between the two ends hold
IDLE = 3.0  # the refused read must come within it, on a loaded machine


@pytest.fixture
def settings(tmp_path: pathlib.Path):
    # SQLite only: what is tested is the server's threads, not the database.
    data = tmp_path / "data"
    data.mkdir()
    settings = make_settings(data, grpc_workers=10, max_uploads_total=2, download_idle_seconds=IDLE,
                             max_thumbnail_bytes=SIZE)
    assert thread_shares(settings).downloads == 1
    return settings


def stored(stub: gallery_pb2_grpc.GalleryServiceStub, md, data: bytes, thumbnail: bytes = b"") -> str:
    parts = [pb.UploadEventRequest(header=pb.UploadHeader(device="cam1", name="big.bin"))]
    parts += [pb.UploadEventRequest(media_chunk=data[i:i + (1 << 20)]) for i in range(0, len(data), 1 << 20)]
    parts += [pb.UploadEventRequest(thumbnail_chunk=thumbnail[i:i + (1 << 20)])
              for i in range(0, len(thumbnail), 1 << 20)]
    parts.append(pb.UploadEventRequest(finish=pb.UploadFinish()))
    return stub.UploadEvent(iter(parts), metadata=md).event_id


def read(stub, md, event_id: str, offset: int = 0):
    return stub.ReadEventContent(
        pb.ReadEventContentRequest(device="cam1", event_id=event_id, read_offset=offset), metadata=md, timeout=30)


def thumbnail(stub, md, event_id: str):
    return stub.GetEventThumbnail(
        pb.GetEventThumbnailRequest(device="cam1", event_id=event_id), metadata=md, timeout=30)


def stall_one_then_be_refused(open_download):
    """Start a download whose client then reads no more, and check that the next one is refused
    (the stalled one holds the only place); returns the stalled one."""
    stalled = open_download()
    next(stalled)  # the server is sending; the client reads no more
    with pytest.raises(grpc.RpcError) as refused:
        for _ in open_download():
            pass
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert rich_error(refused.value)[0].reason == "TOO_MANY_DOWNLOADS"
    return stalled


def wait_for_the_place(fetch, deadline: float):
    """What `fetch` returns once the stalled download's place is free (it is cancelled after IDLE)."""
    while True:
        try:
            return fetch()
        except grpc.RpcError as error:
            assert rich_error(error)[0].reason == "TOO_MANY_DOWNLOADS"
            assert time.monotonic() < deadline, "the stalled download was never cancelled"
            time.sleep(0.1)


def test_a_download_whose_client_stopped_reading_is_counted_then_cancelled(grpc_port, mint):
    md = [("authorization", f"Bearer {mint()}")]
    data = random_bytes(SIZE)
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = gallery_pb2_grpc.GalleryServiceStub(channel)
        event_id = stored(stub, md, data)
        stalled = stall_one_then_be_refused(lambda: read(stub, md, event_id))
        # A read with nothing to send holds no thread: answered meanwhile.
        assert list(read(stub, md, event_id, offset=SIZE)) == []
        # The stalled one is cancelled after IDLE s without a message taken, and its place is free.
        whole = wait_for_the_place(
            lambda: b"".join(m.data for m in read(stub, md, event_id)), time.monotonic() + 20)
        assert hashlib.sha256(whole).digest() == hashlib.sha256(data).digest()
        with pytest.raises(grpc.RpcError) as cancelled:
            for _ in stalled:
                pass
        assert cancelled.value.code() == grpc.StatusCode.CANCELLED


def test_a_large_thumbnail_is_counted_and_a_small_one_is_not(grpc_port, mint):
    md = [("authorization", f"Bearer {mint()}")]
    large, small = random_bytes(SIZE), random_bytes(SENT_WITHOUT_WAITING)
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = gallery_pb2_grpc.GalleryServiceStub(channel)
        with_large = stored(stub, md, b"media", thumbnail=large)
        with_small = stored(stub, md, b"media", thumbnail=small)
        stalled = stall_one_then_be_refused(lambda: thumbnail(stub, md, with_large))
        # Up to SENT_WITHOUT_WAITING bytes take no place: answered meanwhile, more than once.
        for _ in range(3):
            assert b"".join(m.data for m in thumbnail(stub, md, with_small)) == small
        whole = wait_for_the_place(
            lambda: b"".join(m.data for m in thumbnail(stub, md, with_large)), time.monotonic() + 20)
        assert whole == large
        with pytest.raises(grpc.RpcError) as cancelled:
            for _ in stalled:
                pass
        assert cancelled.value.code() == grpc.StatusCode.CANCELLED
