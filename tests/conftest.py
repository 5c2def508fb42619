"""Shared fixtures: settings on a temporary data root, tokens, and databases (SQLite and PostgreSQL).

PostgreSQL tests use GALLERY_TEST_POSTGRES_URL (the Makefile points it at the machine's local
server); each test session creates its own throw-away database there and drops it afterwards.
When the variable is unset the PostgreSQL variants are skipped, so `make test` never skips them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import secrets
import subprocess
import threading
import time
import traceback
import types
import uuid
import weakref
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import psycopg
import pytest
import sqlalchemy as sa
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from sqlmodel import SQLModel

from gallery_server import auth, incoming
from gallery_server.db import Database
from gallery_server.media_types import OCTET_STREAM, SNIFF_BYTES, detect_mime
from gallery_server.service import Gallery
from gallery_server.settings import Settings
from gallery_server.signed_urls import SignedUploads
from gallery_server.storage import Storage

JWT_SECRET = "test-secret-" + "x" * 40


# Run one after another in one pytest worker (`make test` runs three: pytest_xdist_make_scheduler):
# their disk writes and CPU at once would slow each other's commits past the crash test's
# one-second reconciler grace.
HEAVY_MODULES = frozenset({
    "tests/e2e/test_crash.py", "tests/e2e/test_load.py", "tests/e2e/test_bench_quick.py",
    "tests/e2e/test_large_upload.py",
})


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # before xdist's own choice
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """With --dist loadfile, a module's tests share a worker (and its module-scoped stacks), and the
    HEAVY_MODULES share one."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModulesAndHeavy(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "heavy" if module in HEAVY_MODULES else module

    return ModulesAndHeavy(config, log)


READ_WRITE = f"{auth.READ} {auth.WRITE}"


_WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE")


@pytest.fixture(autouse=True)
def logging_left_as_found() -> Iterator[None]:
    """The root logger as each test found it. `gallery reconcile` and `gallery agent` run in
    process (cli.main) set it up for the process: a handler on the stream pytest captured for that
    test, closed once it ends, made every later line of that worker a "--- Logging error ---",
    printed to the real stderr by threads still logging when the worker's output was closed."""
    root = logging.getLogger()
    handlers, level, srcfile = root.handlers[:], root.level, logging._srcfile  # type: ignore[attr-defined]
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging._srcfile = srcfile  # type: ignore[attr-defined]


@pytest.fixture(autouse=True)
def sqlite_transactions_write_first() -> Iterator[None]:
    """db.py's rule for SQLite, checked in every test that runs the server's code in process (an
    end-to-end server is a process of its own): a server transaction that writes issues a
    write first (or began IMMEDIATE). One that read first cannot write once another connection
    has written meanwhile: SQLite refuses it at once ("database is locked", whatever the busy
    timeout), which the server answers 503. Tests' own transactions are not held to it."""
    started: dict[int, str] = {}  # connection -> "fresh", "read" or "done" (no longer watched)
    found: list[str] = []
    lock = threading.Lock()

    def begin(connection: sa.Connection) -> None:
        if connection.dialect.name == "sqlite":
            options = connection.get_execution_options()
            watched = not (options.get("sqlite_immediate") or options.get("gallery_single_read"))
            with lock:
                started[id(connection.connection.dbapi_connection)] = "fresh" if watched else "done"

    def execute(connection: sa.Connection, cursor: object, statement: str, *_: object) -> None:
        if connection.dialect.name != "sqlite":
            return
        key = id(connection.connection.dbapi_connection)
        verb = statement.lstrip()[:7].upper()
        with lock:
            state = started.get(key, "done")
            if state == "fresh" and not verb.startswith(("BEGIN", "PRAGMA", "SAVEPOI")):
                started[key] = "read" if verb.startswith("SELECT") else "done"
            elif state == "read" and verb.startswith(_WRITES):
                started[key] = "done"
                server = [f for f in traceback.extract_stack() if "gallery_server" in f.filename]
                if server:
                    found.append(" <- ".join(f"{f.name} ({pathlib.Path(f.filename).name}:{f.lineno})"
                                             for f in reversed(server[-3:])))

    def end(connection: sa.Connection) -> None:
        with lock:
            started.pop(id(connection.connection.dbapi_connection), None)

    listeners = [("begin", begin), ("before_cursor_execute", execute), ("commit", end), ("rollback", end)]
    for name, listener in listeners:
        sa.event.listen(sa.Engine, name, listener)
    try:
        yield
    finally:
        for name, listener in listeners:
            sa.event.remove(sa.Engine, name, listener)
    assert not found, f"SQLite transactions that read before writing: {found}"


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """A throw-away PostgreSQL database for the worker's session; tests get it as postgres_url."""
    base = os.environ.get("GALLERY_TEST_POSTGRES_URL")
    if not base:
        pytest.skip("GALLERY_TEST_POSTGRES_URL is not set")
    url = sa.make_url(base)
    name = f"gallery_test_{uuid.uuid4().hex[:12]}"
    admin = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def drop_tables(url: str) -> None:
    """Empty the worker's PostgreSQL database of what earlier tests left: a server on a data
    folder of its own would find none of their stored media, and report NOT_SERVING
    (rpc/readiness.py); a reconciliation test counted another test's events."""
    engine = sa.create_engine(url)
    try:
        SQLModel.metadata.drop_all(engine)
    finally:
        engine.dispose()


@pytest.fixture
def postgres_url(postgres_database: str) -> Iterator[str]:
    """The worker's PostgreSQL database, with empty tables from the test's start to its end."""
    drop_tables(postgres_database)
    try:
        yield postgres_database
    finally:
        drop_tables(postgres_database)


@pytest.fixture
def closed_database(postgres_url: str) -> Iterator[tuple[Database, contextlib.AbstractContextManager[None]]]:
    """A Database on a PostgreSQL database of its own, and a context in which that database
    refuses every connection and has ended those it had (as while PostgreSQL restarts)."""
    url = sa.make_url(postgres_url)
    name = f"gallery_closed_{uuid.uuid4().hex[:12]}"
    admin_url = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        db = Database(url.set(database=name).render_as_string(hide_password=False), pool_size=2)

        @contextlib.contextmanager
        def closed() -> Iterator[None]:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            try:
                yield
            finally:
                admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')

        try:
            db.create_tables()
            yield db, closed()
        finally:
            db.dispose()
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> Iterator[str]:
    """Every test using this runs once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'gallery.db'}"
        return
    yield request.getfixturevalue("postgres_url")  # empty tables (postgres_url)


@contextlib.contextmanager
def small_disk(path: pathlib.Path, size: str, inodes: int | None = None) -> Iterator[pathlib.Path]:
    """A tmpfs of `size` (mount syntax: "64m"), and of at most `inodes` files and folders if given,
    mounted at `path`, whose free space only the test changes; the test is skipped where mounting
    needs root."""
    path.mkdir()
    options = f"size={size},mode=0755" + (f",nr_inodes={inodes}" if inodes else "")
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                                 capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("cannot mount a tmpfs here: no mount command")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)])  # lazily: never hides the test's own failure


@contextlib.contextmanager
def statements_run(db: Database) -> Iterator[list[str]]:
    """The SQL statements the database runs meanwhile, whoever sends them (Database.read_rows skips
    SQLAlchemy's execution): on each connection taken from the pool, SQLite's trace, or psycopg
    cursors that note what they execute."""
    statements: list[str] = []
    if db.engine.dialect.name == "sqlite":
        listeners = {
            "checkout": lambda connection, *_: connection.set_trace_callback(statements.append),
            "checkin": lambda connection, *_: connection.set_trace_callback(None),
        }
    else:
        class Noting(psycopg.Cursor):  # type: ignore[type-arg]
            def execute(self, query, *args, **kwargs):  # type: ignore[no-untyped-def]
                statements.append(str(query))
                return super().execute(query, *args, **kwargs)

            def executemany(self, query, *args, **kwargs):  # type: ignore[no-untyped-def]
                statements.append(str(query))
                return super().executemany(query, *args, **kwargs)

        listeners = {
            "checkout": lambda connection, *_: setattr(connection, "cursor_factory", Noting),
            "checkin": lambda connection, *_: setattr(connection, "cursor_factory", psycopg.Cursor),
        }
    for event, listener in listeners.items():
        sa.event.listen(db.engine, event, listener)
    try:
        yield statements
    finally:
        for event, listener in listeners.items():
            sa.event.remove(db.engine, event, listener)


def make_settings(data_dir: pathlib.Path, database_url: str = "", **overrides: object) -> Settings:
    return Settings(
        data_dir=data_dir,
        database_url=database_url or f"sqlite:///{data_dir / 'gallery.db'}",
        jwt_secret=JWT_SECRET,
        **overrides,  # type: ignore[arg-type]
    )


@pytest.fixture
def settings(tmp_path: pathlib.Path, database_url: str) -> Settings:
    data = tmp_path / "data"
    data.mkdir()
    return make_settings(data, database_url)


@pytest.fixture
def gallery(settings: Settings) -> Iterator[Gallery]:
    db = Database(settings.database_url, pool_size=4)
    db.create_tables()
    yield Gallery(settings, db, Storage(settings.data_dir))
    db.dispose()


@pytest.fixture
def grpc_port(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """An in-process gRPC server (create_server on port 0) for this test; yields its port."""
    from gallery_server.rpc import server as server_module

    databases: list[Database] = []

    class TrackedDatabase(Database):  # so that teardown can close the server's pool
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            databases.append(self)

    executors: list[futures.ThreadPoolExecutor] = []

    def tracked_executor(*args: Any, **kwargs: Any) -> futures.ThreadPoolExecutor:
        executors.append(executor := futures.ThreadPoolExecutor(*args, **kwargs))
        return executor

    monkeypatch.setattr(server_module, "Database", TrackedDatabase)
    monkeypatch.setattr(server_module, "futures", types.SimpleNamespace(ThreadPoolExecutor=tracked_executor))
    server, port, _ = server_module.create_server(settings, "127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(None).wait()
        # A handler whose RPC was cancelled or timed out may still be finishing in its thread
        # (a device channel notices at its next poll): let it end, handing its connection back
        # before the pool is closed and logging before this test's output is closed.
        deadline = time.monotonic() + 10
        for executor in executors:
            executor.shutdown(wait=False, cancel_futures=True)
            for thread in list(executor._threads):  # type: ignore[attr-defined]
                thread.join(timeout=max(0.0, deadline - time.monotonic()))
        while any(d.engine.pool.checkedout() for d in databases) and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.05)
        for database in databases:
            database.dispose()


@pytest.fixture
def signed(gallery: Gallery) -> SignedUploads:
    return SignedUploads(gallery)


@pytest.fixture
def principal() -> auth.Principal:
    return auth.Principal("tester", frozenset({"*"}), frozenset({auth.READ, auth.WRITE}))


@pytest.fixture
def mint() -> Callable[..., str]:
    """mint(devices=["cam1"], scope="gallery:read", ttl=60, secret=...) -> a bearer token."""

    def _mint(
        devices: list[str] | None = None,
        scope: str = READ_WRITE,
        ttl: int = 3600,
        secret: str = JWT_SECRET,
        sub: str = "tester",
    ) -> str:
        return auth.mint(secret, subject=sub, devices=devices or ["*"], scope=scope,
                         ttl_seconds=ttl)

    return _mint


@contextlib.contextmanager
def event_commit_fails(db: Database, *, sqlstate: str | None = None) -> Iterator[None]:
    """On PostgreSQL, the COMMIT of a transaction that inserts or changes an event fails in the
    database (a deferred trigger): with no `sqlstate` its backend ends itself during the COMMIT,
    so the COMMIT's outcome is unknown to the server; with one, the COMMIT raises that error
    (the connection stays, nothing is written)."""
    action = (
        "PERFORM pg_terminate_backend(pg_backend_pid())" if sqlstate is None
        else f"RAISE EXCEPTION 'refused by the test' USING ERRCODE = '{sqlstate}'"
    )
    with db.engine.begin() as connection:
        connection.exec_driver_sql(
            "CREATE FUNCTION test_end_backend() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN {action}; RETURN NULL; END $$"
        )
        connection.exec_driver_sql(
            "CREATE CONSTRAINT TRIGGER test_end_backend AFTER INSERT OR UPDATE ON events DEFERRABLE INITIALLY DEFERRED"
            " FOR EACH ROW EXECUTE FUNCTION test_end_backend()"
        )
    try:
        yield
    finally:
        with db.engine.begin() as connection:
            connection.exec_driver_sql("DROP TRIGGER test_end_backend ON events")
            connection.exec_driver_sql("DROP FUNCTION test_end_backend()")


@contextlib.contextmanager
def failing_event_commit(error: Exception) -> Iterator[None]:
    """The COMMIT of every transaction that inserted an event raises `error` (wrapped as SQLAlchemy
    wraps a driver's), its statements having run: a COMMIT the database refused."""
    from sqlmodel import Session

    from gallery_server.models import Event

    inserted: weakref.WeakSet[Session] = weakref.WeakSet()

    def on_insert(session: Session, instance: object) -> None:
        if isinstance(instance, Event):
            inserted.add(session)

    real = Session.commit

    def commit(self: Session) -> None:
        if self in inserted or any(isinstance(obj, Event) for obj in self.new):
            inserted.discard(self)
            raise sa.exc.OperationalError("COMMIT", {}, error)
        real(self)

    sa.event.listen(Session, "pending_to_persistent", on_insert)
    Session.commit = commit  # type: ignore[method-assign]
    try:
        yield
    finally:
        Session.commit = real  # type: ignore[method-assign]
        sa.event.remove(Session, "pending_to_persistent", on_insert)


def new_device(prefix: str = "cam") -> str:
    """A device id no other test has: tests share a stack, its database and its limits per device."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def wait_until(condition: Callable[[], bool], seconds: float = 5.0) -> bool:
    """Whether `condition` came true within `seconds` (polled; for what no event signals)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def random_bytes(n: int) -> bytes:
    """Random bytes that content sniffing takes for no known type: about one random head in
    a thousand looks like an MP3 frame, and would make "other" media audio."""
    while True:
        data = secrets.token_bytes(n)
        if detect_mime("", data[:SNIFF_BYTES]) == OCTET_STREAM:
            return data


Violation = error_details_pb2.BadRequest.FieldViolation


def rich_error(error: grpc.RpcError) -> tuple[error_details_pb2.ErrorInfo, list[Violation]]:
    """The one ErrorInfo (domain `gallery`) and the BadRequest violations of a failed call."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, f"no google.rpc.Status in the trailers: {error}"
    assert status.code == error.code().value[0]
    assert status.message == error.details()
    infos, violations = [], []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend(bad.field_violations)
    assert len(infos) == 1, status
    assert infos[0].domain == "gallery"
    return infos[0], violations


def stored_files(data_dir: pathlib.Path) -> list[pathlib.Path]:
    """Every file in the managed store and in staging: what an upload may leave behind (not the
    incoming folders' lock files, one per device, kept: incoming.py)."""
    locks = data_dir / "staging" / incoming.LOCKS_FOLDER
    return sorted(
        p for root in ("media", "staging") for p in (data_dir / root).rglob("*")
        if p.is_file() and p.parent != locks
    )


