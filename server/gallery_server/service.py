"""The gallery's operations, independent of any transport. Every method authorizes first.

Authorization is checked before existence (AIP-135): a token without access to a device learns
nothing about that device's events.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import logging
import os
import pathlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import sqlalchemy as sa
import sqlalchemy.orm
from sqlmodel import Session, col, select

from . import downloads, validation
from .auth import DEVICE, READ, WRITE, Principal
from .clock import utcnow
from .db import Database
from .errors import (
    AlreadyExists,
    Busy,
    CommitOutcomeUnknown,
    DataLoss,
    Exhausted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from .listing import ListedEvent, Listing, ListingAnswer, Printed
from .media_types import SNIFF_BYTES, classify, detect_mime
from .models import (
    DeletedCapture,
    DeviceCommand,
    Event,
    EventCount,
    UploadSessionRow,
    initial_thumbnail_state,
)
from .quota import DeviceQuota, Room, Usage
from .receiving import ReceivePermits
from .settings import Settings
from .storage import SpaceMeter, StagedFile, Storage
from .threads import Holds, thread_shares
from .uploads import IdleWatchdog, Upload, Uploader, UploadSlots, WatchedStream

log = logging.getLogger(__name__)

# Runs inside the transaction that inserts an event, before the insert.
SessionHook = Callable[[Session, Event], None]
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class TypeStats:
    count: int
    size: int


@dataclasses.dataclass(frozen=True)
class Stats:
    total_events: int
    total_size: int
    by_type: dict[str, TypeStats]
    quota: Usage | None  # None: the server sets no quota


# The hot reads' statements are built once, with bound parameters: building a select per request
# (column coercions, operator lookups, its cache key) cost more CPU than SQLite took to run it.
_STATS = (
    sa.select(EventCount.media_type, EventCount.count, EventCount.size)
    .where(col(EventCount.device) == sa.bindparam("device"), col(EventCount.count) > 0)
)


# One event (get_event) as a single read rather than through an ORM session, whose BEGIN, identity
# map and ROLLBACK cost ~7x the lookup on SQLite and two more round trips on PostgreSQL. By its
# primary key alone: with the device in the WHERE too, PostgreSQL may walk the device's index.
_EVENT = sa.select(*Event.__table__.c).where(col(Event.id) == sa.bindparam("event_id"))  # type: ignore[attr-defined]
_EVENT_FIELDS = tuple(column.name for column in Event.__table__.c)  # type: ignore[attr-defined]
# An event of a device by its device_event_id (the unique constraint's index).
_CAPTURE = sa.select(col(Event.id)).where(col(Event.device) == sa.bindparam("device"),
                                          col(Event.device_event_id) == sa.bindparam("device_event_id"))
_EVENT_DEVICE = _EVENT_FIELDS.index("device")
# get_event builds Events with model_construct, which skips the ORM's own set-up of the class:
# until some ORM call had configured the mappers, reading such an Event's fields failed.
sqlalchemy.orm.configure_mappers()


# The database pool of each background loop's Gallery (rpc/server.py: serve) and of `gallery
# reconcile`: a loop runs one query at a time. With DB_POOL_SIZE (rpc/server.py) it makes a
# replica's count of PostgreSQL connections in the README.
BACKGROUND_POOL_SIZE = 2
# Native downloads one token may have at once, per device it grants (download_slot): as many as
# a device may have uploads by default.
MAX_DOWNLOADS_PER_DEVICE = 4


def background_gallery(settings: Settings) -> Gallery:
    """A Gallery of its own for a background loop: its own small pool, the server's tables."""
    return Gallery(
        settings, Database(settings.database_url, pool_size=BACKGROUND_POOL_SIZE),
        Storage.from_settings(settings),
    )


class Gallery:
    def __init__(self, settings: Settings, db: Database, storage: Storage) -> None:
        self.settings = settings
        self.db = db
        self.storage = storage
        self.listing = Listing(db, cache_bytes=settings.list_cache_bytes)
        self.quota = DeviceQuota(db, settings.max_device_bytes)
        # The settings own the disk headroom and the choice of direct I/O, whoever built the
        # Storage: one built bare (Storage(data_dir), as tests do) takes theirs here; one built by
        # Storage.from_settings has them already. Tests of the stateless signed-URL checks build a
        # Gallery without one.
        if storage is not None:
            storage.min_free_bytes = settings.min_free_bytes
            storage.direct_io = settings.direct_io
        # Limits on uploads in flight, per replica (one Gallery serves all RPCs of a server).
        self.slots = UploadSlots(
            per_device=settings.max_uploads_per_device, total=settings.max_uploads_total
        )
        self.idle = IdleWatchdog(
            settings.upload_idle_seconds, first_message_seconds=settings.upload_first_message_seconds
        )
        self.max_downloads = thread_shares(settings).downloads
        self._downloads = Holds(MAX_DOWNLOADS_PER_DEVICE, total=self.max_downloads)  # by token (held_for)
        # Upload messages asked for or held at once, all streams together (receiving.py).
        self.receiving = ReceivePermits(settings.upload_messages_in_flight)

    # -- reads --------------------------------------------------------------------------------

    def device_paths(
        self, principal: Principal, device: str, *, make: bool = True
    ) -> tuple[pathlib.Path, pathlib.Path]:
        """The device's drop folders, made if `make` (not for a HEAD, which is safe). Told to a
        token that may read the device's events or store into them: where to write is what a
        writer asks, and a device whose token may only store (an upload-only camera's, an
        agent's) is told where its drop folder is."""
        principal.require(validation.device_id(device), READ, WRITE, DEVICE)
        # Made only for a token that may store into them: a viewer's read-only token for every
        # device made a folder for each id it asked about, and the importer scans each folder.
        return self.storage.device_paths(device, make=make and not principal.scopes.isdisjoint((WRITE, DEVICE)))

    def stored_media_found(self, scan: int = 1000, at_least: int = 5, batch: int = 50) -> bool:
        """Whether the data folder holds the media file of any stored event, looking at `scan` of
        them at most, or there are fewer than `at_least`. Each file is renamed into place before
        its row commits, and its row deleted before it: a folder holding none of them is not the
        one the database describes (a shared volume not mounted), where some files lost are the
        reconciler's to report. The look starts at a random id and goes on in id order, wrapping
        round (ids are random, so devices are interleaved): the table's first rows, always the
        same, may be one old device's whose files were deleted. Usually the first file is there:
        one query of `batch` rows and one stat. A gallery of up to `scan` events is looked at
        whole: 20 random picks missed its one file left in 1 of 6 galleries of five."""
        stored = col(Event.state) == "stored"
        if self.db.count_at_most(sa.select(col(Event.id)).where(stored), at_least) < at_least:
            return True

        def rows_after(*bound: sa.ColumnElement[bool]) -> sa.Select[Any]:
            return (sa.select(col(Event.device), col(Event.id))
                    .where(stored, col(Event.id) > sa.bindparam("after"), *bound).order_by(col(Event.id)).limit(batch))

        start = validation.new_event_id()
        # From the random start to the last id, then from the first ('' sorts first) up to it.
        rounds = [(rows_after(), start), (rows_after(col(Event.id) < start), "")]
        looked = 0
        with self.db.read() as connection:
            for select, after in rounds:
                while looked < scan:
                    rows = connection.execute(select, {"after": after}).all()
                    if any(self.storage.media_path(device, event_id).exists() for device, event_id in rows):
                        return True
                    looked += len(rows)
                    if len(rows) < batch:
                        break
                    after = rows[-1][1]
        return False

    def list_events(self, principal: Principal, device: str, **request: Any) -> list[ListedEvent]:
        return self.list_page(principal, device, **request)[0]

    def list_page(
        self, principal: Principal, device: str, **request: Any
    ) -> tuple[list[ListedEvent], str]:
        """One page of a device's events and the next page's token (Listing.page)."""
        principal.require(validation.device_id(device), READ)
        return self.listing.page(device, **request)

    def list_page_json(self, principal: Principal, device: str, **request: Any) -> tuple[bytes, str]:
        """The same page as the REST listing's JSON, and its token (Listing.page_json)."""
        principal.require(validation.device_id(device), READ)
        return self.listing.page_json(device, **request)

    def list_answer(self, principal: Principal, device: str, printed: Printed, **request: Any) -> ListingAnswer[Any]:
        """A page as list_page ("rows") or list_page_json ("json") reads it, with its entity-tag;
        none when `if_none_match` names that tag while it is current (Listing.answer: also
        `if_match`)."""
        principal.require(validation.device_id(device), READ)
        return self.listing.answer(printed, device, **request)

    def get_event(self, principal: Principal, device: str, event_id: str) -> Event:
        """The event, for reading only (every download checks one): see find_event."""
        principal.require(validation.device_id(device), READ)
        validation.event_id(event_id)
        return self.find_event(device, event_id)

    def find_event(self, device: str, event_id: str) -> Event:
        """A device's event by id, or EVENT_NOT_FOUND; the caller has authorized and validated.
        For reading only: it belongs to no session, and setting an attribute raises."""
        rows = self.db.read_rows(_EVENT, {"event_id": event_id})
        if not rows or rows[0][_EVENT_DEVICE] != device:
            raise event_not_found(device, event_id)
        return Event.model_construct(**dict(zip(_EVENT_FIELDS, rows[0], strict=True)))

    def stored_media(self, principal: Principal, device: str, event_id: str) -> tuple[Event, pathlib.Path]:
        """An event whose media is stored here, and where its file is (not checked to exist)."""
        event = self.get_event(principal, device, event_id)
        if event.state != "stored":
            raise FailedPrecondition(
                "EVENT_ON_DEVICE",
                f"event {event.id} is still on the device: pull it first "
                f"(POST /api/gallery/{event.device}/pull/{event.id})",
                event_id=event.id,
            )
        return event, self.storage.media_path(device, event.id)

    def open_content(self, principal: Principal, device: str, event_id: str) -> downloads.Content:
        """The stored media of an event, open for reading. The caller closes `content.file`."""
        event, path = self.stored_media(principal, device, event_id)
        try:
            file = path.open("rb")
        except FileNotFoundError:
            self.get_event(principal, device, event_id)  # NotFound: deleted since it was read
            raise _media_lost(event, "MEDIA_MISSING", "is missing") from None
        except IsADirectoryError:
            raise _media_lost(event, "MEDIA_DAMAGED", "is not a file") from None
        if os.fstat(file.fileno()).st_size != event.size:
            file.close()
            raise _media_lost(event, "MEDIA_DAMAGED", "does not have the event's size")
        return downloads.Content(file, event.size, event.sha256, event.mime_type, event.name)

    def open_thumbnail(
        self, principal: Principal, device: str, event_id: str, *, at_most: int | None = None,
    ) -> downloads.Content | None:
        """The thumbnail of an event, open for reading, its type detected from its bytes; with
        `at_most`, None when the open file holds more bytes (it is then neither read nor hashed).

        Thumbnails are small (GALLERY_MAX_THUMBNAIL_BYTES) and may be replaced when a pulled
        upload brings its own, so their SHA-256 is computed from the open file on every read."""
        event = self.get_event(principal, device, event_id)
        try:
            file = self.storage.thumbnail_path(device, event.id).open("rb")
        except FileNotFoundError:
            raise NotFound(
                "THUMBNAIL_NOT_FOUND", f"event {event.id} has no thumbnail",
                device=device, event_id=event.id,
            ) from None
        try:
            if at_most is not None and os.fstat(file.fileno()).st_size > at_most:
                file.close()
                return None
            head = file.read(SNIFF_BYTES)
            sha256 = downloads.sha256_of(file)
            size = file.tell()
        except BaseException:
            file.close()
            raise
        return downloads.Content(file, size, sha256, detect_mime("", head))

    def stats(self, principal: Principal, device: str) -> Stats:
        """From the per-type counters (models.EventCount): one index lookup, whatever the device's
        size; with a quota, one more (models.DeviceUsage)."""
        principal.require(validation.device_id(device), READ)
        rows = self.db.read_rows(_STATS, {"device": device})
        by_type = {media: TypeStats(int(count), int(size)) for media, count, size in rows}
        return Stats(
            total_events=sum(t.count for t in by_type.values()),
            total_size=sum(t.size for t in by_type.values()),
            by_type=by_type,
            quota=self.quota.usage(device),
        )

    # -- writes -------------------------------------------------------------------------------

    def delete_event(
        self, principal: Principal, device: str, event_id: str, *,
        if_match: str | None = None, if_none_match: str | None = None,
    ) -> None:
        """Delete one event; with `if_match` (the request's If-Match, RFC 9110 13.1.1) only if it
        names the event's content (its ETag, or `*`), and with `if_none_match` (13.1.2) only if it
        names neither (`*` names any event): PRECONDITION_FAILED (412) otherwise, If-Match looked
        at first (13.2.2). An event keeps its content for life, so checking before the delete is
        checking at it. No event is 404 first, whatever they say."""
        principal.require(validation.device_id(device), WRITE)
        validation.event_id(event_id)
        if if_match is not None or if_none_match is not None:
            sha256 = self.find_event(device, event_id).sha256
            if if_match is not None and not downloads.match(if_match, sha256):
                raise FailedPrecondition(
                    downloads.PRECONDITION_FAILED_REASON,
                    "If-Match names other content than this event's (its ETag is the sha256 in quotes): not deleted",
                    field="if_match", event_id=event_id,
                )
            if if_none_match is not None and downloads.none_match(if_none_match, sha256):
                raise FailedPrecondition(
                    downloads.PRECONDITION_FAILED_REASON,
                    "If-None-Match names this event's content, or is *: not deleted",
                    field="if_none_match", event_id=event_id,
                )
        if not self.delete_events(device, [event_id]):
            raise event_not_found(device, event_id)

    def delete_events(self, device: str, event_ids: list[str]) -> list[str]:
        """Delete these events of the device in one transaction (a user's DELETE, retention's
        batches); returns the ids there were to delete."""
        with self.db.session() as session:
            deleted_ids = delete_event_rows(session, device, event_ids, session_ttl=self.settings.upload_session_ttl)
            session.commit()
        # The rows are gone first: a crash here leaves files without a row (reclaimable), never a
        # row without its file. So is a file that cannot be removed now: the event is deleted.
        if deleted_ids:
            self.storage.remove_event_files(device, *deleted_ids)
        return deleted_ids

    def begin_upload(self, principal: Principal, device: str) -> Upload:
        principal.require(validation.device_id(device), WRITE)
        return self.open_upload(device)

    def open_upload(
        self, device: str, *, max_media_bytes: int | None = None, media_is: str = "event"
    ) -> Upload:
        """An Upload for a device already authorized (by a token or by a signed URL).

        Refused (Exhausted) when the disk is down to its headroom or the device, or the replica,
        has as many uploads in flight as allowed; the Upload holds its slot until closed. The
        device's quota refuses its declared size or its first bytes past the room (Upload), not
        the upload itself: a retry of a capture stored already, which a form may name after this,
        takes no room."""
        room = self.quota.room(device)  # a device's thumbnails count as its media do
        release = self.reserve_upload(device)
        try:
            return Upload(
                self.storage,
                device,
                max_media_bytes=max_media_bytes or self.settings.max_upload_bytes,
                max_thumbnail_bytes=self.settings.max_thumbnail_bytes,
                release=release,
                media_is=media_is,
                room=room,
                stored_capture=functools.partial(self.stores_capture, device),
            )
        except BaseException:
            release()
            raise

    def room_for(self, device: str, size: int | None = None, *, device_event_id: str = "") -> Room | None:
        """The device's room for an upload (DeviceQuota.require_room: refused at once at the quota,
        or for a `size` past it), but none to check for a retry of a capture the device has stored
        already (`device_event_id`): store() answers that capture and stores nothing, so a device
        that lost the answer of the upload that filled its quota learns it was stored. Were the
        capture deleted meanwhile, the commit's own check still holds the quota."""
        try:
            room = self.quota.require_room(device, size)
        except Exhausted:
            if device_event_id and self.stores_capture(device, device_event_id):
                return None
            raise
        # Nor later, as its bytes come (a session's writes check no more than this room).
        if room is not None and device_event_id and self.stores_capture(device, device_event_id):
            return None
        return room

    def stores_capture(self, device: str, device_event_id: str) -> bool:
        """Whether an event of the device has this device_event_id (uploaded: its content stored)."""
        return bool(self.db.read_rows(_CAPTURE, {"device": device, "device_event_id": device_event_id}))

    def reserve_upload(self, device: str) -> Callable[[], None]:
        """Admit one more upload of the device, or refuse it (Exhausted): the disk must be above
        its headroom and the device and replica below their upload counts. Returns the release."""
        self.storage.require_space()
        return self.slots.acquire(device)

    def watch_upload(
        self, messages: Iterator[T], cancel: Callable[[], None],
        size_of: Callable[[T], int] | None = None, first_carries_data: bool = False,
        on_end: Callable[[Callable[[], None]], object] | None = None,
        *, caller: Uploader | None,
    ) -> Iterator[T]:
        """The messages of an upload stream, aborted (by `cancel`) once idle for
        GALLERY_UPLOAD_IDLE_SECONDS. With `size_of`, the free disk space is checked again every
        SPACE_CHECK_BYTES received (for streams that write outside a StagedFile).

        Every message is asked for under one of the replica's GALLERY_UPLOAD_MESSAGES_IN_FLIGHT
        permits, held until the caller asks for the next (receiving.py); `on_end(callback)` (a
        gRPC context's add_callback) makes a stream whose RPC ended stop waiting for one, and
        give back what it holds. `caller`: whose upload it is (UploadSlots), None for a pre-signed
        PUT whose URL is not known yet, always named so that no stream goes uncounted by omission.
        The stream counts against its token's part from when its first message is asked for
        (UploadSlots.hold), and its wait for that message against the replica's upload total."""
        # The permit is taken outside the idle watch: waiting for one is not the client's silence.
        stream = self.idle.stream(cancel, first_carries_data=first_carries_data)
        watched = self.idle.watch_stream(messages, stream)
        if size_of is not None:
            watched = self._metered(watched, size_of)
        asked = self._first_under(watched, self.slots.asked_first(caller))
        # Refused at once, before any permit or byte, if uploads hold every slot already.
        waited = self._first_under(self.receiving.bounded(asked, on_end=on_end), self.slots.first_message(caller))
        return self._held(waited, caller, on_end, stream)

    def _held(
        self, messages: Iterator[T], caller: Uploader | None,
        on_end: Callable[[Callable[[], None]], object] | None, stream: WatchedStream,
    ) -> Iterator[T]:
        """`messages`, counted against `caller`'s part from the first asked for."""
        with self.held_upload(caller, on_end, stream):
            yield from messages

    @contextlib.contextmanager
    def held_upload(
        self, uploader: Uploader | None, on_end: Callable[[Callable[[], None]], object] | None = None,
        stream: WatchedStream | None = None,
    ) -> Iterator[None]:
        """Around (the rest of) an upload stream: one place of its token's part (UploadSlots.hold),
        given back when the stream ends or its RPC does (`on_end`), whichever is first: a handler
        that fails leaves its stream unfinished. Also for a stream whose uploader became known
        only from its first message (a pre-signed PUT called natively). None: nothing to count (one
        known from the start, or a URL of an earlier version). A PUT's `stream` (its idle watch)
        lets a newer PUT of its URLs take its place once it is silent (UploadSlots.hold)."""
        release = self.slots.hold(uploader, stream)
        if on_end is not None and on_end(release) is False:  # the RPC is over already
            release()
        try:
            yield
        finally:
            release()

    @contextlib.contextmanager
    def download_slot(self, principal: Principal) -> Iterator[None]:
        """Around a native download, which holds a server thread for as long as its client takes
        to read it: at most the downloads' share of the threads at once (threads.py), and of those
        at most its token's part (threads.grant_share)."""
        def refusal(part: int, reached: int) -> Busy:
            return Busy(
                "TOO_MANY_DOWNLOADS",
                f"too many downloads are in progress (at most {part} for this token, "
                f"{self.max_downloads} on this server): retry later", limit=str(reached),
            )

        with self._downloads.held_for(principal, refusal):
            yield

    def watch_download(self, messages: Iterator[T], cancel: Callable[[], None]) -> Iterator[T]:
        """A server stream's messages, cancelled (by `cancel`) once its client has taken none for
        GALLERY_DOWNLOAD_IDLE_SECONDS (IdleWatchdog.watch_sends)."""
        return self.idle.watch_sends(messages, cancel, self.settings.download_idle_seconds)

    @staticmethod
    def _first_under(messages: Iterator[T], count: contextlib.AbstractContextManager[None]) -> Iterator[T]:
        """`messages`, the first awaited inside `count` (entered only when it is asked for)."""
        with count:
            first = next(messages, None)
        if first is None:
            return
        yield first
        del first  # not held while the next one is awaited
        yield from messages

    def _metered(self, messages: Iterator[T], size_of: Callable[[T], int]) -> Iterator[T]:
        space = SpaceMeter(self.storage.require_space)
        for message in messages:
            space.wrote(size_of(message))
            yield message
            del message  # not held while the next one is awaited

    def store(
        self,
        upload: Upload,
        *,
        event_id: str | None = None,
        before_insert: SessionHook | None = None,
        fill: Event | None = None,
    ) -> Event:
        """Validate a fully received upload, move its files into place and commit its row.

        `before_insert` runs inside the row's transaction, before any file moves (signed URLs
        mark their grant used, pulls close their command, in the same commit); an `event_id`
        chosen by the caller must be claimed by it (see _move_into_place). On a failure the files
        moved are taken back (a resumable upload's file, linked, not renamed, keeps its session's
        bytes), unless the COMMIT's outcome is unknown (Database.commit). `fill` is an announced
        (`on_device`) event whose content this upload is: its row is updated, under its row lock,
        instead of inserted.

        With a device_event_id that an event of the device has already, that event is returned
        and nothing is stored (its `before_insert` still runs, with that event, so a resumable
        session records its answer); other content under the same id is DEVICE_EVENT_ID_CONFLICT.
        """
        event = self._describe(upload, event_id, fill)
        if event.device_event_id:
            existing = self.capture(event.device, event.device_event_id, event.sha256)
            if existing is not None:
                return self._answer_duplicate(existing, before_insert)
        media_path = self.storage.media_path(event.device, event.id)
        thumbnail_path = self.storage.thumbnail_path(event.device, event.id)
        staged = [(upload.media, media_path)]
        if upload.thumbnail is not None:
            staged.append((upload.thumbnail, thumbnail_path))
        for file, _ in staged:
            file.sync()
        replaced: set[pathlib.Path] = set()  # destinations whose earlier file is gone
        try:
            with self.db.session() as session:
                if fill is not None:
                    self._lock_announced(session, event)
                # First, so that a hook that refuses (a URL used meanwhile) moves no file, and a
                # hook that claims a chosen event id holds that claim while the files move.
                if before_insert is not None:
                    before_insert(session, event)
                for file, destination in staged:
                    # A new event's paths must be free; an announced one may already have the
                    # thumbnail the device sent with its announcement, which the upload replaces.
                    if self._move_into_place(session, event, file, destination,
                                             chosen=event_id is not None, fill=fill is not None):
                        replaced.add(destination)
                if fill is None:
                    # before_insert may have attached a thumbnail that arrived first.
                    event.thumbnail_state = initial_thumbnail_state(event.media_type, event.has_thumbnail)
                    session.add(event)
                self.quota.check_stored(session, event.device, event.stored_bytes)
                self.db.commit(session)
        except CommitOutcomeUnknown:
            # The row may have been written: the files stay where it says they are. If it was not,
            # they are files without a row, which reconciliation removes (and which a retry under
            # the same chosen id, if its URL or session lets it, replaces: _move_into_place).
            log.error("the database went away while an upload was committed; its files are kept",
                      extra={"device": event.device, "event_id": event.id})
            raise
        except BaseException as exc:
            for file, destination in staged:
                # A file that replaced another stays: what was there (an announced event's
                # thumbnail, a leftover) is gone either way, and this is the same capture's.
                if file.moved and destination not in replaced:
                    destination.unlink(missing_ok=True)  # an adopted file keeps its own name
                    file.moved = False
            if fill is not None and thumbnail_path in replaced and upload.thumbnail is not None:
                self._count_kept_thumbnail(event, upload.thumbnail.size)
            # A concurrent upload of the same capture won the unique (device, device_event_id).
            if isinstance(exc, sa.exc.IntegrityError) and event.device_event_id:
                existing = self.capture(event.device, event.device_event_id, event.sha256)
                if existing is not None:
                    return self._answer_duplicate(existing, before_insert)
            raise
        log.info(
            "event stored",
            extra={"device": event.device, "event_id": event.id, "size": event.size},
        )
        return event

    def _count_kept_thumbnail(self, announced: Event, size: int) -> None:
        """The announced event's row takes the size of the thumbnail a refused upload of it left in
        its file's place, which the quota counts: it counted the announced one's, and a device
        could leave a 10 MiB thumbnail uncounted per announced event that way (diff review)."""
        try:
            with self.db.session() as session:
                session.exec(  # type: ignore[call-overload]
                    sa.update(Event)
                    .where(col(Event.id) == announced.id, col(Event.state) == "on_device")
                    .values(has_thumbnail=True, thumbnail_size=size)  # has_thumbnail: the usage trigger's column
                )
                self.db.commit(session)
        except Exception:  # noqa: BLE001 - the upload's own error is the answer
            log.warning("a kept thumbnail's size was not recorded", exc_info=True,
                        extra={"device": announced.device, "event_id": announced.id})

    def _move_into_place(self, session: Session, event: Event, file: StagedFile,
                         destination: pathlib.Path, *, chosen: bool, fill: bool) -> bool:
        """Move one staged file to its place in media/; True if it replaced a file there.

        A new event's path must be free. One exception: an event id chosen by the caller (a
        pre-signed URL's) is claimed by its `before_insert` hook, whose row lock is held until
        commit, so no one else can be storing that id now; a file already there with no event
        row is what a crash between a move and its commit left, and is replaced. (Without it the
        URL could never complete: every retry would meet EVENT_EXISTS.)"""
        # The row's lock (an announced event's, or the chosen id's claim) keeps this path ours.
        replacing = fill and destination.exists()
        try:
            file.move(destination, replace=fill)
        except AlreadyExists:
            if not chosen or session.get(Event, event.id) is not None:
                raise
            log.warning("replacing a media file left without its row",
                        extra={"device": event.device, "event_id": event.id})
            file.move(destination, replace=True)
            return True
        return replacing

    def capture(self, device: str, device_event_id: str, sha256: str) -> Event | None:
        """The device's event with this device_event_id, if any, when its content has `sha256`;
        another content under the same id is DEVICE_EVENT_ID_CONFLICT."""
        with self.db.session() as session:
            existing = session.exec(
                select(Event).where(Event.device == device, Event.device_event_id == device_event_id)
            ).first()
        if existing is not None and existing.sha256 != sha256:
            raise AlreadyExists(
                "DEVICE_EVENT_ID_CONFLICT",
                f"event {existing.id} already has device_event_id {device_event_id!r} with"
                " other content: nothing was stored",
                field="device_event_id", device_event_id=device_event_id, event_id=existing.id,
            )
        return existing

    def _answer_duplicate(self, existing: Event, before_insert: SessionHook | None) -> Event:
        if before_insert is not None:
            with self.db.session() as session:
                before_insert(session, existing)
                session.commit()
        log.info("upload of a stored capture", extra={"device": existing.device, "event_id": existing.id})
        return existing

    def _describe(self, upload: Upload, event_id: str | None, fill: Event | None) -> Event:
        """Check a received upload against what the client declared; the Event it becomes."""
        fields = upload.fields
        name = validation.display_name(fields.name)
        if fields.media_type:
            validation.media_type(fields.media_type)
        validation.sha256_hex(fields.declared_sha256)
        validation.device_event_id(fields.device_event_id)
        if fill is not None and fields.device_event_id:
            # A pulled upload fills the event its device_key names; another id would be dropped
            # silently (the fill keeps the announced row), and a retry naming it made a second event.
            raise InvalidArgument(
                "DEVICE_EVENT_ID_WITH_EVENT_ID",
                "an upload that fills an announced event (event_id) takes no device_event_id",
                field="device_event_id",
            )
        if not upload.media_received:
            raise InvalidArgument("EVENT_FILE_REQUIRED", "the event file is missing", field="event")
        if fields.thumbnail_promised and upload.thumbnail is None:
            raise InvalidArgument(
                "THUMBNAIL_MISSING", "has_thumbnail is true but no thumbnail was sent",
                field="thumbnail",
            )
        media = upload.media
        if fields.declared_size is not None and fields.declared_size != media.size:
            raise InvalidArgument(
                "SIZE_MISMATCH",
                f"received {media.size} bytes, declared {fields.declared_size}",
                field="size", declared=str(fields.declared_size), received=str(media.size),
            )
        if fields.declared_sha256 and fields.declared_sha256 != media.sha256:
            raise InvalidArgument(
                "SHA256_MISMATCH", "the received bytes do not match the declared sha256",
                field="sha256", declared=fields.declared_sha256, received=media.sha256,
            )
        mime = detect_mime(name, media.head)
        media_type = fields.media_type or classify(mime)
        has_thumbnail = upload.thumbnail is not None or bool(fill and fill.has_thumbnail)
        thumbnail_size = upload.thumbnail.size if upload.thumbnail is not None else None
        if fill is not None and fill.has_thumbnail and upload.thumbnail is None:
            # The one the device announced it with stays, as its file is: an earlier upload of this
            # capture whose commit failed may have replaced it (store: a replaced file stays).
            try:
                thumbnail_size = self.storage.thumbnail_path(fill.device, fill.id).stat().st_size
            except FileNotFoundError:
                thumbnail_size = fill.thumbnail_size
        return Event(
            id=fill.id if fill else event_id or validation.new_event_id(),
            device=upload.device,
            name=name,
            media_type=media_type,
            mime_type=mime,
            size=media.size,
            sha256=media.sha256,
            has_thumbnail=has_thumbnail,
            thumbnail_size=thumbnail_size,
            thumbnail_state=initial_thumbnail_state(media_type, has_thumbnail),
            metadata_json=fields.metadata_json,
            created=fill.created if fill else utcnow(),
            device_key=fill.device_key if fill else None,
            # An announced event's content is that capture already: no second key for it.
            device_event_id=(fields.device_event_id or None) if fill is None else None,
        )

    def _lock_announced(self, session: Session, event: Event) -> None:
        """Turn an announced row into a stored one; the UPDATE takes the row lock before any file
        moves, so two uploads of one announced event cannot both store content."""
        updated = session.exec(  # type: ignore[call-overload]
            sa.update(Event)
            .where(col(Event.id) == event.id, col(Event.device) == event.device,
                   col(Event.state) == "on_device",
                   # A sha256 a later announcement recorded while this upload streamed binds it too.
                   col(Event.sha256).in_(("", event.sha256)))
            .values(state="stored", size=event.size, sha256=event.sha256,
                    mime_type=event.mime_type, media_type=event.media_type,
                    has_thumbnail=event.has_thumbnail, thumbnail_size=event.thumbnail_size, name=event.name,
                    metadata_json=event.metadata_json, thumbnail_state=event.thumbnail_state)
        ).rowcount
        if updated:
            return
        if (now := session.get(Event, event.id)) is None:  # deleted, or replaced by a new capture meanwhile
            raise event_not_found(event.device, event.id)
        if now.state == "on_device":
            raise InvalidArgument(
                "SHA256_MISMATCH", "the content's sha256 is not the one its device announced", field="sha256",
            )
        raise FailedPrecondition(
            "EVENT_ALREADY_STORED", f"event {event.id} is not waiting for content",
            event_id=event.id,
        )


# The operator is told of a lost file once an hour per event and process: every GET or HEAD of it
# wrote an ERROR line, so any reader could flood the ERROR alerts (each answer's access line still
# names its reason).
LOST_REPEAT_SECONDS = 3600.0
_lost_told: dict[str, float] = {}
_lost_lock = threading.Lock()


def _media_lost(event: Event, reason: str, what: str) -> DataLoss:
    now = time.monotonic()
    with _lost_lock:
        if len(_lost_told) > 10_000:  # bounded: a whole volume gone names every event
            _lost_told.clear()
        tell = now - _lost_told.get(event.id, -LOST_REPEAT_SECONDS) >= LOST_REPEAT_SECONDS
        if tell:
            _lost_told[event.id] = now
    if tell:
        log.error("stored media lost", extra={"device": event.device, "event_id": event.id, "problem": reason})
    return DataLoss(
        reason, f"the stored media of event {event.id} {what}: the server's storage lost it "
        "(its operator is told)", device=event.device, event_id=event.id,
    )


def event_not_found(device: str, event_id: str) -> NotFound:
    """EVENT_NOT_FOUND (404): no event of this id is the device's, or none any more."""
    return NotFound(
        "EVENT_NOT_FOUND", f"event {event_id} not found for device {device}",
        device=device, event_id=event_id,
    )


def delete_event_rows(session: Session, device: str, event_ids: list[str], *, session_ttl: float) -> list[str]:
    """Delete the rows of these events of the device, and record what a deletion must (below), in
    `session`, uncommitted: for the service, and for a backup's copy of the database (backup.py).
    Returns the ids there were to delete, in order."""
    # One statement for the batch: its triggers then lock the device's counter rows once, in
    # their one order (models.py), as every insert does. A statement per event locked them
    # event by event, so a batch mixing media types took them out of that order and
    # deadlocked with a concurrent upload on PostgreSQL.
    deleted = session.exec(  # type: ignore[call-overload]
        sa.delete(Event).where(col(Event.device) == device, col(Event.id).in_(event_ids))
        .returning(col(Event.id), col(Event.device_key), col(Event.size), col(Event.sha256),
                   col(Event.created))
    ).all()
    deleted_ids = []
    for event_id, device_key, size, sha256, created in sorted(deleted):
        deleted_ids.append(event_id)
        forget_event(session, event_id, session_ttl=session_ttl)
        if device_key is not None:  # announced: the device will announce it again
            session.exec(  # type: ignore[call-overload]
                sa.delete(DeletedCapture).where(col(DeletedCapture.device) == device,
                                                col(DeletedCapture.device_key) == device_key)
            )
            now = utcnow()
            session.add(DeletedCapture(device=device, device_key=device_key, event_id=event_id,
                                       size=size, sha256=sha256, created=created,
                                       deleted_at=now, announced_at=now))
    return deleted_ids


def forget_event(session: Session, event_id: str, *, session_ttl: float) -> None:
    """What refers to an event whose row `session` deletes: a pull still open for it has
    nothing left to fetch; its completed resumable sessions answer UPLOAD_EVENT_DELETED for
    one session TTL from now, then the sweeper removes them (resumable.py)."""
    session.exec(  # type: ignore[call-overload]
        sa.update(DeviceCommand)
        .where(col(DeviceCommand.event_id) == event_id, col(DeviceCommand.open_key).is_not(None))
        .values(state="cancelled", open_key=None)
    )
    session.exec(  # type: ignore[call-overload]
        sa.update(UploadSessionRow)
        .where(col(UploadSessionRow.event_id) == event_id)
        .values(expires_at=utcnow() + datetime.timedelta(seconds=session_ttl))
    )
