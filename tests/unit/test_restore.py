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
import threading
import time
import uuid

import psycopg
import pytest
import sqlalchemy as sa

from gallery_server import cli, identity
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
    identity.settle(gallery.db.engine, gallery.settings.data_dir)  # as its first server did
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
        expected = ["gallery-id", "gallery.db", "jwt-secret", "media"] if not postgres(gallery) else [
            "gallery-id", "jwt-secret", "media"]
        made_by_the_server = {"gallery", "staging", "gallery.db-wal", "gallery.db-shm"}  # once it runs on it
        restored_files = [p for p in data.iterdir() if p.name not in made_by_the_server]
        assert sorted(p.name for p in restored_files) == expected  # no marker left
        assert (data / "jwt-secret").read_text().strip() == JWT_SECRET
        modes = {p.name: p.stat().st_mode & 0o777 for p in restored_files}
        assert modes == {name: mode for name, mode in {"gallery-id": 0o640, "gallery.db": 0o640, "jwt-secret": 0o600,
                                                       "media": 0o750}.items() if name in expected}
        # A gallery of its own: neither it nor the backed-up gallery takes the other's folder.
        with copy.db.engine.connect() as connection:
            restored_id = connection.execute(sa.text("SELECT gallery_id FROM gallery_identity")).scalar_one()
        assert (data / identity.FILE_NAME).read_text() == restored_id + "\n"
        assert restored_id != (gallery.settings.data_dir / identity.FILE_NAME).read_text().strip()
        assert identity.mismatch(copy.db.engine, data) is None
        assert identity.mismatch(gallery.db.engine, data) is not None
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
    # A thumbnail its row names (its size is not known: it was named missing by its path alone).
    [thumbnail] = [e.id for e in gallery.list_events(principal, "cam1") if e.state == "stored" and e.has_thumbnail]
    (folder / "media" / "cam1" / f"{thumbnail}.thumb").unlink()
    with caplog.at_level(logging.WARNING), restored(gallery, folder) as copy:
        result = copy.restored
        assert (result.events, result.files, result.missing_files) == (4, 4, 3)
        assert sorted(result.examples) == sorted([f"cam2/{stored[0].id}", f"cam1/{cam1[0]}",
                                                  f"cam1/{thumbnail}.thumb"])
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
    refusal = "already has tables" if postgres(gallery) else "gallery.db is already there"
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
        for edited, says in (({"deleted_meanwhile": ["cam1/../x"]}, "deleted_meanwhile holds 'cam1/../x'"),
                             ({"deleted_meanwhile": "cam1/evt_x"}, "deleted_meanwhile is 'cam1/evt_x', not what"),
                             ({"deleted_meanwhile": [5]}, "deleted_meanwhile holds 5"),
                             ({"database": "mysql"}, "database is 'mysql', not what"),
                             ({"events": None}, "events is None, not what"),
                             ({"events": True}, "events is True, not what")):
            (folder / "backup.json").write_text(json.dumps(json.loads(manifest) | edited))
            with pytest.raises(RestoreRefused, match=says):
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

        if when == "database":  # the step after the database was restored (PostgreSQL: committed)
            monkeypatch.setattr(restore_module.db_module.Database, "create_tables", fails)
        else:
            monkeypatch.setattr(restore_module, {"media": "_restore_media", "secret": "_restore_secret"}[when], fails)
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
    with pytest.raises(RuntimeError, match="the backup's database is damaged"):
        restore(make_settings(tmp_path / "new"), folder)
    assert not (tmp_path / "new").exists()


def test_a_sqlite_file_outside_the_data_folder(gallery, principal, backed_up, tmp_path, monkeypatch):
    """GALLERY_DATABASE_URL may name a file elsewhere: restored there, removed on failure, and a
    file that appears there meanwhile (another restore's, a server's) is never removed."""
    if postgres(gallery):
        pytest.skip("SQLite's database file")
    folder, before = backed_up
    (tmp_path / "db").mkdir()
    elsewhere = tmp_path / "db" / "gallery.db"
    settings = make_settings(tmp_path / "new", f"sqlite:///{elsewhere}")
    monkeypatch.setattr(restore_module, "_restore_media", lambda *a: (_ for _ in ()).throw(OSError(5, "I/O")))
    with pytest.raises(OSError):
        restore(settings, folder)
    assert list((tmp_path / "db").iterdir()) == [] and not settings.data_dir.exists()
    monkeypatch.undo()

    check_room = restore_module._check_room

    def another_made_it_meanwhile(*args, **kwargs):  # type: ignore[no-untyped-def]
        elsewhere.write_bytes(b"another's database")
        return check_room(*args, **kwargs)

    monkeypatch.setattr(restore_module, "_check_room", another_made_it_meanwhile)
    with pytest.raises(FileExistsError):
        restore(settings, folder)
    assert elsewhere.read_bytes() == b"another's database" and not settings.data_dir.exists()
    monkeypatch.undo()
    elsewhere.unlink()

    assert restore(settings, folder).events == 4
    assert sorted(p.name for p in (tmp_path / "db").iterdir())[0] == "gallery.db"
    assert not (settings.data_dir / "gallery.db").exists()


def test_a_sqlite_backup_left_open_or_a_url_without_a_file_is_refused(gallery, principal, backed_up, tmp_path):
    if postgres(gallery):
        pytest.skip("SQLite's database file")
    folder, _ = backed_up
    for url in ("sqlite://", "sqlite:///:memory:", f"sqlite:///file:{tmp_path}/x.db?mode=rwc&uri=true"):
        with pytest.raises(RestoreRefused, match="name a SQLite file"):
            restore(make_settings(tmp_path / "new", url), folder)
    (folder / "gallery.db-wal").write_bytes(b"pages committed since")
    with pytest.raises(RestoreRefused, match="gallery.db-wal is beside the backup's database"):
        restore(make_settings(tmp_path / "new"), folder)
    assert not (tmp_path / "new").exists()


def test_a_restore_that_finds_fewer_events_than_the_backup_holds_fails(gallery, principal, backed_up, tmp_path):
    """What a dump restored where the servers do not look would give: a database without them."""
    folder, _ = backed_up
    manifest = json.loads((folder / "backup.json").read_text())
    (folder / "backup.json").write_text(json.dumps(manifest | {"events": manifest["events"] + 1}))
    with new_database(gallery) as database_url:
        with pytest.raises(RuntimeError, match="names the files of 4 events, and the backup holds 5"):
            restore(make_settings(tmp_path / "new", database_url), folder)
        assert not (tmp_path / "new").exists()
        if database_url:
            assert _schema_objects(database_url) == []


def test_the_dumps_schemas_are_read_from_its_list(gallery, principal, backed_up):
    if not postgres(gallery):
        pytest.skip("a PostgreSQL dump")
    folder, _ = backed_up
    # Its list names "TABLE public events" and "TABLE DATA public events": one schema.
    schemas, made = restore_module._PostgresTarget("", folder / "gallery.pgdump")._contents()
    assert schemas == ["public"]
    assert {"public.events_count", "public.device_commands_seq_seq"} <= made  # what a leftover would be


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


def test_the_command_prints_what_it_restored_and_servers_refuse_its_folder_meanwhile(
        gallery, principal, backed_up, tmp_path):  # type: ignore[no-untyped-def]
    folder, _ = backed_up
    with new_database(gallery) as database_url:
        settings = make_settings(tmp_path / "new", database_url)
        command = [sys.executable, "-m", "gallery_server", "restore", str(folder)]
        result = subprocess.run(command, env=cli_env(settings), capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        printed = json.loads(result.stdout)
        assert list(printed) == ["backup", "data_dir", "database_url", "snapshot", "database", "events", "files",
                                 "linked", "copied", "bytes_copied", "secret", "deleted", "missing_files",
                                 "examples", "seconds"]
        assert printed["data_dir"] == str(settings.data_dir.resolve())
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
    """SIGTERM (a service manager, `timeout`) or Ctrl-C while the real pg_restore is inside its
    transaction (held there by an event trigger after its first CREATE TABLE): it is ended, its
    tables never commit, and the command removes what it wrote."""
    if not postgres(gallery):
        pytest.skip("pg_restore: PostgreSQL's (SQLite's Ctrl-C: below)")
    folder, _ = backed_up
    wrapper = tmp_path / "bin"
    wrapper.mkdir()
    pid_file = tmp_path / "pg_restore.pid"
    (wrapper / "pg_restore").write_text(f"#!/bin/sh\necho $$ >> {pid_file}\nexec {shutil.which('pg_restore')} \"$@\"\n")
    (wrapper / "pg_restore").chmod(0o755)
    with new_database(gallery) as database_url:
        engine = sa.create_engine(database_url)
        with engine.begin() as connection:  # the operator's own: kept
            connection.exec_driver_sql(
                "CREATE FUNCTION hold_restore() RETURNS event_trigger LANGUAGE plpgsql AS"
                " 'BEGIN PERFORM pg_sleep(30); END'")
            connection.exec_driver_sql("CREATE EVENT TRIGGER hold_restore ON ddl_command_end"
                                       " WHEN TAG IN ('CREATE TABLE') EXECUTE FUNCTION hold_restore()")
        settings = make_settings(tmp_path / "new", database_url)
        process = subprocess.Popen([sys.executable, "-m", "gallery_server", "restore", str(folder)],
                                   env=cli_env(settings, PATH=f"{wrapper}:{os.environ['PATH']}"),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            # Autocommit: pg_stat_activity is read once per transaction.
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
                while not connection.exec_driver_sql(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                        " AND wait_event = 'PgSleep'").scalar_one():
                    assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
                    time.sleep(0.05)
            assert (settings.data_dir / RESTORE_IN_PROGRESS).exists()
            process.send_signal(signum)
            _, err = process.communicate(timeout=30)
        finally:
            process.kill()
            engine.dispose()
        assert process.returncode == 128 + signum, err
        assert f"nothing restored into {settings.data_dir}" in err and "Traceback" not in err
        assert not settings.data_dir.exists()
        assert _schema_objects(database_url) == ["hold_restore"]  # no table of the dump's
        restorer = int(pid_file.read_text().split()[-1])  # the restore's (the first one listed the dump)
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


def test_a_second_signal_does_not_cut_the_removal_short(gallery, principal, tmp_path):
    """An impatient Ctrl-C Ctrl-C (or a service manager's second SIGTERM) while a restore copies
    thousands of files: the first stops it, the second waits for what it wrote to be removed."""
    if postgres(gallery):
        pytest.skip("the copy of many files is the same on both; run once")
    store(gallery, principal, "cam1", PNG, name="a.png")
    backup(gallery.settings, tmp_path / "backup")
    for i in range(3000):  # files the database does not name: copied all the same, and slow enough
        (tmp_path / "backup" / "media" / "cam1" / f"extra{i}").write_bytes(b"x" * 100)
    settings = make_settings(tmp_path / "new")
    process = subprocess.Popen([sys.executable, "-m", "gallery_server", "restore", "--copy", str(tmp_path / "backup")],
                               env=cli_env(settings), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        media = settings.data_dir / "media" / "cam1"
        while not (media.exists() and any(media.iterdir())):
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            time.sleep(0.005)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.005)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    # 143, or killed by the second signal once the command had ended (Python's own exit restores
    # the default handlers): the same $? to a shell.
    assert process.returncode in (128 + signal.SIGTERM, -signal.SIGTERM), err
    assert "restore stopped by SIGTERM" in err and "Traceback" not in err
    assert not settings.data_dir.exists()


def test_a_database_another_restore_holds_or_a_killed_one_left_is_refused(gallery, principal, backed_up, tmp_path):
    if not postgres(gallery):
        pytest.skip("PostgreSQL's")
    folder, _ = backed_up
    with new_database(gallery) as database_url:
        settings = make_settings(tmp_path / "new", database_url)
        engine = sa.create_engine(database_url)
        try:
            with engine.connect() as holder:  # another restore, into another data folder
                holder.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": restore_module._RESTORE_LOCK})
                with pytest.raises(RestoreRefused, match="another `gallery restore` is restoring into this database"):
                    restore(settings, folder)
                holder.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": restore_module._RESTORE_LOCK})
                holder.rollback()
            with engine.begin() as connection:  # what a restore killed by kill -9, its tables dropped, left
                connection.exec_driver_sql("CREATE FUNCTION events_count() RETURNS int LANGUAGE sql AS 'SELECT 1'")
            with pytest.raises(RestoreRefused, match=r"already has objects the backup makes \(public.events_count\)"):
                restore(settings, folder)
        finally:
            engine.dispose()
        assert not settings.data_dir.exists()


def test_what_sqlite_keeps_beside_the_target_or_a_target_in_the_backup_is_refused(gallery, principal, backed_up,
                                                                                 tmp_path):
    if postgres(gallery):
        pytest.skip("SQLite's database file")
    folder, _ = backed_up
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "g.db-wal").write_bytes(b"another database's pages")  # it would be read into the copy
    with pytest.raises(RestoreRefused, match="g.db-wal is already there"):
        restore(make_settings(tmp_path / "new", f"sqlite:///{tmp_path / 'db' / 'g.db'}"), folder)
    assert (tmp_path / "db" / "g.db-wal").read_bytes() == b"another database's pages"
    with pytest.raises(RestoreRefused, match="names a file inside the backup"):
        restore(make_settings(tmp_path / "new", f"sqlite:///{folder / 'new.db'}"), folder)
    assert not (folder / "new.db").exists() and not (tmp_path / "new").exists()


def test_a_backup_whose_database_holds_no_gallery_fails(gallery, principal, backed_up, tmp_path):
    if postgres(gallery):
        pytest.skip("SQLite's database file")
    folder, _ = backed_up
    (folder / "gallery.db").write_bytes(b"")  # an empty file is an empty SQLite database
    with pytest.raises(RuntimeError, match="the backup's database holds no gallery"):
        restore(make_settings(tmp_path / "new"), folder)
    assert not (tmp_path / "new").exists()


def test_the_undo_waits_for_a_commit_pg_restore_had_sent(gallery, principal, backed_up, tmp_path):
    """pg_restore killed as its COMMIT reaches the server (the re-probe's 1 run in 24): the undo
    ends its session before it looks, so a table that commits then is dropped too, or never
    commits. Here the session is held open, its CREATE TABLE not yet committed, as undo starts."""
    if not postgres(gallery):
        pytest.skip("PostgreSQL's")
    folder, _ = backed_up
    with new_database(gallery) as database_url:
        target = restore_module._PostgresTarget(database_url, folder / "gallery.pgdump")
        target.check(make_settings(tmp_path / "new", database_url), folder)
        target.restored = True  # as restore() sets it before pg_restore starts
        url = sa.make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
        session = psycopg.connect(url, application_name=target.session_name)
        session.execute("CREATE TABLE events (id text)")  # pg_restore's, its COMMIT still to come
        committed: list[BaseException | None] = []

        def commit_later() -> None:
            time.sleep(0.5)
            try:
                session.commit()
                committed.append(None)
            except psycopg.Error as exc:
                committed.append(exc)

        late = threading.Thread(target=commit_later)
        late.start()
        target.undo()
        late.join()
        session.close()
        assert _schema_objects(database_url) == []  # ended before its commit: no table
        assert isinstance(committed[0], psycopg.Error)
