"""The scrub (`gallery verify`): every stored event's media file read whole and checked against
the size and SHA-256 recorded at upload.

The reconciler (reconcile.py) looks only at each file's existence and size, on every pass: a file
whose bytes changed in place (bit rot, a failing disk, someone's edit) keeps its size and passes,
while downloads go on announcing the recorded digest (x-content-sha256, ETag) over other bytes.
Reading every byte is too dear for a periodic pass, so an operator runs this on demand.

It changes no media file, no row and no media folder (it takes no Storage, which makes folders).
Each damaged or missing file is logged as one ERROR line with its device and event id, and
counted. A whole run over every device leaves its totals in <data>/run/verify.json, where the
admin status and every replica's metrics read them: an alert on damage needs no log rule. A run of
one device, or one stopped by Ctrl-C, has seen only part of the gallery and leaves none: its
clean totals would hide damage the last whole run found.

Its cost stays bounded whatever the gallery's size: rows are read ROW_BATCH at a time by id (one
short read each, no transaction held open while files are read), each file in CHUNK_BYTES reads
into one buffer, and an optional rate limit leaves the disk to live uploads and downloads.

A service running meanwhile raises no false alarm: a file that fails is read again, and reported
only if it fails again and its row is still stored, with the same size and digest, after that.
Rows are deleted before their files (service.py: delete_events), so a row still there after its
file was seen missing or wrong had that file; a file replaced meanwhile by a complete one passes
the second read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import pathlib
import stat
import time
from typing import Any

import sqlalchemy as sa
from sqlmodel import col

from . import status_files, storage
from .clock import rfc3339, utcnow
from .db import Database
from .models import Event

log = logging.getLogger(__name__)

ROW_BATCH = 500
CHUNK_BYTES = 1 << 20
PROGRESS_SECONDS = 10.0
MAX_EXAMPLES = 20  # named in the totals; every one is logged
# The rate limit lets reading fall behind and catch up by at most this much, not by an hour of it
# in one burst after a slow stretch.
MAX_BURST_SECONDS = 1.0


@dataclasses.dataclass
class Totals:
    """One scrub: what it read and what it found."""

    device: str = ""  # "" for every device
    started: str = ""  # RFC 3339 UTC
    finished: str = ""  # "" while it runs, and for a run stopped before its end
    interrupted: bool = False  # stopped before its end (Ctrl-C): the figures are the part done
    events: int = 0  # stored events in scope when it began
    checked: int = 0
    skipped: int = 0  # stored without a recorded sha256: nothing to check against
    bytes_read: int = 0
    damaged: int = 0  # another size, another digest, or unreadable
    missing: int = 0
    seconds: float = 0.0
    examples: list[str] = dataclasses.field(default_factory=list)  # "<device>/<event_id>"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class _Row:
    id: str
    device: str
    size: int
    sha256: str


class Scrub:
    def __init__(
        self, db: Database, data_dir: pathlib.Path, *, bytes_per_second: float = 0
    ) -> None:
        self.db = db
        self.media_root = storage.media_root(data_dir)  # not a Storage: that makes folders
        self.bytes_per_second = bytes_per_second  # 0: no limit
        self._paid_until = 0.0  # the rate limit: when the bytes read so far may have been read
        self._buffer = bytearray(CHUNK_BYTES)  # every file is read through this one

    def media_path(self, device: str, event_id: str) -> pathlib.Path:
        """Storage.media_path."""
        return self.media_root / device / event_id

    def run(self, *, device: str | None = None) -> Totals:
        """Read every stored file of `device` (every device: None); Ctrl-C ends it early, with the
        totals of the part done (`interrupted`)."""
        started = time.monotonic()
        totals = Totals(device=device or "", started=rfc3339(utcnow()))
        try:
            self._read_all(totals, device, started)
        except KeyboardInterrupt:
            totals.interrupted = True
        totals.seconds = round(time.monotonic() - started, 3)
        if totals.interrupted:
            log.warning("verify stopped before its end", extra=_summary(totals, totals.seconds))
            return totals
        totals.finished = rfc3339(utcnow())
        (log.error if totals.damaged or totals.missing else log.info)(
            "verified", extra=_summary(totals, totals.seconds))
        return totals

    def _read_all(self, totals: Totals, device: str | None, started: float) -> None:
        in_scope = [Event.state == "stored"] + ([Event.device == device] if device else [])
        with self.db.read() as connection:
            totals.events = connection.execute(
                sa.select(sa.func.count()).select_from(Event).where(*in_scope)).scalar_one()
        self._paid_until = time.monotonic()
        reported = started
        after = ""
        while True:
            with self.db.read() as connection:
                rows = [_Row(*r) for r in connection.execute(
                    sa.select(Event.id, Event.device, Event.size, Event.sha256)
                    .where(*in_scope, col(Event.id) > after).order_by(col(Event.id)).limit(ROW_BATCH)
                )]
            if not rows:
                break
            suspects: dict[str, tuple[_Row, dict[str, Any]]] = {}
            for row in rows:
                if not row.sha256:
                    totals.skipped += 1
                    continue
                totals.checked += 1
                problem = self._check(row, totals)
                if problem is not None:
                    problem = self._check(row, totals)  # read again: replaced meanwhile?
                if problem is not None:
                    suspects[row.id] = (row, problem)
                if time.monotonic() - reported >= PROGRESS_SECONDS:
                    reported = time.monotonic()
                    log.info("verify progress", extra=_summary(totals, reported - started))
            for row, problem in self._still_stored(suspects):
                self._report(totals, row, problem)
            after = rows[-1].id

    def _still_stored(self, suspects: dict[str, tuple[_Row, dict[str, Any]]]) -> list[tuple[_Row, dict[str, Any]]]:
        """The suspects whose rows are still stored as they were read, in id order: one select
        for a batch's, not one per row (a media volume that did not mount makes every row one)."""
        if not suspects:
            return []
        with self.db.read() as connection:
            now = {_Row(*r) for r in connection.execute(
                sa.select(Event.id, Event.device, Event.size, Event.sha256)
                .where(col(Event.id).in_(list(suspects)), Event.state == "stored")
            )}
        return [suspects[i] for i in sorted(suspects) if suspects[i][0] in now]

    def _report(self, totals: Totals, row: _Row, problem: dict[str, Any]) -> None:
        if problem["problem"] == "missing":
            totals.missing += 1
        else:
            totals.damaged += 1
        if len(totals.examples) < MAX_EXAMPLES:
            totals.examples.append(f"{row.device}/{row.id}")
        log.error("stored media file damaged", extra={
            "device": row.device, "event_id": row.id, "path": str(self.media_path(row.device, row.id)),
            "size": row.size, "sha256": row.sha256, **problem,
        })

    def _check(self, row: _Row, totals: Totals) -> dict[str, Any] | None:
        """What is wrong with the row's file (as fields for its log line), or None."""
        path = self.media_path(row.device, row.id)
        try:  # O_NONBLOCK: a FIFO in the file's place must not hold the scrub for ever
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except FileNotFoundError:
            return {"problem": "missing"}
        except PermissionError:
            raise  # this user may not read the files (they are 0640): no finding about any of them
        except OSError as exc:
            return {"problem": "unreadable", "error": exc.strerror or str(exc)}
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # before open(): a folder's descriptor is refused there
            os.close(fd)
            return {"problem": "not a regular file"}
        with open(fd, "rb", buffering=0) as file:
            if st.st_size != row.size:  # no need to read it
                return {"problem": "size", "actual_size": st.st_size}
            # Drop the file's clean pages from the page cache before reading (so the disk's
            # copy is what is checked, not one cached before it rotted) and after (a scan of
            # every file must not push the servers' working set out of the cache; a file they
            # had cached is read from disk once more, the price of the first drop).
            _drop_cache(fd)
            digest = hashlib.sha256()
            view = memoryview(self._buffer)
            read = 0
            try:
                while n := file.readinto(self._buffer):
                    digest.update(view[:n])
                    read += n
                    totals.bytes_read += n
                    self._pace(n)
            except OSError as exc:  # EIO: a failing disk
                return {"problem": "unreadable", "error": exc.strerror or str(exc)}
            finally:
                _drop_cache(fd)
        if read != row.size:  # it changed while read
            return {"problem": "size", "actual_size": read}
        if digest.hexdigest() != row.sha256.lower():
            return {"problem": "sha256", "actual_sha256": digest.hexdigest()}
        return None

    def _pace(self, n: int) -> None:
        if not self.bytes_per_second:
            return
        now = time.monotonic()
        self._paid_until = max(self._paid_until, now - MAX_BURST_SECONDS) + n / self.bytes_per_second
        if self._paid_until > now:
            time.sleep(self._paid_until - now)


def status_path(data_dir: pathlib.Path) -> pathlib.Path:
    return storage.run_dir(data_dir) / "verify.json"


def record(data_dir: pathlib.Path, totals: Totals) -> None:
    """Keep a whole, finished run's totals as the last verification (for the admin status and the
    metrics)."""
    status_files.write(status_path(data_dir), totals)


def last(data_dir: pathlib.Path) -> Totals | None:
    """The last whole verification's totals; None before the first."""
    return status_files.read(status_path(data_dir), Totals)


def _summary(totals: Totals, seconds: float) -> dict[str, Any]:
    fields = ("device", "events", "checked", "skipped", "bytes_read", "damaged", "missing")
    return {name: getattr(totals, name) for name in fields} | {"seconds": round(seconds, 3)}


def _drop_cache(fd: int) -> None:
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except (AttributeError, OSError):  # not Linux, or a filesystem that takes no advice
        pass
