"""Incoming folders: settling, the naming convention, thumbnails, crash recovery and concurrent replicas.

Every test runs on SQLite and PostgreSQL (the `gallery` fixture), except the small-disk one, whose
SQLite database sits off its tmpfs so that only the importer changes the free space. Scans get explicit clock readings
instead of sleeping: the default settle time is 2 s, so `now=0` then `now=SETTLED` imports a file
that did not change in between.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import hashlib
import logging
import os
import pathlib
import shutil
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from sqlmodel import select

from gallery_server import file_locks, incoming, validation
from gallery_server.db import Database
from gallery_server.incoming import IncomingImporter
from gallery_server.models import Event
from gallery_server.service import Gallery
from gallery_server.storage import Storage

from ..conftest import make_settings, random_bytes, small_disk

DEVICE = "cam1"
SETTLED = 10.0  # well past the default settle time (2 s)
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(64)


@pytest.fixture
def importer(gallery: Gallery) -> IncomingImporter:
    return IncomingImporter(gallery)


@pytest.fixture
def folders(gallery: Gallery) -> tuple[pathlib.Path, pathlib.Path]:
    return gallery.storage.device_paths(DEVICE)


def events(gallery: Gallery, device: str = DEVICE) -> list[Event]:
    with gallery.db.session() as session:
        return sorted(session.exec(select(Event).where(Event.device == device)), key=lambda e: e.created)


def thumbnailed(gallery: Gallery) -> dict[str, bool]:
    return {e.name: e.has_thumbnail for e in events(gallery)}


def write(path: pathlib.Path, data: bytes) -> bytes:
    path.write_bytes(data)
    return data


def settle(importer: IncomingImporter, start: float = 0.0) -> list[str]:
    """Two scans far enough apart for anything unchanged in between to count as complete."""
    return importer.scan_once(now=start) + importer.scan_once(now=start + SETTLED)


@pytest.fixture
def restarted(gallery: Gallery) -> Iterator[Callable[[], IncomingImporter]]:
    """restarted() -> a new importer with its own connection pool: a restarted or another server."""
    databases: list[Database] = []

    def _new() -> IncomingImporter:
        databases.append(Database(gallery.settings.database_url, pool_size=4))
        return IncomingImporter(Gallery(gallery.settings, databases[-1], Storage(gallery.settings.data_dir)))

    yield _new
    for db in databases:
        db.dispose()


def leftovers(gallery: Gallery) -> list[pathlib.Path]:
    """What staging/ holds besides the importer's lock files (one per device, kept)."""
    return sorted(p for p in gallery.storage.staging_root.iterdir() if p.name != incoming.LOCKS_FOLDER)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- settling and the naming convention -----------------------------------------------------------


def test_a_file_is_imported_once_it_has_settled(gallery, importer, folders):
    inbox, _ = folders
    data = write(inbox / "photo.png", PNG + random_bytes(100_000))

    assert importer.scan_once(now=0) == []
    assert importer.scan_once(now=1.5) == []  # seen unchanged for 1.5 s < 2 s
    assert events(gallery) == [] and (inbox / "photo.png").exists()

    [event_id] = importer.scan_once(now=2.0)  # unchanged for the settle time: complete
    [event] = events(gallery)
    assert event.id == event_id
    assert validation.event_id(event_id) == event_id
    assert event.name == "photo.png"
    assert event.media_type == "image"
    assert event.mime_type == "image/png"
    assert event.size == len(data)
    assert event.sha256 == sha(data)
    assert event.has_thumbnail is False
    assert event.metadata_json == '{"source":"incoming"}'
    age = datetime.datetime.now(datetime.UTC).replace(tzinfo=None) - event.created.replace(tzinfo=None)
    assert abs(age) < datetime.timedelta(minutes=1)
    assert gallery.storage.media_path(DEVICE, event_id).read_bytes() == data
    assert not gallery.storage.thumbnail_path(DEVICE, event_id).exists()
    assert list(inbox.iterdir()) == []
    assert leftovers(gallery) == []

    assert settle(importer, 20) == []
    assert len(events(gallery)) == 1


def test_partial_names_dotfiles_symlinks_and_folders_are_never_imported(gallery, importer, folders, tmp_path):
    inbox, _ = folders
    outside = write(tmp_path / "secret.txt", b"not for the gallery")
    names = [".hidden.jpg", "clip.mp4.part", "clip.mp4.tmp", "clip.mp4~", ".clip.mp4.Xa81kq"]
    for name in names:
        write(inbox / name, random_bytes(1000))
    (inbox / "link.txt").symlink_to(tmp_path / "secret.txt")
    (inbox / "sub").mkdir()
    write(inbox / "sub" / "nested.jpg", random_bytes(1000))

    assert settle(importer) == []
    assert settle(importer, 100) == []
    assert events(gallery) == []
    assert sorted(p.name for p in inbox.iterdir()) == sorted([*names, "link.txt", "sub"])
    assert (inbox / "sub" / "nested.jpg").exists()
    assert (tmp_path / "secret.txt").read_bytes() == outside

    # The convention: write under a partial name, rename when complete.
    data = (inbox / "clip.mp4.part").read_bytes()
    (inbox / "clip.mp4.part").rename(inbox / "clip.mp4")
    [event_id] = settle(importer, 200)
    assert gallery.storage.media_path(DEVICE, event_id).read_bytes() == data
    assert [e.name for e in events(gallery)] == ["clip.mp4"]

    # A folder is not media waiting in incoming: a thumbnail of its stem attaches to the event.
    (inbox / "clip").mkdir()
    thumb = write(folders[1] / "clip.jpg", PNG)
    settle(importer, 300)
    assert gallery.storage.thumbnail_path(DEVICE, event_id).read_bytes() == thumb


def test_a_growing_file_waits_until_it_stops_growing_and_holds_up_no_other(gallery, importer, folders):
    inbox, _ = folders
    first, rest = random_bytes(50_000), random_bytes(70_000)
    write(inbox / "video.mp4", first)
    done = write(inbox / "done.jpg", random_bytes(1000))
    assert importer.scan_once(now=0) == []
    with (inbox / "video.mp4").open("ab") as f:
        f.write(rest)
    os.utime(inbox / "video.mp4", ns=(time.time_ns(), time.time_ns() + 1_000_000))  # coarse mtime clocks
    [done_id] = importer.scan_once(now=3)  # changed: the settle time starts again; the settled file goes on
    assert gallery.storage.media_path(DEVICE, done_id).read_bytes() == done
    assert importer.scan_once(now=4.5) == []
    [event_id] = importer.scan_once(now=5.5)
    [event] = [e for e in events(gallery) if e.id == event_id]
    assert event.size == len(first + rest)
    assert event.sha256 == sha(first + rest)
    assert gallery.storage.media_path(DEVICE, event_id).read_bytes() == first + rest


def test_only_incoming_folders_of_valid_devices_are_scanned(gallery, importer, caplog):
    drop = gallery.storage.drop_root
    for folder in (drop / "-bad" / "incoming", drop / "cam1" / "elsewhere", drop / ".x" / "incoming"):
        folder.mkdir(parents=True)
        write(folder / "a.jpg", random_bytes(100))
    write(drop / "stray.jpg", random_bytes(100))
    (drop / "cam2").mkdir()
    write(drop / "cam2" / "incoming", random_bytes(100))  # a file, not a folder: nothing to report
    with caplog.at_level(logging.WARNING):
        assert settle(importer) == []
    assert events(gallery) == []
    assert [r.getMessage() for r in caplog.records if r.name == "gallery_server.incoming"] == []
    shutil.rmtree(drop)  # no drop folders at all: nothing to scan, and no error
    assert settle(importer, 100) == []


def test_empty_files_and_bad_names_stay_and_are_reported_once(gallery, importer, folders, caplog):
    inbox, _ = folders
    write(inbox / "empty.jpg", b"")
    write(inbox / "bad\x01name.jpg", random_bytes(100))
    data = write(inbox / "good.jpg", random_bytes(100))
    [event_id] = settle(importer)
    assert gallery.storage.media_path(DEVICE, event_id).read_bytes() == data
    assert sorted(p.name for p in inbox.iterdir()) == ["bad\x01name.jpg", "empty.jpg"]
    assert importer.scan_once(now=30) == []
    warnings = [r for r in caplog.records if r.name == "gallery_server.incoming" and r.levelname == "WARNING"]
    assert sorted(r.file for r in warnings) == ["bad\x01name.jpg", "empty.jpg"]  # not again on later scans


def test_files_up_to_the_size_limits_are_imported_and_larger_or_empty_ones_stay(gallery, folders):
    limits = dataclasses.replace(gallery.settings, max_upload_bytes=1000, max_thumbnail_bytes=100)
    importer = IncomingImporter(Gallery(limits, gallery.db, gallery.storage))
    inbox, thumbs = folders
    media = write(inbox / "fits.bin", random_bytes(1000))
    thumb = write(thumbs / "fits.png", random_bytes(100))
    write(inbox / "over.bin", random_bytes(1001))
    write(inbox / "big.bin", random_bytes(10))
    write(thumbs / "big.png", random_bytes(101))
    write(inbox / "blank.bin", random_bytes(10))
    write(thumbs / "blank.png", b"")
    settle(importer)
    imported = {e.name: e for e in events(gallery)}
    assert sorted(imported) == ["big.bin", "blank.bin", "fits.bin"]
    assert gallery.storage.media_path(DEVICE, imported["fits.bin"].id).read_bytes() == media
    assert gallery.storage.thumbnail_path(DEVICE, imported["fits.bin"].id).read_bytes() == thumb
    assert thumbnailed(gallery) == {"fits.bin": True, "big.bin": False, "blank.bin": False}
    assert sorted(p.name for p in inbox.iterdir()) == ["over.bin"]
    assert sorted(p.name for p in thumbs.iterdir()) == ["big.png", "blank.png"]
    settle(importer, 100)  # nor do they attach later
    assert thumbnailed(gallery) == {"fits.bin": True, "big.bin": False, "blank.bin": False}
    assert sorted(p.name for p in thumbs.iterdir()) == ["big.png", "blank.png"]
    late = write(thumbs / "big.png", random_bytes(100))  # one that fits does
    settle(importer, 200)
    assert gallery.storage.thumbnail_path(DEVICE, imported["big.bin"].id).read_bytes() == late


def test_one_failing_file_does_not_hold_up_the_others_and_is_reported_once(
    gallery, importer, folders, monkeypatch, caplog,
):
    inbox, _ = folders
    write(inbox / "a.bin", random_bytes(100))
    write(inbox / "b.bin", random_bytes(100))
    real = IncomingImporter._import

    def flaky(self, device, file, thumb, seen):  # type: ignore[no-untyped-def]
        if file.name == "a.bin":
            raise OSError(errno.EIO, "disk trouble")
        return real(self, device, file, thumb, seen)

    monkeypatch.setattr(IncomingImporter, "_import", flaky)
    with caplog.at_level(logging.ERROR):
        assert len(settle(importer)) == 1
        assert importer.scan_once(now=15) == []
    assert [e.name for e in events(gallery)] == ["b.bin"]
    assert [p.name for p in inbox.iterdir()] == ["a.bin"]
    [report] = [r for r in caplog.records if r.getMessage() == "cannot import an incoming file"]  # not every scan
    assert (report.file, report.exc_info[0]) == ("a.bin", OSError)

    monkeypatch.setattr(IncomingImporter, "_import", real)
    assert len(importer.scan_once(now=20)) == 1
    assert sorted(e.name for e in events(gallery)) == ["a.bin", "b.bin"]


def test_the_same_file_dropped_again_is_not_imported_twice(gallery, importer, folders):
    inbox, _ = folders
    data = write(inbox / "a.jpg", random_bytes(1000))
    [first] = settle(importer)
    write(inbox / "a.jpg", data)  # e.g. a client retrying an upload that did arrive
    assert settle(importer, 100) == []
    assert [e.id for e in events(gallery)] == [first]
    assert list(inbox.iterdir()) == []

    # Same name, other bytes: another event.
    write(inbox / "a.jpg", random_bytes(1000))
    [second] = settle(importer, 200)
    assert second != first
    assert len(events(gallery)) == 2


@pytest.mark.parametrize("how", ["renamed-over", "appended"])
def test_a_file_changed_while_it_is_imported_is_kept_and_imported_next(gallery, importer, folders, monkeypatch, how):
    inbox, _ = folders
    old = write(inbox / "latest.jpg", random_bytes(1000))
    more = random_bytes(1000)
    new = more if how == "renamed-over" else old + more
    real = IncomingImporter._insert

    def insert_then_change(self, event):  # type: ignore[no-untyped-def]
        created = real(self, event)
        if how == "renamed-over":
            write(inbox / "new.part", more)
            os.replace(inbox / "new.part", inbox / "latest.jpg")  # a writer renames a new version in
        else:
            with (inbox / "latest.jpg").open("ab") as writer:  # or goes on writing in place
                writer.write(more)
        return created

    monkeypatch.setattr(IncomingImporter, "_insert", insert_then_change)
    [first] = settle(importer)
    monkeypatch.setattr(IncomingImporter, "_insert", real)
    assert (inbox / "latest.jpg").read_bytes() == new
    [second] = settle(importer, 100)
    stored = {e.id: gallery.storage.media_path(DEVICE, e.id).read_bytes() for e in events(gallery)}
    assert stored == {first: old, second: new}


@pytest.mark.parametrize("how", ["appended", "rewritten-in-place"])
def test_a_file_written_to_while_it_is_copied_waits_to_settle_again(gallery, importer, folders, monkeypatch, how):
    """The writer goes on once the copy has read the file: what was read is not imported."""
    inbox, _ = folders
    first, later = random_bytes(5000), random_bytes(1000 if how == "appended" else 5000)
    final = first + later if how == "appended" else later
    write(inbox / "clip.mp4", first)
    real_read = IncomingImporter._read

    def read_then_write(self, fd, out):  # type: ignore[no-untyped-def]
        monkeypatch.setattr(IncomingImporter, "_read", real_read)
        result = real_read(self, fd, out)
        with (inbox / "clip.mp4").open("ab" if how == "appended" else "r+b") as writer:
            writer.write(later)
        os.utime(inbox / "clip.mp4", ns=(time.time_ns(), time.time_ns() + 1_000_000))  # coarse mtime clocks
        return result

    monkeypatch.setattr(IncomingImporter, "_read", read_then_write)
    assert settle(importer) == []
    assert (events(gallery), leftovers(gallery)) == ([], [])
    [event_id] = settle(importer, 100)
    assert gallery.storage.media_path(DEVICE, event_id).read_bytes() == final
    assert list(inbox.iterdir()) == []


# -- idle folders ---------------------------------------------------------------------------------


def _age(*folders: pathlib.Path, seconds: float = 60) -> int:
    """Give the folders an mtime `seconds` old, as those of a device that dropped nothing lately."""
    then = time.time_ns() - int(seconds * 1e9)
    for folder in folders:
        os.utime(folder, ns=(then, then))
    return then


def test_folders_with_nothing_to_import_are_not_listed_again_until_they_change(
    gallery, importer, folders, monkeypatch,
):
    """Every device that asked its paths has two folders, most of them empty: listing each every
    second cost 8% of a core at 2,000 devices. A folder whose mtime has not moved since a listing
    found it empty is not listed; a file dropped into it moves its mtime."""
    others = [gallery.storage.device_paths(f"quiet-{i}") for i in range(5)]
    _age(*folders, *(f for pair in others for f in pair))
    listed: list[str] = []
    scandir = os.scandir
    monkeypatch.setattr(incoming.os, "scandir", lambda path: listed.append(str(path)) or scandir(path))
    assert importer.scan_once(now=0) == []
    assert len(listed) == 1 + 2 * 6  # the devices' root, then every folder once
    listed.clear()
    assert importer.scan_once(now=1) == []
    assert listed == [str(gallery.storage.drop_root)]
    inbox, _ = folders
    data = write(inbox / "late.mp4", random_bytes(1000))
    [event_id] = importer.scan_once(now=2) + importer.scan_once(now=2 + SETTLED)
    assert gallery.storage.media_path(DEVICE, event_id).read_bytes() == data
    assert str(inbox) in listed


def test_a_folder_changed_lately_is_listed_whatever_its_mtime(gallery, importer, folders):
    """A file timestamp is coarse (a clock tick): an entry made in the same tick as a listing,
    after it, leaves the folder's mtime as it was. A folder whose mtime is that recent is listed
    at every pass."""
    inbox, _ = folders
    assert importer.scan_once(now=0) == []  # empty, with an mtime of just now: not trusted
    mtime = os.stat(inbox).st_mtime_ns
    data = write(inbox / "same-tick.mp4", random_bytes(1000))
    os.utime(inbox, ns=(mtime, mtime))  # as if made within the listing's tick
    [event_id] = importer.scan_once(now=1) + importer.scan_once(now=1 + SETTLED)
    assert gallery.storage.media_path(DEVICE, event_id).read_bytes() == data


def test_a_quiet_folder_is_listed_again_within_a_minute_whatever_its_mtime(gallery, importer, folders):
    """What a clock or a filesystem could hide from the mtime (a network filesystem's server
    behind this one's clock, a file made in the tick of a listing) waits IDLE_RELIST_SECONDS at
    most, not until the folder changes again."""
    inbox, _ = folders
    then = _age(*folders)
    assert importer.scan_once(now=0) == []  # quiet, trusted
    data = write(inbox / "hidden.mp4", random_bytes(1000))
    os.utime(inbox, ns=(then, then))  # the change its mtime did not show
    assert importer.scan_once(now=1) == [] and importer.scan_once(now=1 + SETTLED) == []
    relisted = incoming.IDLE_RELIST_SECONDS
    [event_id] = importer.scan_once(now=relisted) + importer.scan_once(now=relisted + SETTLED)
    assert gallery.storage.media_path(DEVICE, event_id).read_bytes() == data


# -- thumbnails -----------------------------------------------------------------------------------


def test_a_thumbnail_with_the_same_stem_is_attached(gallery, importer, folders):
    inbox, thumbs = folders
    data = write(inbox / "clip.mp4", random_bytes(5000))
    thumb = write(thumbs / "clip.jpg", random_bytes(300))
    write(thumbs / "other.jpg", random_bytes(300))
    [event_id] = settle(importer)
    [event] = events(gallery)
    assert event.has_thumbnail is True
    assert gallery.storage.media_path(DEVICE, event_id).read_bytes() == data
    assert gallery.storage.thumbnail_path(DEVICE, event_id).read_bytes() == thumb
    assert list(inbox.iterdir()) == []
    assert [p.name for p in thumbs.iterdir()] == ["other.jpg"]  # no event of that name: it waits
    assert leftovers(gallery) == []


def test_a_thumbnail_that_cannot_be_placed_leaves_no_copy_behind(gallery, importer, folders, monkeypatch):
    inbox, thumbs = folders
    media = write(inbox / "clip.mp4", random_bytes(3000))
    thumb = write(thumbs / "clip.jpg", PNG)
    real_place = incoming._place

    def place(storage, taken, destination):  # type: ignore[no-untyped-def]
        if destination.suffix == ".thumb":
            raise OSError(errno.EIO, "disk trouble")
        real_place(storage, taken, destination)

    monkeypatch.setattr(incoming, "_place", place)
    assert settle(importer) == []
    assert (events(gallery), leftovers(gallery)) == ([], [])
    assert ((inbox / "clip.mp4").read_bytes(), (thumbs / "clip.jpg").read_bytes()) == (media, thumb)
    monkeypatch.undo()
    [event_id] = settle(importer, 100)
    assert gallery.storage.thumbnail_path(DEVICE, event_id).read_bytes() == thumb


def test_a_thumbnail_arriving_later_is_attached_once_settled(gallery, importer, folders, principal):
    inbox, thumbs = folders
    write(inbox / "clip.mp4", random_bytes(5000))
    [event_id] = settle(importer)
    write(inbox / "other.mp4", random_bytes(1000))
    importer.scan_once(now=90)
    thumb = write(thumbs / "clip.webp", random_bytes(300))
    assert len(importer.scan_once(now=100)) == 1  # other.mp4; the thumbnail has only just appeared
    assert gallery.get_event(principal, DEVICE, event_id).has_thumbnail is False
    assert list(thumbs.iterdir()) == [thumbs / "clip.webp"]
    assert importer.scan_once(now=100 + SETTLED) == []  # attaching is not importing
    assert gallery.get_event(principal, DEVICE, event_id).has_thumbnail is True
    assert gallery.storage.thumbnail_path(DEVICE, event_id).read_bytes() == thumb
    assert list(thumbs.iterdir()) == []
    assert leftovers(gallery) == []


def test_a_thumbnail_still_being_written_does_not_go_with_its_media(gallery, importer, folders):
    """Media settled, its thumbnail only just appeared: the media goes alone, and the thumbnail
    attaches once it has settled in turn (never a half-written one)."""
    inbox, thumbs = folders
    write(inbox / "clip.mp4", random_bytes(5000))
    importer.scan_once(now=0)
    write(thumbs / "clip.jpg", random_bytes(100))
    [event_id] = importer.scan_once(now=SETTLED)
    assert events(gallery)[0].has_thumbnail is False
    assert not gallery.storage.thumbnail_path(DEVICE, event_id).exists()
    thumb = write(thumbs / "clip.jpg", random_bytes(300))  # the writer goes on
    settle(importer, 2 * SETTLED)
    assert events(gallery)[0].has_thumbnail is True
    assert gallery.storage.thumbnail_path(DEVICE, event_id).read_bytes() == thumb


def test_a_late_thumbnail_with_a_decomposed_name_is_attached(gallery, importer, folders):
    """macOS writes names decomposed (NFD: "e" + U+0301); the imported event's name is stored
    composed (NFC), and the thumbnail arriving later still finds it."""
    inbox, thumbs = folders
    write(inbox / "IMG_cafe\u0301.jpg", random_bytes(5000))
    [event_id] = settle(importer)
    assert events(gallery)[0].name == "IMG_caf\u00e9.jpg"
    thumb = write(thumbs / "IMG_cafe\u0301.png", random_bytes(300))
    settle(importer, start=100)
    assert events(gallery)[0].has_thumbnail is True
    assert gallery.storage.thumbnail_path(DEVICE, event_id).read_bytes() == thumb
    assert list(thumbs.iterdir()) == []


def test_media_and_thumbnail_written_differently_pair_up(gallery, importer, folders):
    """Dropped together, one composed and one decomposed, they make one event with its thumbnail."""
    inbox, thumbs = folders
    write(inbox / "IMG_caf\u00e9.jpg", random_bytes(5000))
    thumb = write(thumbs / "IMG_cafe\u0301.png", random_bytes(300))
    [event_id] = settle(importer)
    assert gallery.storage.thumbnail_path(DEVICE, event_id).read_bytes() == thumb
    assert list(thumbs.iterdir()) == []


MiB = 1 << 20


@pytest.fixture
def disk(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    with small_disk(tmp_path / "small-disk", "32m") as mount:
        yield mount


@pytest.fixture
def small_gallery(disk: pathlib.Path, tmp_path: pathlib.Path) -> Iterator[Gallery]:
    """A gallery whose data root is the 32 MiB tmpfs, with 8 MiB of headroom (its database off it)."""
    settings = make_settings(disk / "data", f"sqlite:///{tmp_path / 'gallery.db'}", min_free_bytes=8 * MiB)
    settings.data_dir.mkdir()
    db = Database(settings.database_url, pool_size=2)
    db.create_tables()
    try:
        yield Gallery(settings, db, Storage(settings.data_dir))
    finally:
        db.dispose()


def test_media_with_room_is_imported_and_its_thumbnail_short_of_room_attaches_later(
    disk: pathlib.Path, small_gallery: Gallery
) -> None:
    gallery = small_gallery
    importer = IncomingImporter(gallery)
    inbox, thumbs = gallery.storage.device_paths(DEVICE)
    media = write(inbox / "clip.bin", random_bytes(6 * MiB))
    thumb = write(thumbs / "clip.png", PNG + random_bytes(5 * MiB))
    # 18 MiB free: the media's copy leaves 12 (above the 8 MiB headroom), after which the
    # thumbnail's would leave 7, below it.
    with (disk / "ballast").open("wb") as ballast:
        while (free := gallery.storage.disk_space().free_bytes) > 18 * MiB:
            ballast.write(b"\0" * min(free - 18 * MiB, MiB))
            ballast.flush()

    [event_id] = settle(importer)
    [event] = events(gallery)
    assert (event.has_thumbnail, event.sha256) == (False, hashlib.sha256(media).hexdigest())
    assert not gallery.storage.thumbnail_path(DEVICE, event_id).exists()
    assert [p.name for p in thumbs.iterdir()] == ["clip.png"]  # waits; nothing half-copied
    assert leftovers(gallery) == []

    # The dropped media is gone (its copy is in the store), so there is room for the thumbnail.
    assert importer.scan_once(now=2 * SETTLED) == []
    [event] = events(gallery)
    assert event.has_thumbnail is True
    assert gallery.storage.thumbnail_path(DEVICE, event_id).read_bytes() == thumb
    assert list(thumbs.iterdir()) == []
    assert leftovers(gallery) == []


@pytest.mark.parametrize("full", ["above the headroom", "ENOSPC"])
def test_a_file_short_of_room_is_reported_once_with_the_disk_figures(
    small_gallery: Gallery, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, full: str
) -> None:
    """Refused by the headroom check before copying, or by the disk itself part-way (the check
    passed, then the space went): either way one warning, with the disk's figures of the moment."""
    gallery = small_gallery
    importer = IncomingImporter(gallery)
    inbox, _ = gallery.storage.device_paths(DEVICE)
    media = write(inbox / "clip.bin", random_bytes(20 * MiB))  # leaves ~12 MiB: too little to copy it
    if full == "ENOSPC":
        monkeypatch.setattr(gallery.storage, "require_room_for", lambda size: None)
        monkeypatch.setattr(gallery.storage, "require_space", lambda: None)
    caplog.set_level(logging.WARNING, logger="gallery_server.incoming")
    assert settle(importer) == []
    assert importer.scan_once(now=3 * SETTLED) == []
    [warning] = [r for r in caplog.records if r.name == "gallery_server.incoming"]
    assert "no room on the disk above its headroom" in warning.getMessage()
    free = gallery.storage.disk_space().free_bytes
    assert (warning.size, warning.min_free_bytes) == (len(media), 8 * MiB)  # type: ignore[attr-defined]
    assert free - MiB <= warning.free_bytes <= free + MiB  # type: ignore[attr-defined]
    assert 0 < warning.free_bytes < len(media)  # type: ignore[attr-defined]
    assert (inbox / "clip.bin").read_bytes() == media and events(gallery) == []
    assert leftovers(gallery) == []  # a partial copy is removed


def test_a_copy_stops_at_the_headroom_when_another_writer_takes_the_room_meanwhile(
    disk: pathlib.Path, small_gallery: Gallery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Other writers share the disk: a copy that had room when it began stops at the headroom,
    as an upload does, and the file is imported once there is room again."""
    gallery = small_gallery
    importer = IncomingImporter(gallery)
    inbox, _ = gallery.storage.device_paths(DEVICE)
    media = write(inbox / "clip.bin", random_bytes(10 * MiB))
    room_for = gallery.storage.require_room_for

    def room_for_then_another_writer(size: int) -> None:
        room_for(size)
        with (disk / "ballast").open("wb") as ballast:  # leaves 12 MiB: the copy would leave 2
            while (free := gallery.storage.disk_space().free_bytes) > 12 * MiB:
                ballast.write(b"\0" * min(free - 12 * MiB, MiB))
                ballast.flush()

    monkeypatch.setattr(gallery.storage, "require_room_for", room_for_then_another_writer)
    assert settle(importer) == []
    assert (inbox / "clip.bin").read_bytes() == media and events(gallery) == []
    assert leftovers(gallery) == []  # the partial copy is removed
    monkeypatch.undo()
    (disk / "ballast").unlink()
    [event_id] = importer.scan_once(now=2 * SETTLED)
    assert gallery.storage.media_path(DEVICE, event_id).read_bytes() == media


def test_a_thumbnail_waits_for_its_media_rather_than_joining_an_older_event(gallery, importer, folders):
    inbox, thumbs = folders
    write(inbox / "snap.jpg", random_bytes(500))
    [old] = settle(importer)

    thumb = write(thumbs / "snap.png", random_bytes(300))
    assert importer.scan_once(now=100) == []
    write(inbox / "snap.jpg", random_bytes(500))  # its media arrives later than the thumbnail
    assert importer.scan_once(now=100 + SETTLED) == []  # the thumbnail has settled, the media not
    [new] = importer.scan_once(now=100 + 2 * SETTLED)
    by_id = {e.id: e for e in events(gallery)}
    assert by_id[old].has_thumbnail is False
    assert by_id[new].has_thumbnail is True
    assert gallery.storage.thumbnail_path(DEVICE, new).read_bytes() == thumb
    assert not gallery.storage.thumbnail_path(DEVICE, old).exists()


def test_a_late_thumbnail_joins_the_newest_event_without_one(gallery, importer, folders):
    inbox, thumbs = folders
    write(inbox / "snap.jpg", random_bytes(500))
    [older] = settle(importer)
    write(inbox / "snap.jpg", random_bytes(500))
    [newer] = settle(importer, 100)
    write(inbox / "snapshot.jpg", random_bytes(500))  # newer still, and its name starts alike: not snap's
    [other] = settle(importer, 150)
    write(inbox / "snap.jpg.part", b"")  # unrelated partial file: does not hold the thumbnail back
    thumb = write(thumbs / "snap.png", random_bytes(300))
    settle(importer, 200)
    by_id = {e.id: e for e in events(gallery)}
    assert (by_id[older].has_thumbnail, by_id[newer].has_thumbnail, by_id[other].has_thumbnail) == (False, True, False)
    assert gallery.storage.thumbnail_path(DEVICE, newer).read_bytes() == thumb

    second = write(thumbs / "snap.png", random_bytes(300))  # the next one goes to the older event
    settle(importer, 300)
    assert {e.id: e.has_thumbnail for e in events(gallery)} == {older: True, newer: True, other: False}
    assert gallery.storage.thumbnail_path(DEVICE, older).read_bytes() == second
    assert list(thumbs.iterdir()) == []


def test_an_identical_thumbnail_still_goes_to_a_newer_event(gallery, importer, folders):
    inbox, thumbs = folders
    thumb = random_bytes(300)
    write(inbox / "snap.jpg", random_bytes(500))
    write(thumbs / "snap.png", thumb)
    [older] = settle(importer)
    write(inbox / "snap.jpg", random_bytes(500))
    [newer] = settle(importer, 100)
    write(thumbs / "snap.png", thumb)  # the same picture again, for the new event
    settle(importer, 200)
    assert all(e.has_thumbnail for e in events(gallery))
    assert gallery.storage.thumbnail_path(DEVICE, newer).read_bytes() == thumb
    assert list(thumbs.iterdir()) == []


def test_a_thumbnail_never_attaches_to_uploaded_events_or_another_devices(gallery, importer, folders, principal):
    _, thumbs = folders
    with gallery.begin_upload(principal, DEVICE) as upload:
        upload.fields.name = "up.jpg"
        upload.write_media(random_bytes(100))
        gallery.store(upload)
    other_inbox, _ = gallery.storage.device_paths("cam2")
    write(other_inbox / "theirs.jpg", random_bytes(100))  # imported from cam2's own incoming folder
    write(thumbs / "up.png", random_bytes(100))
    settle(importer)
    write(thumbs / "theirs.png", random_bytes(100))
    settle(importer, 100)
    assert [e.has_thumbnail for e in events(gallery)] == [False]
    assert [e.has_thumbnail for e in events(gallery, "cam2")] == [False]
    assert sorted(p.name for p in thumbs.iterdir()) == ["theirs.png", "up.png"]


# -- crashes: the next run converges on exactly one event ------------------------------------------


def _crash(monkeypatch: pytest.MonkeyPatch, target: object, name: str) -> None:
    def boom(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError(f"simulated crash in {name}")

    monkeypatch.setattr(target, name, boom)


@pytest.mark.parametrize(
    "crash_in",
    [
        "_insert",  # media in place, no row
        "_unlink_if_same",  # row committed, dropped files still there
        "fsync_dir",  # first rename done, nothing more
    ],
)
def test_a_crash_at_any_step_converges_on_one_event(
    gallery, importer, folders, monkeypatch, crash_in, restarted
):
    inbox, thumbs = folders
    data = write(inbox / "clip.mp4", random_bytes(20_000))
    thumb = write(thumbs / "clip.jpg", random_bytes(300))
    with monkeypatch.context() as m:
        _crash(m, IncomingImporter if crash_in == "_insert" else incoming, crash_in)
        assert settle(importer) == []
    assert (inbox / "clip.mp4").exists()

    again = restarted()
    imported = settle(again)
    [event] = events(gallery)
    assert imported in ([], [event.id])  # [] when the crashed run had committed the row
    assert event.has_thumbnail is True
    assert gallery.storage.media_path(DEVICE, event.id).read_bytes() == data
    assert gallery.storage.thumbnail_path(DEVICE, event.id).read_bytes() == thumb
    assert sorted(p.name for p in (gallery.storage.media_root / DEVICE).iterdir()) == [event.id, f"{event.id}.thumb"]
    assert list(inbox.iterdir()) == list(thumbs.iterdir()) == []
    assert leftovers(gallery) == []
    assert settle(again, 100) == [] and len(events(gallery)) == 1


def test_media_and_row_present_but_file_still_in_incoming(gallery, importer, folders):
    inbox, _ = folders
    data = write(inbox / "a.png", PNG + random_bytes(1000))
    event_id = importer.event_id_for(DEVICE, "a.png", len(data), sha(data))
    media = gallery.storage.media_path(DEVICE, event_id)
    media.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(inbox / "a.png", media)
    with gallery.db.session() as session:
        session.add(Event(id=event_id, device=DEVICE, name="a.png", media_type="image", mime_type="image/png",
                          size=len(data), sha256=sha(data), metadata_json=incoming.SOURCE_METADATA,
                          created=datetime.datetime.now(datetime.UTC)))
        session.commit()

    assert settle(importer) == []
    assert [e.id for e in events(gallery)] == [event_id]
    assert media.read_bytes() == data
    assert list(inbox.iterdir()) == []


def test_a_crash_after_attaching_a_late_thumbnail_does_not_attach_it_twice(
    gallery, importer, folders, monkeypatch, restarted
):
    inbox, thumbs = folders
    write(inbox / "snap.jpg", random_bytes(500))
    [older] = settle(importer)
    write(inbox / "snap.jpg", random_bytes(500))
    [newer] = settle(importer, 100)
    thumb = write(thumbs / "snap.png", random_bytes(300))
    with monkeypatch.context() as m:
        _crash(m, incoming, "_unlink_if_same")
        settle(importer, 200)
    assert (thumbs / "snap.png").exists()

    settle(restarted(), 300)
    by_id = {e.id: e for e in events(gallery)}
    assert (by_id[older].has_thumbnail, by_id[newer].has_thumbnail) == (False, True)
    assert gallery.storage.thumbnail_path(DEVICE, newer).read_bytes() == thumb
    assert list(thumbs.iterdir()) == []


def test_the_event_id_is_stable_and_keyed(gallery, importer, tmp_path, restarted):
    a = importer.event_id_for(DEVICE, "a.jpg", 3, sha(b"abc"))
    assert a == restarted().event_id_for(DEVICE, "a.jpg", 3, sha(b"abc"))
    assert validation.event_id(a) == a
    assert a != importer.event_id_for("cam2", "a.jpg", 3, sha(b"abc"))
    assert a != importer.event_id_for(DEVICE, "b.jpg", 3, sha(b"abc"))
    other_secret = dataclasses.replace(make_settings(tmp_path), jwt_secret="another-secret-" + "y" * 40)
    other = IncomingImporter(Gallery(other_secret, gallery.db, gallery.storage))
    assert other.event_id_for(DEVICE, "a.jpg", 3, sha(b"abc")) != a


# -- replicas -------------------------------------------------------------------------------------


def test_replicas_scanning_the_same_folders_import_each_file_exactly_once(gallery, folders, restarted):
    inbox, thumbs = folders
    replicas = [restarted() for _ in range(3)]
    expected: dict[str, bytes] = {}
    for round_ in range(3):
        for i in range(12):
            name = f"r{round_}-{i:02}.bin"
            expected[name] = write(inbox / name, random_bytes(10_000 + i))
            if i % 3 == 0:
                write(thumbs / f"r{round_}-{i:02}.jpg", random_bytes(200))
        start = round_ * 100.0
        for replica in replicas:
            assert replica.scan_once(now=start) == []
        barrier = threading.Barrier(len(replicas))
        results: list[list[str]] = [[] for _ in replicas]

        def run(index: int, start: float = start, barrier: threading.Barrier = barrier,
                results: list[list[str]] = results) -> None:
            barrier.wait()
            results[index] = replicas[index].scan_once(now=start + SETTLED)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(replicas))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        imported = [event_id for r in results for event_id in r]
        assert len(imported) == len(set(imported)) == 12  # each created by exactly one replica

    stored = events(gallery)
    assert sorted(e.name for e in stored) == sorted(expected)
    for event in stored:
        assert gallery.storage.media_path(DEVICE, event.id).read_bytes() == expected[event.name]
        assert event.has_thumbnail == (int(event.name[3:5]) % 3 == 0)
        assert gallery.storage.thumbnail_path(DEVICE, event.id).exists() == event.has_thumbnail
    assert list(inbox.iterdir()) == list(thumbs.iterdir()) == []
    assert leftovers(gallery) == []


def test_a_device_another_replica_is_importing_is_left_to_it(gallery, importer, folders):
    """While another replica holds a device's import lock (it is copying one of its files), this
    one neither copies nor imports that device's files; once the lock goes, they are imported."""
    inbox, _ = folders
    data = write(inbox / "busy.mp4", random_bytes(5000))
    lock_dir = gallery.storage.staging_root / incoming.LOCKS_FOLDER
    lock_dir.mkdir(parents=True, exist_ok=True)
    other_replica = os.open(lock_dir / DEVICE, os.O_RDWR | os.O_CREAT)
    try:
        file_locks.lock(other_replica)
        assert settle(importer) == []
        assert (events(gallery), leftovers(gallery)) == ([], [])
        assert (inbox / "busy.mp4").exists()
    finally:
        os.close(other_replica)
    [event_id] = importer.scan_once(now=2 * SETTLED)
    assert gallery.storage.media_path(DEVICE, event_id).read_bytes() == data


def test_a_device_whose_lock_cannot_be_made_waits_and_is_reported_once_each_time(
    gallery, importer, folders, caplog,
):
    """No lock file (here a folder where it goes; no inode left would do the same): the device's
    files wait in incoming, one warning says why, and the scan goes on. The same problem coming
    back after the lock could be made again is reported again."""
    inbox, _ = folders
    data = write(inbox / "wait.mp4", random_bytes(3000))
    blocker = gallery.storage.staging_root / incoming.LOCKS_FOLDER / DEVICE
    blocker.mkdir(parents=True)
    no_lock = "incoming files left in place: no import lock"
    with caplog.at_level(logging.WARNING):
        assert settle(importer) + importer.scan_once(now=2 * SETTLED) == []
    assert [r.getMessage() for r in caplog.records].count(no_lock) == 1
    assert (inbox / "wait.mp4").exists() and events(gallery) == []
    blocker.rmdir()
    [event_id] = importer.scan_once(now=3 * SETTLED)
    assert gallery.storage.media_path(DEVICE, event_id).read_bytes() == data

    blocker.unlink()
    blocker.mkdir()
    write(inbox / "later.mp4", random_bytes(3000))
    with caplog.at_level(logging.WARNING):
        assert settle(importer, 4 * SETTLED) == []
    assert [r.getMessage() for r in caplog.records].count(no_lock) == 2
    assert (inbox / "later.mp4").exists()


def test_a_deleted_event_stays_deleted_whichever_replica_scans_meanwhile(
    gallery, folders, restarted, principal, monkeypatch,
):
    """Replica A scans while replica B has a dropped file open to import it: A takes nothing of
    that device. Once B has imported the file and a user deleted the event, no scan brings it
    back. (Without the device lock, A imported the file meanwhile; after the delete, B went on
    with the file it held and, finding no row, brought the event back.)"""
    inbox, _ = folders
    write(inbox / "clip.mp4", random_bytes(5000))
    a, b = restarted(), restarted()
    a.scan_once(now=0)
    b.scan_once(now=0)
    real_open = incoming._open_dropped
    while_b_imports: list[str] = []

    def open_then_let_a_scan(file):  # type: ignore[no-untyped-def]
        fd = real_open(file)
        monkeypatch.setattr(incoming, "_open_dropped", real_open)
        while_b_imports.extend(a.scan_once(now=SETTLED))
        for event_id in while_b_imports:  # what A imported, a user deletes before B goes on
            gallery.delete_event(principal, DEVICE, event_id)
        return fd

    monkeypatch.setattr(incoming, "_open_dropped", open_then_let_a_scan)
    [event_id] = b.scan_once(now=SETTLED)
    assert while_b_imports == []
    gallery.delete_event(principal, DEVICE, event_id)
    assert a.scan_once(now=2 * SETTLED) == b.scan_once(now=2 * SETTLED) == []
    assert events(gallery) == []
    assert not gallery.storage.media_path(DEVICE, event_id).exists()
    assert (list(inbox.iterdir()), leftovers(gallery)) == ([], [])


@pytest.mark.parametrize("with_media", [False, True], ids=["late", "with-its-media-again"])
def test_a_thumbnail_for_an_event_deleted_meanwhile_stays_in_its_folder(
    gallery, importer, folders, principal, monkeypatch, with_media,
):
    """A thumbnail whose event is deleted between its lookup and its attachment is not placed (it
    would be a file without its row), leaves no copy in staging/, and waits in thumbnails/ for a
    later scan."""
    inbox, thumbs = folders
    media = write(inbox / "a.mp4", random_bytes(3000))
    [event_id] = settle(importer)
    gallery.storage.thumbnail_path(DEVICE, event_id).unlink(missing_ok=True)
    write(thumbs / "a.jpg", PNG)
    if with_media:
        write(inbox / "a.mp4", media)
    real_attach = IncomingImporter._attach

    def delete_then_attach(self, device, event_id_, taken, destination):  # type: ignore[no-untyped-def]
        gallery.delete_event(principal, device, event_id_)
        return real_attach(self, device, event_id_, taken, destination)

    with gallery.db.session() as session:  # a server-made thumbnail gives way to the device's
        event = session.get(Event, event_id)
        event.has_thumbnail, event.thumbnail_state = False, ""
        session.add(event)
        session.commit()
    monkeypatch.setattr(IncomingImporter, "_attach", delete_then_attach)
    settle(importer, 100)
    assert events(gallery) == []
    assert not gallery.storage.thumbnail_path(DEVICE, event_id).exists()
    assert (thumbs / "a.jpg").read_bytes() == PNG
    assert leftovers(gallery) == []


# -- the background loop --------------------------------------------------------------------------


def test_start_scans_in_the_background_until_stopped(gallery, folders):
    inbox, _ = folders
    fast = dataclasses.replace(gallery.settings, incoming_scan_seconds=0.05, incoming_settle_seconds=0.2)
    importer = IncomingImporter(Gallery(fast, gallery.db, gallery.storage))
    data = write(inbox / "bg.bin", random_bytes(1000))
    importer.start()
    try:
        deadline = time.monotonic() + 10
        while not events(gallery) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        importer.stop()
    [event] = events(gallery)
    assert event.sha256 == sha(data)
    assert not any(t.name == "incoming-importer" for t in threading.enumerate())


def test_a_stop_during_a_copy_leaves_the_file_in_incoming(gallery, importer, folders, monkeypatch):
    inbox, _ = folders
    data = write(inbox / "clip.mp4", random_bytes(5000))
    real_open = incoming._open_dropped

    def open_then_stop(file):  # type: ignore[no-untyped-def]
        importer.stop()  # the server shuts down while the file is being read
        return real_open(file)

    importer.scan_once(now=0)
    monkeypatch.setattr(incoming, "_open_dropped", open_then_stop)
    assert importer.scan_once(now=SETTLED) == []
    assert (events(gallery), leftovers(gallery)) == ([], [])
    assert (inbox / "clip.mp4").read_bytes() == data
    monkeypatch.undo()
    [event_id] = settle(IncomingImporter(gallery), 100)  # the next run imports it
    assert gallery.storage.media_path(DEVICE, event_id).read_bytes() == data


def test_symlinked_folders_are_never_followed(gallery, importer, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "passwords.txt").write_bytes(b"secret")
    drop = gallery.storage.drop_root
    (outside / "incoming").mkdir()
    (outside / "incoming" / "notes.txt").write_bytes(b"private")
    (drop / "evil").mkdir()
    (drop / "evil" / "incoming").symlink_to(outside)  # a linked incoming folder
    (drop / "alias").symlink_to(outside)  # a linked device folder, with an incoming folder in it
    for now in (0.0, 100.0, 200.0):
        assert importer.scan_once(now=now) == []
    assert (outside / "passwords.txt").read_bytes() == b"secret"
    assert (outside / "incoming" / "notes.txt").read_bytes() == b"private"
    assert events(gallery, "evil") == events(gallery, "alias") == []


def test_a_writer_holding_the_file_cannot_change_the_stored_bytes(gallery, importer, folders):
    inbox, _ = folders
    with open(inbox / "clip.bin", "wb") as writer:
        writer.write(b"a" * 1000)
        writer.flush()
        importer.scan_once(now=0.0)
        [event_id] = importer.scan_once(now=100.0)
        writer.write(b"b" * 500)  # the writer goes on after the file settled and was taken
    stored = gallery.storage.media_path(DEVICE, event_id)
    assert stored.read_bytes() == b"a" * 1000


# -- the backlog --------------------------------------------------------------------------------


def test_what_a_scan_leaves_is_the_backlog_of_every_replica(gallery, importer, folders, restarted, monkeypatch):
    inbox, thumbs = folders
    assert incoming.last_backlog(gallery.storage) is None  # before the first scan
    importer.scan_once(now=0)
    empty = incoming.last_backlog(gallery.storage)
    assert empty is not None and empty.figures() == (0, 0, "") and empty.scanned

    media = write(inbox / "clip.mp4", random_bytes(3_000))
    late = write(thumbs / "other.jpg", b"jpeg")  # waits for media of its stem
    os.utime(inbox / "clip.mp4", ns=(1_700_000_000_000_000_000,) * 2)  # copied with its dates (rsync -a)
    importer.scan_once(now=1)  # not settled yet
    backlog = incoming.last_backlog(gallery.storage)
    assert backlog is not None
    assert (backlog.files, backlog.bytes) == (2, len(media) + len(late))
    # When it arrived, not the date it kept: an old modification time is no stuck file.
    arrived = datetime.datetime.fromisoformat(backlog.oldest)
    assert abs(datetime.datetime.now(datetime.UTC) - arrived) < datetime.timedelta(minutes=1), backlog.oldest
    # Read by another replica as written by this one (a file of the shared data folder).
    assert incoming.last_backlog(restarted().storage) == backlog

    [_] = importer.scan_once(now=1 + SETTLED)  # clip.mp4 imported; the thumbnail still waits
    backlog = incoming.last_backlog(gallery.storage)
    assert backlog.files == 1 and backlog.bytes == len(late) and backlog.oldest
    # The same figures again: the file is left as it is, until a minute has passed.
    scanned = backlog.scanned
    importer.scan_once(now=2 + SETTLED)
    assert incoming.last_backlog(gallery.storage).scanned == scanned
    monkeypatch.setattr(incoming, "BACKLOG_REFRESH_SECONDS", 0.0)
    importer.scan_once(now=3 + SETTLED)
    assert incoming.last_backlog(gallery.storage).scanned > scanned

    (thumbs / "other.jpg").unlink()
    importer.scan_once(now=4 + SETTLED)
    assert incoming.last_backlog(gallery.storage).figures() == (0, 0, "")


def test_a_stopped_scan_leaves_the_backlog_as_it_was(gallery, importer, folders):
    inbox, _ = folders
    importer.scan_once(now=0)
    before = incoming.last_backlog(gallery.storage)
    write(inbox / "a.bin", b"abc")
    importer._stopping.set()
    importer.scan_once(now=1)
    assert incoming.last_backlog(gallery.storage) == before


@pytest.mark.parametrize(("umask", "drop", "other"), [
    (0o022, 0o750, 0o750), (0o002, 0o770, 0o750), (0o077, 0o700, 0o700),
])
def test_drop_folders_are_as_writable_as_the_umask_lets_a_group(tmp_path, umask, drop, other):
    """Something else writes into the drop folders (rsync, a file share): a group the umask lets
    write may. The servers' own folders are at most 0750, and nothing is ever open to others."""
    old = os.umask(umask)
    try:
        storage = Storage(tmp_path / "data")
        inbox, thumbs = storage.device_paths("cam1")
        storage_dirs = [storage.media_root, storage.staging_root]
    finally:
        os.umask(old)
    modes = {p: p.stat().st_mode & 0o777 for p in [inbox, thumbs, storage.drop_root, inbox.parent, *storage_dirs]}
    # The device's folder and the one above are the servers': a drop folder's writer may not rename them.
    assert modes == {**dict.fromkeys([inbox, thumbs], drop),
                     **dict.fromkeys([storage.drop_root, inbox.parent, *storage_dirs], other)}
