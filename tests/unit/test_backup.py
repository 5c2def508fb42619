"""`gallery backup` on both databases (the `gallery` fixture runs on SQLite and PostgreSQL): the
backup restores to the same gallery (rows, counters, bytes), holds every file its database names,
and leaves out what was deleted while it ran. A PostgreSQL backup is restored with the real
pg_restore into a database of its own."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import subprocess
import sys
import uuid
from collections.abc import Iterator

import psycopg
import pytest
import sqlalchemy as sa

from gallery_server import backup as backup_module
from gallery_server.backup import BackupRefused, backup
from gallery_server.clock import utcnow
from gallery_server.db import Database
from gallery_server.models import Event
from gallery_server.reconcile import Reconciler
from gallery_server.service import Gallery
from gallery_server.settings import Settings
from gallery_server.storage import Storage

from ..conftest import make_settings, random_bytes
from .test_service import PNG, store


@contextlib.contextmanager
def restored(gallery: Gallery, folder: pathlib.Path) -> Iterator[Gallery]:
    """A gallery running on the backup folder, as README says to restore one."""
    url = sa.make_url(gallery.settings.database_url)
    database_url = ""  # SQLite: the folder's gallery.db, as for any data folder
    name = f"gallery_restored_{uuid.uuid4().hex[:12]}"
    admin = url.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    if url.get_backend_name() == "postgresql":
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        database_url = url.set(database=name).render_as_string(hide_password=False)
        result = subprocess.run(
            ["pg_restore", "--no-owner", "--exit-on-error",
             f"--dbname={sa.make_url(database_url).set(drivername='postgresql').render_as_string(hide_password=False)}",
             str(folder / "gallery.pgdump")], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    settings = make_settings(folder, database_url)
    db = Database(settings.database_url, pool_size=2)
    try:
        db.create_tables()  # as a server starting on it does: nothing to make
        yield Gallery(settings, db, Storage(folder))
    finally:
        db.dispose()
        if database_url:
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


def fill(gallery: Gallery, principal) -> list[Event]:  # type: ignore[no-untyped-def]
    events = [
        store(gallery, principal, "cam1", PNG + b"1", name="a.png"),
        store(gallery, principal, "cam1", PNG + b"2", name="b.png", thumbnail=b"thumb of b"),
        store(gallery, principal, "cam2", random_bytes(70_000), name="c.bin"),
        store(gallery, principal, "cam2", PNG + b"4", name="d.png"),
    ]
    gallery.delete_event(principal, "cam2", events[3].id)
    with gallery.db.session() as session:  # its content is still on the device: no file to take
        session.add(Event(id="evt_ondevice000000000000", device="cam1", name="e.png", media_type="image",
                          mime_type="image/png", size=10, sha256="1" * 64, created=utcnow(), state="on_device"))
        session.commit()
    return events[:3]


def test_a_backup_restores_to_the_same_gallery(gallery, principal, tmp_path):
    events = fill(gallery, principal)
    (gallery.settings.data_dir / "jwt-secret").write_text("the data folder's secret\n")
    before = snapshot(gallery, principal)

    manifest = backup(gallery.settings, tmp_path / "backup")

    folder = tmp_path / "backup"
    postgres = gallery.db.engine.dialect.name == "postgresql"
    database_file = "gallery.pgdump" if postgres else "gallery.db"
    assert sorted(p.name for p in folder.iterdir()) == sorted(["backup.json", database_file, "jwt-secret", "media"])
    assert json.loads((folder / "backup.json").read_text()) == json.loads(json.dumps(manifest.__dict__))
    assert (manifest.events, manifest.files, manifest.linked, manifest.copied) == (3, 4, 4, 0)
    assert (manifest.deleted_meanwhile, manifest.secret, manifest.database_file) == (0, True, database_file)
    assert manifest.started.endswith("Z") and manifest.finished.endswith("Z")
    for event in events:  # hard links: the same file, no space spent
        live = gallery.storage.media_path(event.device, event.id)
        assert os.stat(folder / "media" / event.device / event.id).st_ino == os.stat(live).st_ino
    assert (folder / "jwt-secret").read_text() == "the data folder's secret\n"
    assert (folder / "jwt-secret").stat().st_mode & 0o777 == 0o600
    assert folder.stat().st_mode & 0o777 == 0o700

    with restored(gallery, folder) as copy:
        assert snapshot(copy, principal) == before
        assert copy.storage.thumbnail_path("cam1", events[1].id).read_bytes() == b"thumb of b"
        findings = Reconciler(copy, grace_seconds=0).run_once()
    assert (findings.rows_checked, findings.missing_media, findings.size_mismatch) == (3, 0, 0)
    assert findings.orphan_media_removed == findings.orphan_thumbnails_removed == 0


def test_copy_takes_files_of_their_own(gallery, principal, tmp_path):
    events = fill(gallery, principal)
    manifest = backup(gallery.settings, tmp_path / "backup", copy=True)
    assert (manifest.linked, manifest.copied, manifest.secret) == (0, 4, False)
    assert manifest.bytes_copied == sum(e.size for e in events) + len(b"thumb of b")
    for event in events:
        live = gallery.storage.media_path(event.device, event.id)
        taken = tmp_path / "backup" / "media" / event.device / event.id
        assert taken.read_bytes() == live.read_bytes() and taken.stat().st_ino != live.stat().st_ino
        assert taken.stat().st_mode == live.stat().st_mode


def test_an_event_deleted_while_the_backup_runs_is_left_out(gallery, principal, tmp_path, monkeypatch):
    kept, with_thumbnail, deleted = fill(gallery, principal)
    take_all = backup_module._Files.take_all

    def deleted_after_the_snapshot(self, rows):  # type: ignore[no-untyped-def]
        gallery.delete_event(principal, with_thumbnail.device, with_thumbnail.id)
        gallery.delete_event(principal, deleted.device, deleted.id)
        return take_all(self, rows)

    monkeypatch.setattr(backup_module._Files, "take_all", deleted_after_the_snapshot)
    manifest = backup(gallery.settings, tmp_path / "backup")
    assert (manifest.events, manifest.files, manifest.deleted_meanwhile) == (1, 1, 2)
    assert sorted(manifest.examples) == sorted(f"{e.device}/{e.id}" for e in (with_thumbnail, deleted))
    assert [p.name for p in (tmp_path / "backup" / "media").rglob("*") if p.is_file()] == [kept.id]
    after = snapshot(gallery, principal)
    with restored(gallery, tmp_path / "backup") as copy:
        if copy.db.engine.dialect.name == "sqlite":  # left out of the copy, counters with them
            assert snapshot(copy, principal) == after
        else:  # a dump cannot be edited: named in backup.json, and reported as missing media
            findings = Reconciler(copy, grace_seconds=0).run_once()
            assert findings.missing_media == 2
            assert sorted(findings.examples) == sorted(manifest.examples)


def test_it_refuses_a_folder_in_use_and_touches_nothing(gallery, principal, tmp_path):
    fill(gallery, principal)
    used = tmp_path / "used"
    used.mkdir()
    (used / "mine.txt").write_text("keep me")
    with pytest.raises(BackupRefused, match="not an empty folder"):
        backup(gallery.settings, used)
    assert [p.name for p in used.iterdir()] == ["mine.txt"]
    (tmp_path / "empty").mkdir()  # an empty folder is taken
    assert backup(gallery.settings, tmp_path / "empty").events == 3


def test_a_failed_backup_leaves_nothing(gallery, principal, tmp_path):
    [first, *_] = fill(gallery, principal)
    media = gallery.storage.media_path(first.device, first.id)
    media.unlink()
    media.mkdir()  # what is there cannot be taken
    with pytest.raises(OSError):
        backup(gallery.settings, tmp_path / "backup")
    assert not (tmp_path / "backup").exists()


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
