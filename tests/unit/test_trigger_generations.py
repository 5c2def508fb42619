"""Triggers on `events` (models._KEPT_TABLES) on databases made by earlier releases, on SQLite and
PostgreSQL: a start replaces triggers of an earlier generation (or of none recorded), those of
names no longer used included, and leaves those of a later one, as a replica of an older release
restarted during a rolling upgrade must."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable

import grpc
import pytest
import sqlalchemy as sa

from gallery.v1 import gallery_pb2 as pb
from gallery.v1 import gallery_pb2_grpc
from gallery_server import auth, models
from gallery_server import listing as listing_module
from gallery_server.listing import Listing
from gallery_server.service import Gallery

from .test_listing_cache import versions
from .test_service import PNG, store

# Each table's generations, each with a digest of its statements: append-only. A failure here
# means a trigger's SQL changed: add a generation with the new digest, and raise the table's
# generation in models._KEPT_TABLES to it, so that databases made before get the new triggers at
# their next start. Never change a digest in place.
GENERATIONS = {
    "event_counts": {1: "966f245d57dc6f73"},
    "device_usage": {1: "344d26d7baff1cea", 2: "eb5c46b4551b7c10"},
    "listing_versions": {1: "bf690f8e8a4bb496", 2: "3fdcc901b2a377fc"},
}
CURRENT = {table: max(generations) for table, generations in GENERATIONS.items()}


def _digest(kept: models._KeptTable) -> str:
    statements = (*kept.sqlite, *kept.postgres, kept.sqlite_backfill, kept.postgres_backfill)
    return hashlib.sha256("\n".join(statements).encode()).hexdigest()[:16]


def test_a_change_of_a_trigger_is_a_new_generation() -> None:
    assert {kept.model.__tablename__ for kept in models._KEPT_TABLES} == set(GENERATIONS)
    for kept in models._KEPT_TABLES:
        history = GENERATIONS[kept.model.__tablename__]
        assert len(set(history.values())) == len(history), "a generation's digest was reused"
        assert (kept.generation, _digest(kept)) == (max(history), history[max(history)]), kept.model.__tablename__


def _recorded(gallery: Gallery) -> dict[str, int]:
    with gallery.db.engine.connect() as c:
        return dict(c.execute(sa.text("SELECT kept_table, generation FROM trigger_generations")).all())


def _triggers(gallery: Gallery) -> list[str]:
    with gallery.db.engine.connect() as c:
        names = models.trigger_names(c)
        if c.dialect.name == "postgresql":
            names += [f"{name}()" for name in models.trigger_functions(c)]
    return names


def _drop_version_triggers(c: sa.Connection) -> None:
    postgres = c.dialect.name == "postgresql"
    for trigger in models.trigger_names(c):
        if trigger.startswith("events_changed"):
            c.exec_driver_sql(f"DROP TRIGGER {trigger}{' ON events' if postgres else ''}")


def _set_generation(c: sa.Connection, generation: int | None) -> None:
    c.exec_driver_sql("DELETE FROM trigger_generations WHERE kept_table = 'listing_versions'")
    if generation is not None:
        c.execute(sa.text("INSERT INTO trigger_generations (kept_table, generation) "
                          "VALUES ('listing_versions', :g)"), {"g": generation})


def _an_older_releases_version_trigger(gallery: Gallery, generation: int | None) -> None:
    """The listing version's UPDATE trigger under its own name, limited to the name column as an
    older release might have made it, with `generation` recorded (None: none)."""
    with gallery.db.engine.begin() as c:
        _drop_version_triggers(c)
        if c.dialect.name == "postgresql":
            c.exec_driver_sql("CREATE TRIGGER events_changed AFTER UPDATE OF name ON events "
                              "FOR EACH ROW EXECUTE FUNCTION events_changed()")
        else:
            c.exec_driver_sql("CREATE TRIGGER events_changed AFTER UPDATE OF name ON events BEGIN "
                              "UPDATE listing_versions SET version = random() WHERE device = NEW.device; END")
        _set_generation(c, generation)


def _a_mime_type_change_draws_a_version(gallery: Gallery) -> bool:
    """True under this release's triggers, False under the older release's of
    _an_older_releases_version_trigger."""
    before = versions(gallery.db)["cam1"]
    with gallery.db.engine.begin() as c:
        c.exec_driver_sql("UPDATE events SET mime_type = mime_type || 'x'")
    return versions(gallery.db)["cam1"] != before


def _counts_are_the_events(gallery: Gallery) -> bool:
    """Whether both tables of counts say what the events do, for every device."""
    with gallery.db.engine.connect() as c:
        counted = {tuple(r) for r in c.exec_driver_sql(
            "SELECT device, media_type, count, size FROM event_counts WHERE count > 0")}
        events = {tuple(r) for r in c.exec_driver_sql(
            "SELECT device, media_type, COUNT(*), SUM(size) FROM events GROUP BY device, media_type")}
        stored = {tuple(r) for r in c.exec_driver_sql("SELECT device, stored_bytes FROM device_usage "
                                                      "WHERE stored_bytes > 0")}
        stored_events = {tuple(r) for r in c.exec_driver_sql(
            "SELECT device, SUM(CASE WHEN state = 'stored' THEN size ELSE 0 END + COALESCE(thumbnail_size, 0))"
            " FROM events GROUP BY device HAVING SUM(CASE WHEN state = 'stored' THEN size ELSE 0 END"
            " + COALESCE(thumbnail_size, 0)) > 0")}
    return counted == events and stored == stored_events


def _writes(gallery: Gallery, principal: auth.Principal) -> None:
    """An insert, a delete and an update of a counted column: each counted once, or not at all."""
    events = [store(gallery, principal, name=f"w{i}.png") for i in range(2)]
    gallery.delete_event(principal, "cam1", events[0].id)
    with gallery.db.engine.begin() as c:
        c.exec_driver_sql("UPDATE events SET size = size + 1")


def test_a_new_database_records_every_generation(gallery: Gallery, caplog: pytest.LogCaptureFixture) -> None:
    assert _recorded(gallery) == CURRENT
    current = _triggers(gallery)
    with caplog.at_level(logging.INFO, logger="gallery_server.models"):
        gallery.db.create_tables()  # a start on a database of this release replaces nothing
    assert _triggers(gallery) == current
    assert not [r for r in caplog.records if r.name == "gallery_server.models"]


@pytest.mark.parametrize("generation", [0, None], ids=["an earlier generation", "none recorded"])
def test_triggers_of_an_earlier_generation_are_replaced(gallery: Gallery, principal: auth.Principal,
                                                         caplog: pytest.LogCaptureFixture,
                                                         generation: int | None) -> None:
    store(gallery, principal)
    expected = _triggers(gallery)
    _an_older_releases_version_trigger(gallery, generation)
    assert not _a_mime_type_change_draws_a_version(gallery)  # the older release's trigger
    with caplog.at_level(logging.INFO, logger="gallery_server.models"):
        gallery.db.create_tables()
    assert [r.getMessage() for r in caplog.records if r.name == "gallery_server.models"] == ["triggers replaced"]
    assert _triggers(gallery) == expected
    assert _recorded(gallery)["listing_versions"] == CURRENT["listing_versions"]
    assert _a_mime_type_change_draws_a_version(gallery)  # this release's, under the same name
    before = versions(gallery.db)["cam1"]
    _writes(gallery, principal)
    assert _counts_are_the_events(gallery) and versions(gallery.db)["cam1"] != before


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
    assert _recorded(gallery) == CURRENT
    assert _triggers(gallery) == expected
    assert gallery.stats(principal, "cam1") == stats
    _writes(gallery, principal)
    assert gallery.stats(principal, "cam1").total_events == 3 and _counts_are_the_events(gallery)


def test_the_first_version_triggers_are_dropped(gallery: Gallery, principal: auth.Principal) -> None:
    """e5e91f9 (2026-12-01) counted the listing version up in triggers and functions named
    events_listing*, which the next commit renamed: a database made by it loses them, where
    otherwise both sets would write each change's version."""
    store(gallery, principal)
    expected = _triggers(gallery)
    with gallery.db.engine.begin() as c:
        bump = "UPDATE listing_versions SET version = version + 1 WHERE device = {}.device"
        if c.dialect.name == "postgresql":
            for trigger, function, event, row in (
                ("events_listing_insert", "events_listing_inserted", "INSERT", "NEW"),
                ("events_listing_delete", "events_listing_deleted", "DELETE", "OLD"),
                ("events_listing", "events_listing", "UPDATE", "NEW"),
            ):
                c.exec_driver_sql(f"CREATE OR REPLACE FUNCTION {function}() RETURNS trigger "
                                  f"LANGUAGE plpgsql AS $$ BEGIN {bump.format(row)}; RETURN NULL; END $$")
                c.exec_driver_sql(f"CREATE TRIGGER {trigger} AFTER {event} ON events "
                                  f"FOR EACH ROW EXECUTE FUNCTION {function}()")
        else:
            for suffix, event, row in (("_insert", "INSERT", "NEW"), ("_delete", "DELETE", "OLD"),
                                       ("_update", "UPDATE", "NEW")):
                c.exec_driver_sql(f"CREATE TRIGGER events_listing{suffix} AFTER {event} ON events "
                                  f"BEGIN {bump.format(row)}; END")
        c.exec_driver_sql("DROP TABLE trigger_generations")
    assert any("events_listing" in name for name in _triggers(gallery))
    gallery.db.create_tables()
    assert _triggers(gallery) == expected  # no events_listing* trigger or function left
    before = versions(gallery.db)["cam1"]
    store(gallery, principal, name="c.png")
    assert versions(gallery.db)["cam1"] not in (before, before + 1)  # drawn, and only drawn


def test_triggers_of_a_later_generation_are_left_as_they_are(gallery: Gallery, principal: auth.Principal) -> None:
    """A replica of this release restarted while a newer one runs must not put its own back."""
    store(gallery, principal)
    _an_older_releases_version_trigger(gallery, generation=99)  # here: what a newer release made
    later = _triggers(gallery)
    gallery.db.create_tables()
    assert _triggers(gallery) == later
    assert not _a_mime_type_change_draws_a_version(gallery)
    assert _recorded(gallery)["listing_versions"] == 99


def test_a_start_that_cannot_lock_events_in_time_keeps_the_triggers_it_found(
    gallery: Gallery, principal: auth.Principal, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """PostgreSQL: a write transaction left open holds events against the start's lock; the start
    does not queue every write behind it for long, and replaces the triggers at a later start."""
    if gallery.db.engine.dialect.name != "postgresql":
        pytest.skip("SQLite's schema step holds its write lock from the start")
    store(gallery, principal)
    _an_older_releases_version_trigger(gallery, generation=None)
    monkeypatch.setattr(models, "REPLACE_LOCK_TIMEOUT_MS", 200)
    with gallery.db.engine.connect() as writer:
        open_write = writer.begin()
        writer.exec_driver_sql("UPDATE events SET thumbnail_attempts = 0")  # holds events until its end
        with caplog.at_level(logging.WARNING, logger="gallery_server.models"):
            gallery.db.create_tables()
        open_write.rollback()
    assert [r.getMessage() for r in caplog.records if r.name == "gallery_server.models"] == [
        "triggers of an earlier generation kept: events was not free to replace them in time;"
        " the next start tries again"]
    assert "listing_versions" not in _recorded(gallery) and not _a_mime_type_change_draws_a_version(gallery)
    gallery.db.create_tables()
    assert _recorded(gallery)["listing_versions"] == CURRENT["listing_versions"]
    assert _a_mime_type_change_draws_a_version(gallery)


def _usage_generation_1() -> models._KeptTable:
    """The device_usage triggers of 2026-11-30 to 2026-12-02, which counted media only: this
    release's with the thumbnails taken out (the digest proves them the very statements)."""
    kept = next(k for k in models._KEPT_TABLES if k.model is models.DeviceUsage)

    def before(statement: str) -> str:
        return (statement.replace(models._stored("NEW."), "NEW.size")
                .replace(f"({models._stored('OLD.')})", "OLD.size")
                .replace(models._STORED, "size")
                .replace(models._counted("NEW."), "NEW.state = 'stored'")
                .replace(models._counted("OLD."), "OLD.state = 'stored'")
                .replace(models._COUNTED, "state = 'stored'")
                .replace(models._USAGE_COLUMNS, "device, state, size"))

    old = dataclasses.replace(kept, generation=1, sqlite=tuple(map(before, kept.sqlite)),
                              postgres=tuple(map(before, kept.postgres)),
                              sqlite_backfill=before(kept.sqlite_backfill),
                              postgres_backfill=before(kept.postgres_backfill))
    assert _digest(old) == GENERATIONS["device_usage"][1]
    return old


def test_a_quota_of_media_only_counts_thumbnails_from_the_upgrade_on(gallery: Gallery,
                                                                      principal: auth.Principal) -> None:
    """A database of the release before: no events.thumbnail_size, usage triggers of generation 1.
    A start adds the column and replaces the triggers; the thumbnails stored before count 0 (their
    size was never recorded), as they did, and those stored after count, through their delete."""
    old = store(gallery, principal, name="old.png", thumbnail=b"t" * 50)
    before = _usage_generation_1()
    with gallery.db.engine.begin() as c:
        postgres = c.dialect.name == "postgresql"
        for trigger in models.trigger_names(c):
            if before.owns(trigger):
                c.exec_driver_sql(f"DROP TRIGGER {trigger}{' ON events' if postgres else ''}")
        c.exec_driver_sql("ALTER TABLE events DROP COLUMN thumbnail_size")
        for statement in before.statements(postgres):
            c.exec_driver_sql(statement)
        c.exec_driver_sql("DELETE FROM device_usage")
        c.exec_driver_sql(before.postgres_backfill if postgres else before.sqlite_backfill)
        c.exec_driver_sql("UPDATE trigger_generations SET generation = 1 WHERE kept_table = 'device_usage'")
    gallery.db.create_tables()
    assert _recorded(gallery) == CURRENT
    new = store(gallery, principal, name="new.png", thumbnail=b"t" * 30)
    assert _counts_are_the_events(gallery)
    with gallery.db.engine.connect() as c:
        assert c.exec_driver_sql("SELECT stored_bytes FROM device_usage").scalar_one() == 2 * len(PNG) + 30
    gallery.delete_event(principal, "cam1", old.id)
    gallery.delete_event(principal, "cam1", new.id)
    assert _counts_are_the_events(gallery)


def test_usage_written_while_a_start_kept_the_earlier_triggers_is_counted_again(gallery: Gallery,
                                                                                principal: auth.Principal) -> None:
    """A start of this release that kept generation 1 (PostgreSQL's lock not had in time) stores
    thumbnail sizes those triggers do not count; generation 2's took them away at the delete, and
    the device's usage went below 0 (a review's test). The replacement counts the table again."""
    before = _usage_generation_1()
    with gallery.db.engine.begin() as c:  # the column is there; the triggers are generation 1's
        postgres = c.dialect.name == "postgresql"
        for trigger in models.trigger_names(c):
            if before.owns(trigger):
                c.exec_driver_sql(f"DROP TRIGGER {trigger}{' ON events' if postgres else ''}")
        for statement in before.statements(postgres):
            c.exec_driver_sql(statement)
        c.exec_driver_sql("UPDATE trigger_generations SET generation = 1 WHERE kept_table = 'device_usage'")
    event = store(gallery, principal, name="kept.png", thumbnail=b"t" * 70)  # counted without its thumbnail
    gallery.db.create_tables()
    assert _recorded(gallery) == CURRENT and _counts_are_the_events(gallery)
    gallery.delete_event(principal, "cam1", event.id)
    with gallery.db.engine.connect() as c:
        assert c.exec_driver_sql("SELECT stored_bytes FROM device_usage").scalar_one() == 0
    assert _counts_are_the_events(gallery)


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
    _writes(gallery, principal)
    assert _counts_are_the_events(gallery)


def test_generation_1_is_replaced_and_an_unlisted_update_then_draws_no_version(gallery: Gallery,
                                                                              principal: auth.Principal) -> None:
    """The upgrade from the release of the morning of 2026-12-01, whose UPDATE trigger fired on any
    column: its own statements (their digest is generation 1's), recorded as generation 1."""
    kept = next(kept for kept in models._KEPT_TABLES if kept.model is models.ListingVersion)
    generation_1 = dataclasses.replace(kept, **{
        database: tuple(s.replace(models._UPDATE_OF_LISTED, "UPDATE") for s in kept.statements(database == "postgres"))
        for database in ("sqlite", "postgres")})
    assert _digest(generation_1) == GENERATIONS["listing_versions"][1]
    store(gallery, principal)
    expected = _triggers(gallery)
    with gallery.db.engine.begin() as c:
        _drop_version_triggers(c)
        for statement in generation_1.statements(c.dialect.name == "postgresql"):
            c.exec_driver_sql(statement)
        _set_generation(c, 1)
    before = versions(gallery.db)["cam1"]
    with gallery.db.engine.begin() as c:
        c.exec_driver_sql("UPDATE events SET thumbnail_attempts = thumbnail_attempts + 1")
    assert versions(gallery.db)["cam1"] != before  # generation 1: any UPDATE
    gallery.db.create_tables()
    assert _triggers(gallery) == expected and _recorded(gallery)["listing_versions"] == CURRENT["listing_versions"]
    before = versions(gallery.db)["cam1"]
    with gallery.db.engine.begin() as c:
        c.exec_driver_sql("UPDATE events SET thumbnail_attempts = thumbnail_attempts + 1")
    assert versions(gallery.db)["cam1"] == before
    assert _a_mime_type_change_draws_a_version(gallery)


@pytest.mark.parametrize("generation", [1, 99, None], ids=["an earlier one", "a later one", "none recorded"])
def test_a_listing_on_another_generations_triggers_keeps_no_page_and_gives_no_tag(
    gallery: Gallery, principal: auth.Principal, caplog: pytest.LogCaptureFixture, generation: int | None,
) -> None:
    """Triggers a start kept (it could not replace them in time, or they are a newer release's)
    may name fewer columns than this release lists: a change of another would draw no version, so
    no page read at a version may stand for a later one. Each page is read, and carries no tag."""
    store(gallery, principal)
    current = Listing(gallery.db, cache_bytes=1 << 20)
    tag = current.answer("json", "cam1").etag
    assert tag and current.answer("json", "cam1", if_none_match=tag).page is None
    with gallery.db.engine.begin() as c:
        _set_generation(c, generation)
    listing = Listing(gallery.db, cache_bytes=1 << 20)
    with caplog.at_level(logging.WARNING, logger="gallery_server.listing"):
        for printed in ("json", "rows", "json", "rows"):
            answer = listing.answer(printed, "cam1", if_none_match=tag)  # type: ignore[arg-type]
            assert answer.page == current.answer(printed, "cam1").page and answer.etag == ""
    assert (listing.kept.served_kept, listing.kept.served_read) == (0, 4)
    assert [r.getMessage() for r in caplog.records if r.name == "gallery_server.listing"] == [  # once
        "listing versions are drawn by another release's triggers: pages are neither kept nor tagged until they are"
        " this release's (looked at every 30 s)"]


def test_a_listing_looks_again_at_the_triggers_generation_and_drops_what_it_kept_at_each_change(
    gallery: Gallery, principal: auth.Principal, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server that started beside triggers it could not replace trusts the versions once another
    replica's start has replaced them, and stops trusting them once a newer release's are in; each
    time it drops the pages it kept, which a change the triggers missed in between may have left
    stale. It looks every GENERATION_LOOK_SECONDS, and not between."""
    store(gallery, principal)
    with gallery.db.engine.begin() as c:
        _set_generation(c, 1)
    listing = Listing(gallery.db, cache_bytes=1 << 20)
    untagged = listing.answer("json", "cam1")
    assert untagged.etag == "" and listing.kept.kept_bytes == 0

    with gallery.db.engine.begin() as c:
        _set_generation(c, CURRENT["listing_versions"])
    assert listing.answer("json", "cam1").etag == ""  # not looked at again within the interval
    caplog.clear()  # of the first look's warning (the test above)
    monkeypatch.setattr(listing_module, "GENERATION_LOOK_SECONDS", 0.0)
    listing._look_at = 0.001  # the interval has run out; 0 would be a first look
    with caplog.at_level(logging.INFO, logger="gallery_server.listing"):
        tagged = listing.answer("json", "cam1")
        assert tagged.etag and tagged.page == untagged.page and listing.kept.kept_bytes > 0
        assert listing.answer("json", "cam1", if_none_match=tagged.etag).page is None
        assert listing.answer("json", "cam1").page == tagged.page and listing.kept.served_kept == 1

        with gallery.db.engine.begin() as c:  # a change the triggers see, then a newer release's triggers
            c.exec_driver_sql("UPDATE events SET name = 'renamed.jpg'")
            _set_generation(c, 99)
        answer = listing.answer("json", "cam1", if_none_match=tagged.etag)
        assert answer.etag == "" and b'"renamed.jpg"' in answer.page and listing.kept.kept_bytes == 0
    assert [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "gallery_server.listing"] == [
        ("INFO", "listing versions are drawn by this release's triggers again: pages are kept and tagged"),
        ("WARNING", "listing versions are drawn by another release's triggers: pages are neither kept nor tagged"
                    " until they are this release's (looked at every 0 s)"),
    ]


@pytest.fixture
def a_later_releases_listing_triggers(gallery: Gallery) -> None:
    """Recorded before the server starts, which leaves a later generation as it is."""
    with gallery.db.engine.begin() as c:
        _set_generation(c, 99)


def test_a_server_on_another_releases_listing_triggers_sends_no_etag(
    gallery: Gallery, a_later_releases_listing_triggers: None, grpc_port: int, mint: Callable[..., str],
) -> None:
    token = [("authorization", f"Bearer {mint(devices=['cam1'])}")]
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = gallery_pb2_grpc.GalleryServiceStub(channel)
        body, call = stub.ListEventsJson.with_call(pb.ListEventsRequest(device="cam1"),
                                                   metadata=[*token, ("if-none-match", "*")])
    headers = dict(call.initial_metadata())
    assert body.data == b"[]" and "etag" not in headers and "x-http-status" not in headers
    assert headers["cache-control"] and "x-next-page-token" in headers
