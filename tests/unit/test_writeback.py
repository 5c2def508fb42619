"""Received bytes written through the page cache (resumable sessions; staged files and imports where
direct I/O is refused or off, _direct_io.py) are handed to the disk while they arrive
(_writeback.py), so the commit's fsync waits for the tail only. The kernel's write-out cannot be
watched deterministically, so these tests record each sync_file_range call (and still make it) and
check what was asked for: the file being written, in contiguous steps of WRITEBACK_BYTES, from
where the writing began. The bytes on disk must come out whole either way."""

from __future__ import annotations

import hashlib
import os
import pathlib
import sys

import pytest

from gallery_server import _writeback, auth
from gallery_server.incoming import IncomingImporter
from gallery_server.resumable import ResumableUploads
from gallery_server.service import Gallery
from gallery_server.storage import StagedFile

from ..conftest import random_bytes

MiB = 1 << 20
STEP = _writeback.WRITEBACK_BYTES


@pytest.fixture
def asked(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, int]]:
    """(file, offset, length) of every write-out asked for; the real call is still made."""
    calls: list[tuple[str, int, int]] = []
    real = _writeback._sync_file_range

    def recording(fd: int, offset: int, length: int, flags: int) -> int:
        assert flags == _writeback._SYNC_FILE_RANGE_WRITE  # start write-out, never wait for it
        calls.append((os.readlink(f"/proc/self/fd/{fd}"), offset, length))
        return real(fd, offset, length, flags) if real is not None else 0

    monkeypatch.setattr(_writeback, "_sync_file_range", recording)
    return calls


@pytest.mark.skipif(sys.platform != "linux", reason="sync_file_range is Linux's")
def test_the_kernel_call_is_bound_and_accepted_on_linux(tmp_path: pathlib.Path) -> None:
    assert _writeback._sync_file_range is not None, "without it every large upload waits at fsync"
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        os.write(fd, b"x" * MiB)
        assert _writeback._sync_file_range(fd, 0, MiB, _writeback._SYNC_FILE_RANGE_WRITE) == 0
    finally:
        os.close(fd)


@pytest.mark.parametrize("chunk", [MiB, 3 * MiB + 5])
def test_an_upload_is_handed_to_the_disk_in_steps_as_it_arrives(
    tmp_path: pathlib.Path, asked: list[tuple[str, int, int]], chunk: int,
) -> None:
    # The first 4 MiB are written by the receiving thread, the rest by the helper thread.
    data = random_bytes(20 * MiB + 12345)
    staged = StagedFile(tmp_path / "f", max_bytes=1 << 30, what="event")
    for start in range(0, len(data), chunk):
        staged.write(data[start:start + chunk])
    assert staged.sha256 == hashlib.sha256(data).hexdigest()
    staged.sync()
    assert {path for path, _, _ in asked} == {str(tmp_path / "f")}
    offsets = [offset for _, offset, _ in asked]
    ends = [offset + length for _, offset, length in asked]
    assert offsets[0] == 0 and offsets[1:] == ends[:-1], "contiguous, front to back"
    assert all(STEP <= length < STEP + chunk for _, _, length in asked)
    assert len(data) - ends[-1] < STEP, "only the tail is left for fsync"
    assert (tmp_path / "f").read_bytes() == data


def test_a_small_upload_asks_for_nothing(tmp_path: pathlib.Path, asked: list[tuple[str, int, int]]) -> None:
    staged = StagedFile(tmp_path / "f", max_bytes=1 << 30, what="event")
    staged.write(random_bytes(STEP - 1))
    staged.sync()
    assert asked == []


def test_a_resumed_session_is_handed_to_the_disk_from_where_it_resumed(
    gallery: Gallery, principal: auth.Principal, asked: list[tuple[str, int, int]],
) -> None:
    data = random_bytes(2 * STEP + 3 * MiB)
    uploads = ResumableUploads(gallery)
    uploads.start(principal, "cam1", name="a.bin", size=len(data),
                  sha256=hashlib.sha256(data).hexdigest(), upload_id="upload-0001")
    cut = STEP + 2 * MiB  # the first stream ends past one step; the second resumes there
    for begin, end in ((0, cut), (cut, len(data))):
        writer = uploads.open_write(principal, "cam1", "upload-0001", begin)
        try:
            for start in range(begin, end, MiB):
                writer.write(data[start:min(start + MiB, end)])
            writer.commit()
            state = writer.finish() if end == len(data) else writer.state()
        finally:
            writer.close()
    assert [(offset, length) for _, offset, length in asked] == [(0, STEP), (cut, STEP)]
    assert state.event_id
    assert gallery.storage.media_path("cam1", state.event_id).read_bytes() == data


def test_an_imported_file_is_handed_to_the_disk_as_it_is_copied(
    gallery: Gallery, asked: list[tuple[str, int, int]],
) -> None:
    gallery.storage.direct_io = False  # through the page cache: direct writes need no asking
    inbox, _ = gallery.storage.device_paths("cam1")
    data = random_bytes(STEP + MiB)
    (inbox / "clip.bin").write_bytes(data)
    importer = IncomingImporter(gallery)
    imported = importer.scan_once(now=0.0) + importer.scan_once(now=10.0)
    assert len(imported) == 1
    assert [(offset, length) for _, offset, length in asked] == [(0, STEP)]
    assert pathlib.Path(asked[0][0]).parent == gallery.storage.staging_root
    assert gallery.storage.media_path("cam1", imported[0]).read_bytes() == data
