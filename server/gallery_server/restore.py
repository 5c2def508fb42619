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
import contextlib
import dataclasses
import logging
import os
import pathlib
import secrets
import shutil
import time

import sqlalchemy as sa
from sqlmodel import Session, col

from . import db as db_module
from . import folder_claims, identity, status_files, stoppable, storage, validation
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
    require_client,
    require_room,
)
from .errors import InvalidArgument
from .models import Event
from .service import delete_event_rows
from .settings import (
    RESTORE_IN_PROGRESS,
    SECRET_FILE_NAME,
    Settings,
    libpq_connection,
    read_secret_file,
    shown_database_url,
    write_secret_file,
)

log = logging.getLogger(__name__)
_UNREADABLE = "run `gallery restore` as a user who may read the backup"

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
    data_dir: str = ""  # the data folder it was restored into
    database_url: str = ""  # the database it was restored into (GALLERY_DATABASE_URL, without a password)
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
    target: _PostgresTarget | _SqliteTarget = (
        _PostgresTarget(settings.database_url, source / POSTGRES_DUMP) if url.get_backend_name() == "postgresql"
        else _SqliteTarget(url, source / SQLITE_FILE))
    manifest, deletions = _check(settings, source, target)  # on PostgreSQL, the database is held from here
    data_dir = settings.data_dir
    result = Restored(backup=str(source.resolve()), data_dir=str(data_dir.resolve()),
                      database_url=shown_database_url(settings.database_url), snapshot=manifest.snapshot,
                      database=manifest.database)
    made: bool | None = None
    database = None
    try:
        with stoppable.signals_held():  # a signal as it returns would leave a marked folder unknown here
            made = _claim(data_dir)
        copy = copy or os.stat(source).st_dev != os.stat(data_dir).st_dev
        taker = FileTaker(copy=copy, unreadable=_UNREADABLE,
                          before_copying=lambda: _check_room(source, data_dir, settings, media=True, database=None))
        _check_room(source, data_dir, settings, media=copy, database=target)
        target.restore()
        database = db_module.Database(settings.database_url, pool_size=1)
        if isinstance(target, _SqliteTarget):
            _check_sqlite(database.engine)
        with database.engine.connect() as connection:
            if not sa.inspect(connection).has_table(Event.__tablename__):
                raise RuntimeError(f"the backup's database holds no gallery (no {Event.__tablename__} table)")
        database.create_tables()  # what a server of this version does at start (an older backup's columns)
        # A gallery of its own: a server on this folder and the live database, or the other way
        # round, does not start (identity.py).
        identity.mint(database.engine, data_dir)
        with Session(database.engine) as session:
            for device, event_ids in deletions.items():
                deleted = delete_event_rows(session, device, event_ids, session_ttl=settings.upload_session_ttl)
                result.deleted.extend(f"{device}/{event_id}" for event_id in deleted)
            session.commit()
        _restore_media(source, data_dir, taker, result)
        if manifest.secret:
            result.secret = _restore_secret(source, settings)
        _look_for_named_files(database.engine, data_dir, result)
        if result.events != manifest.events:  # e.g. a dump restored into a schema the servers do not read
            raise RuntimeError(f"the restored database names the files of {result.events} events, and the"
                               f" backup holds {manifest.events}")
        database.dispose()
        (data_dir / RESTORE_IN_PROGRESS).unlink()
        storage.fsync_dir(data_dir)
    except BaseException:
        with stoppable.signals_held():  # a second Ctrl-C must not cut the undo short
            if database is not None:
                database.dispose()
            target.undo()
            if made is not None:
                folder_claims.remove_what_was_made(data_dir, made, marker=RESTORE_IN_PROGRESS)
        raise
    target.release()
    result.seconds = round(time.monotonic() - started, 3)
    if result.missing_files:
        log.warning("the restored gallery lacks files its database names: the backup lacks them",
                    extra={"missing_files": result.missing_files, "examples": result.examples})
    if not result.secret and not settings.jwt_secret:
        log.warning("the backup holds no jwt-secret, and GALLERY_JWT_SECRET is not set: `gallery run` will make a"
                    " new one, and tokens, pre-signed URLs and drop-folder names made with the old one will fail;"
                    " set GALLERY_JWT_SECRET to the old one")
    return result


def _claim(data_dir: pathlib.Path) -> bool:
    try:
        return folder_claims.claim(data_dir, RESTORE_IN_PROGRESS, mode=0o750,
                                   refused=lambda: RestoreRefused(_in_use(data_dir)))
    except OSError as exc:
        raise RestoreRefused(f"GALLERY_DATA_DIR={data_dir}: cannot write there ({exc.strerror or exc})") from None


def _check(settings: Settings, source: pathlib.Path,
           target: _PostgresTarget | _SqliteTarget) -> tuple[Manifest, dict[str, list[str]]]:
    """The backup's manifest and the events to delete, once everything that can be known before
    writing says the restore can go ahead."""
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
    _valid(manifest)
    backend = "postgresql" if isinstance(target, _PostgresTarget) else "sqlite"
    if manifest.database != backend:
        into = ("into an empty PostgreSQL database that GALLERY_DATABASE_URL names" if manifest.database == "postgresql"
                else "into SQLite: unset GALLERY_DATABASE_URL")
        raise RestoreRefused(f"{source} is a backup of a gallery on {_NAMES[manifest.database]}: restore it {into}")
    if not target.backup_file.is_file():
        raise RestoreRefused(f"{source} lacks its database ({target.backup_file.name})")
    if manifest.secret and not (source / SECRET_FILE_NAME).is_file():
        raise RestoreRefused(f"{MANIFEST} says the backup holds its jwt-secret, and {source} lacks it")
    data_dir = settings.data_dir.resolve()
    if data_dir.is_relative_to(source.resolve()) or source.resolve().is_relative_to(data_dir):
        raise RestoreRefused(f"{source} and the data folder {settings.data_dir} overlap: restore into a folder"
                             " beside the backup")
    if settings.data_dir.exists() and not settings.data_dir.is_dir():
        raise RestoreRefused(f"GALLERY_DATA_DIR={settings.data_dir} exists and is not a folder")
    if settings.data_dir.exists() and any(settings.data_dir.iterdir()):
        raise RestoreRefused(_in_use(settings.data_dir))
    # A SQLite copy was made without them (backup.py, as of the backup's moment); a PostgreSQL dump
    # holds them, deleted here (their tombstones dated now).
    deletions = _deletions(manifest)
    if backend == "sqlite":
        deletions = {}
    target.check(settings, source)
    return manifest, deletions


def _valid(manifest: Manifest) -> None:
    """backup.json is a file anyone may have edited: what the restore reads of it must be what
    `gallery backup` writes."""
    def field_is(name: str, kind: type, ok: bool = True) -> None:
        if not isinstance(getattr(manifest, name), kind) or not ok:
            raise RestoreRefused(f"{MANIFEST}: {name} is {getattr(manifest, name)!r}, not what `gallery backup`"
                                 " writes")

    field_is("database", str, manifest.database in _NAMES)
    field_is("events", int, not isinstance(manifest.events, bool))
    field_is("secret", bool)
    field_is("snapshot", str)
    field_is("deleted_meanwhile", list)
    for entry in manifest.deleted_meanwhile:
        if not isinstance(entry, str):
            raise RestoreRefused(f"{MANIFEST}: deleted_meanwhile holds {entry!r}, not <device>/<event id>")


def _deletions(manifest: Manifest) -> dict[str, list[str]]:
    """The backup's deleted_meanwhile ("<device>/<event id>"), by device."""
    by_device: dict[str, list[str]] = collections.defaultdict(list)
    for entry in manifest.deleted_meanwhile:
        device, _, event_id = entry.partition("/")
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


def _check_room(source: pathlib.Path, data_dir: pathlib.Path, settings: Settings, *, media: bool,
                database: _PostgresTarget | _SqliteTarget | None) -> None:
    """What is copied must fit where it goes and leave the servers their headroom: a SQLite
    database (its folder may be elsewhere), and the media when copied."""
    needs: dict[int, tuple[pathlib.Path, list[int]]] = {}

    def need(folder: pathlib.Path, sizes: list[int]) -> None:
        needs.setdefault(os.stat(folder).st_dev, (folder, []))[1].extend(sizes)

    if isinstance(database, _SqliteTarget):
        need(database.path.parent, [database.backup_file.stat().st_size])
    if media:
        root = storage.media_root(source)
        for device, names in media_files(root, unreadable=_UNREADABLE):
            need(data_dir, [FOLDER, *((root / device / name).stat().st_size for name in names)])
    for folder, sizes in needs.values():
        require_room(folder, sizes, reserve=settings.min_free_bytes,
                     reserve_is="the servers' headroom (GALLERY_MIN_FREE_BYTES)")


_SQLITE_BESIDE = ("-wal", "-shm", "-journal")  # what SQLite keeps beside a database file


class _SqliteTarget:
    """The SQLite file a backup's database is copied to: checked absent first, and removed again
    when a later step fails, only if it is still the file this restore made."""

    def __init__(self, url: sa.URL, backup_file: pathlib.Path) -> None:
        self.url = url
        self.path = pathlib.Path(str(url.database))
        self.backup_file = backup_file
        self.made: tuple[int, int] | None = None  # the copy's (device, inode), once in place

    def check(self, settings: Settings, source: pathlib.Path) -> None:
        database = self.url.database
        if not database or database == ":memory:" or database.startswith("file:") or self.url.query:
            raise RestoreRefused(f"GALLERY_DATABASE_URL={self.url}: name a SQLite file (sqlite:///path/gallery.db)")
        there = [path for path in (self.path, *(pathlib.Path(f"{self.path}{s}") for s in _SQLITE_BESIDE))
                 if os.path.lexists(path)]
        if there:  # a database, or what one left (its journal would be read into the copy)
            named_by = "a new data folder" if self.path == settings.data_dir / SQLITE_FILE else "GALLERY_DATABASE_URL"
            raise RestoreRefused(f"{there[0]} is already there: restore into a database of its own ({named_by})")
        if self.path.resolve().is_relative_to(source.resolve()):
            raise RestoreRefused(f"GALLERY_DATABASE_URL names a file inside the backup {source}: name one beside it")
        if not self.path.resolve().is_relative_to(settings.data_dir.resolve()) and not self.path.parent.is_dir():
            raise RestoreRefused(f"GALLERY_DATABASE_URL: {self.path.parent} is not a folder")
        if os.path.lexists(f"{self.backup_file}-wal"):
            # Its committed pages are in that file: a copy of the database alone would lose them.
            raise RestoreRefused(f"{self.backup_file}-wal is beside the backup's database (it was opened since,"
                                 " and not closed): open and close it with sqlite3 once, then restore")

    def release(self) -> None:
        """Nothing held: for the same calls as a PostgreSQL target."""

    def restore(self) -> None:
        """The backup's file, copied under a name of its own, synced, then given its name: never
        over a file that appeared meanwhile. The backup's file is only read (opened as a
        database, it could be written to)."""
        partial = self.path.with_name(f".{self.path.name}.{secrets.token_hex(8)}")
        try:
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            with os.fdopen(fd, "wb") as out, self.backup_file.open("rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
                out.flush()
                os.fsync(out.fileno())
            os.link(partial, self.path)
            st = os.stat(partial)
            self.made = (st.st_dev, st.st_ino)
            storage.fsync_dir(self.path.parent)
        finally:
            partial.unlink(missing_ok=True)

    def undo(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return
        if self.made != (st.st_dev, st.st_ino):  # not this restore's copy: never removed
            return
        for path in (self.path, pathlib.Path(f"{self.path}-wal"), pathlib.Path(f"{self.path}-shm")):
            path.unlink(missing_ok=True)


def _check_sqlite(engine: sa.Engine) -> None:
    """A damaged database file fails the restore, rather than the servers that would start on it."""
    try:
        with engine.connect() as connection:
            problems = [row[0] for row in connection.exec_driver_sql("PRAGMA quick_check")]
    except sa.exc.DatabaseError as exc:  # too damaged to be checked: "malformed", "not a database"
        problems = [" ".join(str(exc.orig or exc).split())]
    if problems != ["ok"]:
        raise RuntimeError(f"the backup's database is damaged: {'; '.join(problems[:3])}")


class _PostgresTarget:
    """The PostgreSQL database a dump is restored into: checked empty first and held by this
    restore alone (a session advisory lock, kept to the end: a second restore into it is refused),
    restored in one transaction, and emptied again (what the restore made, nothing else) when a
    later step fails."""

    def __init__(self, database_url: str, dump: pathlib.Path) -> None:
        self.database_url = database_url
        self.backup_file = dump
        self.schemas: list[str] = []  # those the dump makes its tables in
        self.before: set[str] = set()  # their functions and sequences before the restore
        self.schemas_before: set[str] = set()
        self.restored = False
        self.engine: sa.Engine | None = None
        self.lock: sa.Connection | None = None  # holds _RESTORE_LOCK until the restore ends
        self.session_name = f"gallery-restore-{os.getpid()}-{secrets.token_hex(4)}"  # pg_restore's

    def _contents(self) -> tuple[list[str], set[str]]:
        """The schemas the dump makes its tables in (public, unless the live gallery used another),
        and the functions and sequences it makes, as "<schema>.<name>"."""
        result = stoppable.run(["pg_restore", "--list", str(self.backup_file)], dict(os.environ))
        if result.returncode != 0:
            raise RestoreRefused(f"pg_restore cannot read {self.backup_file}: {' '.join(result.stderr.split())}")
        schemas, objects = set(), set()
        for line in result.stdout.splitlines():
            # "<id>; <catalog> <oid> <KIND> <schema> <name> <owner>", where a KIND may take two
            # words: "TABLE DATA", "SEQUENCE SET", "SEQUENCE OWNED BY".
            fields = line.split()
            if line.startswith(";") or len(fields) < 7:
                continue
            kind, schema, name = fields[3], fields[4], fields[5]
            if kind == "TABLE" and schema != "DATA":
                schemas.add(schema)
            elif kind == "FUNCTION" or (kind == "SEQUENCE" and schema not in ("SET", "OWNED")):
                objects.add(f"{schema}.{name.split('(')[0]}")
        return sorted(schemas) or ["public"], objects

    def check(self, settings: Settings, source: pathlib.Path) -> None:
        """Refused unless pg_restore is there, no other restore holds the database, and it has no
        table in the dump's schemas nor any of its functions or sequences (left by a restore killed
        with kill -9); what is there is noted, so that undo() leaves it."""
        require_client("pg_restore", self.database_url, of="the dump's", refused=RestoreRefused)
        self.schemas, made_by_the_dump = self._contents()
        self.engine = db_module.create_engine(self.database_url, pool_size=2)  # the lock's, and undo's
        try:
            self.lock = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        except sa.exc.OperationalError as exc:
            self.release()
            why = " ".join(str(exc.orig or exc).split())
            advice = "; make it first (createdb)" if "does not exist" in why else ""
            raise RestoreRefused(f"cannot reach the database to restore into ({why}){advice}") from None
        connection = self.lock
        if not connection.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": _RESTORE_LOCK}).scalar_one():
            self.release()
            raise RestoreRefused("another `gallery restore` is restoring into this database")
        tables = connection.execute(
            sa.text("SELECT schemaname || '.' || tablename FROM pg_tables WHERE schemaname = ANY(:s)"),
            {"s": self.schemas}).scalars().all()
        self.before = set(connection.execute(_OBJECTS, {"s": self.schemas}).scalars())
        self.schemas_before = set(connection.execute(
            sa.text("SELECT nspname FROM pg_namespace WHERE nspname = ANY(:s)"), {"s": self.schemas}).scalars())
        there = sorted(tables) or sorted(name for name in connection.execute(
            sa.text("SELECT n.nspname || '.' || p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
                    " WHERE n.nspname = ANY(:s) UNION ALL SELECT schemaname || '.' || sequencename FROM pg_sequences"
                    " WHERE schemaname = ANY(:s)"), {"s": self.schemas}).scalars() if name in made_by_the_dump)
        if there:
            self.release()
            raise RestoreRefused(f"the database already has {'tables' if tables else 'objects the backup makes'}"
                                 f" ({', '.join(there[:5])}): a restore makes a new gallery, it never overwrites one"
                                 " (createdb a new database)")

    def restore(self) -> None:
        uri, libpq_secrets = libpq_connection(self.database_url)  # secrets in the environment only
        env = {"PGCONNECT_TIMEOUT": PG_CONNECT_TIMEOUT_SECONDS, **os.environ, **libpq_secrets,
               "PGAPPNAME": self.session_name}
        # From here on, undo() drops what is new in the dump's schemas: the database was found
        # empty of them, and this restore holds it. (Set after pg_restore, a signal between its
        # commit and this line would leave its tables.)
        self.restored = True
        # One transaction: a dump that fails half-way (a pg_restore older than the dump) leaves
        # nothing. Owners and grants are the live server's, not this one's.
        result = stoppable.run(  # ended if this is interrupted: its transaction never commits
            ["pg_restore", "--single-transaction", "--exit-on-error", "--no-owner", "--no-privileges",
             f"--dbname={uri}", str(self.backup_file)], env)
        if result.returncode != 0:
            raise RuntimeError(f"pg_restore failed: {' '.join(result.stderr.split())}")

    def undo(self) -> None:
        """Drop what the restore made: the dump's schemas' tables (it found none there), and the
        functions, sequences and schemas that were not there before it."""
        if not self.restored or self.engine is None:
            self.release()
            return
        try:
            self._end_pg_restores_session()
            with self.engine.begin() as connection:
                for schema in self.schemas:
                    if schema not in self.schemas_before:
                        connection.exec_driver_sql(f"DROP SCHEMA IF EXISTS {_quoted(connection, schema)} CASCADE")
                for (name,) in connection.execute(
                        sa.text("SELECT quote_ident(schemaname) || '.' || quote_ident(tablename) FROM pg_tables"
                                " WHERE schemaname = ANY(:s)"), {"s": self.schemas}):
                    connection.exec_driver_sql(f"DROP TABLE IF EXISTS {name} CASCADE")
                for (kind, name) in connection.execute(_OBJECTS_BY_KIND, {"s": self.schemas}):
                    if f"{kind} {name}" not in self.before:
                        connection.exec_driver_sql(f"DROP {kind} IF EXISTS {name} CASCADE")
        except Exception as exc:  # the restore's own error is the one to raise
            log.error("the restored tables could not be dropped: drop them before restoring into this database again",
                      extra={"error": " ".join(str(getattr(exc, "orig", None) or exc).split())})
        finally:
            self.release()

    def _end_pg_restores_session(self) -> None:
        """pg_restore ended (killed) is not its session ended: a COMMIT it had sent may still be
        finishing on the server, and tables committed after undo() looked would stay. So its
        session is ended first (a COMMIT under way completes or not, never later), and waited for."""
        assert self.lock is not None
        sessions = sa.text("SELECT pid FROM pg_stat_activity WHERE application_name = :name")
        deadline = time.monotonic() + 30
        while pids := self.lock.execute(sessions, {"name": self.session_name}).scalars().all():
            for pid in pids:
                self.lock.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            if time.monotonic() > deadline:
                raise RuntimeError(f"pg_restore's session (process {pids[0]} of the server) would not end")
            time.sleep(0.05)

    def release(self) -> None:
        """Let the database go: the lock's connection closed, the engine disposed."""
        if self.lock is not None:
            with contextlib.suppress(sa.exc.SQLAlchemyError):
                self.lock.close()
            self.lock = None
        if self.engine is not None:
            self.engine.dispose()
            self.engine = None


_RESTORE_LOCK = 0x67616C72  # "galr": a restore's; db.py's schema lock is "gall"
_OBJECTS_BY_KIND = sa.text(
    "SELECT 'FUNCTION', p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
    " WHERE n.nspname = ANY(:s) AND p.prokind = 'f'"
    " UNION ALL SELECT 'SEQUENCE', quote_ident(schemaname) || '.' || quote_ident(sequencename) FROM pg_sequences"
    " WHERE schemaname = ANY(:s)")
_OBJECTS = sa.text(f"SELECT kind || ' ' || name FROM ({_OBJECTS_BY_KIND.text}) AS objects(kind, name)")


def _quoted(connection: sa.Connection, name: str) -> str:
    return str(connection.execute(sa.text("SELECT quote_ident(:n)"), {"n": name}).scalar_one())


def _restore_media(source: pathlib.Path, data_dir: pathlib.Path, taker: FileTaker, result: Restored) -> None:
    """Every file of the backup's media folder into the data folder's, folders 0750."""
    backup_media, media = storage.media_root(source), storage.media_root(data_dir)
    media.mkdir(mode=0o750, exist_ok=True)
    for device, names in media_files(backup_media, unreadable=taker.unreadable):
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
    if not (secret := read_secret_file(source)):
        raise RuntimeError(f"{MANIFEST} says the backup holds its jwt-secret, and {source} lacks it")
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
    """Whether the file is there, at `size` bytes when that is known (a thumbnail's is not)."""
    try:
        found = path.stat().st_size
    except FileNotFoundError:
        return False
    return size is None or found == size
