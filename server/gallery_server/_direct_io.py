"""Writing received media past the page cache (O_DIRECT).

Why: a buffered write makes the kernel allocate page-cache memory for every byte and copy it there.
On the VM this is measured on (one that hands freed memory back to its host) that allocation was at
times the dearest part of storing an upload: writing 1 MiB pieces at 1 MiB offsets, as uploads do,
cost 1.2 – 2.2 CPU-s per GB in the kernel (copy_folio_from_iter_atomic held 27 – 34% of the server's
and Envoy's samples during one upload), at other times 0.2; direct writes cost 0.05 – 0.3 either way,
the copy into an aligned buffer included (by hand, 2026-11-28 and 29; BENCHMARKS.md, calibration).
Media is written once and read later, if ever, so the page cache buys little on this path, and the
fsync that makes the file durable then has nothing left to write but the tail. The price: a direct
write waits for the disk, so one upload at a time was up to ~20% slower while the page cache was
cheap; many at once were faster either way (README, GALLERY_DIRECT_IO).

Direct I/O needs the memory address, the file offset and the length aligned to the device's block
(512 bytes here; ALIGN is a multiple of any common one). Received bytes come at any address and
length, so they are copied into page-aligned buffers from a small pool shared by all writers and
written in multiples of ALIGN. Pieces are gathered until there are GATHER_BYTES to write, since
each direct write waits for the disk; flush() writes the whole blocks gathered directly and the
last partial block through the page cache. A filesystem that refuses direct I/O, when it is asked
for or on a write, gets the rest of the file through the page cache instead, with write-out started
as it goes (_writeback.py): same bytes, the old cost.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import threading
from collections.abc import Iterator

from ._writeback import Writeback

ALIGN = 4096
# Direct writes of 256 KiB cost the same CPU per GB as writes of 1 MiB here and kept ~1.3 GB/s
# (128 KiB: ~1.5x the CPU). A writer holds a buffer while it copies a piece in and the disk takes
# it, never while waiting for the next piece, so a few serve every upload at once: 2 MiB in all.
BUFFER_BYTES = 256 << 10
POOL_BUFFERS = 8
# Pieces are gathered in the writer's own memory up to this much before a direct write: Envoy's
# HTTP/2 frames can be 16 KiB, and 4 MiB of them written one by one took ~3x as long as buffered.
GATHER_BYTES = 128 << 10
assert GATHER_BYTES + ALIGN <= BUFFER_BYTES  # what is gathered, and more, fits in one buffer


class _AlignedBuffers:
    """At most `count` page-aligned buffers of BUFFER_BYTES, made on first use and then reused."""

    def __init__(self, count: int) -> None:
        self._slots = threading.BoundedSemaphore(count)
        self._free: list[memoryview] = []

    @contextlib.contextmanager
    def take(self) -> Iterator[memoryview]:
        with self._slots:
            try:
                buffer = self._free.pop()
            except IndexError:  # fewer than `count` made so far, all in use
                buffer = memoryview(mmap.mmap(-1, BUFFER_BYTES))
            try:
                yield buffer
            finally:
                self._free.append(buffer)


_buffers = _AlignedBuffers(POOL_BUFFERS)


def _set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for an open file; False if that failed (a filesystem without direct
    I/O refuses it with EINVAL): the caller then writes through the page cache."""
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT if on else flags & ~os.O_DIRECT)
    except OSError:
        return False
    return True


class AppendWriter:
    """Writes one file front to back, for one thread at a time: directly when `direct` and the
    filesystem allow it, else through the page cache. flush() before an fsync writes what direct
    mode holds back; the writer goes on after it. OSErrors (ENOSPC included) reach the caller as
    they are; the file is then to be discarded (`offset` may count bytes of the failed call)."""

    def __init__(self, fd: int, *, direct: bool) -> None:
        self._fd = fd
        self.direct = direct and _set_direct(fd, True)
        self._fd_direct = self.direct  # whether O_DIRECT is on for the descriptor now
        self.offset = 0  # the end of what was handed to write(), held bytes included
        # Direct mode: the bytes gathered since the last direct write, from an ALIGN boundary to `offset`.
        self._held = bytearray()
        self._writeback = Writeback(fd)

    def write(self, data: bytes | memoryview) -> None:
        data = memoryview(data).cast("B")
        if self.direct and not self._held and self.offset % ALIGN:
            # After a flush, up to the next boundary: through the page cache.
            to_boundary = -self.offset % ALIGN
            self._write_buffered(data[:to_boundary])
            data = data[to_boundary:]
        if self.direct and len(self._held) + len(data) >= GATHER_BYTES:
            with _buffers.take() as buffer:
                while self.direct and len(self._held) + len(data) >= GATHER_BYTES:
                    held = len(self._held)
                    take = min(BUFFER_BYTES - held, len(data))
                    buffer[:held] = self._held
                    buffer[held:held + take] = data[:take]
                    end = held + take
                    whole = end - end % ALIGN
                    at = self.offset - held  # a boundary
                    self._write_direct(buffer[:whole], at)
                    data = data[take:]
                    self.offset, self._held = at + end, bytearray(buffer[whole:end])
        if self.direct:  # under GATHER_BYTES in all: kept for the next piece or the flush
            self._held += data
            self.offset += len(data)
        else:  # from the start, or since a refusal: held bytes go first
            self.flush()
            self._write_buffered(data)

    def flush(self) -> None:
        """Write what direct mode holds back: its whole blocks directly, the rest (under ALIGN
        bytes) through the page cache."""
        whole = len(self._held) - len(self._held) % ALIGN
        if self.direct and whole:
            with _buffers.take() as buffer:
                buffer[:whole] = self._held[:whole]
                self._write_direct(buffer[:whole], self.offset - len(self._held))
            del self._held[:whole]
        if self._held:
            self._pwrite_buffered(memoryview(self._held), self.offset - len(self._held))
            self._held = bytearray()

    def _write_direct(self, view: memoryview, at: int) -> None:
        """Write all of `view` at `at`: directly, or, once the filesystem refuses, through the
        page cache (and so the rest of the file, from then on)."""
        if not view:
            return
        if not self._fd_direct:
            self._fd_direct = _set_direct(self._fd, True)
        going = self._fd_direct
        while view and going:
            try:
                written = os.pwrite(self._fd, view, at)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                break
            view, at = view[written:], at + written
            going = written > 0 and not written % ALIGN  # else what is left is unaligned
        if view:
            self.direct = False
            self._writeback = Writeback(self._fd, start=at)
            self._pwrite_buffered(view, at)

    def _write_buffered(self, view: memoryview) -> None:
        self._pwrite_buffered(view, self.offset)
        self.offset += len(view)

    def _pwrite_buffered(self, view: memoryview, at: int) -> None:
        if self._fd_direct:
            _set_direct(self._fd, False)
            self._fd_direct = False
        size = len(view)
        while view:
            written = os.pwrite(self._fd, view, at)
            view, at = view[written:], at + written
        if not self.direct:  # write-out of direct writes needs no asking
            self._writeback.wrote(size)
