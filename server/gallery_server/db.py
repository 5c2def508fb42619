"""Engine creation, sessions and single reads: SQLite (WAL) by default, PostgreSQL when the URL
names it. The hot single reads run on the driver's cursor (Database.read_rows)."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, SQLModel

from . import models  # (also registers the tables on SQLModel.metadata)
from .errors import CommitOutcomeUnknown, DatabaseUnavailable

log = logging.getLogger(__name__)

# pg_advisory_xact_lock key of schema creation: "gall" in ASCII.
_SCHEMA_LOCK = 0x67616C6C
# Execution option of Database.read() connections on SQLite: no BEGIN is issued for them.
_SINGLE_READ = "gallery_single_read"
# A PostgreSQL connection back in the pool for less than this is lent to Database.read_rows without
# a ping (HikariCP's "alive bypass window" is the same idea, and the same 500 ms).
TRUST_RECENT_SECONDS = 0.5
# Set while Database.read_rows checks a connection out for a read that runs again if the connection
# turns out to be lost: that checkout may skip the ping (_ping_on_checkout).
_runs_again_if_lost: contextvars.ContextVar[bool] = contextvars.ContextVar("gallery_runs_again_if_lost", default=False)
# In a pooled connection's info (emptied when the connection is replaced): time.monotonic() of its
# last checkin, and whether its current checkout skipped the ping.
_RETURNED_AT = "gallery_returned_at"
_UNPINGED = "gallery_unpinged"
# PostgreSQL's SQLSTATEs that mean "not now" rather than "not this statement" (_unavailable): the
# connection exception and insufficient resources classes, and these.
_POSTGRES_NOT_NOW = frozenset({
    "57P01", "57P02", "57P03", "57P05",  # admin/crash shutdown, cannot connect now, idle session timeout
    "40001", "40P01",  # serialization failure, deadlock detected
    "55P03",  # lock not available
})


# How long a PostgreSQL statement waits for a lock before it gives up (55P03, DATABASE_UNAVAILABLE,
# 503: try again), as SQLite gives up past its busy timeout: a session holding a table lock (a
# migration, an operator's LOCK TABLE) held every request behind it for as long, silently, and the
# server answered them OK long after Envoy had told their clients 504. A read and Envoy's one
# retry of it (a 503 is UNAVAILABLE) wait under the 50 s Envoy waits for a REST read's answer
# (envoy.yaml, idle_timeout), so that the client gets the 503 that says why, not Envoy's 504
# (tests/unit/test_envoy_config.py holds the two apart).
LOCK_TIMEOUT_MS = 20_000


def create_engine(url: str | sa.URL, *, pool_size: int = 32, trust_recent_seconds: float = TRUST_RECENT_SECONDS,
                  lock_timeout_ms: int = LOCK_TIMEOUT_MS) -> sa.Engine:
    """`url` may be a URL object: a file's path in one is never parsed (a "?" in a folder's name
    would start a query in a URL's text)."""
    if sa.make_url(url).get_backend_name() == "sqlite":
        _private_database_file(sa.make_url(url).database)
        engine = sa.create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            pool_size=pool_size,
            max_overflow=0,
        )
        _use_real_sqlite_transactions(engine)
    else:
        # LIFO: the connections in steady use are the most recently returned, so they are the ones
        # lent without a ping, and the rest of the pool idles (FIFO would cycle through all of them,
        # each idle for longer than the window below a few dozen requests per second).
        # A server that accepts the connection and never answers would hold start-up (and any
        # request needing a new connection) for ever: libpq waits without a limit by default.
        query = sa.make_url(url).query
        connect_args: dict[str, object] = {} if "connect_timeout" in query else {"connect_timeout": 10}
        # A link that drops packets rather than the connection (a network cut) left a statement
        # waiting as long as the kernel retransmits, ~15 minutes: unacknowledged data or silent
        # keepalives end it in under half a minute instead (each a libpq parameter a URL may set).
        for name, value in TCP_LIMITS.items():
            if name not in query:
                connect_args[name] = value
        if "options" not in query:  # a URL's own server options are the operator's
            connect_args["options"] = f"-c lock_timeout={lock_timeout_ms}"
        engine = sa.create_engine(
            url, pool_size=pool_size, max_overflow=0, pool_use_lifo=True, connect_args=connect_args,
        )
        _ping_on_checkout(engine, trust_recent_seconds)
    return engine


TCP_LIMITS = {
    "tcp_user_timeout": 20_000,  # ms: data sent and not acknowledged
    "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
}


def _private_database_file(path: str | None) -> None:
    """Create a new SQLite database file readable by its owner and group only, as media files are
    (0640): SQLite makes it, and its WAL and shared-memory files, with the umask's 0644, which let
    every local user read the names, metadata and checksums of every device's events."""
    if not path or path == ":memory:" or path.startswith("file:"):
        return
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640))
    except (FileExistsError, FileNotFoundError):  # an existing database keeps its mode
        pass


def _ping_on_checkout(engine: sa.Engine, trust_recent_seconds: float) -> None:
    """SQLAlchemy's pool_pre_ping (a connection the database ended, say by a restart, is replaced
    before it fails a request; one found so invalidates the whole pool), except for a checkout by
    Database.read_rows of a connection returned less than `trust_recent_seconds` ago.

    That ping is a round trip per checkout: in process, ~60 of ~150 µs of the server's CPU and
    ~100 of ~230 µs of wall time per stats read (2026-11-29). A connection in steady use is almost
    never lost between two requests, and a read_rows that finds its unpinged connection lost runs
    again on a pinged one. Sessions, which may write, and read(), keep the ping: their work is not
    run again."""

    @sa.event.listens_for(engine, "checkin")
    def _returned(_dbapi_connection, record):  # type: ignore[no-untyped-def]
        record.info[_RETURNED_AT] = time.monotonic()

    @sa.event.listens_for(engine, "checkout")
    def _ping(dbapi_connection, record, _proxy):  # type: ignore[no-untyped-def]
        record.info.pop(_UNPINGED, None)
        returned = record.info.get(_RETURNED_AT)
        if returned is None:
            return  # connected for this checkout (the info is emptied when a connection is replaced)
        if _runs_again_if_lost.get() and time.monotonic() - returned < trust_recent_seconds:
            record.info[_UNPINGED] = True
            return
        dialect = engine.dialect
        try:
            dialect.do_ping(dbapi_connection)
        except dialect.loaded_dbapi.Error as exc:
            if not dialect.is_disconnect(exc, dbapi_connection, None):
                raise
            # As pool_pre_ping: the others were most likely ended with it.
            raise sa.exc.InvalidatePoolError(f"the database ended a pooled connection: {exc}") from exc


def _use_real_sqlite_transactions(engine: sa.Engine) -> None:
    # Python's sqlite3 module starts transactions lazily and never for SELECT, so SQLAlchemy's
    # transaction boundaries would not hold. Take over BEGIN ourselves (SQLAlchemy's documented
    # pysqlite recipe). Writes issue their write statement first, so a deferred BEGIN is enough.
    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):  # type: ignore[no-untyped-def]
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed upload survives power loss, not only a process crash.
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(connection):  # type: ignore[no-untyped-def]
        options = connection.get_execution_options()
        if options.get(_SINGLE_READ, False):
            return  # Database.read(): one SELECT, in SQLite's own autocommit
        # A unit that reads before it writes and may race another writer (schema creation) asks
        # for the write lock up front: a deferred BEGIN's read lock cannot be upgraded under
        # contention ("database is locked" at once, whatever the busy timeout).
        immediate = options.get("sqlite_immediate", False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


class Database:
    """Owns the engine; hands out one session per unit of work (one per RPC, never shared)."""

    def __init__(self, url: str, *, pool_size: int = 32, trust_recent_seconds: float = TRUST_RECENT_SECONDS,
                 lock_timeout_ms: int = LOCK_TIMEOUT_MS) -> None:
        self.engine = create_engine(url, pool_size=pool_size, trust_recent_seconds=trust_recent_seconds,
                                    lock_timeout_ms=lock_timeout_ms)
        self._single_read: dict[str, object] = (
            {_SINGLE_READ: True} if self.engine.dialect.name == "sqlite"
            else {"isolation_level": "AUTOCOMMIT"}
        )

    def create_tables(self) -> None:
        create_tables(self.engine)

    def holds_a_gallery(self) -> bool:
        """Whether the database has a gallery's tables (its events): a tool that acts on one
        must not take an empty database, where a mistyped URL points, for a gallery of nothing."""
        with self.engine.connect() as connection:
            return sa.inspect(connection).has_table(models.Event.__tablename__)

    @contextlib.contextmanager
    def read(self) -> Iterator[sa.Connection]:
        """A connection for read-only statements, each run outside an explicit transaction.

        A single SELECT reads one consistent snapshot on its own on both databases, so the
        BEGIN and ROLLBACK around it were pure cost: on the hot listing and stats paths they
        took about as long as the query (SQLite: two more statements through SQLAlchemy;
        PostgreSQL: two more round trips). Several statements here each see their own snapshot
        (Gallery.stored_media_found's batches, which need not agree); statements that must
        agree need session()."""
        with _unavailable_as_error(), self.engine.connect() as connection:
            yield connection.execution_options(**self._single_read)

    def ping(self) -> None:
        """One round trip; DatabaseUnavailable when the database cannot be reached."""
        with self.read() as connection:
            connection.execute(sa.text("SELECT 1"))

    def count_at_most(self, rows: sa.Select[Any], limit: int) -> int:
        """How many rows `rows` selects, counting no further than `limit` (a cap's check reads
        no more than the cap)."""
        counted = sa.select(sa.func.count()).select_from(rows.limit(limit).subquery())
        with self.read() as connection:
            return int(connection.execute(counted).scalar_one())

    def read_rows(self, statement: sa.Select[Any], parameters: Mapping[str, Any]) -> Sequence[tuple[Any, ...]]:
        """The rows of ONE read-only select, as read() runs it, as tuples.

        They come straight from the driver's cursor, the select compiled once (_driver_select):
        SQLAlchemy's execution around a lookup of one index row cost several times the query
        itself, with the GIL held, which the other read threads wait for. On SQLite (the stats
        select: ~55 against ~12 µs) GetStats through Envoy with 16 clients answered ~25 – 45% more
        requests per second without it. On PostgreSQL, in process on one thread (medians of 5
        interleaved rounds, 2026-11-29), the server's CPU per stats read went from ~435 to ~265 µs
        and per listing page from ~1,700 to ~1,220 µs.
        Its errors are then the driver's own (sqlite3.Error or psycopg.Error, not wrapped by
        SQLAlchemy), but for those that say the database is unavailable (_unavailable), which are
        DatabaseUnavailable as from session() and read(): callers of these reads catch none.

        On PostgreSQL a connection returned to the pool moments ago is lent without a ping
        (_ping_on_checkout), so if it turns out to be lost (the database restarted, or ended it)
        the select runs once more, on a connection pinged first: the caller sees an error only
        if that one fails too. A select whose pinged connection is lost is not run again (an
        administrator may have ended it for a reason)."""
        select = _driver_select(statement, self.engine.dialect)
        with _unavailable_as_error():
            if self.engine.dialect.name != "postgresql":
                connection = self.engine.raw_connection()
                try:
                    return _run(connection, select, parameters)
                finally:
                    connection.close()
            try:
                return self._read_postgres(select, parameters, runs_again_if_lost=True)
            except _ConnectionLost:
                log.warning("a pooled PostgreSQL connection was found lost; the read runs again")
                return self._read_postgres(select, parameters, runs_again_if_lost=False)

    def _read_postgres(
        self, select: _DriverSelect, parameters: Mapping[str, Any], *, runs_again_if_lost: bool
    ) -> list[tuple[Any, ...]]:
        checking_out = _runs_again_if_lost.set(runs_again_if_lost)
        try:
            connection = self.engine.raw_connection()
        finally:
            _runs_again_if_lost.reset(checking_out)
        driver = connection.dbapi_connection
        unpinged = connection.info.get(_UNPINGED, False)
        try:
            # Outside a transaction, as read(): the connection is switched for the one select (no
            # round trip) and back before the pool lends it again, unless it was lost or left busy
            # meanwhile (a select cut short): then the pool drops it.
            driver.autocommit = True  # type: ignore[union-attr]
            return _run(connection, select, parameters)
        except self.engine.dialect.loaded_dbapi.Error as exc:
            if unpinged and driver.closed:  # type: ignore[union-attr]
                raise _ConnectionLost from exc
            raise
        finally:
            try:
                if _postgres_idle(driver):
                    driver.autocommit = False  # type: ignore[union-attr]
                else:
                    connection.invalidate()
            finally:
                connection.close()

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        with _unavailable_as_error(), Session(self.engine, expire_on_commit=False) as session:
            yield session

    @staticmethod
    def commit(session: Session) -> None:
        """Commit the session's work, telling the caller when its outcome is unknown.

        Every statement runs first (a flush): an error up to there wrote nothing, and so does a
        COMMIT the database refuses (DatabaseUnavailable, or the error itself). If the connection
        goes while the COMMIT is under way (CommitOutcomeUnknown), the work may or may not have
        been written, so a caller that has put files in place for it keeps them
        (a file without its row is what reconciliation removes; a row without its file would be
        an event that cannot be read)."""
        session.flush()
        try:
            session.commit()
        except Exception as exc:
            if not _unavailable(exc):
                raise
            availability.failed(exc)
            # A database that refused the COMMIT itself (a deadlock, SQLite busy) wrote nothing.
            raise (CommitOutcomeUnknown() if _connection_gone(exc) else DatabaseUnavailable()) from exc

    def dispose(self) -> None:
        self.engine.dispose()


_SQLITE_NOT_NOW = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_FULL)


def _unavailable(exc: BaseException) -> bool:
    """Whether `exc` means the database could not do the work now, so that the same request may
    succeed later: PostgreSQL could not be reached (whatever it answered while connecting) or
    dropped the connection, or said "not now" (_POSTGRES_NOT_NOW, the 08 and 53 classes, disk full
    included); SQLite stayed busy or locked past the busy timeout, or found its disk full (a
    DELETE, the way to free space, was a 500); or no pooled connection came free in time. An
    error of the statement itself (a timeout, a limit, a constraint, a missing table) is not:
    the same statement would fail again."""
    if isinstance(exc, sa.exc.TimeoutError):
        return True
    if isinstance(exc, sa.exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        exc = exc.orig
    psycopg = sys.modules.get("psycopg")  # not loaded: no error of its can exist (_postgres_idle)
    if psycopg is not None and isinstance(exc, psycopg.OperationalError):
        state = exc.sqlstate  # None: psycopg's own, while connecting or with the connection gone
        return state is None or state[:2] in ("08", "53") or state in _POSTGRES_NOT_NOW
    if isinstance(exc, sqlite3.OperationalError):
        code = getattr(exc, "sqlite_errorcode", None)  # absent from the module's own errors
        return code is not None and (code & 0xFF) in _SQLITE_NOT_NOW  # primary code
    return False


def _unreachable(exc: BaseException) -> bool:
    """Whether `exc` (an _unavailable one) says the database could not be reached at all: the
    connection failed or was lost, the server is shutting down (_connection_gone), or it has no
    connection left to give. The rest (a deadlock, a lock or pool timeout, a full disk, SQLite
    busy) are answers of a database that is there."""
    if _connection_gone(exc):
        return True
    driver = exc.orig if isinstance(exc, sa.exc.DBAPIError) else exc
    return getattr(driver, "sqlstate", None) == "53300"  # too_many_connections


def dropped(exc: BaseException) -> bool:
    """Whether `exc` says PostgreSQL ended a connection it had (an operator's pg_terminate_backend,
    a restart or failover; 57P: shutdowns, "cannot connect now"; over TLS too), or refused one while
    it was down, starting or stopping: worth trying again. Not a database that does not answer: that
    stops a server in libpq's connect_timeout, as README says."""
    driver = exc.orig if isinstance(exc, sa.exc.DBAPIError) else exc
    if (getattr(driver, "sqlstate", None) or "").startswith("57P"):
        return True
    said = str(driver)
    return any(words in said for words in (
        "server closed the connection unexpectedly", "terminating connection", "the database system is",
        "Connection refused", "SSL SYSCALL error", "SSL connection has been closed", "the connection is closed",
    ))


def _from_database(exc: BaseException) -> bool:
    """Whether `exc` is an error the database (or its driver) answered with."""
    psycopg = sys.modules.get("psycopg")
    return isinstance(exc, (sa.exc.DBAPIError, sqlite3.Error)) or (
        psycopg is not None and isinstance(exc, psycopg.Error))


def _connection_gone(exc: BaseException) -> bool:
    """Whether `exc` (an _unavailable one) says the connection itself went, so that the server
    cannot know what the database did with its last statement: psycopg's own errors, the
    connection exception class and the shutdowns."""
    if isinstance(exc, sa.exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        exc = exc.orig
    psycopg = sys.modules.get("psycopg")
    if psycopg is None or not isinstance(exc, psycopg.Error):
        return False
    state = exc.sqlstate
    return state is None or state.startswith(("08", "57P"))


def create_tables(engine: sa.Engine) -> None:
    """Create what is missing, and bring what is there to this version's schema. Processes
    starting together take turns (SQLite: the write lock from the start; PostgreSQL: an advisory
    lock for the transaction): two concurrent CREATE TABLEs of one name fail."""
    with engine.connect() as connection:
        connection.execution_options(sqlite_immediate=True)
        with connection.begin():
            if connection.dialect.name == "postgresql":
                # A replica waits its turn however long the one before it takes (a backfill of
                # millions of events), and so do the DDL's own locks behind live traffic.
                connection.exec_driver_sql("SET LOCAL lock_timeout = 0")
                connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_SCHEMA_LOCK})")
            _add_missing_columns(connection)
            SQLModel.metadata.create_all(connection)
            # create_all makes a table's indexes only with the table: an index added to an
            # existing table's model is made here.
            for table in SQLModel.metadata.sorted_tables:
                for index in table.indexes:
                    index.create(connection, checkfirst=True)


def _add_missing_columns(connection: sa.Connection) -> None:
    """A column added to an existing table's model (events.received_at) is added to the table of a
    database made by an earlier version: ADD COLUMN of a nullable column without a server default,
    which both databases do without rewriting the table. Its rows from before hold NULL, which
    every reader of such a column must take (the one reason a new column may not be required)."""
    inspector = sa.inspect(connection)
    for table in SQLModel.metadata.sorted_tables:
        if not inspector.has_table(table.name):
            continue  # create_all makes it whole
        present = {column["name"] for column in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            if not column.nullable or column.server_default is not None or column.primary_key:
                raise RuntimeError(f"{table.name}.{column.name}: a column added to an existing table must be"
                                   " nullable, without a server default")
            spec = sa.schema.CreateColumn(column).compile(dialect=connection.dialect)
            connection.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN {spec}")
            log.info("column added", extra={"table": table.name, "column": column.name})


class _Throttle:
    """At most one line per `seconds` about one kind of trouble, with how often it happened since
    the last line: an outage under load, or a background loop's retries, made several a second."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._lock = threading.Lock()
        self._last = -float("inf")
        self._since = 0

    def due(self) -> int | None:
        """Count one more; None while the last line is recent, else how many since it (this one
        included), and the next line is `seconds` away."""
        with self._lock:
            self._since += 1
            now = time.monotonic()
            if now - self._last < self.seconds:
                return None
            self._last, count, self._since = now, self._since, 0
            return count


def _words(exc: BaseException) -> str:
    """The driver's words (host, port and user at most, never a password), not SQLAlchemy's,
    which would add the statement's parameters: names and metadata that users sent."""
    if isinstance(exc, sa.exc.DBAPIError) and exc.orig is not None:
        exc = exc.orig
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}"


class Availability:
    """Whether this process can reach the database, as its requests found it, for the log (the
    gallery_database_up metric follows the readiness probe instead): an outage is one ERROR, then
    at most one a minute with the count of failures meanwhile, and one WARNING when the database
    answers again (after a line said it was down). Only failures to reach it count (unreachable,
    connection lost, shutting down, out of connections): a deadlock, a lock or pool timeout or a
    full disk are answers of a database that is there, each a 503 too (_unavailable), told by
    `strained`, once a minute, as WARNINGs."""

    REPEAT_SECONDS = 60.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.down_since: float | None = None  # time.monotonic() of the outage's first failure
        self._failures = 0  # in this outage
        self._said_down = False
        # Kept across outages: one that comes back within the minute is no new ERROR line.
        self._down = _Throttle(self.REPEAT_SECONDS)
        self._strained = _Throttle(self.REPEAT_SECONDS)

    @property
    def up(self) -> bool:
        return self.down_since is None

    def failed(self, exc: BaseException) -> None:
        """A request found the database unavailable (_unavailable): an outage, or a strain."""
        if not _unreachable(exc):
            if (count := self._strained.due()) is not None:
                log.warning("database could not do the work now: %s", _words(exc), extra={"occurrences": count})
            return
        with self._lock:
            now = time.monotonic()
            if self.down_since is None:
                self.down_since = now
            self._failures += 1
            down_for = now - self.down_since
            count = self._down.due()
            if count is not None:
                self._said_down = True
        if count is not None:
            log.error("database unavailable: %s", _words(exc),
                      extra={"failures": count, "unavailable_seconds": round(down_for, 1)})

    def answered(self) -> None:
        if self.down_since is None:  # the usual case: no lock taken
            return
        with self._lock:
            if self.down_since is None:
                return
            down_for, failures, said = time.monotonic() - self.down_since, self._failures, self._said_down
            self.down_since, self._failures, self._said_down = None, 0, False
        if said:
            log.warning("database available again",
                        extra={"unavailable_seconds": round(down_for, 1), "failures": failures})


# One per process: every engine of it reaches the same database.
availability = Availability()


@contextlib.contextmanager
def _unavailable_as_error() -> Iterator[None]:
    try:
        yield
    except (DatabaseUnavailable, CommitOutcomeUnknown):
        raise  # told where it was raised (a commit, or a read nested in a session)
    except Exception as exc:
        if _unavailable(exc):
            availability.failed(exc)
            raise DatabaseUnavailable() from exc
        if _from_database(exc):  # an error of the statement: the database answered
            availability.answered()
        raise
    availability.answered()


class _ConnectionLost(Exception):
    """A read_rows connection lent without a ping was found ended (the database restarted, or
    ended it): the read runs again, on a connection pinged first."""


def _run(connection: Any, select: _DriverSelect, parameters: Mapping[str, Any]) -> list[tuple[Any, ...]]:
    cursor = connection.cursor()
    try:
        cursor.execute(select.sql, select.arguments(parameters))
        return select.rows(cursor.fetchall())
    finally:
        cursor.close()


def _postgres_idle(driver: Any) -> bool:
    """Whether a psycopg connection is open with nothing under way (libpq's status).

    psycopg is imported here, where a PostgreSQL connection already loaded it, and not with this
    module: it is ~9 MiB of a server's memory that a SQLite deployment never uses."""
    from psycopg.pq import TransactionStatus

    return not driver.closed and driver.info.transaction_status == TransactionStatus.IDLE


@dataclasses.dataclass(frozen=True)
class _DriverSelect:
    """A select compiled for a DB-API driver, with what SQLAlchemy would do around each execution
    done by the same public type hooks: its parameters as the SQL's placeholders take them
    (positional for SQLite's `?`, by name for psycopg's `%(name)s`), the values the statement
    fixes itself (`count > 0`), each parameter's bind conversion (a datetime to SQLite's stored
    text) and each column's result conversion."""

    sql: str
    names: tuple[str, ...]
    placeholders: tuple[str, ...] | None  # the SQL's name of each parameter; None: positional
    fixed: Mapping[str, Any]
    to_driver: Mapping[str, Callable[[Any], Any]]
    from_driver: tuple[Callable[[Any], Any] | None, ...]

    def arguments(self, parameters: Mapping[str, Any]) -> tuple[Any, ...] | dict[str, Any]:
        values = []
        for name in self.names:
            value = parameters[name] if name in parameters else self.fixed[name]
            convert = self.to_driver.get(name)
            values.append(value if convert is None else convert(value))  # None too, as SQLAlchemy
        if self.placeholders is None:
            return tuple(values)
        return dict(zip(self.placeholders, values, strict=True))

    @functools.cached_property
    def _converted(self) -> tuple[tuple[int, Callable[[Any], Any]], ...]:
        return tuple((i, convert) for i, convert in enumerate(self.from_driver) if convert is not None)

    def rows(self, fetched: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        if not self._converted:
            return fetched
        # Only the columns that have a conversion are touched (PostgreSQL: `created` alone).
        rows = []
        for fetched_row in fetched:
            row = list(fetched_row)
            for i, convert in self._converted:
                row[i] = convert(row[i])
            rows.append(tuple(row))
        return rows


@functools.lru_cache(maxsize=256)  # the hot reads' selects are built once (service.py)
def _driver_select(statement: sa.Select[Any], dialect: sa.Dialect) -> _DriverSelect:
    compiled = statement.compile(dialect=dialect)
    binds = compiled.binds  # by the names in the SQL, anonymous ones ("count_1") included
    if dialect.positional:
        names, placeholders = tuple(compiled.positiontup or ()), None
    elif dialect.paramstyle in ("pyformat", "named"):
        names = tuple(binds)
        placeholders = tuple(compiled.escaped_bind_names.get(name, name) for name in names)
    else:
        names, placeholders = (), None
    if (
        (not dialect.positional and placeholders is None)
        or compiled.literal_execute_params or compiled.post_compile_params  # rendered per execution
        or any(bind.expanding or bind.callable is not None for bind in binds.values())
    ):
        raise ValueError(
            "only positional or named parameters with values known before execution (no IN-list "
            "expansion, no value rendered into the SQL, no callable value) are supported"
        )
    to_driver = {}
    for name in names:
        convert = binds[name].type.dialect_impl(dialect).bind_processor(dialect)
        if convert is not None:
            to_driver[name] = convert
    return _DriverSelect(
        sql=compiled.string,
        names=names,
        placeholders=placeholders,
        fixed={name: binds[name].effective_value for name in names if not binds[name].required},
        to_driver=to_driver,
        from_driver=tuple(
            column.type.dialect_impl(dialect).result_processor(dialect, None)
            for column in statement.selected_columns
        ),
    )
