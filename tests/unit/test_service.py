"""Gallery operations on both databases (the `gallery` fixture runs on SQLite and PostgreSQL)."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import subprocess
import sys
import textwrap

import pytest
import sqlalchemy as sa

from gallery_server import auth, media_types, service
from gallery_server.errors import (
    AlreadyExists,
    CommitOutcomeUnknown,
    DatabaseUnavailable,
    DataLoss,
    Exhausted,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    TooLarge,
)
from gallery_server.models import Event
from gallery_server.reconcile import Reconciler
from gallery_server.service import Gallery

from ..conftest import event_commit_fails, statements_run, stored_files

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 64
PDF = b"%PDF-1.7\n" + b"x" * 100


def store(
    gallery: Gallery,
    principal: auth.Principal,
    device: str = "cam1",
    data: bytes = PNG,
    *,
    name: str = "photo.png",
    media_type: str = "",
    thumbnail: bytes | None = None,
    metadata_json: str = "{}",
    declared_size: int | None = None,
    declared_sha256: str = "",
    event_id: str | None = None,
) -> Event:
    with gallery.begin_upload(principal, device) as upload:
        upload.fields.name = name
        upload.fields.media_type = media_type
        upload.fields.metadata_json = metadata_json
        upload.fields.declared_size = declared_size
        upload.fields.declared_sha256 = declared_sha256
        upload.write_media(data)
        if thumbnail is not None:
            upload.write_thumbnail(thumbnail)
        return gallery.store(upload, event_id=event_id)


def row_count(gallery: Gallery) -> int:
    with gallery.db.session() as session:
        return session.exec(sa.select(sa.func.count()).select_from(Event)).one()[0]  # type: ignore[call-overload]


def as_utc(value: datetime.datetime) -> datetime.datetime:
    return value.replace(tzinfo=datetime.UTC) if value.tzinfo is None else value.astimezone(datetime.UTC)


@pytest.fixture
def fixed_clock(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Set service.utcnow; returns a setter."""
    def set_time(value: datetime.datetime) -> None:
        monkeypatch.setattr(service, "utcnow", lambda: value)
    return set_time


def other_principal(devices: frozenset[str] = frozenset({"cam2"})) -> auth.Principal:
    return auth.Principal("other", devices, frozenset({auth.READ, auth.WRITE}))


# -- store and get --------------------------------------------------------------------------------


def test_store_and_get(gallery: Gallery, principal: auth.Principal) -> None:
    before = datetime.datetime.now(datetime.UTC)
    event = store(gallery, principal, data=PNG, thumbnail=JPEG, metadata_json='{"a":1}')
    assert event.id.startswith("evt_")
    got = gallery.get_event(principal, "cam1", event.id)
    assert got.id == event.id
    assert got.device == "cam1"
    assert got.name == "photo.png"
    assert got.media_type == "image"
    assert got.mime_type == "image/png"
    assert got.size == len(PNG)
    assert got.sha256 == hashlib.sha256(PNG).hexdigest()
    assert got.has_thumbnail is True
    assert json.loads(got.metadata_json) == {"a": 1}
    created = as_utc(got.created)
    assert before - datetime.timedelta(seconds=1) <= created <= datetime.datetime.now(datetime.UTC)
    storage = gallery.storage
    assert storage.media_path("cam1", event.id).read_bytes() == PNG
    assert storage.thumbnail_path("cam1", event.id).read_bytes() == JPEG
    assert list(storage.staging_root.iterdir()) == []


def test_store_without_thumbnail(gallery: Gallery, principal: auth.Principal) -> None:
    event = store(gallery, principal, data=PDF, name="doc.pdf")
    assert event.has_thumbnail is False
    assert event.media_type == "document"
    assert not gallery.storage.thumbnail_path("cam1", event.id).exists()


def test_store_empty_file(gallery: Gallery, principal: auth.Principal) -> None:
    event = store(gallery, principal, data=b"", name="empty.bin")
    assert event.size == 0
    assert event.sha256 == hashlib.sha256(b"").hexdigest()
    assert gallery.storage.media_path("cam1", event.id).read_bytes() == b""


def test_store_name_is_normalised_and_never_a_path(gallery: Gallery, principal: auth.Principal) -> None:
    event = store(gallery, principal, name="../../cafe\u0301.png")
    assert event.name == "../../caf\u00e9.png"
    assert gallery.storage.media_path("cam1", event.id).parent == gallery.storage.media_root / "cam1"
    assert [p.name for p in (gallery.storage.media_root / "cam1").iterdir()] == [event.id]


def test_store_explicit_media_type_wins(gallery: Gallery, principal: auth.Principal) -> None:
    assert store(gallery, principal, data=PNG, media_type="document").media_type == "document"


def test_store_declared_size_and_sha256_matching(gallery: Gallery, principal: auth.Principal) -> None:
    event = store(gallery, principal, declared_size=len(PNG), declared_sha256=hashlib.sha256(PNG).hexdigest())
    assert event.size == len(PNG)


def test_failed_store_leaves_nothing(gallery: Gallery, principal: auth.Principal) -> None:
    for kwargs, reason in [
        ({"declared_sha256": "0" * 64}, "SHA256_MISMATCH"),
        ({"declared_sha256": "XYZ"}, "INVALID_SHA256"),
        ({"declared_size": len(PNG) + 1}, "SIZE_MISMATCH"),
        ({"name": ""}, "NAME_REQUIRED"),
        ({"name": "a\u202eb"}, "NAME_INVALID"),
        ({"media_type": "picture"}, "INVALID_MEDIA_TYPE"),
    ]:
        with pytest.raises(InvalidArgument) as info:
            store(gallery, principal, thumbnail=JPEG, **kwargs)
        assert info.value.reason == reason
        assert row_count(gallery) == 0
        assert stored_files(gallery.settings.data_dir) == [], reason


def test_declared_size_smaller_than_received_fails_while_streaming(
    gallery: Gallery, principal: auth.Principal
) -> None:
    with gallery.begin_upload(principal, "cam1") as upload:
        upload.fields.declared_size = 3
        upload.write_media(b"abc")
        with pytest.raises(InvalidArgument) as info:
            upload.write_media(b"d")
        assert info.value.reason == "SIZE_MISMATCH"
    assert stored_files(gallery.settings.data_dir) == []


def test_upload_too_large(gallery: Gallery, principal: auth.Principal) -> None:
    with gallery.open_upload("cam1", max_media_bytes=4) as upload:
        upload.write_media(b"abcd")
        with pytest.raises(TooLarge) as info:
            upload.write_media(b"e")
        assert info.value.reason == "UPLOAD_TOO_LARGE"
    assert stored_files(gallery.settings.data_dir) == []


def test_store_without_media(gallery: Gallery, principal: auth.Principal) -> None:
    with gallery.begin_upload(principal, "cam1") as upload:
        upload.fields.name = "x"
        with pytest.raises(InvalidArgument) as info:
            gallery.store(upload)
    assert info.value.reason == "EVENT_FILE_REQUIRED"
    assert row_count(gallery) == 0 and stored_files(gallery.settings.data_dir) == []


def test_store_thumbnail_promised_but_missing(gallery: Gallery, principal: auth.Principal) -> None:
    with gallery.begin_upload(principal, "cam1") as upload:
        upload.fields.name = "x"
        upload.fields.thumbnail_promised = True
        upload.write_media(b"data")
        with pytest.raises(InvalidArgument) as info:
            gallery.store(upload)
    assert info.value.reason == "THUMBNAIL_MISSING"
    assert row_count(gallery) == 0 and stored_files(gallery.settings.data_dir) == []


def test_db_failure_during_insert_removes_moved_files(gallery: Gallery, principal: auth.Principal) -> None:
    first = store(gallery, principal, data=PNG)
    # A second store under an id that already exists fails in the INSERT.
    with pytest.raises(sa.exc.IntegrityError):
        store(gallery, principal, "cam2", data=JPEG, thumbnail=JPEG, event_id=first.id)
    assert row_count(gallery) == 1
    assert list(gallery.storage.staging_root.iterdir()) == []
    assert not gallery.storage.media_path("cam2", first.id).exists()
    assert not gallery.storage.thumbnail_path("cam2", first.id).exists()


def test_db_failure_during_insert_hook_removes_moved_files(gallery: Gallery, principal: auth.Principal) -> None:
    def boom(session, event):  # type: ignore[no-untyped-def]
        raise RuntimeError("database went away")

    with gallery.begin_upload(principal, "cam1") as upload:
        upload.fields.name = "a.png"
        upload.write_media(PNG)
        upload.write_thumbnail(JPEG)
        with pytest.raises(RuntimeError):
            gallery.store(upload, before_insert=boom)
    assert row_count(gallery) == 0
    assert stored_files(gallery.settings.data_dir) == []


def test_a_connection_lost_during_the_commit_keeps_the_files_for_reconciliation(
    gallery: Gallery, principal: auth.Principal
) -> None:
    """The COMMIT may have gone through when its connection goes: the files stay (a row, if
    written, has them), the caller is told to try again, and an orphan is reconciliation's."""
    if gallery.db.engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL's backend ends the connection during the COMMIT")
    with event_commit_fails(gallery.db), gallery.begin_upload(principal, "cam1") as upload:
        upload.fields.name = "a.png"
        upload.write_media(PNG)
        upload.write_thumbnail(JPEG)
        with pytest.raises(CommitOutcomeUnknown):
            gallery.store(upload)
    assert row_count(gallery) == 0  # this time the COMMIT had not gone through
    [media, thumbnail] = sorted(stored_files(gallery.settings.data_dir), key=lambda path: path.suffix)
    assert media.read_bytes() == PNG and thumbnail.read_bytes() == JPEG
    assert list(gallery.storage.staging_root.iterdir()) == []
    kept = store(gallery, principal, "cam2", PDF)  # the database names a file here: orphans may go
    findings = Reconciler(gallery, grace_seconds=0).run_once()
    assert (findings.orphan_media_removed, findings.orphan_thumbnails_removed) == (1, 1)
    assert stored_files(gallery.settings.data_dir) == [gallery.storage.media_path("cam2", kept.id)]


def test_a_commit_the_database_refuses_takes_the_files_back(gallery: Gallery, principal: auth.Principal) -> None:
    """Refused (here as a deadlock, which may pass on a retry): nothing was written, so nothing
    stays; the caller is told to try again."""
    if gallery.db.engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL's deferred trigger refuses the COMMIT")
    with event_commit_fails(gallery.db, sqlstate="40P01"), gallery.begin_upload(principal, "cam1") as upload:
        upload.fields.name = "a.png"
        upload.write_media(PNG)
        upload.write_thumbnail(JPEG)
        with pytest.raises(DatabaseUnavailable) as raised:
            gallery.store(upload)
    assert not isinstance(raised.value, CommitOutcomeUnknown)
    assert row_count(gallery) == 0
    assert stored_files(gallery.settings.data_dir) == []


def test_failed_insert_under_existing_id_keeps_existing_event_intact(
    gallery: Gallery, principal: auth.Principal
) -> None:
    # A row never exists without its file: a store that fails must not touch another event's files.
    first = store(gallery, principal, data=PNG, thumbnail=JPEG)
    with pytest.raises(AlreadyExists):
        store(gallery, principal, data=PDF, thumbnail=b"other thumb", event_id=first.id)
    assert row_count(gallery) == 1
    assert gallery.get_event(principal, "cam1", first.id).sha256 == hashlib.sha256(PNG).hexdigest()
    media = gallery.storage.media_path("cam1", first.id)
    thumb = gallery.storage.thumbnail_path("cam1", first.id)
    assert media.exists() and media.read_bytes() == PNG
    assert thumb.exists() and thumb.read_bytes() == JPEG
    assert list(gallery.storage.staging_root.iterdir()) == []


# -- list -----------------------------------------------------------------------------------------

T0 = datetime.datetime(2024, 5, 1, 12, 0, 0, tzinfo=datetime.UTC)


def test_list_newest_first(gallery: Gallery, principal: auth.Principal, fixed_clock) -> None:  # type: ignore[no-untyped-def]
    ids = []
    for minutes in (5, 1, 9, 3):
        fixed_clock(T0 + datetime.timedelta(minutes=minutes))
        ids.append((minutes, store(gallery, principal, name=f"{minutes}.png").id))
    listed = gallery.list_events(principal, "cam1")
    assert [e.id for e in listed] == [i for _, i in sorted(ids, reverse=True)]
    assert [as_utc(e.created) for e in listed] == [
        T0 + datetime.timedelta(minutes=m) for m in (9, 5, 3, 1)
    ]


def test_list_microsecond_order(gallery: Gallery, principal: auth.Principal, fixed_clock) -> None:  # type: ignore[no-untyped-def]
    a_time, b_time = T0, T0 + datetime.timedelta(microseconds=1)
    fixed_clock(b_time)
    b = store(gallery, principal, event_id="evt_" + "A" * 22)
    fixed_clock(a_time)
    a = store(gallery, principal, event_id="evt_" + "z" * 22)
    assert [e.id for e in gallery.list_events(principal, "cam1")] == [b.id, a.id]


def test_list_ties_broken_by_id_descending(gallery: Gallery, principal: auth.Principal, fixed_clock) -> None:  # type: ignore[no-untyped-def]
    fixed_clock(T0)
    ids = [store(gallery, principal).id for _ in range(6)]
    listed = [e.id for e in gallery.list_events(principal, "cam1")]
    assert listed == sorted(ids, reverse=True)


def test_list_offset_and_limit(gallery: Gallery, principal: auth.Principal, fixed_clock) -> None:  # type: ignore[no-untyped-def]
    ids = []
    for i in range(7):
        fixed_clock(T0 + datetime.timedelta(seconds=i))
        ids.append(store(gallery, principal).id)
    newest_first = ids[::-1]
    assert [e.id for e in gallery.list_events(principal, "cam1", limit=3)] == newest_first[:3]
    assert [e.id for e in gallery.list_events(principal, "cam1", limit=3, offset=3)] == newest_first[3:6]
    assert [e.id for e in gallery.list_events(principal, "cam1", limit=3, offset=6)] == newest_first[6:]
    assert gallery.list_events(principal, "cam1", offset=7) == []
    assert gallery.list_events(principal, "cam1", offset=10**6) == []
    assert [e.id for e in gallery.list_events(principal, "cam1", limit=1, offset=0)] == newest_first[:1]
    assert len(gallery.list_events(principal, "cam1", limit=1000)) == 7


def test_list_default_limit_is_50(gallery: Gallery, principal: auth.Principal, fixed_clock) -> None:  # type: ignore[no-untyped-def]
    fixed_clock(T0)
    for _ in range(51):
        store(gallery, principal, data=b"x", name="x.bin")
    assert len(gallery.list_events(principal, "cam1")) == 50
    assert len(gallery.list_events(principal, "cam1", offset=50)) == 1


def test_list_media_type_filter(gallery: Gallery, principal: auth.Principal) -> None:
    image = store(gallery, principal, data=PNG)
    doc = store(gallery, principal, data=PDF, name="a.pdf")
    other = store(gallery, principal, data=b"\x00\x01", name="blob")
    assert [e.id for e in gallery.list_events(principal, "cam1", media_type="image")] == [image.id]
    assert [e.id for e in gallery.list_events(principal, "cam1", media_type="document")] == [doc.id]
    assert [e.id for e in gallery.list_events(principal, "cam1", media_type="other")] == [other.id]
    assert gallery.list_events(principal, "cam1", media_type="video") == []
    assert {e.id for e in gallery.list_events(principal, "cam1", media_type="")} == {image.id, doc.id, other.id}


def test_list_only_the_device(gallery: Gallery, principal: auth.Principal) -> None:
    mine = store(gallery, principal, "cam1")
    store(gallery, principal, "cam2")
    store(gallery, principal, "cam10")
    assert [e.id for e in gallery.list_events(principal, "cam1")] == [mine.id]
    assert gallery.list_events(principal, "cam3") == []


def test_list_invalid_arguments(gallery: Gallery, principal: auth.Principal) -> None:
    for kwargs, reason in [
        ({"media_type": "Image"}, "INVALID_MEDIA_TYPE"),
        ({"limit": 0}, "INVALID_LIMIT"),
        ({"limit": 1001}, "INVALID_LIMIT"),
        ({"offset": -1}, "INVALID_OFFSET"),
    ]:
        with pytest.raises(InvalidArgument) as info:
            gallery.list_events(principal, "cam1", **kwargs)  # type: ignore[arg-type]
        assert info.value.reason == reason


def test_invalid_device_everywhere(gallery: Gallery, principal: auth.Principal) -> None:
    calls = [
        lambda: gallery.list_events(principal, "../x"),
        lambda: gallery.get_event(principal, "../x", "evt_" + "a" * 22),
        lambda: gallery.delete_event(principal, "../x", "evt_" + "a" * 22),
        lambda: gallery.stats(principal, "../x"),
        lambda: gallery.device_paths(principal, "../x"),
        lambda: gallery.begin_upload(principal, "../x"),
    ]
    for call in calls:
        with pytest.raises(InvalidArgument) as info:
            call()
        assert info.value.reason == "INVALID_DEVICE_ID"


# -- get ------------------------------------------------------------------------------------------


def test_get_not_found(gallery: Gallery, principal: auth.Principal) -> None:
    with pytest.raises(NotFound) as info:
        gallery.get_event(principal, "cam1", "evt_" + "a" * 22)
    assert info.value.reason == "EVENT_NOT_FOUND"


def test_get_event_of_another_device_is_not_found(gallery: Gallery, principal: auth.Principal) -> None:
    event = store(gallery, principal, "cam2")
    with pytest.raises(NotFound):
        gallery.get_event(principal, "cam1", event.id)


def test_get_event_is_one_select_and_answers_what_the_orm_loads(gallery: Gallery, principal: auth.Principal) -> None:
    stored = store(gallery, principal, thumbnail=PNG, metadata_json='{"lens": "wide"}')
    with statements_run(gallery.db) as statements:
        event = gallery.get_event(principal, "cam1", stored.id)
    # One statement, and no BEGIN or ROLLBACK around it (SQLite's trace would show them).
    assert len(statements) == 1 and statements[0].lstrip().upper().startswith("SELECT"), statements
    with gallery.db.session() as session:
        loaded = session.get(Event, stored.id)
    assert loaded is not None
    assert event.model_dump() == loaded.model_dump()
    assert event.created.tzinfo is not None and event.has_thumbnail is True


def test_a_native_page_is_one_select_of_named_rows(gallery: Gallery, principal: auth.Principal) -> None:
    """After the one-row lookup of the device's listing version (listing.PageCache)."""
    stored = [store(gallery, principal, thumbnail=PNG if i else None) for i in range(3)]
    assert gallery.listing.versions_current()  # looked at by a server's first listing (and every 30 s)
    with statements_run(gallery.db) as statements:
        events, token = gallery.list_page(principal, "cam1", limit=2)
    assert len(statements) == 2 and "listing_versions" in statements[0], statements
    assert statements[1].lstrip().upper().startswith("SELECT") and "FROM events" in statements[1], statements
    assert [e.id for e in events] == [e.id for e in stored[::-1][:2]] and token
    assert [(e.has_thumbnail, e.size, e.created.tzinfo is not None) for e in events] == [(True, len(PNG), True)] * 2


def test_get_event_in_a_fresh_process(tmp_path) -> None:
    """As in a server whose first request is a read: no ORM call has run before get_event."""
    script = textwrap.dedent(f"""
        import datetime, sqlite3
        from gallery_server import auth
        from gallery_server.db import Database
        from gallery_server.service import Gallery
        from gallery_server.settings import Settings
        url = "sqlite:///{tmp_path}/g.db"
        Database(url).create_tables()
        with sqlite3.connect("{tmp_path}/g.db") as db:
            db.execute("INSERT INTO events (id, device, name, media_type, mime_type, size, sha256, "
                       "has_thumbnail, metadata_json, created, state, thumbnail_state, thumbnail_attempts, "
                       "media_info_json) VALUES ('evt_aaaaaaaaaaaaaaaaaaaaaa', 'cam1', 'x.png', 'image', "
                       "'image/png', 7, '', 0, '{{}}', '2026-01-01 00:00:00.000000', 'stored', '', 0, '')")
        settings = Settings(data_dir="{tmp_path}", database_url=url, jwt_secret="x" * 48)
        principal = auth.Principal("t", frozenset({{"cam1"}}), frozenset({{auth.READ}}))
        event = Gallery(settings, Database(url), None).get_event(principal, "cam1", "evt_aaaaaaaaaaaaaaaaaaaaaa")
        print(event.name, event.size, event.created.isoformat())
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["x.png", "7", "2026-01-01T00:00:00+00:00"]


def test_get_invalid_event_id(gallery: Gallery, principal: auth.Principal) -> None:
    with pytest.raises(InvalidArgument) as info:
        gallery.get_event(principal, "cam1", "evt_short")
    assert info.value.reason == "INVALID_EVENT_ID"


# -- stats ----------------------------------------------------------------------------------------


def test_stats_empty(gallery: Gallery, principal: auth.Principal) -> None:
    stats = gallery.stats(principal, "cam1")
    assert stats == service.Stats(total_events=0, total_size=0, by_type={}, quota=None)


def test_stats_grouped_by_type(gallery: Gallery, principal: auth.Principal) -> None:
    store(gallery, principal, data=PNG)
    store(gallery, principal, data=JPEG, name="a.jpg")
    store(gallery, principal, data=PDF, name="a.pdf")
    store(gallery, principal, "cam2", data=b"x" * 1000, name="a.bin")
    stats = gallery.stats(principal, "cam1")
    assert stats.by_type == {
        "image": service.TypeStats(2, len(PNG) + len(JPEG)),
        "document": service.TypeStats(1, len(PDF)),
    }
    assert stats.total_events == 3
    assert stats.total_size == len(PNG) + len(JPEG) + len(PDF)
    assert all(type(t.count) is int and type(t.size) is int for t in stats.by_type.values())


def test_stats_large_sizes_are_exact(gallery: Gallery, principal: auth.Principal) -> None:
    # Sizes are BIGINT: sums beyond 2^31 and 2^32 must stay exact integers.
    big = 5 * (1 << 30) + 7
    for i in range(3):
        with gallery.db.session() as session:
            session.add(Event(
                id=f"evt_{i:022d}", device="cam1", name="big.mp4", media_type="video",
                mime_type="video/mp4", size=big, sha256="0" * 64, created=T0,
            ))
            session.commit()
    stats = gallery.stats(principal, "cam1")
    assert stats.by_type == {"video": service.TypeStats(3, 3 * big)}
    assert stats.total_size == 3 * big


def test_stats_read_from_counters_without_scanning_events(gallery: Gallery, principal: auth.Principal) -> None:
    for _ in range(3):
        store(gallery, principal)
    with statements_run(gallery.db) as statements:
        stats = gallery.stats(principal, "cam1")
    assert stats.total_events == 3
    selects = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    assert len(selects) == 1
    assert "event_counts" in selects[0]
    assert "FROM events" not in selects[0] and "GROUP BY" not in selects[0].upper()


# -- delete ---------------------------------------------------------------------------------------


def test_delete(gallery: Gallery, principal: auth.Principal) -> None:
    keep = store(gallery, principal, data=JPEG, thumbnail=JPEG)
    event = store(gallery, principal, thumbnail=JPEG)
    gallery.delete_event(principal, "cam1", event.id)
    assert not gallery.storage.media_path("cam1", event.id).exists()
    assert not gallery.storage.thumbnail_path("cam1", event.id).exists()
    with pytest.raises(NotFound):
        gallery.get_event(principal, "cam1", event.id)
    assert [e.id for e in gallery.list_events(principal, "cam1")] == [keep.id]
    assert gallery.storage.media_path("cam1", keep.id).exists()
    assert gallery.storage.thumbnail_path("cam1", keep.id).exists()
    with pytest.raises(NotFound) as info:
        gallery.delete_event(principal, "cam1", event.id)
    assert info.value.reason == "EVENT_NOT_FOUND"
    assert info.value.metadata == {"device": "cam1", "event_id": event.id}


def test_delete_never_existing(gallery: Gallery, principal: auth.Principal) -> None:
    with pytest.raises(NotFound):
        gallery.delete_event(principal, "cam1", "evt_" + "b" * 22)


def test_delete_through_another_device_is_not_found(gallery: Gallery, principal: auth.Principal) -> None:
    event = store(gallery, principal, "cam2")
    with pytest.raises(NotFound):
        gallery.delete_event(principal, "cam1", event.id)
    assert gallery.get_event(principal, "cam2", event.id).id == event.id
    assert gallery.storage.media_path("cam2", event.id).exists()


def test_delete_invalid_event_id(gallery: Gallery, principal: auth.Principal) -> None:
    with pytest.raises(InvalidArgument) as info:
        gallery.delete_event(principal, "cam1", "evt_../../../x")
    assert info.value.reason == "INVALID_EVENT_ID"


# -- authorization before existence --------------------------------------------------------------


def test_authorization_before_existence(gallery: Gallery, principal: auth.Principal) -> None:
    existing = store(gallery, principal, "cam1").id
    missing = "evt_" + "c" * 22
    outsider = other_principal()
    for event_id in (existing, missing, "not-even-valid"):
        for call in (gallery.get_event, gallery.delete_event):
            with pytest.raises(PermissionDenied) as info:
                call(outsider, "cam1", event_id)
            assert info.value.reason == "DEVICE_NOT_ALLOWED"
    for call in (gallery.list_events, gallery.stats, gallery.device_paths, gallery.begin_upload):
        with pytest.raises(PermissionDenied) as info:
            call(outsider, "cam1")  # type: ignore[operator]
        assert info.value.reason == "DEVICE_NOT_ALLOWED"
    assert gallery.get_event(principal, "cam1", existing).id == existing  # untouched


def test_scopes(gallery: Gallery, principal: auth.Principal) -> None:
    event = store(gallery, principal)
    reader = auth.Principal("r", frozenset({"cam1"}), frozenset({auth.READ}))
    writer = auth.Principal("w", frozenset({"cam1"}), frozenset({auth.WRITE}))
    assert gallery.get_event(reader, "cam1", event.id).id == event.id
    assert gallery.stats(reader, "cam1").total_events == 1
    for call in (
        lambda: gallery.delete_event(reader, "cam1", event.id),
        lambda: gallery.begin_upload(reader, "cam1"),
        lambda: gallery.list_events(writer, "cam1"),
        lambda: gallery.get_event(writer, "cam1", event.id),
        lambda: gallery.stats(writer, "cam1"),  # not device_paths: where to write is a writer's to know
    ):
        with pytest.raises(PermissionDenied) as info:
            call()
        assert info.value.reason == "SCOPE_MISSING"
    gallery.delete_event(writer, "cam1", event.id)
    assert stored_files(gallery.settings.data_dir) == []


def test_device_paths(gallery: Gallery, principal: auth.Principal) -> None:
    incoming, thumbnails = gallery.device_paths(principal, "device123")
    root = gallery.settings.data_dir / "gallery" / "device123"
    assert (incoming, thumbnails) == (root / "incoming", root / "thumbnails")
    assert incoming.is_dir() and thumbnails.is_dir()
    assert gallery.device_paths(principal, "device123") == (incoming, thumbnails)  # idempotent


def test_device_paths_are_made_only_for_a_token_that_may_store_into_them(gallery: Gallery) -> None:
    """A viewer's read-only token for every device made a folder for each id it asked about (4,000
    asked: 4,000 folders, each scanned by the importer every second)."""
    viewer = auth.Principal("viewer", frozenset({"*"}), frozenset({auth.READ}))
    root = gallery.settings.data_dir / "gallery" / "cam-9"
    assert gallery.device_paths(viewer, "cam-9") == (root / "incoming", root / "thumbnails")
    assert not root.exists()
    device = auth.Principal("cam-9", frozenset({"cam-9"}), frozenset({auth.READ, auth.DEVICE}))
    incoming, thumbnails = gallery.device_paths(device, "cam-9")
    assert incoming.is_dir() and thumbnails.is_dir()


@pytest.mark.parametrize("scope", [auth.WRITE, auth.DEVICE])
def test_a_token_that_may_only_store_is_told_its_drop_folders_and_gets_them_made(gallery: Gallery, scope: str) -> None:
    """Where to write is what a writer asks: an upload-only camera's token, an agent's."""
    writer = auth.Principal("cam-9", frozenset({"cam-9"}), frozenset({scope}))
    incoming, thumbnails = gallery.device_paths(writer, "cam-9")
    assert incoming.is_dir() and thumbnails.is_dir()
    admin = auth.Principal("ops", frozenset({"*"}), frozenset({auth.ADMIN}))
    with pytest.raises(PermissionDenied) as refused:
        gallery.device_paths(admin, "cam-9")
    assert refused.value.reason == "SCOPE_MISSING" and refused.value.metadata == {"scope": auth.READ}


# -- downloads -------------------------------------------------------------------------------------


def test_one_token_may_have_only_its_grants_part_of_the_native_downloads(gallery: Gallery) -> None:
    """Each holds a server thread while its client reads: a token may hold MAX_DOWNLOADS_PER_DEVICE
    for each device it grants, a token for every device half the share (threads.grant_share), so
    that one device's read token, stalling its reads, cannot refuse everyone else's."""
    per_device, share = service.MAX_DOWNLOADS_PER_DEVICE, gallery.max_downloads
    assert (per_device, share) == (4, 26)  # 256 threads, 48 of them uploads': an eighth of the rest

    def reader(*devices: str) -> auth.Principal:
        return auth.Principal("r", frozenset(devices), frozenset({auth.READ}))

    def refusal(principal: auth.Principal) -> str:
        with pytest.raises(Exhausted) as refused, gallery.download_slot(principal):
            pass
        assert refused.value.reason == "TOO_MANY_DOWNLOADS"
        return f"{refused.value.message} limit={refused.value.metadata['limit']}"

    with contextlib.ExitStack() as held:
        for _ in range(per_device):
            held.enter_context(gallery.download_slot(reader("cam1")))
        assert "at most 4 for this token, 26 on this server): retry later limit=4" in refusal(reader("cam1"))
        for _ in range(share // 2):
            held.enter_context(gallery.download_slot(reader("*")))
        assert "at most 13 for this token" in refusal(reader("*"))
        for n in range(share - per_device - share // 2):
            held.enter_context(gallery.download_slot(reader(f"cam{n + 2}")))
        assert refusal(reader("cam-last")).endswith("limit=26")  # the server's share is full
    with gallery.download_slot(reader("cam1")), gallery.download_slot(reader("*")):
        pass  # every place given back


def test_each_token_has_its_own_part_of_the_native_downloads(gallery: Gallery) -> None:
    """Counted by token (Principal.token_id), not by the devices it grants: a read-only token
    leaked and stalling its reads leaves the device's own app its part."""
    leaked = auth.Principal("leak", frozenset({"cam1"}), frozenset({auth.READ}), token_id="a" * 32)
    app = auth.Principal("app", frozenset({"cam1"}), frozenset({auth.READ}), token_id="b" * 32)
    many = auth.Principal("m", frozenset(f"cam{n}" for n in range(20)), frozenset({auth.READ}), token_id="c" * 32)
    with contextlib.ExitStack() as held:
        for _ in range(service.MAX_DOWNLOADS_PER_DEVICE):
            held.enter_context(gallery.download_slot(leaked))
        with pytest.raises(Exhausted):
            held.enter_context(gallery.download_slot(leaked))
        held.enter_context(gallery.download_slot(app))
    with contextlib.ExitStack() as held:  # 20 devices: 80 by its devices, half the share at most
        for _ in range(gallery.max_downloads // 2):
            held.enter_context(gallery.download_slot(many))
        with pytest.raises(Exhausted) as refused:
            held.enter_context(gallery.download_slot(many))
        assert "at most 13 for this token" in refused.value.message


def test_open_content(gallery: Gallery, principal: auth.Principal) -> None:
    event = store(gallery, principal, data=PDF, name="report ü.pdf")
    content = gallery.open_content(principal, "cam1", event.id)
    with content.file:
        assert content.file.read() == PDF
    assert (content.size, content.sha256) == (len(PDF), hashlib.sha256(PDF).hexdigest())
    assert (content.mime_type, content.filename) == ("application/pdf", "report ü.pdf")


def test_open_content_of_an_event_deleted_meanwhile_is_not_found(
    gallery: Gallery, principal: auth.Principal, monkeypatch: pytest.MonkeyPatch
) -> None:
    event = store(gallery, principal)
    found = gallery.stored_media

    def found_then_deleted(*args):  # type: ignore[no-untyped-def]
        stored = found(*args)
        gallery.delete_event(principal, "cam1", event.id)  # between the row and the file
        return stored

    monkeypatch.setattr(gallery, "stored_media", found_then_deleted)
    with pytest.raises(NotFound) as info:
        gallery.open_content(principal, "cam1", event.id)
    assert info.value.reason == "EVENT_NOT_FOUND"


def test_open_content_of_a_stored_event_whose_file_is_gone_is_data_loss(
    gallery: Gallery, principal: auth.Principal, caplog: pytest.LogCaptureFixture
) -> None:
    """Not "no such event" (404): the event is still listed; storage lost its file (DATA_LOSS,
    HTTP 500), and the log says which."""
    event = store(gallery, principal)
    gallery.storage.media_path("cam1", event.id).unlink()
    with pytest.raises(DataLoss) as info:
        gallery.open_content(principal, "cam1", event.id)
    assert (info.value.reason, info.value.metadata) == ("MEDIA_MISSING", {"device": "cam1", "event_id": event.id})
    assert any(r.levelname == "ERROR" and getattr(r, "event_id", "") == event.id for r in caplog.records)
    caplog.clear()
    for _ in range(3):  # any reader, again and again: the operator was told, once an hour is enough
        with pytest.raises(DataLoss):
            gallery.open_content(principal, "cam1", event.id)
    assert [r for r in caplog.records if r.levelname == "ERROR"] == []


def test_open_content_refuses_a_file_that_differs_from_its_record(
    gallery: Gallery, principal: auth.Principal
) -> None:
    event = store(gallery, principal)
    path = gallery.storage.media_path("cam1", event.id)
    path.write_bytes(PNG[:10])
    with pytest.raises(DataLoss) as info:
        gallery.open_content(principal, "cam1", event.id)
    assert info.value.reason == "MEDIA_DAMAGED"
    path.unlink()
    path.mkdir()
    with pytest.raises(DataLoss) as info:
        gallery.open_content(principal, "cam1", event.id)
    assert info.value.reason == "MEDIA_DAMAGED"


def test_a_delete_whose_file_cannot_be_removed_still_deletes(
    gallery: Gallery, principal: auth.Principal, caplog: pytest.LogCaptureFixture
) -> None:
    """The row goes first; a file that cannot be removed (here a folder in its place) is logged
    and left to the reconciler, and the other file still goes: the delete succeeded (it was a
    500 with the row already gone)."""
    event = store(gallery, principal, thumbnail=JPEG)
    media = gallery.storage.media_path("cam1", event.id)
    media.unlink()
    (media / "inside").mkdir(parents=True)
    gallery.delete_event(principal, "cam1", event.id)
    with pytest.raises(NotFound):
        gallery.get_event(principal, "cam1", event.id)
    assert not gallery.storage.thumbnail_path("cam1", event.id).exists()
    assert media.is_dir()
    assert any(r.levelname == "WARNING" and getattr(r, "path", "") == str(media) for r in caplog.records)


def test_open_thumbnail(gallery: Gallery, principal: auth.Principal) -> None:
    event = store(gallery, principal, data=PDF, name="clip.mp4", thumbnail=JPEG)
    content = gallery.open_thumbnail(principal, "cam1", event.id)
    with content.file:
        content.file.seek(0)
        assert content.file.read() == JPEG
    # The type comes from the bytes, never from the event's name.
    assert (content.mime_type, content.filename) == ("image/jpeg", "")
    assert (content.size, content.sha256) == (len(JPEG), hashlib.sha256(JPEG).hexdigest())


def test_open_thumbnail_at_most(gallery: Gallery, principal: auth.Principal) -> None:
    """The open file's size decides (the thumbnail handoff's bound): one byte more is not read."""
    event = store(gallery, principal, data=PDF, thumbnail=JPEG)
    assert gallery.open_thumbnail(principal, "cam1", event.id, at_most=len(JPEG) - 1) is None
    content = gallery.open_thumbnail(principal, "cam1", event.id, at_most=len(JPEG))
    assert content is not None
    with content.file:
        assert (content.size, content.sha256) == (len(JPEG), hashlib.sha256(JPEG).hexdigest())


def test_open_thumbnail_missing(gallery: Gallery, principal: auth.Principal) -> None:
    event = store(gallery, principal)
    with pytest.raises(NotFound) as info:
        gallery.open_thumbnail(principal, "cam1", event.id)
    assert (info.value.reason, info.value.metadata["event_id"]) == ("THUMBNAIL_NOT_FOUND", event.id)
    with pytest.raises(NotFound) as info:
        gallery.open_thumbnail(principal, "cam1", "evt_" + "c" * 22)
    assert info.value.reason == "EVENT_NOT_FOUND"


def test_downloads_authorize_before_existence(gallery: Gallery, principal: auth.Principal) -> None:
    existing = store(gallery, principal, "cam1", thumbnail=JPEG).id
    writer = auth.Principal("w", frozenset({"cam1"}), frozenset({auth.WRITE}))
    for call in (gallery.open_content, gallery.open_thumbnail):
        for event_id in (existing, "evt_" + "c" * 22, "not-even-valid"):
            with pytest.raises(PermissionDenied) as info:
                call(other_principal(), "cam1", event_id)
            assert info.value.reason == "DEVICE_NOT_ALLOWED"
            with pytest.raises(PermissionDenied) as info:
                call(writer, "cam1", event_id)
            assert info.value.reason == "SCOPE_MISSING"


@pytest.mark.parametrize(("mime", "media_type"), [
    ("image/png", "image"), ("video/mp4", "video"), ("audio/mpeg", "audio"),
    ("application/pdf", "document"), ("application/json", "document"), ("text/plain", "document"),
    ("application/vnd.openxmlformats-officedocument.wordprocessingml.document", "document"),
    ("application/vnd.oasis.opendocument.text", "document"),
    ("application/zip", "other"), ("application/octet-stream", "other"),
])
def test_media_type_of_a_mime_type(mime: str, media_type: str) -> None:
    assert media_types.classify(mime) == media_type


def test_mime_type_from_content_then_the_name() -> None:
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 32
    assert media_types.detect_mime("photo.txt", png) == "image/png"  # content wins
    assert media_types.detect_mime("notes.txt", b"hello") == "text/plain"
    assert media_types.detect_mime("unknown.zzz", b"hello") == "application/octet-stream"
