"""StagedFile's helper thread (large uploads are hashed and written off the receiving thread), on a
real small filesystem: a full disk met by the helper thread is INSUFFICIENT_STORAGE, the failure
sticks to the file, and nothing of it (bytes, thread slot) is left once it is discarded."""

from __future__ import annotations

import errno
import hashlib
import os
import pathlib
from collections.abc import Iterator

import pytest

from gallery_server import storage
from gallery_server.errors import Exhausted
from gallery_server.storage import StagedFile, Storage

from ..conftest import small_disk

MiB = 1 << 20


@pytest.fixture
def disk(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    with small_disk(tmp_path / "disk", "12m") as mount:
        yield mount


def _all_pipeline_slots_free() -> bool:
    taken = [storage._pipeline_slots.acquire(blocking=False) for _ in range(storage.MAX_PIPELINES)]
    for got in taken:
        if got:
            storage._pipeline_slots.release()
    return all(taken)


def test_a_large_upload_goes_through_the_helper_thread_whole(tmp_path: pathlib.Path) -> None:
    chunks = [os.urandom(MiB) for _ in range(3)] + [os.urandom(1000)] * 300 + [os.urandom(3 * MiB)]
    staged = StagedFile(tmp_path / "f", max_bytes=1 << 30, what="event")
    for chunk in chunks:
        staged.write(memoryview(bytearray(chunk)))  # a reusable buffer's view: must be copied
    expected = b"".join(chunks)
    assert staged.sha256 == hashlib.sha256(expected).hexdigest()
    staged.sync()
    assert (tmp_path / "f").read_bytes() == expected
    staged.discard()
    assert _all_pipeline_slots_free()


@pytest.mark.parametrize("direct_io", [True, False], ids=["direct", "page-cache"])
def test_a_full_disk_met_by_the_helper_thread_is_insufficient_storage_and_sticks(
    disk: pathlib.Path, direct_io: bool,
) -> None:
    staged = StagedFile(disk / "f", max_bytes=1 << 30, what="event", direct_io=direct_io)
    if direct_io and not (staged._out and staged._out.direct):
        staged.discard()
        pytest.skip("this tmpfs refuses direct I/O")
    chunk = os.urandom(MiB)
    with pytest.raises(Exhausted) as info:
        for _ in range(64):  # the helper thread takes over past 4 MiB; the disk holds 12
            staged.write(chunk)
        staged.sync()
    assert info.value.reason == "INSUFFICIENT_STORAGE"
    for again in (lambda: staged.sha256, staged.sync, lambda: staged.write(chunk)):
        with pytest.raises(Exhausted):
            again()
    staged.discard()
    assert list(disk.iterdir()) == []
    assert _all_pipeline_slots_free()


def test_a_full_disk_tells_the_space_left_and_the_headroom(disk: pathlib.Path) -> None:
    # The headroom is checked after 8 MiB, with ~4 MiB still free on this 12 MiB disk: the writes
    # run into the full disk itself, and the error must still tell the headroom as its check would.
    store = Storage(disk)
    store.min_free_bytes = 2 * MiB
    staged = store.stage(max_bytes=1 << 30, what="event")
    with pytest.raises(Exhausted) as info:
        for _ in range(64):
            staged.write(os.urandom(MiB))
        staged.sync()
    left = store.disk_space().free_bytes
    staged.discard()
    assert info.value.reason == "INSUFFICIENT_STORAGE"
    assert info.value.metadata == {"free_bytes": str(left), "min_free_bytes": str(2 * MiB)}
    assert left < MiB


def test_a_full_quota_tells_the_space_the_disk_still_has(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A quota can refuse a write on a disk with room: the figure is the disk's, not a made-up 0.
    store = Storage(tmp_path)
    store.min_free_bytes = 1000
    staged = store.stage(max_bytes=1 << 30, what="event")
    staged.write(b"x" * 5000)

    def quota_full(fd: int) -> None:
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(storage.os, "fsync", quota_full)
    with pytest.raises(Exhausted) as info:
        staged.sync()
    monkeypatch.undo()
    free = store.disk_space().free_bytes
    staged.discard()
    assert info.value.reason == "INSUFFICIENT_STORAGE"
    assert info.value.metadata["min_free_bytes"] == "1000"
    assert abs(int(info.value.metadata["free_bytes"]) - free) < 256 * MiB  # a shared disk moves
    assert free > 256 * MiB
