"""GALLERY_RETENTION_DAYS (retention.py): events created before the cutoff are deleted as a user's
DELETE deletes them (rows, files, counters; an announced capture stays deleted), in batches, once
however many replicas run the loop; nothing younger is touched. On SQLite and PostgreSQL."""

from __future__ import annotations

import datetime
import threading
import types

import sqlalchemy as sa

from gallery_server import auth, retention
from gallery_server.clock import utcnow
from gallery_server.devices import Announcement, Devices
from gallery_server.models import Event
from gallery_server.retention import Retention
from gallery_server.service import Gallery

from ..conftest import statements_run, stored_files
from .test_service import PDF, PNG, row_count, store
from .test_stats_counters import _row

DAY = datetime.timedelta(days=1)


def backdate(gallery: Gallery, event_id: str, age: datetime.timedelta) -> None:
    """As if captured and received `age` ago."""
    with gallery.db.engine.begin() as c:
        c.execute(sa.update(Event).where(Event.id == event_id).values(
            created=utcnow() - age, received_at=utcnow() - age))


def test_events_past_the_retention_go_with_their_files_and_the_rest_stay(
    gallery: Gallery, principal: auth.Principal,
) -> None:
    old = store(gallery, principal, data=PNG, name="old.png", thumbnail=PNG)
    kept = store(gallery, principal, data=PDF, name="kept.pdf")
    other = store(gallery, principal, "cam2", data=PNG, name="other.png")
    backdate(gallery, old.id, 31 * DAY)
    backdate(gallery, kept.id, 29 * DAY)
    backdate(gallery, other.id, 40 * DAY)
    assert Retention(gallery, days=30).expire() == 2
    assert row_count(gallery) == 1
    assert [p.name for p in stored_files(gallery.settings.data_dir)] == [kept.id]  # thumbnail gone too
    stats = gallery.stats(principal, "cam1")  # the counters follow, as for any delete
    assert (stats.total_events, stats.total_size) == (1, len(PDF))
    assert gallery.stats(principal, "cam2").total_events == 0
    assert Retention(gallery, days=30).expire() == 0  # nothing more: nothing younger is touched
    assert Retention(gallery, days=0.5).expire(now=utcnow() + 29 * DAY) == 1  # its own clock too


def test_an_announced_capture_past_the_retention_stays_deleted(gallery: Gallery) -> None:
    """Its device still holds the file and announces it again: it is answered `deleted`."""
    devices = Devices(gallery)
    device = auth.Principal("cam1", frozenset({"cam1"}), frozenset({auth.DEVICE}))
    capture = Announcement(device_key="dcim/old.mp4", name="old.mp4", size=1000, sha256="a" * 64,
                           created=utcnow() - 45 * DAY)
    [announced] = devices.announce(device, "cam1", [capture])
    assert announced.state == "on_device"
    assert Retention(gallery, days=30).expire(now=utcnow() + 31 * DAY) == 1  # a month after it came
    [again] = devices.announce(device, "cam1", [capture])
    assert (again.id, again.state) == (announced.id, "deleted")
    assert row_count(gallery) == 0


def test_what_arrived_lately_stays_whatever_the_devices_clock_says(gallery: Gallery) -> None:
    """A device whose clock was set back (a flat RTC battery: 1970) announces captures that look
    decades old, and a backlog announced today is old too: each is kept the retention from its
    arrival."""
    devices = Devices(gallery)
    device = auth.Principal("cam1", frozenset({"cam1"}), frozenset({auth.DEVICE}))
    epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
    [reset, backlog] = devices.announce(device, "cam1", [
        Announcement(device_key="dcim/0001.mp4", name="0001.mp4", size=1000, sha256="a" * 64, created=epoch),
        Announcement(device_key="dcim/0002.mp4", name="0002.mp4", size=1000, sha256="b" * 64,
                     created=utcnow() - 60 * DAY)])
    loop = Retention(gallery, days=30)
    assert loop.expire() == 0 and row_count(gallery) == 2
    assert loop.expire(now=utcnow() + 29 * DAY) == 0
    assert loop.expire(now=utcnow() + 31 * DAY) == 2  # once both capture and arrival are past
    assert row_count(gallery) == 0


def test_rows_from_before_the_arrival_was_kept_go_by_their_capture(gallery: Gallery) -> None:
    """A database of an earlier version: create_tables adds the column, its rows hold NULL."""
    table = Event.__table__  # type: ignore[attr-defined]
    with gallery.db.engine.begin() as c:
        c.exec_driver_sql("ALTER TABLE events DROP COLUMN received_at")
        c.exec_driver_sql(
            "INSERT INTO events (id, device, name, media_type, mime_type, size, sha256, has_thumbnail,"
            " metadata_json, created, state, thumbnail_state, thumbnail_attempts, media_info_json)"
            " VALUES ('evt_old', 'cam1', 'a.bin', 'other', 'application/octet-stream', 1, '', false, '{}',"
            " :created, 'stored', '', 0, '')".replace(":created", "'2000-01-01 00:00:00'"))
    gallery.db.create_tables()
    with gallery.db.engine.connect() as c:
        assert c.execute(sa.select(table.c.received_at).where(table.c.id == "evt_old")).scalar_one() is None
    assert Retention(gallery, days=30).expire() == 1


def test_a_backlog_goes_in_batches_oldest_first(gallery: Gallery) -> None:
    table = Event.__table__  # type: ignore[attr-defined]
    start = utcnow() - 100 * DAY
    count = retention.BATCH + 50
    rows = [{**_row(i, 0), "device": "cam1", "created": start + i * datetime.timedelta(minutes=1),
             "received_at": start} for i in range(count)]
    with gallery.db.engine.begin() as c:
        c.execute(table.insert(), rows)
    loop = Retention(gallery, days=30)
    assert loop.expire() == retention.BATCH  # one transaction's worth per device and pass
    with gallery.db.engine.connect() as c:
        left = sorted(c.execute(sa.select(table.c.id)).scalars())
    assert left == sorted(r["id"] for r in rows[retention.BATCH:])  # the oldest went first
    assert loop.behind == ["cam1"]  # its batch was full: more may be waiting
    assert loop.run_pass() is False and row_count(gallery) == 0  # the rest, a batch not full: done


def test_a_backlog_on_one_device_of_many_is_not_a_walk_of_them_all_per_batch(gallery: Gallery) -> None:
    """The passes that follow a full batch at once look at the devices behind alone: before, a
    backlog on one camera of a fleet of thousands read every camera's events again per batch."""
    table = Event.__table__  # type: ignore[attr-defined]
    old = utcnow() - 100 * DAY
    fleet = [{**_row(i, 0), "device": f"cam{i:03}", "created": utcnow(), "received_at": utcnow()} for i in range(50)]
    backlog = [{**_row(1000 + i, 0), "device": "cam007", "created": old + i * datetime.timedelta(minutes=1),
                "received_at": old} for i in range(2 * retention.BATCH + 1)]
    with gallery.db.engine.begin() as c:
        c.execute(table.insert(), fleet + backlog)
    loop = Retention(gallery, days=30)
    with statements_run(gallery.db) as run:
        passes = [loop.run_pass() for _ in range(3)]
    assert passes == [True, True, False]  # full, full, then the one left
    assert row_count(gallery) == len(fleet)
    reads = [sql for sql in run if sql.lstrip().upper().startswith("SELECT") and "created <" in sql.replace('"', "")]
    assert len(reads) == 50 + 1 + 1, reads  # the fleet once, then cam007 alone
    assert loop.run_pass() is False  # a whole walk again, which finds nothing


def test_the_other_devices_are_looked_at_again_once_an_interval_has_passed(
    gallery: Gallery, principal: auth.Principal,
) -> None:
    """However long a backlog keeps the passes on the devices behind, every device is walked again
    an interval after the last walk: events of other devices expire meanwhile too."""
    table = Event.__table__  # type: ignore[attr-defined]
    old = utcnow() - 100 * DAY
    backlog = [{**_row(i, 0), "device": "cam1", "created": old, "received_at": old}
               for i in range(2 * retention.BATCH + 50)]
    with gallery.db.engine.begin() as c:
        c.execute(table.insert(), backlog)
    loop = Retention(gallery, days=30)
    assert loop.run_pass() is True and loop.behind == ["cam1"]
    late = store(gallery, principal, "cam2", data=PNG, name="late.png")
    backdate(gallery, late.id, 40 * DAY)
    assert loop.run_pass() is True and row_count(gallery) == 50 + 1  # cam1's alone
    loop._walked_at -= loop.interval  # an interval later
    assert loop.run_pass() is False and row_count(gallery) == 0  # every device: cam2's too


def test_a_device_whose_batch_another_replica_deleted_is_left_to_it(gallery: Gallery) -> None:
    """Its rows were gone when this replica's DELETE came (it deleted none): following the device
    too would make the two replicas take turns at every batch, one of them deleting nothing."""
    table = Event.__table__  # type: ignore[attr-defined]
    old = utcnow() - 100 * DAY
    with gallery.db.engine.begin() as c:
        c.execute(table.insert(), [{**_row(i, 0), "device": "cam1", "created": old, "received_at": old}
                                   for i in range(2 * retention.BATCH)])
    late = Retention(gallery, days=30)
    late.gallery = types.SimpleNamespace(db=gallery.db, delete_events=lambda device, ids: [])  # type: ignore[assignment]
    assert late.expire() == 0 and late.behind == []
    assert late.run_pass() is False
    first = Retention(gallery, days=30)
    assert first.expire() == retention.BATCH and first.behind == ["cam1"]


def test_replicas_expiring_at_once_delete_each_event_once(gallery: Gallery, principal: auth.Principal) -> None:
    events = [store(gallery, principal, data=PNG, name=f"{i}.png") for i in range(12)]
    for event in events:
        backdate(gallery, event.id, 60 * DAY)
    counts: list[int] = []
    barrier = threading.Barrier(3)

    def replica() -> None:
        barrier.wait()
        counts.append(Retention(gallery, days=30).expire())

    threads = [threading.Thread(target=replica) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(counts) == 12 and row_count(gallery) == 0
    assert stored_files(gallery.settings.data_dir) == []


def test_a_batch_of_several_media_types_does_not_deadlock_an_upload(gallery: Gallery) -> None:
    """An upload inserting a video between two statements of a batch that deletes an image and a
    video (by hand below: the batch is held after its first DELETE). Deleted one statement per
    event, the batch held the image's counter and the device's usage, the upload took the video's
    counter and waited for the usage, and the batch's next DELETE waited for the video's counter:
    PostgreSQL's deadlock detector aborted one of them. One statement takes them all in order."""
    table = Event.__table__  # type: ignore[attr-defined]
    with gallery.db.engine.begin() as c:
        c.execute(table.insert(), [{**_row(0, 0), "device": "cam1", "media_type": "image"},
                                   {**_row(1, 0), "device": "cam1", "media_type": "video"}])
    batch_thread = threading.get_ident()
    upload_done = threading.Event()
    errors: list[BaseException] = []

    def upload() -> None:
        try:
            with gallery.db.engine.begin() as c:
                c.execute(table.insert(), [{**_row(2, 0), "device": "cam1", "media_type": "video"}])
        except BaseException as exc:  # noqa: BLE001 - the test's finding
            errors.append(exc)
        finally:
            upload_done.set()

    uploader = threading.Thread(target=upload)

    def between_statements(conn, cursor, statement, *args) -> None:  # type: ignore[no-untyped-def]
        if threading.get_ident() == batch_thread and statement.startswith("DELETE FROM events") \
                and not uploader.is_alive() and not upload_done.is_set():
            uploader.start()
            upload_done.wait(2.5)  # past PostgreSQL's deadlock_timeout (1 s), had there been one

    sa.event.listen(gallery.db.engine, "after_cursor_execute", between_statements)
    try:
        deleted = gallery.delete_events("cam1", ["evt_w0_0", "evt_w0_1"])
    finally:
        sa.event.remove(gallery.db.engine, "after_cursor_execute", between_statements)
        uploader.join(10)
    assert errors == [] and sorted(deleted) == ["evt_w0_0", "evt_w0_1"]
    with gallery.db.engine.connect() as c:
        assert list(c.execute(sa.select(table.c.id)).scalars()) == ["evt_w0_2"]
