"""Pages kept by the listing (listing.PageCache), on SQLite and PostgreSQL: a page asked for again
costs one lookup of its device's listing version (models.ListingVersion), and whatever writes the
events (this server, another replica, another tool in SQL) is in the next page served."""

from __future__ import annotations

import datetime
import json
import threading
from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa
from sqlmodel import SQLModel

from gallery_server import auth, listing
from gallery_server.db import Database
from gallery_server.listing import Listing
from gallery_server.models import Event
from gallery_server.service import Gallery
from gallery_server.storage import Storage

from ..conftest import statements_run
from .test_service import JPEG, store

EVENTS = Event.__table__  # type: ignore[attr-defined]


def _row(i: int, device: str = "cam1") -> dict[str, object]:
    return {
        "id": f"evt_sql{i:019d}", "device": device, "name": f"sql-{i}.bin", "media_type": "other",
        "mime_type": "application/octet-stream", "size": 10 + i, "sha256": "0" * 64, "has_thumbnail": False,
        "metadata_json": "{}", "created": datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC) + datetime.timedelta(
            seconds=i), "state": "stored", "thumbnail_state": "", "thumbnail_attempts": 0, "media_info_json": "",
    }


@pytest.fixture
def replica(gallery: Gallery) -> Iterator[Gallery]:
    """Another Gallery on the same database, as another replica (or process) has: its own pool
    and its own kept pages."""
    db = Database(gallery.settings.database_url, pool_size=2)
    yield Gallery(gallery.settings, db, Storage(gallery.settings.data_dir))
    db.dispose()


def truth(gallery: Gallery, **request: object) -> tuple[bytes, str]:
    """The page as the database answers it now, printed by the same code, keeping nothing."""
    return Listing(gallery.db).page_json("cam1", **request)


def versions(db: Database) -> dict[str, int]:
    with db.engine.connect() as c:
        return {d: int(v) for d, v in c.execute(sa.text("SELECT device, version FROM listing_versions"))}


def test_a_page_asked_for_again_costs_one_lookup_of_its_version(gallery: Gallery, principal: auth.Principal) -> None:
    stored = [store(gallery, principal, name=f"{i}.png") for i in range(3)]
    first = gallery.list_page_json(principal, "cam1", limit=2)
    rows = gallery.list_page(principal, "cam1", limit=2)
    with statements_run(gallery.db) as statements:
        again_json = gallery.list_page_json(principal, "cam1", limit=2)
        again = gallery.list_page(principal, "cam1", limit=2)
    assert again_json == first == truth(gallery, limit=2)
    assert len(statements) == 2 and all("listing_versions" in s and "events" not in s for s in statements), statements
    assert again == rows and [e.id for e in again[0]] == [e.id for e in stored[::-1][:2]]
    again[0].clear()  # what a caller does with its list is not kept
    assert [e.id for e in gallery.list_page(principal, "cam1", limit=2)[0]] == [e.id for e in stored[::-1][:2]]


@pytest.mark.parametrize("printed", ["by the database", "by Python"])
def test_a_page_is_kept_under_the_version_it_was_read_at(gallery: Gallery, principal: auth.Principal,
                                                         monkeypatch: pytest.MonkeyPatch, printed: str) -> None:
    """A write committed right after a page's read: the page kept must not be served for the
    version after that write. (A version read after the page would name the write the page
    lacks.) The database's printer reads the version in the page's own statement; the rows (the
    native listing, and Python's printer) read it just before."""
    store(gallery, principal)
    method = "_read_page_json" if printed == "by the database" else "_read_page"
    read = getattr(listing.Listing, method)
    writes = iter([_row(1)])

    def read_then_write(self: Listing, *args: object) -> object:
        page = read(self, *args)
        for row in writes:  # once: another writer commits right after the page's read
            with gallery.db.engine.begin() as c:
                c.execute(EVENTS.insert(), row)
        return page

    monkeypatch.setattr(listing.Listing, method, read_then_write)
    list_page = gallery.list_page_json if printed == "by the database" else gallery.list_page
    before = list_page(principal, "cam1")
    assert "evt_sql" not in repr(before)
    after = list_page(principal, "cam1")
    assert after == (truth(gallery) if printed == "by the database" else Listing(gallery.db).page("cam1"))
    assert _row(1)["id"] in repr(after)


def _store(gallery: Gallery, principal: auth.Principal) -> None:
    store(gallery, principal, data=JPEG, name="new.jpg")


def _delete(gallery: Gallery, principal: auth.Principal) -> None:
    newest = json.loads(gallery.list_page_json(principal, "cam1", limit=1)[0])[0]
    gallery.delete_event(principal, "cam1", newest["id"])


def _sql(statement: str) -> Callable[[Gallery, auth.Principal], None]:
    def run(gallery: Gallery, _: auth.Principal) -> None:
        with gallery.db.engine.begin() as c:
            c.execute(sa.text(statement))
    run.__name__ = statement
    return run


@pytest.mark.parametrize("write", [
    _store,
    _delete,
    _sql("UPDATE events SET name = 'renamed.png' WHERE name = '1.png'"),
    _sql("UPDATE events SET has_thumbnail = TRUE WHERE name = '1.png'"),
    _sql("UPDATE events SET state = 'on_device' WHERE name = '1.png'"),
    _sql("UPDATE events SET device = 'cam2' WHERE name = '1.png'"),  # no code path does; another tool may
    _sql("DELETE FROM events WHERE name = '0.png'"),
    _sql("INSERT INTO events SELECT * FROM events WHERE name = '1.png' AND 0 = 1"),  # no row: no change
], ids=lambda write: write.__name__)
@pytest.mark.parametrize("writer", ["this server", "another replica"])
def test_every_change_a_listing_shows_is_served_at_once(gallery: Gallery, replica: Gallery, principal: auth.Principal,
                                                       write: Callable[[Gallery, auth.Principal], None],
                                                       writer: str) -> None:
    for i in range(3):
        store(gallery, principal, name=f"{i}.png")
    store(gallery, principal, device="cam2", name="other.png")
    pages = [gallery.list_page_json(principal, device) for device in ("cam1", "cam2")]
    assert pages == [gallery.list_page_json(principal, device) for device in ("cam1", "cam2")]  # kept now
    write(replica if writer == "another replica" else gallery, principal)
    for device in ("cam1", "cam2"):
        assert gallery.list_page_json(principal, device) == Listing(gallery.db).page_json(device)
        assert gallery.list_page(principal, device) == Listing(gallery.db).page(device)


def test_a_change_no_listing_shows_keeps_the_page(gallery: Gallery, principal: auth.Principal) -> None:
    for i in range(3):
        store(gallery, principal, name=f"{i}.png")
    before = versions(gallery.db)
    page = gallery.list_page_json(principal, "cam1")
    with gallery.db.engine.begin() as c:
        c.execute(sa.text("UPDATE events SET thumbnail_attempts = 3, metadata_json = '{\"a\": 1}', "
                          "media_info_json = '{}', thumbnail_state = 'failed'"))
    assert versions(gallery.db) == before
    with statements_run(gallery.db) as statements:
        assert gallery.list_page_json(principal, "cam1") == page
    assert len(statements) == 1, statements


def test_versions_only_grow(gallery: Gallery, principal: auth.Principal) -> None:
    """A device's last event deleted keeps its row; TRUNCATE (PostgreSQL) raises every row. A
    number never comes back, so a page kept under it is never taken for other events."""
    event = store(gallery, principal)
    stored = versions(gallery.db)
    assert list(stored) == ["cam1"] and stored["cam1"] >= 1
    gallery.delete_event(principal, "cam1", event.id)
    assert versions(gallery.db) == {"cam1": stored["cam1"] + 1}
    assert gallery.list_page_json(principal, "cam1") == (b"[]", "")
    if gallery.db.engine.dialect.name == "postgresql":
        store(gallery, principal)
        store(gallery, principal, device="cam2")
        before = versions(gallery.db)
        kept = gallery.list_page_json(principal, "cam2")
        with gallery.db.engine.begin() as c:
            c.execute(sa.text("TRUNCATE events"))
        assert versions(gallery.db) == {device: version + 1 for device, version in before.items()}
        assert gallery.list_page_json(principal, "cam2") == (b"[]", "") != kept


def test_a_database_from_before_the_versions_gets_them_on_upgrade(gallery: Gallery, replica: Gallery,
                                                                 principal: auth.Principal) -> None:
    store(gallery, principal)
    store(gallery, principal, device="cam2")
    with gallery.db.engine.begin() as c:  # an older schema: no versions table, no triggers
        c.execute(sa.text("DROP TABLE listing_versions"))
        on = " ON events" if c.dialect.name == "postgresql" else ""
        for trigger in ("events_listing_insert", "events_listing_delete", "events_listing_update",
                        "events_listing", "events_listing_truncate"):
            c.execute(sa.text(f"DROP TRIGGER IF EXISTS {trigger}{on}"))
    gallery.db.create_tables()
    assert versions(gallery.db) == {"cam1": 1, "cam2": 1}
    page = gallery.list_page_json(principal, "cam1")
    store(replica, principal, data=JPEG)
    assert gallery.list_page_json(principal, "cam1") == truth(gallery) != page


def test_kept_pages_are_bounded_in_bytes(gallery: Gallery, principal: auth.Principal) -> None:
    for i in range(12):
        store(gallery, principal, name=f"{i}.png")
    small = Listing(gallery.db, cache_bytes=6000)
    for limit in range(1, 13):
        small.page_json("cam1", limit=limit)
        small.page("cam1", limit=limit)
        assert small._kept._pages.currsize <= 6000
    with statements_run(gallery.db) as statements:
        last = small.page_json("cam1", limit=12)  # the last kept: a lookup
    assert len(statements) == 1 and "FROM events" not in statements[0], statements
    with statements_run(gallery.db) as statements:
        first = small.page_json("cam1", limit=1)  # gone first: read again
    assert len(statements) == 1 and "FROM events" in statements[0], statements
    assert (last, first) == (truth(gallery, limit=12), truth(gallery, limit=1))
    tiny = Listing(gallery.db, cache_bytes=100)  # no page fits: each is served, none kept
    expected = truth(gallery)
    assert tiny.page_json("cam1") == expected
    with statements_run(gallery.db) as statements:
        again = tiny.page_json("cam1")
    assert again == expected and len(statements) == 1 and "FROM events" in statements[0], statements


def test_none_kept_with_no_bytes_for_them(gallery: Gallery, principal: auth.Principal) -> None:
    """GALLERY_LIST_CACHE_BYTES=0: every page is read, the rows without a lookup of the version."""
    store(gallery, principal)
    none = Listing(gallery.db, cache_bytes=0)
    expected = (truth(gallery), Listing(gallery.db).page("cam1"))
    assert none.page_json("cam1") == expected[0]  # its first also looks at SQLite's JSON functions
    for _ in range(2):
        with statements_run(gallery.db) as statements:
            answered = (none.page_json("cam1"), none.page("cam1"))
        assert answered == expected
        assert len(statements) == 2 and all("FROM events" in s for s in statements), statements


def test_each_writer_lists_its_own_write_among_concurrent_ones(gallery: Gallery, replica: Gallery,
                                                               principal: auth.Principal) -> None:
    """Four threads on two replicas, each storing or deleting an event and then listing: every
    listing holds what its own thread just did, whatever the others did meanwhile; at the end
    every page served is the database's."""
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        server = (gallery, replica)[n % 2]
        try:
            for i in range(15):
                event = store(server, principal, name=f"w{n}-{i}.png")
                listed = [e["id"] for e in json.loads(server.list_page_json(principal, "cam1", limit=100)[0])]
                assert event.id in listed, (n, i)
                if i % 3 == 0:
                    server.delete_event(principal, "cam1", event.id)
                    assert event.id not in [e.id for e in server.list_page(principal, "cam1", limit=100)[0]]
        except BaseException as exc:  # noqa: BLE001 - raised below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for server in (gallery, replica):
        for request in ({}, {"limit": 7}, {"limit": 100}, {"order": "oldest", "limit": 9}):
            assert server.list_page_json(principal, "cam1", **request) == truth(gallery, **request)
    assert len(json.loads(truth(gallery, limit=100)[0])) == 4 * 15 - 4 * 5


def test_the_triggers_name_every_listed_column() -> None:
    """An UPDATE of any column a listing shows raises the version (models._LISTED)."""
    from gallery_server import listing_json, models

    assert models._LISTED.split(", ") == list(listing_json.LISTED_COLUMNS)
    assert set(listing_json.LISTED_COLUMNS) <= set(SQLModel.metadata.tables["events"].c.keys())
