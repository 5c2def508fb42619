"""Devices in the loop: announced events, durable pull commands and the command channel.

Commands are rows (DeviceCommand), so they survive restarts and are shared by every replica.
A connection claims a command with a conditional UPDATE, which is what keeps two live connections
of one device from both receiving it; a command whose connection is no longer live (its row gone
when the call ended, or no heartbeat for CONNECTION_STALE_S after its server died) is delivered
again. The heartbeat is the server's own, so it cannot tell a device that went silent: that call
is ended by the PING the device leaves unanswered (Settings.keepalive_seconds, in grpc-core and in
Envoy). Replicas find new commands by polling every POLL_INTERVAL_S; within one process a pull
wakes the device's connections at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Iterator

import sqlalchemy as sa
from sqlmodel import Session, col, select

from . import validation
from .auth import DEVICE, WRITE, Principal
from .clock import aware, utcnow
from .db import Database
from .errors import (
    Busy,
    CommitOutcomeUnknown,
    Conflict,
    DatabaseUnavailable,
    Exhausted,
    FailedPrecondition,
    InvalidArgument,
    TooLarge,
    Unauthenticated,
)
from .media_types import classify, detect_mime
from .models import DeletedCapture, DeviceCommand, DeviceConnection, Event
from .quota import QUOTA_EXCEEDED
from .service import Gallery, forget_event
from .threads import Holds, thread_shares

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 1.0
HEARTBEAT_S = 5.0
CONNECTION_STALE_S = 15.0
MAX_ANNOUNCE = 1000
MAX_WAIT_S = 60
# Each open channel and each waiting pull holds one of the server's threads (GALLERY_GRPC_WORKERS),
# so one token must not be able to take them all. A device needs one channel; a few more let it
# reconnect while its server has not yet seen the old connection go (keepalive_seconds), and its
# next one replaces its oldest rather than being refused: after a network change the newest
# connection is the live one. All channels together, and all pull waits, get a share of the
# threads (threads.py); past them a channel or a waiting pull is refused (429).
MAX_CONNECTIONS_PER_DEVICE = 4
MAX_PULL_WAITS_PER_DEVICE = 4
# A channel's first message, its hello, names the device: until it comes, the stream holds a thread
# for a token that may not even be a device's, so it must come soon.
HELLO_SECONDS = 10.0


OPEN_STATES = ("pending", "delivered", "acked")
# The latest pull of an event (GetEvent answers it), as one prebuilt select on the driver's cursor
# (Database.read_rows) rather than through an ORM session.
_LATEST_PULL = (
    sa.select(DeviceCommand.state, DeviceCommand.error, DeviceCommand.created, DeviceCommand.expires_at)
    .where(col(DeviceCommand.event_id) == sa.bindparam("event_id"))
    .order_by(col(DeviceCommand.seq).desc())
    .limit(1)
)
# How a command's state reads on the event: the device has it whether or not it acknowledged.
PULL_STATES = {"pending": "pending", "delivered": "delivered", "acked": "delivered",
               "completed": "completed", "failed": "failed", "expired": "expired",
               "cancelled": "cancelled"}


def open_pulls(db: Database) -> int:
    """Pull commands not yet closed nor past their expiry: uploads devices have been asked for and
    have not finished (read from the open-key index, which closed commands leave)."""
    with db.read() as connection:
        return int(connection.execute(
            sa.select(sa.func.count()).select_from(DeviceCommand)
            .where(col(DeviceCommand.open_key).is_not(None), col(DeviceCommand.expires_at) >= utcnow())
        ).scalar_one())


@dataclasses.dataclass
class Announcement:
    device_key: str
    name: str
    media_type: str = ""
    size: int = 0
    created: datetime.datetime | None = None
    metadata_json: str = "{}"
    thumbnail: bytes = b""
    sha256: str = ""


@dataclasses.dataclass(frozen=True)
class PullStatus:
    state: str
    error: str
    requested: datetime.datetime
    expires_at: datetime.datetime


@dataclasses.dataclass(frozen=True)
class PullResult:
    event: Event
    pull: PullStatus | None

    @property
    def success(self) -> bool:
        return self.event.state == "stored" or (
            self.pull is not None and self.pull.state not in ("failed", "expired")
        )


@dataclasses.dataclass(frozen=True)
class Delivery:
    """A command handed to one connection, with what the device needs to carry it out."""

    command_id: str
    event_id: str
    device_key: str
    name: str


# Capture times closer than this are one time: they come from a device's clock through protobuf
# and the database, each free to round it.
SAME_CREATED = datetime.timedelta(seconds=1)
_DAY = datetime.timedelta(days=1)


def _same_capture(known: Event | DeletedCapture, a: Announcement) -> bool:
    """Whether an announcement describes the capture already known under its key: the same sha256
    where both sides have one; else the same size and, where the device says, the same capture
    time (a device that does not hash, writing segments of one size under reused names). New
    content under the key is a new capture."""
    if known.sha256 and a.sha256:
        return known.sha256 == a.sha256 and known.size == a.size
    if known.size != a.size:
        return False
    return a.created is None or abs(aware(known.created) - aware(a.created)) < SAME_CREATED


def _deleted_event(deleted: DeletedCapture, a: Announcement) -> Event:
    """What an announcement of a capture a user deleted answers: its old id, state `deleted`;
    nothing is stored."""
    return Event(id=deleted.event_id, device=deleted.device, name=a.name, media_type="", mime_type="",
                 size=deleted.size, sha256=deleted.sha256, created=deleted.created,
                 state="deleted", device_key=deleted.device_key)


class _Wakeups:
    """Per-device condition variables: a pull in this process wakes that device's channels. One
    is kept while a channel of its device holds it: kept for every device that ever connected or
    was pulled, they grew with the fleet for the life of the process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conditions: dict[str, tuple[threading.Condition, int]] = {}  # and how many hold it

    def hold(self, device: str) -> threading.Condition:
        """The device's condition, for a channel until it calls let_go."""
        with self._lock:
            condition, holders = self._conditions.get(device, (threading.Condition(), 0))
            self._conditions[device] = (condition, holders + 1)
            return condition

    def let_go(self, device: str) -> None:
        with self._lock:
            condition, holders = self._conditions[device]
            if holders > 1:
                self._conditions[device] = (condition, holders - 1)
            else:
                del self._conditions[device]

    def notify(self, device: str) -> None:
        with self._lock:
            held = self._conditions.get(device)
        if held is not None:  # else no channel of the device here to wake
            with held[0]:
                held[0].notify_all()


class Devices:
    def __init__(self, gallery: Gallery) -> None:
        self.gallery = gallery
        self.db = gallery.db
        self.settings = gallery.settings
        self._wakeups = _Wakeups()
        self._channels_lock = threading.Lock()
        self._channels: dict[str, list[Channel]] = {}  # open in this process, oldest first
        shares = thread_shares(self.settings)
        self.max_channels, self.max_hellos = shares.channels, shares.hellos
        self._greeting = Holds(MAX_CONNECTIONS_PER_DEVICE, total=shares.hellos)  # by token (held_for)
        self._pull_waits = Holds(MAX_PULL_WAITS_PER_DEVICE, total=shares.pull_waits)  # by device
        # And by token (held_for): a token of many devices, or of all, held the whole share.
        self._pull_waiters = Holds(MAX_PULL_WAITS_PER_DEVICE, total=shares.pull_waits)

    # -- inventory ----------------------------------------------------------------------------

    def announce(
        self, principal: Principal, device: str, announcements: list[Announcement]
    ) -> list[Event]:
        principal.require(validation.device_id(device), DEVICE)
        if len(announcements) > MAX_ANNOUNCE:
            raise TooLarge("TOO_MANY_EVENTS", f"at most {MAX_ANNOUNCE} events per announcement",
                           field="events")
        keys: set[str] = set()
        for a in announcements:
            if not 1 <= len(a.device_key) <= 512 or not a.device_key.isprintable():
                raise InvalidArgument(
                    "INVALID_DEVICE_KEY", "device_key must be 1..512 printable characters",
                    field="device_key",
                )
            # A key names one file: twice in a call, the second replaced the first's event
            # within the call, and the answer named an event that no longer existed.
            if a.device_key in keys:
                raise InvalidArgument(
                    "DUPLICATE_DEVICE_KEY", f"device_key {a.device_key!r} is announced twice",
                    field="device_key", device_key=a.device_key,
                )
            keys.add(a.device_key)
            if a.size > self.settings.max_upload_bytes:
                raise InvalidArgument(
                    "INVALID_SIZE", f"size is above the upload limit of {self.settings.max_upload_bytes}",
                    field="size",
                )
            a.name = validation.display_name(a.name)
            if a.media_type:
                validation.media_type(a.media_type)
            validation.sha256_hex(a.sha256)
            if len(a.thumbnail) > self.settings.max_thumbnail_bytes:
                raise TooLarge("THUMBNAIL_TOO_LARGE", "thumbnail is larger than the limit",
                               field="thumbnail")
        answers = [self._announce_one(device, a) for a in announcements]
        # Deleted captures the device still holds are remembered from now, in one write.
        due = [(i, answer) for i, answer in enumerate(answers)
               if isinstance(answer, DeletedCapture) and self._refresh_due(answer)]
        if due:
            held = self._still_held(device, [deleted for _, deleted in due])
            for i, deleted in due:
                if deleted.device_key not in held:  # forgotten or replaced since its read
                    answers[i] = self._announce_one(device, announcements[i])
        return [_deleted_event(answer, a) if isinstance(answer, DeletedCapture) else answer
                for answer, a in zip(answers, announcements, strict=True)]

    def _announce_one(self, device: str, a: Announcement) -> Event | DeletedCapture:
        """The key's event for this capture, made if new; or the record of its deletion."""
        for _ in range(3):
            existing = self._by_key(device, a.device_key)
            if existing is not None and _same_capture(existing, a):
                if a.sha256 and not existing.sha256 and existing.state == "on_device":
                    # A device that hashes after a first, cheaper scan: the pulled upload must
                    # match it. Read again, as recorded (or as an upload left it meanwhile).
                    self._record_sha256(existing.id, a.sha256)
                    continue
                return existing
            if existing is None:
                deleted = self._deleted_capture(device, a.device_key)
                if deleted is not None and _same_capture(deleted, a):
                    return deleted
            event = self._add(device, a, replacing=existing)
            if event is not None:
                return event
        # Three times, another announcement or an upload changed the key's event between our
        # read and our write: the device's next announcement will find it settled.
        raise Conflict("ANNOUNCEMENT_CONFLICT", f"device_key {a.device_key} changed meanwhile: retry",
                       device_key=a.device_key)

    def _add(self, device: str, a: Announcement, *, replacing: Event | None) -> Event | None:
        """Insert the announced event, in place of the key's event `replacing` (another capture
        under the same key, as a dashcam's loop recording reuses FILE0001.MP4): None when the
        key's event is not the one read any more. A thumbnail that does not fit in the device's
        quota (it is on the server's disk, counted as an uploaded one) is left out: the event is
        announced without it."""
        # A capture it replaces that was never uploaded goes, with its thumbnail, in the same
        # transaction: a loop recording at its quota keeps its thumbnails.
        freed = (replacing.thumbnail_size or 0) if replacing is not None and replacing.state == "on_device" else 0
        if a.thumbnail and not self._thumbnail_fits(device, len(a.thumbnail) - freed):
            a = self._without_thumbnail(device, a)
        mime = detect_mime(a.name, b"")
        event = Event(
            id=validation.new_event_id(), device=device, name=a.name,
            media_type=a.media_type or classify(mime), mime_type=mime, size=a.size,
            sha256=a.sha256, has_thumbnail=bool(a.thumbnail), thumbnail_size=len(a.thumbnail) or None,
            metadata_json=a.metadata_json,
            created=a.created or utcnow(), state="on_device", device_key=a.device_key,
        )
        thumbnail_path = self.gallery.storage.thumbnail_path(device, event.id)
        staged = None
        try:
            if a.thumbnail:
                # Bytes on the data disk, like any upload: not below its headroom.
                self.gallery.storage.require_room_for(len(a.thumbnail))
                staged = self.gallery.storage.stage(
                    max_bytes=self.settings.max_thumbnail_bytes, what="thumbnail")
                staged.write(a.thumbnail)
                # Moved but still locked as in use (until discard() below): the reconciler must
                # not take it for an orphan before its row is committed.
                staged.sync()
                staged.move(thumbnail_path)
            with self.db.session() as session:
                if replacing is not None and not self._let_go(session, replacing):
                    session.rollback()
                    thumbnail_path.unlink(missing_ok=True)
                    return None
                session.exec(  # type: ignore[call-overload]
                    sa.delete(DeletedCapture).where(col(DeletedCapture.device) == device,
                                                    col(DeletedCapture.device_key) == a.device_key)
                )
                session.add(event)
                if a.thumbnail:  # exactly, under the usage row's lock: announcements run at once
                    self.gallery.quota.check_stored(session, device, len(a.thumbnail))
                self.db.commit(session)
        except CommitOutcomeUnknown:
            raise  # the row, if written, names the thumbnail: it stays (Database.commit)
        except Exhausted as exc:
            thumbnail_path.unlink(missing_ok=True)
            if exc.reason != QUOTA_EXCEEDED:
                raise
            return self._add(device, self._without_thumbnail(device, a), replacing=replacing)
        except sa.exc.IntegrityError:
            # The same key announced concurrently: the other announcement won. Read the key again,
            # as that one may be another capture.
            thumbnail_path.unlink(missing_ok=True)
            return None
        except BaseException:
            thumbnail_path.unlink(missing_ok=True)  # no row, so no file either
            raise
        finally:
            if staged is not None:
                staged.discard()
        if replacing is not None and replacing.state == "on_device":
            self.gallery.storage.remove_event_files(device, replacing.id)
        return event

    def _thumbnail_fits(self, device: str, size: int) -> bool:
        room = self.gallery.quota.room(device)
        return room is None or room.used + size <= room.limit

    @staticmethod
    def _without_thumbnail(device: str, a: Announcement) -> Announcement:
        log.info("announced thumbnail left out: it does not fit in the device's quota (GALLERY_MAX_DEVICE_BYTES)",
                 extra={"device": device, "device_key": a.device_key, "size": len(a.thumbnail)})
        return dataclasses.replace(a, thumbnail=b"")

    def _let_go(self, session: Session, old: Event) -> bool:
        """Free the key of `old`, an earlier capture the device no longer holds under it. Stored
        content stays, as an event of its own; one never uploaded can no longer be, so it goes
        (its pull is cancelled). False when the event changed since it was read."""
        same = (col(Event.id) == old.id, col(Event.device_key) == old.device_key,
                col(Event.state) == old.state)
        if old.state != "on_device":
            return bool(session.exec(  # type: ignore[call-overload]
                sa.update(Event).where(*same).values(device_key=None)).rowcount)
        if not session.exec(sa.delete(Event).where(*same)).rowcount:  # type: ignore[call-overload]
            return False
        forget_event(session, old.id, session_ttl=self.gallery.settings.upload_session_ttl)
        return True

    def _record_sha256(self, event_id: str, sha256: str) -> None:
        """Give an announced event the sha256 a later announcement of it tells, unless an upload
        (its content, hashed) or another announcement's sha256 came first."""
        with self.db.session() as session:
            session.exec(  # type: ignore[call-overload]
                sa.update(Event).where(col(Event.id) == event_id, col(Event.sha256) == "",
                                       col(Event.state) == "on_device").values(sha256=sha256)
            )
            self.db.commit(session)

    def _by_key(self, device: str, device_key: str) -> Event | None:
        with self.db.session() as session:
            return session.exec(
                select(Event).where(Event.device == device, Event.device_key == device_key)
            ).first()

    def _deleted_capture(self, device: str, device_key: str) -> DeletedCapture | None:
        with self.db.session() as session:
            return session.get(DeletedCapture, (device, device_key))

    def _refresh_due(self, deleted: DeletedCapture) -> bool:
        """Whether the device's announcement of a deleted capture is to be written: once the
        last one written is older than a tenth of GALLERY_DELETED_CAPTURE_DAYS, and a day at
        most (also when deletions are remembered for ever, so that a limit set later forgets
        only what the devices stopped announcing). A device that announces its folder at every
        reconnect does not write each time."""
        days = self.settings.deleted_capture_days
        step = min(_DAY, datetime.timedelta(days=days) / 10) if days else _DAY
        return deleted.announced_at is None or utcnow() - aware(deleted.announced_at) >= step

    def _still_held(self, device: str, deleted: list[DeletedCapture]) -> set[str]:
        """The device announced these deleted captures again: it still holds their files, so
        each deletion is remembered GALLERY_DELETED_CAPTURE_DAYS from now (the reconciler
        forgets it after). Returns the keys written: not those the reconciler forgot, or a new
        capture replaced (another event id), since they were read."""
        with self.db.session() as session:
            written = session.exec(  # type: ignore[call-overload]
                sa.update(DeletedCapture)
                .where(col(DeletedCapture.device) == device,
                       # The keys alone too: SQLite's planner then looks up each by its primary
                       # key, not every row the device has.
                       col(DeletedCapture.device_key).in_([d.device_key for d in deleted]),
                       sa.tuple_(col(DeletedCapture.device_key), col(DeletedCapture.event_id))
                       .in_([(d.device_key, d.event_id) for d in deleted]))
                .values(announced_at=utcnow())
                .returning(col(DeletedCapture.device_key))
            ).scalars().all()
            self.db.commit(session)
        return set(written)

    # -- pulls --------------------------------------------------------------------------------

    def pull(
        self, principal: Principal, device: str, event_id: str, *, wait: int = 0,
        client_waiting: Callable[[], bool] = lambda: True,
    ) -> PullResult:
        """Open a pull of the event; with `wait`, up to that many seconds for its outcome while
        `client_waiting()` holds. A wait needs a free place (TOO_MANY_PULL_WAITS, and nothing
        opened, when there is none)."""
        principal.require(validation.device_id(device), WRITE)
        validation.event_id(event_id)
        if not 0 <= wait <= MAX_WAIT_S:
            raise InvalidArgument("INVALID_WAIT", f"wait must be between 0 and {MAX_WAIT_S} seconds",
                                  field="wait")
        event = self.gallery.find_event(device, event_id)
        if event.state == "stored":
            return PullResult(event, self.pull_status(event_id))
        waiting = wait > 0

        def too_many(*_: int) -> Busy:
            return Busy(
                "TOO_MANY_PULL_WAITS",
                f"this server has as many pulls waiting as it allows (of device {device}, of this"
                " token, or in all): retry later, or pull without wait and read the event's pull state",
                device=device,
            )

        with contextlib.ExitStack() as held:
            if waiting:
                held.enter_context(self._pull_waiters.held_for(principal, too_many))
                if not self._pull_waits.take(device):
                    raise too_many()
                held.callback(self._pull_waits.give_back, device)
            return self._pull_and_wait(device, event_id, wait, client_waiting)

    def _pull_and_wait(self, device: str, event_id: str, wait: int, client_waiting: Callable[[], bool]) -> PullResult:
        self._open_pull(device, event_id)
        self._wakeups.notify(device)
        deadline = time.monotonic() + wait
        while True:
            result = PullResult(self.gallery.find_event(device, event_id), self.pull_status(event_id))
            done = result.event.state == "stored" or (
                result.pull is not None and result.pull.state in ("failed", "expired"))
            if done or time.monotonic() >= deadline or not client_waiting():
                return result
            time.sleep(0.2)

    def _open_pull(self, device: str, event_id: str) -> None:
        now = utcnow()
        self.expire_overdue()
        command = DeviceCommand(
            id="cmd_" + secrets.token_urlsafe(12), device=device, event_id=event_id,
            open_key=event_id, created=now,
            expires_at=now + datetime.timedelta(seconds=self.settings.pull_ttl),
        )
        try:
            with self.db.session() as session:
                # Take the event's row lock first: an upload storing the content at this moment
                # either commits before us (then there is nothing left to pull) or after us (then
                # it closes this command in its own transaction). The lock is a write of a column
                # no listing shows, to its own value: the device's listing version stays.
                still_on_device = session.exec(  # type: ignore[call-overload]
                    sa.update(Event)
                    .where(col(Event.id) == event_id, col(Event.state) == "on_device")
                    .values(device_key=col(Event.device_key))
                ).rowcount
                if still_on_device:
                    session.add(command)
                session.commit()
        except sa.exc.IntegrityError:
            pass  # a pull for this event is already open: do not queue another

    def pull_status(self, event_id: str) -> PullStatus | None:
        rows = self.db.read_rows(_LATEST_PULL, {"event_id": event_id})
        if not rows:
            return None
        [(state, error, created, expires_at)] = rows
        if state in OPEN_STATES and aware(expires_at) < utcnow():
            state = "expired"
        return PullStatus(PULL_STATES[state], error, created, expires_at)

    def expire_overdue(self) -> None:
        with self.db.session() as session:
            session.exec(  # type: ignore[call-overload]
                sa.update(DeviceCommand)
                .where(col(DeviceCommand.open_key).is_not(None),
                       col(DeviceCommand.expires_at) < utcnow())
                .values(state="expired", open_key=None)
            )
            session.commit()

    def pulled_event(self, principal: Principal, device: str, event_id: str) -> Event:
        """The announced event a device's upload fills (checked before any byte is stored)."""
        principal.require(validation.device_id(device), DEVICE)
        validation.event_id(event_id)
        event = self.gallery.find_event(device, event_id)
        if event.state != "on_device":
            raise FailedPrecondition("EVENT_ALREADY_STORED", f"event {event_id} is already stored",
                                     event_id=event_id)
        return event

    def complete_pull(self, session: Session, event: Event) -> None:
        """Close the event's open pull, inside the transaction that stores its content."""
        session.exec(  # type: ignore[call-overload]
            sa.update(DeviceCommand)
            .where(col(DeviceCommand.event_id) == event.id, col(DeviceCommand.open_key).is_not(None))
            .values(state="completed", open_key=None, error="")
        )

    # -- the command channel ------------------------------------------------------------------

    @contextlib.contextmanager
    def greeting(self, principal: Principal) -> Iterator[None]:
        """Around a channel's wait for its hello (at most HELLO_SECONDS, the caller's to enforce):
        only a device's token may wait, and only so many at once, in all and per token
        (threads.grant_share). Not counted with the channels: the device is not known yet, and its
        channel may replace one of its own (connect())."""
        principal.require_scope(DEVICE)

        def refusal(part: int, reached: int) -> Busy:
            return Busy(
                "TOO_MANY_CONNECTIONS",
                f"too many device channels are waiting for their hello (at most {part} for this "
                f"token, {self.max_hellos} on this server): retry later", limit=str(reached),
            )

        with self._greeting.held_for(principal, refusal):
            yield

    @property
    def channels_open(self) -> int:
        """Device channels open in this process (the metrics' gauge)."""
        return sum(map(len, list(self._channels.values())))

    def _admit_channel(self) -> None:
        if self.channels_open >= self.max_channels:
            raise Busy(
                "TOO_MANY_CONNECTIONS",
                f"this server has {self.max_channels} device channels open: retry later",
                limit=str(self.max_channels),
            )

    def connect(self, principal: Principal, device: str) -> Channel:
        """A channel for the device until close(), or until the token expires (commands() then
        raises TOKEN_EXPIRED); a device's MAX_CONNECTIONS_PER_DEVICE + 1st open in this process
        replaces its oldest."""
        principal.require(validation.device_id(device), DEVICE)
        with self._channels_lock:
            mine = self._channels.get(device, [])
            if len(mine) >= MAX_CONNECTIONS_PER_DEVICE:
                replaced: Channel | None = mine.pop(0)  # one in, one out: no more threads held
            else:
                replaced = None
                self._admit_channel()  # refused: nothing of the device is kept
            channel = Channel(self, device, expires_at=principal.expires_at)
            self._channels.setdefault(device, mine).append(channel)
        try:
            if replaced is not None:
                log.info("device channel replaced by a newer one",
                         extra={"device": device, "connection": replaced.id})
                replaced.close()
            with self.db.session() as session:
                # Rows of connections whose close() could not reach the database (an outage) and
                # whose heartbeat stopped long ago: nothing else removes them.
                session.exec(  # type: ignore[call-overload]
                    sa.delete(DeviceConnection).where(
                        col(DeviceConnection.device) == device,
                        col(DeviceConnection.last_seen) < utcnow() - datetime.timedelta(hours=1))
                )
                session.add(DeviceConnection(id=channel.id, device=device, last_seen=utcnow()))
                session.commit()
        except BaseException:
            channel.close()
            raise
        return channel

    def _forget_channel(self, channel: Channel) -> None:
        with self._channels_lock:
            mine = self._channels.get(channel.device, [])
            if channel in mine:
                mine.remove(channel)
            if not mine:
                self._channels.pop(channel.device, None)

    def acknowledge(self, device: str, command_id: str) -> None:
        self._update_command(device, command_id, ("delivered",), state="acked")

    def progress(self, device: str, command_id: str, bytes_sent: int) -> None:
        # A device's report, not a fact: keep it within what the column and the limits hold.
        bytes_sent = min(bytes_sent, self.settings.max_upload_bytes)
        self._update_command(device, command_id, OPEN_STATES, bytes_sent=bytes_sent)

    def fail(self, device: str, command_id: str, reason: str) -> None:
        # The device's words, shown to whoever waits for the pull: PostgreSQL's text holds no NUL
        # (its error dropped the failure, and the pull stayed "delivered" until it expired).
        reason = reason.replace("\x00", "")[:1024]
        self._update_command(device, command_id, OPEN_STATES, state="failed", open_key=None,
                             error=reason or "failed on the device")

    def _update_command(
        self, device: str, command_id: str, states: tuple[str, ...], **values: object
    ) -> None:
        if "\x00" in command_id:  # no command's id; PostgreSQL refused the statement (an ERROR)
            return
        # Scoped to the device, so one device cannot touch another's commands.
        with self.db.session() as session:
            session.exec(  # type: ignore[call-overload]
                sa.update(DeviceCommand)
                .where(col(DeviceCommand.id) == command_id, col(DeviceCommand.device) == device,
                       col(DeviceCommand.state).in_(states))
                .values(**values)
            )
            session.commit()


class Channel:
    """One live connection of a device: claims its commands and keeps its heartbeat."""

    def __init__(self, devices: Devices, device: str, *, expires_at: float = math.inf) -> None:
        self.devices = devices
        self.device = device
        self.expires_at = expires_at
        self.id = "conn_" + secrets.token_urlsafe(12)
        self.closed = threading.Event()
        self._closing = threading.Lock()
        self._condition = devices._wakeups.hold(device)
        self._last_heartbeat = time.monotonic()

    def claim(self) -> list[Delivery]:
        """Commands for this device not held by a live connection, now held by this one."""
        db = self.devices.db
        now = utcnow()
        stale = now - datetime.timedelta(seconds=CONNECTION_STALE_S)
        live = select(DeviceConnection.id).where(col(DeviceConnection.last_seen) >= stale)
        deliverable = (
            col(DeviceCommand.device) == self.device,
            # The event still exists. EXISTS looks up its one row; `IN (SELECT id FROM events
            # WHERE device = ?)` made SQLite list every event of the device on each poll (~75 ms
            # at 300,000 events, every second, for each connection while a command was open).
            sa.exists().where(col(Event.id) == col(DeviceCommand.event_id),
                              col(Event.device) == self.device),
            col(DeviceCommand.state).in_(OPEN_STATES),
            col(DeviceCommand.expires_at) > now,
            sa.or_(col(DeviceCommand.delivered_to).is_(None),
                   col(DeviceCommand.delivered_to).not_in(live)),
        )
        claimed = []
        with db.session() as session:
            candidates = session.exec(
                select(DeviceCommand).where(*deliverable).order_by(col(DeviceCommand.seq))
            ).all()
        for command in candidates:
            with db.session() as session:
                taken = session.exec(  # type: ignore[call-overload]
                    sa.update(DeviceCommand)
                    .where(col(DeviceCommand.seq) == command.seq, *deliverable)
                    .values(state="delivered", delivered_to=self.id, delivered_at=now,
                            attempts=DeviceCommand.attempts + 1)
                ).rowcount
                session.commit()
                event = session.get(Event, command.event_id) if taken else None
            if taken:
                claimed.append(Delivery(
                    command.id, command.event_id,
                    (event.device_key or "") if event else "", event.name if event else "",
                ))
        return claimed

    def wait(self) -> bool:
        """Sleep until woken, the poll interval passes or the channel closes; True when a
        heartbeat is due (the heartbeat row is refreshed then)."""
        with self._condition:
            if not self.closed.is_set():
                self._condition.wait(POLL_INTERVAL_S)
        if time.monotonic() - self._last_heartbeat < HEARTBEAT_S:
            return False
        self._last_heartbeat = time.monotonic()
        with self.devices.db.session() as session:
            session.exec(  # type: ignore[call-overload]
                sa.update(DeviceConnection).where(col(DeviceConnection.id) == self.id)
                .values(last_seen=utcnow())
            )
            session.commit()
        return True

    def close(self) -> None:
        """End the channel (any number of times: the RPC's end, its reader and its handler may
        each call it; the first does it)."""
        with self._closing:
            if self.closed.is_set():
                return
            self.closed.set()
        self.devices._forget_channel(self)
        self.devices._wakeups.notify(self.device)
        self.devices._wakeups.let_go(self.device)
        try:
            with self.devices.db.session() as session:
                session.exec(  # type: ignore[call-overload]
                    sa.delete(DeviceConnection).where(col(DeviceConnection.id) == self.id)
                )
                session.commit()
        except DatabaseUnavailable:
            # The row's heartbeat has stopped: it counts as gone in 15 s, and the device's next
            # connect() removes it an hour on.
            log.warning("device channel closed; its row stays until the database is back",
                        extra={"device": self.device, "connection": self.id})

    def commands(self) -> Iterator[Delivery | None]:
        """Yields commands as they become deliverable, and None when a heartbeat is due."""
        yield None
        while not self.closed.is_set():
            if time.time() >= self.expires_at:
                raise Unauthenticated("TOKEN_EXPIRED", "token has expired: connect again with a new one")
            yield from self.claim()
            if self.wait():
                yield None
