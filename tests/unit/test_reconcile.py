"""The reconciler and the limits on uploads, on both databases (the `gallery` fixture runs on SQLite
and PostgreSQL), with real files under a temporary data root.

Files are made "old" by reconciling with a grace period of 0 (everything changed before the pass
is old) and kept "young" with the default grace period of an hour: a file's age is the later of
its mtime and ctime, and ctime cannot be set back from user space.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import itertools
import json
import logging
import os
import pathlib
import secrets
import socket
import subprocess
import threading
import time
import types
from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa
from sqlmodel import col, select

from gallery_server import auth, cli, file_locks, reconcile
from gallery_server import storage as storage_module
from gallery_server.clock import aware, utcnow
from gallery_server.devices import Announcement, Devices
from gallery_server.errors import Exhausted, FailedPrecondition, PermissionDenied
from gallery_server.models import DeletedCapture, DeviceCommand, Event, UploadGrant, UploadSessionRow
from gallery_server.receiving import ReceivePermits
from gallery_server.reconcile import MAX_EXAMPLES, ROW_BATCH, Reconciler
from gallery_server.resumable import ResumableUploads
from gallery_server.service import Gallery
from gallery_server.settings import ConfigError, Settings
from gallery_server.storage import Storage
from gallery_server.uploads import IdleWatchdog, Uploader, UploadSlots, WatchedStream

from ..conftest import make_settings, statements_run, wait_until
from .test_service import PNG, store

ADMIN = auth.Principal("ops", frozenset({"*"}), frozenset({auth.ADMIN}))


@pytest.fixture
def a_capture_kept(gallery: Gallery) -> None:
    """The gallery holds a capture of a device of its own, for a test that stores none: the
    database describes the data folder (Reconciler._database_describes_media), as a gallery's
    does once it has stored anything, and orphans may go."""
    store(gallery, auth.Principal("k", frozenset({"keeper"}), frozenset({auth.WRITE})), "keeper", PNG)


def settle() -> None:
    # Timestamps are taken from a coarse clock: let it tick past the files just written.
    time.sleep(0.02)


def add_grant(gallery: Gallery, event_id: str, *, expires_in: float, media_state: str = "open",
              thumbnail_state: str = "none") -> None:
    with gallery.db.session() as session:
        session.add(UploadGrant(
            event_id=event_id, device="cam1", filename="f.jpg", media_state=media_state,
            thumbnail_state=thumbnail_state, expires_at=utcnow() + datetime.timedelta(seconds=expires_in),
        ))
        session.commit()


def grant_ids(gallery: Gallery) -> set[str]:
    with gallery.db.session() as session:
        return set(session.exec(sa.select(UploadGrant.event_id)).scalars())  # type: ignore[call-overload]


def test_orphans_older_than_the_grace_period_are_removed_and_rows_files_kept(gallery, principal):
    kept = store(gallery, principal, "cam1", PNG)
    storage = gallery.storage
    orphan = storage.media_path("cam1", "evt_orphan0000000000000")
    orphan.write_bytes(b"x" * 100)
    orphan_thumb = storage.thumbnail_path("cam1", "evt_orphan0000000000000")
    orphan_thumb.write_bytes(b"t" * 10)
    # A media file whose id has a row, but of another device, is an orphan too.
    foreign = storage.media_path("cam2", kept.id)
    foreign.parent.mkdir(parents=True)
    foreign.write_bytes(b"y")
    settle()

    young = Reconciler(gallery).run_once()  # default grace: an hour
    assert young.orphan_media_removed == young.orphan_thumbnails_removed == 0
    assert orphan.exists() and orphan_thumb.exists()

    findings = Reconciler(gallery, grace_seconds=0).run_once()
    assert findings.orphan_media_removed == 2
    assert findings.orphan_thumbnails_removed == 1
    assert findings.bytes_reclaimed == 111
    assert not orphan.exists() and not orphan_thumb.exists() and not foreign.exists()
    assert storage.media_path("cam1", kept.id).read_bytes() == PNG
    assert findings.rows_checked == 1 and findings.missing_media == 0


@pytest.mark.parametrize("database", ["new", "another gallery's", "another gallery's of one capture"])
def test_a_database_that_names_none_of_the_media_removes_none(gallery, principal, caplog, database):
    """A mistyped GALLERY_DATABASE_URL made a new, empty database beside a full data folder (an
    empty PostgreSQL database got the schema): every file passed for an orphan, and a pass removed
    a whole gallery's media. Another gallery's database names none of these files either."""
    files = [gallery.storage.media_path("cam1", f"evt_kept{n:018d}") for n in range(3)]
    files[0].parent.mkdir(parents=True, exist_ok=True)
    for path in files:
        path.write_bytes(b"a capture")
    gallery.storage.thumbnail_path("cam1", "evt_kept" + "0" * 18).write_bytes(b"its thumbnail")
    if database != "new":  # its stored events' files are elsewhere
        for _ in range(5 if database == "another gallery's" else 1):
            gone = store(gallery, principal, "cam2", PNG + secrets.token_bytes(8))
            gallery.storage.media_path("cam2", gone.id).unlink()
    settle()
    with caplog.at_level(logging.ERROR, logger="gallery_server.reconcile"):
        findings = Reconciler(gallery, grace_seconds=0).run_once()
    assert (findings.orphan_media_removed, findings.orphan_thumbnails_removed) == (0, 0)
    assert all(path.exists() for path in files)
    assert any("names none of the media in the data folder" in r.getMessage() for r in caplog.records)
    if database == "new":  # once it has stored a capture here, what no row names goes
        store(gallery, principal, "cam1", PNG)
        settle()
        assert Reconciler(gallery, grace_seconds=0).run_once().orphan_media_removed == 3


def test_a_pass_that_would_remove_most_of_the_folder_removes_none(gallery, principal, caplog):
    """A server on a mistyped database stores a capture there: from then on that database names a
    file here, and the next pass took the rest of the gallery for orphans. At MASS_ORPHANS or
    more, over half of the old files, a pass removes none; fewer go as ever."""
    store(gallery, principal, "cam1", PNG)
    orphans = [gallery.storage.media_path("cam2", f"evt_lost{n:018d}") for n in range(reconcile.MASS_ORPHANS)]
    orphans[0].parent.mkdir(parents=True, exist_ok=True)
    for path in orphans:
        path.write_bytes(b"a capture of the gallery whose database this is not")
    settle()
    with caplog.at_level(logging.ERROR, logger="gallery_server.reconcile"):
        assert Reconciler(gallery, grace_seconds=0).run_once().orphan_media_removed == 0
    assert all(path.exists() for path in orphans)
    assert any("most of the media in the data folder have no row" in r.getMessage() for r in caplog.records)
    orphans.pop().unlink()  # one fewer: below the mark, they go
    assert Reconciler(gallery, grace_seconds=0).run_once().orphan_media_removed == reconcile.MASS_ORPHANS - 1


def test_cli_reconcile_makes_no_database_and_takes_no_grace_past_a_year(tmp_path, monkeypatch, capsys):
    """A mistyped GALLERY_DATA_DIR or GALLERY_DATABASE_URL named a SQLite file that was not there:
    reconcile made it, then took every file for an orphan. A grace past a year overflowed the
    date arithmetic (a traceback, exit status 1: "rows lack their files")."""
    for name, value in limits_env(tmp_path).items():
        monkeypatch.setenv(name, value)
    assert cli.main(["reconcile"]) == 2
    assert capsys.readouterr().err == f"gallery: no database at {tmp_path / 'gallery.db'} (GALLERY_DATA_DIR or" \
        " GALLERY_DATABASE_URL)\n"
    assert not (tmp_path / "gallery.db").exists()
    a_gallery_database(tmp_path)
    for grace in ("1e11", "31536001", "-1", "nan"):
        assert cli.main(["reconcile", "--grace", grace]) == 2, grace
        assert "--grace must be a number from 0 to 31536000 (a year)" in capsys.readouterr().err
    assert cli.main(["reconcile", "--grace", "31536000"]) == 0


@pytest.mark.usefixtures("a_capture_kept")
def test_a_file_linked_just_now_is_young_whatever_its_mtime(gallery):
    # A resumable upload written hours ago is linked into media/ a moment before its row commits.
    path = gallery.storage.media_path("cam1", "evt_linked00000000000000")
    path.parent.mkdir(parents=True, exist_ok=True)
    source = gallery.storage.staging_root / "sessions-like"
    source.write_bytes(b"z" * 10)
    hours_ago = time.time() - 7200
    os.utime(source, (hours_ago, hours_ago))
    os.link(source, path)
    source.unlink()
    assert path.stat().st_mtime < time.time() - 3600
    assert Reconciler(gallery, grace_seconds=600).run_once().orphan_media_removed == 0
    assert path.exists()


def test_staging_leftovers_go_but_live_sessions_and_young_files_stay(gallery):
    storage = gallery.storage
    leftover = storage.staging_root / "0123456789abcdef0123456789abcdef"
    leftover.write_bytes(b"partial")
    incoming_copy = storage.staging_root / "incoming-0123456789abcdef"
    incoming_copy.write_bytes(b"copy")
    live = storage.session_path("cam1", "live-upload-1")
    live.parent.mkdir(parents=True)
    live.write_bytes(b"resumable bytes")
    dead = storage.session_path("cam1", "dead-upload-1")
    dead.write_bytes(b"no row")
    # A crash after the event's commit, before the staging name of its file was unlinked.
    completed = storage.session_path("cam1", "done-upload-1")
    completed.write_bytes(b"also in media/")
    with gallery.db.session() as session:
        now = utcnow()
        session.add(UploadSessionRow(
            device="cam1", upload_id="live-upload-1", name="a.bin", committed_size=15,
            created=now, expires_at=now + datetime.timedelta(hours=1),
        ))
        session.add(UploadSessionRow(
            device="cam1", upload_id="done-upload-1", name="a.bin", committed_size=14,
            created=now, expires_at=now + datetime.timedelta(hours=1), event_id="evt_" + "d" * 22,
        ))
        session.commit()
    settle()

    assert Reconciler(gallery).run_once().staging_removed == 0
    assert leftover.exists() and dead.exists()

    findings = Reconciler(gallery, grace_seconds=0).run_once()
    assert findings.staging_removed == 4
    assert not leftover.exists() and not incoming_copy.exists() and not dead.exists()
    assert not completed.exists()
    assert live.read_bytes() == b"resumable bytes"  # a session with its row is never touched


@pytest.mark.parametrize("media_state", ["open", "done"])  # the thumbnail may come after the media
def test_thumbnail_waiting_for_its_media_is_kept_while_its_grant_exists(gallery, media_state):
    storage = gallery.storage
    thumb = storage.thumbnail_path("cam1", "evt_granted0000000000000")
    thumb.parent.mkdir(parents=True)
    thumb.write_bytes(b"thumb first")
    add_grant(gallery, "evt_granted0000000000000", expires_in=600, media_state=media_state)
    settle()
    findings = Reconciler(gallery, grace_seconds=0).run_once()
    assert findings.orphan_thumbnails_removed == 0 and thumb.exists()


@pytest.mark.usefixtures("a_capture_kept")
@pytest.mark.parametrize("then", ["used", "gone"])
@pytest.mark.parametrize("unused", ["open", "uploading"])  # `uploading`: left by an older server
def test_media_at_a_granted_id_is_kept_while_the_url_can_complete(gallery, unused, then):
    # A crash left media at a pre-signed URL's id with no row; the URL's retry replaces it and
    # commits: the reconciler must not take the file meanwhile. Once the grant is gone (or used,
    # by another event), the file is an orphan.
    storage = gallery.storage
    media = storage.media_path("cam1", "evt_retried0000000000000")
    media.parent.mkdir(parents=True)
    media.write_bytes(b"left by a crash")
    add_grant(gallery, "evt_retried0000000000000", expires_in=600, media_state=unused)
    settle()
    assert Reconciler(gallery, grace_seconds=0).run_once().orphan_media_removed == 0
    assert media.exists()
    with gallery.db.session() as session:
        grant = session.get(UploadGrant, "evt_retried0000000000000")
        if then == "used":
            grant.media_state = "done"
        else:
            session.delete(grant)
        session.commit()
    assert Reconciler(gallery, grace_seconds=0).run_once().orphan_media_removed == 1
    assert not media.exists()


def test_expired_grants_are_removed_a_day_later_while_a_url_is_unused(gallery):
    """A PUT that began before its URL expired may still be running: an unused media URL keeps its
    grant a day longer, so that the PUT can complete. A thumbnail's PUT is small: a thumbnail URL
    left unused keeps it for the grace period only (a soak test found a day's uploads' worth)."""
    add_grant(gallery, "evt_fresh000000000000000", expires_in=600)
    add_grant(gallery, "evt_justexpired000000000", expires_in=-600, media_state="done")  # within the grace
    add_grant(gallery, "evt_used00000000000000000", expires_in=-7200, media_state="done")
    add_grant(gallery, "evt_unused000000000000000", expires_in=-7200)
    add_grant(gallery, "evt_legacy000000000000000", expires_in=-7200, media_state="uploading")
    add_grant(gallery, "evt_thumb0000000000000000", expires_in=-7200, media_state="done",
              thumbnail_state="open")
    add_grant(gallery, "evt_oldused00000000000000", expires_in=-2 * 86400, media_state="done")
    add_grant(gallery, "evt_oldunused000000000000", expires_in=-2 * 86400)
    add_grant(gallery, "evt_thumbfirst00000000000", expires_in=-7200, thumbnail_state="done")  # media open
    findings = Reconciler(gallery, grace_seconds=3600).run_once()
    assert findings.expired_grants_removed == 4
    assert grant_ids(gallery) == {"evt_fresh000000000000000", "evt_justexpired000000000", "evt_unused000000000000000",
                                  "evt_legacy000000000000000", "evt_thumbfirst00000000000"}


def test_closed_pull_commands_go_but_each_events_latest_and_open_ones_stay(gallery, principal):
    kept = store(gallery, principal, "cam1", PNG)
    other = store(gallery, principal, "cam1", PNG + b"other")
    now = utcnow()

    def command(seq: int, event_id: str, state: str, *, device: str = "cam1") -> DeviceCommand:
        return DeviceCommand(
            seq=seq, id=f"cmd-{seq}", device=device, event_id=event_id, state=state,
            open_key=event_id if state in ("pending", "delivered", "acked") else None,
            created=now, expires_at=now + datetime.timedelta(hours=1),
        )

    with gallery.db.session() as session:
        session.add_all([
            command(1, kept.id, "failed"), command(2, kept.id, "expired"), command(3, kept.id, "completed"),
            command(4, "evt_deleted000000000000", "completed"),  # its event is gone
            command(5, other.id, "failed"), command(6, other.id, "pending"),  # retried, open again
            command(7, kept.id, "failed", device="cam2"),  # an id of another device's: no such event
            command(8, "evt_deleted000000000", "pending"),  # open: never touched, its event gone or not
        ])
        session.commit()

    findings = Reconciler(gallery).run_once()
    with gallery.db.session() as session:
        left = session.exec(select(DeviceCommand.seq).order_by(col(DeviceCommand.seq))).all()
    assert left == [3, 6, 8]
    assert findings.closed_commands_removed == 5
    assert Reconciler(gallery).run_once().closed_commands_removed == 0

    # A backlog goes in batches, all of it.
    backlog = 2 * ROW_BATCH + 1
    with gallery.db.session() as session:
        session.add_all([command(100 + i, f"evt_gone{i:018d}", "completed") for i in range(backlog)])
        session.commit()
    assert Reconciler(gallery).run_once().closed_commands_removed == backlog
    with gallery.db.session() as session:
        assert session.exec(select(DeviceCommand.seq).order_by(col(DeviceCommand.seq))).all() == [3, 6, 8]


def deleted_capture(key: str, announced: datetime.datetime | None, deleted: datetime.datetime) -> DeletedCapture:
    return DeletedCapture(device="cam1", device_key=key, event_id=f"evt_{key}", size=1, sha256="",
                          created=deleted, deleted_at=deleted, announced_at=announced)


def remembered(gallery: Gallery) -> list[str]:
    with gallery.db.session() as session:
        return sorted(session.exec(select(DeletedCapture.device_key)).all())


def test_deleted_captures_their_devices_stopped_announcing_are_forgotten(gallery, principal):
    """A deletion is remembered while its device announces the capture (devices.py), and
    GALLERY_DELETED_CAPTURE_DAYS after the last time; then the reconciler forgets it, and the
    capture announced again is a new event."""
    now, day = utcnow(), datetime.timedelta(days=1)
    with gallery.db.session() as session:
        session.add_all([
            deleted_capture("stale", now - 91 * day, now - 91 * day),
            deleted_capture("kept", now - 89 * day, now - 89 * day),
            deleted_capture("announced-lately", now - day, now - 400 * day),
        ])
        session.commit()
    forgetting_nothing = Gallery(dataclasses.replace(gallery.settings, deleted_capture_days=0), gallery.db,
                                 gallery.storage)
    assert Reconciler(forgetting_nothing).run_once().deleted_captures_forgotten == 0
    assert len(remembered(gallery)) == 3
    assert gallery.settings.deleted_capture_days == 90  # the default
    findings = Reconciler(gallery).run_once()
    assert findings.deleted_captures_forgotten == 1
    assert remembered(gallery) == ["announced-lately", "kept"]
    assert Reconciler(gallery).run_once().deleted_captures_forgotten == 0

    devices = Devices(gallery)
    device = auth.Principal("cam1", frozenset({"cam1"}), frozenset({auth.DEVICE}))
    [forgotten, still] = devices.announce(device, "cam1", [
        Announcement(device_key="stale", name="stale.jpg", size=1, created=now - 91 * day),
        Announcement(device_key="kept", name="kept.jpg", size=1, created=now - 89 * day),
    ])
    assert forgotten.state == "on_device" and forgotten.id != "evt_stale"
    assert (still.id, still.state) == ("evt_kept", "deleted")

    # A backlog goes in batches, all of it: many at one time (an upgrade's), walked by key.
    with gallery.db.session() as session:
        session.add_all([deleted_capture(f"old-{i}", now - (100 + i % 2) * day, now - 100 * day)
                         for i in range(2 * ROW_BATCH + 1)])
        session.commit()
    assert Reconciler(gallery).run_once().deleted_captures_forgotten == 2 * ROW_BATCH + 1
    assert remembered(gallery) == ["announced-lately", "kept"]


def test_a_database_from_before_announcements_were_kept_gets_the_column(gallery):
    """create_tables adds deleted_captures.announced_at to a database of an earlier version, its
    rows holding NULL; the reconciler remembers those from now (by the deletion's time, a short
    limit forgot at once what devices announce every day), and so the rows an earlier replica
    writes during a rolling upgrade."""
    with gallery.db.engine.begin() as c:
        c.exec_driver_sql("DROP INDEX ix_deleted_captures_announced")
        c.exec_driver_sql("ALTER TABLE deleted_captures DROP COLUMN announced_at")
        for key, age in (("old", 91), ("new", 1)):
            c.execute(sa.text(
                "INSERT INTO deleted_captures (device, device_key, event_id, size, sha256, created, deleted_at)"
                " VALUES ('cam1', :key, :id, 1, '', :at, :at)"),
                {"key": key, "id": f"evt_{key}", "at": utcnow() - datetime.timedelta(days=age)})
    gallery.db.create_tables()
    with gallery.db.engine.connect() as c:
        [index] = sa.inspect(c).get_indexes("deleted_captures")
    assert index["column_names"] == ["announced_at", "device", "device_key"]
    with gallery.db.session() as session:
        assert session.exec(select(DeletedCapture.announced_at)).all() == [None, None]
    started = utcnow()
    assert Reconciler(gallery).run_once().deleted_captures_forgotten == 0
    assert remembered(gallery) == ["new", "old"]
    with gallery.db.session() as session:
        assert all(started - datetime.timedelta(seconds=1) <= aware(at) <= utcnow()
                   for at in session.exec(select(DeletedCapture.announced_at)).all())
        session.add(deleted_capture("by-an-older-replica", None, utcnow() - datetime.timedelta(days=400)))
        session.commit()
    assert Reconciler(gallery).run_once().deleted_captures_forgotten == 0
    assert remembered(gallery) == ["by-an-older-replica", "new", "old"]


def test_a_deletion_announced_while_the_reconciler_forgets_it_is_kept(gallery, database_url):
    """The reconciler reads a batch, then deletes it: a row an announcement wrote in between (the
    device holds the file) stays. On PostgreSQL the DELETE waits for the announcement's row lock
    and is seen waiting; SQLite's writers take turns for a whole transaction."""
    if not database_url.startswith("postgresql"):
        pytest.skip("PostgreSQL's row locks (SQLite's writers take turns for the whole transaction)")
    now = utcnow()
    with gallery.db.session() as session:
        session.add(deleted_capture("held", now - datetime.timedelta(days=100), now - datetime.timedelta(days=100)))
        session.commit()
    announcement = gallery.db.engine.connect()
    announcement.begin()
    announcement.execute(sa.update(DeletedCapture).values(announced_at=utcnow()))
    found: list[reconcile.Findings] = []
    passing = threading.Thread(target=lambda: found.append(Reconciler(gallery).run_once()))
    passing.start()

    def delete_waits() -> bool:
        # A transaction of its own each time: PostgreSQL reads pg_stat_activity once per transaction,
        # so polls in one saw the DELETE never, when the first came before it (under the suite's load).
        with gallery.db.engine.connect() as c:
            return c.execute(sa.text(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
                " WHERE NOT l.granted AND a.query LIKE 'DELETE FROM deleted_captures%'")).scalar_one() > 0

    try:
        assert wait_until(delete_waits, seconds=30)  # it took 6 s once, alone
    finally:
        announcement.commit()
        announcement.close()
        passing.join(timeout=30)
    assert found[0].deleted_captures_forgotten == 0
    assert remembered(gallery) == ["held"]


def test_rows_without_their_file_are_reported_never_deleted(gallery, principal):
    missing = store(gallery, principal, "cam1", PNG, name="a.png")
    short = store(gallery, principal, "cam1", PNG, name="b.png")
    fine = store(gallery, principal, "cam1", PNG, name="c.png")
    long = store(gallery, principal, "cam1", PNG, name="d.png")
    gallery.storage.media_path("cam1", missing.id).unlink()
    with gallery.storage.media_path("cam1", short.id).open("r+b") as f:
        f.truncate(10)
    with gallery.storage.media_path("cam1", long.id).open("ab") as f:
        f.write(b"more")
    reconciler = Reconciler(gallery, grace_seconds=0)
    findings = reconciler.run_once()
    assert (findings.rows_checked, findings.missing_media, findings.size_mismatch) == (4, 1, 2)
    assert sorted(findings.examples) == sorted([f"cam1/{missing.id}", f"cam1/{short.id}", f"cam1/{long.id}"])
    with gallery.db.session() as session:
        assert {e.id for e in session.exec(sa.select(Event)).scalars()} == {  # type: ignore[call-overload]
            missing.id, short.id, fine.id, long.id}
    # The findings are shared through the data root, for every replica's admin status.
    saved = json.loads(reconciler.status_path.read_text())
    assert saved["missing_media"] == 1 and saved["size_mismatch"] == 2
    assert saved["started"].endswith("Z") and saved["finished"] >= saved["started"]


def test_a_pass_over_many_lost_files_reads_each_batch_once_and_logs_only_the_examples(gallery, caplog):
    """A media volume that did not mount: every stored row is without its file. All are counted,
    a few are named, and the pass costs a couple of selects per batch, not one per row."""
    lost = ROW_BATCH + 5
    with gallery.db.session() as session:
        session.add_all(
            Event(id=f"evt_lost{i:016d}", device="cam1", name="a.png", media_type="image",
                  mime_type="image/png", size=10, sha256="0" * 64, created=utcnow())
            for i in range(lost)
        )
        session.add(Event(id="evt_ondevice000000000000", device="cam1", name="b.png", media_type="image",
                          mime_type="image/png", size=10, sha256="1" * 64, created=utcnow(), state="on_device"))
        session.commit()
    caplog.set_level(logging.INFO, logger="gallery_server.reconcile")
    with statements_run(gallery.db) as statements:
        findings = Reconciler(gallery, grace_seconds=0).run_once()
    assert (findings.rows_checked, findings.missing_media, findings.size_mismatch) == (lost, lost, 0)
    assert findings.examples == [f"cam1/evt_lost{i:016d}" for i in range(MAX_EXAMPLES)]
    named = [r for r in caplog.records if r.getMessage() == "stored event's media file missing or of another size"]
    assert [r.event_id for r in named] == [f"evt_lost{i:016d}" for i in range(MAX_EXAMPLES)]
    (summary,) = [r for r in caplog.records if r.getMessage() == "reconciled"]
    assert summary.levelno == logging.ERROR and summary.missing_media == lost
    event_reads = [s for s in statements if "FROM events" in s]
    assert len(event_reads) <= 3 * (lost // ROW_BATCH + 2), event_reads


def test_a_row_deleted_while_its_file_is_looked_at_is_no_finding(gallery, principal):
    kept = store(gallery, principal, "cam1", PNG, name="a.png")
    going = store(gallery, principal, "cam1", PNG, name="b.png")
    reconciler = Reconciler(gallery, grace_seconds=0)
    media_path = reconciler.storage.media_path
    deleting: list[str] = [going.id]

    def deleted_meanwhile(device: str, event_id: str) -> pathlib.Path:
        # The row is read, then a client deletes the event (row first, then file) before the
        # reconciler looks at the file. (delete_event asks for the path too: once is enough.)
        if event_id in deleting:
            deleting.remove(event_id)
            gallery.delete_event(principal, device, event_id)
        return media_path(device, event_id)

    reconciler.storage.media_path = deleted_meanwhile  # type: ignore[method-assign]
    findings = reconciler.run_once()
    assert (findings.rows_checked, findings.missing_media, findings.size_mismatch) == (2, 0, 0)
    assert findings.examples == [] and not deleting
    assert gallery.storage.media_path("cam1", kept.id).exists()


def test_admin_status_needs_the_admin_scope_and_reports_counts(gallery, principal):
    reconciler = Reconciler(gallery)
    with pytest.raises(PermissionDenied) as denied:
        reconciler.admin_status(principal)  # read+write, not admin
    assert denied.value.reason == "SCOPE_MISSING"
    one_device = auth.Principal("ops", frozenset({"cam1"}), frozenset({auth.ADMIN}))
    with pytest.raises(PermissionDenied) as denied:
        reconciler.admin_status(one_device)  # the status covers every device
    assert denied.value.reason == "DEVICE_NOT_ALLOWED"
    event = store(gallery, principal, "cam1", PNG)
    with gallery.db.session() as session:  # neither counts as stored, nor its bytes
        session.add(Event(id="evt_ondevice000000000000", device="cam1", name="b.png", media_type="image",
                          mime_type="image/png", size=10, sha256="1" * 64, created=utcnow(), state="on_device"))
        session.commit()
    uploads = ResumableUploads(gallery)
    uploads.start(principal, "cam1", name="a.bin", upload_id="open-session-1")
    uploads.start(principal, "cam1", name="a.bin", upload_id="done-session-1")
    writer = uploads.open_write(principal, "cam1", "done-session-1", 0)
    try:
        writer.finish()
    finally:
        writer.close()
    before = reconciler.admin_status(ADMIN)
    assert before.last_reconcile is None
    reconciler.status_path.parent.mkdir(parents=True, exist_ok=True)
    # A damaged status (cut short, or JSON that is not a pass's object) is no status, not an error.
    for damaged in ("", "{", "[]", "null", "1", '"text"'):
        reconciler.status_path.write_text(damaged)
        assert reconciler.admin_status(ADMIN).last_reconcile is None
    reconciler.run_once()
    status = reconciler.admin_status(ADMIN)
    assert status.last_reconcile is not None and status.last_reconcile.rows_checked == 2
    assert status.counts.events_stored == 2 and status.counts.events_on_device == 1
    assert status.counts.stored_bytes == event.size and status.counts.upload_sessions == 1
    assert status.counts.uploads_in_flight == 0
    assert (status.counts.thumbnails_pending, status.counts.pulls_open) == (1, 0)  # the PNG awaits its thumbnail
    assert status.disk.total_bytes >= status.disk.free_bytes > 0
    assert status.accepting_uploads is (status.disk.free_bytes >= status.min_free_bytes)
    gallery.storage.min_free_bytes = status.disk.free_bytes * 2
    assert reconciler.admin_status(ADMIN).accepting_uploads is False


def test_admin_status_answers_without_its_counts_while_the_database_does_not(closed_database, tmp_path):
    """What lives outside the database (the disk, the last pass's findings) is what an operator
    needs most during an outage."""
    db, closed = closed_database
    data = tmp_path / "data"
    data.mkdir()
    gallery = Gallery(make_settings(data, "sqlite://"), db, Storage(data))
    reconciler = Reconciler(gallery)
    reconciler.run_once()
    with closed:
        status = reconciler.admin_status(ADMIN)
    assert status.counts is None and status.device_storage is None
    assert status.disk.total_bytes > 0 and status.last_reconcile is not None
    assert reconciler.admin_status(ADMIN).counts is not None  # back with the database


# -- limits ---------------------------------------------------------------------------------------


def test_upload_slots_per_device_and_in_total():
    slots = UploadSlots(per_device=2, total=3)
    a1, a2 = slots.acquire("a"), slots.acquire("a")
    with pytest.raises(Exhausted) as device_full:
        slots.acquire("a")
    assert device_full.value.reason == "TOO_MANY_DEVICE_UPLOADS"
    b1 = slots.acquire("b")
    with pytest.raises(Exhausted) as all_full:
        slots.acquire("c")
    assert all_full.value.reason == "TOO_MANY_UPLOADS"
    a1()
    a1()  # giving back twice gives back once
    assert slots.in_flight == 2
    slots.acquire("c")()
    a2()
    b1()
    assert slots.in_flight == 0


def token(*devices: str) -> Uploader:
    """A token's uploader, as the servicer makes one: a token of its own (token_id)."""
    return Uploader.of(auth.Principal("t", frozenset(devices), frozenset({auth.WRITE}), token_id=secrets.token_hex(16)))


_events = itertools.count()


def urls_of(uploader: Uploader, device: str = "a") -> Uploader:
    """What a PUT counts as, of a new URL of `device` that `uploader`'s token asked for
    (signed_urls.py)."""
    return dataclasses.replace(uploader, url=(device, f"evt_{next(_events)}"))


A, B, C = token("a"), token("b"), token("c")


def test_streams_awaiting_their_first_message_count_with_the_uploads_in_flight():
    slots = UploadSlots(per_device=2, total=3)
    release = slots.acquire("a")
    with slots.first_message(A), slots.first_message(B):
        with pytest.raises(Exhausted) as full, slots.first_message(C):
            pass
        assert full.value.reason == "TOO_MANY_UPLOADS"
    release()
    with slots.first_message(A), slots.first_message(B), slots.first_message(C):
        pass  # every place given back, refused or not
    # A stream whose first message came takes its slot if one is free, whoever else is waiting.
    with slots.first_message(A), slots.first_message(B):
        slots.acquire("b")()


@contextlib.contextmanager
def awaiting(slots: UploadSlots, caller: Uploader | None) -> Iterator[None]:
    """A stream that has its receive permit and awaits its client's first message, counted as
    Gallery.watch_upload counts it."""
    release = slots.hold(caller)
    try:
        with slots.first_message(caller), slots.asked_first(caller):
            yield
    finally:
        release()


def test_one_token_may_have_only_its_grants_part_of_the_streams():
    """threads.grant_share: per_device for each device the token grants; half the total for a
    token for every device; an eighth for the pre-signed PUTs whose URL is not known yet."""
    slots = UploadSlots(per_device=2, total=12)
    many = token(*(f"cam{n}" for n in range(10)))  # 20 by its devices: half the total at most
    gateway = token("*")
    cases = (
        (A, 2, "this token has 2 uploads open (its upload URLs' included)"),
        (token("a", "b"), 4, "this token has 4 uploads open"),
        (many, 6, "this token has 6 uploads open"),
        (urls_of(A), 2, "the token that asked for this URL has 2 uploads open (its URLs' included)"),
        (gateway, 6, "this token has 6 uploads awaiting their first message"),
        (urls_of(gateway), 2, "the token that asked for this URL has 2 uploads open for device a"),
        (None, 1, "1 uploads by pre-signed URL not named in their path are awaiting their first message"),
    )
    for caller, part, refusal in cases:
        assert slots.part(caller) == part
        def another(caller: Uploader | None = caller) -> Uploader | None:
            return urls_of(caller) if caller is not None and caller.url is not None else caller  # a URL each

        with contextlib.ExitStack() as held:
            for _ in range(part):
                held.enter_context(awaiting(slots, another()))
            with pytest.raises(Exhausted) as refused, awaiting(slots, another()):
                pass
            assert refused.value.reason == "TOO_MANY_UPLOADS"
            assert refused.value.metadata["limit"] == str(part)
            assert refusal in refused.value.message
            assert slots.awaiting_first == part  # the refused one given back
            with awaiting(slots, C):  # another token still has its place
                pass
            if caller is not None:  # and so has another token of the same devices
                with awaiting(slots, dataclasses.replace(caller, key="another")):
                    pass
        with awaiting(slots, caller):  # given back
            pass
    assert slots.awaiting_first == 0


def test_a_tokens_uploads_in_flight_and_its_urls_puts_take_one_part():
    """A token's streams count from their start to their end, whether they still await their
    first message or send their bytes, and so do the PUTs of the URLs it asked for: before, a
    token for 3 devices could have 4 uploads in flight per device (trickling), its part of the
    streams awaiting a first message, and its URLs' PUTs half the total, which filled it (48 of
    48 at the defaults) and refused every other device."""
    slots = UploadSlots(per_device=4, total=48)
    owner = token("cam1", "cam2", "cam3")  # a part of 12
    with contextlib.ExitStack() as held:
        for device in ("cam1", "cam2", "cam3"):
            for _ in range(3):  # in flight: their first message came
                held.callback(slots.hold(owner))
                held.callback(slots.acquire(device))
        for _ in range(2):
            held.enter_context(awaiting(slots, urls_of(owner, "cam2")))  # its URLs' PUTs, awaiting
        held.callback(slots.hold(urls_of(owner, "cam1")))  # and one in flight
        held.callback(slots.acquire("cam1"))
        assert slots.in_flight == 10 and slots.awaiting_first == 2
        with pytest.raises(Exhausted) as own:
            slots.hold(owner)
        assert "this token has 12 uploads open" in own.value.message
        with pytest.raises(Exhausted) as by_url:
            slots.hold(urls_of(owner))
        assert "the token that asked for this URL has 12 uploads open" in by_url.value.message
        # The token holds its part, a quarter of the total: the rest is every other device's.
        for n in range(48 - 12):
            held.enter_context(awaiting(slots, token(f"other{n}")))
        with pytest.raises(Exhausted) as full, slots.first_message(C):
            pass
        assert "the server is receiving or awaiting 48 uploads" in full.value.message
    # Every place given back.
    with contextlib.ExitStack() as held:
        for _ in range(12):
            held.callback(slots.hold(owner))


def test_a_gateways_urls_count_by_their_device_apart_from_its_own_streams():
    """A token for every device counts its own streams only while asked (a gateway's bursts); the
    PUTs of the URLs it asks for (its devices', say) count from start to end, `per_device` for each
    URL's device: a fleet's devices PUT at once (a part of half the total refused 6 of 30), and
    neither they nor the gateway's own streams keep out the others."""
    slots = UploadSlots(per_device=2, total=12)
    gateway = token("*")
    with contextlib.ExitStack() as held:
        for device in ("x", "y", "z"):
            for _ in range(2):
                held.callback(slots.hold(urls_of(gateway, device)))
        with pytest.raises(Exhausted) as refused:
            slots.hold(urls_of(gateway, "x"))
        assert "has 2 uploads open for device x" in refused.value.message
        held.callback(slots.hold(urls_of(gateway, "w")))  # 7 at once: more than half the total
        with awaiting(slots, gateway):
            pass
        assert slots.hold(gateway)() is None  # its own are not counted while they send
    with contextlib.ExitStack() as held:
        for _ in range(6):
            held.enter_context(awaiting(slots, gateway))
        held.callback(slots.hold(urls_of(gateway)))


def watched(silent_for: float | None, cancelled: list[str], name: str) -> WatchedStream:
    """A PUT's idle-watch entry, its client silent for `silent_for` seconds (None: the server is
    working on its last message)."""
    stream = WatchedStream(lambda: cancelled.append(name), limit=120)
    stream.waiting_since = None if silent_for is None else time.monotonic() - silent_for
    return stream


def test_a_silent_put_gives_its_place_to_a_newer_put_of_its_urls():
    """Two PUTs whose connections died without a FIN kept every retry of their URLs at 429 until
    the idle limit (120 s): the one silent longest, once silent for `replace_silent_after`, is
    aborted (UPLOAD_REPLACED) and its place taken. One that is sending, one silent less long, and
    one called natively (no stream) are never replaced."""
    slots = UploadSlots(per_device=4, total=48, replace_silent_after=5)
    cancelled: list[str] = []
    owner = token("cam1")
    url = urls_of(owner, "cam1")
    sending, recent = watched(None, cancelled, "sending"), watched(2, cancelled, "recent")
    first, second = slots.hold(url, sending), slots.hold(url, recent)
    with pytest.raises(Exhausted) as refused:
        slots.hold(url, watched(None, cancelled, "third"))
    assert refused.value.reason == "TOO_MANY_UPLOADS" and cancelled == []
    assert recent.waiting_since is not None
    recent.waiting_since -= 4  # now silent for 6 s
    # The token's part is full (4: two other URLs' PUTs and these two): the new PUT takes the place
    # of the one it replaces.
    others = [slots.hold(urls_of(owner, "cam1")) for _ in range(2)]
    third = slots.hold(url, watched(None, cancelled, "third"))
    assert cancelled == ["recent"] and recent.replaced and not sending.replaced
    assert slots.counted_by_token == 4
    second()  # the replaced PUT's own end gives back nothing more
    assert slots.counted_by_token == 4
    with pytest.raises(Exhausted):  # the other two are sending, or were never silent
        slots.hold(url, watched(None, cancelled, "fourth"))
    for release in (first, third, *others):
        release()
    assert slots.counted_by_token == 0
    # Called natively, a PUT's stream is not known to its count: it is never replaced.
    native = [slots.hold(url) for _ in range(2)]
    with pytest.raises(Exhausted):
        slots.hold(url, watched(None, cancelled, "fifth"))
    for release in native:
        release()
    assert slots.counted_by_token == 0 and cancelled == ["recent"]


def test_a_silent_put_gives_its_place_when_its_tokens_part_is_full():
    """A device whose connections all dropped at once, one PUT of each of 4 events, filled its
    token's part (4): every retry was refused until the idle limit. The retry of an event replaces
    that event's silent PUT; a PUT of a fifth event, which has none, is still refused."""
    slots = UploadSlots(per_device=4, total=48, replace_silent_after=5)
    cancelled: list[str] = []
    owner = token("cam1")
    urls = [urls_of(owner, "cam1") for _ in range(4)]
    dead = [watched(6, cancelled, f"dead{i}") for i in range(4)]
    releases = [slots.hold(url, stream) for url, stream in zip(urls, dead, strict=True)]
    with pytest.raises(Exhausted) as refused:
        slots.hold(urls_of(owner, "cam1"), watched(None, cancelled, "fifth"))
    assert "has 4 uploads open" in refused.value.message and cancelled == []
    retry = slots.hold(urls[1], watched(None, cancelled, "retry"))
    assert cancelled == ["dead1"] and slots.counted_by_token == 4
    for release in (*releases, retry):
        release()
    assert slots.counted_by_token == 0


def test_a_put_waiting_for_its_session_replaces_the_silent_put_holding_it():
    """One dropped connection leaves a place free, so no third PUT replaces it: a range PUT that
    waits for the session's lock the silent one holds asks for it (replace_silent), never for
    itself (it is working, not waiting on its client) nor for one silent less long."""
    slots = UploadSlots(per_device=4, total=48, replace_silent_after=5)
    cancelled: list[str] = []
    url = urls_of(token("cam1"), "cam1")
    assert url.url is not None
    dead = watched(2, cancelled, "dead")
    held, retry = slots.hold(url, dead), slots.hold(url, watched(None, cancelled, "retry"))
    assert not slots.replace_silent(url.url) and cancelled == []
    assert dead.waiting_since is not None
    dead.waiting_since -= 4
    assert slots.replace_silent(url.url) and cancelled == ["dead"] and dead.replaced
    assert slots.counted_by_token == 1
    assert not slots.replace_silent(url.url)  # once
    held()
    retry()
    assert slots.counted_by_token == 0


def test_one_events_urls_may_have_two_puts_at_once():
    """A retry may overlap the PUT it replaces (which the server has not seen end yet); more of one
    event's URLs (media and thumbnail together) would let whoever holds them take their token's
    whole part (the review: 12 PUTs of one used URL took a 3-device token's; the re-probe: 2 of
    each URL of a pair took a device token's 4). Each release gives back once, whoever calls it
    first."""
    slots = UploadSlots(per_device=4, total=48)
    owner = token("cam1", "cam2", "cam3")
    url = urls_of(owner, "cam1")
    first, second = slots.hold(url), slots.hold(url)
    with pytest.raises(Exhausted) as refused:
        slots.hold(url)
    assert refused.value.reason == "TOO_MANY_UPLOADS"
    assert refused.value.message == "the URLs of this event have 2 PUTs in progress already: retry later"
    slots.hold(urls_of(owner, "cam1"))()  # another URL of the token
    first()
    first()  # the RPC's end and the stream's: given back once
    slots.hold(url)()
    second()
    assert slots.counted_by_token == 0


def test_a_token_for_every_device_is_counted_only_while_its_client_is_asked():
    """A gateway's burst queued for the receive permits waits on the server: only its streams
    asked for their first message count against its part. Another token's count from their start
    (Uploader.counted_while_asked)."""
    slots = UploadSlots(per_device=2, total=8)
    gateway = token("*")  # a part of 4
    with contextlib.ExitStack() as queued:
        for _ in range(7):  # more than its part: waiting for permits
            queued.enter_context(slots.first_message(gateway))
        with slots.asked_first(gateway):  # one has its permit
            pass
        with slots.first_message(B):  # the last place
            with pytest.raises(Exhausted) as full, slots.first_message(C):  # the total, not a part
                pass
        assert "the server is receiving or awaiting 8 uploads" in full.value.message
    with contextlib.ExitStack() as asked:
        for _ in range(4):
            asked.enter_context(awaiting(slots, gateway))
        with pytest.raises(Exhausted) as refused, slots.first_message(gateway):  # before it queues
            pass
        assert "this token has 4 uploads awaiting" in refused.value.message
    with contextlib.ExitStack() as queued:
        for _ in range(2):
            queued.callback(slots.hold(A))
        with pytest.raises(Exhausted) as refused:
            slots.hold(A)
        assert "this token has 2 uploads open" in refused.value.message


def test_an_upload_stream_is_refused_before_its_first_message_when_every_slot_is_taken(gallery, principal):
    gallery.slots.total = 1
    read: list[int] = []

    def messages():
        read.append(1)
        yield b"header"

    with gallery.begin_upload(principal, "cam1"):
        with pytest.raises(Exhausted) as full:
            next(gallery.watch_upload(messages(), lambda: None, caller=None))
        assert full.value.reason == "TOO_MANY_UPLOADS"
        assert not read  # refused without waiting for the client
    assert list(gallery.watch_upload(messages(), lambda: None, caller=None)) == [b"header"]


def test_a_gateways_streams_queued_for_a_permit_are_not_counted_against_its_token(gallery) -> None:
    """A token for every device (a part of 4 here) counts its streams waiting on their client with
    a receive permit held: a gateway's burst queued behind the permits waits on the server. Before,
    every stream of the token awaiting its first message counted, and a burst of 64 was refused
    (429)."""
    gallery.slots.total = 8
    gallery.receiving = ReceivePermits(1, lend_after=60)  # held by the slow client's stream
    gateway = token("*")
    slow_client = threading.Event()
    answers: list[object] = []

    def messages(wait: bool) -> Iterator[bytes]:
        if wait:
            slow_client.wait(30)
        yield b"header"

    def upload(wait: bool) -> None:
        try:
            answers.append(list(gallery.watch_upload(messages(wait), lambda: None, caller=gateway)))
        except Exhausted as exc:
            answers.append(exc.message)

    threads = [threading.Thread(target=upload, args=(n == 0,)) for n in range(6)]
    threads[0].start()
    assert wait_until(lambda: gallery.receiving.free == 0)  # the slow client's stream has it
    for thread in threads[1:]:
        thread.start()
    assert wait_until(lambda: gallery.slots.awaiting_first == 6)  # five queued for the permit
    assert answers == []
    slow_client.set()
    for thread in threads:
        thread.join(30)
    assert answers == [[b"header"]] * 6
    assert gallery.slots.awaiting_first == 0


def test_a_device_tokens_silent_streams_cannot_make_a_burst_fill_the_total(gallery) -> None:
    """A token's silent streams held the receive permits, so its burst queued for them, each
    holding a place in the total: every other token's upload was refused until the permits were
    lent (the review's reproduction, in process). A token for some devices counts its streams for
    their whole wait: the burst past its part is refused at once."""
    gallery.slots = UploadSlots(per_device=2, total=8)
    gallery.receiving = ReceivePermits(2)
    attacker, other = token("cam1", "cam2"), token("cam3")  # a part of 4
    silence = threading.Event()
    refusals: list[str] = []

    def silent() -> Iterator[bytes]:
        silence.wait(30)
        yield b"late"

    def attack() -> None:
        try:
            list(gallery.watch_upload(silent(), lambda: None, caller=attacker))
        except Exhausted as exc:
            refusals.append(exc.message)

    threads = [threading.Thread(target=attack) for _ in range(11)]
    try:
        threads[0].start()
        assert wait_until(lambda: gallery.receiving.free == 1)  # one permit held by a silent stream
        for thread in threads[1:]:
            thread.start()
        assert wait_until(lambda: len(refusals) == 7)
        assert refusals == ["this token has 4 uploads open (its upload URLs' included) already: retry later"] * 7
        assert gallery.slots.awaiting_first == 4
        # Another token's upload goes on (a permit lent to it, if silent streams hold both).
        assert list(gallery.watch_upload(iter([b"header"]), lambda: None, caller=other)) == [b"header"]
    finally:
        silence.set()
        for thread in threads:
            thread.join(10)


def test_an_upload_stream_counts_against_its_token_until_it_ends_or_its_rpc_does(gallery) -> None:
    """Gallery.watch_upload counts a stream against its token's part from its first message
    asked for to its last, or to its RPC's end: a handler that fails leaves its stream unfinished,
    and it must not keep the place until the garbage collector finds it."""
    gallery.slots = UploadSlots(per_device=1, total=8)
    device = token("cam1")  # a part of 1
    ended: list[Callable[[], None]] = []

    def stream(*messages: bytes) -> Iterator[bytes]:
        return gallery.watch_upload(iter(messages), lambda: None, on_end=ended.append, caller=device)

    first = stream(b"header", b"chunk")
    assert next(first) == b"header"
    with pytest.raises(Exhausted) as refused:
        next(stream(b"header"))
    assert "this token has 1 uploads open" in refused.value.message
    assert list(first) == [b"chunk"]  # the stream ended: its place given back
    abandoned = stream(b"header", b"chunk")
    assert next(abandoned) == b"header"
    with pytest.raises(Exhausted):
        next(stream(b"header"))
    for callback in ended:  # the RPC ends (grpc runs its callbacks), the stream unfinished
        callback()
    assert list(stream(b"header")) == [b"header"]
    del abandoned


def test_an_upload_holds_its_slot_until_closed(gallery, principal):
    gallery.slots.per_device = 1
    with gallery.begin_upload(principal, "cam1"):
        assert gallery.slots.in_flight == 1
        with pytest.raises(Exhausted):
            gallery.begin_upload(principal, "cam1")
    assert gallery.slots.in_flight == 0
    store(gallery, principal, "cam1", PNG)  # free again


def test_no_upload_below_the_disk_headroom_and_no_partial_file(gallery, principal):
    storage: Storage = gallery.storage
    storage.min_free_bytes = storage.disk_space().free_bytes * 2  # more than there is
    with pytest.raises(Exhausted) as refused:
        gallery.begin_upload(principal, "cam1")
    assert refused.value.reason == "INSUFFICIENT_STORAGE"
    assert int(refused.value.metadata["min_free_bytes"]) == storage.min_free_bytes
    # Checked again while the bytes arrive: an upload that started in time stops at the headroom.
    storage.min_free_bytes = 0
    with gallery.begin_upload(principal, "cam1") as upload:
        upload.write_media(b"x" * (4 << 20))
        storage.min_free_bytes = storage.disk_space().free_bytes * 2
        with pytest.raises(Exhausted):
            upload.write_media(b"x" * (8 << 20))
    assert not any(storage.staging_root.iterdir())
    assert gallery.slots.in_flight == 0


def test_idle_stream_is_cancelled_and_its_reader_told_why():
    watchdog = IdleWatchdog(0.2)
    unblock = threading.Event()
    cancelled = []

    def stalled():
        yield 1
        unblock.wait(5)  # a client that stops sending
        raise RuntimeError("the transport's error once cancelled")

    def cancel() -> None:
        cancelled.append(True)
        unblock.set()

    received = []
    with pytest.raises(FailedPrecondition) as idle:
        for message in watchdog.watch(stalled(), cancel):
            received.append(message)
    assert idle.value.reason == "UPLOAD_IDLE"
    assert received == [1] and cancelled == [True]


def test_only_waiting_for_the_client_counts_as_idle():
    # The client sends a message every 0.05 s; the server works 0.5 s on each (fsync, a database
    # wait): longer than the idle time, but the client was not silent.
    watchdog = IdleWatchdog(0.3)
    cancelled = []

    def steady():
        for i in range(3):
            time.sleep(0.05)
            yield i

    received = []
    for message in watchdog.watch(steady(), lambda: cancelled.append(True)):
        time.sleep(0.5)
        received.append(message)
    assert received == [0, 1, 2] and cancelled == []


def test_a_finished_or_abandoned_stream_is_never_cancelled_later():
    watchdog = IdleWatchdog(0.1)
    cancelled = []
    done = watchdog.watch(iter([1]), lambda: cancelled.append("done"))
    assert list(done) == [1]
    abandoned = watchdog.watch(iter([1, 2]), lambda: cancelled.append("abandoned"))
    assert next(abandoned) == 1  # the handler failed and returned without reading on
    time.sleep(0.5)
    assert cancelled == []
    del abandoned


def test_the_first_message_has_its_own_shorter_limit():
    watchdog = IdleWatchdog(60, first_message_seconds=0.2)
    unblock = threading.Event()

    def silent():
        unblock.wait(5)  # connects, never sends
        raise RuntimeError("cancelled")
        yield

    started = time.monotonic()
    with pytest.raises(FailedPrecondition):
        list(watchdog.watch(silent(), unblock.set))
    assert time.monotonic() - started < 3


def test_a_replaced_stream_fails_as_replaced():
    """UploadSlots replaces a silent PUT through its entry: the transport's cancel ends the wait,
    and the reader fails with UPLOAD_REPLACED (the log's reason), long before the idle limit."""
    watchdog = IdleWatchdog(60)
    unblock = threading.Event()

    def silent():
        yield "head"
        unblock.wait(5)  # its connection is gone
        raise RuntimeError("cancelled")

    stream = watchdog.stream(unblock.set)
    messages = watchdog.watch_stream(silent(), stream)
    assert next(messages) == "head"
    threading.Timer(0.2, stream.replace).start()
    started = time.monotonic()
    with pytest.raises(FailedPrecondition) as failed:
        next(messages)
    assert failed.value.reason == "UPLOAD_REPLACED" and time.monotonic() - started < 3
    assert stream.silent_for(time.monotonic()) == 0  # not waiting any more


@pytest.mark.parametrize("abort", ["replaced", "idle"])
def test_an_aborted_stream_that_grpcio_ends_as_finished_fails_with_its_reason(abort):
    """grpcio may end a call cancelled from outside as a stream that ended (StopIteration): that
    is no complete body, and the reader fails as the abort says (the probe saw BODY_INCOMPLETE)."""
    watchdog = IdleWatchdog(60)
    stream = watchdog.stream(lambda: None)
    messages = watchdog.watch_stream(iter(["head"]), stream)
    assert next(messages) == "head"
    if abort == "replaced":
        stream.replace()
    else:
        stream.fired = True  # what the watchdog's thread sets before its cancel
    with pytest.raises(FailedPrecondition) as failed:
        next(messages)
    assert failed.value.reason == {"replaced": "UPLOAD_REPLACED", "idle": "UPLOAD_IDLE"}[abort]


def test_a_first_message_that_is_data_gets_the_idle_limit():
    # WriteUpload's first message is a chunk: on a slow link it takes as long as any other.
    watchdog = IdleWatchdog(1.5, first_message_seconds=0.2)
    cancelled = []

    def slow_first():
        time.sleep(0.6)  # longer than the first-message limit, within the idle one
        yield "chunk"

    assert list(watchdog.watch(slow_first(), lambda: cancelled.append(True), first_carries_data=True)) == ["chunk"]
    assert cancelled == []


@pytest.mark.usefixtures("a_capture_kept")
def test_two_links_of_one_inode_go_in_one_pass(gallery):
    # A crash between link (into media/) and unlink (of the staging name) leaves one inode under
    # two names; removing either sets the inode's ctime, which must not spare the other.
    storage = gallery.storage
    staged = storage.staging_root / "fedcba9876543210fedcba9876543210"
    staged.write_bytes(b"half-stored")
    media = storage.media_path("cam1", "evt_twolinks000000000000")
    media.parent.mkdir(parents=True)
    os.link(staged, media)
    settle()
    findings = Reconciler(gallery, grace_seconds=0).run_once()
    assert (findings.staging_removed, findings.orphan_media_removed) == (1, 1)
    assert not staged.exists() and not media.exists()


def test_replicas_reconciling_at_once_remove_each_orphan_once(gallery, principal):
    # Several replicas share storage and database: their passes may overlap.
    kept = store(gallery, principal, "cam1", PNG)
    orphans = [gallery.storage.media_path("cam1", f"evt_orphan{i:013d}") for i in range(40)]
    for path in orphans:
        path.write_bytes(b"o")
    settle()
    results, errors = [], []

    def replica() -> None:
        try:
            results.append(Reconciler(gallery, grace_seconds=0).run_once())
        except Exception as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=replica) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert sum(r.orphan_media_removed for r in results) == len(orphans)
    assert not any(p.exists() for p in orphans)
    assert gallery.storage.media_path("cam1", kept.id).exists()


# -- files in use are never removed, whatever the grace period -------------------------------------


def test_a_live_upload_keeps_its_staged_files_however_old_they_look(gallery, principal):
    # A thumbnail sent first while its media streams for longer than the grace period: the
    # thumbnail's staging file looks old, but its upload holds it (StagedFile's shared lock).
    with gallery.begin_upload(principal, "cam1") as upload:
        upload.fields.name = "v.bin"
        upload.write_thumbnail(b"\xff\xd8\xff" + b"t" * 100)
        upload.write_media(b"m" * 1000)
        assert upload.thumbnail is not None
        hours_ago = time.time() - 7200
        for staged in (upload.thumbnail, upload.media):
            os.utime(staged.path, (hours_ago, hours_ago))
        settle()
        assert Reconciler(gallery, grace_seconds=0).run_once().staging_removed == 0
        upload.write_media(b"m" * 1000)
        event = gallery.store(upload)
    assert gallery.storage.thumbnail_path("cam1", event.id).read_bytes()[:3] == b"\xff\xd8\xff"
    # Once its upload is closed, a leftover is an ordinary leftover again.
    leftover = gallery.storage.stage(max_bytes=10, what="event")
    leftover.sync()
    leftover.release()
    settle()
    assert Reconciler(gallery, grace_seconds=0).run_once().staging_removed == 1
    assert not leftover.path.exists()


def test_a_pass_between_the_link_into_media_and_the_commit_keeps_the_file(gallery, principal):
    # Gallery.store() links the media into media/ a moment before it commits the row; a pass of
    # another replica in that window sees a rowless file, locked by the upload until its commit.
    other = Reconciler(Gallery(gallery.settings, gallery.db, Storage(gallery.settings.data_dir)),
                       grace_seconds=0)
    passes = []
    with gallery.begin_upload(principal, "cam1") as upload:
        upload.fields.name = "a.bin"
        upload.write_thumbnail(b"\xff\xd8\xff" + b"t" * 10)
        upload.write_media(b"hello")
        event = gallery.store(upload, before_insert=lambda session, event: (
            settle(), passes.append(other.run_once())))
    assert passes[0].orphan_media_removed == passes[0].orphan_thumbnails_removed == 0
    assert gallery.storage.media_path("cam1", event.id).read_bytes() == b"hello"
    assert gallery.storage.thumbnail_path("cam1", event.id).exists()
    assert other.run_once().rows_checked == 1


def test_a_resumable_writer_keeps_its_session_file_and_completed_sessions_lose_theirs(gallery):
    storage = gallery.storage
    busy = storage.session_path("cam1", "busy-upload-1")
    busy.parent.mkdir(parents=True)
    busy.write_bytes(b"no row yet")
    done = storage.session_path("cam1", "done-upload-1")
    done.write_bytes(b"stored as an event already")
    with gallery.db.session() as session:
        now = utcnow()
        session.add(UploadSessionRow(
            device="cam1", upload_id="done-upload-1", name="a.bin", committed_size=26,
            created=now, expires_at=now + datetime.timedelta(hours=1), event_id="evt_done",
        ))
        session.commit()
    settle()
    fd = os.open(busy, os.O_RDWR)
    try:
        file_locks.lock(fd)  # as a resumable writer holds it
        findings = Reconciler(gallery, grace_seconds=0).run_once()
    finally:
        os.close(fd)
    assert findings.staging_removed == 1
    assert busy.exists() and not done.exists()


def test_the_status_temporary_is_removed_when_the_write_fails(gallery, monkeypatch):
    reconciler = Reconciler(gallery)

    def full(*_args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError):
        reconciler.run_once()
    assert [p.name for p in reconciler.status_path.parent.iterdir()] == ["reconcile.lock"]


# -- configuration of the limits ------------------------------------------------------------------


def limits_env(tmp_path, **values: str) -> dict[str, str]:
    return {"GALLERY_DATA_DIR": str(tmp_path), "GALLERY_JWT_SECRET": "s" * 40, **values}


def a_gallery_database(tmp_path: pathlib.Path) -> None:
    """The data folder's database, as a server's first start makes it (reconcile makes none)."""
    from gallery_server.db import Database

    db = Database(f"sqlite:///{tmp_path / 'gallery.db'}")
    db.create_tables()
    db.dispose()


@pytest.mark.parametrize("values", [
    {"GALLERY_RECONCILE_GRACE_SECONDS": "0"},
    {"GALLERY_RECONCILE_GRACE_SECONDS": "-1"},
    {"GALLERY_RECONCILE_GRACE_SECONDS": "299"},
    {"GALLERY_RECONCILE_GRACE_SECONDS": "nan"},
    {"GALLERY_UPLOAD_IDLE_SECONDS": "1801"},  # the default grace (3600) is below 2 x idle
    {"GALLERY_MAX_UPLOADS_TOTAL": "256"},  # as many as the default workers
    {"GALLERY_GRPC_WORKERS": "8"},  # fewer than the default uploads in total
    {"GALLERY_UPLOAD_FIRST_MESSAGE_SECONDS": "0"},
])
def test_unsafe_limits_are_refused(tmp_path, values):
    with pytest.raises(ConfigError):
        Settings.from_env(limits_env(tmp_path, **values))


def test_safe_limits_are_accepted(tmp_path):
    settings = Settings.from_env(limits_env(
        tmp_path, GALLERY_RECONCILE_GRACE_SECONDS="300", GALLERY_UPLOAD_IDLE_SECONDS="150",
        GALLERY_GRPC_WORKERS="8", GALLERY_MAX_UPLOADS_TOTAL="7",
    ))
    assert (settings.reconcile_grace_seconds, settings.max_uploads_total) == (300, 7)
    assert Settings.from_env(limits_env(tmp_path)).upload_first_message_seconds == 30


def test_cli_reconcile_needs_force_for_a_short_grace_and_no_server_running(tmp_path, monkeypatch, capsys):
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        for name, value in limits_env(tmp_path, GALLERY_GRPC_ADDRESS=f"127.0.0.1:{port}").items():
            monkeypatch.setenv(name, value)
        a_gallery_database(tmp_path)
        assert cli.main(["reconcile", "--grace", "0"]) == 2
        assert "--force" in capsys.readouterr().err
        assert cli.main(["reconcile", "--grace", "0", "--force"]) == 2  # a server answers
        assert "answers" in capsys.readouterr().err
    assert cli.main(["reconcile", "--grace", "0", "--force"]) == 0
    assert json.loads(capsys.readouterr().out)["rows_checked"] == 0


def test_one_replica_walks_the_files_at_a_time(gallery):
    reconciler = Reconciler(gallery, grace_seconds=0)
    reconciler.lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(reconciler.lock_path, os.O_RDWR | os.O_CREAT)
    try:
        file_locks.lock(fd)  # another replica's pass
        assert reconciler.run_unless_busy() is None
        # run_once (the CLI's) waits for that pass to end rather than skipping or overlapping it.
        waiting = threading.Thread(target=reconciler.run_once)
        waiting.start()
        time.sleep(0.3)
        assert waiting.is_alive() and reconciler.last() is None
    finally:
        os.close(fd)
    waiting.join(10)
    assert not waiting.is_alive() and reconciler.last() is not None
    assert reconciler.run_unless_busy() is not None


def test_a_folder_made_before_a_crash_gets_its_parent_fsynced_once(tmp_path, monkeypatch):
    # A process died between mkdir and the parent's fsync: the folder exists, its entry may not
    # be durable. The next process fsyncs the parent on first use, then never again.
    folder = tmp_path / "media" / "cam-crashed"
    folder.mkdir(parents=True)
    synced: list[pathlib.Path] = []
    monkeypatch.setattr(storage_module, "fsync_dir", synced.append)
    storage_module.make_dir(folder)
    storage_module.make_dir(folder)
    assert synced == [folder.parent]


@pytest.mark.usefixtures("a_capture_kept")
def test_an_orphan_the_server_may_not_open_for_writing_nor_remove_is_left_with_a_warning(gallery, caplog):
    # Its exclusive lock needs a descriptor open for writing (file_locks.py): without one the
    # reconciler asks whether anyone holds a lock instead, and tries. chattr +i refuses the
    # write and the unlink even to root; the rest of the pass goes on.
    storage = gallery.storage
    stuck = storage.media_path("cam1", "evt_immutable000000000000")
    stuck.parent.mkdir(parents=True, exist_ok=True)
    stuck.write_bytes(b"s" * 5)
    orphan = storage.media_path("cam1", "evt_orphan0000000000000")
    orphan.write_bytes(b"o" * 7)
    if subprocess.run(["chattr", "+i", str(stuck)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        settle()
        with caplog.at_level(logging.WARNING, logger="gallery_server.reconcile"):
            findings = Reconciler(gallery, grace_seconds=0).run_once()
    finally:
        subprocess.run(["chattr", "-i", str(stuck)], check=True)
    assert stuck.read_bytes() == b"s" * 5 and not orphan.exists()
    assert (findings.orphan_media_removed, findings.bytes_reclaimed) == (1, 7)
    assert [r.path for r in caplog.records if r.message == "reconcile could not remove a file"] \
        == [str(stuck)]


@pytest.mark.usefixtures("a_capture_kept")
@pytest.mark.parametrize("in_use", [False, True])
def test_a_leftover_the_server_may_only_read_goes_unless_a_lock_is_held_on_it(gallery, monkeypatch, in_use):
    """Restored read-only, say (the tests run as root, so refusing the write is simulated): no
    upload writes such a file, so a lock held on it is the only sign of use."""
    storage = gallery.storage
    orphan = storage.media_path("cam1", "evt_readonly00000000000")
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"r" * 9)
    real_open = os.open

    def read_only(target, flags, *args):  # type: ignore[no-untyped-def]
        if os.fspath(target) == str(orphan) and flags & os.O_ACCMODE != os.O_RDONLY:
            raise PermissionError(13, "Permission denied", str(target))
        return real_open(target, flags, *args)

    holder = real_open(orphan, os.O_RDWR)
    try:
        if in_use:
            file_locks.lock(holder, shared=True)
        monkeypatch.setattr(os, "open", read_only)
        settle()
        findings = Reconciler(gallery, grace_seconds=0).run_once()
    finally:
        os.close(holder)
    assert orphan.exists() is in_use
    assert findings.orphan_media_removed == (0 if in_use else 1)


def test_cli_reconcile_needs_no_jwt_secret(tmp_path, monkeypatch, capsys):
    """It signs and checks no token: an operator's host without the secret may run it."""
    for name, value in limits_env(tmp_path).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("GALLERY_JWT_SECRET")
    assert not (tmp_path / "jwt-secret").exists()
    a_gallery_database(tmp_path)
    assert cli.main(["reconcile"]) == 0
    assert json.loads(capsys.readouterr().out)["rows_checked"] == 0
    assert cli.main(["token", "--sub", "ops", "--device", "cam-1"]) == 2  # minting one still needs it
    assert "no JWT secret" in capsys.readouterr().err


@pytest.mark.usefixtures("a_capture_kept")
@pytest.mark.parametrize("committed", ["session", "event", "grant"])
def test_a_file_whose_row_commits_before_its_lock_is_taken_is_kept(gallery, principal, monkeypatch, committed):
    """The pass reads the rows (none: an orphan), then takes the file's lock: a row committed in
    between, its upload's lock let go since, is read again under the lock."""
    storage = gallery.storage
    event_id = "evt_racing00000000000000"
    path = storage.session_path("cam1", "racing-0001") if committed == "session" \
        else storage.media_path("cam1", event_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"old")
    racing = path.stat().st_ino
    settle()

    def commit_first(fd: int, *, shared: bool = False) -> bool:
        nonlocal racing
        if os.fstat(fd).st_ino == racing:
            racing = -1
            if committed == "session":  # started again at the leftover's name, and written
                uploads = ResumableUploads(gallery)
                uploads.start(principal, "cam1", name="a.bin", upload_id="racing-0001")
                writer = uploads.open_write(principal, "cam1", "racing-0001", 0)
                try:
                    writer.write(b"abc")
                    writer.commit()
                finally:
                    writer.close()
            elif committed == "event":
                with gallery.db.session() as session:
                    session.add(Event(id=event_id, device="cam1", name="a.bin", media_type="other",
                                      mime_type="application/octet-stream", size=3, sha256="0" * 64,
                                      created=utcnow()))
                    session.commit()
            else:
                add_grant(gallery, event_id, expires_in=600)
        return file_locks.try_lock(fd, shared=shared)

    monkeypatch.setattr(reconcile, "file_locks", types.SimpleNamespace(
        try_lock=commit_first, lock=file_locks.lock, held=file_locks.held))
    findings = Reconciler(gallery, grace_seconds=0).run_once()
    assert racing == -1  # the pass did reach the file
    assert (findings.staging_removed, findings.orphan_media_removed, findings.missing_media) == (0, 0, 0)
    assert path.read_bytes() == (b"abc" if committed == "session" else b"old")
