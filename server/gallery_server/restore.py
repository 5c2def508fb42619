"""`gallery restore BACKUP`: a folder made by `gallery backup` becomes the gallery again, in the
data folder (GALLERY_DATA_DIR) and database (GALLERY_DATABASE_URL) the servers will start on.

Both must be new: an empty or missing data folder, and on PostgreSQL a database without tables
(`createdb`). A restore never overwrites a gallery, so it cannot lose one; that also means no
server is running on them. While it works, a marker in the data folder keeps servers from
starting there.

What it does, in this order, each step undone if a later one fails (or the command is stopped):
the database (SQLite: the backup's file copied, checked, and renamed into place; PostgreSQL:
pg_restore in one transaction, then the events the backup lists as deleted while it ran are
deleted, as a user's DELETE deletes them), the schema brought up to this version (what a starting
server does), the media files (hard links on the backup's filesystem: a restore takes seconds and
no space, and the gallery's own changes never write into a stored file, so they leave the backup
as it was; copies, synced, from another filesystem or with `--copy`), the jwt-secret. Then every
file the restored database names is looked for: those the backup lacks, or holds at another size,
are counted and named (the restore goes on: it is the backup as it is; `gallery verify` reads
every byte).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import pathlib
import secrets
import shutil
import subprocess
import time

import sqlalchemy as sa
from sqlmodel import Session, col

from . import db as db_module
from . import folder_claims, status_files, storage, validation
from .backup import (
    FOLDER,
    MANIFEST,
    MAX_EXAMPLES,
    PG_CONNECT_TIMEOUT_SECONDS,
    POSTGRES_DUMP,
    SQLITE_FILE,
    FileTaker,
    Manifest,
    media_files,
    require_room,
)
from .errors import InvalidArgument
from .models import Event
from .service import delete_event_rows
from .settings import (
    RESTORE_IN_PROGRESS,
    SECRET_FILE_NAME,
    ConfigError,
    Settings,
    libpq_connection,
    write_secret_file,
)

log = logging.getLogger(__name__)

# Each file the restored database names: a stored event's media (its size known) and thumbnail,
# and an announced event's thumbnail.
_NAMED_FILES = (
    sa.select(Event.device, Event.id, Event.state, Event.size, Event.has_thumbnail)
    .where(sa.or_(col(Event.state) == "stored", col(Event.has_thumbnail)))
    .order_by(col(Event.device), col(Event.id))
)


_NAMES = {"postgresql": "PostgreSQL", "sqlite": "SQLite"}


class RestoreRefused(Exception):
    """The restore cannot start (its message says why); nothing was written."""


@dataclasses.dataclass
class Restored:
    """What `gallery restore` printed: what it restored, and from which backup."""

    backup: str = ""  # the backup folder
    snapshot: str = ""  # the backup's moment: the restored gallery is the gallery then
    database: str = ""  # "sqlite" or "postgresql"
    events: int = 0  # events whose files the restored database names
    files: int = 0  # media files and thumbnails in the restored media folder
    linked: int = 0
    copied: int = 0
    bytes_copied: int = 0
    secret: bool = False  # whether the backup's jwt-secret is now the data folder's
    # The backup's deleted_meanwhile (events stored and deleted while it ran, without their files):
    # deleted from a restored PostgreSQL database here; a SQLite copy never held them.
    deleted: list[str] = dataclasses.field(default_factory=list)
    # Files the restored database names that the backup lacks or holds at another size:
    # "<device>/<file>", up to 20 of them.
    missing_files: int = 0
    examples: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0


def restore(settings: Settings, source: pathlib.Path, *, copy: bool = False) -> Restored:
    """Restore the backup in `source` into the configured data folder and database. On any failure
    (a signal made an exception included), what this wrote is removed and the error raised."""
    started = time.monotonic()
    url = sa.make_url(settings.database_url)
    postgres = (_PostgresTarget(settings.database_url, source / POSTGRES_DUMP)
                if url.get_backend_name() == "postgresql" else None)
    manifest = _check(settings, url, source, postgres)
    deletions = _deletions(manifest)
    if not postgres:  # a SQLite copy was made without them (backup.py); a PostgreSQL dump holds them
        deletions = {}
    data_dir = settings.data_dir
    made = folder_claims.claim(data_dir, RESTORE_IN_PROGRESS, mode=0o750,
                               refused=lambda: RestoreRefused(_in_use(data_dir)))
    result = Restored(backup=str(source.resolve()), snapshot=manifest.snapshot, database=manifest.database)
    sqlite_file = None if postgres else pathlib.Path(str(url.database))
    database = None
    try:
        copy = copy or os.stat(source).st_dev != os.stat(data_dir).st_dev
        taker = FileTaker(copy=copy, unreadable="run `gallery restore` as a user who may read the backup",
                          before_copying=lambda: _check_room(source, data_dir, settings, media=True))
        _check_room(source, data_dir, settings, media=copy)
        if postgres:
            postgres.restore()
        else:
            _copy_sqlite(source / SQLITE_FILE, sqlite_file)
        database = db_module.Database(settings.database_url, pool_size=1)
        database.create_tables()  # what a server of this version does at start (an older backup's columns)
        if not postgres:
            _check_sqlite(database.engine)
        with Session(database.engine) as session:
            for device, event_ids in deletions.items():
                deleted = delete_event_rows(session, device, event_ids, session_ttl=settings.upload_session_ttl)
                result.deleted.extend(f"{device}/{event_id}" for event_id in deleted)
            session.commit()
        _restore_media(source, data_dir, taker, result)
        if manifest.secret:
            result.secret = _restore_secret(source, settings)
        _look_for_named_files(database.engine, data_dir, result)
        database.dispose()
        (data_dir / RESTORE_IN_PROGRESS).unlink()
        storage.fsync_dir(data_dir)
    except BaseException:
        if database is not None:
            database.dispose()
        if postgres:
            postgres.undo()
        if sqlite_file is not None and not sqlite_file.resolve().is_relative_to(data_dir.resolve()):
            for path in (sqlite_file, pathlib.Path(f"{sqlite_file}-wal"), pathlib.Path(f"{sqlite_file}-shm")):
                path.unlink(missing_ok=True)
        folder_claims.remove_what_was_made(data_dir, made)
        raise
    result.seconds = round(time.monotonic() - started, 3)
    if result.missing_files:
        log.warning("the restored gallery lacks files its database names: the backup lacks them",
                    extra={"missing_files": result.missing_files, "examples": result.examples})
    return result


def _check(settings: Settings, url: sa.URL, source: pathlib.Path, postgres: _PostgresTarget | None) -> Manifest:
    try:
        (source / MANIFEST).open("rb").close()
    except PermissionError:
        raise RestoreRefused(f"cannot read {source / MANIFEST}: run `gallery restore` as a user who may read"
                             " the backup (the one who took it)") from None
    except OSError:
        pass  # none there: said below
    manifest = status_files.read(source / MANIFEST, Manifest)
    if manifest is None or not manifest.finished:
        raise RestoreRefused(f"{source} holds no finished backup (no readable {MANIFEST}: `gallery backup`"
                             " writes it last)")
    backend = url.get_backend_name()
    if manifest.database != backend:
        into = ("into an empty PostgreSQL database that GALLERY_DATABASE_URL names" if manifest.database == "postgresql"
                else "into SQLite: unset GALLERY_DATABASE_URL")
        raise RestoreRefused(f"{source} is a backup of a gallery on {_NAMES.get(manifest.database, manifest.database)}:"
                             f" restore it {into}")
    if not (source / manifest.database_file).is_file():
        raise RestoreRefused(f"{source} lacks its database ({manifest.database_file})")
    data_dir = settings.data_dir.resolve()
    if data_dir.is_relative_to(source.resolve()) or source.resolve().is_relative_to(data_dir):
        raise RestoreRefused(f"{source} and the data folder {settings.data_dir} overlap: restore into a folder"
                             " beside the backup")
    if settings.data_dir.exists() and not settings.data_dir.is_dir():
        raise RestoreRefused(f"GALLERY_DATA_DIR={settings.data_dir} exists and is not a folder")
    if settings.data_dir.exists() and any(settings.data_dir.iterdir()):
        raise RestoreRefused(_in_use(settings.data_dir))
    if postgres:
        if shutil.which("pg_restore") is None:
            raise RestoreRefused("pg_restore not found: install PostgreSQL's client, of the server's major"
                                 " version or newer")
        try:
            libpq_connection(settings.database_url)
        except ConfigError as exc:
            raise RestoreRefused(str(exc)) from None
        postgres.check_empty()
    elif os.path.lexists(str(url.database)):
        raise RestoreRefused(f"a database is already at {url.database}: restore into a new data folder")
    return manifest


def _deletions(manifest: Manifest) -> dict[str, list[str]]:
    """The backup's deleted_meanwhile ("<device>/<event id>"), by device; checked before anything
    is written, since backup.json is a file anyone may have edited."""
    by_device: dict[str, list[str]] = collections.defaultdict(list)
    for entry in manifest.deleted_meanwhile:
        device, _, event_id = str(entry).partition("/")
        try:
            by_device[validation.device_id(device)].append(validation.event_id(event_id))
        except InvalidArgument:
            raise RestoreRefused(f"{MANIFEST}: deleted_meanwhile holds {entry!r}, not <device>/<event id>") from None
    return dict(by_device)


def _in_use(data_dir: pathlib.Path) -> str:
    who = folder_claims.claimed_by(data_dir, RESTORE_IN_PROGRESS)
    if who is None:
        return (f"GALLERY_DATA_DIR={data_dir} is not empty: a restore makes a new gallery, it never"
                " overwrites one (move that folder aside, or name a new one)")
    return (f"GALLERY_DATA_DIR={data_dir} is being restored into, or a restore there was stopped"
            f" ({RESTORE_IN_PROGRESS}: process {who}); if that process is gone, remove the folder")


def _check_room(source: pathlib.Path, data_dir: pathlib.Path, settings: Settings, *, media: bool) -> None:
    """The SQLite copy, and the media when copied, must fit and leave the servers their headroom."""
    sizes = []
    sqlite = source / SQLITE_FILE
    if sqlite.exists():
        sizes.append(sqlite.stat().st_size)
    if media:
        root = storage.media_root(source)
        for device, names in media_files(root):
            sizes.append(FOLDER)
            sizes.extend((root / device / name).stat().st_size for name in names)
    require_room(data_dir, sizes, reserve=settings.min_free_bytes, reserve_is="the servers' headroom")


def _copy_sqlite(backup_file: pathlib.Path, target: pathlib.Path) -> None:
    """The backup's database file, copied under a name of its own, synced, then given its name:
    never over a file that appeared meanwhile. The backup's file is only read (opened as a
    database, it could be written to)."""
    partial = target.with_name(f".{target.name}.{secrets.token_hex(8)}")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        with os.fdopen(fd, "wb") as out, backup_file.open("rb") as src:
            shutil.copyfileobj(src, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.link(partial, target)
        storage.fsync_dir(target.parent)
    finally:
        partial.unlink(missing_ok=True)


def _check_sqlite(engine: sa.Engine) -> None:
    """A damaged database file fails the restore, rather than the servers that would start on it."""
    with engine.connect() as connection:
        problems = [row[0] for row in connection.exec_driver_sql("PRAGMA quick_check")]
    if problems != ["ok"]:
        raise RuntimeError(f"the backup's database is damaged: {'; '.join(problems[:3])}")


class _PostgresTarget:
    """The PostgreSQL database a dump is restored into: checked empty first, restored in one
    transaction, and emptied again (what the restore made, nothing else) when a later step fails."""

    def __init__(self, database_url: str, dump: pathlib.Path) -> None:
        self.database_url = database_url
        self.dump = dump
        self.before: set[str] = set()  # the schemas' functions and sequences before the restore
        self.schemas_before: set[str] = set()
        self.restored = False

    def _schemas(self) -> list[str]:
        """The schemas the dump makes its tables in (public, unless the live gallery used another)."""
        result = subprocess.run(["pg_restore", "--list", str(self.dump)], capture_output=True, text=True,
                                stdin=subprocess.DEVNULL, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"pg_restore cannot read {self.dump}: {' '.join(result.stderr.split())}")
        schemas = set()
        for line in result.stdout.splitlines():
            fields = line.split()
            # "<id>; <catalog> <oid> TABLE <schema> <name> <owner>"
            if not line.startswith(";") and len(fields) >= 6 and fields[3] == "TABLE":
                schemas.add(fields[4])
        return sorted(schemas) or ["public"]

    def _engine(self) -> sa.Engine:
        return db_module.create_engine(self.database_url, pool_size=1)

    def check_empty(self) -> None:
        """Refused unless the database has no table in the dump's schemas; what is there is noted,
        so that undo() leaves it."""
        schemas = self._schemas()
        engine = self._engine()
        try:
            with engine.connect() as connection:
                tables = connection.execute(
                    sa.text("SELECT schemaname || '.' || tablename FROM pg_tables WHERE schemaname = ANY(:s)"),
                    {"s": schemas}).scalars().all()
                self.before = set(connection.execute(_OBJECTS, {"s": schemas}).scalars())
                self.schemas_before = set(connection.execute(
                    sa.text("SELECT nspname FROM pg_namespace WHERE nspname = ANY(:s)"), {"s": schemas}).scalars())
        except sa.exc.OperationalError as exc:
            why = " ".join(str(exc.orig or exc).split())
            raise RestoreRefused(f"cannot reach the database to restore into ({why}); make it first"
                                 " (createdb)") from None
        finally:
            engine.dispose()
        if tables:
            raise RestoreRefused(f"the database already has tables ({', '.join(sorted(tables)[:5])}): a restore"
                                 " makes a new gallery, it never overwrites one (createdb a new database)")

    def restore(self) -> None:
        uri, libpq_secrets = libpq_connection(self.database_url)  # secrets in the environment only
        env = {"PGCONNECT_TIMEOUT": PG_CONNECT_TIMEOUT_SECONDS, **os.environ, **libpq_secrets}
        # One transaction: a dump that fails half-way (a pg_restore older than the dump, a table
        # made meanwhile) leaves nothing. Owners and grants are the live server's, not this one's.
        result = subprocess.run(
            ["pg_restore", "--single-transaction", "--exit-on-error", "--no-owner", "--no-privileges",
             f"--dbname={uri}", str(self.dump)],
            env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"pg_restore failed: {' '.join(result.stderr.split())}")
        self.restored = True  # committed: from here on, undo() drops what it made

    def undo(self) -> None:
        """Drop what the restore made: the dump's schemas' tables (it found none there), and the
        functions, sequences and schemas that were not there before it."""
        if not self.restored:
            return
        schemas = self._schemas()
        engine = self._engine()
        try:
            with engine.begin() as connection:
                for schema in schemas:
                    if schema not in self.schemas_before:
                        connection.exec_driver_sql(f"DROP SCHEMA IF EXISTS {_quoted(connection, schema)} CASCADE")
                for (name,) in connection.execute(
                        sa.text("SELECT quote_ident(schemaname) || '.' || quote_ident(tablename) FROM pg_tables"
                                " WHERE schemaname = ANY(:s)"), {"s": schemas}):
                    connection.exec_driver_sql(f"DROP TABLE IF EXISTS {name} CASCADE")
                for (kind, name) in connection.execute(_OBJECTS_BY_KIND, {"s": schemas}):
                    if f"{kind} {name}" not in self.before:
                        connection.exec_driver_sql(f"DROP {kind} IF EXISTS {name} CASCADE")
        except sa.exc.SQLAlchemyError as exc:  # the restore's own error is the one to report
            log.error("the restored tables could not be dropped: drop them before restoring again",
                      extra={"error": " ".join(str(getattr(exc, "orig", None) or exc).split())})
        finally:
            engine.dispose()


_OBJECTS_BY_KIND = sa.text(
    "SELECT 'FUNCTION', p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
    " WHERE n.nspname = ANY(:s)"
    " UNION ALL SELECT 'SEQUENCE', quote_ident(schemaname) || '.' || quote_ident(sequencename) FROM pg_sequences"
    " WHERE schemaname = ANY(:s)")
_OBJECTS = sa.text(f"SELECT kind || ' ' || name FROM ({_OBJECTS_BY_KIND.text}) AS objects(kind, name)")


def _quoted(connection: sa.Connection, name: str) -> str:
    return str(connection.execute(sa.text("SELECT quote_ident(:n)"), {"n": name}).scalar_one())


def _restore_media(source: pathlib.Path, data_dir: pathlib.Path, taker: FileTaker, result: Restored) -> None:
    """Every file of the backup's media folder into the data folder's, folders 0750."""
    backup_media, media = storage.media_root(source), storage.media_root(data_dir)
    media.mkdir(mode=0o750, exist_ok=True)
    for device, names in media_files(backup_media):
        (media / device).mkdir(mode=0o750)
        for name in names:
            target = media / device / name
            if not taker.take(backup_media / device / name, target):
                continue  # gone from the backup meanwhile: found missing below, if it is named
            result.files += 1
            if taker.copy:
                result.copied += 1
                result.bytes_copied += target.stat().st_size
            else:
                result.linked += 1
        storage.fsync_dir(media / device)
    storage.fsync_dir(media)


def _restore_secret(source: pathlib.Path, settings: Settings) -> bool:
    """The backup's jwt-secret as the data folder's: it signed the pre-signed URLs and named the
    drop-folder imports. GALLERY_JWT_SECRET, when set, stays the one in use: said if it differs."""
    try:
        secret = (source / SECRET_FILE_NAME).read_text().strip()
    except FileNotFoundError:
        raise RuntimeError(f"{MANIFEST} says the backup holds its jwt-secret, and {source} lacks it") from None
    write_secret_file(settings.data_dir, secret)
    if settings.jwt_secret and settings.jwt_secret != secret:
        log.warning("GALLERY_JWT_SECRET is not the backup's jwt-secret, which is now the data folder's: unset it"
                    " to use the backup's (pre-signed URLs and drop-folder names made before need it)")
    return True


def _look_for_named_files(engine: sa.Engine, data_dir: pathlib.Path, result: Restored) -> None:
    """Count the events whose files the restored database names, and name the files it lacks."""
    media = storage.media_root(data_dir)
    with engine.connect() as connection:
        for device, event_id, state, size, has_thumbnail in connection.execution_options(
                yield_per=1000).execute(_NAMED_FILES):
            result.events += 1
            named = ([(event_id, size)] if state == "stored" else []) + (
                [(event_id + storage.THUMBNAIL_SUFFIX, None)] if has_thumbnail else [])
            for name, expected in named:
                if not _there(media / device / name, expected):
                    result.missing_files += 1
                    if len(result.examples) < MAX_EXAMPLES:
                        result.examples.append(f"{device}/{name}")


def _there(path: pathlib.Path, size: int | None) -> bool:
    """Whether the file is there, at `size` bytes when that is known."""
    try:
        return size is None or path.stat().st_size == size
    except FileNotFoundError:
        return False
