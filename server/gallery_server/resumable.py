"""Resumable native uploads (StartUpload, WriteUpload, QueryUpload), in ByteStream's shape.

A session is its row (models.UploadSessionRow) plus its staging file
`staging/sessions/<device>/<upload_id>`; both survive a restart of the server.

Durability: bytes are written at the committed size, fsynced, and only then is the row's
`committed_size` raised (every COMMIT_BYTES or COMMIT_SECONDS, and at the end of each stream), so the file always
holds at least the committed bytes and the committed size never goes backwards. Bytes past the
committed size were never acknowledged: whoever opens the session (a writer, QueryUpload) truncates
them away. A file shorter than its row (lost outside the server's control) lowers the row to it.

One writer per session: a writer holds an exclusive lock on the staging file for its stream (a
second stream waits LOCK_WAIT_SECONDS, then fails with UPLOAD_BUSY). A writer takes its upload slot
(Gallery.reserve_upload, which also wants the disk headroom) before it waits for the lock, since
the wait holds a server thread as writing does: streams piled up on one session are refused past
the device's uploads at once, not each after its wait. The lock is per open file, so it holds
across threads and processes of one host; replicas on several hosts sharing one staging folder
need a filesystem with working locks (local disks, NFSv4: file_locks.py).

Completion: the whole file is hashed once (one streaming read, no hash state kept across
resumes), checked against the declared size and sha256 and handed to Gallery.store(), which marks
the row complete with the event id in the same transaction that inserts the event. The session
file is linked into media/ (StagedFile.adopt) and unlinked only after that commit: a completion
that fails (a database error) keeps every committed byte, and the client finishes again (a
pre-signed URL that a whole PUT completed first answers that event, and its session goes:
signed_urls.py). A file that a crash between the commit and the unlink leaves behind is
removed by the next write to the completed session (the retry a client makes), else by the
reconciler. The completed row (its bytes are gone) remains as long as its event exists, however
late a retry comes: a retry with the same upload id gets that event, never a second.
Deleting the event sets the row's expiry to one GALLERY_UPLOAD_SESSION_TTL later
(Gallery.delete_event): until then QueryUpload and WriteUpload answer NOT_FOUND
UPLOAD_EVENT_DELETED, then the sweeper removes the row (UPLOAD_NOT_FOUND). StartUpload with the id
starts afresh at once: a deleted capture comes back only if a client says so.

A device_event_id is answered by StartUpload at once only with a declared sha256 equal to the
stored capture's; otherwise completion decides (Gallery.capture: that event, or
DEVICE_EVENT_ID_CONFLICT).

Expiry: an incomplete session lives GALLERY_UPLOAD_SESSION_TTL after its start or last committed
write (and never past its `not_after`: a pre-signed URL's session ends with the URL). An expired
session is removed (file, then row) on access and by SessionSweeper in every replica.

Pre-signed URLs (signed_urls.py) use the same sessions through the methods without a principal
(`open_session`, `writer`, `peek`): the URL's signature is their authorization. `peek` is read
only, for the unauthenticated status GET/HEAD.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import pathlib
import secrets
import time
from collections.abc import Callable

import sqlalchemy as sa
from sqlmodel import col, select

from . import file_locks, validation
from ._writeback import Writeback
from .auth import READ, WRITE, Principal
from .background import BackgroundLoop
from .clock import aware, utcnow
from .errors import (
    AlreadyExists,
    Exhausted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
)
from .models import Event, UploadSessionRow
from .quota import Room
from .service import Gallery, SessionHook
from .storage import StagedFile, fsync_dir, make_folders, upload_too_large
from .uploads import Upload

log = logging.getLogger(__name__)

# An fsync and a row update per MiB would cost more than the bytes themselves; a crash loses at
# most this much (the client resumes from the committed size), and a slow link still commits often.
COMMIT_BYTES = 32 << 20
COMMIT_SECONDS = 2.0
LOCK_WAIT_SECONDS = 5.0
MAX_CHECKSUMS = 1000


@dataclasses.dataclass(frozen=True)
class SessionState:
    """What the API reports of a session."""

    upload_id: str
    committed_size: int
    expires_at: datetime.datetime
    event_id: str = ""
    declared_size: int | None = None


class ResumableUploads:
    def __init__(self, gallery: Gallery) -> None:
        self.gallery = gallery
        self.db = gallery.db
        self.storage = gallery.storage
        self.settings = gallery.settings

    # -- StartUpload / QueryUpload ------------------------------------------------------------

    def start(
        self,
        principal: Principal,
        device: str,
        *,
        name: str,
        media_type: str = "",
        metadata_json: str = "{}",
        size: int | None = None,
        sha256: str = "",
        upload_id: str = "",
        dedupe: bool = False,
        device_event_id: str = "",
    ) -> SessionState:
        principal.require(validation.device_id(device), WRITE)
        upload_id = validation.upload_id(upload_id) if upload_id else secrets.token_urlsafe(24)
        return self.open_session(
            device, upload_id, name=name, media_type=media_type, metadata_json=metadata_json,
            size=size, sha256=sha256, dedupe=dedupe, device_event_id=device_event_id,
        )

    def open_session(
        self,
        device: str,
        upload_id: str,
        *,
        name: str,
        media_type: str = "",
        metadata_json: str = "{}",
        size: int | None = None,
        sha256: str = "",
        dedupe: bool = False,
        device_event_id: str = "",
        not_after: datetime.datetime | None = None,
    ) -> SessionState:
        """start() for a caller that has authorized the device and chosen the id."""
        validation.display_name(name)
        device_event_id = validation.device_event_id(device_event_id)
        if media_type:
            validation.media_type(media_type)
        validation.sha256_hex(sha256)
        limit = self.settings.max_upload_bytes
        if size is not None and size > limit:
            raise upload_too_large("event", limit, field="size")
        if dedupe:
            if not sha256:
                raise InvalidArgument(
                    "SHA256_REQUIRED", "dedupe needs the declared sha256", field="sha256"
                )
            existing = self._event_with(device, sha256)
            if existing is not None:
                return SessionState(upload_id, existing.size, utcnow(), existing.id, existing.size)
        if device_event_id and sha256:
            # Only a declared sha256 proves the content is the stored capture's: without one, the
            # bytes decide at completion (a device that reused an id gets DEVICE_EVENT_ID_CONFLICT
            # then, never "stored" for a capture the server has not seen).
            existing = self.gallery.capture(device, device_event_id, sha256)
            if existing is not None:
                return SessionState(upload_id, existing.size, utcnow(), existing.id, existing.size)
        now = utcnow()
        with self.db.session() as session:
            row = session.get(UploadSessionRow, (device, upload_id))
        if row is not None and (
            (not row.event_id and aware(row.expires_at) <= now)
            or (row.event_id and not self._event_exists(row.event_id))
        ):  # expired, or its event was deleted: the id is free again. Removed outside the
            # session that inserts: on SQLite a transaction that read before another's write
            # cannot write after it.
            if not self.remove(row):  # its file is held (a writer, a cleanup): not free yet
                raise FailedPrecondition(
                    "UPLOAD_BUSY", f"upload {upload_id} is still in use: retry", upload_id=upload_id,
                )
            row = None
        if row is None:
            self._require_room_for_a_session(device, now)
            self.gallery.room_for(device, size, device_event_id=device_event_id)
            # The INSERT is this transaction's first statement: on SQLite one that read first
            # cannot write once another connection has written ("database is locked" at once,
            # whatever the busy timeout). A concurrent start of the id makes it fail instead.
            with self.db.session() as session:
                row = UploadSessionRow(
                    device=device, upload_id=upload_id, name=name, media_type=media_type,
                    metadata_json=metadata_json, declared_size=size, declared_sha256=sha256,
                    committed_size=0, created=now, expires_at=self.expiry(now, not_after),
                    device_event_id=device_event_id, not_after=not_after,
                )
                session.add(row)
                try:
                    session.flush()  # takes the key: a concurrent start of this id waits or fails
                    path = self.storage.session_path(device, upload_id)
                    # Even an empty file takes an inode, and its name a directory block.
                    with self.storage.disk_full_is_exhausted():
                        fd = _open_in_use(path)  # until the row is committed (reconcile.py)
                        try:
                            fsync_dir(path.parent)
                            session.commit()
                        finally:
                            os.close(fd)
                    log.info("upload session started",
                             extra={"device": device, "upload_id": upload_id})
                    return _state(row)
                except sa.exc.IntegrityError:
                    session.rollback()
                    row = session.get(UploadSessionRow, (device, upload_id))
                    if row is None:
                        raise
        if row.declared_size != size or row.declared_sha256 != sha256:
            raise FailedPrecondition(
                "UPLOAD_ID_IN_USE",
                f"upload {upload_id} exists with another declared size or sha256",
                upload_id=upload_id, declared_size=str(row.declared_size),
            )
        return _state(row)

    def _require_room_for_a_session(self, device: str, now: datetime.datetime) -> None:
        """A new session is a row and a file kept until it expires: not below the disk headroom,
        and at most GALLERY_MAX_UPLOAD_SESSIONS_PER_DEVICE open for a device at once (counted
        apart from the INSERT, so a burst may pass the limit by a few)."""
        self.storage.require_space()
        limit = self.settings.max_upload_sessions_per_device
        open_ = sa.select(UploadSessionRow.upload_id).where(
            UploadSessionRow.device == device, col(UploadSessionRow.event_id).is_(None),
            UploadSessionRow.expires_at > now,
        )
        if self.db.count_at_most(open_, limit) >= limit:
            raise Exhausted(
                "TOO_MANY_UPLOAD_SESSIONS",
                f"device {device} has {limit} resumable uploads open: finish or let some expire first",
                device=device, limit=str(limit),
            )

    def query(self, principal: Principal, device: str, upload_id_: str) -> SessionState:
        principal.require(validation.device_id(device), WRITE)
        return self.state(device, validation.upload_id(upload_id_))

    def state(self, device: str, upload_id_: str) -> SessionState:
        """query() for a caller that has authorized the device."""
        row = self._load(device, upload_id_)
        if row.event_id:
            return _state(row)
        try:  # never created here: a file the sweeper just removed must not come back rowless
            fd = os.open(self.storage.session_path(device, row.upload_id), os.O_RDWR)
        except FileNotFoundError:  # removed meanwhile, or lost: nothing of it is there
            return dataclasses.replace(_state(row), committed_size=0)
        try:
            if not file_locks.try_lock(fd):  # a writer has it: its committed size is the answer
                return _state(row)
            # Read the row again now that no writer has the file: one may have completed the
            # session meanwhile, and this file is then its event's media (never to be trimmed).
            row = self._load(device, row.upload_id)
            if row.event_id or os.fstat(fd).st_nlink == 0:
                return _state(row)
            return _state(self._recover(row, fd))
        finally:
            os.close(fd)

    def peek(self, device: str, upload_id_: str) -> SessionState | None:
        """A session's state, read only (None: no session, or an expired one): nothing is
        created, truncated, updated or removed, so an unauthenticated status read changes
        nothing. Bytes past the row's committed size were never acknowledged and do not count;
        a file shorter than its row (or gone) counts for what it holds."""
        with self.db.session() as session:
            row = session.get(UploadSessionRow, (device, upload_id_))
        if row is None:
            return None
        if row.event_id:
            return _state(row)
        if aware(row.expires_at) <= utcnow():
            return None
        try:
            size = os.stat(self.storage.session_path(device, upload_id_)).st_size
        except FileNotFoundError:
            size = 0
        return dataclasses.replace(_state(row), committed_size=min(size, row.committed_size))

    def find_existing(self, principal: Principal, device: str, sha256s: list[str]) -> dict[str, str]:
        """The digests among `sha256s` that the device has stored, each with its oldest event."""
        principal.require(validation.device_id(device), READ)
        if len(sha256s) > MAX_CHECKSUMS:
            raise InvalidArgument(
                "TOO_MANY_CHECKSUMS", f"at most {MAX_CHECKSUMS} checksums per request",
                field="sha256s", limit=str(MAX_CHECKSUMS),
            )
        wanted = sorted({validation.sha256_hex(s or "-") for s in sha256s})
        if not wanted:
            return {}
        statement = (
            select(Event.sha256, Event.id)
            .where(Event.device == device, col(Event.sha256).in_(wanted), Event.state == "stored")
            .order_by(col(Event.created).desc(), col(Event.id).desc())
        )
        with self.db.session() as session:
            rows = session.exec(statement).all()
        return {sha: event_id for sha, event_id in rows}  # the oldest, listed last, wins

    # -- WriteUpload ----------------------------------------------------------------------------

    def open_write(
        self, principal: Principal, device: str, upload_id_: str, write_offset: int
    ) -> SessionWriter:
        """A writer positioned at `write_offset`, which must be the committed size. The caller
        closes it. A completed session gives a writer whose `done` is its state."""
        principal.require(validation.device_id(device), WRITE)
        return self.writer(device, validation.upload_id(upload_id_), write_offset)

    def writer(
        self, device: str, upload_id_: str, write_offset: int | None,
        while_busy: Callable[[], object] | None = None,
    ) -> SessionWriter:
        """open_write() for a caller that has authorized the device; `write_offset` None: at the
        committed size, whatever it is. The writer holds an upload slot of the device until
        close(), unless the session was complete before (nothing to write, no slot taken).
        `while_busy` is called as the writer waits for another stream's lock on the session."""
        row = self._load(device, upload_id_)
        if row.event_id:
            self._drop_completed_file(row)
            return SessionWriter(self, row, None)
        room = self.gallery.room_for(device, device_event_id=row.device_event_id)
        release = self.gallery.reserve_upload(device)
        try:
            fd = _open(self.storage.session_path(device, row.upload_id))
        except BaseException:
            release()
            raise
        try:
            _lock(fd, row.upload_id, while_busy)
            row = self._load(device, row.upload_id)  # as it is now that this writer is alone
            if row.event_id:  # completed by another stream while this one waited
                self._drop_completed_file(row, locked=fd)
            else:
                row = self._recover(row, fd)
                if write_offset is not None and write_offset != row.committed_size:
                    raise FailedPrecondition(
                        "WRONG_OFFSET",
                        f"write_offset {write_offset} is not the committed size"
                        f" {row.committed_size}: resume at {row.committed_size}",
                        field="write_offset", committed_size=str(row.committed_size),
                        write_offset=str(write_offset),
                    )
        except BaseException:
            _let_go(fd, release)
            raise
        if row.event_id:  # nothing to write
            _let_go(fd, release)
            return SessionWriter(self, row, None)
        return SessionWriter(self, row, fd, release, room)

    # -- expiry ---------------------------------------------------------------------------------

    def sweep_once(self, now: datetime.datetime | None = None) -> int:
        """Remove expired incomplete sessions (their bytes first; one in use by a writer is
        skipped) and expired completed ones whose event was deleted. A completed session whose
        event exists is kept: it is the answer to a late retry."""
        now = now or utcnow()
        event_gone = ~sa.exists().where(col(Event.id) == col(UploadSessionRow.event_id))
        with self.db.session() as session:
            rows = session.exec(
                select(UploadSessionRow).where(
                    col(UploadSessionRow.expires_at) <= now,
                    sa.or_(col(UploadSessionRow.event_id).is_(None), event_gone),
                )
            ).all()
        removed = 0
        for row in rows:
            if self.remove(row, now=now):
                removed += 1
        return removed

    # -- internals ------------------------------------------------------------------------------

    def expiry(
        self, now: datetime.datetime, not_after: datetime.datetime | None = None
    ) -> datetime.datetime:
        expiry = now + datetime.timedelta(seconds=self.settings.upload_session_ttl)
        return min(expiry, aware(not_after)) if not_after is not None else expiry

    def _load(self, device: str, upload_id_: str) -> UploadSessionRow:
        with self.db.session() as session:
            row = session.get(UploadSessionRow, (device, upload_id_))
        if row is None:
            raise NotFound(
                "UPLOAD_NOT_FOUND", f"upload {upload_id_} not found for device {device}",
                device=device, upload_id=upload_id_,
            )
        if row.event_id:  # complete: never expires while its event exists
            if not self._event_exists(row.event_id):
                raise NotFound(
                    "UPLOAD_EVENT_DELETED",
                    f"upload {upload_id_} was stored as event {row.event_id}, which has been"
                    " deleted since; StartUpload with this upload_id uploads it again",
                    device=device, upload_id=upload_id_, event_id=row.event_id,
                )
            return row
        if aware(row.expires_at) <= (now := utcnow()):
            self.remove(row, now=now)
            raise FailedPrecondition(
                "SESSION_EXPIRED", f"upload {upload_id_} expired: start it again",
                device=device, upload_id=upload_id_,
            )
        return row

    def _recover(self, row: UploadSessionRow, fd: int) -> UploadSessionRow:
        """Under the session's lock: make the file exactly the committed bytes."""
        size = os.fstat(fd).st_size
        if size > row.committed_size:  # written but never acknowledged
            os.ftruncate(fd, row.committed_size)
            os.fsync(fd)
        elif size < row.committed_size:
            log.warning("upload session file shorter than its row",
                        extra={"device": row.device, "upload_id": row.upload_id})
            with self.db.session() as session:
                session.exec(  # type: ignore[call-overload]
                    sa.update(UploadSessionRow)
                    .where(col(UploadSessionRow.device) == row.device,
                           col(UploadSessionRow.upload_id) == row.upload_id)
                    .values(committed_size=size)
                )
                session.commit()
            row.committed_size = size
        return row

    def remove(
        self, row: UploadSessionRow, *, now: datetime.datetime | None = None, held: bool = False
    ) -> bool:
        """Delete a session's file, then its row (only if still expired at `now`, when given).
        False when a writer holds it (unless `held`: the caller is that writer), or when the id
        has been started afresh since `row` was read: that session's file and row are not the
        caller's to remove. A row already gone counts as removed."""
        path = self.storage.session_path(row.device, row.upload_id)
        try:
            fd = None if held else os.open(path, os.O_RDWR)
        except FileNotFoundError:
            fd = None
        if held:
            path.unlink(missing_ok=True)
            fsync_dir(path.parent)
            _tidy(path)
        try:
            if fd is not None:
                if not file_locks.try_lock(fd):
                    return False
                # Under the lock, the row again: a start of the id after the caller's read (the
                # sweeper lists rows, then reaches each) made a new session at this very name.
                # (No row at all: removed by another pass, whose file this is no longer, or a start
                # whose INSERT rolled back: the file is nobody's, and goes.)
                with self.db.session() as session:
                    current = session.get(UploadSessionRow, (row.device, row.upload_id))
                if current is not None and (current.created != row.created or (
                    now is not None and aware(current.expires_at) > now
                )):
                    return False
                path.unlink(missing_ok=True)
                fsync_dir(path.parent)
                _tidy(path)
            with self.db.session() as session:
                statement = sa.delete(UploadSessionRow).where(
                    col(UploadSessionRow.device) == row.device,
                    col(UploadSessionRow.upload_id) == row.upload_id,
                    col(UploadSessionRow.created) == row.created,
                )
                if now is not None:
                    statement = statement.where(col(UploadSessionRow.expires_at) <= now)
                session.exec(statement)  # type: ignore[call-overload]
                session.commit()
        finally:
            if fd is not None:
                os.close(fd)
        log.info("upload session removed", extra={"device": row.device, "upload_id": row.upload_id})
        return True

    def _drop_completed_file(self, row: UploadSessionRow, locked: int | None = None) -> None:
        """Remove a completed session's file if one is there: its event holds the bytes. A crash
        between a completion's commit and its unlink leaves one (a second link to the event's
        media), and so does a writer that created the file just after a completion removed it.
        Only under the session's lock (`locked`: a descriptor of the file holding it) and while
        the row is still that completion, so a session restarted under the id keeps its file.
        Best effort: the answer does not depend on it, and the reconciler removes what is left."""
        path = self.storage.session_path(row.device, row.upload_id)
        fd = locked
        try:
            if fd is None:
                fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)  # an exclusive lock needs writing
                if not file_locks.try_lock(fd):  # a writer, the reconciler or another replica has it
                    return
            with self.db.session() as session:
                current = session.get(UploadSessionRow, (row.device, row.upload_id))
            here, held = os.lstat(path), os.fstat(fd)
            if current is not None and current.event_id == row.event_id \
                    and (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino):
                path.unlink()
                fsync_dir(path.parent)
                _tidy(path)
                log.info("completed upload session's leftover file removed",
                         extra={"device": row.device, "upload_id": row.upload_id, "event_id": row.event_id})
        except FileNotFoundError:  # none, or removed meanwhile
            pass
        except Exception:
            log.warning("could not remove a completed upload session's leftover file", exc_info=True,
                        extra={"device": row.device, "upload_id": row.upload_id})
        finally:
            if locked is None and fd is not None:
                os.close(fd)

    def _event_exists(self, event_id: str) -> bool:
        with self.db.session() as session:
            return session.get(Event, event_id) is not None

    def _event_with(self, device: str, sha256: str) -> Event | None:
        with self.db.session() as session:
            return session.exec(
                select(Event)
                .where(Event.device == device, Event.sha256 == sha256, Event.state == "stored")
                .order_by(col(Event.created), col(Event.id))
                .limit(1)
            ).first()


class SessionWriter:
    """Appends to one session for one WriteUpload stream, holding its lock and its upload slot
    until close()."""

    def __init__(
        self, uploads: ResumableUploads, row: UploadSessionRow, fd: int | None,
        release: Callable[[], None] | None = None, room: Room | None = None,
    ) -> None:
        self._uploads = uploads
        self._room = room  # the device's quota when this stream began (quota.py)
        self._row = row
        self._fd = fd
        self._release = release
        self.offset = row.committed_size  # bytes written to the file (committed or not)
        self._writeback = Writeback(fd, start=self.offset) if fd is not None else None
        self._committed_at = time.monotonic()

    @property
    def done(self) -> SessionState | None:
        """The state of a session that was complete before this stream: nothing to write."""
        return _state(self._row) if self._row.event_id else None

    def write(self, data: bytes | memoryview) -> None:
        assert self._fd is not None
        declared = self._row.declared_size
        end = self.offset + len(data)
        if declared is not None and end > declared:
            raise OutOfRange(
                "WRITE_BEYOND_SIZE",
                f"the write ends at {end}, past the declared size {declared}",
                field="data", declared=str(declared), committed_size=str(self._row.committed_size),
            )
        limit = self._uploads.settings.max_upload_bytes
        if end > limit:
            raise upload_too_large("event", limit, field="data")
        if self._room is not None:
            self._room.check(end)
        view = memoryview(data)
        while view:
            with self._uploads.storage.disk_full_is_exhausted():
                written = os.pwrite(self._fd, view, self.offset)
            view = view[written:]
            self.offset += written
        assert self._writeback is not None
        self._writeback.wrote(len(data))
        if (self.offset - self._row.committed_size >= COMMIT_BYTES
                or time.monotonic() - self._committed_at >= COMMIT_SECONDS):
            self.commit()

    def commit(self) -> None:
        """fsync what was written, then record it as committed (in that order)."""
        if self._fd is None or self.offset == self._row.committed_size:
            return
        with self._uploads.storage.disk_full_is_exhausted():
            os.fsync(self._fd)
        now = utcnow()
        row = self._row
        with self._uploads.db.session() as session:
            updated = session.exec(  # type: ignore[call-overload]
                sa.update(UploadSessionRow)
                .where(col(UploadSessionRow.device) == row.device,
                       col(UploadSessionRow.upload_id) == row.upload_id,
                       col(UploadSessionRow.committed_size) == row.committed_size,
                       col(UploadSessionRow.event_id).is_(None))
                .values(committed_size=self.offset,
                        expires_at=self._uploads.expiry(now, row.not_after))
            ).rowcount
            session.commit()
        if not updated:  # removed (expired) or changed under the lock: should not happen
            raise FailedPrecondition(
                "SESSION_EXPIRED", f"upload {row.upload_id} is no longer open",
                upload_id=row.upload_id,
            )
        row.committed_size = self.offset
        self._committed_at = time.monotonic()
        row.expires_at = self._uploads.expiry(now, row.not_after)

    def commit_quietly(self) -> None:
        """commit() for a stream that ended in an error (or was cancelled): every message
        received before it was whole, so its bytes count."""
        if self._fd is None or self._row.event_id:
            return
        try:
            self.commit()
        except Exception:
            log.warning("could not commit an interrupted write", exc_info=True,
                        extra={"device": self._row.device, "upload_id": self._row.upload_id})

    def finish(
        self, *, event_id: str | None = None, before_insert: SessionHook | None = None
    ) -> SessionState:
        """Commit, verify and store the upload as an event (`event_id`: its id chosen before, as a
        pre-signed URL's; `before_insert`: more to do in the event's transaction)."""
        self.commit()
        row = self._row
        if row.declared_size is not None and row.committed_size < row.declared_size:
            raise FailedPrecondition(
                "UPLOAD_INCOMPLETE",
                f"{row.committed_size} of {row.declared_size} declared bytes are committed",
                committed_size=str(row.committed_size), declared=str(row.declared_size),
            )
        uploads = self._uploads
        gallery = uploads.gallery
        path = uploads.storage.session_path(row.device, row.upload_id)
        media = StagedFile.adopt(path, what="event", storage=uploads.storage)
        upload = Upload(
            uploads.storage, row.device, max_media_bytes=uploads.settings.max_upload_bytes,
            max_thumbnail_bytes=uploads.settings.max_thumbnail_bytes, media=media,
        )
        fields = upload.fields
        fields.name = row.name
        fields.media_type = row.media_type
        fields.metadata_json = row.metadata_json
        fields.declared_size = row.declared_size
        fields.declared_sha256 = row.declared_sha256
        fields.device_event_id = row.device_event_id

        def mark_complete(session, event):  # type: ignore[no-untyped-def]
            updated = session.exec(
                sa.update(UploadSessionRow)
                .where(col(UploadSessionRow.device) == row.device,
                       col(UploadSessionRow.upload_id) == row.upload_id,
                       col(UploadSessionRow.event_id).is_(None))
                .values(event_id=event.id)
            ).rowcount
            if not updated:
                raise FailedPrecondition(
                    "UPLOAD_BUSY", f"upload {row.upload_id} was completed by another stream",
                    upload_id=row.upload_id,
                )
            if before_insert is not None:
                before_insert(session, event)

        try:
            event = gallery.store(upload, event_id=event_id, before_insert=mark_complete)
        except (InvalidArgument, AlreadyExists) as exc:
            # Bytes that can never become this upload's event: nothing of them is kept.
            if exc.reason in ("SIZE_MISMATCH", "SHA256_MISMATCH", "DEVICE_EVENT_ID_CONFLICT"):
                media.sync()
                uploads.remove(row, held=True)
            raise
        finally:
            media.sync()  # closes its descriptor
        # Committed: the event's own link holds the bytes now (or, for a capture stored before,
        # that event is the answer). On any failure above the session file is untouched: store()
        # links it into media/ and unlinks only that link, so its committed bytes survive.
        path.unlink(missing_ok=True)
        fsync_dir(path.parent)
        row.event_id = event.id
        _tidy(path)
        return _state(row)

    def state(self) -> SessionState:
        return _state(self._row)

    def discard(self) -> None:
        """Remove this session (its file, then its row) under this writer's lock: its bytes can
        never be stored (the pre-signed URL was completed by another PUT)."""
        if self._fd is not None and not self._row.event_id:
            self._uploads.remove(self._row, held=True)

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            _let_go(fd, self._release or _nothing)
        self._release = None


class SessionSweeper(BackgroundLoop):
    """Removes expired sessions in the background (every replica may: removal is idempotent)."""

    thread_name = "session-sweeper"

    def __init__(self, uploads: ResumableUploads, interval: float = 60.0) -> None:
        super().__init__(interval)
        self.uploads = uploads

    def run_pass(self) -> bool:
        self.uploads.sweep_once()
        return False


def _state(row: UploadSessionRow) -> SessionState:
    return SessionState(row.upload_id, row.committed_size, aware(row.expires_at), row.event_id or "",
                        row.declared_size)


def _open(path: pathlib.Path, flags: int = 0) -> int:
    for _ in range(10):  # _tidy() may remove an empty parent between mkdir and open
        make_folders(path.parent)
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | flags, 0o640)
        except FileNotFoundError:
            continue
    raise RuntimeError(f"could not create {path}")


def _tidy(path: pathlib.Path) -> None:
    """Remove the session's device folder and sessions/ once empty: staging/ holds only uploads
    in flight."""
    for folder in (path.parent, path.parent.parent):
        try:
            folder.rmdir()
        except OSError:  # not empty (or gone): leave it
            return


def _open_in_use(path: pathlib.Path) -> int:
    """Create (or empty) a session file under a shared lock: the reconciler, which sees no row
    until it is committed, leaves it alone. Opened again if a reconciler removed the old file
    under that name while this waited for the lock."""
    while True:
        fd = _open(path, os.O_TRUNC)
        try:
            file_locks.lock(fd, shared=True)
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _let_go(fd: int, release: Callable[[], None]) -> None:
    """Close a session file, and its lock with it, then give back its writer's upload slot, even
    if the close fails."""
    try:
        os.close(fd)
    finally:
        release()


def _nothing() -> None:
    pass


def _lock(fd: int, upload_id_: str, while_busy: Callable[[], object] | None = None) -> None:
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        if file_locks.try_lock(fd):
            return
        if while_busy is not None:
            while_busy()
        if time.monotonic() > deadline:
            raise FailedPrecondition(
                "UPLOAD_BUSY", f"another stream is writing upload {upload_id_}",
                upload_id=upload_id_,
            )
        time.sleep(0.05)
