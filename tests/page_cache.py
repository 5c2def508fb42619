"""Which of a file's pages the kernel holds in its page cache (mincore), for the tests of writes
made past it (server/gallery_server/_direct_io.py)."""

from __future__ import annotations

import ctypes
import mmap
import os
import pathlib
import secrets

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


def cached_pages(path: pathlib.Path) -> int:
    """How many of the file's pages are in the page cache now (mincore on a shared mapping)."""
    size = path.stat().st_size
    if not size:
        return 0
    fd = os.open(path, os.O_RDONLY)
    try:
        address = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert address not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vector = ctypes.create_string_buffer(pages)
            assert _libc.mincore(address, size, vector) == 0, os.strerror(ctypes.get_errno())
            return sum(byte & 1 for byte in vector.raw)
        finally:
            _libc.munmap(address, size)
    finally:
        os.close(fd)



def direct_writes_skip_the_cache(folder: pathlib.Path) -> bool:
    """Whether a direct write in `folder` leaves nothing in the page cache: False where the
    filesystem refuses direct I/O, or keeps its files in memory anyway (tmpfs takes O_DIRECT).
    Asked of the kernel itself, not of the code under test, so that code cannot skip its tests."""
    probe = folder / f".probe-{secrets.token_hex(4)}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o600)
    except OSError:
        probe.unlink(missing_ok=True)
        return False
    try:
        block = mmap.mmap(-1, 128 << 10)  # page-aligned
        block.write(os.urandom(len(block)))
        try:
            os.write(fd, block)
        except OSError:
            return False
        os.fsync(fd)
        return not cached_pages(probe)
    finally:
        os.close(fd)
        probe.unlink()
