"""GALLERY_MAX_DEVICE_BYTES (quota.py): the stored bytes it bounds (models.DeviceUsage) follow
every write to events, on SQLite and PostgreSQL, and every path that stores media stops at the
quota, exactly, with nothing left behind."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import threading

import pytest
import sqlalchemy as sa

from gallery_server import auth
from gallery_server.devices import Announcement, Devices
from gallery_server.errors import AlreadyExists, Exhausted
from gallery_server.incoming import IncomingImporter
from gallery_server.models import DeviceUsage, Event
from gallery_server.quota import QUOTA_EXCEEDED, Summary, Usage
from gallery_server.resumable import ResumableUploads
from gallery_server.service import Gallery
from gallery_server.signed_urls import SignedUploads

from ..conftest import stored_files
from .test_incoming import leftovers, settle, write
from .test_service import PDF, PNG, row_count, store
from .test_stats_counters import _row, write_concurrently


def usage(gallery: Gallery) -> dict[str, int]:
    """What device_usage says, without the zero rows a device's last delete leaves."""
    with gallery.db.engine.connect() as c:
        rows = c.execute(sa.text("SELECT device, stored_bytes FROM device_usage")).all()
    return {d: int(n) for d, n in rows if n}


def truth(gallery: Gallery) -> dict[str, int]:
    """The stored events' media and every thumbnail their devices sent, summed."""
    with gallery.db.engine.connect() as c:
        rows = c.execute(sa.text("SELECT device, SUM(CASE WHEN state = 'stored' THEN size ELSE 0 END"
                                 " + COALESCE(thumbnail_size, 0)) FROM events GROUP BY device")).all()
    return {d: int(n) for d, n in rows if n}


def refused(excinfo: pytest.ExceptionInfo[Exhausted], *, used: int, size: int, limit: int) -> None:
    assert excinfo.value.reason == QUOTA_EXCEEDED
    assert excinfo.value.metadata == {
        "device": "cam1", "quota_bytes": str(limit), "used_bytes": str(used), "size": str(size),
    }


# -- what is counted ------------------------------------------------------------------------------


def test_usage_counts_stored_media_only_through_every_kind_of_write(gallery: Gallery) -> None:
    table = Event.__table__  # type: ignore[attr-defined]
    rows = [{**_row(i, 0), "device": "cam1", "size": 100 * (i + 1)} for i in range(4)]
    rows[3]["state"] = "on_device"  # announced: the device's claim, not bytes on the server
    with gallery.db.engine.begin() as c:
        c.execute(table.insert(), rows)  # one statement (PostgreSQL counts it once, per statement)
    assert usage(gallery) == {"cam1": 100 + 200 + 300}
    with gallery.db.engine.begin() as c:  # a pull stores the announced event with its real size
        c.execute(table.update().where(table.c.id == rows[3]["id"]).values(state="stored", size=450))
    assert usage(gallery) == {"cam1": 1050}
    with gallery.db.engine.begin() as c:
        c.execute(table.update().where(table.c.id == rows[0]["id"]).values(device="cam2"))
        c.execute(table.delete().where(table.c.id.in_([rows[1]["id"], rows[2]["id"]])))
    assert usage(gallery) == {"cam1": 450, "cam2": 100} == truth(gallery)


def test_usage_matches_the_sum_after_concurrent_writes(gallery: Gallery) -> None:
    write_concurrently(gallery.db)
    assert usage(gallery) == truth(gallery) != {}


def test_a_database_from_before_the_quota_gets_its_usage_on_upgrade(gallery: Gallery) -> None:
    table = Event.__table__  # type: ignore[attr-defined]
    with gallery.db.engine.begin() as c:
        c.execute(table.insert(), [{**_row(i, 0), "device": f"cam{i % 2}", "size": 10 ** i} for i in range(5)])
    # As a database of an earlier version: no device_usage table, and so no triggers of its.
    DeviceUsage.__table__.drop(gallery.db.engine)  # type: ignore[attr-defined]
    with gallery.db.engine.begin() as c:
        if c.dialect.name == "postgresql":
            for suffix in ("", "_insert", "_delete", "_truncate"):
                c.exec_driver_sql(f"DROP TRIGGER events_usage{suffix} ON events")
        else:
            for suffix in ("_insert", "_delete", "_update"):
                c.exec_driver_sql(f"DROP TRIGGER events_usage{suffix}")
    gallery.db.create_tables()
    assert usage(gallery) == {"cam0": 1 + 100 + 10000, "cam1": 10 + 1000} == truth(gallery)
    with gallery.db.engine.begin() as c:  # and its triggers are back
        c.execute(table.delete().where(table.c.device == "cam0"))
    assert usage(gallery) == {"cam1": 1010}


# -- uploads ---------------------------------------------------------------------------------------


def test_no_quota_by_default(gallery: Gallery, principal: auth.Principal) -> None:
    assert gallery.settings.max_device_bytes == 0
    for _ in range(3):
        store(gallery, principal, data=PDF, name="doc.pdf")
    assert usage(gallery) == {"cam1": 3 * len(PDF)}


def test_uploads_fill_the_quota_exactly_then_are_refused(gallery: Gallery, principal: auth.Principal) -> None:
    gallery.quota.limit = 2 * len(PDF) + len(PNG)
    store(gallery, principal, data=PDF, name="a.pdf")
    store(gallery, principal, data=PDF, name="b.pdf")
    with pytest.raises(Exhausted) as excinfo:  # one byte past the quota, found at the last chunk
        store(gallery, principal, data=PNG + b"x")
    refused(excinfo, used=2 * len(PDF), size=len(PNG) + 1, limit=gallery.quota.limit)
    store(gallery, principal, data=PNG)  # exactly the quota
    assert usage(gallery) == {"cam1": gallery.quota.limit}
    with gallery.begin_upload(principal, "cam1") as upload, pytest.raises(Exhausted) as excinfo:
        upload.write_media(b"x")  # at the quota: refused at its first byte (a form may name a retry first)
    refused(excinfo, used=gallery.quota.limit, size=1, limit=gallery.quota.limit)
    store(gallery, principal, "cam2", data=PDF)  # other devices have quotas of their own
    assert row_count(gallery) == 4
    assert len(stored_files(gallery.settings.data_dir)) == 4


def test_a_declared_size_over_the_room_is_refused_before_any_byte(gallery: Gallery, principal: auth.Principal) -> None:
    gallery.quota.limit = 1000
    store(gallery, principal, data=PDF)
    with gallery.begin_upload(principal, "cam1") as upload, pytest.raises(Exhausted) as excinfo:
        upload.declare_size(1001 - len(PDF))
    refused(excinfo, used=len(PDF), size=1001 - len(PDF), limit=1000)
    assert stored_files(gallery.settings.data_dir) == [gallery.storage.media_path("cam1", next(iter(_ids(gallery))))]


def test_a_stream_is_stopped_at_the_chunk_that_passes_the_room(gallery: Gallery, principal: auth.Principal) -> None:
    gallery.quota.limit = 1000
    with gallery.begin_upload(principal, "cam1") as upload:
        upload.write_media(b"a" * 600)
        upload.write_media(b"b" * 400)
        with pytest.raises(Exhausted) as excinfo:
            upload.write_media(b"c")  # not after the client has sent all it meant to
    refused(excinfo, used=0, size=1001, limit=1000)


def test_an_upload_under_way_gets_the_room_a_delete_makes(gallery: Gallery, principal: auth.Principal) -> None:
    gallery.quota.limit = len(PDF) + 100
    first = store(gallery, principal, data=PDF)
    with gallery.begin_upload(principal, "cam1") as upload:
        upload.write_media(b"a" * 100)  # the room it started with
        gallery.delete_event(principal, "cam1", first.id)
        upload.write_media(b"b" * len(PDF))  # past that room, within what the delete freed
        upload.fields.name = "late.bin"
        gallery.store(upload)
    assert usage(gallery) == {"cam1": len(PDF) + 100}


def test_deleting_events_makes_room(gallery: Gallery, principal: auth.Principal) -> None:
    gallery.quota.limit = len(PDF)
    first = store(gallery, principal, data=PDF)
    with pytest.raises(Exhausted):
        store(gallery, principal, data=PDF, name="again.pdf")
    gallery.delete_event(principal, "cam1", first.id)
    assert usage(gallery) == {}
    store(gallery, principal, data=PDF, name="again.pdf")


# -- what devices and operators are told ----------------------------------------------------------


def test_stats_tell_a_device_its_room(gallery: Gallery, principal: auth.Principal) -> None:
    store(gallery, principal, data=PDF)
    assert gallery.stats(principal, "cam1").quota is None  # no quota: nothing to tell
    gallery.quota.limit = 3 * len(PDF)
    devices = Devices(gallery)  # an announced event is in the stats' total, not in the quota's use
    devices.announce(auth.Principal("cam1", frozenset({"cam1"}), frozenset({auth.DEVICE})), "cam1",
                     [Announcement(device_key="a.mp4", name="a.mp4", size=10 ** 9)])
    stats = gallery.stats(principal, "cam1")
    assert stats.total_size == len(PDF) + 10 ** 9
    assert stats.quota == Usage(limit=3 * len(PDF), used=len(PDF))
    assert stats.quota.available == 2 * len(PDF)
    assert gallery.stats(principal, "cam2").quota == Usage(limit=3 * len(PDF), used=0)
    store(gallery, principal, data=PDF, name="b.pdf")
    store(gallery, principal, data=PDF, name="c.pdf")
    assert gallery.stats(principal, "cam1").quota.available == 0  # type: ignore[union-attr]
    with gallery.begin_upload(principal, "cam1") as upload, pytest.raises(Exhausted):
        upload.write_media(b"x")  # what stats said: no room, not even for a byte
    gallery.quota.limit = len(PDF)  # lowered below what the device keeps: no room, never less
    assert gallery.stats(principal, "cam1").quota == Usage(limit=len(PDF), used=3 * len(PDF))
    assert gallery.stats(principal, "cam1").quota.available == 0  # type: ignore[union-attr]


def test_the_admin_summary_names_the_largest_devices_and_those_at_or_near_the_quota(gallery: Gallery) -> None:
    table = Event.__table__  # type: ignore[attr-defined]
    sizes = {f"dev{n:02}": size for n, size in enumerate(
        [1200, 1000, 999, 900, 899, 500, 500, 10, 9, 8, 7, 6, 5])}
    rows = [{**_row(i, 0), "device": device, "size": size} for i, (device, size) in enumerate(sizes.items())]
    rows.append({**_row(99, 0), "device": "dev99", "size": 10 ** 6, "state": "on_device"})  # not stored
    with gallery.db.engine.begin() as c:
        c.execute(table.insert(), rows)
        c.execute(table.delete().where(table.c.device == "dev12"))  # leaves a usage row of 0
    summary = gallery.quota.summary()
    assert summary == Summary(limit=0, stored_bytes=sum(sizes.values()) - 5, at_quota=0, near_quota=0, largest=[
        ("dev00", 1200), ("dev01", 1000), ("dev02", 999), ("dev03", 900), ("dev04", 899),
        ("dev05", 500), ("dev06", 500), ("dev07", 10), ("dev08", 9), ("dev09", 8),  # ties by id; 10 shown
    ])
    gallery.quota.limit = 1000  # at: 1200 and 1000; near (90%, rounded up: 900): 999 and 900 too
    assert gallery.quota.summary() == dataclasses.replace(summary, limit=1000, at_quota=2, near_quota=4)
    gallery.quota.limit = 1001  # 90% is 900.9: 900 is not near any more
    assert (gallery.quota.summary().at_quota, gallery.quota.summary().near_quota) == (1, 3)
    with gallery.db.engine.begin() as c:  # devices that deleted all they stored are not named
        c.execute(table.delete().where(table.c.device != "dev00"))
    assert gallery.quota.summary().largest == [("dev00", 1200)]


def test_the_commit_refuses_what_concurrent_uploads_would_take_past_the_quota(gallery: Gallery) -> None:
    """Every upload passes the checks as it starts and streams (the room is there for each alone);
    the transaction that stores decides, so the quota holds exactly on either database."""
    gallery.quota.limit = 2 * len(PDF)
    uploads = []
    for i in range(4):  # the device's upload slots
        upload = gallery.open_upload("cam1")
        upload.fields.name = f"{i}.pdf"
        upload.write_media(PDF)
        uploads.append(upload)
    outcomes: list[str] = []

    def finish(upload) -> None:  # type: ignore[no-untyped-def]
        with upload:
            try:
                gallery.store(upload)
                outcomes.append("stored")
            except Exhausted as exc:
                outcomes.append(exc.reason)

    threads = [threading.Thread(target=finish, args=(u,)) for u in uploads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == [QUOTA_EXCEEDED] * 2 + ["stored"] * 2
    assert usage(gallery) == {"cam1": 2 * len(PDF)} == truth(gallery)
    assert len(stored_files(gallery.settings.data_dir)) == 2


def test_a_pulled_upload_counts_once_stored(gallery: Gallery, principal: auth.Principal) -> None:
    devices = Devices(gallery)
    device = auth.Principal("cam1", frozenset({"cam1"}), frozenset({auth.DEVICE}))
    content = b"pulled" * 100
    [announced] = devices.announce(device, "cam1", [Announcement(
        device_key="dcim/a.mp4", name="a.mp4", size=len(content), sha256=hashlib.sha256(content).hexdigest())])
    assert usage(gallery) == {}  # announced: still on the device
    gallery.quota.limit = len(content) - 1
    devices.pull(principal, "cam1", announced.id)
    pulled = devices.pulled_event(device, "cam1", announced.id)
    with gallery.open_upload("cam1") as upload, pytest.raises(Exhausted) as excinfo:
        upload.fill(pulled)  # the announced size does not fit: refused before any byte
    refused(excinfo, used=0, size=len(content), limit=len(content) - 1)
    gallery.quota.limit = len(content)
    with gallery.open_upload("cam1") as upload:
        upload.fill(pulled)
        upload.write_media(content)
        gallery.store(upload, fill=pulled, before_insert=devices.complete_pull)
    assert usage(gallery) == {"cam1": len(content)}


# -- refused at the commit: what the client had is kept for its retry ------------------------------


def _fill_meanwhile(gallery: Gallery, principal: auth.Principal) -> Event:
    """Another upload of the device, stored after this one passed its checks: it takes the room."""
    return store(gallery, principal, data=PDF, name="meanwhile.pdf")


def test_a_resumable_session_refused_at_its_commit_keeps_its_bytes(gallery: Gallery, principal: auth.Principal) -> None:
    uploads = ResumableUploads(gallery)
    gallery.quota.limit = len(PDF) + 99  # room for either upload alone
    state = uploads.start(principal, "cam1", name="r.bin", size=100)
    writer = uploads.open_write(principal, "cam1", state.upload_id, 0)
    try:
        writer.write(b"r" * 100)
        other = _fill_meanwhile(gallery, principal)
        with pytest.raises(Exhausted) as excinfo:
            writer.finish()
        assert excinfo.value.reason == QUOTA_EXCEEDED
    finally:
        writer.close()
    assert uploads.state("cam1", state.upload_id).committed_size == 100  # nothing to send again
    gallery.delete_event(principal, "cam1", other.id)
    writer = uploads.open_write(principal, "cam1", state.upload_id, None)
    try:
        done = writer.finish()
    finally:
        writer.close()
    assert gallery.storage.media_path("cam1", done.event_id).read_bytes() == b"r" * 100


def test_a_pre_signed_put_refused_at_its_commit_leaves_its_url_unused(
    gallery: Gallery, signed: SignedUploads, principal: auth.Principal
) -> None:
    urls = signed.create_urls(principal, "cam1", "p.bin", thumbnail=False)
    target = signed.verify("cam1", urls.media_url.rsplit("/", 1)[1])
    gallery.quota.limit = len(PDF) + 99  # room for either upload alone
    with gallery.open_upload("cam1") as upload:
        upload.write_media(b"p" * 100)
        other = _fill_meanwhile(gallery, principal)
        with pytest.raises(Exhausted):
            signed.complete(target, upload)
    signed.require_unused(target)  # the client may PUT again
    gallery.delete_event(principal, "cam1", other.id)
    with gallery.open_upload("cam1") as upload:
        upload.write_media(b"p" * 100)
        event_id = signed.complete(target, upload)
    assert gallery.storage.media_path("cam1", event_id).read_bytes() == b"p" * 100


def test_a_pull_refused_at_its_commit_stays_open_with_its_event_on_the_device(
    gallery: Gallery, principal: auth.Principal
) -> None:
    devices = Devices(gallery)
    device = auth.Principal("cam1", frozenset({"cam1"}), frozenset({auth.DEVICE}))
    content = b"pulled" * 20
    [announced] = devices.announce(device, "cam1", [Announcement(
        device_key="dcim/b.mp4", name="b.mp4", size=len(content), sha256=hashlib.sha256(content).hexdigest())])
    devices.pull(principal, "cam1", announced.id)
    pulled = devices.pulled_event(device, "cam1", announced.id)
    gallery.quota.limit = len(PDF) + len(content) - 1  # room for either upload alone
    with gallery.open_upload("cam1") as upload:
        upload.fill(pulled)
        upload.write_media(content)
        other = _fill_meanwhile(gallery, principal)
        with pytest.raises(Exhausted):
            gallery.store(upload, fill=pulled, before_insert=devices.complete_pull)
    assert gallery.get_event(principal, "cam1", announced.id).state == "on_device"
    assert devices.pull_status(announced.id).state != "completed"  # the device is asked again
    assert not gallery.storage.media_path("cam1", announced.id).exists()
    gallery.delete_event(principal, "cam1", other.id)
    with gallery.open_upload("cam1") as upload:
        upload.fill(pulled)
        upload.write_media(content)
        gallery.store(upload, fill=pulled, before_insert=devices.complete_pull)
    assert gallery.get_event(principal, "cam1", announced.id).state == "stored"


def _upload(gallery: Gallery, principal: auth.Principal, data: bytes, *, device_event_id: str = "",
            declared_size: int | None = None) -> Event:
    """A native upload's order: its header (the device's id, then a size) before its bytes."""
    with gallery.begin_upload(principal, "cam1") as upload:
        upload.fields.name = "capture.pdf"
        upload.fields.device_event_id = device_event_id
        if declared_size is not None:
            upload.declare_size(declared_size)
        upload.write_media(data)
        return gallery.store(upload)


@pytest.mark.parametrize("declared", [False, True], ids=["streamed", "declared"])
def test_a_retry_of_the_capture_that_filled_the_quota_is_answered_with_it(
    gallery: Gallery, principal: auth.Principal, declared: bool,
) -> None:
    """A device that lost the answer of the upload that filled its quota sends it again under its
    device_event_id: the stored event is the answer, nothing more is stored, and the quota still
    refuses anything else: an id of no capture, and other content under the capture's id (409)."""
    gallery.quota.limit = 2 * len(PDF)
    _upload(gallery, principal, PDF, device_event_id="DCIM/0001")
    first = _upload(gallery, principal, PDF, device_event_id="DCIM/0002")  # fills the quota
    size = len(PDF) if declared else None
    again = _upload(gallery, principal, PDF, device_event_id="DCIM/0002", declared_size=size)
    assert again.id == first.id
    assert (row_count(gallery), usage(gallery), len(stored_files(gallery.settings.data_dir))) == (
        2, {"cam1": 2 * len(PDF)}, 2)
    with pytest.raises(Exhausted) as excinfo:
        _upload(gallery, principal, PDF, device_event_id="DCIM/0003", declared_size=size)
    refused(excinfo, used=2 * len(PDF), size=len(PDF), limit=gallery.quota.limit)
    with pytest.raises(AlreadyExists) as conflict:
        _upload(gallery, principal, PDF[:-1] + b"y", device_event_id="DCIM/0002", declared_size=size)
    assert conflict.value.reason == "DEVICE_EVENT_ID_CONFLICT"
    assert (row_count(gallery), len(stored_files(gallery.settings.data_dir))) == (2, 2)


def test_a_resumable_retry_of_the_capture_that_filled_the_quota_is_answered_with_it(
    gallery: Gallery, principal: auth.Principal,
) -> None:
    """A session may start and take the bytes without a declared sha256: completion tells the
    stored capture (its event) from other content under its id (409)."""
    uploads = ResumableUploads(gallery)
    gallery.quota.limit = len(PDF) + 5  # below the quota, with less room than the capture takes
    first = _upload(gallery, principal, PDF, device_event_id="DCIM/0002")
    for size in (None, len(PDF)):
        state = uploads.start(principal, "cam1", name="capture.pdf", size=size, device_event_id="DCIM/0002")
        writer = uploads.open_write(principal, "cam1", state.upload_id, 0)
        try:
            writer.write(PDF)
            assert writer.finish().event_id == first.id
        finally:
            writer.close()
    with pytest.raises(Exhausted):  # an id of no capture
        uploads.start(principal, "cam1", name="other.pdf", size=6, device_event_id="DCIM/0003")
    assert (row_count(gallery), usage(gallery)) == (1, {"cam1": len(PDF)})


def test_a_resumable_upload_stops_at_the_quota(gallery: Gallery, principal: auth.Principal) -> None:
    uploads = ResumableUploads(gallery)
    gallery.quota.limit = 1000
    store(gallery, principal, data=PDF)
    room = 1000 - len(PDF)
    with pytest.raises(Exhausted) as excinfo:  # a declared size that cannot fit: no session at all
        uploads.start(principal, "cam1", name="big.bin", size=room + 1)
    refused(excinfo, used=len(PDF), size=room + 1, limit=1000)
    state = uploads.start(principal, "cam1", name="big.bin")  # no size declared
    writer = uploads.open_write(principal, "cam1", state.upload_id, 0)
    try:
        writer.write(b"a" * room)
        with pytest.raises(Exhausted):
            writer.write(b"b")
        writer.commit()
    finally:
        writer.close()
    assert uploads.state("cam1", state.upload_id).committed_size == room  # what fitted is kept


def test_a_dropped_file_over_the_quota_stays_until_there_is_room(gallery: Gallery, principal: auth.Principal,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    importer = IncomingImporter(gallery)
    incoming, _ = gallery.storage.device_paths("cam1")
    gallery.quota.limit = len(PDF)
    first = store(gallery, principal, data=PDF)
    (incoming / "clip.pdf").write_bytes(PDF)
    assert importer.scan_once(now=0) + importer.scan_once(now=10) == []
    assert (incoming / "clip.pdf").exists()
    assert "GALLERY_MAX_DEVICE_BYTES" in caplog.text
    assert stored_files(gallery.settings.data_dir) == [gallery.storage.media_path("cam1", first.id)]
    gallery.delete_event(principal, "cam1", first.id)
    assert len(importer.scan_once(now=20)) == 1
    assert not (incoming / "clip.pdf").exists()
    assert usage(gallery) == {"cam1": len(PDF)}


def test_a_dropped_file_is_not_even_copied_while_the_device_is_at_its_quota(
    gallery: Gallery, principal: auth.Principal, monkeypatch: pytest.MonkeyPatch
) -> None:
    importer = IncomingImporter(gallery)
    incoming, _ = gallery.storage.device_paths("cam1")
    gallery.quota.limit = len(PDF)
    store(gallery, principal, data=PDF)
    copies: list[str] = []
    take = importer._take
    monkeypatch.setattr(importer, "_take", lambda file: copies.append(file.name) or take(file))
    reads: list[str] = []
    used = gallery.quota.used
    monkeypatch.setattr(gallery.quota, "used", lambda device: reads.append(device) or used(device))
    for i in range(5):
        (incoming / f"clip{i}.pdf").write_bytes(PDF)
    assert importer.scan_once(now=0) + importer.scan_once(now=10) + importer.scan_once(now=20) == []
    assert copies == []  # each scan would copy them (and throw the copies away) otherwise
    assert reads == ["cam1", "cam1"]  # once a scan with files to import (the first has none settled)


def test_an_upload_stored_while_a_dropped_file_was_copied_wins_the_room(
    gallery: Gallery, principal: auth.Principal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The importer's check before copying saw room; the insert's check sees the upload that took
    it meanwhile: the copy placed in media/ goes, and the dropped file stays for later."""
    importer = IncomingImporter(gallery)
    incoming, _ = gallery.storage.device_paths("cam1")
    gallery.quota.limit = len(PDF)
    take = importer._take
    uploaded: list[str] = []

    def upload_meanwhile(file):  # type: ignore[no-untyped-def]
        taken = take(file)
        uploaded.append(store(gallery, principal, data=PDF, name="meanwhile.pdf").id)
        return taken

    monkeypatch.setattr(importer, "_take", upload_meanwhile)
    (incoming / "clip.pdf").write_bytes(PDF)
    assert importer.scan_once(now=0) + importer.scan_once(now=10) == []
    assert (incoming / "clip.pdf").exists()
    assert stored_files(gallery.settings.data_dir) == [gallery.storage.media_path("cam1", uploaded[0])]
    assert usage(gallery) == {"cam1": len(PDF)} == truth(gallery)


def _ids(gallery: Gallery) -> list[str]:
    with gallery.db.engine.connect() as c:
        return [r[0] for r in c.execute(sa.text("SELECT id FROM events"))]


# -- thumbnails: those the device sends count, those the server makes do not ------------------------


def test_the_devices_thumbnails_count_with_their_media(gallery: Gallery, principal: auth.Principal) -> None:
    with_thumbnail = store(gallery, principal, data=PDF, name="a.pdf", thumbnail=b"t" * 50)
    store(gallery, principal, data=PDF, name="b.pdf")
    assert with_thumbnail.thumbnail_size == 50
    assert usage(gallery) == {"cam1": 2 * len(PDF) + 50} == truth(gallery)
    gallery.delete_event(principal, "cam1", with_thumbnail.id)
    assert usage(gallery) == {"cam1": len(PDF)} == truth(gallery)


def test_a_thumbnail_the_server_makes_does_not_count(gallery: Gallery, principal: auth.Principal) -> None:
    from PIL import Image

    from gallery_server.thumbnails import Thumbnailer

    image = io.BytesIO()
    Image.new("RGB", (640, 480), (200, 30, 30)).save(image, "PNG")
    event = store(gallery, principal, data=image.getvalue(), name="photo.png")
    assert Thumbnailer(gallery).work_once() == [event.id]
    assert gallery.get_event(principal, "cam1", event.id).has_thumbnail is True
    assert usage(gallery) == {"cam1": len(image.getvalue())} == truth(gallery)


def test_events_of_no_bytes_with_thumbnails_stop_at_the_quota(gallery: Gallery, principal: auth.Principal) -> None:
    """A device at its quota could otherwise fill the disk with empty events and 10 MiB thumbnails."""
    gallery.quota.limit = 100
    store(gallery, principal, data=b"", name="a.bin", thumbnail=b"t" * 60)
    with gallery.begin_upload(principal, "cam1") as upload, pytest.raises(Exhausted) as excinfo:
        upload.fields.name = "b.bin"
        upload.write_media(b"")
        upload.write_thumbnail(b"t" * 41)  # refused as it comes, not once stored
    refused(excinfo, used=60, size=41, limit=100)
    assert (row_count(gallery), usage(gallery), len(stored_files(gallery.settings.data_dir))) == (
        1, {"cam1": 60}, 2)
    store(gallery, principal, data=b"", name="b.bin", thumbnail=b"t" * 40)  # exactly the quota
    assert usage(gallery) == {"cam1": 100} == truth(gallery)


def _thumbnail_put(gallery: Gallery, signed: SignedUploads, url: str, data: bytes) -> str:
    target = signed.verify("cam1", url.rsplit("/", 1)[1])
    with gallery.open_upload("cam1", media_is="thumbnail") as upload:
        upload.write_media(data)
        return signed.complete(target, upload)


def test_a_pre_signed_thumbnail_past_the_quota_leaves_the_event_as_it_was(
    gallery: Gallery, signed: SignedUploads, principal: auth.Principal
) -> None:
    urls = signed.create_urls(principal, "cam1", "p.bin", thumbnail=True)
    media = signed.verify("cam1", urls.media_url.rsplit("/", 1)[1])
    with gallery.open_upload("cam1") as upload:
        upload.write_media(b"p" * 100)
        event_id = signed.complete(media, upload)
    gallery.quota.limit = 100 + 9
    with pytest.raises(Exhausted) as excinfo:  # as its bytes come
        _thumbnail_put(gallery, signed, urls.thumbnail_url, b"t" * 10)
    refused(excinfo, used=100, size=10, limit=109)
    gallery.quota.limit = 100 + len(PDF) + 9  # room for the thumbnail, until another upload takes it
    target = signed.verify("cam1", urls.thumbnail_url.rsplit("/", 1)[1])
    with gallery.open_upload("cam1", media_is="thumbnail") as upload:
        upload.write_media(b"t" * 10)
        other = _fill_meanwhile(gallery, principal)
        with pytest.raises(Exhausted) as excinfo:  # in the transaction that would attach it
            signed.complete(target, upload)
    assert excinfo.value.reason == QUOTA_EXCEEDED
    event = gallery.get_event(principal, "cam1", event_id)
    assert (event.has_thumbnail, event.thumbnail_size) == (False, None)
    assert not gallery.storage.thumbnail_path("cam1", event_id).exists()
    assert usage(gallery) == {"cam1": 100 + len(PDF)} == truth(gallery)
    signed.require_unused(target)  # the client may PUT it again
    gallery.delete_event(principal, "cam1", other.id)
    assert _thumbnail_put(gallery, signed, urls.thumbnail_url, b"t" * 10) == event_id
    assert gallery.storage.thumbnail_path("cam1", event_id).read_bytes() == b"t" * 10
    assert usage(gallery) == {"cam1": 110} == truth(gallery)


def test_a_pre_signed_thumbnail_sent_before_its_media_counts_from_its_put(
    gallery: Gallery, signed: SignedUploads, principal: auth.Principal
) -> None:
    """No event counts it until its media comes, and its media may never come: the grant does
    (URLs whose media never came held thumbnails no quota saw, for a day)."""
    gallery.quota.limit = 100 + 9
    urls = signed.create_urls(principal, "cam1", "p.bin", thumbnail=True)
    event_id = _thumbnail_put(gallery, signed, urls.thumbnail_url, b"t" * 10)
    assert (usage(gallery), gallery.quota.used("cam1")) == ({}, 10)  # no event yet, the file is there
    media = signed.verify("cam1", urls.media_url.rsplit("/", 1)[1])
    with gallery.open_upload("cam1") as upload, pytest.raises(Exhausted) as excinfo:
        upload.write_media(b"p" * 100)  # fits alone, not with its thumbnail: refused as it comes
    refused(excinfo, used=10, size=100, limit=109)
    signed.require_unused(media)
    assert row_count(gallery) == 0
    gallery.quota.limit = 110
    with gallery.open_upload("cam1") as upload:
        upload.write_media(b"p" * 100)
        assert signed.complete(media, upload) == event_id
    event = gallery.get_event(principal, "cam1", event_id)
    assert (event.has_thumbnail, event.thumbnail_size) == (True, 10)
    assert usage(gallery) == {"cam1": 110} == truth(gallery)
    assert gallery.quota.used("cam1") == 110  # counted once: by the event now, not the grant


def test_thumbnails_of_urls_whose_media_never_comes_stop_at_the_quota(
    gallery: Gallery, signed: SignedUploads, principal: auth.Principal
) -> None:
    gallery.quota.limit = 1000
    for i in range(2):
        urls = signed.create_urls(principal, "cam1", f"{i}.bin", thumbnail=True)
        _thumbnail_put(gallery, signed, urls.thumbnail_url, b"t" * 450)
    urls = signed.create_urls(principal, "cam1", "2.bin", thumbnail=True)
    with pytest.raises(Exhausted) as excinfo:  # as its bytes come
        _thumbnail_put(gallery, signed, urls.thumbnail_url, b"t" * 101)
    refused(excinfo, used=900, size=101, limit=1000)
    target = signed.verify("cam1", urls.thumbnail_url.rsplit("/", 1)[1])
    with gallery.open_upload("cam1", media_is="thumbnail") as upload:
        upload.write_media(b"t" * 100)
        other = signed.create_urls(principal, "cam1", "3.bin", thumbnail=True)
        _thumbnail_put(gallery, signed, other.thumbnail_url, b"t" * 50)  # takes the room meanwhile
        with pytest.raises(Exhausted):  # in the transaction that would keep it
            signed.complete(target, upload)
    signed.require_unused(target)
    assert not gallery.storage.thumbnail_path("cam1", target.event_id).exists()
    assert gallery.quota.used("cam1") == 950


def test_an_announced_thumbnail_counts_and_its_event_once_pulled(gallery: Gallery, principal: auth.Principal) -> None:
    devices = Devices(gallery)
    device = auth.Principal("cam1", frozenset({"cam1"}), frozenset({auth.DEVICE}))
    content = b"pulled" * 10
    [announced] = devices.announce(device, "cam1", [Announcement(
        device_key="dcim/c.mp4", name="c.mp4", size=len(content), sha256=hashlib.sha256(content).hexdigest(),
        thumbnail=b"t" * 30)])
    assert usage(gallery) == {"cam1": 30} == truth(gallery)  # the media is on the device, its thumbnail here
    devices.pull(principal, "cam1", announced.id)
    pulled = devices.pulled_event(device, "cam1", announced.id)
    with gallery.open_upload("cam1") as upload:
        upload.fill(pulled)
        upload.write_media(content)
        gallery.store(upload, fill=pulled, before_insert=devices.complete_pull)
    assert usage(gallery) == {"cam1": len(content) + 30} == truth(gallery)


def test_dropped_media_whose_thumbnail_does_not_fit_waits_with_it(
    gallery: Gallery, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Uncopied: counted by the insert alone, the media was copied again (and thrown away) at
    every scan."""
    importer = IncomingImporter(gallery)
    inbox, thumbs = gallery.storage.device_paths("cam1")
    write(inbox / "clip.pdf", PDF)
    write(thumbs / "clip.jpg", b"t" * 10)
    gallery.quota.limit = len(PDF) + 9
    copies: list[str] = []
    take = importer._take
    monkeypatch.setattr(importer, "_take", lambda file: copies.append(file.name) or take(file))
    assert settle(importer) + importer.scan_once(now=20) + importer.scan_once(now=30) == []
    assert copies == []
    assert (row_count(gallery), leftovers(gallery), stored_files(gallery.settings.data_dir)) == (0, [], [])
    assert [p.name for p in (*inbox.iterdir(), *thumbs.iterdir())] == ["clip.pdf", "clip.jpg"]
    gallery.quota.limit = len(PDF) + 10
    [event_id] = settle(importer, 100)
    assert gallery.storage.thumbnail_path("cam1", event_id).read_bytes() == b"t" * 10
    assert usage(gallery) == {"cam1": len(PDF) + 10} == truth(gallery)


def test_a_late_dropped_thumbnail_past_the_quota_waits(gallery: Gallery, principal: auth.Principal) -> None:
    importer = IncomingImporter(gallery)
    inbox, thumbs = gallery.storage.device_paths("cam1")
    write(inbox / "clip.pdf", PDF)
    [event_id] = settle(importer)
    gallery.quota.limit = len(PDF) + 9
    write(thumbs / "clip.jpg", b"t" * 10)
    assert settle(importer, 100) == []
    assert gallery.get_event(principal, "cam1", event_id).has_thumbnail is False
    assert not gallery.storage.thumbnail_path("cam1", event_id).exists()
    assert [p.name for p in thumbs.iterdir()] == ["clip.jpg"]
    gallery.quota.limit = len(PDF) + 10
    settle(importer, 200)
    assert gallery.get_event(principal, "cam1", event_id).has_thumbnail is True
    assert usage(gallery) == {"cam1": len(PDF) + 10} == truth(gallery)


def test_announced_thumbnails_past_the_quota_are_left_out(gallery: Gallery) -> None:
    """Announced events hold no media here, but their thumbnails are on the server's disk: 50
    empty announcements with 100 KB thumbnails put 5 MB there past a quota of 100 bytes."""
    devices = Devices(gallery)
    device = auth.Principal("cam1", frozenset({"cam1"}), frozenset({auth.DEVICE}))
    gallery.quota.limit = 100
    announced = devices.announce(device, "cam1", [
        Announcement(device_key=f"dcim/{i}.mp4", name=f"{i}.mp4", thumbnail=b"t" * 40) for i in range(5)])
    assert [e.has_thumbnail for e in announced] == [True, True, False, False, False]  # the events are all there
    assert usage(gallery) == {"cam1": 80} == truth(gallery)
    assert len(stored_files(gallery.settings.data_dir)) == 2


def test_a_pulled_upload_refused_at_its_commit_leaves_the_thumbnail_it_brought_counted_right(
    gallery: Gallery, principal: auth.Principal,
) -> None:
    """Its thumbnail replaced the announced one's file, which stays (store()); the retry without a
    thumbnail counted the announced size (1 byte) for a 150-byte file."""
    devices = Devices(gallery)
    device = auth.Principal("cam1", frozenset({"cam1"}), frozenset({auth.DEVICE}))
    content = b"pulled" * 20
    [announced] = devices.announce(device, "cam1", [Announcement(
        device_key="dcim/d.mp4", name="d.mp4", size=len(content), sha256=hashlib.sha256(content).hexdigest(),
        thumbnail=b"t")])
    devices.pull(principal, "cam1", announced.id)
    pulled = devices.pulled_event(device, "cam1", announced.id)
    gallery.quota.limit = len(content) + 150 + len(PDF) - 1  # room for either upload alone
    with gallery.open_upload("cam1") as upload:
        upload.fill(pulled)
        upload.write_media(content)
        upload.write_thumbnail(b"T" * 150)
        other = _fill_meanwhile(gallery, principal)
        with pytest.raises(Exhausted):
            gallery.store(upload, fill=pulled, before_insert=devices.complete_pull)
    # The 150 bytes it left in the announced thumbnail's place count from the refusal on.
    kept = gallery.get_event(principal, "cam1", announced.id)
    assert (kept.state, kept.thumbnail_size) == ("on_device", 150)
    assert usage(gallery) == {"cam1": 150 + len(PDF)} == truth(gallery)
    gallery.delete_event(principal, "cam1", other.id)
    with gallery.open_upload("cam1") as upload:
        upload.fill(pulled)
        upload.write_media(content)
        stored = gallery.store(upload, fill=pulled, before_insert=devices.complete_pull)
    thumbnail = gallery.storage.thumbnail_path("cam1", stored.id)
    assert stored.thumbnail_size == thumbnail.stat().st_size == 150
    assert usage(gallery) == {"cam1": len(content) + 150} == truth(gallery)


def test_dropped_media_whose_thumbnail_is_too_large_to_take_is_imported_alone(gallery: Gallery) -> None:
    """The thumbnail is skipped (larger than GALLERY_MAX_THUMBNAIL_BYTES), so it takes no room:
    counted with its media, the media waited for ever."""
    small = Gallery(dataclasses.replace(gallery.settings, max_thumbnail_bytes=100), gallery.db, gallery.storage)
    importer = IncomingImporter(small)
    inbox, thumbs = small.storage.device_paths("cam1")
    write(inbox / "clip.pdf", PDF)
    write(thumbs / "clip.jpg", b"t" * 101)
    small.quota.limit = len(PDF) + 100
    [event_id] = settle(importer)
    assert small.storage.media_path("cam1", event_id).read_bytes() == PDF
    assert usage(small) == {"cam1": len(PDF)} == truth(small)


def test_a_capture_announced_in_place_of_one_never_uploaded_keeps_its_thumbnail_at_the_quota(
    gallery: Gallery, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A dashcam's loop recording reuses its file names: the new capture replaces the old one's
    event, thumbnail and all, in one transaction, so the old thumbnail's room is the new one's."""
    devices = Devices(gallery)
    device = auth.Principal("cam1", frozenset({"cam1"}), frozenset({auth.DEVICE}))
    gallery.quota.limit = 100
    devices.announce(device, "cam1", [Announcement(device_key="FILE0001.MP4", name="FILE0001.MP4", size=5,
                                                   thumbnail=b"a" * 80)])
    [again] = devices.announce(device, "cam1", [Announcement(device_key="FILE0001.MP4", name="FILE0001.MP4",
                                                             size=6, thumbnail=b"b" * 80)])
    assert again.has_thumbnail is True
    assert usage(gallery) == {"cam1": 80} == truth(gallery)
    # The check in the announcement's transaction holds without the one before it (announcements
    # of one device at once): past the quota, the event is taken without its thumbnail.
    monkeypatch.setattr(Devices, "_thumbnail_fits", lambda self, device, size: True)
    [other] = devices.announce(device, "cam1", [Announcement(device_key="FILE0002.MP4", name="FILE0002.MP4",
                                                             thumbnail=b"c" * 30)])
    assert other.has_thumbnail is False
    assert not gallery.storage.thumbnail_path("cam1", other.id).exists()
    assert usage(gallery) == {"cam1": 80} == truth(gallery)
