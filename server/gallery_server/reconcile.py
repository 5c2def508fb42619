"""Reconciliation of files and rows, and the admin status that reports it.

A crash (or a kill, or a full disk) can leave, at worst: bytes in staging/ that no upload will
finish, a media file or thumbnail whose row was never committed (or was deleted: rows go first),
and grant rows of signed URLs long expired. Reconciler.run_once() clears those, and reports, never
touches, the one thing that must not happen: a stored row whose media file is missing or short.

What is removed, and why it is safe with any number of replicas sharing storage and database:

* Nothing in use. Every file is removed under an exclusive lock taken without waiting, and the
  row is read again under it: a StagedFile holds a shared lock from its creation until the row
  owning the moved file is committed (storage.hold_shared), a resumable writer holds an
  exclusive one, so a file of a live upload is skipped however old its timestamps are (a
  thumbnail sent first while its media streams for hours; a file linked into media/ whose row
  commits a moment later). Ages are the second line: incoming imports hold no lock, and locks
  need a filesystem that has them (local disks, NFSv4: file_locks.py); hence the floor on the grace period
  (settings.py: at least 2 x GALLERY_UPLOAD_IDLE_SECONDS and 300 s).
* staging/<name> (an upload in flight, an incoming copy) whose last change is older than the grace
  period.
* staging/sessions/<device>/<upload_id> older than the grace period with no session row (a live
  resumable session always has its row: resumable.py removes the file first, then the row) or
  with a completed row (its bytes are its event's; a crash after the commit leaves this copy).
* media/<device>/<id> with no event row for that device and id, older than the grace period,
  while the database describes the folder (it has events, and the folder holds stored media it
  names: a new or another gallery's database leaves every file alone, with an error),
  unless a signed URL not used yet has that id (its retry replaces the file: signed_urls.py).
  Age is the later of mtime and ctime: a link or rename sets ctime, so a resumable file written
  long ago but linked just now counts as new.
* media/<device>/<id>.thumb with neither an event row nor a grant row, older than the grace
  period: a signed thumbnail URL may deliver the thumbnail before its media (signed_urls.py).
* grant rows expired for longer than the grace period, except those with a URL not used yet
  (kept a day longer: a PUT verified before expiry may still be running).

Every decision reads the row again right before the unlink, every unlink tolerates the file being
gone (another replica got there first), and nothing is ever deleted from the events table.

The last run's findings are written to <data>/run/reconcile.json (atomically, shared by replicas),
which GetAdminStatus reports with disk space and counts.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import pathlib
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import aliased
from sqlmodel import col, func, select

from . import devices, file_locks, incoming, quota, scrub, status_files, thumbnails
from .auth import ADMIN, Principal
from .background import BackgroundLoop
from .clock import rfc3339, utcnow
from .errors import DatabaseUnavailable
from .models import GRANT_UNUSED, DeletedCapture, DeviceCommand, Event, UploadGrant, UploadSessionRow
from .service import Gallery
from .storage import THUMBNAIL_SUFFIX, DiskSpace, fsync_dir, make_folders

log = logging.getLogger(__name__)

ROW_BATCH = 500
# A pass that would remove at least this many files, more than half of the old ones, removes none:
# a database that names almost nothing in the folder is not its gallery's (_media).
MASS_ORPHANS = 100
MAX_EXAMPLES = 20
# A grant whose media URL is not used yet is kept this much longer after expiry: a PUT of it that
# began before expiry may still be running (a 16 GiB PUT over a slow link), and completes with it.
# A thumbnail's PUT (GALLERY_MAX_THUMBNAIL_BYTES at most) has the grace period: every grant whose
# thumbnail URL was left unused stayed a day, a day's uploads' worth of rows (soak test).
UNUSED_GRANT_SLACK = datetime.timedelta(days=1)


@dataclasses.dataclass
class Findings:
    """One pass of the reconciler: what it removed and what it found wrong."""

    started: str = ""  # RFC 3339 UTC
    finished: str = ""
    replica: str = ""  # host:pid of the replica that ran it
    staging_removed: int = 0
    orphan_media_removed: int = 0
    orphan_thumbnails_removed: int = 0
    expired_grants_removed: int = 0
    closed_commands_removed: int = 0
    # Deletions of captures their devices stopped announcing long ago (devices.py): forgotten.
    deleted_captures_forgotten: int = 0
    bytes_reclaimed: int = 0
    rows_checked: int = 0
    # Rows whose media file is missing, or has another size than the row says: never deleted.
    missing_media: int = 0
    size_mismatch: int = 0
    examples: list[str] = dataclasses.field(default_factory=list)  # "<device>/<event_id>"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Counts:
    events_stored: int
    events_on_device: int
    stored_bytes: int
    upload_sessions: int
    upload_grants: int
    uploads_in_flight: int  # in the replica that answered
    thumbnails_pending: int
    pulls_open: int


@dataclasses.dataclass(frozen=True)
class AdminStatus:
    last_reconcile: Findings | None
    last_verify: scrub.Totals | None
    disk: DiskSpace
    min_free_bytes: int
    accepting_uploads: bool
    counts: Counts | None  # None: the database did not answer
    device_storage: quota.Summary | None
    drop_backlog: incoming.DropBacklog | None = None


def _granted(media_state: str | None, thumbnail: bool) -> bool:
    """Whether a file in media/ with no event row still belongs to a signed URL's grant: a
    thumbnail while the grant exists (it may arrive before its media); media while the URL can
    still complete (a completion after a crash replaces a leftover at its id)."""
    if media_state is None:
        return False
    return thumbnail or media_state in GRANT_UNUSED


class Reconciler:
    def __init__(self, gallery: Gallery, *, grace_seconds: float | None = None) -> None:
        self.gallery = gallery
        self.db = gallery.db
        self.storage = gallery.storage
        self.grace_seconds = (
            gallery.settings.reconcile_grace_seconds if grace_seconds is None else grace_seconds
        )

    @property
    def status_path(self) -> pathlib.Path:
        return self.storage.run_root / "reconcile.json"

    # -- one pass -------------------------------------------------------------------------------

    @property
    def lock_path(self) -> pathlib.Path:
        return self.storage.run_root / "reconcile.lock"

    def run_once(self) -> Findings:
        """One pass; waits while another replica (or thread) runs one."""
        found = self._locked(wait=True)
        assert found is not None
        return found

    def run_unless_busy(self) -> Findings | None:
        """One pass, unless another replica runs one now (None: skipped). The periodic loop uses
        this: every replica walking every file at once would only multiply the disk reads."""
        return self._locked(wait=False)

    def _locked(self, *, wait: bool) -> Findings | None:
        # One pass at a time over the shared data root: a lock file beside the status (as for the
        # files themselves, replicas on several hosts need a filesystem with locks: file_locks.py).
        make_folders(self.lock_path.parent)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            if wait:
                file_locks.lock(fd)
            elif not file_locks.try_lock(fd):
                log.info("another replica is reconciling: pass skipped")
                return None
            return self._pass()
        finally:
            os.close(fd)

    def _pass(self) -> Findings:
        findings = Findings(started=rfc3339(utcnow()), replica=f"{socket.gethostname()}:{os.getpid()}")
        cutoff = time.time() - self.grace_seconds
        # Ages are read for every file before any is removed: a staging leftover and an orphan in
        # media/ may be two links of one inode (a crash between link and unlink), and removing
        # one link sets the inode's ctime to now, which would make the other look young.
        staging, sessions = self._old_staging(cutoff)
        media = self._old_media(cutoff)
        self._staging(findings, staging, sessions)
        self._media(findings, media)
        self._grants(findings)
        self._commands(findings)
        self._deleted_captures(findings)
        self._rows(findings)
        findings.finished = rfc3339(utcnow())
        status_files.write(self.status_path, findings)
        problems = findings.missing_media + findings.size_mismatch
        (log.error if problems else log.info)(
            "reconciled", extra={k: v for k, v in findings.to_json().items() if k != "examples"}
            | {"examples": ",".join(findings.examples)},
        )
        return findings

    def _old_staging(self, cutoff: float) -> tuple[list[pathlib.Path], list[pathlib.Path]]:
        root = self.storage.staging_root
        uploads = [p for p in _files(root) if _changed(p) < cutoff]
        sessions = [p for d in _dirs(self.storage.sessions_root) for p in _files(d) if _changed(p) < cutoff]
        return uploads, sessions

    def _old_media(self, cutoff: float) -> dict[str, list[pathlib.Path]]:
        return {
            device_dir.name: [p for p in _files(device_dir) if _changed(p) < cutoff]
            for device_dir in _dirs(self.storage.media_root)
        }

    def _staging(self, findings: Findings, uploads: list[pathlib.Path], sessions: list[pathlib.Path]) -> None:
        for path in uploads:
            self._remove(path, findings, "staging_removed")
        for path in sessions:
            if self._session_file_is_leftover(path):
                self._remove(path, findings, "staging_removed",
                             still=lambda p=path: self._session_file_is_leftover(p))

    def _session_file_is_leftover(self, path: pathlib.Path) -> bool:
        """A session file is a leftover when its session has no row, or is complete (its bytes
        are its event's now; a crash between the commit and the unlink leaves this copy)."""
        with self.db.session() as session:
            row = session.get(UploadSessionRow, (path.parent.name, path.name))
        return row is None or bool(row.event_id)

    def _media(self, findings: Findings, media: dict[str, list[pathlib.Path]]) -> None:
        orphans = list(self._orphans(media))
        if not orphans:
            return
        if not self._database_describes_media():
            log.error("the database names none of the media in the data folder: no media removed (is"
                      " GALLERY_DATABASE_URL this gallery's database, and GALLERY_DATA_DIR its folder?)",
                      extra={"data_dir": str(self.gallery.settings.data_dir)})
            return
        old = sum(map(len, media.values()))
        if len(orphans) >= MASS_ORPHANS and 2 * len(orphans) > old:
            log.error("most of the media in the data folder have no row: none removed (is GALLERY_DATABASE_URL"
                      " this gallery's database, and GALLERY_DATA_DIR its folder?)",
                      extra={"data_dir": str(self.gallery.settings.data_dir), "orphans": len(orphans), "old": old})
            return
        for path, device, event_id, thumbnail in orphans:
            counter = "orphan_thumbnails_removed" if thumbnail else "orphan_media_removed"
            # Read again under the file's lock: committed since the batch read?
            self._remove(path, findings, counter,
                         still=lambda d=device, e=event_id, t=thumbnail: not self._has_row(d, e, t))

    def _orphans(self, media: dict[str, list[pathlib.Path]]) -> Iterator[tuple[pathlib.Path, str, str, bool]]:
        """The files of `media` no row names: (path, device, event id, whether a thumbnail)."""
        for device, old in media.items():
            for start in range(0, len(old), ROW_BATCH):
                batch = old[start:start + ROW_BATCH]
                ids = {p.name.removesuffix(THUMBNAIL_SUFFIX) for p in batch}
                with self.db.session() as session:
                    events = set(session.exec(
                        select(Event.id).where(Event.device == device, col(Event.id).in_(ids))
                    ))
                    grants = dict(session.exec(
                        select(UploadGrant.event_id, UploadGrant.media_state)
                        .where(col(UploadGrant.event_id).in_(ids))
                    ).all())
                for path in batch:
                    event_id = path.name.removesuffix(THUMBNAIL_SUFFIX)
                    thumbnail = path.name.endswith(THUMBNAIL_SUFFIX)
                    if not (event_id in events or _granted(grants.get(event_id), thumbnail)):
                        yield path, device, event_id, thumbnail

    def _database_describes_media(self) -> bool:
        """Whether the database is the one this data folder's media belong to, as far as a look
        tells: it has stored events, and the folder holds the file of one of them (up to 1,000
        looked at: Gallery.stored_media_found). A new database (a mistyped GALLERY_DATABASE_URL,
        an empty PostgreSQL one) or another gallery's names none of the files here, and every one
        of them would pass for an orphan: a pass removed a whole gallery's media. Once such a
        database has stored a file here, _media's second look refuses a pass that would remove
        most of the folder. The price: a gallery whose every stored event was deleted keeps the
        orphans a crash left until it stores an event again."""
        stored = sa.select(col(Event.id)).where(col(Event.state) == "stored")
        return self.db.count_at_most(stored, 1) > 0 and self.gallery.stored_media_found(at_least=1)

    def _has_row(self, device: str, event_id: str, thumbnail: bool) -> bool:
        with self.db.session() as session:
            event = session.get(Event, event_id)
            if event is not None and event.device == device:
                return True
            grant = session.get(UploadGrant, event_id)
            return _granted(grant.media_state if grant is not None else None, thumbnail)

    def _grants(self, findings: Findings) -> None:
        now = utcnow()
        expired = now - datetime.timedelta(seconds=self.grace_seconds)
        media_unused = col(UploadGrant.media_state).in_(GRANT_UNUSED)
        with self.db.session() as session:
            removed = session.exec(  # type: ignore[call-overload]
                sa.delete(UploadGrant).where(
                    col(UploadGrant.expires_at) < expired,
                    sa.or_(sa.not_(media_unused), col(UploadGrant.expires_at) < expired - UNUSED_GRANT_SLACK),
                )
            ).rowcount
            session.commit()
        findings.expired_grants_removed += removed or 0

    def _commands(self, findings: Findings) -> None:
        """Closed pull commands nothing reads again: those of events deleted since, and every
        one of an event but its latest (GetEvent shows the latest pull; each retried pull left a
        row). Without this, every pull ever made stayed a row. Open commands are never touched."""
        later = aliased(DeviceCommand)
        leftover = sa.and_(
            col(DeviceCommand.open_key).is_(None),
            sa.or_(
                ~sa.exists().where(col(Event.device) == col(DeviceCommand.device),
                                   col(Event.id) == col(DeviceCommand.event_id)),
                sa.exists().where(later.device == DeviceCommand.device,
                                  later.event_id == DeviceCommand.event_id,
                                  later.seq > DeviceCommand.seq),  # type: ignore[operator]
            ),
        )
        # In batches walked by seq, each read and then deleted in a short transaction of its own:
        # the first pass after an upgrade may find every pull ever made, and one DELETE of them
        # all would hold SQLite's write lock as long; batches that each scanned from the start
        # again (the rows kept included) took quadratic time. A row read as a leftover stays one:
        # a closed command never reopens, a deleted event's id never comes back, a later pull
        # only adds rows, and only this pass, under its lock, deletes commands.
        after = 0
        while True:
            with self.db.session() as session:
                seqs = list(session.exec(  # type: ignore[call-overload]
                    sa.select(DeviceCommand.seq).where(col(DeviceCommand.seq) > after, leftover)
                    .order_by(col(DeviceCommand.seq)).limit(ROW_BATCH)
                ).scalars())
            if seqs:
                with self.db.session() as session:
                    session.exec(sa.delete(DeviceCommand).where(col(DeviceCommand.seq).in_(seqs)))  # type: ignore[call-overload]
                    session.commit()
            findings.closed_commands_removed += len(seqs)
            if len(seqs) < ROW_BATCH:
                return
            after = seqs[-1]

    def _deleted_captures(self, findings: Findings) -> None:
        """Deleted captures whose devices have not announced them for GALLERY_DELETED_CAPTURE_DAYS:
        the device no longer holds the file, and the row would stay for ever (one per capture a
        device with unique file names ever had deleted). A device that announces one later gets
        a new event for it."""
        now = utcnow()
        announced = col(DeletedCapture.announced_at)
        # Rows of an earlier version (from before the column, or written by such a replica during
        # a rolling upgrade) are remembered from now: by their deletion's time, an upgrade with a
        # short limit forgot at once captures their devices announce every day.
        with self.db.session() as session:
            session.exec(sa.update(DeletedCapture).where(announced.is_(None)).values(announced_at=now))  # type: ignore[call-overload]
            session.commit()
        days = self.gallery.settings.deleted_capture_days
        if not days:
            return
        stale = announced < now - datetime.timedelta(days=days)
        # In batches walked by (announced_at, device, key), each a range of the index on those,
        # read and then deleted in short transactions: a batch that started from the beginning
        # again read every row deleted before it (quadratic in a backlog of millions), and one
        # that deleted by a list of keys was a walk of every stale row on SQLite, whose planner
        # took the index on the time.
        position = sa.tuple_(announced, col(DeletedCapture.device), col(DeletedCapture.device_key))
        first = sa.select(announced, DeletedCapture.device, DeletedCapture.device_key).where(stale).order_by(
            announced, col(DeletedCapture.device), col(DeletedCapture.device_key)).limit(ROW_BATCH)
        after: tuple[Any, ...] | None = None
        while True:
            window = [] if after is None else [position > after]
            with self.db.session() as session:
                rows = session.exec(first.where(*window)).all()  # type: ignore[call-overload]
            if not rows:
                return
            last = tuple(rows[-1])
            with self.db.session() as session:
                # Every row of the window was stale when read; one an announcement wrote since
                # has a time past the window's end, and stays (PostgreSQL looks at the row again
                # as the announcement left it).
                findings.deleted_captures_forgotten += session.exec(  # type: ignore[call-overload]
                    sa.delete(DeletedCapture).where(*window, position <= last)
                ).rowcount
                session.commit()
            if len(rows) < ROW_BATCH:
                return
            after = last

    def _rows(self, findings: Findings) -> None:
        """Every stored row must have its media file with the recorded size: report any that
        does not (counted, shown by GetAdminStatus, the first MAX_EXAMPLES logged with their ids),
        never delete it.

        A batch's files are looked at first and its suspects read again in one select (a row
        deleted meanwhile is no finding). Row by row, with a line each, a pass over 100,000 rows
        whose files were all gone (a media volume that did not mount) took more than 45 s of the
        server's CPU and logged one line per row, every GALLERY_RECONCILE_INTERVAL_SECONDS."""
        after = ""
        while True:
            with self.db.session() as session:
                rows = session.exec(
                    select(Event.id, Event.device, Event.size)
                    .where(Event.state == "stored", col(Event.id) > after)
                    .order_by(col(Event.id)).limit(ROW_BATCH)
                ).all()
            if not rows:
                return
            findings.rows_checked += len(rows)
            suspects: dict[str, tuple[str, str]] = {}  # event id -> (device, problem)
            for event_id, device, size in rows:
                try:
                    actual = os.stat(self.storage.media_path(device, event_id)).st_size
                except FileNotFoundError:
                    suspects[event_id] = (device, "missing")
                    continue
                if actual != size:
                    suspects[event_id] = (device, f"size {actual} != {size}")
            for event_id in self._still_stored(suspects):
                device, problem = suspects[event_id]
                if problem == "missing":
                    findings.missing_media += 1
                else:
                    findings.size_mismatch += 1
                self._example(findings, device, event_id, problem)
            after = rows[-1][0]

    def _still_stored(self, event_ids: Iterable[str]) -> list[str]:
        """Those of `event_ids` whose rows are stored now, in id order."""
        wanted = list(event_ids)
        if not wanted:
            return []
        with self.db.session() as session:
            return list(session.exec(
                select(Event.id).where(col(Event.id).in_(wanted), Event.state == "stored")
                .order_by(col(Event.id))
            ))

    def _example(self, findings: Findings, device: str, event_id: str, what: str) -> None:
        if len(findings.examples) < MAX_EXAMPLES:
            findings.examples.append(f"{device}/{event_id}")
            log.error("stored event's media file missing or of another size",
                      extra={"device": device, "event_id": event_id, "problem": what})

    def _remove(
        self, path: pathlib.Path, findings: Findings, counter: str,
        *, still: Callable[[], bool] | None = None,
    ) -> None:
        """Unlink `path` under an exclusive lock taken without waiting, when `still()` (read
        under that lock) says it is a leftover. A file in use is locked (StagedFile holds a shared
        lock from creation until the row owning it is committed; a resumable writer holds an
        exclusive one): it is skipped, whatever its age."""
        writable = True
        try:  # read-write: an exclusive lock needs a descriptor open for writing (file_locks.py)
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except (FileNotFoundError, IsADirectoryError):  # another replica removed it
            return
        except PermissionError:
            # Read-only to the server (restored from a backup, chmod): no upload of this server
            # writes it (they make their files writable to themselves), so a lock held on it
            # is all that can say "in use", and its absence is enough.
            writable = False
            try:  # not waiting on a FIFO put in the file's place meanwhile
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except (FileNotFoundError, IsADirectoryError):
                return
            except PermissionError:  # not even readable: someone else's
                log.warning("reconcile left a file it may not read", extra={"path": str(path)})
                return
        try:
            free = file_locks.try_lock(fd) if writable else not file_locks.held(fd)
            if not free:
                return
            if still is not None and not still():
                return
            locked = os.fstat(fd)
            try:  # the name must still be the file locked: a replace in between is someone's upload
                current = os.lstat(path)
            except FileNotFoundError:
                return
            if (current.st_dev, current.st_ino) != (locked.st_dev, locked.st_ino):
                return
            size = locked.st_size
            try:
                path.unlink()
            except FileNotFoundError:
                return
            except PermissionError:  # a folder it may not change, an immutable file
                log.warning("reconcile could not remove a file", extra={"path": str(path)})
                return
        finally:
            os.close(fd)
        fsync_dir(path.parent)
        setattr(findings, counter, getattr(findings, counter) + 1)
        findings.bytes_reclaimed += size
        log.info("reconcile removed a file", extra={"path": str(path), "reason": counter})

    # -- status ---------------------------------------------------------------------------------

    def last(self) -> Findings | None:
        """The last pass's findings (of any replica); None before the first."""
        return status_files.read(self.status_path, Findings)

    def admin_status(self, principal: Principal) -> AdminStatus:
        # The status names events of every device (examples) and counts them all: it is for
        # tokens that grant every device ("*"), not filtered per token.
        principal.require_every_device(ADMIN)
        disk = self.storage.disk_space()
        minimum = self.storage.min_free_bytes
        try:
            counts, device_storage = self._counts()
        except DatabaseUnavailable:
            # What does not live in the database (the disk, the last pass's findings) is what an
            # operator needs most during an outage: the status answers without the counts.
            counts, device_storage = None, None
        return AdminStatus(
            last_reconcile=self.last(),
            last_verify=scrub.last(self.gallery.settings.data_dir),
            disk=disk,
            min_free_bytes=minimum,
            accepting_uploads=disk.free_bytes >= minimum,
            counts=counts,
            device_storage=device_storage,
            drop_backlog=incoming.last_backlog(self.storage),
        )

    def _counts(self) -> tuple[Counts, quota.Summary]:
        with self.db.session() as session:
            by_state = dict(session.exec(  # type: ignore[call-overload]
                select(Event.state, func.count()).group_by(Event.state)
            ).all())
            sessions = session.exec(
                select(func.count()).select_from(UploadSessionRow)
                .where(col(UploadSessionRow.event_id).is_(None))
            ).one()
            grants = session.exec(select(func.count()).select_from(UploadGrant)).one()
        device_storage = self.gallery.quota.summary()
        return Counts(
            events_stored=int(by_state.get("stored", 0)),
            events_on_device=int(by_state.get("on_device", 0)),
            stored_bytes=device_storage.stored_bytes,  # kept by triggers: no scan of events
            upload_sessions=int(sessions),
            upload_grants=int(grants),
            uploads_in_flight=self.gallery.slots.in_flight,
            thumbnails_pending=thumbnails.backlog(self.db),
            pulls_open=devices.open_pulls(self.db),
        ), device_storage


class ReconcileLoop(BackgroundLoop):
    """Runs the reconciler at start-up and every GALLERY_RECONCILE_INTERVAL_SECONDS in every
    replica, skipping a pass while another replica runs one (all its steps are idempotent)."""

    thread_name = "reconciler"

    def __init__(self, reconciler: Reconciler, interval: float) -> None:
        super().__init__(interval)
        self.reconciler = reconciler

    def run_pass(self) -> bool:
        self.reconciler.run_unless_busy()
        return False


def _changed(path: pathlib.Path) -> float:
    """When the file last changed: its content (mtime) or its name (ctime: link, rename)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return float("inf")  # gone: never "old"
    return max(st.st_mtime, st.st_ctime)


def _files(folder: pathlib.Path) -> list[pathlib.Path]:
    try:
        with os.scandir(folder) as entries:
            return [folder / e.name for e in entries if e.is_file(follow_symlinks=False)]
    except FileNotFoundError:
        return []


def _dirs(folder: pathlib.Path) -> list[pathlib.Path]:
    try:
        with os.scandir(folder) as entries:
            return [folder / e.name for e in entries if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []
