"""GALLERY_RETENTION_DAYS: events older than that are deleted, as a user's DELETE would.

A fleet's cameras never stop; without a limit on age, the disk (or a device's quota) fills and
uploads are refused until someone deletes by hand. "Keep N days" is the rule such fleets run by.

Older means both created and received before the cutoff. `created` is when the device captured
an announced event and when the server stored an upload; `received_at`, when the server got the
row. An event goes once both are past: a backlog a device announces today is kept for the
retention from today, and a device whose clock was set back to 1970 does not see its captures
deleted as decades old. Rows from before `received_at` was kept go by `created` alone. Stored and
announced events alike: an announced one deleted so is answered `deleted` when its device
announces it again (Devices.announce), as after a user's delete, and is not listed again.

Every replica runs the loop (Retention), and so may several at once: each event is deleted by one
DELETE of its row (Gallery.delete_events), which only one of them finds. A pass walks the devices
that have events and, for each, deletes the oldest past the cutoff in batches, each batch one
transaction whose files are removed after its commit (rows first: a crash leaves files without
rows, which reconciliation removes, never the reverse). The index on (device, created) makes
finding them a range read per device, however many events are kept. A device whose batch was full
may have more: the passes that follow at once look at those devices alone, so a backlog on a few
devices of a large fleet costs a batch's reads, not a walk of the fleet per batch (and every device
is looked at again once an interval has passed, however long the backlog lasts). A device whose
batch another replica deleted first is left to that replica.
"""

from __future__ import annotations

import datetime
import logging
import math
import time

import sqlalchemy as sa
from sqlmodel import col

from .background import BackgroundLoop
from .clock import utcnow
from .models import Event, EventCount
from .service import Gallery

log = logging.getLogger(__name__)

# Events deleted per transaction: a batch's row locks are held until its commit.
BATCH = 200
# How often a replica looks for events past the cutoff; a pass that deleted some goes on at once
# (BackgroundLoop: busy), until one finds none.
INTERVAL_SECONDS = 600.0

_DEVICES = sa.select(EventCount.device).where(col(EventCount.count) > 0).distinct()
# Both the capture and its arrival before the cutoff. `created` first, for the (device, created)
# index; `received_at` (NULL in rows from before the server kept it) then holds back what a device
# with a clock set back announced lately.
_EXPIRED = (
    sa.select(Event.id)
    .where(col(Event.device) == sa.bindparam("device"), col(Event.created) < sa.bindparam("cutoff"),
           sa.or_(col(Event.received_at).is_(None), col(Event.received_at) < sa.bindparam("cutoff")))
    .order_by(col(Event.created), col(Event.id))
    .limit(BATCH)
)


class Retention(BackgroundLoop):
    thread_name = "retention"

    def __init__(self, gallery: Gallery, days: float, interval: float = INTERVAL_SECONDS) -> None:
        super().__init__(interval)
        self.gallery = gallery
        self.keep = datetime.timedelta(days=days)
        self.behind: list[str] = []  # devices whose last batch was full: more may be waiting
        self._walked_at = -math.inf  # time.monotonic() of the last pass over every device

    def run_pass(self) -> bool:
        # The devices behind alone, but every device again once an interval has passed since the
        # last such pass: a backlog of millions on one device does not hold back the others'.
        if self.behind and time.monotonic() - self._walked_at < self.interval:
            self.expire(devices=self.behind)
        else:
            self._walked_at = time.monotonic()
            self.expire()
        return bool(self.behind)  # the next pass comes at once

    def expire(self, now: datetime.datetime | None = None, devices: list[str] | None = None) -> int:
        """Delete up to a batch per device (of `devices`, else of every device with events) of the
        events created and received before `now` (the clock's, if not given) less the retention;
        returns how many were deleted, and notes in `behind` the devices whose batch was full and
        deleted here."""
        cutoff = (now or utcnow()).astimezone(datetime.UTC) - self.keep  # SQLite compares UTC text
        db = self.gallery.db
        if devices is None:
            with db.read() as connection:
                devices = list(connection.execute(_DEVICES).scalars())
        self.behind = []  # until this pass ends: one that fails is followed by a whole walk
        expired, behind = 0, []
        for device in devices:
            with db.read() as connection:
                ids = list(connection.execute(_EXPIRED, {"device": device, "cutoff": cutoff}).scalars())
            if not ids:
                continue
            deleted = self.gallery.delete_events(device, ids)
            if not deleted:  # another replica deleted these first, and has the device in hand
                continue
            if len(ids) == BATCH:
                behind.append(device)
            expired += len(deleted)
            log.info("events expired", extra={
                "device": device, "events": len(deleted), "cutoff": cutoff.isoformat(),
                "retention_days": self.keep / datetime.timedelta(days=1)})
        self.behind = behind
        return expired
