"""Announcements, pulls and the command channel, on SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import threading
import time

import pytest
import sqlalchemy as sa
from sqlmodel import select

from gallery_server import auth
from gallery_server import devices as devices_module
from gallery_server.clock import aware, utcnow
from gallery_server.devices import Announcement, Devices
from gallery_server.errors import (
    Busy,
    CommitOutcomeUnknown,
    DatabaseUnavailable,
    Exhausted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    TooLarge,
    Unauthenticated,
)
from gallery_server.models import DeletedCapture, DeviceCommand, DeviceConnection, Event
from gallery_server.service import Gallery
from gallery_server.storage import Storage

from ..conftest import (
    event_commit_fails,
    failing_event_commit,
    make_settings,
    statements_run,
    stored_files,
    wait_until,
)

DEVICE = "cam-1"


@pytest.fixture
def devices(gallery):
    return Devices(gallery)


@pytest.fixture
def device_principal():
    return auth.Principal("cam-1", frozenset({DEVICE}), frozenset({auth.DEVICE}))


def announce(devices, principal, key="dcim/a.mp4", **kwargs):
    [event] = devices.announce(principal, DEVICE, [Announcement(device_key=key, name=key.split("/")[-1],
                                                                 size=kwargs.pop("size", 10), **kwargs)])
    return event


def commands(gallery, event_id=None):
    with gallery.db.session() as session:
        query = select(DeviceCommand).order_by(DeviceCommand.seq)
        if event_id:
            query = query.where(DeviceCommand.event_id == event_id)
        return list(session.exec(query))


def test_announce_is_idempotent_per_key_and_lists_on_device(devices, gallery, device_principal, principal):
    first = announce(devices, device_principal, thumbnail=b"\xff\xd8thumb")
    again = announce(devices, device_principal, thumbnail=b"\xff\xd8thumb")
    assert again.id == first.id
    assert first.state == "on_device" and first.media_type == "video" and first.has_thumbnail
    assert gallery.storage.thumbnail_path(DEVICE, first.id).read_bytes() == b"\xff\xd8thumb"
    [listed] = gallery.list_events(principal, DEVICE)
    assert (listed.id, listed.state, listed.size) == (first.id, "on_device", 10)
    assert not gallery.storage.media_path(DEVICE, first.id).exists()
    # The device's word on the kind wins over the name's (a raw photo under a suffix of its own).
    assert announce(devices, device_principal, key="dcim/b.dat", media_type="image").media_type == "image"


def test_announced_event_has_a_thumbnail_but_no_content(devices, gallery, device_principal, principal):
    event = announce(devices, device_principal, thumbnail=b"\xff\xd8\xff\xe0thumb")
    with pytest.raises(FailedPrecondition) as info:
        gallery.open_content(principal, DEVICE, event.id)
    assert (info.value.reason, info.value.metadata["event_id"]) == ("EVENT_ON_DEVICE", event.id)
    thumbnail = gallery.open_thumbnail(principal, DEVICE, event.id)
    with thumbnail.file:
        assert thumbnail.size == len(b"\xff\xd8\xff\xe0thumb")
        assert thumbnail.mime_type == "image/jpeg"


def test_an_announcement_whose_commit_outcome_is_unknown_keeps_its_thumbnail(devices, gallery, device_principal):
    """Its row may name the thumbnail: the file stays (Database.commit); without a row it is a
    leftover for reconciliation."""
    if gallery.db.engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL's backend ends the connection during the COMMIT")
    with event_commit_fails(gallery.db), pytest.raises(CommitOutcomeUnknown):
        announce(devices, device_principal, thumbnail=b"\xff\xd8\xff" + b"t" * 100)
    [thumbnail] = stored_files(gallery.settings.data_dir)
    assert thumbnail.read_bytes() == b"\xff\xd8\xff" + b"t" * 100
    with gallery.db.session() as session:
        assert session.exec(select(Event)).all() == []


def test_announce_needs_device_scope_and_the_device(devices, principal):
    with pytest.raises(PermissionDenied):  # read+write is not device scope
        devices.announce(principal, DEVICE, [Announcement(device_key="k", name="a.jpg")])
    other = auth.Principal("x", frozenset({"cam-2"}), frozenset({auth.DEVICE}))
    with pytest.raises(PermissionDenied):
        devices.announce(other, DEVICE, [Announcement(device_key="k", name="a.jpg")])


def test_announce_validates(devices, device_principal):
    with pytest.raises(InvalidArgument):
        devices.announce(device_principal, DEVICE, [Announcement(device_key="", name="a.jpg")])
    with pytest.raises(InvalidArgument):
        devices.announce(device_principal, DEVICE, [Announcement(device_key="k", name="a\x00b")])
    with pytest.raises(TooLarge):
        devices.announce(device_principal, DEVICE,
                         [Announcement(device_key=str(i), name="a") for i in range(1001)])


def test_devices_announcing_the_same_key_get_events_of_their_own(devices, gallery, device_principal, principal):
    other = auth.Principal("cam-2", frozenset({"cam-2"}), frozenset({auth.DEVICE}))
    mine = announce(devices, device_principal, key="dcim/a.mp4")
    [theirs] = devices.announce(other, "cam-2", [Announcement(device_key="dcim/a.mp4", name="a.mp4", size=10)])
    assert theirs.id != mine.id
    assert [e.id for e in gallery.list_events(principal, "cam-2")] == [theirs.id]
    assert [e.id for e in gallery.list_events(principal, DEVICE)] == [mine.id]


def test_pull_queues_one_command_while_open(devices, gallery, device_principal, principal):
    event = announce(devices, device_principal)
    results = [devices.pull(principal, DEVICE, event.id) for _ in range(3)]
    assert all(r.success and r.pull.state == "pending" for r in results)
    ttl = results[0].pull.expires_at - results[0].pull.requested
    assert ttl == datetime.timedelta(seconds=gallery.settings.pull_ttl)  # GALLERY_PULL_TTL
    assert len(commands(gallery, event.id)) == 1


def test_a_pull_leaves_the_listing_as_it_was(devices, gallery, device_principal, principal):
    """Opening a pull locks the event's row by a write that changes nothing a listing shows: a
    client polling the device's page with its ETag is answered 304 until the content comes."""
    event = announce(devices, device_principal)
    listed = gallery.list_answer(principal, DEVICE, "json")
    assert devices.pull(principal, DEVICE, event.id).pull.state == "pending"
    assert len(commands(gallery, event.id)) == 1
    assert gallery.list_answer(principal, DEVICE, "json", if_none_match=listed.etag).page is None


def test_a_pull_asked_for_while_its_content_is_stored_waits_for_the_store_and_opens_nothing(
        devices, gallery, device_principal, principal):
    """The pull's row lock: a store of the content holding the event's row until its commit (as
    Gallery.store does) makes the pull wait, then find the event stored; no command is left open
    for content already there."""
    event = announce(devices, device_principal)
    answers = []
    with gallery.db.engine.connect() as c:
        storing = c.begin()
        c.execute(sa.update(Event).where(Event.id == event.id).values(state="stored"))
        pulling = threading.Thread(target=lambda: answers.append(devices.pull(principal, DEVICE, event.id)))
        pulling.start()
        pulling.join(0.5)
        assert pulling.is_alive()  # waiting for the row
        storing.commit()
    pulling.join(10)
    [answer] = answers
    assert answer.event.state == "stored" and commands(gallery, event.id) == []


def test_concurrent_pulls_queue_one_command(devices, gallery, device_principal, principal):
    event = announce(devices, device_principal)
    threads = [threading.Thread(target=devices.pull, args=(principal, DEVICE, event.id)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(commands(gallery, event.id)) == 1


def test_pull_errors(devices, device_principal, principal):
    event = announce(devices, device_principal)
    with pytest.raises(NotFound):
        devices.pull(principal, DEVICE, "evt_" + "A" * 22)
    with pytest.raises(NotFound):  # another device's event is not this device's
        devices.pull(principal, "cam-2", event.id)
    reader = auth.Principal("r", frozenset({"*"}), frozenset({auth.READ}))
    with pytest.raises(PermissionDenied):
        devices.pull(reader, DEVICE, event.id)
    stranger = auth.Principal("s", frozenset({"cam-2"}), frozenset({auth.WRITE}))
    with pytest.raises(PermissionDenied):  # permission before existence
        devices.pull(stranger, DEVICE, "evt_" + "A" * 22)
    with pytest.raises(InvalidArgument):
        devices.pull(principal, DEVICE, event.id, wait=61)
    assert devices.pull(principal, DEVICE, event.id, wait=60, client_waiting=lambda: False).success


def test_one_channel_gets_a_command_and_a_dead_ones_commands_are_redelivered(
    devices, gallery, device_principal, principal
):
    event = announce(devices, device_principal)
    devices.pull(principal, DEVICE, event.id)
    first, second = devices.connect(device_principal, DEVICE), devices.connect(device_principal, DEVICE)
    deliveries = first.claim() + second.claim()
    assert [(d.event_id, d.device_key, d.name) for d in deliveries] == [(event.id, "dcim/a.mp4", "a.mp4")]
    assert first.claim() + second.claim() == []  # never twice while the holder is live
    holder, other = (first, second) if commands(gallery)[0].delivered_to == first.id else (second, first)
    holder.close()
    [again] = other.claim()
    assert again.command_id == deliveries[0].command_id
    assert commands(gallery)[0].attempts == 2
    other.close()


def test_a_channel_waits_for_no_poll_after_a_pull_or_once_closed(devices, device_principal, principal, monkeypatch):
    """Within one process a pull reaches the device's channel at once, not at its next poll; so
    does close(), and a closed channel's wait returns at once."""
    monkeypatch.setattr(devices_module, "POLL_INTERVAL_S", 60.0)  # a poll would come far too late
    event = announce(devices, device_principal)
    channel = devices.connect(device_principal, DEVICE)
    wakeups: list[None] = []

    def wait_until_closed() -> None:
        while not channel.closed.is_set():
            channel.wait()
            wakeups.append(None)

    waiter = threading.Thread(target=wait_until_closed, daemon=True)
    waiter.start()
    # Pulled again until woken: the channel may not be waiting yet when the first pull comes.
    assert wait_until(lambda: bool(devices.pull(principal, DEVICE, event.id)) and bool(wakeups), 10)
    assert [d.event_id for d in channel.claim()] == [event.id]
    channel.close()
    waiter.join(10)
    assert not waiter.is_alive()
    returned = threading.Event()
    threading.Thread(target=lambda: (channel.wait(), returned.set()), daemon=True).start()
    assert returned.wait(10)


def test_stale_connection_counts_as_gone(devices, gallery, device_principal, principal):
    event = announce(devices, device_principal)
    devices.pull(principal, DEVICE, event.id)
    crashed = devices.connect(device_principal, DEVICE)
    assert len(crashed.claim()) == 1
    # The server holding `crashed` died: its heartbeat stops.
    old = devices_module.utcnow() - datetime.timedelta(seconds=devices_module.CONNECTION_STALE_S + 1)
    with gallery.db.session() as session:
        session.exec(sa.update(DeviceConnection).values(last_seen=old))
        session.commit()
    fresh = devices.connect(device_principal, DEVICE)
    assert [d.event_id for d in fresh.claim()] == [event.id]


def test_a_new_connection_leaves_the_rows_of_live_ones(devices, gallery, device_principal, principal):
    """connect() removes only rows whose heartbeat stopped long ago: a live connection's command
    (heartbeat 10 s ago, not yet stale) is not handed to the newer one."""
    event = announce(devices, device_principal)
    devices.pull(principal, DEVICE, event.id)
    holder = devices.connect(device_principal, DEVICE)
    assert len(holder.claim()) == 1
    with gallery.db.session() as session:
        session.exec(sa.update(DeviceConnection).values(
            last_seen=devices_module.utcnow() - datetime.timedelta(seconds=10)))
        session.commit()
    newer = devices.connect(device_principal, DEVICE)
    assert newer.claim() == []
    with gallery.db.session() as session:
        assert sorted(session.exec(select(DeviceConnection.id))) == sorted([holder.id, newer.id])


def test_a_channel_heartbeats_once_per_heartbeat_interval(devices, gallery, device_principal, monkeypatch):
    monkeypatch.setattr(devices_module, "POLL_INTERVAL_S", 0.01)
    monkeypatch.setattr(devices_module, "HEARTBEAT_S", 1.0)
    channel = devices.connect(device_principal, DEVICE)
    old = devices_module.utcnow() - datetime.timedelta(seconds=10)
    with gallery.db.session() as session:
        session.exec(sa.update(DeviceConnection).values(last_seen=old))
        session.commit()
    assert wait_until(channel.wait, 10)  # a heartbeat comes due: the connection's row says it is live
    with gallery.db.session() as session:
        assert devices_module.aware(session.get(DeviceConnection, channel.id).last_seen) > devices_module.aware(old)
    assert channel.wait() is False  # the next poll is not a heartbeat
    channel.close()


def test_the_channel_of_an_expired_token_ends_at_once(devices, device_principal, monkeypatch):
    monkeypatch.setattr(devices_module, "POLL_INTERVAL_S", 60.0)  # no slack: not even one poll
    expired = dataclasses.replace(device_principal, expires_at=time.time() - 1)
    channel = devices.connect(expired, DEVICE)
    commands = channel.commands()
    assert next(commands) is None
    started = time.monotonic()
    with pytest.raises(Unauthenticated) as caught:
        next(commands)
    assert caught.value.reason == "TOKEN_EXPIRED"
    assert time.monotonic() - started < 30
    channel.close()


def test_commands_are_delivered_in_order(devices, device_principal, principal):
    events = [announce(devices, device_principal, key=f"k{i}") for i in range(5)]
    for event in reversed(events):
        devices.pull(principal, DEVICE, event.id)
    channel = devices.connect(device_principal, DEVICE)
    assert [d.event_id for d in channel.claim()] == [e.id for e in reversed(events)]


def test_failure_is_reported_and_a_new_pull_can_follow(devices, gallery, device_principal, principal):
    event = announce(devices, device_principal)
    devices.pull(principal, DEVICE, event.id)
    [pending] = commands(gallery, event.id)
    devices.acknowledge(DEVICE, pending.id)  # only a delivered command can be acknowledged
    assert devices.pull_status(event.id).state == "pending"
    channel = devices.connect(device_principal, DEVICE)
    [delivery] = channel.claim()
    devices.acknowledge(DEVICE, delivery.command_id)
    assert devices.pull_status(event.id).state == "delivered"
    devices.fail("cam-2", delivery.command_id, "not mine")  # another device cannot touch it
    assert devices.pull_status(event.id).state == "delivered"
    devices.fail(DEVICE, delivery.command_id, "file deleted on device")
    status = devices.pull_status(event.id)
    assert (status.state, status.error) == ("failed", "file deleted on device")
    result = devices.pull(principal, DEVICE, event.id, wait=1)
    assert result.pull.state in ("pending", "delivered")
    assert len(commands(gallery, event.id)) == 2


def test_a_failure_reason_is_kept_to_1024_characters_and_never_empty(devices, device_principal, principal):
    event = announce(devices, device_principal)
    channel = devices.connect(device_principal, DEVICE)
    for reason, kept in (("x" * 5000, "x" * 1024), ("", "failed on the device")):
        devices.pull(principal, DEVICE, event.id)
        [delivery] = channel.claim()
        devices.fail(DEVICE, delivery.command_id, reason)
        assert (devices.pull_status(event.id).state, devices.pull_status(event.id).error) == ("failed", kept)


def test_a_nul_from_the_device_is_no_error(devices, device_principal, principal):
    """PostgreSQL's text holds no NUL: a failure whose reason had one was dropped with an ERROR
    (the pull stayed "delivered"), and a command id with one was an ERROR with the statement."""
    event = announce(devices, device_principal)
    channel = devices.connect(device_principal, DEVICE)
    devices.pull(principal, DEVICE, event.id)
    [delivery] = channel.claim()
    no_command = delivery.command_id + "\x00"
    devices.acknowledge(DEVICE, no_command)
    devices.progress(DEVICE, no_command, 5)
    devices.fail(DEVICE, no_command, "x")
    assert devices.pull_status(event.id).state == "delivered"
    devices.fail(DEVICE, delivery.command_id, "bad\x00 reason")
    assert (devices.pull_status(event.id).state, devices.pull_status(event.id).error) == ("failed", "bad reason")


def test_waiting_pull_reports_failure(devices, device_principal, principal):
    event = announce(devices, device_principal)
    devices.pull(principal, DEVICE, event.id)
    [delivery] = devices.connect(device_principal, DEVICE).claim()
    timer = threading.Timer(0.3, devices.fail, args=(DEVICE, delivery.command_id, "gone"))
    timer.start()
    result = devices.pull(principal, DEVICE, event.id, wait=5)
    timer.join()
    assert not result.success
    assert result.pull.state == "failed"


def test_open_pulls_count_what_devices_still_owe(devices, gallery, device_principal, principal):
    first, second, third = (announce(devices, device_principal, key=f"k{i}") for i in range(3))
    assert devices_module.open_pulls(gallery.db) == 0
    for event in (first, second, third):
        devices.pull(principal, DEVICE, event.id)
    devices.pull(principal, DEVICE, first.id)  # the same open pull
    assert devices_module.open_pulls(gallery.db) == 3
    channel = devices.connect(device_principal, DEVICE)
    deliveries = {d.event_id: d for d in channel.claim()}
    devices.acknowledge(DEVICE, deliveries[first.id].command_id)
    assert devices_module.open_pulls(gallery.db) == 3  # delivered and acknowledged: still owed
    devices.fail(DEVICE, deliveries[first.id].command_id, "gone")
    assert devices_module.open_pulls(gallery.db) == 2
    with gallery.db.session() as session:  # past its expiry, before anything marks it expired
        session.exec(sa.update(DeviceCommand).where(DeviceCommand.event_id == second.id).values(
            expires_at=devices_module.utcnow() - datetime.timedelta(seconds=1)))
        session.commit()
    assert devices_module.open_pulls(gallery.db) == 1


def test_pulls_expire(devices, gallery, device_principal, principal):
    event = announce(devices, device_principal)
    devices.pull(principal, DEVICE, event.id)
    with gallery.db.session() as session:
        session.exec(sa.update(DeviceCommand).values(
            expires_at=devices_module.utcnow() - datetime.timedelta(seconds=1)))
        session.commit()
    assert devices.pull_status(event.id).state == "expired"
    assert devices.connect(device_principal, DEVICE).claim() == []
    devices.pull(principal, DEVICE, event.id)  # expiry frees the event for a new pull
    assert [c.state for c in commands(gallery, event.id)] == ["expired", "pending"]
    assert devices.pull_status(event.id).state == "pending"  # the latest pull's


def test_a_waiting_pull_returns_once_its_command_expires(devices, gallery, device_principal, principal):
    short = Devices(Gallery(dataclasses.replace(gallery.settings, pull_ttl=1), gallery.db, gallery.storage))
    event = announce(short, device_principal)
    started = time.monotonic()
    result = short.pull(principal, DEVICE, event.id, wait=30)
    assert (result.pull.state, result.success) == ("expired", False)
    assert time.monotonic() - started < 15  # not the whole wait


def test_pulled_upload_fills_the_announced_event(devices, gallery, device_principal, principal):
    content = b"the real bytes" * 1000
    event = announce(devices, device_principal, size=len(content),
                     sha256=hashlib.sha256(content).hexdigest())
    devices.pull(principal, DEVICE, event.id)
    announced = devices.pulled_event(device_principal, DEVICE, event.id)
    with gallery.open_upload(DEVICE) as upload:
        upload.fields.name = announced.name
        upload.fields.declared_sha256 = announced.sha256
        upload.write_media(content)
        stored = gallery.store(upload, fill=announced, before_insert=devices.complete_pull)
    assert stored.id == event.id
    got = gallery.get_event(principal, DEVICE, event.id)
    assert (got.state, got.size, got.created) == ("stored", len(content), event.created)
    assert gallery.storage.media_path(DEVICE, event.id).read_bytes() == content
    assert devices.pull_status(event.id).state == "completed"
    [command] = commands(gallery, event.id)
    devices.acknowledge(DEVICE, command.id)  # late reports of the device change nothing
    devices.fail(DEVICE, command.id, "too late")
    assert devices.pull_status(event.id).state == "completed"
    assert devices.connect(device_principal, DEVICE).claim() == []  # nor is it delivered again
    with gallery.db.session() as session:
        session.exec(sa.update(DeviceCommand).values(
            expires_at=devices_module.utcnow() - datetime.timedelta(seconds=1)))
        session.commit()
    devices.expire_overdue()
    assert devices.pull_status(event.id).state == "completed"  # a closed pull does not expire
    assert devices.pull(principal, DEVICE, event.id).success
    assert len(commands(gallery, event.id)) == 1  # a stored event is not pulled again
    with pytest.raises(FailedPrecondition):
        devices.pulled_event(device_principal, DEVICE, event.id)


def test_a_sha256_a_later_announcement_tells_binds_the_pulled_upload(devices, gallery, device_principal, principal):
    """A device that scans cheaply first (key and size) and hashes later announces the capture
    again with its sha256: recorded, so that the pulled upload must match it, as if it had come
    first. One known already is kept: another sha256 is another capture (a new event)."""
    content = b"the real bytes" * 1000
    sha256 = hashlib.sha256(content).hexdigest()
    event = announce(devices, device_principal, size=len(content))
    again = announce(devices, device_principal, size=len(content), sha256=sha256)
    assert (again.id, again.sha256) == (event.id, sha256)
    assert gallery.get_event(principal, DEVICE, event.id).sha256 == sha256
    devices.pull(principal, DEVICE, event.id)
    announced = devices.pulled_event(device_principal, DEVICE, event.id)
    with gallery.open_upload(DEVICE) as upload, pytest.raises(InvalidArgument) as mismatch:
        upload.fields.name = announced.name
        upload.fill(announced)
        upload.write_media(b"X" * len(content))  # the same size, other bytes
        gallery.store(upload, fill=announced)
    assert mismatch.value.reason == "SHA256_MISMATCH"
    assert gallery.get_event(principal, DEVICE, event.id).state == "on_device"
    other = announce(devices, device_principal, size=len(content), sha256=hashlib.sha256(b"other").hexdigest())
    assert other.id != event.id


def test_a_sha256_announced_while_the_pulled_upload_streams_binds_it_too(devices, gallery, device_principal,
                                                                        principal):
    """The upload took the announcement's empty sha256 when it began; the one recorded meanwhile
    is checked at its commit, under the row's lock."""
    content = b"the real bytes" * 1000
    event = announce(devices, device_principal, size=len(content))
    devices.pull(principal, DEVICE, event.id)
    announced = devices.pulled_event(device_principal, DEVICE, event.id)
    for data, stored in ((b"X" * len(content), False), (content, True)):
        with gallery.open_upload(DEVICE) as upload:
            upload.fields.name = announced.name
            upload.fill(announced)
            upload.write_media(data)
            announce(devices, device_principal, size=len(content), sha256=hashlib.sha256(content).hexdigest())
            if stored:
                assert gallery.store(upload, fill=announced).id == event.id
            else:
                with pytest.raises(InvalidArgument) as mismatch:
                    gallery.store(upload, fill=announced)
                assert mismatch.value.reason == "SHA256_MISMATCH"
                assert gallery.get_event(principal, DEVICE, event.id).state == "on_device"
    assert gallery.storage.media_path(DEVICE, event.id).read_bytes() == content


def test_a_pulled_upload_whose_commit_is_refused_keeps_a_thumbnail(devices, gallery, device_principal, principal):
    """The upload's thumbnail replaced the one sent with the announcement, then the COMMIT was
    refused (a deadlock): the event still says it has a thumbnail, and one is there (the upload's,
    of the same capture), while its content is taken back and can be sent again."""
    if gallery.db.engine.dialect.name != "postgresql":
        pytest.skip("a COMMIT refused by PostgreSQL (a deferred trigger)")
    event = announce(devices, device_principal, thumbnail=b"\xff\xd8announced")
    devices.pull(principal, DEVICE, event.id)
    announced = devices.pulled_event(device_principal, DEVICE, event.id)
    with gallery.open_upload(DEVICE) as upload:
        upload.fields.name = announced.name
        upload.write_media(b"hello")
        upload.write_thumbnail(b"\xff\xd8uploaded")
        with event_commit_fails(gallery.db, sqlstate="40P01"), pytest.raises(DatabaseUnavailable):
            gallery.store(upload, fill=announced, before_insert=devices.complete_pull)
    got = gallery.get_event(principal, DEVICE, event.id)
    assert (got.state, got.has_thumbnail) == ("on_device", True)
    assert gallery.storage.thumbnail_path(DEVICE, event.id).read_bytes() == b"\xff\xd8uploaded"
    assert not gallery.storage.media_path(DEVICE, event.id).exists()
    assert devices.pull_status(event.id).state == "pending"


def test_second_fill_of_one_event_is_refused_and_keeps_the_first(devices, gallery, device_principal):
    event = announce(devices, device_principal)
    announced = devices.pulled_event(device_principal, DEVICE, event.id)
    for content, expect_ok in ((b"first", True), (b"second", False)):
        with gallery.open_upload(DEVICE) as upload:
            upload.fields.name = announced.name
            upload.write_media(content)
            if expect_ok:
                gallery.store(upload, fill=announced)
            else:
                with pytest.raises(FailedPrecondition):
                    gallery.store(upload, fill=announced)
    assert gallery.storage.media_path(DEVICE, event.id).read_bytes() == b"first"
    with gallery.db.session() as session:
        assert session.get(Event, event.id).size == len(b"first")


def test_announce_refuses_what_it_cannot_store(devices, gallery, device_principal, principal):
    for bad, reason in (
        (Announcement(device_key="k", name="a.mp4", size=2**63), "INVALID_SIZE"),
        (Announcement(device_key="k\x00", name="a.mp4"), "INVALID_DEVICE_KEY"),
        (Announcement(device_key="k\n", name="a.mp4"), "INVALID_DEVICE_KEY"),
        (Announcement(device_key="k", name="a.mp4", media_type="hologram"), "INVALID_MEDIA_TYPE"),
        (Announcement(device_key="k", name="a.mp4", sha256="ABC"), "INVALID_SHA256"),
    ):
        with pytest.raises(InvalidArgument) as caught:
            devices.announce(device_principal, DEVICE, [bad])
        assert caught.value.reason == reason
    assert gallery.list_events(principal, DEVICE) == []


def test_announce_takes_keys_sizes_and_thumbnails_up_to_their_limits(devices, gallery, device_principal,
                                                                      monkeypatch):
    monkeypatch.setattr(devices_module, "MAX_ANNOUNCE", 3)
    limits = dataclasses.replace(gallery.settings, max_upload_bytes=1000, max_thumbnail_bytes=100)
    at_limits = Devices(Gallery(limits, gallery.db, gallery.storage))
    fits = [Announcement(device_key="k" * 512, name="a.jpg", size=1000, thumbnail=b"t" * 100),
            Announcement(device_key="b", name="b.jpg"), Announcement(device_key="c", name="c.jpg")]
    assert [e.state for e in at_limits.announce(device_principal, DEVICE, fits)] == ["on_device"] * 3
    for over, error, reason in (
        ([Announcement(device_key="k" * 513, name="a.jpg")], InvalidArgument, "INVALID_DEVICE_KEY"),
        ([Announcement(device_key="k", name="a.jpg", size=1001)], InvalidArgument, "INVALID_SIZE"),
        ([Announcement(device_key="k", name="a.jpg", thumbnail=b"t" * 101)], TooLarge, "THUMBNAIL_TOO_LARGE"),
        ([Announcement(device_key=str(i), name="a.jpg") for i in range(4)], TooLarge, "TOO_MANY_EVENTS"),
    ):
        with pytest.raises(error) as caught:
            at_limits.announce(device_principal, DEVICE, over)
        assert caught.value.reason == reason


def test_a_key_announced_twice_in_one_call_refuses_the_call(devices, gallery, device_principal, principal):
    """Before, the second replaced the first's event within the call, and the answer named an
    event that no longer existed."""
    twice = [Announcement(device_key="dup", name="a.jpg", size=1), Announcement(device_key="ok", name="b.jpg"),
             Announcement(device_key="dup", name="b.jpg", size=2)]
    with pytest.raises(InvalidArgument) as caught:
        devices.announce(device_principal, DEVICE, twice)
    assert (caught.value.reason, caught.value.metadata["device_key"]) == ("DUPLICATE_DEVICE_KEY", "dup")
    assert gallery.list_events(principal, DEVICE) == []  # nothing of the call was stored


def test_failed_announcement_leaves_no_thumbnail(devices, gallery, device_principal, principal):
    """The database refuses the COMMIT of the announced event (its thumbnail already in place):
    no row, so no file either."""
    with failing_event_commit(RuntimeError("deferred constraint violated")), pytest.raises(sa.exc.OperationalError):
        devices.announce(device_principal, DEVICE, [Announcement(device_key="k", name="a.jpg",
                                                                 thumbnail=b"\xff\xd8thumb")])
    assert stored_files(gallery.settings.data_dir) == []
    assert gallery.list_events(principal, DEVICE) == []


def test_progress_reports_are_clamped(devices, gallery, device_principal, principal):
    event = announce(devices, device_principal)
    devices.pull(principal, DEVICE, event.id)
    [delivery] = devices.connect(device_principal, DEVICE).claim()
    devices.progress(DEVICE, delivery.command_id, 2**64 - 1)
    assert commands(gallery, event.id)[0].bytes_sent == gallery.settings.max_upload_bytes


def test_deleting_an_event_cancels_its_pull(devices, gallery, device_principal, principal):
    event = announce(devices, device_principal)
    devices.pull(principal, DEVICE, event.id)
    gallery.delete_event(principal, DEVICE, event.id)
    assert devices.connect(device_principal, DEVICE).claim() == []
    [command] = commands(gallery, event.id)
    assert (command.state, command.open_key) == ("cancelled", None)


def fill(gallery, devices, device_principal, event, content):
    announced = devices.pulled_event(device_principal, DEVICE, event.id)
    with gallery.open_upload(DEVICE) as upload:
        upload.fields.name = announced.name
        upload.fields.declared_sha256 = announced.sha256
        upload.write_media(content)
        return gallery.store(upload, fill=announced, before_insert=devices.complete_pull)


def sha(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def test_a_new_capture_under_a_key_replaces_the_one_never_uploaded(devices, gallery, device_principal, principal):
    """A dashcam's loop recording writes FILE0001.MP4 again: the old clip is gone from the device,
    so its announced event goes (its pull cancelled, its thumbnail removed), and the new clip is a
    new event that can be pulled (it used to keep the old sha256, so every upload failed)."""
    old, new = b"the old clip", b"the new clip, longer"
    first = announce(devices, device_principal, key="FILE0001.MP4", size=len(old), sha256=sha(old),
                     thumbnail=b"\xff\xd8old")
    devices.pull(principal, DEVICE, first.id)
    second = announce(devices, device_principal, key="FILE0001.MP4", size=len(new), sha256=sha(new),
                      thumbnail=b"\xff\xd8new")
    assert second.id != first.id
    with pytest.raises(NotFound):
        gallery.get_event(principal, DEVICE, first.id)
    assert not gallery.storage.thumbnail_path(DEVICE, first.id).exists()
    assert [(c.state, c.open_key) for c in commands(gallery, first.id)] == [("cancelled", None)]
    assert announce(devices, device_principal, key="FILE0001.MP4", size=len(new), sha256=sha(new)).id == second.id
    assert fill(gallery, devices, device_principal, second, new).sha256 == sha(new)
    assert [e.id for e in gallery.list_events(principal, DEVICE)] == [second.id]
    assert gallery.storage.thumbnail_path(DEVICE, second.id).read_bytes() == b"\xff\xd8new"


def test_a_new_capture_under_a_key_leaves_the_uploaded_one_stored(devices, gallery, device_principal, principal):
    old, new = b"the old clip", b"the new clip"
    first = announce(devices, device_principal, key="FILE0001.MP4", size=len(old), sha256=sha(old))
    fill(gallery, devices, device_principal, first, old)
    # The same capture again (a reconnect): the stored event, nothing new.
    assert announce(devices, device_principal, key="FILE0001.MP4", size=len(old), sha256=sha(old)).id == first.id
    second = announce(devices, device_principal, key="FILE0001.MP4", size=len(new), sha256=sha(new))
    assert (second.state, second.size) == ("on_device", len(new))
    kept = gallery.get_event(principal, DEVICE, first.id)
    assert (kept.state, kept.sha256, kept.device_key) == ("stored", sha(old), None)
    assert gallery.storage.media_path(DEVICE, first.id).read_bytes() == old
    assert sorted(e.id for e in gallery.list_events(principal, DEVICE)) == sorted([first.id, second.id])


def test_a_replacement_that_meets_a_changed_event_reads_it_again(devices, gallery, device_principal, principal):
    """The key's event was uploaded between the announcement's read and its write: it is not
    removed as if it were still on the device."""
    old, new = b"the old clip", b"the new clip"
    first = announce(devices, device_principal, key="k.mp4", size=len(old), sha256=sha(old))
    fill(gallery, devices, device_principal, first, old)
    assert devices._add(DEVICE, Announcement(device_key="k.mp4", name="k.mp4", size=len(new), sha256=sha(new),
                                             thumbnail=b"\xff\xd8new"),
                        replacing=first) is None  # `first` as read before the upload: on_device
    assert gallery.get_event(principal, DEVICE, first.id).state == "stored"
    assert [e.id for e in gallery.list_events(principal, DEVICE)] == [first.id]
    assert list(gallery.storage.media_root.rglob("*.thumb")) == []


@pytest.mark.parametrize("uploaded", [False, True])
def test_a_deleted_capture_is_not_announced_again(devices, gallery, device_principal, principal, uploaded):
    """The device announces its whole folder after every reconnect: what a user deleted stays
    deleted while the device holds the same file; new content under the key is a new event."""
    content = b"a capture"
    event = announce(devices, device_principal, key="a.jpg", size=len(content), sha256=sha(content))
    if uploaded:
        fill(gallery, devices, device_principal, event, content)
    gallery.delete_event(principal, DEVICE, event.id)
    again = announce(devices, device_principal, key="a.jpg", size=len(content), sha256=sha(content))
    assert (again.id, again.state) == (event.id, "deleted")
    assert gallery.list_events(principal, DEVICE) == []
    with pytest.raises(NotFound):
        devices.pull(principal, DEVICE, event.id)
    new = b"another capture"
    fresh = announce(devices, device_principal, key="a.jpg", size=len(new), sha256=sha(new))
    assert fresh.state == "on_device" and fresh.id != event.id
    assert [e.id for e in gallery.list_events(principal, DEVICE)] == [fresh.id]
    # Deleted in turn, the old capture's answer does not come back for the new one.
    gallery.delete_event(principal, DEVICE, fresh.id)
    assert announce(devices, device_principal, key="a.jpg", size=len(content), sha256=sha(content)).state == "on_device"


def marked_announced(gallery, key, when=None):
    """The deleted capture's last announcement: read, or with `when`, set (as if then)."""
    with gallery.db.session() as session:
        marker = session.get(DeletedCapture, (DEVICE, key))
        if when is not None:
            marker.announced_at = when
            session.add(marker)
            session.commit()
        return marker.announced_at and aware(marker.announced_at)


def remembering(gallery, days):
    return Devices(Gallery(dataclasses.replace(gallery.settings, deleted_capture_days=days), gallery.db,
                           gallery.storage))


@pytest.mark.parametrize(("days", "step"), [(90, 1), (5, 0.5), (0, 1)])
def test_announcing_a_deleted_capture_again_keeps_it_remembered(
    gallery, device_principal, principal, days, step,
):
    """The reconciler forgets a deletion its device has not announced for
    GALLERY_DELETED_CAPTURE_DAYS: each announcement pushes that back, written once the last one is
    older than a tenth of the days (at most one day), not at every reconnect. Also when deletions
    are remembered for ever: a limit set later then forgets only what the devices stopped
    announcing."""
    devices = remembering(gallery, days)
    step = datetime.timedelta(days=step)
    content = b"a capture"
    capture = dict(key="a.jpg", size=len(content), sha256=sha(content))
    event = announce(devices, device_principal, **capture)
    before = utcnow()
    gallery.delete_event(principal, DEVICE, event.id)
    assert before <= marked_announced(gallery, "a.jpg") <= utcnow()  # the deletion's time, to begin with
    recent = marked_announced(gallery, "a.jpg", utcnow() - step + datetime.timedelta(minutes=5))
    assert announce(devices, device_principal, **capture).state == "deleted"
    assert marked_announced(gallery, "a.jpg") == recent  # not written
    marked_announced(gallery, "a.jpg", utcnow() - step - datetime.timedelta(minutes=5))
    before = utcnow()
    again = announce(devices, device_principal, **capture)
    assert (again.id, again.state) == (event.id, "deleted")
    assert before <= marked_announced(gallery, "a.jpg") <= utcnow()


def test_deleted_captures_announced_together_are_written_in_one_statement(devices, gallery, device_principal,
                                                                          principal):
    """A device announcing its folder after a reconnect: one write for the deleted captures in it,
    not a transaction each."""
    keys = [f"dcim/{i}.jpg" for i in range(5)]
    for key in keys:
        gallery.delete_event(principal, DEVICE, announce(devices, device_principal, key=key).id)
        marked_announced(gallery, key, utcnow() - datetime.timedelta(days=2))
    marked_announced(gallery, keys[0], utcnow())  # written lately: not again
    with statements_run(gallery.db) as statements:
        answers = devices.announce(device_principal, DEVICE, [Announcement(device_key=k, name="a.jpg", size=10)
                                                              for k in keys])
    assert [a.state for a in answers] == ["deleted"] * 5
    assert len([s for s in statements if s.lstrip().upper().startswith("UPDATE")]) == 1
    assert all(utcnow() - marked_announced(gallery, key) < datetime.timedelta(minutes=1) for key in keys)


def test_a_deletion_forgotten_while_its_capture_is_announced_makes_a_new_event(
    devices, gallery, device_principal, principal, monkeypatch,
):
    """The reconciler forgets the deletion between the announcement's read of it and its write:
    the announcement does not answer `deleted` for what is no longer remembered (the next one
    would bring the capture back anyway); it reads the key again and the capture is new."""
    event = announce(devices, device_principal, key="a.jpg")
    gallery.delete_event(principal, DEVICE, event.id)
    marked_announced(gallery, "a.jpg", utcnow() - datetime.timedelta(days=100))
    read = devices._deleted_capture

    def read_then_forget(device, key):
        marker = read(device, key)
        with gallery.db.session() as session:
            session.exec(sa.delete(DeletedCapture))
            session.commit()
        return marker

    monkeypatch.setattr(devices, "_deleted_capture", read_then_forget)
    again = announce(devices, device_principal, key="a.jpg")
    assert again.state == "on_device" and again.id != event.id
    assert [e.id for e in gallery.list_events(principal, DEVICE)] == [again.id]


def test_a_deletion_replaced_while_its_capture_is_announced_is_left_as_it_is(
    devices, gallery, device_principal, principal, monkeypatch,
):
    """Between the announcement's read of the deletion and its write, another capture under the
    key was announced and deleted: that deletion is not the announced capture's, and is not
    written for it; the announced capture, which the device holds, is new."""
    old, new = b"the old clip", b"the new clip, longer"
    event = announce(devices, device_principal, key="a.mp4", size=len(old), sha256=sha(old))
    gallery.delete_event(principal, DEVICE, event.id)
    marked_announced(gallery, "a.mp4", utcnow() - datetime.timedelta(days=100))
    read = devices._deleted_capture
    replaced = []

    def read_then_replace(device, key):
        marker = read(device, key)
        if not replaced:
            other = announce(Devices(gallery), device_principal, key="a.mp4", size=len(new), sha256=sha(new))
            gallery.delete_event(principal, DEVICE, other.id)
            replaced.append(other.id)
        return marker

    monkeypatch.setattr(devices, "_deleted_capture", read_then_replace)
    again = announce(devices, device_principal, key="a.mp4", size=len(old), sha256=sha(old))
    assert again.state == "on_device" and again.id not in (event.id, *replaced)
    with gallery.db.session() as session:
        assert session.exec(select(DeletedCapture)).all() == []  # the new capture under the key replaced it


def test_deleting_an_uploaded_event_remembers_no_capture(devices, gallery, principal):
    """Only announced events have a device file that could come back."""
    with gallery.open_upload(DEVICE) as upload:
        upload.fields.name = "a.jpg"
        upload.write_media(b"bytes")
        stored = gallery.store(upload)
    gallery.delete_event(principal, DEVICE, stored.id)
    with gallery.db.session() as session:
        assert session.exec(select(DeletedCapture)).all() == []


def test_announced_thumbnails_respect_the_disk_headroom(devices, gallery, device_principal):
    """Thumbnails are bytes on the data disk: an announcement that brings some is refused, as an
    upload is, when they would take the disk below GALLERY_MIN_FREE_BYTES (the agent retries it
    later); one without is not."""
    known = announce(devices, device_principal, key="known.jpg", thumbnail=b"\xff\xd8known")
    gallery.storage.min_free_bytes = gallery.storage.disk_space().free_bytes + (64 << 20)
    with pytest.raises(Exhausted) as refused:
        devices.announce(device_principal, DEVICE, [
            Announcement(device_key="a.jpg", name="a.jpg", size=10, thumbnail=b"\xff\xd8" + b"t" * 100)])
    assert refused.value.reason == "INSUFFICIENT_STORAGE"
    assert [f.read_bytes() for f in stored_files(gallery.settings.data_dir)] == [b"\xff\xd8known"]
    assert announce(devices, device_principal, key="b.mp4").state == "on_device"
    # A capture known already writes nothing: announcing it again is not refused.
    assert announce(devices, device_principal, key="known.jpg", thumbnail=b"\xff\xd8known").id == known.id


def at(minute: int) -> datetime.datetime:
    return datetime.datetime(2026, 11, 29, 12, minute, tzinfo=datetime.UTC)


def test_without_sha256_the_capture_time_tells_captures_apart(devices, gallery, device_principal, principal):
    """A device that does not hash, writing segments of one size under reused names: a segment
    with another capture time is a new capture, also after the previous one was deleted."""
    first = announce(devices, device_principal, key="SEG1.MP4", size=100, created=at(0))
    assert announce(devices, device_principal, key="SEG1.MP4", size=100, created=at(0)).id == first.id
    # Within a second is the same time, as clocks and databases round it.
    same = at(0) + datetime.timedelta(microseconds=999_000)
    assert announce(devices, device_principal, key="SEG1.MP4", size=100, created=same).id == first.id
    second = announce(devices, device_principal, key="SEG1.MP4", size=100, created=at(1))
    assert second.id != first.id
    gallery.delete_event(principal, DEVICE, second.id)
    assert announce(devices, device_principal, key="SEG1.MP4", size=100, created=at(1)).state == "deleted"
    third = announce(devices, device_principal, key="SEG1.MP4", size=100, created=at(2))
    assert third.state == "on_device"
    assert [e.id for e in gallery.list_events(principal, DEVICE)] == [third.id]
    # A whole second apart is another time.
    later = at(2) + datetime.timedelta(seconds=1)
    assert announce(devices, device_principal, key="SEG1.MP4", size=100, created=later).id != third.id


def test_a_sha256_on_only_one_side_does_not_make_a_new_capture(devices, gallery, device_principal, principal):
    """A sha256 decides only where both announcements have one: the same file announced once
    without (not hashed yet) and once with it, same size and time, stays one event."""
    content = b"a capture"
    plain = announce(devices, device_principal, key="a.jpg", size=len(content), created=at(0))
    assert announce(devices, device_principal, key="a.jpg", size=len(content), created=at(0),
                    sha256=sha(content)).id == plain.id
    hashed = announce(devices, device_principal, key="b.jpg", size=len(content), created=at(0),
                      sha256=sha(content))
    assert announce(devices, device_principal, key="b.jpg", size=len(content), created=at(0)).id == hashed.id
    assert sorted(e.id for e in gallery.list_events(principal, DEVICE)) == sorted([plain.id, hashed.id])


def test_an_announcement_that_loses_a_race_for_its_key_reads_it_again(devices, gallery, device_principal, monkeypatch):
    """Two announcements of different content under one new key: the loser of the insert does not
    answer the winner's event as its own, it reads the key again and replaces it."""
    old, new = b"the first content", b"the second content"
    real_by_key = devices._by_key
    raced: list = []

    def by_key(device, key):
        if raced:
            return real_by_key(device, key)
        raced.append(None)  # the other announcement commits just after this read
        raced[0] = announce(devices, device_principal, key="k.mp4", size=len(old), sha256=sha(old))
        return None

    monkeypatch.setattr(devices, "_by_key", by_key)
    mine = announce(devices, device_principal, key="k.mp4", size=len(new), sha256=sha(new), thumbnail=b"\xff\xd8new")
    assert mine.id != raced[0].id and (mine.size, mine.sha256) == (len(new), sha(new))
    monkeypatch.undo()
    assert devices._by_key(DEVICE, "k.mp4").id == mine.id
    # The lost insert's thumbnail went with it: only the event that stands has one.
    assert [f.read_bytes() for f in stored_files(gallery.settings.data_dir)] == [b"\xff\xd8new"]


def test_a_pulled_upload_of_an_event_deleted_meanwhile_is_not_found(devices, gallery, device_principal, principal):
    """Not EVENT_ALREADY_STORED, which an agent takes for its own earlier success."""
    event = announce(devices, device_principal, key="a.mp4", size=5)
    announced = devices.pulled_event(device_principal, DEVICE, event.id)
    gallery.delete_event(principal, DEVICE, event.id)
    with gallery.open_upload(DEVICE) as upload:
        upload.fields.name = announced.name
        upload.write_media(b"bytes")
        with pytest.raises(NotFound) as gone:
            gallery.store(upload, fill=announced, before_insert=devices.complete_pull)
    assert gone.value.reason == "EVENT_NOT_FOUND"
    assert stored_files(gallery.settings.data_dir) == []


def test_a_channel_closed_during_an_outage_leaves_a_row_its_next_connect_removes(closed_database, tmp_path, caplog):
    """close() cannot delete the channel's row while PostgreSQL refuses connections: it warns
    (grpc's callback failed with a traceback at ERROR) and the row's heartbeat stops; the device's
    next connect() removes such rows once an hour old."""
    db, closed = closed_database
    gallery = Gallery(make_settings(tmp_path, db.engine.url.render_as_string(hide_password=False)), db,
                      Storage(tmp_path))
    devices = Devices(gallery)
    device_principal = auth.Principal("cam-1", frozenset({DEVICE}), frozenset({auth.DEVICE}))
    channel = devices.connect(device_principal, DEVICE)
    with closed, caplog.at_level("WARNING", logger="gallery_server.devices"):
        channel.close()  # does not raise
        with pytest.raises(DatabaseUnavailable):
            devices.connect(device_principal, DEVICE)
    assert "its row stays until the database is back" in caplog.text
    assert devices.channels_open == 0  # the failed connect() holds no channel either
    with db.session() as session:
        assert [c.id for c in session.exec(select(DeviceConnection))] == [channel.id]
        session.exec(sa.update(DeviceConnection).values(
            last_seen=datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=2)))
        session.commit()
    again = devices.connect(device_principal, DEVICE)
    with db.session() as session:
        assert [c.id for c in session.exec(select(DeviceConnection))] == [again.id]
    again.close()


def test_a_process_keeps_nothing_of_a_device_once_its_channels_are_gone(devices, principal):
    """The wake-up conditions and channel lists were kept for every device that ever connected,
    was pulled or was refused a channel: they grew with the fleet for the life of the process."""
    fleet = auth.Principal("fleet", frozenset({"*"}), frozenset({auth.DEVICE}))
    for i in range(20):
        channel = devices.connect(fleet, f"cam-{i}")
        channel.close()
        channel.close()  # the RPC's end, its reader and its handler may each close it
    [announced] = devices.announce(fleet, "cam-x", [Announcement(device_key="a.mp4", name="a.mp4", size=10)])
    devices.pull(principal, "cam-x", announced.id)  # a pull of a device with no channel here
    devices.max_channels = 0
    with pytest.raises(Busy):
        devices.connect(fleet, "cam-refused")
    assert (devices._wakeups._conditions, devices._channels) == ({}, {})


def test_a_pull_still_wakes_the_channels_of_its_device(devices, gallery, device_principal, principal):
    first, second = devices.connect(device_principal, DEVICE), devices.connect(device_principal, DEVICE)
    first.close()
    event = announce(devices, device_principal)
    woken: list[float] = []
    waiter = threading.Thread(target=lambda: second.wait() or woken.append(time.monotonic()))
    waiter.start()
    time.sleep(0.1)
    pulled = time.monotonic()
    devices.pull(principal, DEVICE, event.id)
    waiter.join(timeout=5)
    assert woken and woken[0] - pulled < devices_module.POLL_INTERVAL_S / 2  # woken, not polled
    assert [c.event_id for c in second.claim()] == [event.id]
    second.close()
    assert devices._wakeups._conditions == {}


def test_a_token_of_many_devices_holds_only_its_part_of_the_pull_waits(devices, principal):
    """Waits were counted by device only: a token of every device (or of many) that pulled with
    wait on each of them held the whole share, and every other token's waits were refused."""
    fleet = auth.Principal("fleet", frozenset({"*"}), frozenset({auth.DEVICE}))
    total = devices._pull_waiters.total
    part = max(1, total // 2)  # threads.grant_share of a token for every device
    ids = [devices.announce(fleet, f"cam-{i}", [Announcement(device_key="a.mp4", name="a.mp4", size=10)])[0].id
           for i in range(part + 2)]
    stop = threading.Event()
    refused: list[str] = []

    def pull(who: auth.Principal, device: str, event_id: str) -> None:
        try:
            devices.pull(who, device, event_id, wait=30, client_waiting=lambda: not stop.is_set())
        except Busy as exc:
            refused.append(f"{device}: {exc.reason}")

    waits = [threading.Thread(target=pull, args=(principal, f"cam-{i}", ids[i])) for i in range(part + 1)]
    other = auth.Principal("one", frozenset({f"cam-{part + 1}"}), frozenset({auth.READ, auth.WRITE}))
    mine = threading.Thread(target=pull, args=(other, f"cam-{part + 1}", ids[part + 1]))
    try:
        for wait in waits:
            wait.start()
        assert wait_until(lambda: len(refused) == 1 and devices._pull_waiters._held == {principal.holder: part})
        assert part + 1 < total  # the share had room: the token's part refused it
        mine.start()
        assert wait_until(lambda: devices._pull_waiters._held.get(other.holder) == 1)
    finally:
        stop.set()
        for wait in (*waits, mine):
            if wait.ident is not None:
                wait.join(timeout=10)
    assert len(refused) == 1 and refused[0].endswith("TOO_MANY_PULL_WAITS")
    assert (devices._pull_waiters._held, devices._pull_waits._held) == ({}, {})
