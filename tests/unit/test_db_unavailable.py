"""A database that cannot do the work now is DatabaseUnavailable (UNAVAILABLE, HTTP 503: try again
later), from every way the domain reaches it (read_rows, read, session), with the driver's error as
its cause; any other database error stays what it was."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time

import psycopg
import pytest
import sqlalchemy as sa

from gallery_server import db as db_module
from gallery_server import service
from gallery_server.db import Database
from gallery_server.errors import CommitOutcomeUnknown, DatabaseUnavailable

from ..conftest import small_disk


def test_postgresql_refusing_connections_is_unavailable_then_answers_again(closed_database, monkeypatch, caplog):
    db, closed = closed_database
    monkeypatch.setattr(db_module, "availability", db_module.Availability())
    assert db.read_rows(service._STATS, {"device": "cam"}) == []  # a pooled connection, used just now
    with closed, caplog.at_level(logging.WARNING, logger="gallery_server.db"):
        with pytest.raises(DatabaseUnavailable) as raised:
            db.read_rows(service._STATS, {"device": "cam"})
        assert raised.value.reason == "DATABASE_UNAVAILABLE"
        assert isinstance(raised.value.__cause__, (psycopg.OperationalError, sa.exc.OperationalError))
        with pytest.raises(DatabaseUnavailable), db.session() as session:
            session.execute(sa.text("SELECT 1"))
        with pytest.raises(DatabaseUnavailable), db.read() as connection:
            connection.execute(sa.text("SELECT 1"))
        assert db_module.availability.up is False
        # Three failures, one line (then one a minute): an outage under load does not flood the log.
        [down] = [r for r in caplog.records if r.levelname == "ERROR"]
        assert down.getMessage().startswith("database unavailable: ") and down.failures == 1
    assert db.read_rows(service._STATS, {"device": "cam"}) == []
    assert db_module.availability.up is True
    [again] = [r for r in caplog.records if r.getMessage() == "database available again"]
    assert again.levelname == "WARNING" and again.failures == 3
    with db.session() as session:
        assert session.execute(sa.text("SELECT 1")).scalar_one() == 1


def test_a_commit_that_finds_the_database_gone_leaves_it_down(closed_database, monkeypatch):
    """The session around a failed COMMIT is no sign that the database answered."""
    db, closed = closed_database
    monkeypatch.setattr(db_module, "availability", db_module.Availability())
    with pytest.raises((CommitOutcomeUnknown, DatabaseUnavailable)), db.session() as session:
        session.execute(sa.text("CREATE TEMP TABLE pending (x int)"))  # a transaction under way
        with closed:
            db.commit(session)
    assert db_module.availability.up is False


def test_a_lasting_outage_is_logged_once_a_minute_with_its_count(monkeypatch, caplog):
    availability = db_module.Availability()
    clock = [1000.0]
    monkeypatch.setattr(db_module.time, "monotonic", lambda: clock[0])
    with caplog.at_level(logging.WARNING, logger="gallery_server.db"):
        for _ in range(5):  # 5 failures in the first 50 s
            availability.failed(psycopg.OperationalError("connection refused"))
            clock[0] += 10
        clock[0] += 10  # a minute after the first line
        availability.failed(psycopg.OperationalError("connection refused"))
        availability.answered()
        availability.answered()  # once up, nothing more is said
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines == [("ERROR", "database unavailable: OperationalError: connection refused")] * 2 + [
        ("WARNING", "database available again")]
    first, later, again = caplog.records
    assert (first.failures, first.unavailable_seconds) == (1, 0)
    assert (later.failures, later.unavailable_seconds) == (5, 60)
    assert (again.unavailable_seconds, again.failures) == (60, 6)
    assert availability.up


def test_an_outage_back_within_the_minute_and_a_strained_database_say_little(monkeypatch, caplog):
    """A database that flaps (a partial outage) is no ERROR and WARNING per request; a deadlock or a
    lock timeout is a database that answered: no outage, one WARNING a minute."""
    availability = db_module.Availability()
    clock = [1000.0]
    monkeypatch.setattr(db_module.time, "monotonic", lambda: clock[0])
    deadlock = psycopg.errors.DeadlockDetected("deadlock detected")
    with caplog.at_level(logging.WARNING, logger="gallery_server.db"):
        for _ in range(3):
            availability.failed(psycopg.OperationalError("connection refused"))
            assert not availability.up
            availability.answered()
            availability.failed(deadlock)
            assert availability.up  # a deadlock is no outage
            clock[0] += 5
    lines = [(r.levelname, r.getMessage().split(":")[0]) for r in caplog.records]
    assert lines == [("ERROR", "database unavailable"), ("WARNING", "database available again"),
                     ("WARNING", "database could not do the work now")]


def test_other_database_errors_stay_what_they_were(database_url):
    db = Database(database_url, pool_size=1)
    try:
        db.create_tables()
        with pytest.raises(sa.exc.ProgrammingError if "postgresql" in database_url else sa.exc.OperationalError):
            with db.session() as session:  # no such table: the statement's own error
                session.execute(sa.text("SELECT * FROM no_such_table"))
        with pytest.raises(Exception, match="no_such_table") as raised:
            db.read_rows(sa.select(sa.column("x")).select_from(sa.table("no_such_table")), {})
        assert not isinstance(raised.value, DatabaseUnavailable)
    finally:
        db.dispose()


def test_sqlite_locked_past_the_busy_timeout_is_unavailable(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'gallery.db'}", pool_size=1)
    # After the engine's own (30 s): this test need not wait that long.
    sa.event.listen(db.engine, "connect", lambda connection, _: connection.execute("PRAGMA busy_timeout=50"))
    try:
        db.create_tables()
        holder = sqlite3.connect(tmp_path / "gallery.db", isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        try:
            with pytest.raises(DatabaseUnavailable) as raised, db.session() as session:
                session.execute(sa.text("DELETE FROM events"))
                db.commit(session)
            assert "locked" in str(raised.value.__cause__)
            # SQLite said no: nothing was written, and the caller may take its files back.
            assert not isinstance(raised.value, CommitOutcomeUnknown)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        with db.session() as session:
            session.execute(sa.text("DELETE FROM events"))
            session.commit()
    finally:
        db.dispose()


def test_sqlite_on_a_full_disk_is_unavailable_then_answers_again(tmp_path):
    """SQLite finding its disk full is "not now" like PostgreSQL's disk-full class (53): a 503,
    not a 500, and the same write passes once there is room (a DELETE frees space)."""
    with small_disk(tmp_path / "disk", "2m") as disk:
        db = Database(f"sqlite:///{disk / 'gallery.db'}", pool_size=1)
        try:
            db.create_tables()
            filler = disk / "filler"
            with open(filler, "wb") as f, contextlib.suppress(OSError):
                while True:  # until ENOSPC: another writer filled the disk
                    f.write(b"\0" * 65536)
                    f.flush()
            with pytest.raises(DatabaseUnavailable) as raised, db.session() as session:
                session.execute(sa.text("CREATE TABLE filling (b BLOB)"))
                session.execute(sa.text("INSERT INTO filling VALUES (zeroblob(1048576))"))
                db.commit(session)
            assert "full" in str(raised.value.__cause__), raised.value.__cause__
            filler.unlink()
            with db.session() as session:
                session.execute(sa.text("CREATE TABLE filling (b BLOB)"))
                session.execute(sa.text("INSERT INTO filling VALUES (zeroblob(1048576))"))
                db.commit(session)
        finally:
            db.dispose()


def test_a_lock_held_past_the_lock_timeout_is_unavailable_not_a_silent_wait(database_url):
    """As SQLite's busy timeout: a request behind another session's table lock (a migration, an
    operator's LOCK TABLE) is a 503 after the timeout, not an answer after the lock is gone."""
    if not database_url.startswith("postgresql"):
        pytest.skip("PostgreSQL's lock_timeout (SQLite's busy timeout is tested above)")
    db = Database(database_url, pool_size=2, lock_timeout_ms=200)
    try:
        db.create_tables()  # with no lock timeout of its own: it waits for its turn
        with db.engine.connect() as holder, holder.begin():
            holder.exec_driver_sql("LOCK TABLE event_counts IN ACCESS EXCLUSIVE MODE")
            started = time.monotonic()
            with pytest.raises(DatabaseUnavailable) as raised:
                db.read_rows(service._STATS, {"device": "cam"})
            assert time.monotonic() - started < 5
            assert isinstance(raised.value.__cause__, psycopg.errors.LockNotAvailable)
        assert db.read_rows(service._STATS, {"device": "cam"}) == []
        with db.engine.connect() as connection:
            assert connection.exec_driver_sql("SHOW lock_timeout").scalar_one() == "200ms"
        # Schema creation waits its turn however long another replica's takes (a backfill).
        with db.engine.connect() as other, other.begin():
            other.exec_driver_sql(f"SELECT pg_advisory_xact_lock({db_module._SCHEMA_LOCK})")
            errors: list[BaseException] = []

            def create() -> None:
                try:
                    db.create_tables()
                except BaseException as exc:  # noqa: BLE001 - the test's finding
                    errors.append(exc)

            creating = threading.Thread(target=create)
            creating.start()
            creating.join(1.0)  # five lock timeouts
            assert creating.is_alive() and errors == []  # still waiting, not refused
        creating.join(10)
        assert not creating.is_alive() and errors == []
    finally:
        db.dispose()


def test_a_statement_postgresql_cancels_is_its_own_error_not_unavailable(database_url):
    """A statement timeout (57014) would end the same statement again: not "try again later"."""
    if not database_url.startswith("postgresql"):
        pytest.skip("PostgreSQL's statement_timeout")
    db = Database(database_url, pool_size=1)
    try:
        with pytest.raises(sa.exc.OperationalError) as raised, db.session() as session:
            session.execute(sa.text("SET LOCAL statement_timeout = 50"))
            session.execute(sa.text("SELECT pg_sleep(5)"))
        assert isinstance(raised.value.orig, psycopg.errors.QueryCanceled)
    finally:
        db.dispose()


def test_an_error_sqlite3_raises_itself_stays_what_it_was(tmp_path):
    """The sqlite3 module's own errors carry no SQLite error code: a text that is not UTF-8 (which
    another tool may write) is that error, not one raised while classifying it."""
    db = Database(f"sqlite:///{tmp_path / 'gallery.db'}", pool_size=1)
    try:
        db.create_tables()
        with db.engine.begin() as connection:
            connection.exec_driver_sql("CREATE TABLE names (name TEXT)")
            connection.exec_driver_sql("INSERT INTO names VALUES (CAST(X'FF' AS TEXT))")
        with pytest.raises(sqlite3.OperationalError, match="UTF-8"):
            db.read_rows(sa.select(sa.column("name", sa.String)).select_from(sa.table("names")), {})
    finally:
        db.dispose()


@pytest.mark.parametrize(("said", "again"), [
    ("consuming input failed: server closed the connection unexpectedly", True),
    ("terminating connection due to administrator command", True),
    ("connection failed: FATAL:  the database system is starting up", True),
    ("connection failed: connection to server at \"127.0.0.1\", port 5432 failed: Connection refused", True),
    ("SSL SYSCALL error: EOF detected", True),
    ("the connection is closed", True),
    ("connection timeout expired", False),  # a database that does not answer: its 10 s, then the server stops
    ("connection failed: FATAL:  password authentication failed for user \"gallery\"", False),
    ("connection failed: FATAL:  database \"galery\" does not exist", False),
])
def test_what_a_starting_server_tries_again(said: str, again: bool) -> None:
    """A PostgreSQL restart, failover or pg_terminate_backend while a replica starts (rpc/server.py);
    not a setting to fix."""
    error = sa.exc.OperationalError("SELECT 1", {}, psycopg.OperationalError(said))
    assert db_module.dropped(error) is again
