"""Media files on local disk.

Layout under the data root:
    media/<device>/<event_id>          stored media (the name never derives from the filename)
    media/<device>/<event_id>.thumb    its thumbnail
    staging/<random>                   uploads in flight, renamed into media/ once complete
    staging/sessions/<device>/<id>     resumable uploads (resumable.py), kept across restarts
    gallery/<device>/incoming          drop folders handed out by GetDevicePaths
    gallery/<device>/thumbnails
    run/                               the running stack's files: Envoy's config, the reconciler's
                                       lock and status

A file reaches media/ only by rename after it is complete, hashed and fsynced, so a reader never
sees a partial file; staging/ lives on the same filesystem so the rename is atomic.

Disk headroom: uploads need `min_free_bytes` left on the data root's filesystem, checked when an
upload starts (require_space) and again every SPACE_CHECK_BYTES while it is written, so one upload
cannot fill the disk; a write that still hits ENOSPC is the same INSUFFICIENT_STORAGE error. The
drop-folder importer, which knows a file's size before copying it, needs room for all of it above
the headroom (require_room_for) and checks as it copies, like an upload.
Reads never check: a full disk keeps serving what it holds.

Large uploads are hashed and written by a helper thread (_Pipeline) while the RPC thread receives the
next message: hashlib and the writes to disk release the GIL on big buffers (the copy into a direct
write's aligned buffer does not, ~0.05 CPU-s per GB), so the two overlap on a second core instead
of running in series (BENCHMARKS.md measures the difference). A staged file is written past the
page cache (_direct_io.py: the kernel's page-cache allocation was at times the dearest part of
storing an upload here), so the fsync that makes it durable has only its tail to write; where
direct I/O is refused or turned off (GALLERY_DIRECT_IO), and for resumable uploads, writers ask the
kernel to start writing bytes to disk as they arrive (_writeback.py) for the same end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import logging
import os
import pathlib
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from . import _malloc, file_locks
from ._direct_io import AppendWriter
from .errors import AlreadyExists, Exhausted, TooLarge
from .media_types import SNIFF_BYTES

if TYPE_CHECKING:
    from .settings import Settings

log = logging.getLogger(__name__)

# How many bytes a staged file may grow between two free-space checks: a statvfs() costs
# microseconds, and at most this much (per upload in flight) is written below the headroom.
SPACE_CHECK_BYTES = 8 << 20


class SpaceMeter:
    """Counts the bytes a writer stores and calls `check` (a free-space check that raises to stop
    the writer) once every SPACE_CHECK_BYTES of them."""

    def __init__(self, check: Callable[[], None]) -> None:
        self._check = check
        self._unchecked = 0

    def wrote(self, size: int) -> None:
        self._unchecked += size
        if self._unchecked >= SPACE_CHECK_BYTES:
            self._unchecked = 0
            self._check()


@dataclasses.dataclass(frozen=True)
class DiskSpace:
    total_bytes: int
    free_bytes: int  # available to this (unprivileged) process


THUMBNAIL_SUFFIX = ".thumb"


def media_root(data_dir: pathlib.Path) -> pathlib.Path:
    """Where stored media files live: <data>/media/<device>/<event_id>."""
    return data_dir / "media"


# The data folder's folders, as its files are 0640: its servers and their group may read them,
# other local users may not list its devices and event ids. The drop folders themselves
# (incoming, thumbnails) are written by something else (rsync, a file share): a group the umask
# lets write may, in them only. Each less under a stricter umask.
FOLDER_MODE = 0o750
DROP_FOLDER_MODE = 0o770


def make_folders(path: pathlib.Path, mode: int = FOLDER_MODE) -> None:
    """mkdir -p, each folder it makes `mode` less the umask (Path.mkdir gives the parents it
    makes 0777 less the umask); what exists stays as it is."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=mode)
        except FileExistsError:  # made meanwhile, or something else is there
            if not folder.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(folder)) from None


def run_dir(data_dir: pathlib.Path) -> pathlib.Path:
    """Where the running stack keeps its files (Envoy's config, the reconciler's lock and status);
    not created here: each writer makes it when it writes there."""
    return data_dir / "run"


class Storage:
    def __init__(
        self, data_dir: pathlib.Path, *, min_free_bytes: int = 0, direct_io: bool = False
    ) -> None:
        self.data_dir = data_dir
        self.min_free_bytes = min_free_bytes  # the headroom (0: none)
        self.direct_io = direct_io  # write staged files past the page cache
        self.media_root = media_root(data_dir)
        self.staging_root = data_dir / "staging"
        self.sessions_root = self.staging_root / "sessions"  # made by the first resumable upload
        self.drop_root = data_dir / "gallery"
        self.run_root = run_dir(data_dir)
        make_folders(self.media_root)
        make_folders(self.staging_root)
        make_folders(self.drop_root)

    @classmethod
    def from_settings(cls, settings: Settings) -> Storage:
        """The data root with the headroom and the choice of direct I/O of the settings, their one
        owner."""
        return cls(settings.data_dir, min_free_bytes=settings.min_free_bytes, direct_io=settings.direct_io)

    def drop_folders(self, device: str) -> tuple[pathlib.Path, pathlib.Path]:
        """A device's drop folders (incoming, thumbnails), not created: for readers of them."""
        device_root = self.drop_root / device
        return device_root / DROP_INCOMING, device_root / DROP_THUMBNAILS

    def device_paths(self, device: str, *, make: bool = True) -> tuple[pathlib.Path, pathlib.Path]:
        """A device's drop folders (incoming, thumbnails), for handing out; `make`: created if
        missing."""
        incoming, thumbnails = self.drop_folders(device)
        if not make:
            return incoming, thumbnails
        make_folders(incoming.parent)  # the device's folder: a writer of its files may not rename it
        make_folders(incoming, DROP_FOLDER_MODE)
        make_folders(thumbnails, DROP_FOLDER_MODE)
        return incoming, thumbnails

    def media_path(self, device: str, event_id: str) -> pathlib.Path:
        return self.media_root / device / event_id

    def thumbnail_path(self, device: str, event_id: str) -> pathlib.Path:
        return self.media_root / device / f"{event_id}{THUMBNAIL_SUFFIX}"

    def stage(self, *, max_bytes: int, what: str) -> StagedFile:
        return StagedFile(
            self.staging_root / secrets.token_hex(16), max_bytes=max_bytes, what=what,
            storage=self, direct_io=self.direct_io,
        )

    def disk_space(self) -> DiskSpace:
        st = os.statvfs(self.data_dir)
        return DiskSpace(total_bytes=st.f_blocks * st.f_frsize, free_bytes=st.f_bavail * st.f_frsize)

    def disk_full_is_exhausted(self) -> contextlib.AbstractContextManager[None]:
        """For every writer of uploaded bytes under the data root: see the function of that name."""
        return disk_full_is_exhausted(self.data_dir, self.min_free_bytes)

    def warn_if_short_of_room(self) -> None:
        """At start: a server whose disk is already below its headroom refuses every upload."""
        free = self.disk_space().free_bytes
        if free < self.min_free_bytes:
            log.warning("the data root's free space is below GALLERY_MIN_FREE_BYTES: every upload will be"
                        " refused (507) until there is more", extra={
                            "data_dir": str(self.data_dir), "free_bytes": free, "min_free_bytes": self.min_free_bytes})

    def require_space(self) -> None:
        """Refuse to accept more bytes once the free space is down to the headroom."""
        if not self.min_free_bytes:
            return
        free = self.disk_space().free_bytes
        if free < self.min_free_bytes:
            raise insufficient_storage(free, self.min_free_bytes)

    def require_room_for(self, size: int) -> None:
        """Refuse to write `size` bytes that would take the free space below the headroom (or
        past the end of the disk): for writers that know their size before the first byte."""
        free = self.disk_space().free_bytes
        if free - size < self.min_free_bytes:
            raise insufficient_storage(free, self.min_free_bytes)

    def session_path(self, device: str, upload_id: str) -> pathlib.Path:
        return self.sessions_root / device / upload_id

    def remove_event_files(self, device: str, *event_ids: str) -> None:
        """Remove deleted events' files, each as far as it goes: their rows are gone already, so a
        file that cannot be removed now (a read-only or failing volume, a folder in its place) is
        a leftover the reconciler takes later, logged, not a failed delete. The device's folder is
        synced once for them all (a retention batch is 200 events)."""
        for event_id in event_ids:
            for path in (self.media_path(device, event_id), self.thumbnail_path(device, event_id)):
                try:
                    path.unlink(missing_ok=True)
                except OSError as exc:
                    log.warning("a deleted event's file was left for the reconciler",
                                extra={"path": str(path), "error": str(exc)})
        try:
            fsync_dir(self.media_root / device)
        except OSError as exc:
            log.warning("a deleted event's folder could not be synced",
                        extra={"path": str(self.media_root / device), "error": str(exc)})


# Below this many bytes an upload is hashed and written in the receiving thread (no helper thread
# for small files); past it, by a _Pipeline holding at most PIPELINE_DEPTH chunks in flight. At most
# MAX_PIPELINES uploads have one at a time (the others work inline, as small ones do): a few helper
# threads already keep the cores busy, and every pipeline's queued chunks are memory held per upload.
PIPELINE_AFTER_BYTES = 4 << 20
PIPELINE_DEPTH = 2
MAX_PIPELINES = 4
_pipeline_slots = threading.BoundedSemaphore(MAX_PIPELINES)
# Smaller pieces (HTTP/2 frames from Envoy can be 16 KiB) are gathered up to this size first, so
# that the per-item cost of the queue and the thread switch stays small next to the hashing.
PIPELINE_MIN_ITEM = 256 << 10


class _Pipeline:
    """Hashes and writes chunks in order on a helper thread; the first error is kept and raised
    to the receiving thread on its next call. The bounded queue keeps memory per upload to
    PIPELINE_DEPTH chunks and slows the receiver (hence gRPC flow control) when the disk is slow."""

    _STOP = object()

    def __init__(
        self, digest: hashlib._Hash, write: Callable[[bytes], None],  # type: ignore[name-defined]
    ) -> None:
        self._digest = digest
        self._write = write
        self._queue: queue.Queue[object] = queue.Queue(PIPELINE_DEPTH)
        self._error: BaseException | None = None
        self._pending = bytearray()
        self._thread = threading.Thread(target=self._run, name="staged-write", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not self._STOP:
            if self._error is not None:
                continue  # drain after a failure; the receiver learns of it on its next call
            try:
                self._digest.update(item)  # type: ignore[arg-type]
                self._write(item)  # type: ignore[arg-type]
            except BaseException as exc:  # noqa: BLE001 - handed to the receiving thread
                self._error = exc
            del item  # not held while the queue is empty

    def put(self, data: bytes | memoryview) -> None:
        self.raise_error()
        if self._pending or len(data) < PIPELINE_MIN_ITEM:
            self._pending += data
            if len(self._pending) < PIPELINE_MIN_ITEM:
                return
            data, self._pending = bytes(self._pending), bytearray()
        elif isinstance(data, memoryview) and not isinstance(data.obj, bytes):
            data = bytes(data)  # a view of a buffer its owner may reuse: keep a copy
        self._queue.put(data)

    def raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def finish(self) -> None:
        """Wait until every chunk is hashed and written; raise the first error."""
        try:
            if self._pending:
                self._queue.put(bytes(self._pending))
                self._pending = bytearray()
            self._queue.put(self._STOP)
            self._thread.join()
        finally:
            _pipeline_slots.release()
        self.raise_error()


class StagedFile:
    """A file being received: bounded in size, hashed as it is written, discarded unless committed."""

    def __init__(
        self, path: pathlib.Path, *, max_bytes: int, what: str,
        storage: Storage | None = None, direct_io: bool = False,
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.what = what
        self.size = 0
        self.head = b""
        self._hash = hashlib.sha256()
        self.moved = False
        self.keep_source = False
        self._storage = storage
        self._space = SpaceMeter(storage.require_space) if storage is not None else None
        with self._disk_full_is_exhausted():  # even an empty file needs an inode
            # Read-write although only written: hold_shared's lock needs a readable descriptor.
            self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            self._out: AppendWriter | None = AppendWriter(self._fd, direct=direct_io)
            self._in_use: int | None = hold_shared(self._fd)
        except BaseException:  # no object for its owner to discard(): nothing may stay behind
            os.close(self._fd)
            path.unlink(missing_ok=True)
            raise
        self._pipeline: _Pipeline | None = None
        self._failed: BaseException | None = None

    @classmethod
    def adopt(cls, path: pathlib.Path, *, what: str, storage: Storage) -> StagedFile:
        """An existing complete file (a finished resumable upload), hashed by one streaming read;
        sync() and move() then work as for a file received here, except that move() links it
        into place and keeps `path` (`keep_source`): it is the upload's only copy until the
        event's row is committed, and the owner removes it after that."""
        self = cls.__new__(cls)
        self.path, self.what, self.moved, self.keep_source = path, what, False, True
        self._pipeline, self._failed = None, None
        self._in_use = None  # the resumable writer's exclusive lock covers the file
        self._storage = storage
        self._out = None  # read only
        self._hash = hashlib.sha256()
        self._fd = os.open(path, os.O_RDONLY)
        try:
            self.head = os.pread(self._fd, SNIFF_BYTES, 0)
            self.size = 0
            while chunk := os.read(self._fd, 1 << 20):
                self._hash.update(chunk)
                self.size += len(chunk)
        except BaseException:  # a read error: the file is its owner's, the descriptor ours
            os.close(self._fd)
            raise
        self.max_bytes = self.size
        self._space = None
        return self

    def write(self, data: bytes | memoryview) -> None:
        if not data:
            return
        if self._failed is not None:
            raise self._failed
        if self.size + len(data) > self.max_bytes:
            raise upload_too_large(self.what, self.max_bytes, field=self.what)
        if len(self.head) < SNIFF_BYTES:
            self.head += bytes(data[: SNIFF_BYTES - len(self.head)])
        if self._space is not None:
            self._space.wrote(len(data))
        assert self._fd is not None
        if (self._pipeline is None and self.size >= PIPELINE_AFTER_BYTES
                and _pipeline_slots.acquire(blocking=False)):
            try:
                self._pipeline = _Pipeline(self._hash, self._write_out)
            except BaseException:
                _pipeline_slots.release()
                raise
        if self._pipeline is not None:
            self._pipeline.put(data)
        else:
            self._hash.update(data)
            self._write_out(data)
        self.size += len(data)

    def _write_out(self, data: bytes | memoryview) -> None:
        """Write all of `data`; a full disk is INSUFFICIENT_STORAGE, not an OSError. Called by
        the receiving thread or by its pipeline's thread, never both at once."""
        assert self._out is not None
        with self._disk_full_is_exhausted():
            self._out.write(data)

    def _drain(self) -> None:
        """Wait for the helper thread's writes. Its failure stays this file's: later writes,
        sha256 and sync raise it again, so a file with a lost chunk never passes as whole."""
        if self._failed is not None:
            raise self._failed
        if self._pipeline is not None:
            pipeline, self._pipeline = self._pipeline, None
            try:
                pipeline.finish()
            except BaseException as exc:
                self._failed = exc
                raise

    @property
    def sha256(self) -> str:
        self._drain()
        return self._hash.hexdigest()

    def sync(self) -> None:
        self._drain()
        if self._fd is not None:
            with self._disk_full_is_exhausted():
                if self._out is not None:
                    self._out.flush()
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            if self.size >= PIPELINE_AFTER_BYTES:
                _malloc.trim()  # the chunks of a large upload are freed: return their memory

    def move(self, destination: pathlib.Path, *, replace: bool = True) -> None:
        """Rename into place. With replace=False an existing file is never touched: the move
        fails with AlreadyExists instead (a new event must not overwrite anyone's bytes). A
        `keep_source` file is linked, never renamed: its own name stays (a destination that is
        that very file already, linked before a crash, counts as moved)."""
        assert self._fd is None, "sync() first"
        with self._disk_full_is_exhausted():  # a new folder or directory entry needs a block too
            make_dir(destination.parent)
            if self.keep_source:
                self._link(destination, replace=replace)
            elif replace:
                os.replace(self.path, destination)
            else:
                try:
                    os.link(self.path, destination)
                except FileExistsError:
                    raise AlreadyExists(
                        "EVENT_EXISTS", f"{destination.name} is already stored", file=destination.name
                    ) from None
                os.unlink(self.path)
            self.moved = True
            fsync_dir(destination.parent)

    def _disk_full_is_exhausted(self) -> contextlib.AbstractContextManager[None]:
        if self._storage is not None:
            return self._storage.disk_full_is_exhausted()
        return disk_full_is_exhausted(self.path.parent, 0)  # a file staged outside a Storage

    def _link(self, destination: pathlib.Path, *, replace: bool) -> None:
        try:
            os.link(self.path, destination)
            return
        except FileExistsError:
            if os.path.samefile(self.path, destination):
                return
            if not replace:
                raise AlreadyExists(
                    "EVENT_EXISTS", f"{destination.name} is already stored", file=destination.name
                ) from None
        spare = destination.with_name(f".{destination.name}.{secrets.token_hex(4)}")
        os.link(self.path, spare)
        os.replace(spare, destination)

    def discard(self) -> None:
        try:
            self._drain()
        except Exception:  # noqa: BLE001 - the file is being thrown away
            pass
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if not self.moved and not self.keep_source:  # an adopted file belongs to its owner
            self.path.unlink(missing_ok=True)
        self.release()

    def release(self) -> None:
        """Drop the shared lock that marks the file as in use (hold_shared); discard() calls it,
        and Gallery.store() keeps it until the row owning the moved file is committed."""
        if self._in_use is not None:
            os.close(self._in_use)
            self._in_use = None


# The names of a device's drop folders under <data>/gallery/<device>/ (Storage.drop_folders).
DROP_INCOMING, DROP_THUMBNAILS = "incoming", "thumbnails"
INSUFFICIENT_STORAGE = "INSUFFICIENT_STORAGE"  # the reason of every refusal for want of disk space


# A refusal for want of space is the operator's to act on, not the client's: it is logged as a
# WARNING (an access line is INFO), at most once a minute per process.
SHORT_OF_ROOM_WARNING_SECONDS = 60.0
_short_of_room_warned = [-SHORT_OF_ROOM_WARNING_SECONDS]
_short_of_room_lock = threading.Lock()  # uploads on many threads are refused at the same moment


def _first_refusal_this_minute() -> bool:
    with _short_of_room_lock:
        now = time.monotonic()
        if now - _short_of_room_warned[0] < SHORT_OF_ROOM_WARNING_SECONDS:
            return False
        _short_of_room_warned[0] = now
        return True


def insufficient_storage(free: int, headroom: int) -> Exhausted:
    if _first_refusal_this_minute():
        log.warning("uploads refused: the data root's free space is below GALLERY_MIN_FREE_BYTES; free space"
                    " or lower the headroom", extra={"free_bytes": free, "min_free_bytes": headroom})
    return Exhausted(
        INSUFFICIENT_STORAGE,
        "the server is short of disk space and accepts no uploads for now: retry later",
        free_bytes=str(free), min_free_bytes=str(headroom),
    )


def upload_too_large(what: str, limit: int, *, field: str) -> TooLarge:
    """The one refusal of media (`what`: "event", or "thumbnail") past `limit` bytes, whether a
    declared size or the bytes written found it; `field` is the request field at fault."""
    return TooLarge(
        "UPLOAD_TOO_LARGE", f"{what} is larger than {limit} bytes", field=field, limit=str(limit),
    )


@contextlib.contextmanager
def disk_full_is_exhausted(where: pathlib.Path, headroom: int) -> Iterator[None]:
    """A write or fsync that finds the disk (or the quota) full is INSUFFICIENT_STORAGE (507),
    whatever the headroom said: every writer of uploaded bytes wraps those two calls in this.

    The error tells the client what the headroom check would have: the space left on `where`'s
    filesystem then (what statvfs reports; a full quota can leave the disk itself with room) and
    the headroom, so that it agrees with the admin status."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        try:
            st = os.statvfs(where)
            free = st.f_bavail * st.f_frsize
        except OSError:
            free = 0  # the refusal matters more than the figure
        raise insufficient_storage(free, headroom) from None


def hold_shared(fd: int) -> int:
    """Mark an open file as in use: a shared lock on its open file description (`fd` must be open
    for reading: file_locks.py), kept by a duplicate descriptor (closing the writing one does not
    drop it). The reconciler removes a file only under an exclusive lock it gets without waiting
    (reconcile.py), so never one in use."""
    file_locks.lock(fd, shared=True)
    return os.dup(fd)


_DURABLE_DIRS: set[pathlib.Path] = set()
_DURABLE_DIRS_LOCK = threading.Lock()


def make_dir(path: pathlib.Path) -> None:
    """mkdir -p, durably: a new device folder's own entry must survive a crash with the files
    linked into it, so its parent is fsynced. Once per process per folder, not only when this
    call created it: a process that died between the mkdir and the fsync left a folder that
    exists but whose entry may not be durable."""
    if path in _DURABLE_DIRS:
        return
    if not path.is_dir():
        make_dir(path.parent)
        make_folders(path)  # its parent is there: this one folder
    fsync_dir(path.parent)
    with _DURABLE_DIRS_LOCK:
        _DURABLE_DIRS.add(path)


def fsync_dir(path: pathlib.Path) -> None:
    # A rename or unlink is durable only once its directory is fsynced.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
