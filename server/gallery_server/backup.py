"""`gallery backup DEST`: a consistent copy of the gallery, taken while the servers run.

DEST becomes a data folder: the database (SQLite: `gallery.db`, a database file; PostgreSQL:
`gallery.pgdump`, pg_dump's custom format, for pg_restore), `media/<device>/` with every file
the database names, the data folder's `jwt-secret` if that is the secret in use (it signs the
pre-signed URLs and names drop-folder imports: a restore needs the same one), and `backup.json`,
written last and synced: a folder without it is no finished backup.

Consistency. First every file now in the live media folder is taken (hard-linked, or copied
when DEST is on another filesystem or with `--copy`) into a folder of DEST's own. Then the
database is copied as one snapshot: SQLite's online backup, in one step (a reader: the servers'
writes go on); on PostgreSQL, pg_dump reads a snapshot that this command exports, and the list of
files is read in that same snapshot (then the transaction ends: it does not hold back vacuum).
Then each file the snapshot names is moved into DEST's media folder, and what is left of the
first folder (files of events deleted before the snapshot) is removed. A stored event's file never
changes once stored (each upload stores a new event, its file moved into place whole), so a file
taken before or after the snapshot holds the bytes its row describes, and an event deleted after
the snapshot keeps its files in the backup: they were taken before it.

Thumbnails are the exception to "never changes" (a device's replaces the one the server made):
each is taken again from the live folder when placed, the gathered one kept only if it is gone.

Only an event stored after the files were first taken and deleted before the snapshot's files
were placed can have lost its files (a window of seconds with hard links; with copies, as long as
the copy). The live database then says why: an event no longer there is
left out (on SQLite its row is deleted from the copy as a user's DELETE deletes it: counters, open
pulls, the device's tombstone; a PostgreSQL dump cannot be edited: those events are listed in
backup.json, for deletion after a restore). An event still there has lost its file in the live
gallery too: the backup keeps it as it is, and names it (`missing_files`), as reconciliation would.

Hard links share the live files' blocks: on the same filesystem the backup is a consistent set
to copy elsewhere (rsync -H, tar), taken in seconds, not a second copy that survives the disk.
Not in it: staging (uploads in flight; an open resumable session resumes from 0 after a
restore), the drop folders' files not yet imported, and run/ (status files).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO

import sqlalchemy as sa
from sqlmodel import Session, col

from . import db as db_module
from . import folder_claims, status_files, stoppable, storage, version
from .clock import rfc3339, utcnow
from .models import GRANT_UNUSED, Event, UploadGrant
from .service import delete_event_rows
from .settings import SECRET_FILE_NAME, ConfigError, Settings, libpq_connection, write_secret_file

log = logging.getLogger(__name__)

MANIFEST = "backup.json"
SQLITE_FILE = "gallery.db"
POSTGRES_DUMP = "gallery.pgdump"
IN_PROGRESS = ".backup-in-progress"  # claims DEST: a second backup into it is refused
GATHERED = ".gathered"  # the files taken before the snapshot, until it names them
MAX_EXAMPLES = 20
BATCH = 500  # events whose missing files are looked up in the live database at once
PG_CONNECT_TIMEOUT_SECONDS = "10"  # as db.py's: libpq waits for ever on a silent server

# What the backup places: each stored event's media and thumbnail, an announced event's thumbnail
# (sent with its announcement), and the thumbnail a signed URL brought before its media.
_EVENTS = (
    sa.select(Event.device, Event.id, Event.state, Event.has_thumbnail)
    .where(sa.or_(col(Event.state) == "stored", col(Event.has_thumbnail)))
    .order_by(col(Event.device), col(Event.id))
)
_GRANT_THUMBNAILS = (
    sa.select(UploadGrant.device, UploadGrant.event_id)
    .where(col(UploadGrant.media_state).in_(GRANT_UNUSED), col(UploadGrant.thumbnail_state) == "done")
)


class BackupRefused(Exception):
    """The backup cannot start here (its message says why); nothing was written."""


@dataclasses.dataclass
class Manifest:
    """backup.json: what the backup holds and how it was taken."""

    started: str = ""  # RFC 3339 UTC
    snapshot: str = ""  # when the database's snapshot was taken: the backup's moment
    finished: str = ""
    version: str = ""  # the gallery's that took it
    database: str = ""  # "sqlite" or "postgresql"
    database_file: str = ""  # in the backup folder
    events: int = 0  # events whose files it holds (stored ones, and announced ones with a thumbnail)
    files: int = 0  # media files and thumbnails
    linked: int = 0
    copied: int = 0
    bytes_copied: int = 0
    secret: bool = False  # whether it holds the data folder's jwt-secret
    # Files of events still in the live gallery that are missing there too: "<device>/<file>".
    missing_files: int = 0
    examples: list[str] = dataclasses.field(default_factory=list)  # up to 20 of those
    # Events stored and deleted while it ran, their files gone before they could be taken, as
    # "<device>/<event_id>": left out of a SQLite copy; still in a PostgreSQL dump, to delete.
    deleted_meanwhile: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0


def backup(settings: Settings, destination: pathlib.Path, *, copy: bool = False) -> Manifest:
    """Take a backup into `destination`, which must not exist or be an empty folder. On any
    failure (a signal made an exception included), what this wrote there is removed and the error
    raised."""
    started = time.monotonic()
    url = sa.make_url(settings.database_url)
    postgres = url.get_backend_name() == "postgresql"
    _check(settings, url, destination)
    live = db_module.create_engine(settings.database_url, pool_size=1)  # connects when first used
    manifest = Manifest(started=rfc3339(utcnow()), version=version(),
                        database="postgresql" if postgres else "sqlite",
                        database_file=POSTGRES_DUMP if postgres else SQLITE_FILE)
    copied_db = None
    made: bool | None = None
    try:
        with stoppable.signals_held():  # a signal as it returns would leave a marked folder unknown here
            made = _claim(destination)
        files = _Files(settings, destination, copy, manifest, live)
        files.gather(database_bytes=_postgres_size(live) if postgres else _sqlite_size(url))
        with tempfile.TemporaryFile("w+", dir=destination, encoding="utf-8") as spool:
            manifest.snapshot = rfc3339(utcnow())
            if postgres:
                _postgres_snapshot(live, settings.database_url, destination / POSTGRES_DUMP, spool)
            else:
                # A URL object: the path is never parsed, so a "?" or "%" in DEST's name stays in it.
                copied_db = db_module.create_engine(
                    sa.URL.create("sqlite", database=str(destination / SQLITE_FILE)), pool_size=1)
                _sqlite_snapshot(live, copied_db)
                with copied_db.connect() as connection:
                    _spool(connection, spool)
            gone = files.place(spool)
        if copied_db is not None:
            if gone:
                # Deleted as this version deletes: a database of an earlier one (a backup taken
                # before its servers were upgraded) first gets this version's schema, as a restore
                # would give it.
                db_module.create_tables(copied_db)
            with Session(copied_db) as session:
                for device, event_ids in gone.items():
                    delete_event_rows(session, device, event_ids, session_ttl=settings.upload_session_ttl)
                session.commit()
            copied_db.dispose()  # the last connection checkpoints its WAL into the file, and removes it
            fsync(destination / SQLITE_FILE)
        if settings.secret_file:
            write_secret_file(destination, settings.jwt_secret)
            manifest.secret = True
        elif not settings.jwt_secret and (settings.data_dir / SECRET_FILE_NAME).exists():
            log.warning("the data folder's jwt-secret is not in the backup: this user may not read it; keep a"
                        " copy of it with the backup (a restore needs the same secret)")
        manifest.finished = rfc3339(utcnow())
        manifest.seconds = round(time.monotonic() - started, 3)
        status_files.write(destination / MANIFEST, manifest, durable=True)
        (destination / IN_PROGRESS).unlink()
        storage.fsync_dir(destination)
    except BaseException:
        with stoppable.signals_held():  # a second Ctrl-C must not cut the removal short
            if copied_db is not None:
                copied_db.dispose()
            if made is not None:
                folder_claims.remove_what_was_made(destination, made, marker=IN_PROGRESS)
        raise
    finally:
        live.dispose()
    if manifest.missing_files:
        log.warning("the live gallery has lost files of events it still holds; the backup holds them as they are",
                    extra={"missing_files": manifest.missing_files, "examples": manifest.examples})
    return manifest


def _check(settings: Settings, url: sa.URL, destination: pathlib.Path) -> None:
    if url.get_backend_name() == "postgresql":
        require_client("pg_dump", settings.database_url, of="the server's", refused=BackupRefused)
    elif not (url.database and pathlib.Path(url.database).is_file()):
        raise BackupRefused(f"no database at {url.database} (GALLERY_DATA_DIR or GALLERY_DATABASE_URL)")
    if destination.resolve().is_relative_to(settings.data_dir.resolve()):
        # Under media/ the reconciler would remove its files as orphans, under a drop folder they
        # would be imported, and a copy of the data folder would hold every backup in it.
        raise BackupRefused(f"{destination} is inside the data folder {settings.data_dir}: choose a folder beside it")
    if destination.exists() and not destination.is_dir():
        raise BackupRefused(f"{destination} exists and is not a folder")
    if destination.exists() and any(destination.iterdir()):
        raise BackupRefused(_in_use(destination))


def _claim(destination: pathlib.Path) -> bool:
    try:
        return folder_claims.claim(destination, IN_PROGRESS, mode=0o700,
                                   refused=lambda: BackupRefused(_in_use(destination)))
    except OSError as exc:
        raise BackupRefused(f"{destination}: cannot write there ({exc.strerror or exc})") from None


def _in_use(destination: pathlib.Path) -> str:
    claimed_by = folder_claims.claimed_by(destination, IN_PROGRESS)
    if claimed_by is None:
        return f"{destination} exists and is not an empty folder"
    return (f"{destination} holds a backup that is being taken or was stopped ({IN_PROGRESS}: process"
            f" {claimed_by}); if that process is gone, remove the folder")


def _sqlite_size(url: sa.URL) -> int:
    """The live SQLite database's bytes with its WAL: what its copy may take."""
    return sum(os.stat(path).st_size for path in (url.database, f"{url.database}-wal") if os.path.exists(path))


def _postgres_size(live: sa.Engine) -> int:
    """The live database's size: more than its dump takes (compressed, without indexes)."""
    with live.connect() as connection:
        return int(connection.exec_driver_sql("SELECT pg_database_size(current_database())").scalar_one())


def _sqlite_snapshot(live: sa.Engine, copy: sa.Engine) -> None:
    """The live database, copied in one step of SQLite's online backup: one consistent read while
    the servers' writes go on (WAL). The copy's file is made 0640 by db.create_engine."""
    with contextlib.closing(live.raw_connection()) as source, contextlib.closing(copy.raw_connection()) as target:
        source.driver_connection.backup(target.driver_connection)  # type: ignore[union-attr]


def _postgres_snapshot(live: sa.Engine, database_url: str, dump: pathlib.Path, spool: IO[str]) -> None:
    """pg_dump of a snapshot this transaction exports, and the files to place as of that same
    snapshot, spooled; the transaction then ends."""
    os.close(os.open(dump, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640))  # pg_dump keeps the mode
    with live.connect().execution_options(isolation_level="REPEATABLE READ") as connection:
        connection.exec_driver_sql("SET TRANSACTION READ ONLY")
        # A managed server's idle-in-transaction timeout would end it while pg_dump works.
        connection.exec_driver_sql("SET LOCAL idle_in_transaction_session_timeout = 0")
        snapshot = connection.exec_driver_sql("SELECT pg_export_snapshot()").scalar_one()
        _pg_dump(database_url, snapshot, dump)
        _spool(connection, spool)


def _pg_dump(database_url: str, snapshot: str, dump: pathlib.Path) -> None:
    uri, secrets = libpq_connection(database_url)  # secrets in the environment, not on a command line
    env = {"PGCONNECT_TIMEOUT": PG_CONNECT_TIMEOUT_SECONDS, **os.environ, **secrets}
    # Ended when this is interrupted (Ctrl-C, or a signal the command turns into an exception): no
    # dump goes on writing into a folder being removed.
    result = stoppable.run(
        ["pg_dump", f"--snapshot={snapshot}", "--format=custom", f"--file={dump}", f"--dbname={uri}"], env)
    if result.returncode != 0:
        raise RuntimeError(f"pg_dump failed: {' '.join(result.stderr.split())}")
    fsync(dump)


def _spool(connection: sa.Connection, spool: IO[str]) -> None:
    """Write the files to place, a JSON line per event, to `spool`: [device, event id, media?,
    thumbnail?, whether the event needs them (a grant's early thumbnail may be used meanwhile)]."""
    for device, event_id, state, has_thumbnail in connection.execution_options(yield_per=1000).execute(_EVENTS):
        spool.write(json.dumps([device, event_id, state == "stored", bool(has_thumbnail), True]) + "\n")
    for device, event_id in connection.execute(_GRANT_THUMBNAILS):
        spool.write(json.dumps([device, event_id, False, True, False]) + "\n")
    spool.flush()


class _Files:
    """Takes the live media files into the backup: all of them before the snapshot (gather), then
    those the snapshot names into the backup's media folder (place)."""

    def __init__(self, settings: Settings, destination: pathlib.Path, copy: bool, manifest: Manifest,
                 live: sa.Engine) -> None:
        self.source = storage.media_root(settings.data_dir)
        self.target = storage.media_root(destination)
        self.gathered = destination / GATHERED
        self.same_disk = os.stat(settings.data_dir).st_dev == os.stat(destination).st_dev
        self.min_free_bytes = settings.min_free_bytes
        self.taker = FileTaker(copy=copy, unreadable="run `gallery backup` as the server's user or group",
                               before_copying=self._check_room)
        self.manifest = manifest
        self.live = live
        self.database_bytes = 0

    def gather(self, *, database_bytes: int) -> None:
        """Take every file now in the live media folder; with copies, first check they fit."""
        self.database_bytes = database_bytes
        self.target.mkdir(mode=0o750)
        self.gathered.mkdir(mode=0o700)
        if self.taker.copy:
            self._check_room()
        for device, names in media_files(self.source, unreadable=self.taker.unreadable):
            (self.gathered / device).mkdir(mode=0o750)
            for name in names:
                self.taker.take(self.source / device / name, self.gathered / device / name)

    def _check_room(self) -> None:
        """Copies must fit, the database's with them, and leave the servers their headroom when
        on their disk. Counted from the files themselves, thumbnails included."""
        sizes = [self.database_bytes]
        for device, names in media_files(self.source, unreadable=self.taker.unreadable):
            sizes.append(FOLDER)
            for name in names:
                with contextlib.suppress(FileNotFoundError):
                    sizes.append(os.stat(self.source / device / name).st_size)
        require_room(self.target, sizes, reserve=self.min_free_bytes if self.same_disk else 0,
                     reserve_is="the servers' headroom (GALLERY_MIN_FREE_BYTES)")

    def place(self, spool: IO[str]) -> dict[str, list[str]]:
        """Place every spooled event's files; returns the events deleted meanwhile, by device.
        What was gathered and not placed is removed."""
        spool.seek(0)
        gone: dict[str, list[str]] = {}
        suspects: dict[str, tuple[str, dict[str, int], list[str]]] = {}
        folders: set[str] = set()
        for line in spool:
            device, event_id, media, thumbnail, needed = json.loads(line)
            if device not in folders:
                (self.target / device).mkdir(mode=0o750, exist_ok=True)
                folders.add(device)
            names = ([event_id] if media else []) + ([event_id + storage.THUMBNAIL_SUFFIX] if thumbnail else [])
            placed = {name: size for name in names if (size := self._place(device, name)) is not None}
            if len(placed) == len(names):
                self.manifest.events += int(needed)
                self.manifest.files += len(placed)
            elif needed:  # a grant's thumbnail that is gone was used or expired meanwhile
                suspects[event_id] = (device, placed, [n for n in names if n not in placed])
                if len(suspects) >= BATCH:
                    self._settle(suspects, gone)
        self._settle(suspects, gone)
        shutil.rmtree(self.gathered)
        for device in folders:
            storage.fsync_dir(self.target / device)
        storage.fsync_dir(self.target)
        return gone

    def _place(self, device: str, name: str) -> int | None:
        """Move a gathered file into the media folder, or take it from the live one if it came
        later: its bytes (for the counts), None when it is gone. A thumbnail is taken from the
        live folder first: unlike media, it may have been replaced since it was gathered (a
        device's replaces the one the server made), and the live one is at least as new as the
        snapshot's row."""
        target = self.target / device / name
        source, gathered = self.source / device / name, self.gathered / device / name
        if name.endswith(storage.THUMBNAIL_SUFFIX) and self.taker.take(source, target):
            gathered.unlink(missing_ok=True)
        else:
            try:
                os.rename(gathered, target)
            except FileNotFoundError:
                if not self.taker.take(source, target):
                    return None
        size = os.stat(target).st_size
        if self.taker.copy:
            self.manifest.copied += 1
            self.manifest.bytes_copied += size
        else:
            self.manifest.linked += 1
        return size

    def _settle(self, suspects: dict[str, tuple[str, dict[str, int], list[str]]], gone: dict[str, list[str]]) -> None:
        """Events some of whose files were missing: left out if the live gallery no longer has them
        (deleted meanwhile), else kept as they are there, their missing files named."""
        if not suspects:
            return
        with self.live.connect() as connection:
            alive = set(connection.execute(sa.select(Event.id).where(col(Event.id).in_(list(suspects)))).scalars())
        for event_id, (device, placed, missing) in sorted(suspects.items()):
            if event_id in alive:
                self.manifest.events += 1
                self.manifest.files += len(placed)
                self.manifest.missing_files += len(missing)
                room = MAX_EXAMPLES - len(self.manifest.examples)
                self.manifest.examples.extend([f"{device}/{name}" for name in missing][:max(room, 0)])
                continue
            for name, size in placed.items():  # half an event: the part placed goes with it
                (self.target / device / name).unlink()
                if self.taker.copy:
                    self.manifest.copied -= 1
                    self.manifest.bytes_copied -= size
                else:
                    self.manifest.linked -= 1
            gone.setdefault(device, []).append(event_id)
            self.manifest.deleted_meanwhile.append(f"{device}/{event_id}")
        suspects.clear()

def media_files(root: pathlib.Path, *, unreadable: str) -> Iterator[tuple[str, list[str]]]:
    """(device, its file names) of a media folder, one device at a time; a folder or file that
    goes meanwhile is skipped, and so are hidden names (a staging file) and what is not a file.
    A folder this user may not list (the servers' are 0750) says what to do: `unreadable`."""
    try:
        devices = sorted(entry.name for entry in os.scandir(root) if entry.is_dir(follow_symlinks=False))
    except FileNotFoundError:
        return
    except PermissionError as exc:
        raise PermissionError(exc.errno, f"cannot list {root}: {unreadable}") from None
    for device in devices:
        try:
            with os.scandir(root / device) as entries:
                names = [e.name for e in entries if e.is_file(follow_symlinks=False) and not e.name.startswith(".")]
        except FileNotFoundError:
            continue
        except PermissionError as exc:
            raise PermissionError(exc.errno, f"cannot list {root / device}: {unreadable}") from None
        yield device, names


def require_client(program: str, database_url: str, *, of: str, refused: type[Exception]) -> None:
    """PostgreSQL's client `program` installed, and a URL libpq can take; else `refused` says what to do."""
    if shutil.which(program) is None:
        raise refused(f"{program} not found: install PostgreSQL's client, of {of} major version or newer")
    try:
        libpq_connection(database_url)
    except ConfigError as exc:
        raise refused(str(exc)) from None


FOLDER = -1  # in require_room's sizes: a folder, which takes one block


def require_room(target: pathlib.Path, sizes: Iterable[int], *, reserve: int, reserve_is: str) -> None:
    """ENOSPC unless files of these sizes fit on `target`'s filesystem with `reserve` bytes left:
    each counted in whole blocks of that filesystem (small files take far more than their size)."""
    st = os.statvfs(target)
    block = st.f_frsize or 4096
    needed = sum(block if size == FOLDER else -(-size // block) * block for size in sizes)
    free = st.f_bavail * st.f_frsize - reserve
    if needed > free:
        above = f" above {reserve_is}" if reserve else ""
        raise OSError(errno.ENOSPC, f"no room to copy {needed} bytes: {max(free, 0)} bytes free{above}")


class FileTaker:
    """Takes files for a backup or a restore: hard links, or copies (synced, the mode kept) with
    `copy` or when the target is on another filesystem (`before_copying` runs once then, to check
    that every copy fits)."""

    def __init__(self, *, copy: bool, unreadable: str, before_copying: Callable[[], None]) -> None:
        self.copy = copy
        self.unreadable = unreadable  # what to do about a file this user may not read
        self.before_copying = before_copying

    def take(self, source: pathlib.Path, target: pathlib.Path) -> bool:
        """Link or copy one file; False when the source is gone."""
        if not self.copy:
            try:
                os.link(source, target)
                return True
            except FileNotFoundError:
                return False
            except PermissionError as exc:
                if exc.errno == errno.EACCES:  # not even readable: copies would fail as well
                    raise PermissionError(exc.errno, f"cannot read {source}: {self.unreadable}") from None
                # EPERM: Linux links only its own files for a user (fs.protected_hardlinks).
                raise PermissionError(exc.errno, f"cannot hard-link {source} ({exc.strerror}): run as"
                                      " the files' owner, or take copies with --copy") from None
            except OSError as exc:
                if exc.errno != errno.EXDEV:  # EMLINK, a filesystem without links, ...
                    raise OSError(exc.errno, f"cannot hard-link {source} ({exc.strerror}); take copies"
                                  " with --copy") from None
                self.copy = True  # another filesystem: copy everything (this is the first file)
                self.before_copying()
        try:
            shutil.copyfile(source, target)
        except FileNotFoundError:
            target.unlink(missing_ok=True)
            return False
        except PermissionError as exc:
            raise PermissionError(exc.errno, f"cannot read {source}: {self.unreadable}") from None
        shutil.copymode(source, target)
        fsync(target)
        return True


def fsync(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
