"""`gallery restore` on both databases (the `gallery` fixture runs on SQLite and PostgreSQL): a
backup becomes the same gallery in a new data folder and database, never over an existing one;
its links leave the backup as it was whatever the restored gallery does; a restore that fails or
is stopped leaves nothing, in the folder or in the database. (test_backup.py restores each of its
backups this way too.)"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest
import sqlalchemy as sa

from gallery_server import cli
from gallery_server import restore as restore_module
from gallery_server.backup import backup
from gallery_server.reconcile import Reconciler
from gallery_server.restore import RestoreRefused, restore
from gallery_server.settings import RESTORE_IN_PROGRESS, Settings

from ..conftest import JWT_SECRET, make_settings, random_bytes, small_disk
from .test_backup import ANNOUNCED, GRANTED, _running, fill, new_database, restored, snapshot
from .test_service import PNG, store


@pytest.fixture
def backed_up(gallery, principal, tmp_path):  # type: ignore[no-untyped-def]
    """A backup of a filled gallery, its secret the data folder's: (folder, what users saw then)."""
    fill(gallery, principal)
    (gallery.settings.data_dir / "jwt-secret").write_text(JWT_SECRET + "\n")
    backup(dataclasses.replace(gallery.settings, secret_file=True), tmp_path / "backup")
    return tmp_path / "backup", snapshot(gallery, principal)


def postgres(gallery) -> bool:  # type: ignore[no-untyped-def]
    return gallery.db.engine.dialect.name == "postgresql"


def test_a_restore_is_the_gallery_at_the_backup(gallery, principal, backed_up):
    folder, before = backed_up
    manifest = json.loads((folder / "backup.json").read_text())
    with restored(gallery, folder) as copy:
        result = copy.restored
        assert snapshot(copy, principal) == before
        assert (result.events, result.files, result.linked, result.copied, result.bytes_copied) == (4, 6, 6, 0, 0)
        assert (result.missing_files, result.examples, result.deleted, result.secret) == (0, [], [], True)
        assert (result.snapshot, result.database, result.backup) == (manifest["snapshot"], manifest["database"],
                                                                     str(folder))
        data = copy.settings.data_dir
        expected = ["gallery.db", "jwt-secret", "media"] if not postgres(gallery) else ["jwt-secret", "media"]
        made_by_the_server = {"gallery", "staging", "gallery.db-wal", "gallery.db-shm"}  # once it runs on it
        restored_files = [p for p in data.iterdir() if p.name not in made_by_the_server]
        assert sorted(p.name for p in restored_files) == expected  # no marker left
        assert (data / "jwt-secret").read_text().strip() == JWT_SECRET
        modes = {p.name: p.stat().st_mode & 0o777 for p in restored_files}
        assert modes == {name: mode for name, mode in {"gallery.db": 0o640, "jwt-secret": 0o600, "media": 0o750}.items()
                         if name in expected}
        assert data.stat().st_mode & 0o777 == 0o750
        assert (data / "media" / "cam1" / (ANNOUNCED + ".thumb")).read_bytes() == b"announced thumb"
        assert (data / "media" / "cam2" / (GRANTED + ".thumb")).read_bytes() == b"granted thumb"
        for backed in (folder / "media").rglob("*"):  # hard links: the backup's own files, no space spent
            if backed.is_file():
                assert os.stat(data / "media" / backed.relative_to(folder / "media")).st_ino == backed.stat().st_ino
        findings = Reconciler(copy, grace_seconds=0).run_once()
    assert (findings.rows_checked, findings.missing_media, findings.size_mismatch) == (3, 0, 0)
    assert findings.orphan_media_removed == findings.orphan_thumbnails_removed == 0


def test_what_a_restored_gallery_does_leaves_the_backup_as_it_was(gallery, principal, backed_up):
    """Deletes, new uploads and a replaced thumbnail in the restored gallery: a second restore of
    the same backup is still the gallery at the backup."""
    folder, before = backed_up
    with restored(gallery, folder) as first:
        for device in ("cam1", "cam2"):
            for event in first.list_events(principal, device):
                if event.state == "stored" and event.has_thumbnail:  # replaced, as a device's thumbnail is
                    first.storage.thumbnail_path(device, event.id).unlink()
                    first.storage.thumbnail_path(device, event.id).write_bytes(b"another thumbnail")
                first.delete_event(principal, device, event.id)
        store(first, principal, "cam1", PNG + b"new", name="new.png")
    with restored(gallery, folder) as second:
        assert snapshot(second, principal) == before
        assert Reconciler(second, grace_seconds=0).run_once().missing_media == 0


def test_copy_restores_files_of_their_own(gallery, principal, backed_up):
    folder, before = backed_up
    with restored(gallery, folder, copy=True) as copy:
        result = copy.restored
        assert (result.files, result.linked, result.copied) == (6, 0, 6)
        total = sum(p.stat().st_size for p in (folder / "media").rglob("*") if p.is_file())
        assert result.bytes_copied == total
        assert snapshot(copy, principal) == before
        for backed in (folder / "media").rglob("*"):
            if backed.is_file():
                mine = copy.settings.data_dir / "media" / backed.relative_to(folder / "media")
                assert mine.stat().st_ino != backed.stat().st_ino and mine.read_bytes() == backed.read_bytes()
                assert mine.stat().st_mode & 0o777 == backed.stat().st_mode & 0o777


def test_files_the_backup_lacks_are_named_and_the_rest_restored(gallery, principal, backed_up, caplog):
    folder, before = backed_up
    stored = [e for e in (gallery.list_events(principal, "cam2")) if e.state == "stored"]
    (folder / "media" / "cam2" / stored[0].id).unlink()
    cam1 = sorted(e.id for e in gallery.list_events(principal, "cam1") if e.state == "stored")
    (folder / "media" / "cam1" / cam1[0]).write_bytes(b"cut short")  # a partial rsync
    with caplog.at_level(logging.WARNING), restored(gallery, folder) as copy:
        result = copy.restored
        assert (result.events, result.files, result.missing_files) == (4, 5, 2)
        assert sorted(result.examples) == sorted([f"cam2/{stored[0].id}", f"cam1/{cam1[0]}"])
    assert any("lacks files its database names" in r.getMessage() for r in caplog.records)


def test_it_never_restores_over_a_gallery(gallery, principal, backed_up, tmp_path):
    folder, _ = backed_up
    used = tmp_path / "used"
    used.mkdir()
    (used / "mine.txt").write_text("keep me")
    with pytest.raises(RestoreRefused, match="is not empty: a restore makes a new gallery"):
        restore(make_settings(used, gallery.settings.database_url), folder)
    assert [p.name for p in used.iterdir()] == ["mine.txt"]
    # The live database: on PostgreSQL it has tables; on SQLite its file is there.
    refusal = "already has tables" if postgres(gallery) else "a database is already at"
    with pytest.raises(RestoreRefused, match=refusal):
        restore(make_settings(tmp_path / "new", gallery.settings.database_url), folder)
    assert not (tmp_path / "new").exists()
    for inside in (folder / "data", folder.parent):  # overlapping the backup
        with pytest.raises(RestoreRefused, match="overlap"):
            restore(make_settings(inside, gallery.settings.database_url), folder)
    assert not (folder / "data").exists()
    assert snapshot(gallery, principal)  # the live gallery still answers


def test_it_restores_only_a_finished_backup_of_its_kind(gallery, principal, backed_up, tmp_path):
    folder, _ = backed_up
    manifest = (folder / "backup.json").read_text()
    with new_database(gallery) as database_url:
        settings = make_settings(tmp_path / "new", database_url)
        (folder / "backup.json").unlink()  # a backup stopped by kill -9 has no manifest
        with pytest.raises(RestoreRefused, match="holds no finished backup"):
            restore(settings, folder)
        (folder / "backup.json").write_text(json.dumps(json.loads(manifest) | {"deleted_meanwhile": ["cam1/../x"]}))
        with pytest.raises(RestoreRefused, match="deleted_meanwhile holds 'cam1/../x'"):
            restore(settings, folder)
        (folder / "backup.json").write_text(manifest)
        # The other database: a backup restores into its own kind.
        wrong = make_settings(tmp_path / "new", "" if postgres(gallery) else "postgresql+psycopg://nobody@127.0.0.1/x")
        kind = "PostgreSQL" if postgres(gallery) else "SQLite"
        with pytest.raises(RestoreRefused, match=f"is a backup of a gallery on {kind}: restore it into"):
            restore(wrong, folder)
        assert not (tmp_path / "new").exists()
        assert restore(settings, folder).events == 4  # the same settings, once the backup is whole


def test_a_missing_database_or_pg_restore_is_refused(gallery, principal, backed_up, tmp_path, monkeypatch):
    if not postgres(gallery):
        pytest.skip("pg_restore and a database to make: PostgreSQL's")
    folder, _ = backed_up
    absent = sa.make_url(gallery.settings.database_url).set(database=f"gallery_absent_{uuid.uuid4().hex[:8]}")
    settings = make_settings(tmp_path / "new", absent.render_as_string(hide_password=False))
    with pytest.raises(RestoreRefused, match=r"cannot reach the database .* make it first \(createdb\)"):
        restore(settings, folder)
    with new_database(gallery) as database_url:
        monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))
        with pytest.raises(RestoreRefused, match="pg_restore not found"):
            restore(make_settings(tmp_path / "new", database_url), folder)
    assert not (tmp_path / "new").exists()


def _schema_objects(database_url: str) -> list[str]:
    """The tables, functions and sequences of a database's public schema."""
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as connection:
            return sorted(connection.exec_driver_sql(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' UNION ALL"
                " SELECT proname FROM pg_proc WHERE pronamespace = 'public'::regnamespace UNION ALL"
                " SELECT sequencename FROM pg_sequences WHERE schemaname = 'public'").scalars())
    finally:
        engine.dispose()


@pytest.mark.parametrize("when", ["database", "media", "secret"])
def test_a_failed_restore_leaves_nothing(gallery, principal, backed_up, tmp_path, monkeypatch, when):
    """Whatever step fails, after the database was restored or not: no data folder, and an empty
    database again (on PostgreSQL, the restored tables, functions and sequences dropped, the
    schema's own kept), which then takes the same restore."""
    folder, before = backed_up
    with new_database(gallery) as database_url:
        settings = make_settings(tmp_path / "new", database_url)
        if database_url:
            engine = sa.create_engine(database_url)
            with engine.begin() as connection:  # not the restore's: must stay
                connection.exec_driver_sql("CREATE FUNCTION operators_own() RETURNS int LANGUAGE sql AS 'SELECT 1'")
            engine.dispose()

        def fails(*args, **kwargs):  # type: ignore[no-untyped-def]
            raise OSError(28, "No space left on device")

        step = {"database": "_check_sqlite" if not database_url else "_look_for_named_files",
                "media": "_restore_media", "secret": "_restore_secret"}[when]
        monkeypatch.setattr(restore_module, step, fails)
        with pytest.raises(OSError, match="No space left"):
            restore(settings, folder)
        assert not settings.data_dir.exists()
        if database_url:
            assert _schema_objects(database_url) == ["operators_own"]
        monkeypatch.undo()
        assert restore(settings, folder).files == 6
    with restored(gallery, folder) as copy:
        assert snapshot(copy, principal) == before


def test_a_restore_into_an_empty_folder_it_did_not_make_leaves_it_empty(gallery, principal, backed_up, tmp_path,
                                                                        monkeypatch):
    folder, _ = backed_up
    given = tmp_path / "given"
    given.mkdir(mode=0o700)
    monkeypatch.setattr(restore_module, "_restore_media", lambda *a: (_ for _ in ()).throw(OSError(5, "I/O")))
    with new_database(gallery) as database_url, pytest.raises(OSError):
        restore(make_settings(given, database_url), folder)
    assert list(given.iterdir()) == []


def test_a_damaged_sqlite_database_fails_the_restore(gallery, principal, backed_up, tmp_path):
    if postgres(gallery):
        pytest.skip("SQLite's database file")
    folder, _ = backed_up
    database = folder / "gallery.db"
    size = database.stat().st_size
    with open(database, "r+b") as f:  # every page but the first (the header) overwritten
        f.seek(4096)
        f.write(b"\xff" * (size - 4096))
    with pytest.raises(Exception, match="malformed|damaged|not a database"):
        restore(make_settings(tmp_path / "new"), folder)
    assert not (tmp_path / "new").exists()


def test_a_copy_that_cannot_fit_is_refused_before_it_starts(gallery, principal, tmp_path):
    store(gallery, principal, "cam1", random_bytes(3 << 20), name="big.bin")
    backup(gallery.settings, tmp_path / "backup")
    with small_disk(tmp_path / "disk", "2m") as disk, new_database(gallery) as database_url:
        settings = make_settings(disk / "data", database_url, min_free_bytes=0)
        with pytest.raises(OSError, match="no room to copy"):
            restore(settings, tmp_path / "backup")  # another filesystem: copies
        assert not (disk / "data").exists()


def cli_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GALLERY_")}
    return env | {"GALLERY_DATA_DIR": str(settings.data_dir), "GALLERY_DATABASE_URL": settings.database_url} | extra


def test_the_command_prints_what_it_restored_and_servers_wait_for_it(gallery, principal, backed_up, tmp_path):
    folder, _ = backed_up
    with new_database(gallery) as database_url:
        settings = make_settings(tmp_path / "new", database_url)
        command = [sys.executable, "-m", "gallery_server", "restore", str(folder)]
        result = subprocess.run(command, env=cli_env(settings), capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        printed = json.loads(result.stdout)
        assert list(printed) == ["backup", "snapshot", "database", "events", "files", "linked", "copied",
                                 "bytes_copied", "secret", "deleted", "missing_files", "examples", "seconds"]
        assert (printed["events"], printed["files"], printed["secret"]) == (4, 6, True)
        again = subprocess.run(command, env=cli_env(settings), capture_output=True, text=True, timeout=120)
        assert again.returncode == 2 and "is not empty: a restore makes a new gallery" in again.stderr
        assert "Traceback" not in again.stderr

        # A data folder marked by a restore (one killed by kill -9 here): no command uses it.
        (settings.data_dir / RESTORE_IN_PROGRESS).write_text("4242 on elsewhere\n")
        for args in (["reconcile"], ["verify"], ["backup", str(tmp_path / "b2")], ["serve"]):
            refused = subprocess.run([sys.executable, "-m", "gallery_server", *args], capture_output=True,
                                     text=True, timeout=60, env=cli_env(settings, GALLERY_JWT_SECRET=JWT_SECRET))
            assert refused.returncode == 2, (args, refused.stderr)
            assert "a backup is being restored into it" in refused.stderr and "4242 on elsewhere" in refused.stderr
        assert not (tmp_path / "b2").exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_restore_leaves_nothing(gallery, principal, backed_up, tmp_path, signum):
    """SIGTERM (a service manager, `timeout`) or Ctrl-C while pg_restore runs: it is ended (its
    transaction never commits) and the command removes what it wrote."""
    if not postgres(gallery):
        pytest.skip("a pg_restore that takes its time: PostgreSQL's (SQLite's Ctrl-C: below)")
    folder, _ = backed_up
    slow = tmp_path / "bin"
    slow.mkdir()
    pid_file = tmp_path / "pg_restore.pid"
    (slow / "pg_restore").write_text(  # lists the dump as the real one does, then restores for ever
        f"#!/bin/sh\ncase \"$1\" in --list) exec {shutil.which('pg_restore')} \"$@\";; esac\n"
        f"echo $$ > {pid_file}\nexec sleep 60\n")
    (slow / "pg_restore").chmod(0o755)
    with new_database(gallery) as database_url:
        settings = make_settings(tmp_path / "new", database_url)
        process = subprocess.Popen([sys.executable, "-m", "gallery_server", "restore", str(folder)],
                                   env=cli_env(settings, PATH=f"{slow}:{os.environ['PATH']}"),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while not pid_file.exists() or not pid_file.read_text().strip():
                assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
                time.sleep(0.02)
            assert (settings.data_dir / RESTORE_IN_PROGRESS).exists()
            process.send_signal(signum)
            _, err = process.communicate(timeout=30)
        finally:
            process.kill()
        assert process.returncode == 128 + signum, err
        assert f"nothing restored into {settings.data_dir}" in err and "Traceback" not in err
        assert not settings.data_dir.exists()
        assert _schema_objects(database_url) == []
        restorer = int(pid_file.read_text())
        deadline = time.monotonic() + 10
        while _running(restorer):
            assert time.monotonic() < deadline, "pg_restore outlived the restore"
            time.sleep(0.05)


def test_ctrl_c_leaves_nothing(gallery, principal, backed_up, tmp_path, monkeypatch, capsys):
    folder, _ = backed_up

    def interrupted(*args):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr(restore_module, "_restore_media", interrupted)
    with new_database(gallery) as database_url:
        settings = make_settings(tmp_path / "new", database_url)
        for name, value in cli_env(settings).items():
            monkeypatch.setenv(name, value)
        assert cli.main(["restore", str(folder)]) == 130
        assert f"restore stopped, nothing restored into {settings.data_dir}" in capsys.readouterr().err
        assert not settings.data_dir.exists()
        if database_url:
            assert _schema_objects(database_url) == []


def test_a_jwt_secret_set_elsewhere_is_warned_about(gallery, principal, backed_up, tmp_path, caplog):
    folder, _ = backed_up
    with new_database(gallery) as database_url, caplog.at_level(logging.WARNING):
        settings = dataclasses.replace(make_settings(tmp_path / "new", database_url), jwt_secret="y" * 40)
        assert restore(settings, folder).secret is True
    assert (tmp_path / "new" / "jwt-secret").read_text().strip() == JWT_SECRET
    assert any("GALLERY_JWT_SECRET is not the backup's jwt-secret" in r.getMessage() for r in caplog.records)


def test_a_backup_without_its_secret_restores_without_one(gallery, principal, tmp_path):
    fill(gallery, principal)
    assert backup(gallery.settings, tmp_path / "backup").secret is False  # GALLERY_JWT_SECRET in use
    with new_database(gallery) as database_url:
        assert restore(make_settings(tmp_path / "new", database_url), tmp_path / "backup").secret is False
    assert not (tmp_path / "new" / "jwt-secret").exists()
