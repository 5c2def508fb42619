"""Staged uploads are written past the page cache (_direct_io.py): the bytes on disk come out whole
whatever the sizes of the pieces, the page cache is left empty (read through mincore, which tells
which of a file's pages are cached), and a filesystem that refuses direct I/O, when asked or
part-way through a file, gets the same bytes through the page cache."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import os
import pathlib
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from gallery_server import _direct_io, _writeback
from gallery_server.incoming import IncomingImporter
from gallery_server.service import Gallery
from gallery_server.settings import Settings
from gallery_server.storage import StagedFile, Storage

from ..conftest import JWT_SECRET, random_bytes
from ..page_cache import cached_pages, direct_writes_skip_the_cache

MiB = 1 << 20
ALIGN = _direct_io.ALIGN

def open_new(path: pathlib.Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)


def is_direct(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


def write_in_pieces(path: pathlib.Path, data: bytes, piece: int) -> _direct_io.AppendWriter:
    """`data` written to a new file in pieces of `piece` bytes, as direct as the filesystem allows,
    then flushed; the writer is returned for the test to look at."""
    fd = open_new(path)
    try:
        writer = _direct_io.AppendWriter(fd, direct=True)
        for start in range(0, len(data), piece):
            writer.write(data[start:start + piece])
        writer.flush()
    finally:
        os.close(fd)
    return writer


@pytest.fixture
def direct_ok(tmp_path: pathlib.Path) -> pathlib.Path:
    """tmp_path, where a direct write leaves nothing in the page cache: skipped on a filesystem
    that refuses direct I/O, and on one whose files live in memory (tmpfs takes O_DIRECT)."""
    if not direct_writes_skip_the_cache(tmp_path):
        pytest.skip("no direct I/O past the page cache on this filesystem")
    return tmp_path


SIZES = [0, 1, 511, ALIGN - 1, ALIGN, ALIGN + 1, MiB - 3, MiB, MiB + 7, 3 * MiB + 5]


@pytest.mark.parametrize("seed", range(12))
def test_pieces_of_any_size_come_out_whole_and_leave_no_page_cache(direct_ok: pathlib.Path, seed: int) -> None:
    rnd = random.Random(seed)
    path = direct_ok / "f"
    fd = open_new(path)
    writer = _direct_io.AppendWriter(fd, direct=True)
    expected = bytearray()
    try:
        for _ in range(rnd.randint(1, 10)):
            piece = rnd.randbytes(rnd.choice([*SIZES, rnd.randint(0, 300_000)]))
            writer.write(memoryview(bytearray(piece)) if rnd.random() < 0.3 else piece)
            expected += piece
            if rnd.random() < 0.25:
                writer.flush()  # as before an fsync, and the writer goes on after it
            assert writer.offset == len(expected)
        assert writer.direct
        writer.flush()
        os.fsync(fd)
    finally:
        os.close(fd)
    # At most the pages that flushes wrote through the page cache (one per flush, under ALIGN bytes).
    assert cached_pages(path) <= 11
    assert path.read_bytes() == expected


def test_writers_on_many_threads_share_a_bounded_pool(
    direct_ok: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    pool = _direct_io._AlignedBuffers(2)
    monkeypatch.setattr(_direct_io, "_buffers", pool)
    datas = [random_bytes(2 * MiB + 1000 * n) for n in range(16)]
    with ThreadPoolExecutor(16) as threads:  # a writer's error is raised here
        list(threads.map(lambda n: write_in_pieces(direct_ok / f"f{n}", datas[n], 300_000), range(16)))
    assert [(direct_ok / f"f{n}").read_bytes() == datas[n] for n in range(16)] == [True] * 16
    assert 1 <= len(pool._free) <= 2, "16 writers at once made no more buffers than the pool's 2"


def test_small_pieces_are_gathered_before_a_direct_write(
    direct_ok: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = os.pwrite
    direct_writes: list[int] = []

    def recording(fd: int, data: memoryview, offset: int) -> int:
        if is_direct(fd):
            direct_writes.append(len(data))
        return real(fd, data, offset)

    monkeypatch.setattr(_direct_io.os, "pwrite", recording)
    data = random_bytes(4 * MiB + 99)
    write_in_pieces(direct_ok / "f", data, 16 << 10)  # Envoy's HTTP/2 frames
    assert (direct_ok / "f").read_bytes() == data
    assert direct_writes and min(direct_writes) >= _direct_io.GATHER_BYTES - ALIGN
    assert len(direct_writes) <= len(data) // (_direct_io.GATHER_BYTES - ALIGN)


def test_a_buffered_writer_fills_the_page_cache(tmp_path: pathlib.Path) -> None:
    """The control for the check above: the same writes through the page cache are all cached."""
    path = tmp_path / "f"
    fd = open_new(path)
    writer = _direct_io.AppendWriter(fd, direct=False)
    try:
        writer.write(random_bytes(4 * MiB))
        assert not writer.direct and not is_direct(fd)
        writer.flush()
    finally:
        os.close(fd)
    assert cached_pages(path) == 4 * MiB // mmap.PAGESIZE


def test_a_staged_upload_from_storage_is_written_directly(direct_ok: pathlib.Path) -> None:
    storage = Storage(direct_ok / "data")
    storage.direct_io = True
    data = random_bytes(20 * MiB + 12345)  # past 4 MiB the helper thread writes
    staged = storage.stage(max_bytes=1 << 30, what="event")
    for start in range(0, len(data), MiB):
        staged.write(data[start:start + MiB])
    assert staged.sha256 == hashlib.sha256(data).hexdigest()
    staged.sync()
    assert cached_pages(staged.path) <= 1  # the tail, written through the page cache
    assert staged.path.read_bytes() == data
    staged.discard()


def test_an_imported_file_is_copied_directly(gallery: Gallery, direct_ok: pathlib.Path) -> None:
    assert gallery.storage.direct_io, "the settings' default reaches the storage"
    inbox, _ = gallery.storage.device_paths("cam1")
    data = random_bytes(6 * MiB + 77)
    (inbox / "clip.bin").write_bytes(data)
    importer = IncomingImporter(gallery)
    imported = importer.scan_once(now=0.0) + importer.scan_once(now=10.0)
    assert len(imported) == 1
    stored = gallery.storage.media_path("cam1", imported[0])
    assert cached_pages(stored) <= 1  # the tail, written through the page cache
    assert stored.read_bytes() == data


def test_a_refusal_on_the_helper_thread_sends_the_rest_through_the_page_cache(
    direct_ok: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = os.pwrite
    refused: list[tuple[str, int]] = []

    def refusing(fd: int, data: memoryview, offset: int) -> int:
        if is_direct(fd) and offset >= 6 * MiB:  # as a filesystem that takes some writes only
            refused.append((threading.current_thread().name, offset))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(_direct_io.os, "pwrite", refusing)
    staged = StagedFile(direct_ok / "f", max_bytes=1 << 30, what="event", direct_io=True)
    data = random_bytes(12 * MiB + 333)
    for start in range(0, len(data), MiB - 1):  # past 4 MiB the helper thread writes
        staged.write(data[start:start + MiB - 1])
    assert staged.sha256 == hashlib.sha256(data).hexdigest()
    staged.sync()
    assert [name for name, _ in refused] == ["staged-write"], "refused once, then never asked again"
    assert (direct_ok / "f").read_bytes() == data
    staged.discard()


def test_a_refusal_to_turn_direct_io_back_on_after_a_flush(
    direct_ok: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = direct_ok / "f"
    fd = open_new(path)
    data = random_bytes(3 * MiB + 5)
    try:
        writer = _direct_io.AppendWriter(fd, direct=True)
        writer.write(data[:MiB + 1])
        writer.flush()  # turns O_DIRECT off for the tail
        monkeypatch.setattr(_direct_io, "_set_direct", lambda fd, on: not on)
        writer.write(data[MiB + 1:])
        assert not writer.direct
        writer.flush()
    finally:
        os.close(fd)
    assert path.read_bytes() == data


def test_a_short_direct_write_sends_the_rest_through_the_page_cache(
    direct_ok: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = os.pwrite
    calls = {"short": 0}

    def short_once(fd: int, data: memoryview, offset: int) -> int:
        if is_direct(fd) and offset == MiB and not calls["short"]:
            calls["short"] += 1
            real(fd, data[:2 * ALIGN], offset)
            return ALIGN + 512  # reported short, and not to ALIGN
        return real(fd, data, offset)

    monkeypatch.setattr(_direct_io.os, "pwrite", short_once)
    data = random_bytes(3 * MiB + 99)
    writer = write_in_pieces(direct_ok / "f", data, MiB)
    assert calls["short"] == 1 and not writer.direct
    assert (direct_ok / "f").read_bytes() == data


def test_a_refusal_when_a_flush_writes_whole_blocks(
    direct_ok: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = os.pwrite

    def refusing(fd: int, data: memoryview, offset: int) -> int:
        if is_direct(fd):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    path = direct_ok / "f"
    fd = open_new(path)
    data = random_bytes(_direct_io.GATHER_BYTES - 1)  # all of it gathered: 31 whole blocks and a part
    try:
        writer = _direct_io.AppendWriter(fd, direct=True)
        writer.write(data)
        monkeypatch.setattr(_direct_io.os, "pwrite", refusing)
        writer.flush()
        assert not writer.direct
    finally:
        os.close(fd)
    assert path.read_bytes() == data


def test_a_filesystem_refusing_from_the_start_is_written_through_the_page_cache(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_direct_io, "_set_direct", lambda fd, on: False)
    asked: list[tuple[int, int]] = []

    def record(fd: int, offset: int, length: int, flags: int) -> int:
        asked.append((offset, length))
        return 0

    monkeypatch.setattr(_writeback, "_sync_file_range", record)
    staged = StagedFile(tmp_path / "f", max_bytes=1 << 30, what="event", direct_io=True)
    data = random_bytes(2 * _writeback.WRITEBACK_BYTES + 5)
    for start in range(0, len(data), MiB):
        staged.write(data[start:start + MiB])
    staged.sync()
    assert (tmp_path / "f").read_bytes() == data
    assert asked == [(0, _writeback.WRITEBACK_BYTES), (_writeback.WRITEBACK_BYTES, _writeback.WRITEBACK_BYTES)]


def test_the_setting_defaults_on_and_turns_off(tmp_path: pathlib.Path) -> None:
    env = {"GALLERY_DATA_DIR": str(tmp_path), "GALLERY_JWT_SECRET": JWT_SECRET}
    assert Settings.from_env(env).direct_io is True
    assert Settings.from_env({**env, "GALLERY_DIRECT_IO": "false"}).direct_io is False
