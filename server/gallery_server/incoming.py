"""Incoming folders: files dropped into `gallery/<device>/incoming` become events of that device.

The convention, for whatever writes there (rsync, SFTP, an NFS client, a local process):

* Only regular files at the top level of `incoming` are taken. Dotfiles, names ending in `.part`,
  `.tmp` or `~`, symlinks and subdirectories are never imported. Write a file under such a name
  (rsync does this by itself: `.name.XXXXXX`) and rename it when it is complete.
* A file is complete once its size and mtime have not changed for GALLERY_INCOMING_SETTLE_SECONDS,
  observed over successive scans. This holds for renamed-in files too, so a writer that writes in
  place must not pause longer than that. On NFS, attribute caching can hide a growing file for up
  to `acregmax` seconds: there use the rename convention, or a settle time above `acregmax`.
* Empty files are never imported (they are usually a writer's placeholder).
* A file in `thumbnails` whose stem equals a media file's stem (`a.png` for `a.mp4`) becomes that
  event's thumbnail. One that arrives after its media was imported attaches to the newest event
  imported from this device's incoming folder with that stem and no thumbnail yet; until there is
  such an event, it waits.
* An imported file is removed from `incoming` (the managed store keeps its own copy).
* A file waits in `incoming` while copying it would take the disk below its headroom
  (GALLERY_MIN_FREE_BYTES), where an upload would be stopped; it is imported once there is room.

Crash and concurrency safety, with any number of replicas scanning the same folders:

* One replica at a time imports a device's files: it holds that device's lock (an exclusive
  lock on `staging/incoming-locks/<device>`, taken without waiting; the others skip the device
  until their next scan) from before it opens a dropped file until the file is unlinked. Without
  it, a replica that had opened a file before another imported and unlinked it copied it all the
  same and, finding no row, inserted it again: an event a user had deleted in between came back,
  with its file, or without it when the delete's unlink came last. The lock is a file of the
  server's own, opened for writing: an exclusive lock needs that (file_locks.py; a dropped file
  may be read-only to the server). Locks need a filesystem that has them (local disks, NFSv4), as
  the reconciler's do.
* The event id is derived from (device, name, size, sha256) with an HMAC under the server
  secret, so every replica, and every run after a crash, names the same file the same event.
* The bytes reach `media/` by an atomic rename, then the row is inserted (a duplicate key means
  the event already exists: an earlier run got there first), and only then is the dropped file
  unlinked, and only if the path still names the very file that was imported. A crash between
  any two steps leaves the file in `incoming` (and frees the lock); the next scan converges on
  exactly one event.
* Because the id commits to the content, replacing `media/<id>` again never changes the bytes a
  row describes. An identical file (same device, name and bytes) dropped again while its event
  exists is therefore not imported twice: it is simply removed from `incoming`.

Files are copied into the store, never hard-linked: a writer still holding a dropped file open (or
another link to it) must not be able to change bytes an event already describes.

What a scan leaves in the drop folders (still being written, waiting for room or for its media,
failing) is the drop folders' backlog: written to <data>/run/incoming.json when it changes, and
once a minute while it does not, for the admin status and the metrics of every replica
(DropBacklog). One that grows, or whose oldest file gets old, means files are not being imported.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import errno
import hashlib
import hmac
import logging
import os
import pathlib
import secrets
import stat
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator, Mapping

import sqlalchemy as sa
from sqlmodel import col, select

from . import file_locks, status_files, validation
from ._direct_io import AppendWriter
from .background import BackgroundLoop
from .clock import rfc3339, utcnow
from .downloads import sha256_of
from .errors import Exhausted, GalleryError
from .media_types import SNIFF_BYTES, classify, detect_mime
from .models import Event, initial_thumbnail_state
from .quota import QUOTA_EXCEEDED, Room
from .service import Gallery
from .storage import (
    DROP_INCOMING,
    DROP_THUMBNAILS,
    INSUFFICIENT_STORAGE,
    SpaceMeter,
    Storage,
    fsync_dir,
    hold_shared,
    make_dir,
)

log = logging.getLogger(__name__)

SOURCE_METADATA = '{"source":"incoming"}'
LOCKS_FOLDER = "incoming-locks"  # in staging/: a lock file per device (the module docstring)
IGNORED_SUFFIXES = (".part", ".tmp", "~")
_ID_LABEL = b"gallery incoming event ids v1"
_CHUNK = 1 << 20
IDLE_TRUST_SECONDS = 2.0
IDLE_RELIST_SECONDS = 60.0  # a folder seen idle is listed at least this often all the same
# The backlog's status file is rewritten at least this often, so that its `scanned` time says the
# scans go on.
BACKLOG_REFRESH_SECONDS = 60.0
QUOTA_WAIT = "the device is at its quota (GALLERY_MAX_DEVICE_BYTES): retried on later scans"

# (st_dev, st_ino, st_size, st_mtime_ns): what must stay unchanged for a file to count as complete,
# and what the path must still name for the dropped file to be removed after its import.
Signature = tuple[int, int, int, int]


def signature(st: os.stat_result) -> Signature:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def is_candidate_name(name: str) -> bool:
    return not name.startswith(".") and not name.endswith(IGNORED_SUFFIXES)


def stem(name: str) -> str:
    """The name without its suffix, composed (NFC) as event names are stored: macOS writes file
    names decomposed, and a thumbnail must find its media whichever way each was written."""
    return unicodedata.normalize("NFC", pathlib.PurePath(name).stem)


class _Changed(Exception):
    """The file is no longer the one that was seen settled: wait for it to settle again."""


class _Stopped(Exception):
    """stop() was called while a file was being read."""


@dataclasses.dataclass
class _Seen:
    signature: Signature
    since: float  # when this signature was first observed
    sha256: str = ""  # cached digest of a thumbnail with this signature
    reported: str = ""  # the last problem logged for this signature (logged once, not every scan)


@dataclasses.dataclass
class DropBacklog:
    """What the last scan left in the drop folders (incoming and thumbnails, every device)."""

    files: int = 0
    bytes: int = 0
    # RFC 3339: when the oldest of those files arrived, its inode's change time (a copy that keeps
    # its dates, rsync -a or cp -p, sets an old modification time, never this); "" with none.
    oldest: str = ""
    scanned: str = ""  # RFC 3339: when the scan that found these figures ended

    def figures(self) -> tuple[int, int, str]:
        return self.files, self.bytes, self.oldest


def backlog_path(storage: Storage) -> pathlib.Path:
    return storage.run_root / "incoming.json"


def last_backlog(storage: Storage) -> DropBacklog | None:
    """The drop folders' backlog as the last scan of any replica left it; None before the first."""
    return status_files.read(backlog_path(storage), DropBacklog)


@dataclasses.dataclass
class _DropFile:
    name: str
    path: pathlib.Path
    signature: Signature
    stable: bool

    @property
    def size(self) -> int:
        return self.signature[2]


@dataclasses.dataclass
class _Taken:
    """A dropped file's bytes under a private name in staging, hashed and fsynced."""

    staged: pathlib.Path
    source: Signature
    sha256: str
    head: bytes
    # Marks the copy in use until discarded, after its row is committed (storage.hold_shared):
    # the reconciler leaves it alone in staging/ and once placed in media/.
    in_use: int | None = None

    @property
    def size(self) -> int:
        return self.source[2]

    def discard(self) -> None:
        self.staged.unlink(missing_ok=True)
        if self.in_use is not None:
            os.close(self.in_use)
            self.in_use = None


class IncomingImporter(BackgroundLoop):
    """Imports the incoming folders of every device. scan_once() is one pass; start() loops it."""

    thread_name = "incoming-importer"

    def __init__(self, gallery: Gallery) -> None:
        super().__init__(gallery.settings.incoming_scan_seconds)
        self.gallery = gallery
        self.settings = gallery.settings
        self.storage = gallery.storage
        self._key = hmac.new(self.settings.key_secret, _ID_LABEL, hashlib.sha256).digest()
        self._seen: dict[str, _Seen] = {}
        self._scan_lock = threading.Lock()
        self._lock_problems: dict[str, str] = {}  # device -> the last error making its lock file
        self._backlog_written: tuple[tuple[int, int, str], float] | None = None  # figures, when
        self._idle: dict[str, tuple[int, float]] = {}  # folders with nothing to import (_list)

    def run_pass(self) -> bool:
        self.scan_once()  # a stopped importer abandons the file it reads: it stays in incoming
        return False

    # -- one pass -----------------------------------------------------------------------------

    def event_id_for(self, device: str, name: str, size: int, sha256: str) -> str:
        mac = hmac.new(self._key, f"{device}\0{name}\0{size}\0{sha256}".encode(), hashlib.sha256)
        return "evt_" + base64.urlsafe_b64encode(mac.digest()).decode()[:22]

    def scan_once(self, now: float | None = None) -> list[str]:
        """Import every settled file once; returns the ids of the events this pass created.

        `now` is a monotonic clock reading (tests pass their own); a file counts as settled once
        its signature has been observed unchanged for incoming_settle_seconds.
        """
        now = time.monotonic() if now is None else now
        with self._scan_lock:
            seen: dict[str, _Seen] = {}
            idle: dict[str, tuple[int, float]] = {}
            imported: list[str] = []
            try:
                for device, incoming, thumbnails in self._device_folders():
                    if self._stopping.is_set():
                        break
                    media = self._list(incoming, now, seen, idle)
                    thumbs = self._list(thumbnails, now, seen, idle)
                    if not any(f.stable for f in (*media, *thumbs)):
                        continue
                    with self._device_lock(device) as held:
                        if held:  # else another replica imports this device's files now
                            imported += self._scan_device(device, media, thumbs, seen)
            except _Stopped:
                pass
            finally:
                self._seen = seen  # forgets what is gone (and, after a stop, what was not reached)
                self._idle = idle
            if not self._stopping.is_set():  # a stopped scan did not look at every folder
                self._record_backlog(seen)
            return imported

    def _record_backlog(self, seen: dict[str, _Seen]) -> None:
        """Count what is still there of what this scan listed, and keep it when it changed (or
        has not been written for BACKLOG_REFRESH_SECONDS)."""
        backlog = DropBacklog()
        oldest_ns = None
        for path in seen:
            try:
                st = os.lstat(path)
            except OSError:  # imported, or gone otherwise
                continue
            backlog.files += 1
            backlog.bytes += st.st_size
            oldest_ns = st.st_ctime_ns if oldest_ns is None else min(oldest_ns, st.st_ctime_ns)
        if oldest_ns is not None:
            backlog.oldest = rfc3339(datetime.datetime.fromtimestamp(oldest_ns / 1e9, datetime.UTC))
        now = time.monotonic()
        if (self._backlog_written is not None and self._backlog_written[0] == backlog.figures()
                and now - self._backlog_written[1] < BACKLOG_REFRESH_SECONDS):
            return
        backlog.scanned = rfc3339(utcnow())
        try:
            status_files.write(backlog_path(self.storage), backlog)
        except OSError as exc:  # a full disk: the imports go on, the status is stale
            log.warning("the drop folders' backlog was not written", extra={"error": str(exc)})
            return
        self._backlog_written = (backlog.figures(), now)

    @contextlib.contextmanager
    def _device_lock(self, device: str) -> Iterator[bool]:
        """The device's import lock, if no other replica holds it (the module docstring). A lock
        file that cannot be made (no inode left, no permission) skips the device, logged once."""
        folder = self.storage.staging_root / LOCKS_FOLDER
        try:
            make_dir(folder)
            fd = os.open(folder / device, os.O_RDWR | os.O_CREAT, 0o640)
        except OSError as exc:
            if self._lock_problems.get(device) != str(exc):
                log.warning("incoming files left in place: no import lock",
                            extra={"device": device, "error": str(exc)})
                self._lock_problems[device] = str(exc)
            yield False
            return
        self._lock_problems.pop(device, None)
        try:
            yield file_locks.try_lock(fd)
        finally:
            os.close(fd)  # and with it the lock

    def _device_folders(self) -> list[tuple[str, str, str]]:
        """Each device's name and drop folders (Storage.drop_folders), as plain paths: a pass
        makes two for every device, and pathlib's were most of an idle pass's cost."""
        try:
            entries = sorted(os.scandir(self.storage.drop_root), key=lambda e: e.name)
        except FileNotFoundError:
            return []
        folders = []
        for entry in entries:
            try:
                validation.device_id(entry.name)
            except GalleryError:
                continue
            # Never through a symlink: a linked folder would import (and then delete) files from
            # wherever it points, or another device's folder as this device's.
            if entry.is_dir(follow_symlinks=False):
                folders.append((entry.name, os.path.join(entry.path, DROP_INCOMING),
                                os.path.join(entry.path, DROP_THUMBNAILS)))
        return folders

    def _list(self, folder: str, now: float, seen: dict[str, _Seen],
              idle: dict[str, tuple[int, float]]) -> list[_DropFile]:
        """The folder's candidate files. One whose last listing held none and whose mtime has not
        moved since is not listed again for up to IDLE_RELIST_SECONDS (into `idle`, this pass's
        such folders, with the mtime and when it was listed): any entry made, removed or renamed
        in a folder moves its mtime. Every device that ever asked its paths has two folders, empty
        for most, and listing them all each second cost a core's 8% at 2,000 devices (black-box
        review, 2026-12-02)."""
        checked_ns = time.time_ns()  # before the folder's mtime is read: see the trust below
        try:
            folder_st = os.lstat(folder)
            if not stat.S_ISDIR(folder_st.st_mode):
                return []  # never through a symlink (_device_folders)
            known = self._idle.get(folder)
            if known is not None and known[0] == folder_st.st_mtime_ns and now - known[1] < IDLE_RELIST_SECONDS:
                idle[folder] = known
                return []
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            log.warning("cannot list a drop folder", extra={"folder": folder, "error": str(exc)})
            return []
        files = []
        unsure = False  # an entry that could not be looked at: the folder is listed again
        for entry in entries:
            if not is_candidate_name(entry.name):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # gone meanwhile
            except OSError:
                unsure = True  # unreadable now (ESTALE, EIO): maybe a file next time
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            sig = signature(st)
            previous = self._seen.get(entry.path)
            if previous is not None and previous.signature == sig:
                record = previous
            else:
                record = _Seen(sig, now)
            seen[entry.path] = record
            stable = now - record.since >= self.settings.incoming_settle_seconds
            files.append(_DropFile(entry.name, pathlib.Path(entry.path), sig, stable))
        # Trusted only once its last change is IDLE_TRUST_SECONDS older than this look: a file
        # timestamp is coarse (a clock tick; 2 s on FAT), and an entry made in the same tick as the
        # listing, after it, leaves the mtime as it was. A clock the filesystem's is ahead of (a
        # network filesystem's server behind) could still trust too soon: IDLE_RELIST_SECONDS
        # bounds what that costs.
        if not files and not unsure and checked_ns - folder_st.st_mtime_ns > IDLE_TRUST_SECONDS * 1e9:
            idle[folder] = (folder_st.st_mtime_ns, now)
        return files

    def _scan_device(
        self, device: str, media: list[_DropFile], thumbs: list[_DropFile], seen: dict[str, _Seen]
    ) -> list[str]:
        imported = []
        waiting_stems = {stem(f.name) for f in media}
        claimed: set[str] = set()
        room = self._room(device, media)
        for file in media:
            if not file.stable or self._stopping.is_set():
                continue
            thumb = next(
                (t for t in thumbs if t.stable and t.name not in claimed and stem(t.name) == stem(file.name)),
                None,
            )
            if thumb is not None:
                claimed.add(thumb.name)
            # With its thumbnail, which the quota counts too: a pair that does not fit stays, uncopied
            # (checked by the insert alone, the media was copied again at every scan).
            takes_thumb = thumb is not None and 0 < thumb.size <= self.settings.max_thumbnail_bytes  # else skipped
            size = file.size + (thumb.size if takes_thumb else 0)
            if room is not None and room.used + size > room.limit:
                self._skip(device, file, seen, QUOTA_WAIT, {"size": size, "used_bytes": room.used,
                                                             "quota_bytes": room.limit})
                continue
            event_id = self._guarded(device, file, seen, lambda f=file, t=thumb: self._import(device, f, t, seen))
            if event_id:
                imported.append(event_id)
                if room is not None:
                    room.used += size
        for thumb in thumbs:
            # A thumbnail whose media is still in incoming waits for it, rather than attaching to
            # an older event of the same name.
            if not thumb.stable or thumb.name in claimed or stem(thumb.name) in waiting_stems:
                continue
            if self._stopping.is_set():
                break
            self._guarded(device, thumb, seen, lambda t=thumb: self._attach_late(device, t, seen))
        return imported

    def _room(self, device: str, media: list[_DropFile]) -> Room | None:
        """The device's quota for this scan, read once (None: no quota, or nothing to import). Files
        that do not fit stay, uncopied: each scan would otherwise copy them, and throw the copies
        away. _insert checks again, in the row's transaction."""
        return self.gallery.quota.room(device) if any(file.stable for file in media) else None

    def _guarded(self, device: str, file: _DropFile, seen: dict[str, _Seen], action):  # type: ignore[no-untyped-def]
        """Run one file's work; one bad file is logged (once per version) and never stalls the rest."""
        try:
            return action()
        except _Stopped:
            raise
        except _Changed:
            seen.pop(str(file.path), None)  # it must settle again
        except Exception as exc:
            if isinstance(exc, Exhausted) and exc.reason == QUOTA_EXCEEDED:
                self._skip(device, file, seen, QUOTA_WAIT, exc.metadata)
                return None
            if _short_of_room(exc):
                # The file stays for a later scan; a partial copy was removed, and a copy already
                # placed in media/ has no row yet: the next import of the file replaces it.
                # The figures once the partial copy is removed, not the error's (taken with it
                # still on the disk).
                storage = self.gallery.storage
                self._skip(device, file, seen, "no room on the disk above its headroom (GALLERY_MIN_FREE_BYTES) "
                           "to copy it: retried on later scans",
                           {"size": file.size, "free_bytes": storage.disk_space().free_bytes,
                            "min_free_bytes": storage.min_free_bytes})
                return None
            record = seen.get(str(file.path))
            problem = f"{type(exc).__name__}: {exc}"
            if record is not None and record.reported == problem:
                log.debug("incoming file still failing", extra={"device": device, "file": file.name})
            else:
                log.exception("cannot import an incoming file", extra={"device": device, "file": file.name})
                if record is not None:
                    record.reported = problem
        return None

    def _skip(self, device: str, file: _DropFile, seen: dict[str, _Seen], why: str,
              details: Mapping[str, object] | None = None) -> None:
        record = seen.get(str(file.path))
        if record is not None and record.reported == why:
            return
        log.warning("incoming file left in place: " + why,
                    extra={**(details or {}), "device": device, "file": file.name})
        if record is not None:
            record.reported = why

    # -- media --------------------------------------------------------------------------------

    def _import(self, device: str, file: _DropFile, thumb: _DropFile | None, seen: dict[str, _Seen]) -> str | None:
        try:
            name = validation.display_name(file.name)
        except GalleryError as exc:
            self._skip(device, file, seen, exc.message)
            return None
        if file.size == 0:
            self._skip(device, file, seen, "the file is empty")
            return None
        if file.size > self.settings.max_upload_bytes:
            self._skip(device, file, seen, f"larger than {self.settings.max_upload_bytes} bytes")
            return None
        if thumb is not None and not 0 < thumb.size <= self.settings.max_thumbnail_bytes:
            self._skip(device, thumb, seen, f"thumbnail empty or larger than {self.settings.max_thumbnail_bytes} bytes")
            thumb = None

        taken = self._take(file)
        if taken is None:
            return None  # gone: another replica imported it
        thumb_taken: _Taken | None = None
        try:
            event_id = self.event_id_for(device, name, taken.size, taken.sha256)
            media_path = self.storage.media_path(device, event_id)
            thumb_path = self.storage.thumbnail_path(device, event_id)
            created = False
            with self.gallery.db.session() as session:
                existing = session.get(Event, event_id)
            if existing is None:
                _place(self.storage, taken, media_path)
                if thumb is not None:  # the row does not exist yet: no one else can touch its path
                    thumb_taken = self._take_thumbnail(
                        thumb, seen, lambda taken: _place(self.storage, taken, thumb_path))
                mime = detect_mime(name, taken.head)
                event = Event(
                    id=event_id,
                    device=device,
                    name=name,
                    media_type=classify(mime),
                    mime_type=mime,
                    size=taken.size,
                    sha256=taken.sha256,
                    has_thumbnail=thumb_taken is not None,
                    thumbnail_size=thumb_taken.size if thumb_taken is not None else None,
                    thumbnail_state=initial_thumbnail_state(classify(mime), thumb_taken is not None),
                    metadata_json=SOURCE_METADATA,
                    created=utcnow(),
                )
                try:
                    created = self._insert(event)
                except Exhausted:  # the quota, since the check above: the copies placed go
                    media_path.unlink(missing_ok=True)
                    if thumb_taken is not None:
                        thumb_path.unlink(missing_ok=True)
                    raise
            if not created and thumb is not None:
                # The event already existed (an earlier run or another replica), perhaps without
                # this thumbnail: attach it before the dropped file goes.
                if thumb_taken is None:
                    thumb_taken = self._take_thumbnail(
                        thumb, seen, lambda taken: self._attach(device, event_id, taken, thumb_path))
                elif not self._attach(device, event_id, None, thumb_path):
                    # Placed before the row was found to exist, which is gone again: the placed
                    # copy goes, and the dropped thumbnail stays for a later scan.
                    thumb_path.unlink(missing_ok=True)
                    thumb_taken.discard()
                    thumb_taken = None
            # The thumbnail goes first: while the media file is still here, a thumbnail of the same
            # stem is known to belong to it.
            if thumb is not None and thumb_taken is not None:
                _unlink_if_same(thumb.path, thumb_taken.source)
            _unlink_if_same(file.path, taken.source)
        finally:
            taken.discard()
            if thumb_taken is not None:
                thumb_taken.discard()
        if created:
            log.info(
                "incoming file imported",
                extra={"device": device, "file": file.name, "event_id": event_id, "size": taken.size,
                       "has_thumbnail": thumb_taken is not None},
            )
            return event_id
        log.info("incoming file was already imported; removed", extra={"device": device, "file": file.name,
                                                                         "event_id": event_id})
        return None

    def _take_thumbnail(
        self, thumb: _DropFile, seen: dict[str, _Seen], place: Callable[[_Taken], bool | None],
    ) -> _Taken | None:
        """Copy the thumbnail and `place` it; None if it did not get there (`place` may answer
        False: its event is gone).

        A thumbnail that changed meanwhile, or that finds no room on the disk or (attached to an
        event stored before) in the device's quota, does not hold up its media: it stays in
        thumbnails/ and attaches later. A new event's media and thumbnail fit the quota together
        or wait together (_scan_device)."""
        try:
            taken = self._take(thumb)
        except _Changed:
            seen.pop(str(thumb.path), None)
            return None
        except Exhausted as exc:
            if _short_of_room(exc):
                return None
            raise
        if taken is None:
            return None
        try:
            placed = place(taken)
        except BaseException as exc:
            taken.discard()
            if _short_of_room(exc) or (isinstance(exc, Exhausted) and exc.reason == QUOTA_EXCEEDED):
                return None
            raise
        if placed is False:
            taken.discard()
            return None
        return taken

    def _insert(self, event: Event) -> bool:
        """Insert the row; False if it already exists (an earlier run or another replica)."""
        try:
            with self.gallery.db.session() as session:
                session.add(event)
                self.gallery.quota.check_stored(session, event.device, event.stored_bytes)
                session.commit()
        except sa.exc.IntegrityError:
            return False
        return True

    def _attach(self, device: str, event_id: str, taken: _Taken | None, destination: pathlib.Path) -> bool:
        """The device's thumbnail of a stored event (`taken`; None: at `destination` already),
        moved into place while the UPDATE holds the event's row: a thumbnail the server is making
        (thumbnails.py) then finds its claim gone and never replaces this one. False, and nothing
        placed, if the event is gone (deleted since it was read); DEVICE_QUOTA_EXCEEDED, and
        nothing placed, if it does not fit in the device's quota."""
        size = taken.size if taken is not None else destination.stat().st_size
        with self.gallery.db.session() as session:
            result = session.exec(  # type: ignore[call-overload]
                sa.update(Event).where(col(Event.id) == event_id)
                .values(has_thumbnail=True, thumbnail_state="", thumbnail_size=size)
            )
            if result.rowcount == 0:
                return False
            try:
                self.gallery.quota.check_stored(session, device, size)
            except Exhausted:
                if taken is None:
                    destination.unlink(missing_ok=True)
                raise
            if taken is not None:
                _place(self.storage, taken, destination)
            self.gallery.db.commit(session)
        return True

    # -- thumbnails arriving after their media --------------------------------------------------

    def _attach_late(self, device: str, thumb: _DropFile, seen: dict[str, _Seen]) -> None:
        if not 0 < thumb.size <= self.settings.max_thumbnail_bytes:
            self._skip(device, thumb, seen, f"thumbnail empty or larger than {self.settings.max_thumbnail_bytes} bytes")
            return
        wanted = stem(thumb.name)
        query = (
            select(Event)
            .where(
                col(Event.device) == device,
                col(Event.metadata_json) == SOURCE_METADATA,
                col(Event.name).startswith(wanted, autoescape=True),
            )
            .order_by(col(Event.created).desc(), col(Event.id).desc())
        )
        with self.gallery.db.session() as session:
            candidates = [e for e in session.exec(query) if stem(e.name) == wanted]
        if not candidates:
            return  # waits for its media
        # Newest first: the first event without a thumbnail gets it, unless a newer one has this very
        # thumbnail already (attached by a run that stopped before removing it, or by a replica).
        target = None
        for event in candidates:
            # A thumbnail the server made (or is making) gives way to the device's own.
            if not event.has_thumbnail or event.thumbnail_state:
                target = event
                break
            if self._same_file(self.storage.thumbnail_path(device, event.id), thumb, seen):
                _unlink_if_same(thumb.path, thumb.signature)
                return
        if target is None:
            return  # every event of that name has one: waits for a new media file
        taken = self._take(thumb)
        if taken is None:
            return
        try:
            if not self._attach(device, target.id, taken, self.storage.thumbnail_path(device, target.id)):
                return  # its event was deleted meanwhile: the thumbnail waits for the next scan
            _unlink_if_same(thumb.path, taken.source)
        finally:
            taken.discard()
        log.info("incoming thumbnail attached", extra={"device": device, "file": thumb.name, "event_id": target.id})

    def _same_file(self, stored: pathlib.Path, dropped: _DropFile, seen: dict[str, _Seen]) -> bool:
        try:
            st = os.stat(stored)
        except FileNotFoundError:
            return False
        if (st.st_dev, st.st_ino) == dropped.signature[:2]:
            return True  # hard-linked: the very same file
        if st.st_size != dropped.size:
            return False
        record = seen.setdefault(str(dropped.path), _Seen(dropped.signature, 0.0))
        if not record.sha256:
            sha256 = self._hash(dropped)
            if sha256 is None:
                return False
            record.sha256 = sha256  # cached while the file keeps its signature
        with open(stored, "rb") as file:
            return sha256_of(file) == record.sha256

    # -- files --------------------------------------------------------------------------------

    def _hash(self, file: _DropFile) -> str | None:
        """The settled file's sha256, read in place (no copy, so no disk space needed).

        None if the file is gone; _Changed if it is no longer the file that settled.
        """
        fd = _open_dropped(file)
        if fd is None:
            return None
        try:
            _check_settled(fd, file)
            sha256, _ = self._read(fd, None)
            _check_settled(fd, file)
            return sha256
        finally:
            os.close(fd)

    def _take(self, file: _DropFile) -> _Taken | None:
        """Copy the settled file into staging, hashing it, and fsync the copy.

        None if the file is gone; _Changed if it is no longer the file that settled.
        """
        fd = _open_dropped(file)
        if fd is None:
            return None
        staged = self.storage.staging_root / f"incoming-{secrets.token_hex(16)}"
        in_use: int | None = None
        try:
            _check_settled(fd, file)
            self.storage.require_room_for(file.size)
            # A copy, never a hard link: a writer that still holds the file open (or another link
            # to it) must not be able to change bytes the event already describes.
            with self.storage.disk_full_is_exhausted():
                out = os.open(staged, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)  # for hold_shared
                try:
                    in_use = hold_shared(out)
                    copy = AppendWriter(out, direct=self.storage.direct_io)
                    sha256, head = self._read(fd, copy)
                    copy.flush()
                    os.fsync(out)
                finally:
                    os.close(out)
            _check_settled(fd, file)
        except BaseException:
            staged.unlink(missing_ok=True)
            if in_use is not None:
                os.close(in_use)
            raise
        finally:
            os.close(fd)
        return _Taken(staged, file.signature, sha256, head, in_use)

    def _read(self, fd: int, out: AppendWriter | None) -> tuple[str, bytes]:
        """sha256 and head of `fd`'s bytes, copied to `out` (unless None) below the headroom."""
        digest = hashlib.sha256()
        head = b""
        # Other writers share the disk: a long copy stops below the headroom, as an upload does.
        space = SpaceMeter(self.storage.require_space)
        while chunk := os.read(fd, _CHUNK):
            if self._stopping.is_set():
                raise _Stopped()
            if len(head) < SNIFF_BYTES:
                head += chunk[: SNIFF_BYTES - len(head)]
            digest.update(chunk)
            if out is not None:
                out.write(chunk)
                space.wrote(len(chunk))
        return digest.hexdigest(), head


def _open_dropped(file: _DropFile) -> int | None:
    """A read descriptor of the dropped file; None if it is gone, _Changed if it is no longer a
    plain file (O_NOFOLLOW refuses a symlink swapped in after the listing, O_NONBLOCK a FIFO)."""
    try:
        return os.open(file.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _Changed() from None
        raise


def _short_of_room(exc: BaseException) -> bool:
    return isinstance(exc, Exhausted) and exc.reason == INSUFFICIENT_STORAGE


def _check_settled(fd: int, file: _DropFile) -> None:
    """_Changed unless `fd` is still the plain file that settled: same inode, size and mtime."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or signature(st) != file.signature:
        raise _Changed()


def _place(storage: Storage, taken: _Taken, destination: pathlib.Path) -> None:
    with storage.disk_full_is_exhausted():  # a new folder's entry, on a full disk
        make_dir(destination.parent)  # a new device folder is made durable with the file in it
        os.replace(taken.staged, destination)
        fsync_dir(destination.parent)


def _unlink_if_same(path: pathlib.Path, expected: Signature) -> None:
    """Remove a dropped file only if the path still names the file that was imported.

    A new file renamed onto the same name meanwhile (or a file modified after it settled) stays,
    and is imported on its own once it settles.
    """
    try:
        current = signature(os.lstat(path))
    except FileNotFoundError:
        return
    if current != expected:
        log.warning("incoming file changed while it was imported; left in place", extra={"file": str(path)})
        return
    path.unlink(missing_ok=True)
    fsync_dir(path.parent)
