"""Resumable uploads: the session domain (both databases) and the RPCs on an in-process server."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from sqlmodel import select

from gallery.v1 import gallery_pb2 as pb
from gallery.v1 import gallery_pb2_grpc
from gallery_server import auth
from gallery_server.errors import FailedPrecondition, InvalidArgument, NotFound, OutOfRange
from gallery_server.models import Event
from gallery_server.resumable import ResumableUploads
from gallery_server.service import Gallery
from gallery_server.settings import Settings

from .conftest import random_bytes, rich_error, stored_files

DATA = random_bytes(3 * 1024 * 1024 + 123)
SHA = hashlib.sha256(DATA).hexdigest()


def events(gallery: Gallery) -> list[Event]:
    with gallery.db.session() as session:
        return list(session.exec(select(Event)))


def write(uploads: ResumableUploads, principal: auth.Principal, upload_id: str, offset: int,
          data: bytes, *, finish: bool = False, device: str = "cam1"):  # type: ignore[no-untyped-def]
    writer = uploads.open_write(principal, device, upload_id, offset)
    try:
        if writer.done:
            return writer.done
        writer.write(data)
        writer.commit()
        return writer.finish() if finish else writer.state()
    finally:
        writer.close()


# -- domain ------------------------------------------------------------------------------------


def test_segments_then_finish_store_one_event(gallery: Gallery, principal: auth.Principal) -> None:
    uploads = ResumableUploads(gallery)
    state = uploads.start(principal, "cam1", name="a.bin", size=len(DATA), sha256=SHA,
                          upload_id="upload-0001")
    assert (state.upload_id, state.committed_size, state.event_id) == ("upload-0001", 0, "")
    assert uploads.start(principal, "cam1", name="a.bin", size=len(DATA), sha256=SHA,
                         upload_id="upload-0001") == state  # idempotent
    cut = [0, 1_000_000, 2_500_000, len(DATA)]
    for a, b in zip(cut[:-1], cut[1:], strict=True):
        state = write(uploads, principal, "upload-0001", a, DATA[a:b], finish=b == len(DATA))
    assert state.event_id and state.committed_size == len(DATA)
    stored = gallery.storage.media_path("cam1", state.event_id).read_bytes()
    assert hashlib.sha256(stored).hexdigest() == SHA
    assert [e.id for e in events(gallery)] == [state.event_id]
    # Retrying after completion answers with the same event, stores nothing.
    again = uploads.start(principal, "cam1", name="a.bin", size=len(DATA), sha256=SHA,
                          upload_id="upload-0001")
    assert again.event_id == state.event_id
    assert write(uploads, principal, "upload-0001", 0, b"x", finish=True).event_id == state.event_id
    assert len(events(gallery)) == 1
    assert not (gallery.settings.data_dir / "staging" / "sessions" / "cam1" / "upload-0001").exists()


def test_wrong_offset_and_beyond_size(gallery: Gallery, principal: auth.Principal) -> None:
    uploads = ResumableUploads(gallery)
    uploads.start(principal, "cam1", name="a.bin", size=10, upload_id="upload-0002")
    write(uploads, principal, "upload-0002", 0, b"12345")
    with pytest.raises(FailedPrecondition) as caught:
        write(uploads, principal, "upload-0002", 3, b"x")
    assert caught.value.reason == "WRONG_OFFSET"
    assert caught.value.metadata["committed_size"] == "5"
    assert "5" in caught.value.message
    with pytest.raises(OutOfRange):
        write(uploads, principal, "upload-0002", 5, b"123456")
    with pytest.raises(FailedPrecondition) as caught:
        write(uploads, principal, "upload-0002", 5, b"", finish=True)
    assert caught.value.reason == "UPLOAD_INCOMPLETE"
    assert uploads.query(principal, "cam1", "upload-0002").committed_size == 5


def test_unacknowledged_bytes_are_truncated(gallery: Gallery, principal: auth.Principal) -> None:
    uploads = ResumableUploads(gallery)
    uploads.start(principal, "cam1", name="a.bin", upload_id="upload-0003")
    write(uploads, principal, "upload-0003", 0, b"abc")
    path = gallery.storage.session_path("cam1", "upload-0003")
    with path.open("ab") as f:  # written by a server that died before committing
        f.write(b"garbage")
    assert uploads.query(principal, "cam1", "upload-0003").committed_size == 3
    assert path.read_bytes() == b"abc"


def test_sha256_mismatch_leaves_nothing(gallery: Gallery, principal: auth.Principal) -> None:
    uploads = ResumableUploads(gallery)
    uploads.start(principal, "cam1", name="a.bin", sha256="0" * 64, upload_id="upload-0004")
    with pytest.raises(InvalidArgument) as caught:
        write(uploads, principal, "upload-0004", 0, b"data", finish=True)
    assert caught.value.reason == "SHA256_MISMATCH"
    assert events(gallery) == []
    assert stored_files(gallery.settings.data_dir) == []
    with pytest.raises(NotFound):
        uploads.query(principal, "cam1", "upload-0004")


def test_expiry_on_access_and_by_sweep(gallery: Gallery, principal: auth.Principal) -> None:
    uploads = ResumableUploads(gallery)
    for upload_id in ("upload-0005", "upload-0006"):
        uploads.start(principal, "cam1", name="a.bin", upload_id=upload_id)
        write(uploads, principal, upload_id, 0, b"abc")
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=2)
    assert uploads.sweep_once(now=later) == 2
    assert stored_files(gallery.settings.data_dir) == []
    uploads.settings = dataclasses.replace(gallery.settings, upload_session_ttl=-1)
    uploads.start(principal, "cam1", name="a.bin", upload_id="upload-0007")
    with pytest.raises(FailedPrecondition) as caught:
        uploads.query(principal, "cam1", "upload-0007")
    assert caught.value.reason == "SESSION_EXPIRED"
    assert stored_files(gallery.settings.data_dir) == []


def test_other_device_and_scopes(gallery: Gallery, principal: auth.Principal) -> None:
    uploads = ResumableUploads(gallery)
    uploads.start(principal, "cam1", name="a.bin", upload_id="upload-0008")
    with pytest.raises(NotFound):
        uploads.query(principal, "cam2", "upload-0008")
    reader = auth.Principal("r", frozenset({"*"}), frozenset({auth.READ}))
    other = auth.Principal("o", frozenset({"cam2"}), frozenset({auth.READ, auth.WRITE}))
    for who in (reader, other):
        with pytest.raises(auth.PermissionDenied):
            uploads.query(who, "cam1", "upload-0008")
    with pytest.raises(InvalidArgument):
        uploads.start(principal, "cam1", name="a.bin", upload_id="short")


def test_dedupe_and_checksums(gallery: Gallery, principal: auth.Principal) -> None:
    uploads = ResumableUploads(gallery)
    uploads.start(principal, "cam1", name="a.bin", upload_id="upload-0009")
    stored = write(uploads, principal, "upload-0009", 0, b"hello", finish=True)
    sha = hashlib.sha256(b"hello").hexdigest()
    state = uploads.start(principal, "cam1", name="b.bin", sha256=sha, dedupe=True)
    assert state.event_id == stored.event_id
    assert uploads.start(principal, "cam2", name="b.bin", sha256=sha, dedupe=True).event_id == ""
    others = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(999)]
    assert uploads.find_existing(principal, "cam1", [*others, sha]) == {sha: stored.event_id}
    with pytest.raises(InvalidArgument):
        uploads.find_existing(principal, "cam1", [*others, sha, sha])
    with pytest.raises(InvalidArgument):
        uploads.find_existing(principal, "cam1", ["nothex"])


# -- RPCs on an in-process server ----------------------------------------------------------------


@dataclasses.dataclass
class Client:
    settings: Settings
    stub: gallery_pb2_grpc.GalleryServiceStub
    metadata: list[tuple[str, str]]

    def start(self, upload_id: str, data: bytes, **extra: Any) -> pb.UploadSession:
        return self.stub.StartUpload(pb.StartUploadRequest(
            device="cam1", name="clip.bin", size=len(data),
            sha256=hashlib.sha256(data).hexdigest(), upload_id=upload_id, **extra,
        ), metadata=self.metadata)

    def write(self, upload_id: str, offset: int, data: bytes, *, finish: bool,
              chunk: int = 256 * 1024) -> pb.UploadSession:
        return self.stub.WriteUpload(
            write_messages(upload_id, offset, data, finish, chunk), metadata=self.metadata
        )

    def query(self, upload_id: str) -> pb.UploadSession:
        return self.stub.QueryUpload(
            pb.QueryUploadRequest(device="cam1", upload_id=upload_id), metadata=self.metadata
        )

    def events(self) -> list[pb.Event]:
        return list(self.stub.ListEvents(pb.ListEventsRequest(device="cam1"), metadata=self.metadata))


def write_messages(upload_id: str, offset: int, data: bytes, finish: bool,
                   chunk: int) -> Iterator[pb.WriteUploadRequest]:
    pieces = [data[i:i + chunk] for i in range(0, len(data), chunk)] or [b""]
    for n, piece in enumerate(pieces):
        last = n == len(pieces) - 1
        yield pb.WriteUploadRequest(device="cam1", upload_id=upload_id, write_offset=offset,
                                    data=piece, finish_write=finish and last)


@pytest.fixture
def client(settings: Settings, mint: Callable[..., str], grpc_port: int) -> Iterator[Client]:
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        yield Client(settings, gallery_pb2_grpc.GalleryServiceStub(channel),
                     [("authorization", f"Bearer {mint()}")])


def stored_sha(settings: Settings, event: pb.Event) -> str:
    return hashlib.sha256((settings.data_dir / "media" / "cam1" / event.id).read_bytes()).hexdigest()


def test_rpc_three_segments_and_retry(client: Client) -> None:
    assert client.start("rpc-upload-1", DATA).committed_size == 0
    cut = [0, 700_000, 2_000_000, len(DATA)]
    for a, b in zip(cut[:-1], cut[1:], strict=True):
        session = client.write("rpc-upload-1", a, DATA[a:b], finish=b == len(DATA))
        assert session.committed_size == b
    assert session.event_id
    [event] = client.events()
    assert event.id == session.event_id and stored_sha(client.settings, event) == SHA
    assert client.start("rpc-upload-1", DATA).event_id == event.id
    assert client.write("rpc-upload-1", 0, DATA[:10], finish=True).event_id == event.id
    assert client.query("rpc-upload-1").event_id == event.id
    assert len(client.events()) == 1


def test_rpc_wrong_offset(client: Client) -> None:
    client.start("rpc-upload-2", DATA)
    client.write("rpc-upload-2", 0, DATA[:1000], finish=False)
    with pytest.raises(grpc.RpcError) as caught:
        client.write("rpc-upload-2", 0, DATA[:1000], finish=False)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info, _ = rich_error(caught.value)
    assert info.reason == "WRONG_OFFSET" and info.metadata["committed_size"] == "1000"
    assert "1000" in caught.value.details()


def test_rpc_cancel_then_resume(client: Client) -> None:
    client.start("rpc-upload-3", DATA)
    sent = threading.Event()

    def slow() -> Iterator[pb.WriteUploadRequest]:
        for n, message in enumerate(write_messages("rpc-upload-3", 0, DATA, True, 64 * 1024)):
            if n == 20:
                sent.set()
                threading.Event().wait(30)  # hangs until cancelled
            yield message

    future = client.stub.WriteUpload.future(slow(), metadata=client.metadata)
    assert sent.wait(10)
    threading.Event().wait(0.3)
    future.cancel()
    with pytest.raises(grpc.FutureCancelledError):
        future.result()
    # As a real client does: ask where to resume; the server may still be committing what it
    # received when the cancellation reached it, so a stale answer is WRONG_OFFSET: ask again.
    for _ in range(50):
        committed = client.query("rpc-upload-3").committed_size
        assert committed <= 20 * 64 * 1024 and committed % (64 * 1024) == 0
        try:
            session = client.write("rpc-upload-3", committed, DATA[committed:], finish=True)
            break
        except grpc.RpcError as error:
            assert rich_error(error)[0].reason in ("WRONG_OFFSET", "UPLOAD_BUSY")
            threading.Event().wait(0.05)
    assert committed > 0
    [event] = client.events()
    assert event.id == session.event_id and stored_sha(client.settings, event) == SHA


def test_rpc_sha_mismatch_and_dedupe(client: Client) -> None:
    client.stub.StartUpload(pb.StartUploadRequest(
        device="cam1", name="x", upload_id="rpc-upload-4", sha256="0" * 64,
    ), metadata=client.metadata)
    with pytest.raises(grpc.RpcError) as caught:
        client.write("rpc-upload-4", 0, b"data", finish=True)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rich_error(caught.value)[0].reason == "SHA256_MISMATCH"
    assert client.events() == [] and stored_files(client.settings.data_dir) == []
    done = client.write(client.start("rpc-upload-5", b"abc").upload_id, 0, b"abc", finish=True)
    deduped = client.start("rpc-upload-6", b"abc", dedupe=True)
    assert deduped.event_id == done.event_id
    found = client.stub.FindExistingChecksums(pb.FindExistingChecksumsRequest(
        device="cam1", sha256s=[hashlib.sha256(b"abc").hexdigest(), "1" * 64],
    ), metadata=client.metadata)
    assert dict(found.existing) == {hashlib.sha256(b"abc").hexdigest(): done.event_id}
