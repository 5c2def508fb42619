"""Database.read_rows runs a select on the driver's cursor itself, so it must give exactly the rows
SQLAlchemy's execution gives, for every hot read's select and parameters (times with microseconds
at the filters' edges, and in another time zone, included), on SQLite and on PostgreSQL, and leave a
PostgreSQL connection as the pool lent it."""

from __future__ import annotations

import datetime
import itertools
import threading
import time
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from gallery_server import service
from gallery_server.db import Database, _driver_select
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
    page = service._listing_statement(by_type=by_type, since=since, until=until, after=after, newest_first=newest_first)
    statements = [page]
    if gallery.db.engine.dialect.name == "sqlite":  # the page SQLite prints itself
        statements.append(service._sqlite_json_statement(page, newest_first))
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


def test_a_postgresql_connection_lost_during_a_read_raises_its_own_error_and_is_dropped(database_url):
    if not database_url.startswith("postgresql"):
        pytest.skip("PostgreSQL's server ends the connection")
    db = Database(database_url, pool_size=1)
    try:
        pid = db.read_rows(sa.select(sa.func.pg_backend_pid()), {})[0][0]
        killer = threading.Thread(target=_terminate_when_sleeping, args=(database_url, pid))
        killer.start()
        with pytest.raises(psycopg.errors.AdminShutdown):  # the loss itself, not a later error
            db.read_rows(sa.select(sa.func.pg_sleep(sa.bindparam("seconds", type_=sa.Float))), {"seconds": 30.0})
        killer.join()
        assert db.read_rows(sa.select(sa.literal(1)), {}) == [(1,)]  # the pool carries on
    finally:
        db.dispose()


def _terminate_when_sleeping(database_url: str, pid: int) -> None:
    """End backend `pid` once it is inside pg_sleep (not before: the pool's pre-ping would quietly
    replace a connection ended earlier)."""
    url = sa.make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url, autocommit=True) as connection:
        deadline = time.monotonic() + 20
        while not connection.execute(
            "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND wait_event = 'PgSleep'", (pid,)
        ).fetchall():
            assert time.monotonic() < deadline, "the select never started sleeping"
            time.sleep(0.02)
        connection.execute("SELECT pg_terminate_backend(%s)", (pid,))
