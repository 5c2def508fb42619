"""The per-type counters behind GetStats (models.EventCount) stay equal to a real COUNT(*) and
SUM(size) of the events, on SQLite and PostgreSQL, under concurrent inserts, deletes and updates."""

from __future__ import annotations

import datetime
import threading

import sqlalchemy as sa
from sqlmodel import SQLModel

from gallery_server import auth
from gallery_server.db import Database
from gallery_server.models import Event
from gallery_server.service import Gallery

from .test_service import JPEG, PDF, PNG, store

DEVICES = ("cam1", "cam2")
TYPES = ("image", "video", "other")


def truth(db: Database) -> dict[tuple[str, str], tuple[int, int]]:
    with db.engine.connect() as c:
        rows = c.execute(sa.text(
            "SELECT device, media_type, COUNT(*), COALESCE(SUM(size), 0) FROM events GROUP BY device, media_type"
        )).all()
    return {(d, m): (int(n), int(s)) for d, m, n, s in rows}


def counters(db: Database) -> dict[tuple[str, str], tuple[int, int]]:
    """Every counter row but the all-zero ones a type's last delete leaves; never a negative one."""
    with db.engine.connect() as c:
        rows = c.execute(sa.text("SELECT device, media_type, count, size FROM event_counts")).all()
    assert all(n >= 0 and s >= 0 for _, _, n, s in rows), rows
    return {(d, m): (int(n), int(s)) for d, m, n, s in rows if (n, s) != (0, 0)}


def _row(i: int, worker: int) -> dict[str, object]:
    return {
        "id": f"evt_w{worker}_{i}", "device": DEVICES[i % 2], "name": f"f{i}", "media_type": TYPES[i % 3],
        "mime_type": "application/octet-stream", "size": 1000 + i, "sha256": "0" * 64, "has_thumbnail": False,
        "metadata_json": "{}", "created": datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC), "state": "stored",
        "thumbnail_state": "", "thumbnail_attempts": 0, "media_info_json": "",
    }


def write_concurrently(db: Database) -> None:
    """Six threads inserting, deleting and changing events at once, as uploads, deletes and pulls
    do: some rows announced (on_device), some of those then stored with another type and size."""
    table = Event.__table__  # type: ignore[attr-defined]
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(60):
                row = _row(i, n)
                row["state"] = "on_device" if i % 4 == 0 else "stored"
                with db.engine.begin() as c:
                    c.execute(table.insert(), row)
                if i % 3 == 0:  # delete one of this worker's earlier rows
                    with db.engine.begin() as c:
                        c.execute(table.delete().where(table.c.id == f"evt_w{n}_{i // 2}"))
                if i % 5 == 0:  # change type and size of another (an announced event being filled)
                    with db.engine.begin() as c:
                        c.execute(table.update().where(table.c.id == f"evt_w{n}_{i // 3}")
                                  .values(media_type="image", state="stored", size=table.c.size + 7))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_counters_match_count_after_concurrent_writes(gallery: Gallery) -> None:
    write_concurrently(gallery.db)
    assert truth(gallery.db) == counters(gallery.db)
    assert sum(n for n, _ in counters(gallery.db).values()) > 0


def test_stats_follow_uploads_and_deletes(gallery: Gallery, principal: auth.Principal) -> None:
    a = store(gallery, principal, data=PNG)
    store(gallery, principal, data=JPEG)
    store(gallery, principal, data=PDF, name="doc.pdf")
    gallery.delete_event(principal, "cam1", a.id)
    stats = gallery.stats(principal, "cam1")
    expected = truth(gallery.db)
    assert {t: (v.count, v.size) for t, v in stats.by_type.items()} == {
        m: v for (d, m), v in expected.items() if d == "cam1"
    }
    assert stats.total_events == 2


def test_counters_backfilled_for_a_database_made_before_them(gallery: Gallery, principal: auth.Principal) -> None:
    store(gallery, principal, data=PNG)
    store(gallery, principal, data=PDF, name="doc.pdf")
    db = gallery.db
    with db.engine.begin() as c:  # an older schema: no counters table, no triggers
        c.execute(sa.text("DROP TABLE event_counts"))
        for trigger in ("events_count_insert", "events_count_delete", "events_count_update", "events_count",
                        "events_count_truncate"):
            on = " ON events" if c.dialect.name == "postgresql" else ""
            c.execute(sa.text(f"DROP TRIGGER IF EXISTS {trigger}{on}"))
    db.create_tables()
    assert counters(db) == truth(db)
    store(gallery, principal, data=JPEG)
    assert counters(db) == truth(db)


def test_counters_follow_statements_of_many_rows(gallery: Gallery) -> None:
    """A bulk load or clean-up in SQL, as another tool may run: one INSERT of 300 rows over both
    devices and three types, one DELETE of a third of them, one UPDATE of several."""
    db = gallery.db
    table = Event.__table__  # type: ignore[attr-defined]
    with db.engine.begin() as c:
        c.execute(table.insert().values([_row(i, 9) for i in range(300)]))
    assert counters(db) == truth(db) and sum(n for n, _ in truth(db).values()) == 300
    with db.engine.begin() as c:
        c.execute(table.delete().where(table.c.size % 3 == 0))
        c.execute(table.update().where(table.c.size % 7 == 0).values(media_type="video", size=table.c.size + 1))
    assert counters(db) == truth(db) and sum(n for n, _ in truth(db).values()) == 200


def test_postgres_counts_a_statement_once_per_counter_row(postgres_url: str) -> None:
    """A statement of many rows writes each counter row it changes once (the transition-table
    triggers), not once per row: row by row, a bulk load in one transaction slowed down as it went."""
    db = Database(postgres_url, pool_size=1)
    db.create_tables()
    table = Event.__table__  # type: ignore[attr-defined]
    try:
        with db.engine.begin() as c:
            c.execute(table.insert().values([_row(i, 8) for i in range(300)]))
            c.execute(table.delete().where(table.c.id.like("evt_w8_%"), table.c.size % 2 == 0))
            inserted, updated = c.execute(sa.text(
                "SELECT n_tup_ins, n_tup_upd FROM pg_stat_xact_user_tables WHERE relname = 'event_counts'"
            )).one()
        groups = len(DEVICES) * len(TYPES)
        assert inserted + updated <= 2 * groups, (inserted, updated)
        assert counters(db) == truth(db)
        with db.engine.begin() as c:
            c.execute(sa.text("TRUNCATE events"))
        assert counters(db) == truth(db) == {}
    finally:
        SQLModel.metadata.drop_all(db.engine)  # the next test starts from empty tables
        db.dispose()


# The one trigger databases made before 2026-11-29 have on PostgreSQL: every row of every insert,
# delete and change of the counted columns.
_ROW_BY_ROW = (
    "CREATE OR REPLACE FUNCTION events_count() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    "IF TG_OP IN ('DELETE', 'UPDATE') THEN UPDATE event_counts SET count = count - 1, size = size - OLD.size "
    "WHERE device = OLD.device AND media_type = OLD.media_type; END IF; "
    "IF TG_OP IN ('INSERT', 'UPDATE') THEN INSERT INTO event_counts (device, media_type, count, size) "
    "VALUES (NEW.device, NEW.media_type, 1, NEW.size) ON CONFLICT (device, media_type) DO UPDATE "
    "SET count = event_counts.count + 1, size = event_counts.size + excluded.size; END IF; "
    "RETURN NULL; END $$",
    "CREATE OR REPLACE TRIGGER events_count AFTER INSERT OR DELETE OR UPDATE OF device, media_type, size "
    "ON events FOR EACH ROW EXECUTE FUNCTION events_count()",
)


def test_postgres_counters_reinstalled_over_the_row_trigger_count_once(postgres_url: str) -> None:
    """What README tells an operator to do to move an older database to statement counting: drop
    event_counts and start a server. Its install replaces the old trigger, never adds to it."""
    db = Database(postgres_url, pool_size=1)
    db.create_tables()
    table = Event.__table__  # type: ignore[attr-defined]
    try:
        with db.engine.begin() as c:
            for trigger in ("events_count_insert", "events_count_delete", "events_count_truncate"):
                c.execute(sa.text(f"DROP TRIGGER {trigger} ON events"))
            for statement in _ROW_BY_ROW:
                c.execute(sa.text(statement))
            c.execute(table.insert().values([_row(i, 7) for i in range(30)]))
            c.execute(sa.text("DROP TABLE event_counts"))
        db.create_tables()
        with db.engine.begin() as c:
            c.execute(table.insert().values([_row(i, 6) for i in range(30)]))
            c.execute(table.delete().where(table.c.size % 4 == 0))
            c.execute(table.update().where(table.c.size % 5 == 0).values(media_type="image"))
        assert counters(db) == truth(db) and sum(n for n, _ in truth(db).values()) == 60 - 16
    finally:
        SQLModel.metadata.drop_all(db.engine)
        db.dispose()


def test_replicas_creating_the_schema_at_once_take_turns(postgres_url: str) -> None:
    """Several replicas (so PostgreSQL: SQLite serves one process) starting together on an empty
    database: one creates the tables, triggers and counters, the others find them (two concurrent
    CREATE TABLEs of one name fail without the advisory lock)."""
    engine = sa.create_engine(postgres_url)
    SQLModel.metadata.drop_all(engine)
    engine.dispose()
    databases = [Database(postgres_url, pool_size=1) for _ in range(4)]
    start = threading.Barrier(len(databases))
    errors: list[BaseException] = []

    def create(db: Database) -> None:
        start.wait()
        try:
            db.create_tables()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(db,)) for db in databases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    db = databases[0]
    with db.engine.begin() as c:
        c.execute(sa.insert(Event.__table__).values(_row(1, 0)))  # type: ignore[attr-defined]
    assert counters(db) == truth(db) == {("cam2", "video"): (1, 1001)}
    for each in databases:
        each.dispose()
    engine = sa.create_engine(postgres_url)
    SQLModel.metadata.drop_all(engine)  # the next test starts from empty tables
    engine.dispose()
