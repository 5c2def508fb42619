"""Triggers on `events` (models._KEPT_TABLES) on databases made by earlier releases, on SQLite and
PostgreSQL: a start replaces triggers of an earlier generation (or of none recorded), and leaves
those of a later one, as a replica of an older release restarted during a rolling upgrade must."""

from __future__ import annotations

import hashlib

import pytest
import sqlalchemy as sa

from gallery_server import auth, models
from gallery_server.service import Gallery

from .test_listing_cache import versions
from .test_service import store

# Each table's generation and a digest of its statements. A failure here means a trigger's SQL
# changed: raise that table's generation in models._KEPT_TABLES (so that databases made before
# get the new triggers at their next start) and pin the new pair.
PINNED = {
    "event_counts": (1, "966f245d57dc6f73"),
    "device_usage": (1, "344d26d7baff1cea"),
    "listing_versions": (1, "bf690f8e8a4bb496"),
}


def _digest(kept: models._KeptTable) -> str:
    statements = (*kept.sqlite, *kept.postgres, kept.sqlite_backfill, kept.postgres_backfill)
    return hashlib.sha256("\n".join(statements).encode()).hexdigest()[:16]


def test_a_change_of_a_trigger_raises_its_generation() -> None:
    assert {kept.model.__tablename__: (kept.generation, _digest(kept)) for kept in models._KEPT_TABLES} == PINNED


def _recorded(gallery: Gallery) -> dict[str, int]:
    with gallery.db.engine.connect() as c:
        return dict(c.execute(sa.text("SELECT kept_table, generation FROM trigger_generations")).all())


def _triggers(gallery: Gallery) -> list[str]:
    with gallery.db.engine.connect() as c:
        return models.trigger_names(c)


def _an_older_releases_version_trigger(gallery: Gallery, generation: int | None) -> None:
    """The listing version's triggers as a release that limited the UPDATE trigger to the name
    made them, with one trigger of a name this release has not, and `generation` recorded."""
    with gallery.db.engine.begin() as c:
        postgres = c.dialect.name == "postgresql"
        for trigger in models.trigger_names(c):
            if trigger.startswith("events_changed"):
                c.exec_driver_sql(f"DROP TRIGGER {trigger}{' ON events' if postgres else ''}")
        if postgres:
            c.exec_driver_sql("CREATE TRIGGER events_changed_by_name AFTER UPDATE OF name ON events "
                              "FOR EACH ROW EXECUTE FUNCTION events_changed()")
        else:
            c.exec_driver_sql("CREATE TRIGGER events_changed_by_name AFTER UPDATE OF name ON events BEGIN "
                              "UPDATE listing_versions SET version = random() WHERE device = NEW.device; END")
        c.exec_driver_sql("DELETE FROM trigger_generations WHERE kept_table = 'listing_versions'")
        if generation is not None:
            c.execute(sa.text("INSERT INTO trigger_generations (kept_table, generation) "
                              "VALUES ('listing_versions', :g)"), {"g": generation})


def _unlisted_update_changes_the_version(gallery: Gallery) -> bool:
    before = versions(gallery.db)["cam1"]
    with gallery.db.engine.begin() as c:
        c.exec_driver_sql("UPDATE events SET thumbnail_attempts = thumbnail_attempts + 1")
    return versions(gallery.db)["cam1"] != before


def test_a_new_database_records_every_generation(gallery: Gallery) -> None:
    assert _recorded(gallery) == {name: generation for name, (generation, _) in PINNED.items()}
    current = _triggers(gallery)
    gallery.db.create_tables()  # a start on a database of this release replaces nothing
    assert _triggers(gallery) == current


@pytest.mark.parametrize("generation", [0, None], ids=["an earlier generation", "none recorded"])
def test_triggers_of_an_earlier_generation_are_replaced(gallery: Gallery, principal: auth.Principal,
                                                         generation: int | None) -> None:
    store(gallery, principal)
    expected = _triggers(gallery)
    _an_older_releases_version_trigger(gallery, generation)
    assert not _unlisted_update_changes_the_version(gallery)  # the older release's triggers
    gallery.db.create_tables()
    assert _triggers(gallery) == expected  # the older name gone, none twice
    assert _recorded(gallery)["listing_versions"] == PINNED["listing_versions"][0]
    assert _unlisted_update_changes_the_version(gallery)
    # The other tables' triggers were not touched, and every trigger runs once: one more event
    # is counted once, and its device's version drawn anew.
    before = versions(gallery.db)["cam1"]
    store(gallery, principal, name="second.png")
    assert gallery.stats(principal, "cam1").total_events == 2
    assert versions(gallery.db)["cam1"] != before


def test_a_database_made_before_the_generations_gets_this_releases_triggers(gallery: Gallery,
                                                                             principal: auth.Principal) -> None:
    """A release older than the generations' table: every kept table's triggers are made anew,
    the counts they keep stay as they were (no backfill runs twice)."""
    store(gallery, principal)
    store(gallery, principal, name="b.png")
    expected = _triggers(gallery)
    stats = gallery.stats(principal, "cam1")
    with gallery.db.engine.begin() as c:
        c.exec_driver_sql("DROP TABLE trigger_generations")
    gallery.db.create_tables()
    assert _recorded(gallery) == {name: generation for name, (generation, _) in PINNED.items()}
    assert _triggers(gallery) == expected
    assert gallery.stats(principal, "cam1") == stats
    store(gallery, principal, name="c.png")
    assert gallery.stats(principal, "cam1").total_events == 3


def test_triggers_of_a_later_generation_are_left_as_they_are(gallery: Gallery, principal: auth.Principal) -> None:
    """A replica of this release restarted while a newer one runs must not put its own back."""
    store(gallery, principal)
    _an_older_releases_version_trigger(gallery, generation=99)  # here: what a newer release made
    later = _triggers(gallery)
    gallery.db.create_tables()
    assert _triggers(gallery) == later and "events_changed_by_name" in later
    assert _recorded(gallery)["listing_versions"] == 99


def test_the_row_counting_trigger_of_2026_11_28_is_replaced(gallery: Gallery, principal: auth.Principal) -> None:
    """PostgreSQL databases made before 2026-11-29 count inserts and deletes row by row, in the
    trigger events_count, which is now the update trigger's name: replaced, they count each event
    once, by statement."""
    if gallery.db.engine.dialect.name != "postgresql":
        pytest.skip("SQLite's triggers were the same then")
    store(gallery, principal)
    expected = _triggers(gallery)
    with gallery.db.engine.begin() as c:
        for trigger in models.trigger_names(c):
            if trigger.startswith("events_count"):
                c.exec_driver_sql(f"DROP TRIGGER {trigger} ON events")
        c.exec_driver_sql(
            "CREATE OR REPLACE FUNCTION events_count() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"IF TG_OP IN ('DELETE', 'UPDATE') THEN {models._COUNT_REMOVE}; END IF; "
            f"IF TG_OP IN ('INSERT', 'UPDATE') THEN {models._COUNT_ADD}; END IF; RETURN NULL; END $$")
        c.exec_driver_sql("CREATE TRIGGER events_count AFTER INSERT OR DELETE OR UPDATE OF device, media_type, size "
                          "ON events FOR EACH ROW EXECUTE FUNCTION events_count()")
        c.exec_driver_sql("DROP TABLE trigger_generations")
    gallery.db.create_tables()
    assert _triggers(gallery) == expected  # inserts and deletes counted by statement again
    events = [store(gallery, principal, name=f"{i}.png") for i in range(2)]
    gallery.delete_event(principal, "cam1", events[0].id)
    with gallery.db.engine.begin() as c:
        c.exec_driver_sql("UPDATE events SET size = size + 1")
    with gallery.db.engine.connect() as c:
        counted = c.exec_driver_sql("SELECT count, size FROM event_counts WHERE device = 'cam1'").all()
        actual = c.exec_driver_sql("SELECT COUNT(*), SUM(size) FROM events WHERE device = 'cam1'").all()
    assert [tuple(row) for row in counted] == [tuple(row) for row in actual] and actual[0][0] == 2
