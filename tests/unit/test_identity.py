"""A data folder and a database are one gallery's (identity.py): a server whose folder names one
gallery and whose database another, or none, does not start; the tools refuse them too."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import threading

import pytest
import sqlalchemy as sa

from gallery_server import identity
from gallery_server.db import Database


@pytest.fixture
def db(database_url: str):  # type: ignore[no-untyped-def]
    database = Database(database_url, pool_size=4)
    database.create_tables()
    yield database
    database.dispose()


def test_a_new_gallery_gets_one_id_in_both_and_keeps_it(db: Database, tmp_path: pathlib.Path) -> None:
    gallery_id = identity.settle(db.engine, tmp_path)
    assert len(gallery_id) == 32
    assert (tmp_path / identity.FILE_NAME).read_text() == gallery_id + "\n"
    with db.engine.connect() as connection:
        assert connection.execute(sa.text("SELECT gallery_id FROM gallery_identity")).scalars().all() == [gallery_id]
    assert identity.settle(db.engine, tmp_path) == gallery_id  # the next start
    assert identity.mismatch(db.engine, tmp_path) is None
    assert not list(tmp_path.glob(f".{identity.FILE_NAME}.*"))  # no part file left


def test_a_folder_of_a_gallery_beside_a_database_of_none_is_refused(db: Database, tmp_path: pathlib.Path) -> None:
    """A mistyped GALLERY_DATABASE_URL: a new database beside a full folder."""
    (tmp_path / identity.FILE_NAME).write_text("a" * 32 + "\n")
    with pytest.raises(identity.NotThisGallery, match=r"holds gallery a{32}'s files, and GALLERY_DATABASE_URL is no"
                                                      r" gallery's \(it holds no gallery id\)"):
        identity.settle(db.engine, tmp_path)
    with db.engine.connect() as connection:  # nothing written
        assert connection.execute(sa.text("SELECT count(*) FROM gallery_identity")).scalar_one() == 0
    said = identity.mismatch(db.engine, tmp_path) or ""
    assert "is no gallery's" in said and f"remove {tmp_path / identity.FILE_NAME}: the next start writes" in said


def test_an_unreadable_id_is_one_line_not_a_traceback(db: Database, tmp_path: pathlib.Path) -> None:
    (tmp_path / identity.FILE_NAME).write_bytes(b"\xff\xfe\n")
    with pytest.raises(identity.NotThisGallery, match="cannot read the gallery id in"):
        identity.settle(db.engine, tmp_path)
    assert (identity.mismatch(db.engine, tmp_path) or "").startswith("cannot read the gallery id in")


def test_a_folder_of_another_gallery_is_refused(db: Database, tmp_path: pathlib.Path) -> None:
    """A replica restarted on a restored copy of the data folder, beside the live database."""
    live, copy = tmp_path / "live", tmp_path / "copy"
    live.mkdir(), copy.mkdir()
    gallery_id = identity.settle(db.engine, live)
    (copy / identity.FILE_NAME).write_text("b" * 32 + "\n")
    with pytest.raises(identity.NotThisGallery) as refused:
        identity.settle(db.engine, copy)
    assert f"holds gallery {'b' * 32}'s files, and GALLERY_DATABASE_URL is gallery {gallery_id}'s" in str(refused.value)
    assert f"write {gallery_id} into {copy / identity.FILE_NAME}" in str(refused.value)
    assert (copy / identity.FILE_NAME).read_text() == "b" * 32 + "\n"
    assert identity.mismatch(db.engine, copy) == str(refused.value)


def test_a_folder_without_an_id_takes_the_databases(db: Database, tmp_path: pathlib.Path) -> None:
    """An upgraded gallery's, or a new replica's folder: the readiness check says whether it holds
    the gallery's files."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    gallery_id = identity.settle(db.engine, first)
    assert identity.mismatch(db.engine, second) is None
    assert identity.settle(db.engine, second) == gallery_id
    assert (second / identity.FILE_NAME).read_text() == gallery_id + "\n"


def test_servers_starting_at_once_agree_on_one_id(database_url: str, tmp_path: pathlib.Path) -> None:
    databases = [Database(database_url, pool_size=1) for _ in range(4)]
    databases[0].create_tables()
    barrier = threading.Barrier(len(databases))
    settled: list[str] = []

    def start(database: Database) -> None:
        barrier.wait()
        settled.append(identity.settle(database.engine, tmp_path))

    threads = [threading.Thread(target=start, args=(database,)) for database in databases]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
    finally:
        for database in databases:
            database.dispose()
    assert len(settled) == 4 and len(set(settled)) == 1
    assert (tmp_path / identity.FILE_NAME).read_text() == settled[0] + "\n"


def test_a_database_of_an_earlier_release_is_no_mismatch_until_a_folder_names_a_gallery(
    tmp_path: pathlib.Path,
) -> None:
    """`gallery verify` creates no table: a database no server of this release started on yet."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'old.db'}")
    with engine.begin() as connection:
        connection.execute(sa.text("CREATE TABLE events (id TEXT)"))
    try:
        assert identity.mismatch(engine, tmp_path) is None
        (tmp_path / identity.FILE_NAME).write_text("c" * 32 + "\n")
        assert "is no gallery's" in (identity.mismatch(engine, tmp_path) or "")
    finally:
        engine.dispose()


def test_verify_and_reconcile_refuse_a_folder_of_another_gallery(db: Database, database_url: str,
                                                                 tmp_path: pathlib.Path) -> None:
    identity.settle(db.engine, tmp_path)
    (tmp_path / identity.FILE_NAME).write_text("d" * 32 + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GALLERY_")}
    env |= {"GALLERY_DATA_DIR": str(tmp_path), "GALLERY_DATABASE_URL": database_url}
    for command in ("verify", "reconcile"):
        result = subprocess.run([sys.executable, "-m", "gallery_server", command], env=env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, (command, result.stderr)
        assert f"holds gallery {'d' * 32}'s files" in result.stderr and result.stdout == ""
