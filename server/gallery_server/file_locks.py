"""Advisory locks on open files, shared by replicas on one host or on shared storage.

Every lock the server takes on a file goes through here: a resumable writer's, the in-use mark of
a file being received, the reconciler's before it removes a file, and the import and reconcile
lock files. They are open file description locks (Linux's F_OFD_SETLK), for three reasons:

* Like flock, they belong to the open file description, not to the process: two threads of one
  server that open the same file exclude each other, a duplicate descriptor keeps the lock, and
  the lock ends when the last descriptor of that opening is closed. Classic fcntl locks belong to
  the process and end when any of its descriptors of the file is closed, which would let a
  second stream of the same upload in the same process in.
* On NFS, Linux turns flock into a byte-range lock, which needs a descriptor open for reading
  for a shared lock and for writing for an exclusive one, or it fails (EBADF). OFD locks make
  that rule the same on every filesystem, so a descriptor opened with the wrong mode fails here,
  on a local disk and in the tests, not first on a customer's NFS mount.
* They are byte-range locks on NFS too, so replicas on several hosts see each other's.

Only the whole file is ever locked, and locks are never dropped explicitly: closing releases them.

Each lock is also taken as a flock, first, for a rolling upgrade: servers of 2026-11-29 and before
lock with flock only, which Linux keeps apart from OFD locks on a local disk, so a replica of each
kind sharing one data root would not see the other's locks (two writers of one resumable upload,
a file in use removed, a device's files imported twice). On NFS both are byte-range locks of the
same owner, the open file, and never conflict with each other. The flock half can go once no
replica of those versions shares a data root with this one.
"""

from __future__ import annotations

import errno
import fcntl
import struct

# struct flock on 64-bit Linux: l_type, l_whence (short), l_start, l_len (off_t), l_pid (pid_t,
# 0 for OFD locks), padded to 32 bytes. l_start = l_len = 0 is the whole file, however it grows.
_FLOCK = struct.Struct("hhqqi4x")


def _request(fd: int, command: int, lock_type: int) -> None:
    fcntl.fcntl(fd, command, _FLOCK.pack(lock_type, 0, 0, 0, 0))


def _type(shared: bool) -> int:
    return fcntl.F_RDLCK if shared else fcntl.F_WRLCK


def try_lock(fd: int, *, shared: bool = False) -> bool:
    """Lock the whole file without waiting; False if another opening holds a conflicting lock.

    A shared lock needs `fd` open for reading and an exclusive one for writing (OSError EBADF
    otherwise). Only for a descriptor that holds no lock yet: flock converts a lock by unlocking
    it first, so a failed conversion would lose the flock half (no caller converts)."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    try:
        _request(fd, fcntl.F_OFD_SETLK, _type(shared))
    except OSError as exc:
        fcntl.flock(fd, fcntl.LOCK_UN)
        if exc.errno in (errno.EAGAIN, errno.EACCES):  # POSIX allows either for "held"
            return False
        raise
    return True


def held(fd: int) -> bool:
    """Whether another opening holds any lock on the file, for a descriptor opened read-only.

    Locally, an exclusive flock (which needs no access mode) answers for the flock-only locks of
    older servers, and keeps lockers of this version out until `fd` is closed; on NFS it fails
    (EBADF: a byte-range lock there), where the byte-range query below sees flocks too."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError as exc:
        if exc.errno != errno.EBADF:
            raise
    answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, 0, 0, 0, 0))
    return _FLOCK.unpack(answer)[0] != fcntl.F_UNLCK


def lock(fd: int, *, shared: bool = False) -> None:
    """Lock the whole file, waiting as long as it takes (the GIL is released meanwhile). Both
    halves in try_lock's order, so two waiters never hold one half each."""
    fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
    try:
        _request(fd, fcntl.F_OFD_SETLKW, _type(shared))
    except BaseException:  # not half a lock: the caller may keep the descriptor open
        fcntl.flock(fd, fcntl.LOCK_UN)
        raise
