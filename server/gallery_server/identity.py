"""Which gallery a database and a data folder belong to: one id, written into both.

A server's data folder and database must be one gallery's. Nothing told them apart before: a
mistyped GALLERY_DATABASE_URL (a new, empty database beside a full folder) started a server that
served and stored into it, and a replica restarted on a stale copy of the data folder (a restored
backup) took its share of the uploads, their rows in the live database and their files where no
other replica looks (black-box reviews, 2026-12-01 and 2026-12-02). Now the first server of a
gallery writes a random id into its database (GalleryIdentity) and its folder (FILE_NAME), and
every server compares the two at start (settle): a server whose folder and database name
different galleries, or whose folder names one while its database names none, does not start.

An upgraded gallery, whose database and folder have no id yet, gets one at its first start, as
does a folder without one beside a database with one (a new replica's folder, or a data folder
that did not mount: the readiness check takes that one out, as before). `gallery restore` makes a
new gallery, with an id of its own (mint): a copy restored for a look is never taken for the live
gallery.
"""

from __future__ import annotations

import os
import pathlib
import secrets

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from . import storage
from .models import GalleryIdentity

FILE_NAME = "gallery-id"
_ROW = "gallery"


class NotThisGallery(Exception):
    """The data folder and the database are not one gallery's."""


def settle(engine: sa.Engine, data_dir: pathlib.Path) -> str:
    """At a server's start: the gallery's id, written where it is missing, or NotThisGallery."""
    in_folder = _folder_id(data_dir)
    with engine.connect() as connection:
        connection.execution_options(sqlite_immediate=True)  # SQLite: the write lock first, as it may write
        with connection.begin():
            in_database = _database_id(connection)
            if in_database is None and in_folder is None:  # a new gallery, or one from before ids
                insert = (postgresql.insert if connection.dialect.name == "postgresql" else sqlite.insert)
                connection.execute(insert(GalleryIdentity).values(name=_ROW, gallery_id=secrets.token_hex(16))
                                   .on_conflict_do_nothing())  # another replica starting at once wins
                in_database = _database_id(connection)
    if (why := _apart(data_dir, in_folder, in_database)) is not None:
        raise NotThisGallery(why)
    assert in_database is not None
    if in_folder is None:
        _write_folder_id(data_dir, in_database, replace=False)
        if (in_folder := _folder_id(data_dir)) != in_database:  # another server wrote another first
            raise NotThisGallery(_apart(data_dir, in_folder, in_database) or "")
    return in_database


def mismatch(engine: sa.Engine, data_dir: pathlib.Path) -> str | None:
    """Why the folder and database are not one gallery's (None: they may be), writing nothing: for
    the tools (`gallery verify`, `reconcile`), which must not act on another gallery's files."""
    try:
        in_folder = _folder_id(data_dir)
    except NotThisGallery as exc:
        return str(exc)
    with engine.connect() as connection:
        # A database of an earlier release, which no server of this one started on yet, has no table.
        named = sa.inspect(connection).has_table(GalleryIdentity.__tablename__) and _database_id(connection)
        return _apart(data_dir, in_folder, named or None)


def mint(engine: sa.Engine, data_dir: pathlib.Path) -> str:
    """A new id for a restored gallery, in its database and its folder (`gallery restore`)."""
    gallery_id = secrets.token_hex(16)
    with engine.begin() as connection:
        connection.execute(sa.delete(GalleryIdentity))
        connection.execute(sa.insert(GalleryIdentity).values(name=_ROW, gallery_id=gallery_id))
    _write_folder_id(data_dir, gallery_id, replace=True)
    return gallery_id


def _apart(data_dir: pathlib.Path, in_folder: str | None, in_database: str | None) -> str | None:
    if in_folder is None or in_folder == in_database:
        return None
    file = data_dir / FILE_NAME
    if in_database:
        held = f"gallery {in_database}'s"
        mend = f"If the database is this folder's gallery, write {in_database} into {file}"
    else:
        held = "no gallery's (it holds no gallery id)"
        mend = (f"If the database is this folder's gallery (one from before gallery ids, restored by hand),"
                f" remove {file}: the next start writes one id into both")
    return (f"GALLERY_DATA_DIR={data_dir} holds gallery {in_folder}'s files, and GALLERY_DATABASE_URL is"
            f" {held}: one of them is not this gallery's (a mistyped setting, a restored copy, a folder"
            f" another database used). {mend}")


def _database_id(connection: sa.Connection) -> str | None:
    return connection.execute(sa.select(GalleryIdentity.gallery_id).where(
        GalleryIdentity.name == _ROW)).scalar_one_or_none()


def _folder_id(data_dir: pathlib.Path) -> str | None:
    try:
        return (data_dir / FILE_NAME).read_text(encoding="ascii").strip() or None
    except FileNotFoundError:
        return None
    except (OSError, UnicodeError) as exc:  # unreadable by this user, or not an id: one line, not a traceback
        raise NotThisGallery(f"cannot read the gallery id in {data_dir / FILE_NAME}: {exc}") from None


def _write_folder_id(data_dir: pathlib.Path, gallery_id: str, *, replace: bool) -> None:
    """Whole or not at all; without `replace`, the first writer's id stays (servers starting at once)."""
    part = data_dir / f".{FILE_NAME}.{secrets.token_hex(6)}"
    with os.fdopen(os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640), "w", encoding="ascii") as f:
        f.write(gallery_id + "\n")  # 0640, as the database's file: the servers' user and group
        f.flush()
        os.fsync(f.fileno())
    try:
        if replace:
            os.replace(part, data_dir / FILE_NAME)
        else:
            try:
                os.link(part, data_dir / FILE_NAME)
            except FileExistsError:
                pass
    finally:
        part.unlink(missing_ok=True)
    storage.fsync_dir(data_dir)
