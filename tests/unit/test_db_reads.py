"""Database.read_rows runs a select on the driver's cursor itself, so it must give exactly the rows
SQLAlchemy's execution gives, for every hot read's select and parameters (times with microseconds
at the filters' edges, and in another time zone, included), on SQLite and on PostgreSQL, and leave a
PostgreSQL connection as the pool lent it."""

from __future__ import annotations

import datetime
import itertools
import os
import stat
import threading
import time
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from gallery_server import listing, service
from gallery_server.db import Database, _ConnectionLost, _driver_select
from gallery_server.errors import DatabaseUnavailable
from gallery_server.models import Event

DEVICE = "cam-rows"
T0 = datetime.datetime(2024, 5, 1, 8, 0, 0, tzinfo=datetime.UTC)


@pytest.fixture
def events(gallery) -> list[dict[str, Any]]:
    """40 events, some sharing a timestamp, with microseconds, of three media types."""
    values = [
        {
            "id": f"evt_rows{i:018d}", "device": DEVICE, "name": f"e{i}.bin",
            "media_type": ("video", "image", "other")[i % 3], "mime_type": "", "size": i * 1000 + 7,
            "sha256": f"{i:064x}", "has_thumbnail": False, "metadata_json": "{}",
            "created": T0 + datetime.timedelta(seconds=i // 3, microseconds=(0, 1, 999_999)[i % 3]),
            "state": "stored", "thumbnail_state": "", "thumbnail_attempts": 0, "media_info_json": "",
        }
        for i in range(40)
    ]
    with gallery.db.engine.begin() as connection:
        connection.execute(sa.insert(Event.__table__), values)  # type: ignore[attr-defined]
    return values


def _through_sqlalchemy(gallery, statement: sa.Select[Any], parameters: dict[str, Any]) -> list[tuple[Any, ...]]:
    with gallery.db.read() as connection:
        return [tuple(row) for row in connection.execute(statement, parameters)]


def _parameter_sets(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    edge = events[13]["created"]  # has microseconds 1, and a neighbour in the same second
    # The same instant two hours east: stored and compared as UTC only if the column's own type
    # (UTCDateTime) converts it, not a plain DateTime's conversion.
    east = edge.astimezone(datetime.timezone(datetime.timedelta(hours=2)))
    return [
        {"device": DEVICE, "media_type": media_type, "since": since, "until": until,
         "after_created": after[0], "after_id": after[1], "offset": offset, "limit": limit}
        for media_type, since, until, after, offset, limit in [
            ("video", edge, edge + datetime.timedelta(seconds=4), (edge, events[13]["id"]), 0, 50),
            ("image", T0, edge, (events[30]["created"], events[30]["id"]), 2, 5),
            ("other", edge - datetime.timedelta(microseconds=1), T0 + datetime.timedelta(days=1),
             (edge, "evt_rows9"), 0, 1000),
            ("video", east, east + datetime.timedelta(seconds=3), (east, events[13]["id"]), 1, 4),
        ]
    ]


@pytest.mark.parametrize("by_type, since, until, after, newest_first", list(itertools.product([False, True], repeat=5)))
def test_every_listing_select_reads_the_same_rows(gallery, events, by_type, since, until, after, newest_first):
    page = listing._listing_statement(by_type=by_type, since=since, until=until, after=after, newest_first=newest_first)
    statements = [page]
    if gallery.db.engine.dialect.name == "sqlite":  # the page SQLite prints itself
        statements.append(listing._sqlite_json_statement(page, newest_first))
    selected = 0
    for statement, parameters in itertools.product(statements, _parameter_sets(events)):
        expected = _through_sqlalchemy(gallery, statement, parameters)
        assert gallery.db.read_rows(statement, parameters) == expected
        selected += statement is page and bool(expected)
    assert selected, "some parameter set selects events"


def test_stats_reads_the_same_rows_and_leaves_out_empty_types(gallery, events):
    with gallery.db.engine.begin() as connection:  # the triggers keep a zero row for a type emptied
        connection.execute(sa.delete(Event.__table__).where(Event.__table__.c.media_type == "other"))  # type: ignore[attr-defined]
    rows = gallery.db.read_rows(service._STATS, {"device": DEVICE})
    assert sorted(rows) == sorted(_through_sqlalchemy(gallery, service._STATS, {"device": DEVICE}))
    assert sorted(media for media, _, _ in rows) == ["image", "video"]
    assert gallery.db.read_rows(service._STATS, {"device": "nobody"}) == []


def test_a_select_the_driver_path_cannot_run_is_refused(gallery):
    statement = sa.select(Event.__table__.c.id).where(  # type: ignore[attr-defined]
        Event.__table__.c.id.in_(sa.bindparam("ids", expanding=True))  # type: ignore[attr-defined]
    )
    with pytest.raises(ValueError):
        gallery.db.read_rows(statement, {"ids": ["a"]})


def test_the_rows_do_not_go_through_sqlalchemys_execution(gallery, events):
    executed: list[str] = []
    record = lambda _c, _cursor, statement, *_: executed.append(statement)  # noqa: E731
    sa.event.listen(gallery.db.engine, "before_cursor_execute", record)
    try:
        assert gallery.db.read_rows(service._STATS, {"device": DEVICE})
    finally:
        sa.event.remove(gallery.db.engine, "before_cursor_execute", record)
    assert executed == []


def test_a_select_is_compiled_once(gallery):
    dialect = gallery.db.engine.dialect
    assert _driver_select(service._STATS, dialect) is _driver_select(service._STATS, dialect)


def test_a_postgresql_connection_goes_back_to_the_pool_as_it_came(database_url):
    """The select runs outside a transaction; the connection then takes transactions again, also
    after a select that failed."""
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite's connections are never switched")
    db = Database(database_url, pool_size=1)  # one connection: every use below is the same one
    try:
        db.create_tables()
        failing = sa.select(sa.literal_column("1") / sa.bindparam("zero", type_=sa.Integer))
        with pytest.raises(Exception, match="division by zero"):
            db.read_rows(failing, {"zero": 0})
        assert db.read_rows(service._STATS, {"device": DEVICE}) == []
        # Its transaction is the select's own, begun with it, not one a BEGIN opened before it.
        own_transaction = (
            sa.select(sa.literal_column("xact_start = query_start")).select_from(sa.text("pg_stat_activity"))
            .where(sa.literal_column("pid") == sa.func.pg_backend_pid())
        )
        assert db.read_rows(own_transaction, {}) == [(True,)]
        with db.session() as session:  # the control: a session's select follows its BEGIN
            session.execute(sa.text("SELECT 1"))
            assert session.execute(own_transaction).one() == (False,)
        with db.engine.connect() as connection:
            assert connection.connection.dbapi_connection.autocommit is False
            connection.execute(sa.insert(Event.__table__), [{  # type: ignore[attr-defined]
                "id": "evt_rolled_back_0000000", "device": DEVICE, "name": "x", "media_type": "other",
                "mime_type": "", "size": 1, "sha256": "0" * 64, "has_thumbnail": False,
                "metadata_json": "{}", "created": T0, "state": "stored", "thumbnail_state": "",
                "thumbnail_attempts": 0, "media_info_json": "",
            }])
            connection.rollback()
        assert db.read_rows(service._STATS, {"device": DEVICE}) == []  # the insert was rolled back
    finally:
        db.dispose()


def _admin(database_url: str) -> psycopg.Connection:  # type: ignore[type-arg]
    url = sa.make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
    return psycopg.connect(url, autocommit=True)


def _backend_pid(db: Database) -> int:
    return db.read_rows(sa.select(sa.func.pg_backend_pid()), {})[0][0]


def _terminate(database_url: str, pids: list[int]) -> None:
    """End these backends, as a restarting or an administrator's PostgreSQL would, and wait until
    they are gone."""
    with _admin(database_url) as connection:
        for pid in pids:
            connection.execute("SELECT pg_terminate_backend(%s)", (pid,))
        deadline = time.monotonic() + 20
        while connection.execute("SELECT 1 FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)).fetchall():
            assert time.monotonic() < deadline, "the backends did not end"
            time.sleep(0.01)


def _counting_pings(db: Database, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the pings of db's pool on their way to the dialect's own."""
    pings: list[int] = []
    ping = db.engine.dialect.do_ping

    def counted(dbapi_connection: Any) -> bool:
        pings.append(1)
        return ping(dbapi_connection)

    monkeypatch.setattr(db.engine.dialect, "do_ping", counted)
    return pings


def test_read_rows_skips_the_ping_of_a_recently_returned_connection_and_sessions_never_do(
    database_url, monkeypatch
):
    """Sessions, which may write, are pinged at every checkout; read_rows only when its connection
    sat in the pool for the window or longer (a fresh one never)."""
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite's connections are never pinged")
    for window, read_pings in ((3600.0, 0), (0.0, 1)):  # every return is recent / none is
        db = Database(database_url, pool_size=1, trust_recent_seconds=window)
        try:
            pings = _counting_pings(db, monkeypatch)
            first = _backend_pid(db)
            assert pings == []  # just connected
            assert _backend_pid(db) == first and len(pings) == read_pings
            with db.session() as session:
                assert session.execute(sa.select(sa.func.pg_backend_pid())).scalar_one() == first
            assert len(pings) == read_pings + 1
            with db.read() as connection:
                assert connection.execute(sa.select(sa.func.pg_backend_pid())).scalar_one() == first
            assert len(pings) == read_pings + 2
        finally:
            db.dispose()


def test_a_single_read_whose_connection_was_ended_runs_again_on_another(database_url, monkeypatch):
    """The connection was lent without a ping: the read finds it ended, and answers all the same."""
    if not database_url.startswith("postgresql"):
        pytest.skip("PostgreSQL's server ends the connection")
    db = Database(database_url, pool_size=1, trust_recent_seconds=3600)
    try:
        db.create_tables()
        pings = _counting_pings(db, monkeypatch)
        ended = _backend_pid(db)
        _terminate(database_url, [ended])
        assert db.read_rows(service._STATS, {"device": DEVICE}) == []
        assert _backend_pid(db) != ended
        assert pings == []  # the only connection was replaced, and the new one is fresh
    finally:
        db.dispose()


def test_after_a_restart_one_failed_ping_replaces_every_pooled_connection(database_url, monkeypatch):
    """Every backend ended at once, as by a restart: the first checkout that pings finds its
    connection ended, and the whole pool is replaced, as SQLAlchemy's pool_pre_ping does."""
    if not database_url.startswith("postgresql"):
        pytest.skip("PostgreSQL's server ends the connections")
    db = Database(database_url, pool_size=3, trust_recent_seconds=3600)
    try:
        with db.engine.connect() as a, db.engine.connect() as b, db.engine.connect() as c:
            ended = [
                connection.execute(sa.select(sa.func.pg_backend_pid())).scalar_one() for connection in (a, b, c)
            ]
        pings = _counting_pings(db, monkeypatch)
        _terminate(database_url, ended)
        with db.session() as session:  # a session is pinged, even right after its connection's return
            assert session.execute(sa.select(sa.func.pg_backend_pid())).scalar_one() not in ended
        assert len(pings) == 1
        # The two other connections, ended too, went with the failed ping: these reads get new ones,
        # fresh, so none is pinged or runs a second time.
        pids = {_backend_pid(db) for _ in range(6)}
        assert not pids & set(ended) and len(pings) == 1
    finally:
        db.dispose()


def test_a_read_whose_connection_is_lost_twice_is_unavailable_and_the_pool_carries_on(database_url):
    """A select cut short runs once more, and not again: the second loss is the caller's error
    (DatabaseUnavailable, from the driver's)."""
    if not database_url.startswith("postgresql"):
        pytest.skip("PostgreSQL's server ends the connection")
    db = Database(database_url, pool_size=1, trust_recent_seconds=3600)
    try:
        _backend_pid(db)  # the select below then takes this connection, unpinged
        raised, killed = _sleep_while_ended(db, database_url, 2)
        assert len(set(killed)) == 2  # two connections, one after the other
        second = raised.__cause__
        assert isinstance(second, psycopg.errors.AdminShutdown)  # the loss itself, not a later error
        assert isinstance(second.__context__, _ConnectionLost)
        assert isinstance(second.__context__.__cause__, psycopg.errors.AdminShutdown)
        assert db.read_rows(sa.select(sa.literal(1)), {}) == [(1,)]  # the pool carries on
    finally:
        db.dispose()


def test_a_select_whose_pinged_connection_is_lost_does_not_run_again(database_url):
    """Its connection was checked: the select itself lost it (an administrator may have ended it
    for a reason), so it is not run a second time."""
    if not database_url.startswith("postgresql"):
        pytest.skip("PostgreSQL's server ends the connection")
    db = Database(database_url, pool_size=1, trust_recent_seconds=0.0)  # every checkout pings
    try:
        _backend_pid(db)
        raised, _ = _sleep_while_ended(db, database_url, 1)
        assert isinstance(raised.__cause__, psycopg.errors.AdminShutdown)
        assert raised.__cause__.__context__ is None  # the first and only attempt
        assert db.read_rows(sa.select(sa.literal(1)), {}) == [(1,)]
    finally:
        db.dispose()


def _sleep_while_ended(db: Database, database_url: str, count: int) -> tuple[DatabaseUnavailable, list[int]]:
    """Run a 30 s select on `db` while `count` backends are ended, each once it is inside the
    select; the select's error and the pids of the backends ended."""
    killed: list[int] = []
    killer = threading.Thread(target=_terminate_sleeping, args=(database_url, count, killed))
    killer.start()
    try:
        with pytest.raises(DatabaseUnavailable) as raised:
            db.read_rows(sa.select(sa.func.pg_sleep(sa.bindparam("seconds", type_=sa.Float))), {"seconds": 30.0})
    finally:
        killer.join()
    return raised.value, killed


def _terminate_sleeping(database_url: str, count: int, killed: list[int]) -> None:
    """End `count` backends of the database, each once it is inside pg_sleep (not before: it would
    not be the select that loses its connection)."""
    with _admin(database_url) as connection:
        deadline = time.monotonic() + 20
        while len(killed) < count:
            sleeping = connection.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND wait_event = 'PgSleep'"
                " AND NOT pid = ANY(%s)", (killed,)
            ).fetchall()
            assert time.monotonic() < deadline, "no select was sleeping"
            if sleeping:
                connection.execute("SELECT pg_terminate_backend(%s)", (sleeping[0][0],))
                killed.append(sleeping[0][0])
            time.sleep(0.02)


def test_an_index_added_to_an_existing_table_is_made_at_start(database_url: str) -> None:
    """create_all makes indexes only with their tables: a database made before an index joined
    its model (ix_upload_grants_device_expires) gets it at the next start."""
    db = Database(database_url)
    try:
        db.create_tables()
        with db.engine.begin() as connection:
            connection.exec_driver_sql("DROP INDEX ix_upload_grants_device_expires")
        db.create_tables()
        indexes = sa.inspect(db.engine).get_indexes("upload_grants")
        assert ["device", "expires_at"] in [i["column_names"] for i in indexes]
        db.create_tables()  # and again: nothing to do
    finally:
        db.dispose()


def test_a_new_sqlite_database_is_not_readable_by_other_users(tmp_path) -> None:
    """Media files are 0640; the database that names and describes them is too (SQLite made it,
    and its WAL, 0644 with the usual umask). An existing database keeps its own mode."""
    old_umask = os.umask(0o022)
    try:
        db = Database(f"sqlite:///{tmp_path / 'gallery.db'}", pool_size=1)
        try:
            db.create_tables()
            with db.session() as session:
                session.execute(sa.text("CREATE TABLE t (x INTEGER)"))
                session.execute(sa.text("INSERT INTO t VALUES (1)"))
                session.commit()
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
            # Open in WAL mode: its two files exist, and take the database's mode.
            assert modes == dict.fromkeys(("gallery.db", "gallery.db-wal", "gallery.db-shm"), 0o640), modes
        finally:
            db.dispose()
        kept = tmp_path / "kept.db"
        kept.touch(mode=0o600)
        Database(f"sqlite:///{kept}", pool_size=1).dispose()
        assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    finally:
        os.umask(old_umask)
