"""Start writing a file's bytes to disk while it is still being received.

An upload is durable only after its fsync. The kernel writes dirty pages back on its own only past
its dirty thresholds (by default 10% of RAM) or after 30 s, so on a machine with GiBs of memory a
whole 512 MiB upload waited in the page cache and its fsync wrote all of it after the last byte
had arrived: 0.15 – 0.4 s at the end of every large upload, with the client waiting. Asking
for write-out of each WRITEBACK_BYTES as soon as it is written overlaps the disk with receiving,
so the final fsync waits for the tail only (BENCHMARKS.md measures "after last byte").

sync_file_range(SYNC_FILE_RANGE_WRITE) starts write-out and returns without waiting for it; it is
what PostgreSQL and RocksDB use for the same purpose. It is only a head start: fsync stays the
one promise of durability, and it reports any write-back error itself, so a failure here is
ignored. Where the call does not exist (not Linux), nothing changes but the timing.
"""

from __future__ import annotations

import ctypes

WRITEBACK_BYTES = 8 << 20
_SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>

try:
    _sync_file_range = ctypes.CDLL(None).sync_file_range
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    _sync_file_range.restype = ctypes.c_int
except (OSError, AttributeError):
    _sync_file_range = None


class Writeback:
    """Follows one file written front to back by one thread at a time, and starts the write-out
    of every WRITEBACK_BYTES once written. `start` is where writing begins (a resumed file)."""

    def __init__(self, fd: int, start: int = 0) -> None:
        self._fd = fd
        self.written = start  # the end of what was written so far
        self._started = start  # write-out was asked for everything before this offset

    def wrote(self, count: int) -> None:
        self.written += count
        pending = self.written - self._started
        if pending >= WRITEBACK_BYTES:
            if _sync_file_range is not None:
                _sync_file_range(self._fd, self._started, pending, _SYNC_FILE_RANGE_WRITE)
            self._started = self.written
