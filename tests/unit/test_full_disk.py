"""What a refusal for want of disk space tells the client: the space left on the data root's
filesystem and the headroom (GALLERY_MIN_FREE_BYTES), the same figures whichever check or call met
the full disk: the headroom check, a write or fsync that meets ENOSPC or EDQUOT, a rename or a new
file that finds no block or inode left. On real small filesystems (tmpfs, skipped where mounting
needs root), except the quota, which a test cannot fill here."""

from __future__ import annotations

import errno
import os
import pathlib
from collections.abc import Iterator

import pytest

from gallery_server import storage
from gallery_server.db import Database
from gallery_server.errors import Exhausted, NotFound
from gallery_server.resumable import ResumableUploads
from gallery_server.service import Gallery
from gallery_server.storage import SPACE_CHECK_BYTES, Storage

from ..conftest import make_settings, small_disk

MiB = 1 << 20


@pytest.fixture
def disk(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    with small_disk(tmp_path / "disk", "12m") as mount:
        yield mount


@pytest.fixture
def few_inodes(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    """A tmpfs with room for bytes but for few files and folders."""
    with small_disk(tmp_path / "inodes", "64m", inodes=64) as mount:
        yield mount


def _use_every_inode(where: pathlib.Path) -> None:
    ballast = where / "ballast"
    ballast.mkdir()
    for i in range(1000):
        try:
            (ballast / str(i)).touch()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
            return
    raise AssertionError("the tmpfs did not run out of inodes")


def _refusal(info: pytest.ExceptionInfo[Exhausted], store: Storage) -> dict[str, str]:
    assert info.value.reason == "INSUFFICIENT_STORAGE"
    assert set(info.value.metadata) == {"free_bytes", "min_free_bytes"}
    assert info.value.metadata["min_free_bytes"] == str(store.min_free_bytes)
    return info.value.metadata


def test_a_write_that_fills_the_disk_tells_the_space_left_and_the_headroom(disk: pathlib.Path) -> None:
    # The headroom check comes after 8 MiB, with ~4 MiB still free on this 12 MiB disk: the writes
    # run into the full disk itself, and the error must still tell the headroom as its check would.
    assert SPACE_CHECK_BYTES == 8 * MiB
    store = Storage(disk)
    store.min_free_bytes = 2 * MiB
    staged = store.stage(max_bytes=1 << 30, what="event")
    with pytest.raises(Exhausted) as info:
        for _ in range(64):
            staged.write(os.urandom(MiB))
        staged.sync()
    left = store.disk_space().free_bytes
    staged.discard()
    assert _refusal(info, store)["free_bytes"] == str(left)
    assert left < MiB


def test_a_full_quota_tells_the_space_the_disk_still_has(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A quota can refuse a write on a disk with room: the figure is the disk's, not a made-up 0.
    store = Storage(tmp_path)
    store.min_free_bytes = 1000
    staged = store.stage(max_bytes=1 << 30, what="event")
    staged.write(b"x" * 5000)
    real_fsync = os.fsync
    quota_full_for = staged._fd

    def fsync(fd: int) -> None:
        if fd == quota_full_for:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        real_fsync(fd)

    with monkeypatch.context() as patched:
        patched.setattr(storage.os, "fsync", fsync)  # os's own: only this file's fsync is refused
        with pytest.raises(Exhausted) as info:
            staged.sync()
    free = store.disk_space().free_bytes
    staged.discard()
    reported = int(_refusal(info, store)["free_bytes"])
    assert reported > 0 and abs(reported - free) < 256 * MiB  # a shared disk moves meanwhile


def test_an_upload_that_finds_no_inode_left_is_not_staged(few_inodes: pathlib.Path) -> None:
    store = Storage(few_inodes)
    store.min_free_bytes = MiB  # far below the free bytes: only the inodes are short
    _use_every_inode(few_inodes)
    with pytest.raises(Exhausted) as info:
        store.stage(max_bytes=1 << 30, what="event")
    assert int(_refusal(info, store)["free_bytes"]) > 32 * MiB
    assert list(store.staging_root.iterdir()) == []


def test_a_move_that_finds_no_inode_left_is_insufficient_storage(few_inodes: pathlib.Path) -> None:
    store = Storage(few_inodes)
    store.min_free_bytes = MiB
    staged = store.stage(max_bytes=1 << 30, what="event")
    staged.write(b"bytes")
    staged.sync()
    _use_every_inode(few_inodes)
    with pytest.raises(Exhausted) as info:  # a new device's folder needs an inode
        staged.move(store.media_path("new-device", "evt_1"))
    assert int(_refusal(info, store)["free_bytes"]) > 32 * MiB  # bytes to spare, no inode
    assert not staged.moved
    staged.discard()
    assert list(store.staging_root.iterdir()) == []


def test_a_resumable_upload_that_finds_no_inode_left_is_not_started(
    few_inodes: pathlib.Path, tmp_path: pathlib.Path, principal,  # type: ignore[no-untyped-def]
) -> None:
    settings = make_settings(few_inodes / "data", f"sqlite:///{tmp_path / 'gallery.db'}", min_free_bytes=MiB)
    db = Database(settings.database_url, pool_size=2)
    db.create_tables()
    gallery = Gallery(settings, db, Storage(settings.data_dir))
    try:
        uploads = ResumableUploads(gallery)
        uploads.start(principal, "cam1", name="first.bin", size=10, upload_id="upload-first")
        _use_every_inode(few_inodes)
        with pytest.raises(Exhausted) as info:
            uploads.start(principal, "cam1", name="second.bin", size=10, upload_id="upload-second")
        _refusal(info, gallery.storage)
        with pytest.raises(NotFound):  # no session row without its file
            uploads.query(principal, "cam1", "upload-second")
        assert uploads.query(principal, "cam1", "upload-first").committed_size == 0
    finally:
        db.dispose()


def test_a_server_short_of_room_says_so_at_start_and_as_it_refuses(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refusals are INFO access lines for the client; the operator, who must act, gets WARNINGs:
    one at start, then at most one a minute while uploads are refused."""
    store = Storage(tmp_path)
    store.min_free_bytes = 1 << 62  # more than any disk has
    store.warn_if_short_of_room()
    [start] = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "GALLERY_MIN_FREE_BYTES" in start.getMessage() and start.min_free_bytes == 1 << 62
    caplog.clear()
    monkeypatch.setattr(storage, "_short_of_room_warned", [-storage.SHORT_OF_ROOM_WARNING_SECONDS])
    for _ in range(3):
        with pytest.raises(Exhausted):
            store.require_space()
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    monkeypatch.setattr(storage, "_short_of_room_warned", [-storage.SHORT_OF_ROOM_WARNING_SECONDS])
    with pytest.raises(Exhausted):  # a minute later
        store.require_space()
    assert [r.levelname for r in caplog.records] == ["WARNING", "WARNING"]
    caplog.clear()
    store.min_free_bytes = 0
    store.warn_if_short_of_room()
    assert caplog.records == []


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_staged_file_whose_lock_fails_leaves_no_file_or_descriptor(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The lock that marks a staged file in use can fail (ENOLCK on NFS, EMFILE for its duplicate):
    there is no object yet for its owner to discard, so the file and its descriptor were left."""
    store = Storage(tmp_path / "data")

    def no_lock(fd: int) -> int:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(storage, "hold_shared", no_lock)
    before = _open_fds()
    for _ in range(3):
        with pytest.raises(OSError):
            store.stage(max_bytes=10, what="event")
    assert _open_fds() == before
    assert list(store.staging_root.iterdir()) == []


def test_an_adopted_file_that_cannot_be_read_leaves_no_descriptor(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = Storage(tmp_path / "data")
    finished = tmp_path / "session.bin"
    finished.write_bytes(b"x" * 100)

    def failing_read(fd: int, n: int) -> bytes:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(storage.os, "read", failing_read)
    before = _open_fds()
    with pytest.raises(OSError):
        storage.StagedFile.adopt(finished, what="event", storage=store)
    monkeypatch.undo()
    assert _open_fds() == before
    assert finished.read_bytes() == b"x" * 100  # the owner's file stays
