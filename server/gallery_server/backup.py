"""`gallery backup DEST`: a consistent copy of the gallery, taken while the servers run.

DEST becomes a data folder: the database (SQLite: `gallery.db`, a database file; PostgreSQL:
`gallery.pgdump`, pg_dump's custom format, for pg_restore), `media/<device>/` with every file
the database names, the data folder's `jwt-secret` if that is the secret in use (it signs the
pre-signed URLs and names drop-folder imports: a restore needs the same one), and `backup.json`,
written last and synced: a folder without it is no finished backup.

Consistency. The database is copied first, as one snapshot: SQLite's online backup, in one step
(a reader: the servers' writes go on); on PostgreSQL, pg_dump reads a snapshot that this command
exports, and the list of files is read in that same snapshot (then the transaction ends: it does
not hold back vacuum while files are taken). Then each file is hard-linked into DEST, or copied
when DEST is on another filesystem or with `--copy`. A stored event's media file never changes
once stored (each upload stores a new event, its file moved into place whole), so a file taken
after the snapshot holds the bytes its row describes.

A file the snapshot names may be gone when it is taken. The live database says why: an event no
longer there was deleted meanwhile and is left out (on SQLite its row is deleted from the copy as
a user's DELETE deletes it: counters, open pulls, the device's tombstone; a PostgreSQL dump cannot
be edited: those events are named in backup.json, and the restored gallery's reconciliation
reports them as missing media). An event still there has lost its file in the live gallery too:
the backup keeps it as it is, and names it (`missing_files`), as reconciliation would.

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
import os
import pathlib
import shutil
import subprocess
import tempfile
import time
from typing import IO

import sqlalchemy as sa
from sqlmodel import Session, col

from . import db as db_module
from . import status_files, storage, version
from .clock import rfc3339, utcnow
from .models import GRANT_UNUSED, Event, UploadGrant
from .service import delete_event_rows
from .settings import SECRET_FILE_NAME, ConfigError, Settings, libpq_connection, read_secret_file, write_secret_file

MANIFEST = "backup.json"
SQLITE_FILE = "gallery.db"
POSTGRES_DUMP = "gallery.pgdump"
IN_PROGRESS = ".backup-in-progress"  # claims DEST: a second backup into it is refused
MAX_EXAMPLES = 20
BATCH = 500  # events whose missing files are looked up in the live database at once
PG_CONNECT_TIMEOUT_SECONDS = "10"  # as db.py's: libpq waits for ever on a silent server

# What the backup takes: each stored event's media and thumbnail, an announced event's thumbnail
# (sent with its announcement), and the thumbnail a signed URL brought before its media.
_EVENTS = (
    sa.select(Event.device, Event.id, Event.state, Event.has_thumbnail, Event.size)
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

    started: str = ""  # RFC 3339 UTC: the database's snapshot is of about then
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
    # Events deleted while it ran, their files gone before they were taken: left out (SQLite), or
    # named here and still in the dump (PostgreSQL).
    deleted_meanwhile: int = 0
    # Files of events still in the live gallery that are missing there too: "<device>/<file>".
    missing_files: int = 0
    examples: list[str] = dataclasses.field(default_factory=list)  # of both: "<device>/<file>"
    seconds: float = 0.0


def backup(settings: Settings, destination: pathlib.Path, *, copy: bool = False) -> Manifest:
    """Take a backup into `destination`, which must not exist or be an empty folder. On any
    failure (Ctrl-C included), what this wrote there is removed and the error raised."""
    started = time.monotonic()
    url = sa.make_url(settings.database_url)
    postgres = url.get_backend_name() == "postgresql"
    _check(settings, url, destination)
    secret = _secret_in_use(settings)  # read first: a user who may not read it learns it now
    made = _claim(destination)
    manifest = Manifest(started=rfc3339(utcnow()), version=version(),
                        database="postgresql" if postgres else "sqlite",
                        database_file=POSTGRES_DUMP if postgres else SQLITE_FILE)
    live = db_module.create_engine(settings.database_url, pool_size=1)
    copied_db = None
    try:
        with tempfile.TemporaryFile("w+", dir=destination, encoding="utf-8") as spool:
            if postgres:
                wanted = _postgres_snapshot(live, settings.database_url, destination / POSTGRES_DUMP, spool)
            else:
                copied_db = db_module.create_engine(f"sqlite:///{destination / SQLITE_FILE}", pool_size=1)
                _sqlite_snapshot(live, copied_db)
                with copied_db.connect() as connection:
                    wanted = _spool(connection, spool)
            files = _Files(settings, destination, copy, manifest, live)
            files.prepare(wanted)
            gone = files.take_all(spool)
        if copied_db is not None:
            with Session(copied_db) as session:
                for device, event_ids in gone.items():
                    delete_event_rows(session, device, event_ids, session_ttl=settings.upload_session_ttl)
                session.commit()
            copied_db.dispose()  # the last connection checkpoints its WAL into the file, and removes it
            _fsync(destination / SQLITE_FILE)
        if secret:
            write_secret_file(destination, secret)
            manifest.secret = True
        manifest.finished = rfc3339(utcnow())
        manifest.seconds = round(time.monotonic() - started, 3)
        status_files.write(destination / MANIFEST, manifest, durable=True)
        (destination / IN_PROGRESS).unlink()
        storage.fsync_dir(destination)
    except BaseException:
        if copied_db is not None:
            copied_db.dispose()
        _remove_what_was_made(destination, made)
        raise
    finally:
        live.dispose()
    return manifest


def _check(settings: Settings, url: sa.URL, destination: pathlib.Path) -> None:
    if url.get_backend_name() == "postgresql":
        if shutil.which("pg_dump") is None:
            raise BackupRefused("pg_dump not found: install PostgreSQL's client, of the server's major"
                                " version or newer")
        try:
            libpq_connection(settings.database_url)
        except ConfigError as exc:
            raise BackupRefused(str(exc)) from None
    elif not (url.database and pathlib.Path(url.database).is_file()):
        raise BackupRefused(f"no database at {url.database} (GALLERY_DATA_DIR or GALLERY_DATABASE_URL)")
    if destination.resolve().is_relative_to(settings.data_dir.resolve()):
        # Under media/ the reconciler would remove its files as orphans, under a drop folder they
        # would be imported, and a copy of the data folder would hold every backup in it.
        raise BackupRefused(f"{destination} is inside the data folder {settings.data_dir}: choose a folder beside it")
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise BackupRefused(f"{destination} exists and is not an empty folder")


def _secret_in_use(settings: Settings) -> str:
    """The data folder's jwt-secret when it is the secret the servers use (GALLERY_JWT_SECRET
    unset); "" otherwise: the operator keeps GALLERY_JWT_SECRET."""
    try:
        secret = read_secret_file(settings.data_dir)
    except PermissionError:
        raise BackupRefused(f"cannot read {settings.data_dir / SECRET_FILE_NAME} (0600): run `gallery backup`"
                            " as the server's user") from None
    return secret if secret and secret == settings.jwt_secret else ""


def _claim(destination: pathlib.Path) -> bool:
    """Make DEST (or take an empty one) for this backup alone; whether it was made here."""
    try:
        destination.mkdir(mode=0o700, parents=True)
        made = True
    except FileExistsError:
        made = False
    try:
        os.close(os.open(destination / IN_PROGRESS, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        raise BackupRefused(f"another backup is writing to {destination}") from None
    if not made and any(p.name != IN_PROGRESS for p in destination.iterdir()):  # filled meanwhile
        (destination / IN_PROGRESS).unlink()
        raise BackupRefused(f"{destination} exists and is not an empty folder")
    return made


def _remove_what_was_made(destination: pathlib.Path, made: bool) -> None:
    """A failed backup leaves nothing: the folder if this made it, else what it put in it."""
    if made:
        shutil.rmtree(destination, ignore_errors=True)
        return
    for entry in destination.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _sqlite_snapshot(live: sa.Engine, copy: sa.Engine) -> None:
    """The live database, copied in one step of SQLite's online backup: one consistent read while
    the servers' writes go on (WAL). The copy's file is made 0640 by db.create_engine."""
    with contextlib.closing(live.raw_connection()) as source, contextlib.closing(copy.raw_connection()) as target:
        source.driver_connection.backup(target.driver_connection)  # type: ignore[union-attr]


def _postgres_snapshot(live: sa.Engine, database_url: str, dump: pathlib.Path, spool: IO[str]) -> int:
    """pg_dump of a snapshot this transaction exports, and the files to take as of that same
    snapshot, spooled; the transaction then ends. Returns the bytes of media named."""
    fd = os.open(dump, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)  # pg_dump keeps the mode
    os.close(fd)
    with live.connect().execution_options(isolation_level="REPEATABLE READ") as connection:
        connection.exec_driver_sql("SET TRANSACTION READ ONLY")
        # A managed server's idle-in-transaction timeout would end it while pg_dump works.
        connection.exec_driver_sql("SET LOCAL idle_in_transaction_session_timeout = 0")
        snapshot = connection.exec_driver_sql("SELECT pg_export_snapshot()").scalar_one()
        _pg_dump(database_url, snapshot, dump)
        return _spool(connection, spool)


def _pg_dump(database_url: str, snapshot: str, dump: pathlib.Path) -> None:
    uri, secrets = libpq_connection(database_url)  # secrets in the environment, not on a command line
    env = {"PGCONNECT_TIMEOUT": PG_CONNECT_TIMEOUT_SECONDS, **os.environ, **secrets}
    result = subprocess.run(
        ["pg_dump", f"--snapshot={snapshot}", "--format=custom", f"--file={dump}", f"--dbname={uri}"],
        env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"pg_dump failed: {' '.join(result.stderr.split())}")
    _fsync(dump)


def _spool(connection: sa.Connection, spool: IO[str]) -> int:
    """Write the files to take, a JSON line per event, to `spool`; returns the bytes of media."""
    media_bytes = 0
    rows = connection.execution_options(yield_per=1000).execute(_EVENTS)
    for device, event_id, state, has_thumbnail, size in rows:
        stored = state == "stored"
        media_bytes += size if stored else 0
        spool.write(json.dumps([device, event_id, stored, bool(has_thumbnail), True]) + "\n")
    for device, event_id in connection.execute(_GRANT_THUMBNAILS):
        spool.write(json.dumps([device, event_id, False, True, False]) + "\n")
    spool.flush()
    return media_bytes


class _Files:
    """Takes the spooled events' files into the backup's media folder."""

    def __init__(self, settings: Settings, destination: pathlib.Path, copy: bool, manifest: Manifest,
                 live: sa.Engine) -> None:
        self.source = storage.media_root(settings.data_dir)
        self.target = storage.media_root(destination)
        self.same_disk = os.stat(settings.data_dir).st_dev == os.stat(destination).st_dev
        self.min_free_bytes = settings.min_free_bytes
        self.copy = copy
        self.manifest = manifest
        self.live = live
        self.media_bytes = 0

    def prepare(self, media_bytes: int) -> None:
        """Make the media folder; with copies, check first that `media_bytes` fit."""
        self.media_bytes = media_bytes
        self.target.mkdir(mode=0o750)
        if self.copy:
            self._check_room()

    def _check_room(self) -> None:
        """Copies must fit, and leave the servers their headroom when on their disk."""
        st = os.statvfs(self.target)
        free = st.f_bavail * st.f_frsize - (self.min_free_bytes if self.same_disk else 0)
        if self.media_bytes > free:
            raise OSError(errno.ENOSPC, f"no room to copy {self.media_bytes} bytes of media (and thumbnails):"
                          f" {max(free, 0)} bytes free{' above the servers headroom' if self.same_disk else ''}")

    def take_all(self, spool: IO[str]) -> dict[str, list[str]]:
        """Take every spooled event's files; returns the events deleted meanwhile, by device."""
        spool.seek(0)
        gone: dict[str, list[str]] = {}
        suspects: dict[str, tuple[str, dict[str, int], list[str]]] = {}
        folders: set[str] = set()
        for line in spool:
            device, event_id, stored, has_thumbnail, needed = json.loads(line)
            if device not in folders:
                (self.target / device).mkdir(mode=0o750, exist_ok=True)
                folders.add(device)
            names = ([event_id] if stored else []) + ([event_id + storage.THUMBNAIL_SUFFIX] if has_thumbnail else [])
            taken = {name: copied for name in names if (copied := self._take(device, name)) is not None}
            if len(taken) == len(names):
                self.manifest.events += int(needed)
                self.manifest.files += len(taken)
            elif needed:  # a grant's thumbnail that is gone was used or expired meanwhile
                suspects[event_id] = (device, taken, [n for n in names if n not in taken])
                if len(suspects) >= BATCH:
                    self._settle(suspects, gone)
        self._settle(suspects, gone)
        for device in folders:
            storage.fsync_dir(self.target / device)
        storage.fsync_dir(self.target)
        return gone

    def _settle(self, suspects: dict[str, tuple[str, dict[str, int], list[str]]], gone: dict[str, list[str]]) -> None:
        """Events some of whose files were missing: left out if the live gallery no longer has them
        (deleted meanwhile), else kept as they are there, their missing files named."""
        if not suspects:
            return
        with self.live.connect() as connection:
            alive = set(connection.execute(sa.select(Event.id).where(col(Event.id).in_(list(suspects)))).scalars())
        for event_id, (device, taken, missing) in sorted(suspects.items()):
            if event_id in alive:
                self.manifest.events += 1
                self.manifest.files += len(taken)
                self.manifest.missing_files += len(missing)
                self._example(*(f"{device}/{name}" for name in missing))
                continue
            for name, copied in taken.items():
                self._untake(device, name, copied)
            gone.setdefault(device, []).append(event_id)
            self.manifest.deleted_meanwhile += 1
            self._example(f"{device}/{event_id}")
        suspects.clear()

    def _example(self, *examples: str) -> None:
        room = MAX_EXAMPLES - len(self.manifest.examples)
        self.manifest.examples.extend(examples[:max(room, 0)])

    def _take(self, device: str, name: str) -> int | None:
        """Link or copy one file: the bytes copied (0 for a link), None when the source is gone."""
        source, target = self.source / device / name, self.target / device / name
        if not self.copy:
            try:
                os.link(source, target)
                self.manifest.linked += 1
                return 0
            except FileNotFoundError:
                return None
            except PermissionError as exc:
                if exc.errno == errno.EACCES:  # not even readable: copies would fail as well
                    raise PermissionError(exc.errno, f"cannot read {source}: run `gallery backup` as the"
                                          " server's user or group") from None
                # EPERM: Linux links only its own files for a user (fs.protected_hardlinks).
                raise PermissionError(exc.errno, f"cannot hard-link {source} ({exc.strerror}): run as"
                                      " the files' owner, or take copies with --copy") from None
            except OSError as exc:
                if exc.errno != errno.EXDEV:  # EMLINK, a filesystem without links, ...
                    raise OSError(exc.errno, f"cannot hard-link {source} ({exc.strerror}); take copies"
                                  " with --copy") from None
                self.copy = True  # another filesystem: copy the rest
                self._check_room()
        try:
            shutil.copyfile(source, target)
        except FileNotFoundError:
            target.unlink(missing_ok=True)
            return None
        except PermissionError as exc:
            raise PermissionError(exc.errno, f"cannot read {source}: run `gallery backup` as the server's"
                                  " user or group") from None
        shutil.copymode(source, target)
        _fsync(target)
        size = target.stat().st_size
        self.manifest.copied += 1
        self.manifest.bytes_copied += size
        return size

    def _untake(self, device: str, name: str, copied: int) -> None:
        """Remove a file taken for an event that is left out, and its count."""
        (self.target / device / name).unlink()
        if copied:
            self.manifest.copied -= 1
            self.manifest.bytes_copied -= copied
        else:
            self.manifest.linked -= 1


def _fsync(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
