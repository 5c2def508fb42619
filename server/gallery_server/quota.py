"""GALLERY_MAX_DEVICE_BYTES: how many bytes of media one device may keep stored on the server.

A fleet shares one disk: without a quota, one device whose clock loops or whose camera never
stops can take every byte above the headroom (GALLERY_MIN_FREE_BYTES) from all the others. The
figure is models.DeviceUsage, kept by database triggers, so no request sums a device's events, plus
its pre-signed thumbnails waiting for their media (a few rows, by a partial index of their own).

Where it is checked (DEVICE_QUOTA_EXCEEDED, RESOURCE_EXHAUSTED, 507 through Envoy):
- before any byte: a resumable session (or write) of a device at its quota, and a declared size
  that does not fit (an upload header's, a Content-Length, a session's), are refused at once; an
  upload of a device at its quota at its first byte (a form may name a retry before it, below);
  a drop-folder scan reads the figure once per device and leaves the files that do not fit where
  they are, uncopied;
- while an upload streams, against the room there was when it started, read again before a
  refusal (events deleted meanwhile make room);
- none of these refuse a retry of a capture the device has stored already (its device_event_id,
  told before the bytes: Gallery.room_for, Upload._check_room): it stores nothing, and answers
  that capture's event, so a device that lost the answer of the upload that filled its quota
  learns it was stored;
- in the transaction that stores the event, after its write (Gallery.store): the write's trigger
  holds the device's usage row until COMMIT, so concurrent stores of one device take turns and
  the quota holds exactly, on every replica. The earlier checks only save the client's bytes.

What counts: stored events' media, and the thumbnails the device sent: a stored event's, an
announced event's (left out of an announcement that does not fit) and a pre-signed thumbnail's that
came before its media (UploadGrant.thumbnail_bytes); a thumbnail is checked as media is, and in the
transaction that attaches it. Not those the server made, which the server chose to make and bounds
itself, and not an announced event's size: a file the device still holds. Deleting events frees
room at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import sqlalchemy as sa
from sqlmodel import Session, col

from .db import Database
from .errors import Exhausted
from .models import DeviceUsage, UploadGrant

QUOTA_EXCEEDED = "DEVICE_QUOTA_EXCEEDED"

# What the device keeps: its usage row, and the thumbnails its pre-signed URLs brought before their
# media (no event counts those yet; their files are on the disk until the URL's media comes or the
# URL is swept, reconcile.py).
_USED = sa.select(
    sa.select(DeviceUsage.stored_bytes).where(col(DeviceUsage.device) == sa.bindparam("device"))
    .scalar_subquery(),
    sa.select(sa.func.coalesce(sa.func.sum(UploadGrant.thumbnail_bytes), 0))
    .where(col(UploadGrant.device) == sa.bindparam("device"), col(UploadGrant.thumbnail_bytes).is_not(None),
           col(UploadGrant.media_state) != "done")
    .scalar_subquery(),
)
# Of the devices that store the most, how many the admin status names.
LARGEST_SHOWN = 10
# A device "near" its quota uses at least this percentage of it (the admin status counts them).
NEAR_PERCENT = 90


@dataclasses.dataclass(frozen=True)
class Usage:
    """A device's quota and what it has stored, as GetStats tells it."""

    limit: int
    used: int

    @property
    def available(self) -> int:
        return max(0, self.limit - self.used)


@dataclasses.dataclass(frozen=True)
class Summary:
    """Stored media per device, for operators (the admin status)."""

    limit: int  # 0: no quota
    stored_bytes: int  # by every device
    at_quota: int
    near_quota: int
    largest: list[tuple[str, int]]  # (device, bytes stored), largest first


@dataclasses.dataclass
class Room:
    """A device's quota and what it had stored when an upload started."""

    device: str
    limit: int
    used: int
    reread: Callable[[], int]  # what the device has stored now

    def check(self, size: int) -> None:
        """Refuse media of `size` bytes that would take the device past its quota, as it is now:
        events deleted since the upload started make room for it too."""
        if self.used + size > self.limit:
            self.used = self.reread()
            if self.used + size > self.limit:
                raise quota_exceeded(self.device, self.limit, self.used, size)


class DeviceQuota:
    def __init__(self, db: Database, limit: int) -> None:
        self._db = db
        self.limit = limit  # 0: no quota

    def used(self, device: str) -> int:
        return _sum(self._db.read_rows(_USED, {"device": device}))

    def usage(self, device: str) -> Usage | None:
        """The device's quota and what it has stored now; None: no quota."""
        return Usage(self.limit, self.used(device)) if self.limit else None

    def summary(self) -> Summary:
        """The bytes stored, the devices that store the most and, with a quota, how many are at
        or near it: from the usage rows (one per device that ever stored, not one per event)."""
        with self._db.session() as session:
            largest = session.execute(
                sa.select(DeviceUsage.device, DeviceUsage.stored_bytes)
                .where(col(DeviceUsage.stored_bytes) > 0)
                .order_by(col(DeviceUsage.stored_bytes).desc(), col(DeviceUsage.device))
                .limit(LARGEST_SHOWN)
            ).all()
            limit = self.limit or None  # NULL: nothing is at or near no quota
            near = None if limit is None else -(-limit * NEAR_PERCENT // 100)  # rounded up
            stored, at_quota, near_quota = session.execute(sa.select(
                sa.func.coalesce(sa.func.sum(DeviceUsage.stored_bytes), 0),
                sa.func.count().filter(col(DeviceUsage.stored_bytes) >= sa.literal(limit, sa.BigInteger)),
                sa.func.count().filter(col(DeviceUsage.stored_bytes) >= sa.literal(near, sa.BigInteger)),
            )).one()
        return Summary(self.limit, int(stored), int(at_quota), int(near_quota),
                       [(device, int(used)) for device, used in largest])

    def room(self, device: str) -> Room | None:
        """The device's quota and what it has stored now; None: no quota."""
        if not self.limit:
            return None
        return Room(device, self.limit, self.used(device), lambda: self.used(device))

    def require_room(self, device: str, size: int | None = None) -> Room | None:
        """The device's room for a new upload (None: no quota), refused at once when the device
        is at its quota already or `size`, if known, does not fit."""
        room = self.room(device)
        if room is None:
            return None
        if room.used >= self.limit:
            raise quota_exceeded(device, self.limit, room.used, size or 0)
        if size is not None:
            room.check(size)
        return room

    def check_stored(self, session: Session, device: str, size: int, *, lock: bool = False) -> None:
        """In the transaction that stored `size` bytes for the device (media, thumbnail or both),
        after the write: refuse (and so roll back) a store that took the device past its quota.
        `lock`: take the device's usage row's lock first, for a write no trigger counts (a
        pre-signed thumbnail before its media), so that concurrent stores still take turns."""
        if not self.limit:
            return
        session.flush()  # the write, whose trigger counts it and locks the device's usage row
        if lock:
            session.execute(_LOCK_USAGE, {"device": device})
        used = _sum(session.execute(_USED, {"device": device}).all())
        if used > self.limit:
            raise quota_exceeded(device, self.limit, used - size, size)


# A usage row made or locked without a change: upload_grants has no trigger to do it.
_LOCK_USAGE = sa.text(
    "INSERT INTO device_usage (device, stored_bytes) VALUES (:device, 0) "
    "ON CONFLICT (device) DO UPDATE SET stored_bytes = device_usage.stored_bytes"
)


def _sum(rows: list) -> int:  # type: ignore[type-arg]
    """The usage row's figure and the thumbnails waiting for their media, of _USED's one row."""
    return sum(int(value or 0) for value in rows[0]) if rows else 0


def quota_exceeded(device: str, limit: int, used: int, size: int) -> Exhausted:
    """`size`: what did not fit (a declared size, or what a stream had sent when it passed the
    room); 0 when the device is at its quota before any size is known."""
    why = (f"{size} more bytes do not fit in the {max(0, limit - used)} left" if size
           else "it is at its quota")
    return Exhausted(
        QUOTA_EXCEEDED,
        f"device {device} has {used} bytes of media stored and a quota of {limit}"
        f" (GALLERY_MAX_DEVICE_BYTES): {why}; delete events to make room",
        device=device, quota_bytes=str(limit), used_bytes=str(used), size=str(size),
    )
