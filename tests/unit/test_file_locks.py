"""file_locks: locks that hold between threads of one process and between processes, and follow
NFS's rule on descriptor modes on every filesystem (so the suite catches a lock site opened
with the wrong mode, here rather than on an NFS mount)."""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys
import threading
import time

import pytest

from gallery_server import file_locks


@pytest.fixture
def path(tmp_path):
    target = tmp_path / "locked"
    target.write_bytes(b"x")
    return target


def opened(path, flags=os.O_RDWR) -> int:
    return os.open(path, flags)


def test_two_openings_in_one_process_exclude_each_other(path):
    # What classic fcntl locks cannot do: they belong to the process, which would get both.
    first, second = opened(path), opened(path)
    try:
        assert file_locks.try_lock(first)
        assert not file_locks.try_lock(second)
        assert not file_locks.try_lock(second, shared=True)
        os.close(first)
        first = -1
        assert file_locks.try_lock(second)
    finally:
        for fd in (first, second):
            if fd >= 0:
                os.close(fd)


def test_shared_locks_coexist_and_keep_out_an_exclusive_one(path):
    readers = [opened(path) for _ in range(2)]
    writer = opened(path)
    try:
        assert all(file_locks.try_lock(fd, shared=True) for fd in readers)
        assert not file_locks.try_lock(writer)
        # One reader converting to exclusive must wait for the other reader too.
        assert not file_locks.try_lock(readers[0])
        os.close(readers.pop())
        assert file_locks.try_lock(readers[0])  # the conversion, now alone
        assert not file_locks.try_lock(writer, shared=True)
    finally:
        for fd in (*readers, writer):
            os.close(fd)


def test_a_duplicate_keeps_the_lock_until_the_last_descriptor_closes(path):
    # storage.hold_shared relies on this: the writing descriptor closes, the mark stays.
    fd = opened(path)
    file_locks.lock(fd, shared=True)
    kept = os.dup(fd)
    os.close(fd)
    other = opened(path)
    try:
        assert not file_locks.try_lock(other)
        os.close(kept)
        assert file_locks.try_lock(other)
    finally:
        os.close(other)


def test_a_lock_held_by_another_process_is_seen_and_ends_with_it(path):
    holding = (
        "import os, sys\n"
        "from gallery_server import file_locks\n"
        f"fd = os.open({str(path)!r}, os.O_RDWR)\n"
        "file_locks.lock(fd)\n"
        "print('held', flush=True)\n"
        "sys.stdin.readline()\n"
    )
    fd = opened(path)
    try:
        with subprocess.Popen([sys.executable, "-c", holding], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) as holder:
            assert holder.stdout.readline() == "held\n"
            assert not file_locks.try_lock(fd, shared=True)
            holder.stdin.close()  # it exits, and its lock goes with it
            assert holder.wait(timeout=10) == 0
        assert file_locks.try_lock(fd)
    finally:
        os.close(fd)


def test_lock_waits_for_the_holder(path):
    holder, waiter = opened(path), opened(path)
    assert file_locks.try_lock(holder)
    releaser = threading.Timer(0.3, os.close, (holder,))
    started = time.monotonic()
    releaser.start()
    try:
        file_locks.lock(waiter)
        assert time.monotonic() - started >= 0.25
    finally:
        releaser.join()
        os.close(waiter)


@pytest.mark.parametrize(("flags", "shared"), [(os.O_WRONLY, True), (os.O_RDONLY, False)])
def test_a_descriptor_without_the_access_the_lock_needs_is_refused(path, flags, shared):
    # NFS's rule (flock there is a byte-range lock): shared needs reading, exclusive writing.
    # Every lock site opens its file accordingly; this is what keeps them honest on local disks.
    fd = opened(path, flags)
    try:
        with pytest.raises(OSError) as refused:
            file_locks.try_lock(fd, shared=shared)
        assert refused.value.errno == errno.EBADF
    finally:
        os.close(fd)


def held_now(path) -> bool:
    """held() on a read-only descriptor of its own, closed after (held() keeps others out of
    the file until then, as the reconciler wants until its unlink)."""
    reader = opened(path, os.O_RDONLY)
    try:
        return file_locks.held(reader)
    finally:
        os.close(reader)


def test_held_says_whether_another_opening_has_a_lock_on_a_read_only_descriptor(path):
    # The reconciler's question for a file it may only read (reconcile.py).
    holder = opened(path)
    try:
        assert not held_now(path)
        file_locks.lock(holder, shared=True)  # an upload's in-use mark
        assert held_now(path)
    finally:
        os.close(holder)
    assert not held_now(path)


def test_held_keeps_lockers_out_until_its_descriptor_closes(path):
    reader, other = opened(path, os.O_RDONLY), opened(path)
    try:
        assert not file_locks.held(reader)
        assert not file_locks.try_lock(other, shared=True)
        os.close(reader)
        reader = -1
        assert file_locks.try_lock(other, shared=True)
    finally:
        for fd in (reader, other):
            if fd >= 0:
                os.close(fd)


def test_held_sees_a_flock_of_an_older_server(path):
    reader, old = opened(path, os.O_RDONLY), opened(path)
    try:
        fcntl.flock(old, fcntl.LOCK_SH | fcntl.LOCK_NB)  # an older replica's in-use mark
        assert file_locks.held(reader)
    finally:
        os.close(reader)
        os.close(old)
