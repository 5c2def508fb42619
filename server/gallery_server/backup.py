"""`gallery backup DEST`: a consistent copy of the gallery, taken while the servers run.

DEST becomes a data folder: the database (SQLite: `gallery.db`, a database file; PostgreSQL:
`gallery.pgdump`, pg_dump's custom format, for pg_restore), `media/<device>/` with every file
the database names, the data folder's `jwt-secret` if the secret lives there (it signs the
pre-signed URLs and names drop-folder imports: a restore needs the same one), and `backup.json`,
written last: a folder without it is no finished backup.

Consistency. The database is copied first, as one snapshot: SQLite's online backup, in one step
(a reader: the servers' writes go on meanwhile); on PostgreSQL, pg_dump reads a snapshot that
this command exports and holds while it works. The files to take are read from that snapshot,
then each is hard-linked into DEST, or copied when DEST is on another filesystem or with
`--copy`. A stored event's media file never changes once stored (each upload stores a new event,
its file moved into place whole), so a file taken after the snapshot holds the bytes its row
describes. An event deleted while the backup runs may have lost its files before they are
taken: it is then left out of the backup (on SQLite its row is deleted from the copy, whose
triggers keep the counters right), so that every event the backup holds has its files. A
PostgreSQL dump cannot be edited: those events are named in backup.json, and a restore's
reconciliation reports them as missing media.

Hard links share the live files' blocks: on the same filesystem the backup is a consistent set
to copy elsewhere (rsync -H, tar), taken in seconds and costing no space, not a second copy that
survives the disk. Not in it: staging (uploads in flight; an open resumable session resumes from
0 after a restore), the drop folders' files not yet imported, and run/ (status files).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import pathlib
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from . import status_files, storage, version
from .clock import rfc3339, utcnow
from .settings import SECRET_FILE_NAME, Settings

MANIFEST = "backup.json"
SQLITE_FILE = "gallery.db"
POSTGRES_DUMP = "gallery.pgdump"
MAX_EXAMPLES = 20
THUMB_SUFFIX = ".thumb"

_STORED = "SELECT device, id, has_thumbnail FROM events WHERE state = 'stored' ORDER BY device, id"


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
    events: int = 0  # stored events whose files it holds
    files: int = 0  # media files and thumbnails
    linked: int = 0
    copied: int = 0
    bytes_copied: int = 0
    secret: bool = False  # whether it holds the data folder's jwt-secret
    # Events deleted while it ran, their files gone before they were taken: left out (SQLite), or
    # named here and in the dump (PostgreSQL).
    deleted_meanwhile: int = 0
    examples: list[str] = dataclasses.field(default_factory=list)  # "<device>/<event_id>"
    seconds: float = 0.0


def backup(settings: Settings, destination: pathlib.Path, *, copy: bool = False) -> Manifest:
    """Take a backup into `destination`, which must not exist or be an empty folder. On any
    failure, what was written there is removed and the error raised."""
    started = time.monotonic()
    url = sa.make_url(settings.database_url)
    postgres = url.get_backend_name() == "postgresql"
    if not postgres and not (url.database and pathlib.Path(url.database).is_file()):
        raise BackupRefused(f"no database at {url.database} (GALLERY_DATA_DIR or GALLERY_DATABASE_URL)")
    if postgres and shutil.which("pg_dump") is None:
        raise BackupRefused("pg_dump not found: install the PostgreSQL client of the server's major version")
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise BackupRefused(f"{destination} exists and is not an empty folder")
    destination.mkdir(mode=0o700, parents=True, exist_ok=True)
    manifest = Manifest(started=rfc3339(utcnow()), version=version(),
                        database="postgresql" if postgres else "sqlite",
                        database_file=POSTGRES_DUMP if postgres else SQLITE_FILE)
    try:
        files = _Files(storage.media_root(settings.data_dir), storage.media_root(destination), copy, manifest)
        if postgres:
            with _postgres_snapshot(url, destination / POSTGRES_DUMP) as rows:
                files.take_all(rows)
        else:
            copied = destination / SQLITE_FILE
            _sqlite_snapshot(pathlib.Path(url.database), copied)  # type: ignore[arg-type]
            with contextlib.closing(sqlite3.connect(copied)) as database:
                gone = files.take_all(database.execute(_STORED))
                with database:
                    database.executemany("DELETE FROM events WHERE id = ?", [(event_id,) for event_id in gone])
            _fsync(copied)
        manifest.secret = _take_secret(settings.data_dir, destination)
        manifest.finished = rfc3339(utcnow())
        manifest.seconds = round(time.monotonic() - started, 3)
        status_files.write(destination / MANIFEST, manifest)
        storage.fsync_dir(destination)
    except BaseException:
        shutil.rmtree(destination, ignore_errors=True)
        raise
    return manifest


class _Files:
    """Takes each stored event's files into the backup's media folder."""

    def __init__(self, source: pathlib.Path, target: pathlib.Path, copy: bool, manifest: Manifest) -> None:
        self.source = source
        self.target = target
        self.copy = copy
        self.manifest = manifest
        self.made: set[str] = set()  # device folders made in the backup

    def take_all(self, rows: Any) -> list[str]:
        """Take the files of each (device, event id, has thumbnail) row; returns the ids of the
        events whose files were gone (deleted meanwhile), which are then left out."""
        gone: list[str] = []
        folder = None
        for device, event_id, has_thumbnail in rows:
            if device not in self.made:
                if folder is not None:
                    storage.fsync_dir(folder)
                folder = self.target / device
                folder.mkdir(mode=0o750, parents=True, exist_ok=True)
                self.made.add(device)
            names = [event_id, event_id + THUMB_SUFFIX] if has_thumbnail else [event_id]
            taken = []
            for name in names:
                if not self._take(self.source / device / name, self.target / device / name):
                    break
                taken.append(name)
            if len(taken) == len(names):
                self.manifest.events += 1
                self.manifest.files += len(names)
                continue
            for name in taken:  # half an event: the part taken goes with it
                (self.target / device / name).unlink()
            gone.append(event_id)
            self.manifest.deleted_meanwhile += 1
            if len(self.manifest.examples) < MAX_EXAMPLES:
                self.manifest.examples.append(f"{device}/{event_id}")
        if folder is not None:
            storage.fsync_dir(folder)
        storage.fsync_dir(self.target)
        return gone

    def _take(self, source: pathlib.Path, target: pathlib.Path) -> bool:
        """False when the source file is gone."""
        if not self.copy:
            try:
                os.link(source, target)
                self.manifest.linked += 1
                return True
            except FileNotFoundError:
                return False
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                    raise
                self.copy = True  # another filesystem, or one without hard links: copy the rest
        try:
            shutil.copyfile(source, target)
        except FileNotFoundError:
            target.unlink(missing_ok=True)
            return False
        shutil.copymode(source, target)
        _fsync(target)
        self.manifest.copied += 1
        self.manifest.bytes_copied += target.stat().st_size
        return True


def _sqlite_snapshot(source: pathlib.Path, target: pathlib.Path) -> None:
    """The live database, copied in one step of SQLite's online backup: one consistent read, while
    the servers' writes go on (WAL)."""
    with contextlib.closing(sqlite3.connect(source)) as live, contextlib.closing(sqlite3.connect(target)) as copy:
        live.execute("PRAGMA busy_timeout = 20000")
        live.backup(copy)
    _fsync(target)


@contextlib.contextmanager
def _postgres_snapshot(url: sa.URL, dump: pathlib.Path) -> Iterator[Any]:
    """pg_dump of a snapshot this transaction exports, then the stored events' rows as of that same
    snapshot. The transaction stays open until the files are taken: pg_dump must start in it."""
    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        with engine.connect().execution_options(isolation_level="REPEATABLE READ") as connection:
            connection.exec_driver_sql("SET TRANSACTION READ ONLY")
            snapshot = connection.exec_driver_sql("SELECT pg_export_snapshot()").scalar_one()
            _pg_dump(url, snapshot, dump)
            rows = connection.execution_options(stream_results=True, yield_per=1000).exec_driver_sql(_STORED)
            try:
                yield rows
            finally:
                rows.close()  # a server-side cursor: closed before its transaction ends, failure or not
    finally:
        engine.dispose()


def _pg_dump(url: sa.URL, snapshot: str, dump: pathlib.Path) -> None:
    # The password goes in pg_dump's environment, not on its command line (which ps shows).
    env = {**os.environ, **({"PGPASSWORD": url.password} if url.password else {})}
    libpq = url.set(drivername="postgresql", password=None).render_as_string(hide_password=False)
    result = subprocess.run(
        ["pg_dump", f"--snapshot={snapshot}", "--format=custom", f"--file={dump}", f"--dbname={libpq}"],
        env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"pg_dump failed: {' '.join(result.stderr.split())}")
    _fsync(dump)


def _take_secret(data_dir: pathlib.Path, destination: pathlib.Path) -> bool:
    source = data_dir / SECRET_FILE_NAME
    try:
        secret = source.read_bytes()
    except FileNotFoundError:
        return False  # GALLERY_JWT_SECRET: the operator keeps it
    fd = os.open(destination / SECRET_FILE_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secret)
        f.flush()
        os.fsync(f.fileno())
    return True


def _fsync(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
