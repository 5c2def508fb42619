"""glibc malloc tuning for a process that moves large buffers through many threads.

Upload chunks are 1 MiB bytes objects allocated and freed by dozens of RPC threads. glibc keeps
freed memory in per-thread arenas and, after large frees, raises its mmap threshold so that later
1 MiB buffers come from those arenas too; the process then keeps its peak RSS for good (after 64
concurrent uploads the server stayed at ~310 MiB with nothing in flight). Fewer arenas and a trim
after each large upload return that memory. On other C libraries both calls do nothing.
"""

from __future__ import annotations

import ctypes
import threading

M_ARENA_MAX = -8  # mallopt parameter, <malloc.h>

try:
    _libc: ctypes.CDLL | None = ctypes.CDLL(None)
    _libc.mallopt  # noqa: B018 - glibc only
    _libc.malloc_trim  # noqa: B018
except (OSError, AttributeError):
    _libc = None

_trim_lock = threading.Lock()


def limit_arenas(arenas: int = 2) -> None:
    """At most `arenas` malloc arenas (default 8 per core): set before the RPC threads start."""
    if _libc is not None:
        _libc.mallopt(M_ARENA_MAX, arenas)


def trim() -> None:
    """Give freed heap memory back to the OS (a few ms; one caller at a time, others skip)."""
    if _libc is not None and _trim_lock.acquire(blocking=False):
        try:
            _libc.malloc_trim(0)
        finally:
            _trim_lock.release()
