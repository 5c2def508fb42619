"""Resumable uploads: the session domain (both databases) and the RPCs on an in-process server."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from sqlmodel import select

from gallery.v1 import gallery_pb2 as pb
from gallery.v1 import gallery_pb2_grpc
from gallery_server import auth, file_locks, resumable
from gallery_server.clock import aware
from gallery_server.errors import (
    AlreadyExists,
    Exhausted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    TooLarge,
)
from gallery_server.models import Event, UploadSessionRow
from gallery_server.resumable import ResumableUploads
from gallery_server.service import Gallery
from gallery_server.settings import Settings
from gallery_server.signed_urls import SignedUploads

from .conftest import failing_event_commit, random_bytes, rich_error, stored_files, wait_until

DATA = random_bytes(3 * 1024 * 1024 + 123)
SHA = hashlib.sha256(DATA).hexdigest()


def events(gallery: Gallery) -> list[Event]:
    with gallery.db.session() as session:
        return list(session.exec(select(Event)))


def session_rows(gallery: Gallery) -> list[UploadSessionRow]:
    with gallery.db.session() as session:
        return list(session.exec(select(UploadSessionRow)))


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


def finished_session(uploads: ResumableUploads, principal: auth.Principal, upload_id: str, data: bytes):  # type: ignore[no-untyped-def]
    """A session started and written whole in one finishing write: its completed state."""
    uploads.start(principal, "cam1", name="a.bin", upload_id=upload_id)
    return write(uploads, principal, upload_id, 0, data, finish=True)


# -- domain ------------------------------------------------------------------------------------


def test_segments_then_finish_store_one_event(gallery: Gallery, principal: auth.Principal) -> None:
    uploads = ResumableUploads(gallery)
    state = uploads.start(principal, "cam1", name="a.bin", size=len(DATA), sha256=SHA,
                          upload_id="upload-0001")
    assert (state.upload_id, state.committed_size, state.event_id) == ("upload-0001", 0, "")
    assert uploads.start(principal, "cam1", name="a.bin", size=len(DATA), sha256=SHA,
                         upload_id="upload-0001") == state  # idempotent
    for other in ({"size": len(DATA) - 1, "sha256": SHA}, {"size": len(DATA), "sha256": "0" * 64}):
        with pytest.raises(FailedPrecondition) as caught:
            uploads.start(principal, "cam1", name="a.bin", upload_id="upload-0001", **other)
        assert caught.value.reason == "UPLOAD_ID_IN_USE"
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
    with pytest.raises(FailedPrecondition) as caught:  # past the committed size: a gap
        write(uploads, principal, "upload-0002", 7, b"x")
    assert caught.value.reason == "WRONG_OFFSET"
    with pytest.raises(OutOfRange):
        write(uploads, principal, "upload-0002", 5, b"123456")
    with pytest.raises(FailedPrecondition) as caught:
        write(uploads, principal, "upload-0002", 5, b"", finish=True)
    assert caught.value.reason == "UPLOAD_INCOMPLETE"
    write(uploads, principal, "upload-0002", 5, b"1234")
    with pytest.raises(FailedPrecondition) as caught:  # one byte short is incomplete too
        write(uploads, principal, "upload-0002", 9, b"", finish=True)
    assert caught.value.reason == "UPLOAD_INCOMPLETE"
    assert uploads.query(principal, "cam1", "upload-0002").committed_size == 9


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
    # A session's expiry is the first moment it is expired (as on access).
    first, last = sorted(aware(row.expires_at) for row in session_rows(gallery))
    assert uploads.sweep_once(now=first - datetime.timedelta(microseconds=1)) == 0
    assert uploads.sweep_once(now=last) == 2
    assert stored_files(gallery.settings.data_dir) == []
    uploads.settings = dataclasses.replace(gallery.settings, upload_session_ttl=-1)
    uploads.start(principal, "cam1", name="a.bin", upload_id="upload-0007")
    with pytest.raises(FailedPrecondition) as caught:
        uploads.query(principal, "cam1", "upload-0007")
    assert caught.value.reason == "SESSION_EXPIRED"
    assert stored_files(gallery.settings.data_dir) == []


def test_a_start_of_an_expired_id_starts_afresh(gallery: Gallery, principal: auth.Principal) -> None:
    uploads = ResumableUploads(gallery)
    uploads.start(principal, "cam1", name="a.bin", upload_id="expired-0001")
    write(uploads, principal, "expired-0001", 0, b"abc")
    expire(gallery, "expired-0001")
    fresh = uploads.start(principal, "cam1", name="a.bin", upload_id="expired-0001")
    assert fresh.committed_size == 0 and fresh.expires_at > datetime.datetime.now(datetime.UTC)
    assert session_file(gallery, "expired-0001").read_bytes() == b""


def expire(gallery: Gallery, upload_id: str) -> None:
    with gallery.db.session() as session:
        assert session.exec(sa.update(UploadSessionRow).where(  # type: ignore[call-overload]
            sa.and_(UploadSessionRow.device == "cam1", UploadSessionRow.upload_id == upload_id)
        ).values(expires_at=datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=1))).rowcount == 1
        session.commit()


def test_a_start_is_not_refused_because_another_connection_wrote(
    gallery: Gallery, principal: auth.Principal,
) -> None:
    """A busy server writes between any two statements of a start (here: a pre-signed URL's
    grant after every read of upload_sessions). On SQLite a start that read, then inserted in one
    transaction was refused at once ("database is locked": 503 DATABASE_UNAVAILABLE)."""
    uploads, signed = ResumableUploads(gallery), SignedUploads(gallery)
    writing = threading.local()

    def write_elsewhere(connection, cursor, statement, *_):  # type: ignore[no-untyped-def]
        if statement.lstrip().upper().startswith("SELECT") and "upload_sessions" in statement \
                and not getattr(writing, "now", False):
            writing.now = True
            try:
                signed.create_urls(principal, "cam2", "x.jpg", thumbnail=False)
            finally:
                writing.now = False

    sa.event.listen(gallery.db.engine, "after_cursor_execute", write_elsewhere)
    try:
        for n in range(3):
            state = uploads.start(principal, "cam1", name="a.bin", size=3, upload_id=f"busy-{n:04d}")
            assert (state.upload_id, state.committed_size) == (f"busy-{n:04d}", 0)
    finally:
        sa.event.remove(gallery.db.engine, "after_cursor_execute", write_elsewhere)


def test_the_sweeper_spares_a_session_started_again_under_the_same_id(
    gallery: Gallery, principal: auth.Principal, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sweeper lists expired rows, then reaches each: meanwhile the client, told
    SESSION_EXPIRED, started the id again and committed bytes. Those are not the sweeper's."""
    uploads = ResumableUploads(gallery)
    uploads.start(principal, "cam1", name="a.bin", size=100, upload_id="restarted1")
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(
        seconds=gallery.settings.upload_session_ttl + 60)
    with gallery.db.session() as session:
        [listed] = session.exec(select(UploadSessionRow)).all()  # the sweeper's listing
    monkeypatch.setattr(resumable, "utcnow", lambda: later)
    with pytest.raises(FailedPrecondition):  # SESSION_EXPIRED: the old session goes
        uploads.query(principal, "cam1", "restarted1")
    uploads.start(principal, "cam1", name="a.bin", size=100, upload_id="restarted1")
    write(uploads, principal, "restarted1", 0, b"x" * 40)
    assert uploads.remove(listed, now=later) is False  # the sweeper reaches its listed row
    assert uploads.query(principal, "cam1", "restarted1").committed_size == 40
    assert gallery.storage.session_path("cam1", "restarted1").read_bytes() == b"x" * 40
    # A row another pass removed already counts as removed (a start then need not wait), and a
    # file left at its name is nobody's.
    [current] = session_rows(gallery)
    assert uploads.remove(current) is True and session_rows(gallery) == []
    path = gallery.storage.session_path("cam1", "restarted1")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"left")
    assert uploads.remove(current) is True
    assert not path.exists()


def test_other_device_and_scopes(gallery: Gallery, principal: auth.Principal) -> None:
    uploads = ResumableUploads(gallery)
    uploads.start(principal, "cam1", name="a.bin", upload_id="upload-0008")
    with pytest.raises(NotFound):
        uploads.query(principal, "cam2", "upload-0008")
    reader = auth.Principal("r", frozenset({"*"}), frozenset({auth.READ}))
    other = auth.Principal("o", frozenset({"cam2"}), frozenset({auth.READ, auth.WRITE}))
    for who in (reader, other):
        for attempt in (lambda w=who: uploads.query(w, "cam1", "upload-0008"),
                        lambda w=who: uploads.open_write(w, "cam1", "upload-0008", 0),
                        lambda w=who: uploads.start(w, "cam1", name="a.bin", upload_id="upload-0009")):
            with pytest.raises(auth.PermissionDenied):
                attempt()
    assert uploads.find_existing(reader, "cam1", ["0" * 64]) == {}  # reading is enough for that
    with pytest.raises(auth.PermissionDenied):
        uploads.find_existing(other, "cam1", ["0" * 64])
    for attempt in (lambda: uploads.start(principal, "cam1", name="a.bin", upload_id="short"),
                    lambda: uploads.query(principal, "cam1", "short")):
        with pytest.raises(InvalidArgument) as caught:
            attempt()
        assert caught.value.reason == "INVALID_UPLOAD_ID"


@pytest.mark.parametrize(("field", "value", "reason"), [
    ("name", "a\x00.bin", "NAME_INVALID"),
    ("media_type", "sound", "INVALID_MEDIA_TYPE"),
    ("sha256", "F" * 64, "INVALID_SHA256"),
])
def test_a_start_with_a_bad_field_is_refused_and_opens_nothing(
    gallery: Gallery, principal: auth.Principal, field: str, value: str, reason: str,
) -> None:
    uploads = ResumableUploads(gallery)
    fields: dict[str, Any] = {"name": "a.bin", field: value}
    with pytest.raises(InvalidArgument) as caught:
        uploads.start(principal, "cam1", upload_id="bad-field-01", **fields)
    assert caught.value.reason == reason
    assert session_rows(gallery) == [] and stored_files(gallery.settings.data_dir) == []


def test_dedupe_and_checksums(gallery: Gallery, principal: auth.Principal) -> None:
    uploads = ResumableUploads(gallery)
    stored = finished_session(uploads, principal, "upload-0009", b"hello")
    sha = hashlib.sha256(b"hello").hexdigest()
    state = uploads.start(principal, "cam1", name="b.bin", sha256=sha, dedupe=True)
    assert (state.event_id, state.committed_size, state.declared_size) == (stored.event_id, 5, 5)
    with pytest.raises(InvalidArgument) as caught:  # dedupe compares digests: one is needed
        uploads.start(principal, "cam1", name="b.bin", dedupe=True)
    assert caught.value.reason == "SHA256_REQUIRED"
    assert uploads.start(principal, "cam2", name="b.bin", sha256=sha, dedupe=True).event_id == ""
    others = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(999)]
    assert uploads.find_existing(principal, "cam1", [*others, sha]) == {sha: stored.event_id}
    with pytest.raises(InvalidArgument):
        uploads.find_existing(principal, "cam1", [*others, sha, sha])
    for bad in ("nothex", ""):  # an empty digest is no digest
        with pytest.raises(InvalidArgument) as caught:
            uploads.find_existing(principal, "cam1", [bad])
        assert caught.value.reason == "INVALID_SHA256"


def test_dedupe_and_checksums_answer_the_oldest_stored_event(gallery: Gallery, principal: auth.Principal) -> None:
    """Uploads without dedupe may store one content twice: the answer is the oldest event, and
    never one still only on the device (the server does not have its bytes)."""
    uploads = ResumableUploads(gallery)
    sha = hashlib.sha256(b"hello").hexdigest()
    with gallery.db.session() as session:
        session.add(Event(id="evt_ondevice000000000000", device="cam1", name="a.bin", media_type="other",
                          mime_type="application/octet-stream", size=5, sha256=sha, state="on_device",
                          created=datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)))
        session.commit()
    oldest = finished_session(uploads, principal, "same-bytes-1", b"hello")
    time.sleep(0.01)
    newer = finished_session(uploads, principal, "same-bytes-2", b"hello")
    assert newer.event_id != oldest.event_id
    assert uploads.find_existing(principal, "cam1", [sha]) == {sha: oldest.event_id}
    assert uploads.start(principal, "cam1", name="b.bin", sha256=sha, dedupe=True).event_id == oldest.event_id


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


# -- completed sessions outlive their expiry; errors leave nothing behind --------------------------


def session_file(gallery: Gallery, upload_id: str) -> Any:
    return gallery.settings.data_dir / "staging" / "sessions" / "cam1" / upload_id


def test_completed_session_answers_until_its_event_is_deleted(
    gallery: Gallery, principal: auth.Principal
) -> None:
    uploads = ResumableUploads(gallery)
    done = finished_session(uploads, principal, "late-retry-01", b"payload")
    # Long past its expiry, the completed session is not swept and still answers a retry.
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=30)
    assert uploads.sweep_once(now=later) == 0
    uploads.settings = dataclasses.replace(gallery.settings, upload_session_ttl=-1)  # all expired
    queried = uploads.query(principal, "cam1", "late-retry-01")
    assert (queried.event_id, queried.committed_size) == (done.event_id, len(b"payload"))
    assert uploads.start(principal, "cam1", name="a.bin", upload_id="late-retry-01").event_id == done.event_id
    assert write(uploads, principal, "late-retry-01", 0, b"x", finish=True).event_id == done.event_id
    assert len(events(gallery)) == 1 and not session_file(gallery, "late-retry-01").exists()

    # Once the event is deleted: Query and Write say so (NOT_FOUND UPLOAD_EVENT_DELETED) ...
    gallery.delete_event(principal, "cam1", done.event_id)
    for attempt in (lambda: uploads.query(principal, "cam1", "late-retry-01"),
                    lambda: write(uploads, principal, "late-retry-01", 0, b"x", finish=True)):
        with pytest.raises(NotFound) as caught:
            attempt()
        assert caught.value.reason == "UPLOAD_EVENT_DELETED"
        assert caught.value.metadata["event_id"] == done.event_id
    assert events(gallery) == []
    # ... for one session TTL from the deletion (not from the upload's long-past expiry), then
    # the sweeper forgets it; and StartUpload with the id starts afresh.
    deleted = datetime.datetime.now(datetime.UTC)
    ttl = datetime.timedelta(seconds=gallery.settings.upload_session_ttl)
    assert uploads.sweep_once(now=deleted + ttl - datetime.timedelta(seconds=60)) == 0
    with pytest.raises(NotFound) as caught:
        uploads.query(principal, "cam1", "late-retry-01")
    assert caught.value.reason == "UPLOAD_EVENT_DELETED"
    assert uploads.sweep_once(now=later) == 1
    with pytest.raises(NotFound) as caught:
        uploads.query(principal, "cam1", "late-retry-01")
    assert caught.value.reason == "UPLOAD_NOT_FOUND"
    uploads.settings = gallery.settings
    fresh = uploads.start(principal, "cam1", name="a.bin", upload_id="late-retry-01")
    assert (fresh.committed_size, fresh.event_id) == (0, "")


def test_a_completed_sessions_leftover_file_goes_on_the_next_write(
    gallery: Gallery, principal: auth.Principal
) -> None:
    uploads = ResumableUploads(gallery)
    done = finished_session(uploads, principal, "leftover-001", DATA)
    media = gallery.storage.media_path("cam1", done.event_id)
    leftover = session_file(gallery, "leftover-001")
    # A crash between the completion's commit and its unlink leaves the session's own link to
    # the event's bytes; a writer that lost a race with the completion can leave an empty file.
    for make in (lambda: (leftover.parent.mkdir(parents=True, exist_ok=True), os.link(media, leftover)),
                 lambda: (leftover.parent.mkdir(parents=True, exist_ok=True), leftover.touch())):
        make()
        assert write(uploads, principal, "leftover-001", 0, b"x", finish=True).event_id == done.event_id
        assert not leftover.exists()
        assert not (gallery.settings.data_dir / "staging" / "sessions").exists()  # tidied
        assert hashlib.sha256(media.read_bytes()).hexdigest() == SHA
        assert [e.id for e in events(gallery)] == [done.event_id]


def test_a_completed_sessions_file_is_kept_while_locked_or_once_the_id_restarts(
    gallery: Gallery, principal: auth.Principal
) -> None:
    uploads = ResumableUploads(gallery)
    done = finished_session(uploads, principal, "leftover-002", b"payload")
    leftover = session_file(gallery, "leftover-002")
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_bytes(b"held")
    # Someone else holds it (the reconciler, another replica's cleanup): left to them.
    fd = os.open(leftover, os.O_RDWR)
    try:
        file_locks.lock(fd)
        assert write(uploads, principal, "leftover-002", 0, b"x", finish=True).event_id == done.event_id
        assert leftover.read_bytes() == b"held"
    finally:
        os.close(fd)
    # The event deleted: while the leftover is held, the id is not free yet (never an answer
    # naming the deleted event) ...
    with gallery.db.session() as session:
        completed = session.get(UploadSessionRow, ("cam1", "leftover-002"))
    assert completed is not None and completed.event_id == done.event_id
    gallery.delete_event(principal, "cam1", done.event_id)
    fd = os.open(leftover, os.O_RDWR)
    try:
        file_locks.lock(fd)
        with pytest.raises(FailedPrecondition) as busy:
            uploads.start(principal, "cam1", name="a.bin", upload_id="leftover-002")
        assert busy.value.reason == "UPLOAD_BUSY"
    finally:
        os.close(fd)
    # ... then it starts afresh, and a cleanup for the old completion (one that read the row
    # before the restart) keeps the new session's file.
    assert uploads.start(principal, "cam1", name="a.bin", upload_id="leftover-002").event_id == ""
    assert write(uploads, principal, "leftover-002", 0, b"new bytes").committed_size == 9
    uploads._drop_completed_file(completed)
    assert leftover.read_bytes() == b"new bytes"


def test_start_after_deletion_starts_afresh(gallery: Gallery, principal: auth.Principal) -> None:
    uploads = ResumableUploads(gallery)
    done = finished_session(uploads, principal, "deleted-0001", b"one")
    gallery.delete_event(principal, "cam1", done.event_id)
    fresh = uploads.start(principal, "cam1", name="a.bin", upload_id="deleted-0001")
    assert (fresh.committed_size, fresh.event_id) == (0, "")
    again = write(uploads, principal, "deleted-0001", 0, b"two", finish=True)
    assert again.event_id and again.event_id != done.event_id
    assert [e.id for e in events(gallery)] == [again.event_id]


def leftovers(gallery: Gallery) -> list[Any]:
    return [p.relative_to(gallery.settings.data_dir) for p in stored_files(gallery.settings.data_dir)]


def test_errors_have_distinct_reasons_and_leave_nothing(gallery: Gallery, principal: auth.Principal) -> None:
    uploads = ResumableUploads(gallery)
    sha = hashlib.sha256(b"0123456789").hexdigest()

    # Declared sha256 mismatch at the finish: the session and all its bytes are removed.
    uploads.start(principal, "cam1", name="a.bin", size=10, sha256="f" * 64, upload_id="err-sha256")
    with pytest.raises(InvalidArgument) as caught:
        write(uploads, principal, "err-sha256", 0, b"0123456789", finish=True)
    assert caught.value.reason == "SHA256_MISMATCH"
    assert leftovers(gallery) == [] and events(gallery) == []

    # Declared size exceeded: nothing of the offending write is kept, only committed bytes.
    uploads.start(principal, "cam1", name="a.bin", size=10, sha256=sha, upload_id="err-beyond")
    write(uploads, principal, "err-beyond", 0, b"01234")
    with pytest.raises(OutOfRange) as caught:
        write(uploads, principal, "err-beyond", 5, b"56789-too-long")
    assert caught.value.reason == "WRITE_BEYOND_SIZE"
    assert session_file(gallery, "err-beyond").read_bytes() == b"01234"
    # Wrong offset: nothing written either; the committed size is in the error.
    with pytest.raises(FailedPrecondition) as caught:
        write(uploads, principal, "err-beyond", 3, b"34567")
    assert caught.value.reason == "WRONG_OFFSET" and caught.value.metadata["committed_size"] == "5"
    assert session_file(gallery, "err-beyond").read_bytes() == b"01234"
    assert events(gallery) == [] and not (gallery.settings.data_dir / "media" / "cam1").exists()

    # Expired: its bytes and row are removed on access.
    with gallery.db.session() as session:
        row = session.get(UploadSessionRow, ("cam1", "err-beyond"))
        row.expires_at = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=1)
        session.commit()
    with pytest.raises(FailedPrecondition) as caught:
        write(uploads, principal, "err-beyond", 5, b"56789", finish=True)
    assert caught.value.reason == "SESSION_EXPIRED"
    assert leftovers(gallery) == [] and events(gallery) == []
    with pytest.raises(NotFound):
        uploads.query(principal, "cam1", "err-beyond")

    # Declared size above the server's limit: refused at the start, no session at all.
    uploads.settings = dataclasses.replace(gallery.settings, max_upload_bytes=4)
    with pytest.raises(TooLarge) as caught:
        uploads.start(principal, "cam1", name="a.bin", size=10, upload_id="err-toolarge")
    assert caught.value.reason == "UPLOAD_TOO_LARGE"
    # Without a declared size, the write that passes the limit is refused, and nothing of it kept;
    # the limit itself is allowed.
    uploads.start(principal, "cam1", name="a.bin", upload_id="err-toolong")
    with pytest.raises(TooLarge) as caught:
        write(uploads, principal, "err-toolong", 0, b"01234")
    assert caught.value.reason == "UPLOAD_TOO_LARGE"
    assert session_file(gallery, "err-toolong").read_bytes() == b""
    uploads.start(principal, "cam1", name="a.bin", size=4, upload_id="at-the-limit")
    assert write(uploads, principal, "at-the-limit", 0, b"0123", finish=True).event_id
    assert write(uploads, principal, "err-toolong", 0, b"0123", finish=True).event_id
    for event in events(gallery):
        gallery.delete_event(principal, "cam1", event.id)
    uploads.settings = gallery.settings
    with pytest.raises(NotFound):
        uploads.query(principal, "cam1", "err-toolarge")
    assert leftovers(gallery) == [] and events(gallery) == []


# -- the device's own event id ----------------------------------------------------------------------


def upload_once(gallery: Gallery, data: bytes, device_event_id: str, *, device: str = "cam1",
                before_insert: Any = None) -> Event:
    with gallery.open_upload(device) as upload:
        upload.fields.name = "capture.jpg"
        upload.fields.device_event_id = device_event_id
        upload.write_media(data)
        return gallery.store(upload, before_insert=before_insert)


def test_device_event_iddedupes_and_conflicts(gallery: Gallery, principal: auth.Principal) -> None:
    first = upload_once(gallery, b"capture bytes", "DSC_0001")
    files = leftovers(gallery)
    again = upload_once(gallery, b"capture bytes", "DSC_0001")
    assert again.id == first.id
    assert [e.id for e in events(gallery)] == [first.id] and leftovers(gallery) == files
    with pytest.raises(AlreadyExists) as caught:
        upload_once(gallery, b"other bytes", "DSC_0001")
    assert caught.value.reason == "DEVICE_EVENT_ID_CONFLICT"
    assert caught.value.metadata == {"device_event_id": "DSC_0001", "event_id": first.id}
    assert [e.id for e in events(gallery)] == [first.id] and leftovers(gallery) == files
    # Ids are per device; and an upload without one is never deduplicated.
    other = upload_once(gallery, b"capture bytes", "DSC_0001", device="cam2")
    plain = upload_once(gallery, b"capture bytes", "")
    assert len({first.id, other.id, plain.id}) == 3
    with pytest.raises(InvalidArgument) as caught:
        upload_once(gallery, b"x", "bad\x00id")
    assert caught.value.reason == "INVALID_DEVICE_EVENT_ID"

    # A resumable upload naming a stored capture with its sha256 is answered at once, with no
    # session.
    uploads = ResumableUploads(gallery)
    state = uploads.start(principal, "cam1", name="a.jpg", upload_id="capture-0001",
                          sha256=hashlib.sha256(b"capture bytes").hexdigest(),
                          device_event_id="DSC_0001")
    assert state.event_id == first.id
    # Without a sha256 the server has not seen the content: it opens a session and the bytes
    # decide (a device that reset its counter must not be told a new capture is stored).
    state = uploads.start(principal, "cam1", name="a.jpg", upload_id="capture-0004",
                          device_event_id="DSC_0001")
    assert (state.event_id, state.committed_size) == ("", 0)
    with pytest.raises(AlreadyExists) as caught:
        write(uploads, principal, "capture-0004", 0, b"a new capture", finish=True)
    assert caught.value.reason == "DEVICE_EVENT_ID_CONFLICT"
    assert not session_file(gallery, "capture-0004").exists()
    uploads.start(principal, "cam1", name="a.jpg", upload_id="capture-0005", device_event_id="DSC_0001")
    assert write(uploads, principal, "capture-0005", 0, b"capture bytes", finish=True).event_id == first.id
    with pytest.raises(AlreadyExists):
        uploads.start(principal, "cam1", name="a.jpg", upload_id="capture-0002",
                      sha256=hashlib.sha256(b"other").hexdigest(), device_event_id="DSC_0001")
    # One that finishes after another upload stored the capture gets that event; its bytes go.
    uploads.start(principal, "cam1", name="a.jpg", upload_id="capture-0003", device_event_id="DSC_0002")
    stored = upload_once(gallery, b"second capture", "DSC_0002")
    assert write(uploads, principal, "capture-0003", 0, b"second capture", finish=True).event_id == stored.id
    assert uploads.query(principal, "cam1", "capture-0003").event_id == stored.id
    assert not session_file(gallery, "capture-0003").exists()
    assert sum(e.device_event_id == "DSC_0002" for e in events(gallery)) == 1


def test_concurrent_uploads_of_one_capture_make_one_event(gallery: Gallery) -> None:
    """Every upload passes the look-up before any inserts (a barrier inside the transaction), so
    the unique (device, device_event_id) constraint alone decides; all converge on its winner."""
    racers = 4
    barrier = threading.Barrier(racers, timeout=20)
    data = random_bytes(50_000)
    results: list[str] = []
    failures: list[BaseException] = []

    def racer() -> None:
        waited = threading.local()

        def hold(session: Any, event: Event) -> None:
            if not getattr(waited, "done", False):
                waited.done = True
                barrier.wait()

        try:
            results.append(upload_once(gallery, data, "DSC_RACE", before_insert=hold).id)
        except BaseException as exc:  # noqa: BLE001  (reported below)
            failures.append(exc)

    threads = [threading.Thread(target=racer) for _ in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures, failures
    [event] = events(gallery)
    assert results == [event.id] * racers
    assert event.device_event_id == "DSC_RACE"
    assert [p.name for p in stored_files(gallery.settings.data_dir)] == [event.id]


def test_finish_failing_at_commit_keeps_the_sessions_bytes(gallery: Gallery, principal: auth.Principal) -> None:
    """The database refuses the event's COMMIT: the session keeps every committed byte (its
    file is linked into media/, never moved), and finishing again stores the event."""
    uploads = ResumableUploads(gallery)
    uploads.start(principal, "cam1", name="a.bin", size=len(DATA), sha256=SHA, upload_id="upload-fail1")
    write(uploads, principal, "upload-fail1", 0, DATA)
    with failing_event_commit(RuntimeError("deferred constraint violated")), pytest.raises(sa.exc.OperationalError):
        write(uploads, principal, "upload-fail1", len(DATA), b"", finish=True)
    assert events(gallery) == []
    assert stored_files(gallery.settings.data_dir) == [session_file(gallery, "upload-fail1")]
    assert session_file(gallery, "upload-fail1").read_bytes() == DATA
    assert uploads.query(principal, "cam1", "upload-fail1").committed_size == len(DATA)
    state = write(uploads, principal, "upload-fail1", len(DATA), b"", finish=True)
    assert state.event_id and gallery.storage.media_path("cam1", state.event_id).read_bytes() == DATA
    assert not session_file(gallery, "upload-fail1").exists()


def test_query_never_creates_a_session_file(gallery: Gallery, principal: auth.Principal) -> None:
    """QueryUpload racing the sweeper (the file gone, the row still read) must not leave a file
    with no row behind: it opens the file without creating it."""
    uploads = ResumableUploads(gallery)
    uploads.start(principal, "cam1", name="a.bin", upload_id="vanish-0001")
    write(uploads, principal, "vanish-0001", 0, b"abc")
    session_file(gallery, "vanish-0001").unlink()
    assert uploads.query(principal, "cam1", "vanish-0001").committed_size == 0
    assert not session_file(gallery, "vanish-0001").exists()


def test_a_device_keeps_a_bounded_number_of_sessions_open(gallery: Gallery, principal: auth.Principal) -> None:
    """Each session is a row and a file kept until it expires: one token must not pile them up."""
    gallery.settings = dataclasses.replace(gallery.settings, max_upload_sessions_per_device=2)
    uploads = ResumableUploads(gallery)
    uploads.start(principal, "cam1", name="a.bin", upload_id="open-0001")
    uploads.start(principal, "cam1", name="a.bin", upload_id="open-0002")
    with pytest.raises(Exhausted) as full:
        uploads.start(principal, "cam1", name="a.bin", upload_id="open-0003")
    assert full.value.reason == "TOO_MANY_UPLOAD_SESSIONS"
    assert not gallery.storage.session_path("cam1", "open-0003").exists()
    # Starting an open one again is no new session; another device has its own count.
    assert uploads.start(principal, "cam1", name="a.bin", upload_id="open-0002").upload_id == "open-0002"
    uploads.start(principal, "cam2", name="a.bin", upload_id="open-0001")
    # A completed session no longer counts, nor an expired one.
    finished_session(uploads, principal, "open-0001", b"abc")
    uploads.start(principal, "cam1", name="a.bin", upload_id="open-0003")
    expire(gallery, "open-0002")
    uploads.start(principal, "cam1", name="a.bin", upload_id="open-0004")


def test_no_new_session_below_the_disk_headroom(gallery: Gallery, principal: auth.Principal) -> None:
    uploads = ResumableUploads(gallery)
    gallery.storage.min_free_bytes = gallery.storage.disk_space().free_bytes * 2
    with pytest.raises(Exhausted) as full:
        uploads.start(principal, "cam1", name="a.bin", upload_id="no-room-01")
    assert full.value.reason == "INSUFFICIENT_STORAGE"
    assert session_rows(gallery) == []


def test_writers_waiting_for_a_sessions_lock_hold_upload_slots(
    gallery: Gallery, principal: auth.Principal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Waiting for a session's lock holds a server thread as writing does: the writers piled up
    on one session take the device's upload slots, and the ones past them are refused at once
    instead of each waiting LOCK_WAIT_SECONDS."""
    per_device = gallery.slots.per_device
    # Long: the waiters must still be waiting when the last open_write comes (the holder's close
    # in `finally` lets them go at once).
    monkeypatch.setattr(resumable, "LOCK_WAIT_SECONDS", 30.0)
    uploads = ResumableUploads(gallery)
    done = finished_session(uploads, principal, "done-0001", b"abc")
    uploads.start(principal, "cam1", name="a.bin", upload_id="piled-0001")
    holder = uploads.open_write(principal, "cam1", "piled-0001", 0)
    outcomes: list[str] = []

    def wait_for_the_lock() -> None:
        try:
            uploads.open_write(principal, "cam1", "piled-0001", 0).close()
            outcomes.append("opened")
        except FailedPrecondition as error:
            outcomes.append(error.reason)

    waiters = [threading.Thread(target=wait_for_the_lock) for _ in range(per_device - 1)]
    try:
        for thread in waiters:
            thread.start()
        deadline = time.monotonic() + 10
        while gallery.slots.in_flight < per_device:  # the holder's slot and one per waiter
            assert time.monotonic() < deadline, "the waiters took no upload slots"
            time.sleep(0.01)
        started = time.monotonic()
        with pytest.raises(Exhausted) as refused:
            uploads.open_write(principal, "cam1", "piled-0001", 0)
        assert refused.value.reason == "TOO_MANY_DEVICE_UPLOADS"
        assert time.monotonic() - started < 1.0  # at once, not after the lock's wait
        # The retry of a completed session writes nothing and takes no slot: answered.
        assert write(uploads, principal, "done-0001", 3, b"", finish=True) == done
    finally:
        holder.close()
        for thread in waiters:
            thread.join()
    assert len(outcomes) == per_device - 1 and set(outcomes) <= {"opened", "UPLOAD_BUSY"}
    assert gallery.slots.in_flight == 0  # every writer gave its slot back


# -- what a session's file and row say, and who may change them -------------------------------------


def test_peek_reads_a_session_and_changes_nothing(gallery: Gallery, principal: auth.Principal) -> None:
    """The unauthenticated status of a pre-signed URL: bytes past the committed size do not count
    (and stay), a file shorter than its row counts for what it holds, an expired session is none."""
    uploads = ResumableUploads(gallery)
    assert uploads.peek("cam1", "peeked-0001") is None
    uploads.start(principal, "cam1", name="a.bin", size=10, upload_id="peeked-0001")
    write(uploads, principal, "peeked-0001", 0, b"01234")
    path = session_file(gallery, "peeked-0001")
    with path.open("ab") as f:
        f.write(b"567")
    peeked = uploads.peek("cam1", "peeked-0001")
    assert peeked is not None and (peeked.committed_size, peeked.declared_size) == (5, 10)
    assert path.read_bytes() == b"01234567"
    os.truncate(path, 2)
    peeked = uploads.peek("cam1", "peeked-0001")
    assert peeked is not None and peeked.committed_size == 2
    assert [row.committed_size for row in session_rows(gallery)] == [5]
    expire(gallery, "peeked-0001")
    assert uploads.peek("cam1", "peeked-0001") is None
    assert len(session_rows(gallery)) == 1 and path.exists()
    # A completed session is its event, long after its expiry and with its file gone.
    done = finished_session(uploads, principal, "peeked-0002", b"payload")
    uploads.settings = dataclasses.replace(gallery.settings, upload_session_ttl=-1)
    peeked = uploads.peek("cam1", "peeked-0002")
    assert peeked is not None and (peeked.event_id, peeked.committed_size) == (done.event_id, 7)


def test_a_session_file_shorter_than_its_row_resumes_from_what_it_holds(
    gallery: Gallery, principal: auth.Principal,
) -> None:
    """Bytes lost outside the server's control: the session resumes from what its file holds,
    never past it (that would leave a hole of zeros in the stored file)."""
    uploads = ResumableUploads(gallery)
    data = b"0123456789"
    uploads.start(principal, "cam1", name="a.bin", size=10, sha256=hashlib.sha256(data).hexdigest(),
                  upload_id="shrunk-0001")
    write(uploads, principal, "shrunk-0001", 0, data[:8])
    os.truncate(session_file(gallery, "shrunk-0001"), 3)
    assert uploads.query(principal, "cam1", "shrunk-0001").committed_size == 3
    assert [row.committed_size for row in session_rows(gallery)] == [3]
    done = write(uploads, principal, "shrunk-0001", 3, data[3:], finish=True)
    assert gallery.storage.media_path("cam1", done.event_id).read_bytes() == data


def test_a_removal_of_a_session_read_before_never_takes_a_newer_ones_bytes_or_row(
    gallery: Gallery, principal: auth.Principal,
) -> None:
    """remove() gets a row read earlier (the sweeper's listing, a start that found it expired):
    a session written or started again since is not the remover's, even with its file lost."""
    uploads = ResumableUploads(gallery)
    uploads.start(principal, "cam1", name="a.bin", upload_id="stale-0001")
    write(uploads, principal, "stale-0001", 0, b"abc")
    [listed] = session_rows(gallery)
    time.sleep(0.01)
    write(uploads, principal, "stale-0001", 3, b"def")  # its expiry moved past the one read
    assert uploads.remove(listed, now=aware(listed.expires_at)) is False
    assert session_file(gallery, "stale-0001").read_bytes() == b"abcdef"
    # Started afresh since the row was read: a start removes with no `now`.
    [old] = session_rows(gallery)
    expire(gallery, "stale-0001")
    uploads.start(principal, "cam1", name="a.bin", upload_id="stale-0001")
    write(uploads, principal, "stale-0001", 0, b"new")
    assert uploads.remove(old) is False
    assert session_file(gallery, "stale-0001").read_bytes() == b"new"
    # With the new session's file lost, the old row is simply gone (removed), the new one stays;
    # so does a row written again since it was read.
    [current] = session_rows(gallery)
    time.sleep(0.01)
    write(uploads, principal, "stale-0001", 3, b"er")
    session_file(gallery, "stale-0001").unlink()
    assert uploads.remove(old) is True
    assert uploads.remove(current, now=aware(current.expires_at)) is True
    assert [row.created for row in session_rows(gallery)] == [current.created]
    assert uploads.query(principal, "cam1", "stale-0001").committed_size == 0


def test_a_stream_that_waited_for_one_that_completed_the_session_gives_its_slot_back(
    gallery: Gallery, principal: auth.Principal,
) -> None:
    uploads = ResumableUploads(gallery)
    uploads.start(principal, "cam1", name="a.bin", upload_id="waited-0001")
    holder = uploads.open_write(principal, "cam1", "waited-0001", 0)
    answers: list[str] = []
    waiter = threading.Thread(
        target=lambda: answers.append(write(uploads, principal, "waited-0001", 0, b"", finish=True).event_id))
    try:
        holder.write(b"abc")
        waiter.start()
        assert wait_until(lambda: gallery.slots.in_flight == 2)  # the waiter has its slot
        done = holder.finish()
    finally:
        holder.close()
        waiter.join(10)
    assert answers == [done.event_id]
    assert gallery.slots.in_flight == 0


def test_a_stream_waits_a_while_for_the_one_writing(gallery: Gallery, principal: auth.Principal) -> None:
    """A client that resumes while its previous stream is still being closed waits for it
    (LOCK_WAIT_SECONDS) rather than being refused UPLOAD_BUSY at once."""
    uploads = ResumableUploads(gallery)
    uploads.start(principal, "cam1", name="a.bin", upload_id="waits-0001")
    holder = uploads.open_write(principal, "cam1", "waits-0001", 0)
    holder.write(b"abc")
    holder.commit()
    timer = threading.Timer(1.0, holder.close)
    timer.start()
    try:
        assert write(uploads, principal, "waits-0001", 3, b"def").committed_size == 6
    finally:
        timer.join()


def test_a_long_stream_commits_as_it_goes(
    gallery: Gallery, principal: auth.Principal, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every COMMIT_BYTES, or COMMIT_SECONDS after the last commit: QueryUpload (a client after a
    crash) sees the progress while the stream is still open. A write of nothing extends nothing."""
    uploads = ResumableUploads(gallery)
    uploads.start(principal, "cam1", name="a.bin", upload_id="long-0001")
    monkeypatch.setattr(resumable, "COMMIT_BYTES", 4)
    monkeypatch.setattr(resumable, "COMMIT_SECONDS", 3600.0)
    writer = uploads.open_write(principal, "cam1", "long-0001", 0)
    try:
        writer.write(b"abc")
        assert uploads.query(principal, "cam1", "long-0001").committed_size == 0
        writer.write(b"d")
        assert uploads.query(principal, "cam1", "long-0001").committed_size == 4
        monkeypatch.setattr(resumable, "COMMIT_BYTES", 1 << 30)
        monkeypatch.setattr(resumable, "COMMIT_SECONDS", 1.0)
        time.sleep(1.1)
        writer.write(b"e")  # a second after the last commit
        assert uploads.query(principal, "cam1", "long-0001").committed_size == 5
        writer.write(b"f")  # just after a commit: waits for the next
        assert uploads.query(principal, "cam1", "long-0001").committed_size == 5
        writer.commit()
        [before] = session_rows(gallery)
        time.sleep(0.01)
        writer.commit()
        [after] = session_rows(gallery)
        assert (after.committed_size, after.expires_at) == (6, before.expires_at)
    finally:
        writer.close()


@pytest.mark.parametrize("change", ["committed_size", "event_id", "removed"])
def test_a_commit_refuses_a_row_changed_under_its_lock(
    gallery: Gallery, principal: auth.Principal, change: str,
) -> None:
    """Cannot happen while locks work (a replica on a filesystem without them): the writer must
    not raise a size or reopen a session that it did not hold alone."""
    uploads = ResumableUploads(gallery)
    uploads.start(principal, "cam1", name="a.bin", upload_id="changed-01")
    write(uploads, principal, "changed-01", 0, b"abc")
    writer = uploads.open_write(principal, "cam1", "changed-01", 3)
    try:
        writer.write(b"def")
        with gallery.db.session() as session:
            row = session.get(UploadSessionRow, ("cam1", "changed-01"))
            assert row is not None
            if change == "removed":
                session.delete(row)
            else:
                setattr(row, change, 1 if change == "committed_size" else "evt_" + "e" * 22)
            session.commit()
        with pytest.raises(FailedPrecondition) as caught:
            writer.commit()
        assert caught.value.reason == "SESSION_EXPIRED"
    finally:
        writer.close()
    assert [(row.committed_size, row.event_id) for row in session_rows(gallery)] == {
        "committed_size": [(1, None)], "event_id": [(3, "evt_" + "e" * 22)], "removed": [],
    }[change]


def test_a_query_whose_file_was_replaced_meanwhile_answers_the_new_session(
    gallery: Gallery, principal: auth.Principal, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """QueryUpload opens the file, then takes its lock: in between, the session expired, was
    started again and written. The old file (unlinked) must not set the new session's size."""
    uploads = ResumableUploads(gallery)
    uploads.start(principal, "cam1", name="a.bin", upload_id="replaced-01")
    write(uploads, principal, "replaced-01", 0, b"abc")
    racing = threading.local()

    def try_lock(fd: int, *, shared: bool = False) -> bool:
        if not getattr(racing, "done", False):
            racing.done = True
            expire(gallery, "replaced-01")
            uploads.start(principal, "cam1", name="a.bin", upload_id="replaced-01")
            write(uploads, principal, "replaced-01", 0, b"12345")
        return file_locks.try_lock(fd, shared=shared)

    monkeypatch.setattr(resumable, "file_locks", dataclasses.replace(
        FileLocks(file_locks.try_lock, file_locks.lock), try_lock=try_lock))
    assert uploads.query(principal, "cam1", "replaced-01").committed_size == 5
    assert [row.committed_size for row in session_rows(gallery)] == [5]
    assert session_file(gallery, "replaced-01").read_bytes() == b"12345"


@dataclasses.dataclass(frozen=True)
class FileLocks:
    """file_locks as resumable.py uses it, with one function replaced."""

    try_lock: Callable[..., bool]
    lock: Callable[..., None]
