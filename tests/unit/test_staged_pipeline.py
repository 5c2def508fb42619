"""StagedFile's helper thread (large uploads are hashed and written off the receiving thread), on a
real small filesystem: a full disk met by the helper thread is INSUFFICIENT_STORAGE, the failure
sticks to the file, and nothing of it (bytes, thread slot) is left once it is discarded."""

from __future__ import annotations

import hashlib
import os
import pathlib
from collections.abc import Iterator

import pytest

from gallery_server import storage
from gallery_server.errors import Exhausted
from gallery_server.storage import StagedFile

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
