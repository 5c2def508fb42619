"""`gallery backup` on both databases (the `gallery` fixture runs on SQLite and PostgreSQL): the
backup restores to the same gallery (rows, counters, bytes), holds every file its database names,
and leaves out what was deleted while it ran. A PostgreSQL backup is restored with the real
pg_restore into a database of its own."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest
import sqlalchemy as sa

from gallery_server import backup as backup_module
from gallery_server import cli
from gallery_server import settings as settings_module
from gallery_server.backup import BackupRefused, backup
from gallery_server.clock import utcnow
from gallery_server.db import Database
from gallery_server.models import DeletedCapture, Event, UploadGrant
from gallery_server.reconcile import Reconciler
from gallery_server.restore import restore
from gallery_server.service import Gallery
from gallery_server.settings import ConfigError, Settings
from gallery_server.storage import Storage

from ..conftest import JWT_SECRET, make_settings, random_bytes, small_disk
from .test_service import PNG, store


@contextlib.contextmanager
def restored(gallery: Gallery, folder: pathlib.Path, *, copy: bool = False) -> Iterator[Gallery]:
    """The backup restored by `gallery restore` into a new data folder (and a new database on
    PostgreSQL, dropped afterwards); the gallery on it, its restore's result as `.restored`."""
    with new_database(gallery) as database_url:
        settings = make_settings(folder.parent / f"restored_{uuid.uuid4().hex[:8]}", database_url)
        result = restore(settings, folder, copy=copy)
        db = Database(settings.database_url, pool_size=2)
        try:
            db.create_tables()  # as a server starting on it does: nothing to make
            copied = Gallery(settings, db, Storage(settings.data_dir))
            copied.restored = result  # type: ignore[attr-defined]
            yield copied
        finally:
            db.dispose()


@contextlib.contextmanager
def new_database(gallery: Gallery) -> Iterator[str]:
    """A new empty PostgreSQL database beside the gallery's (dropped afterwards), its URL; for a
    gallery on SQLite, "": the data folder's gallery.db."""
    url = sa.make_url(gallery.settings.database_url)
    if url.get_backend_name() != "postgresql":
        yield ""
        return
    name = f"gallery_restored_{uuid.uuid4().hex[:12]}"
    admin = url.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def snapshot(gallery: Gallery, principal) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """What users see of a gallery: each device's events, their bytes, and its stats."""
    seen: dict[str, object] = {}
    for device in ("cam1", "cam2"):
        events = gallery.list_events(principal, device)
        seen[device] = sorted((e.id, e.size, e.sha256, e.state, e.has_thumbnail) for e in events)
        seen[f"{device} bytes"] = {
            e.id: gallery.stored_media(principal, device, e.id)[1].read_bytes() for e in events if e.state == "stored"}
        stats = gallery.stats(principal, device)
        seen[f"{device} stats"] = (stats.total_events, stats.total_size, stats.quota)
    return seen


ANNOUNCED = "evt_ondevice" + "0" * 14
GRANTED = "evt_granted" + "0" * 15


def fill(gallery: Gallery, principal) -> list[Event]:  # type: ignore[no-untyped-def]
    events = [
        store(gallery, principal, "cam1", PNG + b"1", name="a.png"),
        store(gallery, principal, "cam1", PNG + b"2", name="b.png", thumbnail=b"thumb of b"),
        store(gallery, principal, "cam2", random_bytes(70_000), name="c.bin"),
        store(gallery, principal, "cam2", PNG + b"4", name="d.png"),
    ]
    gallery.delete_event(principal, "cam2", events[3].id)
    with gallery.db.session() as session:
        # Its content is still on the device: only the thumbnail it announced with is here.
        session.add(Event(id=ANNOUNCED, device="cam1", name="e.png", media_type="image", mime_type="image/png",
                          size=10, sha256="1" * 64, created=utcnow(), state="on_device", has_thumbnail=True,
                          device_key="dcim/e.png"))
        # A signed URL's thumbnail, PUT before its media: the media PUT will make the event.
        session.add(UploadGrant(event_id=GRANTED, device="cam2", filename="f.jpg", media_state="open",
                                thumbnail_state="done", expires_at=utcnow() + datetime.timedelta(hours=1)))
        session.commit()
    gallery.storage.thumbnail_path("cam1", ANNOUNCED).write_bytes(b"announced thumb")
    gallery.storage.thumbnail_path("cam2", GRANTED).write_bytes(b"granted thumb")
    return events[:3]


def test_a_backup_restores_to_the_same_gallery(gallery, principal, tmp_path):
    events = fill(gallery, principal)
    (gallery.settings.data_dir / "jwt-secret").write_text(JWT_SECRET + "\n")
    read_from_the_file = dataclasses.replace(gallery.settings, secret_file=True)  # GALLERY_JWT_SECRET unset
    before = snapshot(gallery, principal)

    manifest = backup(read_from_the_file, tmp_path / "backup")

    folder = tmp_path / "backup"
    postgres = gallery.db.engine.dialect.name == "postgresql"
    database_file = "gallery.pgdump" if postgres else "gallery.db"
    assert sorted(p.name for p in folder.iterdir()) == sorted(["backup.json", database_file, "jwt-secret", "media"])
    assert json.loads((folder / "backup.json").read_text()) == json.loads(json.dumps(manifest.__dict__))
    # The stored events' 3 media files and 1 thumbnail, the announced event's and the grant's thumbnails.
    assert (manifest.events, manifest.files, manifest.linked, manifest.copied) == (4, 6, 6, 0)
    assert (manifest.deleted_meanwhile, manifest.missing_files, manifest.secret) == ([], 0, True)
    assert manifest.started <= manifest.snapshot <= manifest.finished
    assert manifest.database_file == database_file
    assert manifest.started.endswith("Z") and manifest.finished.endswith("Z")
    for event in events:  # hard links: the same file, no space spent
        live = gallery.storage.media_path(event.device, event.id)
        assert os.stat(folder / "media" / event.device / event.id).st_ino == os.stat(live).st_ino
    assert (folder / "jwt-secret").read_text() == JWT_SECRET + "\n"
    modes = {p.relative_to(folder).as_posix(): p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert modes == {"backup.json": 0o640, database_file: 0o640, "jwt-secret": 0o600, "media": 0o750}
    assert folder.stat().st_mode & 0o777 == 0o700

    with restored(gallery, folder) as copy:
        assert snapshot(copy, principal) == before
        assert copy.storage.thumbnail_path("cam1", events[1].id).read_bytes() == b"thumb of b"
        with contextlib.closing(copy.open_thumbnail(principal, "cam1", ANNOUNCED).file) as thumbnail:
            thumbnail.seek(0)  # open_thumbnail has read its head
            assert thumbnail.read() == b"announced thumb"
        assert copy.storage.thumbnail_path("cam2", GRANTED).read_bytes() == b"granted thumb"
        findings = Reconciler(copy, grace_seconds=0).run_once()
    assert (findings.rows_checked, findings.missing_media, findings.size_mismatch) == (3, 0, 0)
    assert findings.orphan_media_removed == findings.orphan_thumbnails_removed == 0


def test_the_secret_is_taken_only_when_it_is_the_one_in_use(gallery, principal, tmp_path):
    fill(gallery, principal)
    (gallery.settings.data_dir / "jwt-secret").write_text("an old file, not the secret in use" + "x" * 32)
    manifest = backup(gallery.settings, tmp_path / "backup")  # GALLERY_JWT_SECRET is the one in use
    assert manifest.secret is False and not (tmp_path / "backup" / "jwt-secret").exists()


def test_the_secret_file_is_read_only_when_it_is_the_one_in_use(tmp_path, monkeypatch):
    """`verify` and `backup` need no secret: run by the server's group, who may not read the 0600
    file, they go on without it; the server itself says what to do."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "jwt-secret").write_text(JWT_SECRET + "\n")
    env = {"GALLERY_DATA_DIR": str(data)}
    assert Settings.from_env(env, needs_secret=False).secret_file is True
    assert Settings.from_env({**env, "GALLERY_JWT_SECRET": "y" * 40}, needs_secret=False).secret_file is False
    monkeypatch.setattr(settings_module, "read_secret_file", _unreadable)
    assert Settings.from_env(env, needs_secret=False).jwt_secret == ""
    with pytest.raises(ConfigError, match="run as the server's user, or set GALLERY_JWT_SECRET"):
        Settings.from_env(env)


def _unreadable(data_dir: pathlib.Path) -> str:
    raise PermissionError(13, "Permission denied", str(data_dir / "jwt-secret"))


def test_files_missing_from_the_live_gallery_too_are_kept_as_they_are_and_named(gallery, principal, tmp_path):
    plain, with_thumbnail, _ = fill(gallery, principal)
    gallery.storage.media_path(plain.device, plain.id).unlink()  # lost: damage the live gallery has
    gallery.storage.thumbnail_path(with_thumbnail.device, with_thumbnail.id).unlink()
    manifest = backup(gallery.settings, tmp_path / "backup")
    assert (manifest.events, manifest.files, manifest.missing_files, manifest.deleted_meanwhile) == (4, 4, 2, [])
    assert sorted(manifest.examples) == sorted([f"{plain.device}/{plain.id}",
                                                f"{with_thumbnail.device}/{with_thumbnail.id}.thumb"])
    assert (tmp_path / "backup" / "media" / with_thumbnail.device / with_thumbnail.id).exists()
    with restored(gallery, tmp_path / "backup") as copy:  # as the live gallery is: reported, not hidden
        findings = Reconciler(copy, grace_seconds=0).run_once()
    assert findings.missing_media == 1 and findings.examples == [f"{plain.device}/{plain.id}"]


def test_copy_takes_files_of_their_own(gallery, principal, tmp_path):
    events = fill(gallery, principal)
    manifest = backup(gallery.settings, tmp_path / "backup", copy=True)
    assert (manifest.linked, manifest.copied, manifest.secret) == (0, 6, False)
    thumbnails = len(b"thumb of b") + len(b"announced thumb") + len(b"granted thumb")
    assert manifest.bytes_copied == sum(e.size for e in events) + thumbnails
    for event in events:
        live = gallery.storage.media_path(event.device, event.id)
        taken = tmp_path / "backup" / "media" / event.device / event.id
        assert taken.read_bytes() == live.read_bytes() and taken.stat().st_ino != live.stat().st_ino
        assert taken.stat().st_mode == live.stat().st_mode


@pytest.mark.parametrize("copy", [False, True])
def test_events_deleted_after_the_snapshot_are_in_the_backup_whole(gallery, principal, tmp_path, monkeypatch, copy):
    """Their files were taken before the snapshot: the backup is the gallery at its snapshot, on
    both databases (a PostgreSQL dump, which cannot be edited, holds no event without its files)."""
    fill(gallery, principal)
    at_the_snapshot = snapshot(gallery, principal)
    place = backup_module._Files.place

    def deleted_after_the_snapshot(self, spool):  # type: ignore[no-untyped-def]
        for device in ("cam1", "cam2"):
            for event in gallery.list_events(principal, device):
                gallery.delete_event(principal, device, event.id)
        return place(self, spool)

    monkeypatch.setattr(backup_module._Files, "place", deleted_after_the_snapshot)
    manifest = backup(gallery.settings, tmp_path / "backup", copy=copy)
    assert (manifest.events, manifest.files, manifest.deleted_meanwhile, manifest.missing_files) == (4, 6, [], 0)
    assert (manifest.linked, manifest.copied) == ((0, 6) if copy else (6, 0))
    assert snapshot(gallery, principal)["cam1"] == []  # the live gallery is empty now
    with restored(gallery, tmp_path / "backup") as copied:
        assert snapshot(copied, principal) == at_the_snapshot
        findings = Reconciler(copied, grace_seconds=0).run_once()
    assert (findings.missing_media, findings.orphan_media_removed) == (0, 0)
    assert not (tmp_path / "backup" / backup_module.GATHERED).exists()


def test_files_deleted_before_the_snapshot_are_not_kept(gallery, principal, tmp_path, monkeypatch):
    kept, _, doomed = fill(gallery, principal)
    gather = backup_module._Files.gather

    def deleted_before_the_snapshot(self, **kwargs):  # type: ignore[no-untyped-def]
        gather(self, **kwargs)
        gallery.delete_event(principal, doomed.device, doomed.id)

    monkeypatch.setattr(backup_module._Files, "gather", deleted_before_the_snapshot)
    manifest = backup(gallery.settings, tmp_path / "backup")
    assert (manifest.events, manifest.files, manifest.linked) == (3, 5, 5)
    assert not (tmp_path / "backup" / "media" / doomed.device / doomed.id).exists()
    assert (tmp_path / "backup" / "media" / kept.device / kept.id).exists()


@pytest.mark.parametrize("copy", [False, True])
def test_an_event_stored_and_deleted_while_the_backup_runs_is_left_out(gallery, principal, tmp_path, monkeypatch,
                                                                       copy):
    """Stored after the files were gathered, deleted before they were placed: the one window in
    which the snapshot names files that are gone."""
    kept, *_ = fill(gallery, principal)
    gather, place = backup_module._Files.gather, backup_module._Files.place
    late: list[Event] = []

    def stored_after_gathering(self, **kwargs):  # type: ignore[no-untyped-def]
        gather(self, **kwargs)
        late.append(store(gallery, principal, "cam1", PNG + b"late", name="late.png", thumbnail=b"late thumb"))
        with gallery.db.session() as session:  # announced, then pulled: its deletion leaves a tombstone
            session.exec(sa.update(Event).where(Event.id == late[0].id).values(device_key="dcim/late.png"))
            session.commit()

    def deleted_before_placing(self, spool):  # type: ignore[no-untyped-def]
        gallery.delete_event(principal, "cam1", late[0].id)
        return place(self, spool)

    monkeypatch.setattr(backup_module._Files, "gather", stored_after_gathering)
    monkeypatch.setattr(backup_module._Files, "place", deleted_before_placing)
    manifest = backup(gallery.settings, tmp_path / "backup", copy=copy)
    assert (manifest.events, manifest.files, manifest.missing_files) == (4, 6, 0)
    assert manifest.deleted_meanwhile == [f"cam1/{late[0].id}"]
    assert manifest.linked + manifest.copied == 6
    after = snapshot(gallery, principal)
    # Deleted from a SQLite copy as a user's DELETE deletes; a dump cannot be edited: `gallery
    # restore` deletes them from the restored PostgreSQL database.
    with restored(gallery, tmp_path / "backup") as copied:
        assert snapshot(copied, principal) == after
        assert tombstones(copied) == tombstones(gallery) == [("cam1", "dcim/late.png", late[0].id)]
        postgres = copied.db.engine.dialect.name == "postgresql"
        assert copied.restored.deleted == (manifest.deleted_meanwhile if postgres else [])
        findings = Reconciler(copied, grace_seconds=0).run_once()
    assert (findings.missing_media, findings.orphan_media_removed) == (0, 0)


def test_a_backup_of_a_database_of_the_version_before_leaves_out_what_it_deleted_meanwhile(
    gallery, principal, tmp_path, monkeypatch,
):
    """The servers not upgraded yet (no deleted_captures.announced_at): the SQLite copy gets this
    version's schema before its deletions are written as this version writes them."""
    if gallery.db.engine.dialect.name != "sqlite":
        pytest.skip("a SQLite copy is edited; a dump is not")
    with gallery.db.engine.begin() as c:
        c.exec_driver_sql("DROP INDEX ix_deleted_captures_announced")
        c.exec_driver_sql("ALTER TABLE deleted_captures DROP COLUMN announced_at")
    fill(gallery, principal)
    gather, place = backup_module._Files.gather, backup_module._Files.place
    late: list[Event] = []

    def stored_after_gathering(self, **kwargs):  # type: ignore[no-untyped-def]
        gather(self, **kwargs)
        late.append(store(gallery, principal, "cam1", PNG + b"late", name="late.png"))
        with gallery.db.engine.begin() as c:  # announced, then pulled: its deletion leaves a tombstone
            c.execute(sa.update(Event).where(Event.id == late[0].id).values(device_key="dcim/late.png"))

    def deleted_before_placing(self, spool):  # type: ignore[no-untyped-def]
        with gallery.db.engine.begin() as c:  # as the servers' version deletes: no announced_at
            c.execute(sa.delete(Event).where(Event.id == late[0].id))
        gallery.storage.remove_event_files("cam1", late[0].id)
        return place(self, spool)

    monkeypatch.setattr(backup_module._Files, "gather", stored_after_gathering)
    monkeypatch.setattr(backup_module._Files, "place", deleted_before_placing)
    manifest = backup(gallery.settings, tmp_path / "backup")
    assert manifest.deleted_meanwhile == [f"cam1/{late[0].id}"]
    with restored(gallery, tmp_path / "backup") as copied:
        assert snapshot(copied, principal) == snapshot(gallery, principal)
        assert tombstones(copied) == [("cam1", "dcim/late.png", late[0].id)]


def tombstones(gallery: Gallery) -> list[tuple[str, str, str]]:
    with gallery.db.session() as session:
        return sorted((d.device, d.device_key, d.event_id) for d in session.exec(sa.select(DeletedCapture)).scalars())


def test_it_refuses_a_folder_in_use_and_touches_nothing(gallery, principal, tmp_path):
    fill(gallery, principal)
    used = tmp_path / "used"
    used.mkdir()
    (used / "mine.txt").write_text("keep me")
    with pytest.raises(BackupRefused, match="not an empty folder"):
        backup(gallery.settings, used)
    assert [p.name for p in used.iterdir()] == ["mine.txt"]
    inside = gallery.settings.data_dir / "media" / "backup"  # the reconciler would remove its files
    with pytest.raises(BackupRefused, match="inside the data folder"):
        backup(gallery.settings, inside)
    assert not inside.exists()
    (tmp_path / "empty").mkdir()  # an empty folder is taken
    assert backup(gallery.settings, tmp_path / "empty").events == 4


def test_a_failed_backup_leaves_nothing(gallery, principal, tmp_path):
    [first, *_] = fill(gallery, principal)
    media = gallery.storage.media_path(first.device, first.id)
    media.unlink()
    media.mkdir()  # what is there cannot be linked: an error, not a silent copy of everything
    with pytest.raises(OSError, match="cannot hard-link"):
        backup(gallery.settings, tmp_path / "backup")
    assert not (tmp_path / "backup").exists()
    (tmp_path / "given").mkdir()  # a folder it did not make stays, empty
    with pytest.raises(OSError):
        backup(gallery.settings, tmp_path / "given")
    assert list((tmp_path / "given").iterdir()) == []


def test_a_copy_that_cannot_fit_is_refused_before_it_starts(gallery, principal, tmp_path):
    store(gallery, principal, "cam1", random_bytes(3 << 20), name="big.bin")
    with small_disk(tmp_path / "disk", "2m") as disk:
        with pytest.raises(OSError, match="no room to copy"):
            backup(gallery.settings, disk / "backup", copy=True)
        assert not (disk / "backup").exists()


def test_a_folder_another_backup_writes_to_is_refused(gallery, principal, tmp_path):
    fill(gallery, principal)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / backup_module.IN_PROGRESS).touch()
    with pytest.raises(BackupRefused):
        backup(gallery.settings, tmp_path / "busy")
    assert [p.name for p in (tmp_path / "busy").iterdir()] == [backup_module.IN_PROGRESS]


def test_the_command_prints_what_it_took(settings: Settings, gallery, principal, tmp_path):
    fill(gallery, principal)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GALLERY_")}
    env |= {"GALLERY_DATA_DIR": str(settings.data_dir), "GALLERY_DATABASE_URL": settings.database_url}

    def command(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gallery_server", "backup", *args], env=env,
                              capture_output=True, text=True, timeout=120)

    result = command(str(tmp_path / "backup"))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == json.loads((tmp_path / "backup" / "backup.json").read_text())
    again = command(str(tmp_path / "backup"))
    assert again.returncode == 2 and "exists and is not an empty folder" in again.stderr, again.stderr
    assert "Traceback" not in again.stderr


def test_ctrl_c_leaves_nothing(settings: Settings, gallery, principal, tmp_path, monkeypatch, capsys):
    fill(gallery, principal)

    def interrupted(self, spool):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr(backup_module._Files, "place", interrupted)
    monkeypatch.setenv("GALLERY_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("GALLERY_DATABASE_URL", settings.database_url)
    assert cli.main(["backup", str(tmp_path / "backup")]) == 130
    assert "backup stopped, nothing kept" in capsys.readouterr().err
    assert not (tmp_path / "backup").exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_backup_stopped_by_a_service_manager_leaves_nothing(settings: Settings, gallery, principal, tmp_path,
                                                              signum):
    """SIGTERM (systemd, `timeout`) or SIGHUP while pg_dump runs: pg_dump is ended with the
    command, and what was written is removed, as after Ctrl-C."""
    if gallery.db.engine.dialect.name != "postgresql":
        pytest.skip("a pg_dump that takes its time: PostgreSQL's")
    fill(gallery, principal)
    slow = tmp_path / "bin"
    slow.mkdir()
    (slow / "pg_dump").write_text(f"#!/bin/sh\necho $$ > {tmp_path}/pg_dump.pid\nexec sleep 60\n")
    (slow / "pg_dump").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GALLERY_")}
    env |= {"GALLERY_DATA_DIR": str(settings.data_dir), "GALLERY_DATABASE_URL": settings.database_url,
            "PATH": f"{slow}:{os.environ['PATH']}"}
    process = subprocess.Popen([sys.executable, "-m", "gallery_server", "backup", str(tmp_path / "backup")],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pid_file = tmp_path / "pg_dump.pid"
        deadline = time.monotonic() + 60
        while not pid_file.exists() or not pid_file.read_text().strip():
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            time.sleep(0.02)
        process.send_signal(signum)
        _, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 128 + signum, err
    assert f"backup stopped by {signal.Signals(signum).name}, nothing kept" in err and "Traceback" not in err
    assert not (tmp_path / "backup").exists()
    dump = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _running(dump):
        assert time.monotonic() < deadline, "pg_dump outlived the backup"
        time.sleep(0.05)


def _running(pid: int) -> bool:
    """Alive, and not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_folder_name_that_reads_as_a_url_stays_a_folder_name(gallery, principal, tmp_path):
    """A "?" or "%41" in DEST is part of its name: nothing is written beside it."""
    fill(gallery, principal)
    (tmp_path / "out").mkdir()
    beside = tmp_path / "out" / "victim.db"
    beside.write_bytes(b"not the gallery's")
    for name in ("victim.db?old", "pct%41x", "q?x#y"):
        assert backup(gallery.settings, tmp_path / "out" / name).events == 4
    assert beside.read_bytes() == b"not the gallery's"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["victim.db", "victim.db?old", "pct%41x", "q?x#y"])


def test_the_room_for_copies_is_counted_in_blocks(gallery, principal, tmp_path):
    """700 files of 100 bytes take 70 kB by their sizes and 2.8 MB of 4 kB blocks."""
    fill(gallery, principal)
    many = gallery.storage.media_root / "cam9"
    many.mkdir()
    for i in range(700):
        (many / f"evt_{i:022d}").write_bytes(b"x" * 100)
    with small_disk(tmp_path / "disk", "2m") as disk:
        with pytest.raises(OSError, match="no room to copy"):
            backup(gallery.settings, disk / "backup", copy=True)
        assert not (disk / "backup").exists()


def test_a_thumbnail_replaced_after_it_was_gathered_is_taken_as_it_is_now(gallery, principal, tmp_path,
                                                                        monkeypatch):
    """Media never change once stored; a thumbnail may (a device's replaces the server's)."""
    _, with_thumbnail, _ = fill(gallery, principal)
    live = gallery.storage.thumbnail_path(with_thumbnail.device, with_thumbnail.id)
    gather = backup_module._Files.gather

    def replaced_after_gathering(self, **kwargs):  # type: ignore[no-untyped-def]
        gather(self, **kwargs)
        replacement = live.with_name("replacement")
        replacement.write_bytes(b"the device's own thumbnail")
        os.replace(replacement, live)  # as the server moves a device's thumbnail into place

    monkeypatch.setattr(backup_module._Files, "gather", replaced_after_gathering)
    manifest = backup(gallery.settings, tmp_path / "backup")
    taken = tmp_path / "backup" / "media" / with_thumbnail.device / live.name
    assert taken.read_bytes() == b"the device's own thumbnail"
    assert (manifest.files, manifest.linked) == (6, 6)
