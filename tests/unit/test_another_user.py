"""`gallery verify`, `gallery backup` and `gallery restore` run by a user who may not read the
media files (they are 0640, the server's own) or the backup: each says so and what to do, exit
status 2 or 1, and leaves nothing behind, instead of reporting every file damaged or copying half
a backup. The commands run as `nobody` (setpriv), so this needs root; the database is PostgreSQL,
which `nobody` reaches over TCP (a SQLite file would need the server's permissions to be opened
at all)."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest
from sqlmodel import SQLModel

from gallery_server.backup import backup
from gallery_server.db import Database
from gallery_server.service import Gallery
from gallery_server.settings import Settings, write_secret_file
from gallery_server.storage import Storage

from ..conftest import make_settings
from .test_service import PNG, store

NOBODY = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="runs a command as another user: needs root and setpriv")


@pytest.fixture
def shared(postgres_url: str, principal) -> Iterator[tuple[Gallery, pathlib.Path]]:  # type: ignore[no-untyped-def]
    """A gallery whose data folder others may enter (pytest's own temporary folders are root's
    alone), with two stored events, and a folder `nobody` may write to."""
    root = pathlib.Path(tempfile.mkdtemp(prefix="gallery-other-user-"))
    try:
        root.chmod(0o755)
        (root / "data").mkdir()
        (root / "out").mkdir(mode=0o777)
        (root / "out").chmod(0o777)
        settings = make_settings(root / "data", postgres_url)
        write_secret_file(root / "data", "s" * 48)  # 0600, as `gallery run` makes it: not for them
        db = Database(settings.database_url, pool_size=2)
        db.create_tables()
        gallery = Gallery(settings, db, Storage(settings.data_dir))
        for i in range(2):
            store(gallery, principal, "cam1", PNG + bytes([i]), name=f"{i}.png")
        # Folders others may enter and list (the servers make them 0750): only the files, 0640, are not theirs.
        for folder in (settings.data_dir, gallery.storage.media_root, gallery.storage.media_root / "cam1"):
            folder.chmod(0o755)
        yield gallery, root / "out"
        SQLModel.metadata.drop_all(db.engine)  # the session's database is shared: leave it empty
        db.dispose()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def as_nobody(gallery: Gallery | Settings, *args: str) -> subprocess.CompletedProcess[str]:
    settings = gallery if isinstance(gallery, Settings) else gallery.settings
    env = {k: v for k, v in os.environ.items() if not k.startswith("GALLERY_")}
    env |= {"GALLERY_DATA_DIR": str(settings.data_dir), "GALLERY_DATABASE_URL": settings.database_url,
            "HOME": "/tmp"}
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                           sys.executable, "-m", "gallery_server", *args],
                          env=env, capture_output=True, text=True, timeout=120, cwd="/tmp")


def test_verify_by_a_user_who_may_not_read_the_files_says_so(shared):  # type: ignore[no-untyped-def]
    gallery, _ = shared
    result = as_nobody(gallery, "verify")
    assert result.returncode == 2, result.stderr
    assert "run `gallery verify` as the server's user or group" in result.stderr
    assert "stored media file damaged" not in result.stderr  # not one false alarm
    assert result.stdout == ""


@pytest.mark.parametrize(("copy", "says"), [
    (False, "run as the files' owner, or take copies with --copy"),  # fs.protected_hardlinks
    (True, "run `gallery backup` as the server's user or group"),
])
def test_backup_by_a_user_who_may_not_read_the_files_says_so(shared, copy, says):  # type: ignore[no-untyped-def]
    gallery, out = shared
    destination = out / "backup"
    result = as_nobody(gallery, "backup", str(destination), *(["--copy"] if copy else []))
    assert result.returncode == 1, result.stderr
    assert says in result.stderr and "nothing kept" in result.stderr, result.stderr
    assert not destination.exists()
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("copy", [False, True])
def test_backup_by_a_user_who_may_not_list_the_folders_says_so(shared, copy):  # type: ignore[no-untyped-def]
    """The servers' folders are 0750: another user cannot even list them."""
    gallery, out = shared
    gallery.storage.media_root.chmod(0o750)
    result = as_nobody(gallery, "backup", str(out / "backup"), *(["--copy"] if copy else []))
    assert result.returncode == 1, result.stderr
    assert f"cannot list {gallery.storage.media_root}: run `gallery backup` as the server's user or group" \
        in result.stderr and "nothing kept" in result.stderr, result.stderr
    assert list(out.iterdir()) == []


def test_the_same_backup_by_the_servers_user_works(shared):  # type: ignore[no-untyped-def]
    gallery, out = shared
    env = {k: v for k, v in os.environ.items() if not k.startswith("GALLERY_")}
    env |= {"GALLERY_DATA_DIR": str(gallery.settings.data_dir), "GALLERY_DATABASE_URL": gallery.settings.database_url}
    result = subprocess.run([sys.executable, "-m", "gallery_server", "backup", str(out / "backup")], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["events"] == 2


def test_restore_by_a_user_who_may_not_read_the_backup_says_so(shared):  # type: ignore[no-untyped-def]
    gallery, out = shared
    backup(gallery.settings, out / "backup")
    (out / "backup").chmod(0o755)  # its files stay 0640, its secret 0600: the taker's
    restored = make_settings(out / "restored", gallery.settings.database_url)
    result = as_nobody(restored, "restore", str(out / "backup"))
    assert result.returncode == 2, result.stderr
    assert "run `gallery restore` as a user who may read the backup" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert sorted(p.name for p in out.iterdir()) == ["backup"]
