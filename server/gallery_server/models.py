"""Every table of the gallery, in one place."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import re

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from .clock import utcnow
from .listing_json import LISTED_COLUMNS

log = logging.getLogger(__name__)


class Event(SQLModel, table=True):
    """One stored media file of a device. A row exists only once its file is complete on disk."""

    __tablename__ = "events"
    __table_args__ = (
        # Serves the listing (newest first, id as tie-break) and the per-device stats.
        sa.Index("ix_events_device_created", "device", "created", "id"),
        sa.Index("ix_events_device_type_created", "device", "media_type", "created", "id"),
        # Announcing the same device-side file twice yields the same event.
        sa.UniqueConstraint("device", "device_key", name="uq_events_device_key"),
        # The thumbnail queue (thumbnails.py): pending work, newest first.
        sa.Index("ix_events_thumbnail_queue", "thumbnail_state", "created", "id"),
        # FindExistingChecksums and StartUpload's dedupe: which digests a device has.
        sa.Index("ix_events_device_sha256", "device", "sha256"),
        # A capture the device names (device_event_id) is stored once, even when retries race on
        # several replicas: the loser's insert fails here and it answers with the winner's event.
        sa.UniqueConstraint("device", "device_event_id", name="uq_events_device_event_id"),
    )

    id: str = Field(primary_key=True, max_length=64)
    device: str = Field(max_length=128)
    name: str = Field(max_length=1024)
    media_type: str = Field(max_length=16)
    mime_type: str = Field(max_length=128)
    size: int = Field(sa_type=sa.BigInteger)
    sha256: str = Field(max_length=64)
    has_thumbnail: bool = False
    # Bytes of the thumbnail the device sent, which its quota counts with the media (quota.py);
    # NULL for none, for one the server made, and in rows from before it was kept.
    thumbnail_size: int | None = Field(default=None, sa_type=sa.BigInteger)
    # The uploader's metadata object, kept as the JSON text it was validated as.
    metadata_json: str = Field(default="{}", sa_type=sa.Text)
    # UTC; rendered as RFC 3339 UTC.
    created: datetime.datetime
    # When the server got the row (an upload stored, an announcement, an import); NULL in rows
    # from before it was kept. Retention (retention.py) waits for it as well as for `created`,
    # which for an announced event is the device's clock: one reset to 1970 must not make its
    # captures look decades old.
    received_at: datetime.datetime | None = Field(default_factory=utcnow, sa_column_kwargs={"default": utcnow})
    # STORED: the content is in media/. ON_DEVICE: announced by the device, content not yet pulled
    # (size and sha256 are then the device's claims).
    state: str = Field(default="stored", max_length=16)
    # The device's own key for an announced file; NULL for uploads.
    device_key: str | None = Field(default=None, max_length=512)
    # The device's own id for an uploaded capture (UploadHeader.device_event_id, the REST form
    # field `device_event_id`); NULL when it sent none. Separate from device_key: announcing and
    # uploading are different protocols, and an id of one must not collide with the other's.
    device_event_id: str | None = Field(default=None, max_length=128)
    # Server-made thumbnails (thumbnails.py): "" when the device sent one or none is wanted;
    # pending -> working -> generated | failed | skipped. attempts counts claims (a crash mid-file
    # is retried, a file that keeps crashing its worker is given up on).
    thumbnail_state: str = Field(default="", max_length=16)
    thumbnail_attempts: int = 0
    thumbnail_claimed_at: datetime.datetime | None = None
    # What the server read from the file (dimensions, capture time, duration) as a JSON object, or
    # "" before it looked; shown as metadata.media unless the device sent its own `media` key.
    media_info_json: str = Field(default="", sa_type=sa.Text)

    @property
    def stored_bytes(self) -> int:
        """What the event takes of its device's quota once stored (DeviceUsage's triggers)."""
        return self.size + (self.thumbnail_size or 0)


THUMBNAILED_MEDIA_TYPES = ("image", "video")


def initial_thumbnail_state(media_type: str, has_thumbnail: bool) -> str:
    """A stored image or video that arrived without a thumbnail is queued for one."""
    return "pending" if not has_thumbnail and media_type in THUMBNAILED_MEDIA_TYPES else ""


# A grant state whose URL may still complete. `uploading` is the state a PUT held its URL in while
# it streamed, before PUTs stopped taking URLs: a database from then may still have it, for good.
GRANT_UNUSED = ("open", "uploading")


class UploadGrant(SQLModel, table=True):
    """The single-use state of one pair of pre-signed URLs (media, optional thumbnail).

    The URLs themselves are stateless HMAC tokens; this row is what makes each usable once and
    lets the media and thumbnail PUTs meet at one event id whichever arrives first.
    States: `open` -> `done`, in the transaction that stores what the PUT brought (a PUT that
    fails leaves `open`: the client retries); `none` marks a thumbnail URL that was never issued.
    """

    __tablename__ = "upload_grants"
    __table_args__ = (
        # SignedUploads.create_urls counts a device's unused ones.
        sa.Index("ix_upload_grants_device_expires", "device", "expires_at"),
        # A device's thumbnails waiting for their media, which every read of its quota sums
        # (quota.py): only those rows, not the device's every URL of the last hour.
        sa.Index("ix_upload_grants_waiting_thumbnails", "device",
                 sqlite_where=sa.text("thumbnail_bytes IS NOT NULL"),
                 postgresql_where=sa.text("thumbnail_bytes IS NOT NULL")),
    )

    event_id: str = Field(primary_key=True, max_length=64)
    device: str = Field(max_length=128)
    filename: str = Field(max_length=1024)
    expires_at: datetime.datetime
    media_state: str = Field(default="open", max_length=16)
    thumbnail_state: str = Field(default="none", max_length=16)
    # Bytes of a thumbnail PUT before its media: on the disk, and in the device's quota until the
    # media's event counts it (quota.py); NULL otherwise.
    thumbnail_bytes: int | None = Field(default=None, sa_type=sa.BigInteger)


class DeviceCommand(SQLModel, table=True):
    """A durable command for a device (so far: upload an announced event's content).

    Delivered in `seq` order, at least once: a command delivered to a connection that is no longer
    live is delivered again. States: pending -> delivered -> acked -> completed | failed | expired.
    """

    __tablename__ = "device_commands"
    __table_args__ = (sa.Index("ix_device_commands_device_state", "device", "state", "seq"),)

    seq: int | None = Field(default=None, primary_key=True)
    id: str = Field(max_length=64, unique=True)
    device: str = Field(max_length=128)
    event_id: str = Field(max_length=64, index=True)
    kind: str = Field(default="upload_event", max_length=32)
    state: str = Field(default="pending", max_length=16)
    # The event id while the command is open, NULL once closed: the unique index makes "at most one
    # open pull per event" hold across concurrent requests and replicas.
    open_key: str | None = Field(default=None, max_length=64, unique=True)
    error: str = Field(default="", max_length=1024)
    bytes_sent: int = Field(default=0, sa_type=sa.BigInteger)
    attempts: int = 0
    delivered_to: str | None = Field(default=None, max_length=64)
    created: datetime.datetime
    expires_at: datetime.datetime
    delivered_at: datetime.datetime | None = None


class DeletedCapture(SQLModel, table=True):
    """An announced event a user (or the retention) deleted. The device still holds the file and
    announces its whole folder again after every reconnect: the same capture (same key, size and
    sha256) is answered `deleted` instead of coming back as a new event (Devices.announce). A new
    capture under the key replaces the row. One row per key, until its device has not announced
    it for GALLERY_DELETED_CAPTURE_DAYS: the device no longer holds the file, and the reconciler
    forgets it (without that, a fleet whose files have unique names kept a row per capture it
    ever deleted)."""

    __tablename__ = "deleted_captures"
    # The reconciler's walk of the rows to forget, in batches, each a range of this index.
    __table_args__ = (sa.Index("ix_deleted_captures_announced", "announced_at", "device", "device_key"),)

    device: str = Field(primary_key=True, max_length=128)
    device_key: str = Field(primary_key=True, max_length=512)
    event_id: str = Field(max_length=64)
    size: int = Field(sa_type=sa.BigInteger)
    sha256: str = Field(max_length=64)
    created: datetime.datetime  # the capture time the device announced
    deleted_at: datetime.datetime
    # When its device last announced it (the deletion's time until it does), written again once
    # it is older than a tenth of the days it is remembered (Devices._refresh_due). NULL in rows
    # an earlier version wrote, until the reconciler's next pass sets it to that pass's time.
    announced_at: datetime.datetime | None = None


class DeviceConnection(SQLModel, table=True):
    """A live command channel; a connection whose heartbeat is stale counts as gone."""

    __tablename__ = "device_connections"

    id: str = Field(primary_key=True, max_length=64)
    device: str = Field(max_length=128, index=True)
    last_seen: datetime.datetime


class UploadSessionRow(SQLModel, table=True):
    """A resumable upload (resumable.py). Its bytes are in staging/sessions/<device>/<upload_id>.

    `committed_size` counts bytes fsynced in that file; it is raised only after the fsync, so the
    file always holds at least that many. `event_id` is set, in the transaction that stores the
    event, once the upload is complete; the row then remains as long as that event exists (its
    bytes are gone), so that a retry, however late, gets the same event and never a second one.
    Upload ids containing a "." belong to pre-signed URLs (signed_urls.py), which native ids
    cannot contain.
    """

    __tablename__ = "upload_sessions"
    __table_args__ = (
        sa.Index("ix_upload_sessions_expires", "expires_at"),
        # ResumableUploads counts a device's open ones (its completed ones stay with their events).
        sa.Index("ix_upload_sessions_device_expires", "device", "expires_at"),
    )

    device: str = Field(primary_key=True, max_length=128)
    upload_id: str = Field(primary_key=True, max_length=64)
    name: str = Field(max_length=1024)
    media_type: str = Field(default="", max_length=16)
    metadata_json: str = Field(default="{}", sa_type=sa.Text)
    declared_size: int | None = Field(default=None, sa_type=sa.BigInteger)
    declared_sha256: str = Field(default="", max_length=64)
    committed_size: int = Field(default=0, sa_type=sa.BigInteger)
    created: datetime.datetime
    expires_at: datetime.datetime
    event_id: str | None = Field(default=None, max_length=64)
    # The device's id for the capture (StartUploadRequest.device_event_id), given to the event.
    device_event_id: str = Field(default="", max_length=128)
    # A bound on expires_at whatever the writes: a pre-signed URL's session ends with the URL.
    not_after: datetime.datetime | None = None


class EventCount(SQLModel, table=True):
    """How many events (and bytes) a device has of each media type: what GetStats answers.

    Maintained by database triggers on `events` (below), in the same transaction as every insert,
    delete or change of device, media_type or size, whatever code path makes it (uploads, imports,
    announcements, reconciliation, a bulk load in SQL). Each change is an atomic
    `count = count + n` upsert on one row, so concurrent writers on PostgreSQL never lose an update,
    and stats cost one index lookup per request however many events a device has.
    """

    __tablename__ = "event_counts"

    device: str = Field(primary_key=True, max_length=128)
    media_type: str = Field(primary_key=True, max_length=16)
    count: int = Field(default=0, sa_type=sa.BigInteger)
    size: int = Field(default=0, sa_type=sa.BigInteger)


_COUNT_ADD = (
    "INSERT INTO event_counts (device, media_type, count, size) VALUES (NEW.device, NEW.media_type, 1, NEW.size) "
    "ON CONFLICT (device, media_type) DO UPDATE "
    "SET count = event_counts.count + 1, size = event_counts.size + excluded.size"
)
_COUNT_REMOVE = (
    "UPDATE event_counts SET count = count - 1, size = size - OLD.size "
    "WHERE device = OLD.device AND media_type = OLD.media_type"
)
_SQLITE_TRIGGERS = (
    f"CREATE TRIGGER IF NOT EXISTS events_count_insert AFTER INSERT ON events BEGIN {_COUNT_ADD}; END",
    f"CREATE TRIGGER IF NOT EXISTS events_count_delete AFTER DELETE ON events BEGIN {_COUNT_REMOVE}; END",
    "CREATE TRIGGER IF NOT EXISTS events_count_update AFTER UPDATE OF device, media_type, size ON events "
    f"BEGIN {_COUNT_REMOVE}; {_COUNT_ADD}; END",
)
# On PostgreSQL inserts and deletes are counted once per statement, from its transition table: a
# row trigger's upsert of the same counter row for every row of a bulk load left one more version
# of that row for the next upsert to step over within the transaction, so a load slowed down as it
# went (100,000 rows in one COPY: 65 - 75 s, 2.7 s counted per statement; a delete of 50,000 rows:
# 16 s, 0.1 s). The price, paid by the server's own writes, which are one row per statement: a
# single-row insert costs PostgreSQL ~60 µs more CPU (~12%), a single-row delete about the same as
# before (~450 µs either way; by hand, 2026-11-29). Chosen so that a load or clean-up in SQL by
# another tool cannot take hours. Updates keep a row trigger: a statement trigger with a transition
# table cannot be limited to the three counted columns, and would run for every change of an
# event's state. TRUNCATE empties the counters too.
_POSTGRES_TRIGGERS = (
    "CREATE OR REPLACE FUNCTION events_count() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    f"{_COUNT_REMOVE}; {_COUNT_ADD}; RETURN NULL; END $$",
    "CREATE OR REPLACE FUNCTION events_count_inserted() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    "INSERT INTO event_counts (device, media_type, count, size) "
    "SELECT device, media_type, COUNT(*), SUM(size) FROM inserted GROUP BY device, media_type "
    "ORDER BY device, media_type "  # counter rows are locked in one order by every INSERT or DELETE
    "ON CONFLICT (device, media_type) DO UPDATE "
    "SET count = event_counts.count + excluded.count, size = event_counts.size + excluded.size; "
    "RETURN NULL; END $$",
    "CREATE OR REPLACE FUNCTION events_count_deleted() RETURNS trigger LANGUAGE plpgsql AS $$ "
    "DECLARE gone record; BEGIN "
    "FOR gone IN SELECT device, media_type, COUNT(*) AS count, SUM(size) AS size FROM deleted "
    "GROUP BY device, media_type ORDER BY device, media_type LOOP "
    "UPDATE event_counts SET count = event_counts.count - gone.count, size = event_counts.size - gone.size "
    "WHERE device = gone.device AND media_type = gone.media_type; "
    "END LOOP; RETURN NULL; END $$",
    # OR REPLACE (PostgreSQL 14+), not DROP + CREATE: a DROP TRIGGER would hold an ACCESS EXCLUSIVE
    # lock on events for the rest of this transaction, the backfill's scan included.
    "CREATE OR REPLACE TRIGGER events_count AFTER UPDATE OF device, media_type, size ON events "
    "FOR EACH ROW EXECUTE FUNCTION events_count()",
    "CREATE OR REPLACE TRIGGER events_count_insert AFTER INSERT ON events REFERENCING NEW TABLE AS inserted "
    "FOR EACH STATEMENT EXECUTE FUNCTION events_count_inserted()",
    "CREATE OR REPLACE TRIGGER events_count_delete AFTER DELETE ON events REFERENCING OLD TABLE AS deleted "
    "FOR EACH STATEMENT EXECUTE FUNCTION events_count_deleted()",
    "CREATE OR REPLACE FUNCTION events_count_truncated() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    "DELETE FROM event_counts; RETURN NULL; END $$",
    "CREATE OR REPLACE TRIGGER events_count_truncate AFTER TRUNCATE ON events "
    "FOR EACH STATEMENT EXECUTE FUNCTION events_count_truncated()",
)
# A database created before event_counts existed gets its counts once, when the table is created.
_BACKFILL = (
    "INSERT INTO event_counts (device, media_type, count, size) "
    "SELECT device, media_type, COUNT(*), COALESCE(SUM(size), 0) FROM events GROUP BY device, media_type"
)


class DeviceUsage(SQLModel, table=True):
    """How many bytes of media a device has stored on the server: what GALLERY_MAX_DEVICE_BYTES
    bounds (quota.py), with the pre-signed thumbnails waiting for their media (UploadGrant).

    Stored events count their size: an announced one's is the device's claim about a file it still
    holds. The thumbnails a device sent count too, an announced event's as well (Event.thumbnail_size:
    they are on the server's disk): a device at its quota could otherwise fill the disk with 0-byte
    or announced events of 10 MiB thumbnails. Maintained by
    triggers on `events` as EventCount is, in the transaction that stores, pulls or deletes the
    event or attaches its thumbnail, so a store that passes the quota holds this row's lock until
    it commits (Gallery.store checks it after its write)."""

    __tablename__ = "device_usage"

    device: str = Field(primary_key=True, max_length=128)
    stored_bytes: int = Field(default=0, sa_type=sa.BigInteger)


def _stored(row: str = "") -> str:
    """What an event's row (`row`: "NEW.", "OLD." or none) takes of its device's quota."""
    return f"CASE WHEN {row}state = 'stored' THEN {row}size ELSE 0 END + COALESCE({row}thumbnail_size, 0)"


def _counted(row: str = "") -> str:
    """Whether the row takes any of it: the usage row is written (and locked) only then."""
    return f"({row}state = 'stored' OR {row}thumbnail_size IS NOT NULL)"


_STORED, _COUNTED = _stored(), _counted()
_USAGE_ADD = (
    f"INSERT INTO device_usage (device, stored_bytes) SELECT NEW.device, {_stored('NEW.')} WHERE {_counted('NEW.')} "
    "ON CONFLICT (device) DO UPDATE SET stored_bytes = device_usage.stored_bytes + excluded.stored_bytes"
)
_USAGE_REMOVE = (
    f"UPDATE device_usage SET stored_bytes = stored_bytes - ({_stored('OLD.')}) "
    f"WHERE device = OLD.device AND {_counted('OLD.')}"
)
# has_thumbnail, not thumbnail_size: every writer of a thumbnail's size sets has_thumbnail with it
# (a tool's UPDATE of thumbnail_size must too), and every column here is a listed one, so that an
# UPDATE that fires these triggers fires the listing version's first (test_listing_cache.py: the
# lock order of one device's writers on PostgreSQL).
_USAGE_COLUMNS = "device, state, size, has_thumbnail"
_SQLITE_USAGE_TRIGGERS = (
    f"CREATE TRIGGER IF NOT EXISTS events_usage_insert AFTER INSERT ON events BEGIN {_USAGE_ADD}; END",
    f"CREATE TRIGGER IF NOT EXISTS events_usage_delete AFTER DELETE ON events BEGIN {_USAGE_REMOVE}; END",
    f"CREATE TRIGGER IF NOT EXISTS events_usage_update AFTER UPDATE OF {_USAGE_COLUMNS} ON events "
    f"BEGIN {_USAGE_REMOVE}; {_USAGE_ADD}; END",
)
# As _POSTGRES_TRIGGERS: inserts and deletes per statement, updates (a pull's on_device -> stored)
# per row; TRUNCATE empties the table.
_POSTGRES_USAGE_TRIGGERS = (
    "CREATE OR REPLACE FUNCTION events_usage() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    f"{_USAGE_REMOVE}; {_USAGE_ADD}; RETURN NULL; END $$",
    "CREATE OR REPLACE FUNCTION events_usage_inserted() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    "INSERT INTO device_usage (device, stored_bytes) "
    f"SELECT device, SUM({_STORED}) FROM inserted WHERE {_COUNTED} GROUP BY device ORDER BY device "
    "ON CONFLICT (device) DO UPDATE SET stored_bytes = device_usage.stored_bytes + excluded.stored_bytes; "
    "RETURN NULL; END $$",
    "CREATE OR REPLACE FUNCTION events_usage_deleted() RETURNS trigger LANGUAGE plpgsql AS $$ "
    "DECLARE gone record; BEGIN "
    f"FOR gone IN SELECT device, SUM({_STORED}) AS size FROM deleted WHERE {_COUNTED} "
    "GROUP BY device ORDER BY device LOOP "
    "UPDATE device_usage SET stored_bytes = device_usage.stored_bytes - gone.size WHERE device = gone.device; "
    "END LOOP; RETURN NULL; END $$",
    f"CREATE OR REPLACE TRIGGER events_usage AFTER UPDATE OF {_USAGE_COLUMNS} ON events "
    "FOR EACH ROW EXECUTE FUNCTION events_usage()",
    "CREATE OR REPLACE TRIGGER events_usage_insert AFTER INSERT ON events REFERENCING NEW TABLE AS inserted "
    "FOR EACH STATEMENT EXECUTE FUNCTION events_usage_inserted()",
    "CREATE OR REPLACE TRIGGER events_usage_delete AFTER DELETE ON events REFERENCING OLD TABLE AS deleted "
    "FOR EACH STATEMENT EXECUTE FUNCTION events_usage_deleted()",
    "CREATE OR REPLACE FUNCTION events_usage_truncated() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    "DELETE FROM device_usage; RETURN NULL; END $$",
    "CREATE OR REPLACE TRIGGER events_usage_truncate AFTER TRUNCATE ON events "
    "FOR EACH STATEMENT EXECUTE FUNCTION events_usage_truncated()",
)
_USAGE_BACKFILL = (
    "INSERT INTO device_usage (device, stored_bytes) "
    f"SELECT device, SUM({_STORED}) FROM events WHERE {_COUNTED} GROUP BY device"
)


class ListingVersion(SQLModel, table=True):
    """A number that changes whenever what a listing shows of a device's events changes: a page
    read at one version is the page as long as the version stays (listing.py keeps recent pages by
    it, and asks for this one row instead of the page's 50).

    Drawn anew by triggers on `events`, in the transaction of every insert, delete and update of a
    listed column (listing_json.LISTED_COLUMNS), whoever writes (as EventCount), at random rather
    than counted up: a database rolled back (a failover to a standby without the last commits, a
    restore) would count up again from an earlier number to one a replica has kept a page under,
    for other events. A device's row stays when its last event goes, and TRUNCATE draws every row
    anew. A device without a row reads as 0: it has no events."""

    __tablename__ = "listing_versions"

    device: str = Field(primary_key=True, max_length=128)
    version: int = Field(default=0, sa_type=sa.BigInteger)


def _version_draws(devices: str, random: str) -> str:
    """Upsert a new random version for each device `devices` selects (a column named device)."""
    return (
        f"INSERT INTO listing_versions (device, version) SELECT device, {random} FROM ({devices}) AS changed "
        "WHERE true ORDER BY device "  # WHERE: SQLite's upsert after a SELECT must have one
        "ON CONFLICT (device) DO UPDATE SET version = excluded.version"
    )


_SQLITE_RANDOM = "random()"  # 64 bits
_POSTGRES_RANDOM = "(random() * 9.0e18)::bigint"  # 52 bits of randomness
# An UPDATE of a column a listing shows: one of the others (a thumbnail's claim, a thumbnail that
# cannot be made, a pull's row lock, a tool's edit of the metadata) leaves every page as it was,
# and its kept copies and entity-tags current. A column added to the listing changes these
# statements, and so the table's generation (_KEPT_TABLES): databases made before get the new
# list at their next start, and until then listing.Listing trusts no version (its answer()).
# The counters' and the usage's columns are listed columns (tests/unit/test_listing_cache.py), so
# every UPDATE that fires their triggers fires this one first (below).
_UPDATE_OF_LISTED = f"UPDATE OF {', '.join(LISTED_COLUMNS)}"
_SQLITE_VERSION_TRIGGERS = tuple(
    f"CREATE TRIGGER IF NOT EXISTS events_changed{suffix} AFTER {event} ON events "
    f"BEGIN {_version_draws(devices, _SQLITE_RANDOM)}; END"
    for suffix, event, devices in (
        ("_insert", "INSERT", "SELECT NEW.device AS device"),
        ("_delete", "DELETE", "SELECT OLD.device AS device"),
        ("", _UPDATE_OF_LISTED, "SELECT OLD.device AS device UNION SELECT NEW.device"),
    )
)
# As _POSTGRES_TRIGGERS: inserts and deletes once per statement, updates per row, TRUNCATE draws
# every row anew. Named to fire before events_count* and events_usage* (PostgreSQL fires a
# relation's triggers of one event by name): every statement on events that changes its counters
# locks its device's version row before its counter rows, so two writers of one device never each
# hold a row the other waits for (a transaction that deletes an event of one type and inserts one
# of another, beside an insert of the second type, did: review of the first version).
_POSTGRES_VERSION_TRIGGERS = (
    "CREATE OR REPLACE FUNCTION events_changed() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    f"{_version_draws('SELECT OLD.device AS device UNION SELECT NEW.device', _POSTGRES_RANDOM)}; "
    "RETURN NULL; END $$",
    "CREATE OR REPLACE FUNCTION events_changed_inserted() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    f"{_version_draws('SELECT DISTINCT device FROM inserted', _POSTGRES_RANDOM)}; RETURN NULL; END $$",
    "CREATE OR REPLACE FUNCTION events_changed_deleted() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    f"{_version_draws('SELECT DISTINCT device FROM deleted', _POSTGRES_RANDOM)}; RETURN NULL; END $$",
    f"CREATE OR REPLACE TRIGGER events_changed AFTER {_UPDATE_OF_LISTED} ON events "
    "FOR EACH ROW EXECUTE FUNCTION events_changed()",
    "CREATE OR REPLACE TRIGGER events_changed_insert AFTER INSERT ON events REFERENCING NEW TABLE AS inserted "
    "FOR EACH STATEMENT EXECUTE FUNCTION events_changed_inserted()",
    "CREATE OR REPLACE TRIGGER events_changed_delete AFTER DELETE ON events REFERENCING OLD TABLE AS deleted "
    "FOR EACH STATEMENT EXECUTE FUNCTION events_changed_deleted()",
    "CREATE OR REPLACE FUNCTION events_changed_truncated() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    f"UPDATE listing_versions SET version = {_POSTGRES_RANDOM}; RETURN NULL; END $$",
    "CREATE OR REPLACE TRIGGER events_changed_truncate AFTER TRUNCATE ON events "
    "FOR EACH STATEMENT EXECUTE FUNCTION events_changed_truncated()",
)


def _version_backfill(random: str) -> str:
    """A device with events from before the table gets its row when the table is created."""
    return (f"INSERT INTO listing_versions (device, version) SELECT device, {random} "
            "FROM (SELECT DISTINCT device FROM events) AS listed")


class TriggerGeneration(SQLModel, table=True):
    """Which generation of its triggers each table kept by triggers on `events` has (_KEPT_TABLES).

    Triggers are made in the database, once: without this a database made by an earlier release
    would keep that release's triggers for good. A start that finds an earlier generation (or
    none: a database made before this table) replaces them; one that finds a later generation
    leaves them, so a replica of the older release restarted during a rolling upgrade does not
    put its triggers back."""

    __tablename__ = "trigger_generations"

    kept_table: str = Field(primary_key=True, max_length=64)
    generation: int = Field(sa_type=sa.Integer)


class GalleryIdentity(SQLModel, table=True):
    """Which gallery this database is: one row, whose id the data folder holds too (identity.py)."""

    __tablename__ = "gallery_identity"

    name: str = Field(primary_key=True, max_length=16)  # always "gallery": one row
    gallery_id: str = Field(max_length=64)


@dataclasses.dataclass(frozen=True)
class _KeptTable:
    """A table kept by triggers on `events`: their statements on each database, and the backfill
    that fills it when it is created on a database that already has events."""

    model: type[SQLModel]
    # Raise it with any change of the statements below: tests/unit/test_trigger_generations.py
    # pins each generation's statements, so that no change can be left out of it.
    generation: int
    # The names of its triggers (and PostgreSQL functions): the first, or the first and `_...`;
    # the others are names an earlier generation used, whose triggers a start drops.
    prefixes: tuple[str, ...]
    sqlite: tuple[str, ...]
    postgres: tuple[str, ...]
    sqlite_backfill: str
    postgres_backfill: str
    # Made again (emptied, then the backfill) whenever its triggers are replaced, under the same
    # lock on `events`: for a figure an earlier generation counted otherwise, whose rows this
    # release may have written meanwhile (a start that kept the earlier triggers: they did not
    # count what the new ones take away on a delete).
    recount: bool = False

    def owns(self, name: str) -> bool:
        return any(name == prefix or name.startswith(f"{prefix}_") for prefix in self.prefixes)

    def statements(self, postgres: bool) -> tuple[str, ...]:
        return self.postgres if postgres else self.sqlite

    def made(self, kind: str, postgres: bool) -> set[str]:
        """The names of the triggers or functions (`kind`) its statements make (CREATE OR REPLACE,
        which replaces one of the same name in place: PostgreSQL's only)."""
        if not postgres:
            return set()
        return {m[1] for s in self.postgres if (m := re.match(rf"CREATE OR REPLACE {kind} (\w+)", s))}


_KEPT_TABLES = (
    _KeptTable(EventCount, 1, ("events_count",), _SQLITE_TRIGGERS, _POSTGRES_TRIGGERS, _BACKFILL, _BACKFILL),
    # Generation 2 (2026-12-02): the device's thumbnails count (Event.thumbnail_size), an announced
    # event's too. Counted again at a replacement: a start of this release that kept generation 1
    # (PostgreSQL's lock not had in time) wrote sizes those triggers did not count, which generation
    # 2's would take away at their delete (the usage went below 0 in a review's test).
    _KeptTable(DeviceUsage, 2, ("events_usage",), _SQLITE_USAGE_TRIGGERS, _POSTGRES_USAGE_TRIGGERS,
               _USAGE_BACKFILL, _USAGE_BACKFILL, recount=True),
    # events_listing*: the first version of these triggers (e5e91f9, 2026-12-01), counting up.
    # Generation 2 (2026-12-01): UPDATE OF the listed columns, where 1 drew a version at any UPDATE.
    _KeptTable(ListingVersion, 2, ("events_changed", "events_listing"), _SQLITE_VERSION_TRIGGERS,
               _POSTGRES_VERSION_TRIGGERS, _version_backfill(_SQLITE_RANDOM), _version_backfill(_POSTGRES_RANDOM)),
)
# How long a start waits to replace the triggers of a table that has them (PostgreSQL): the lock it
# takes on `events` queues every write behind it, and an open write transaction, or VACUUM, may
# hold `events` for long. A start that cannot have it in time keeps the triggers it found (they
# work: an earlier generation is only slower or less exact; the listing's versions are not trusted
# then, listing.Listing), says so, and tries again at the next.
REPLACE_LOCK_TIMEOUT_MS = 2000


def generation_of(model: type[SQLModel]) -> int:
    """This release's generation of the triggers that keep `model`'s table (_KEPT_TABLES)."""
    return next(kept.generation for kept in _KEPT_TABLES if kept.model is model)


def trigger_names(connection: sa.Connection) -> list[str]:
    """The triggers on `events` (PostgreSQL: not its internal ones), by name."""
    if connection.dialect.name == "postgresql":
        select = "SELECT tgname FROM pg_trigger WHERE tgrelid = 'events'::regclass AND NOT tgisinternal"
    else:
        select = "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'events'"
    return sorted(name for (name,) in connection.exec_driver_sql(select))


def trigger_functions(connection: sa.Connection) -> list[str]:
    """PostgreSQL's trigger functions in the current schema, by name."""
    select = ("SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
              "WHERE n.nspname = current_schema() AND p.prorettype = 'trigger'::regtype")
    return sorted(name for (name,) in connection.exec_driver_sql(select))


@sa.event.listens_for(SQLModel.metadata, "after_create")
def _install_triggers(_metadata: sa.MetaData, connection: sa.Connection, **kw: object) -> None:
    """Runs after create_all (Database.create_tables, under its schema lock): a table kept by
    triggers that was just created gets them and its backfill; one whose triggers are of an
    earlier generation than this release's (TriggerGeneration) gets this release's instead."""
    created = kw.get("tables") or ()
    generations = TriggerGeneration.__table__  # type: ignore[attr-defined]
    recorded = dict(connection.execute(sa.select(generations.c.kept_table, generations.c.generation)).all())
    new = [kept for kept in _KEPT_TABLES if kept.model.__table__ in created]  # type: ignore[attr-defined]
    earlier = [kept for kept in _KEPT_TABLES
               if kept not in new and recorded.get(kept.model.__tablename__, 0) < kept.generation]
    if new:
        # Triggers it must have: waited for as long as the tables' creation was. Replicas of an
        # older version may be writing events meanwhile. On PostgreSQL, CREATE TRIGGER locks
        # events against writes (SHARE ROW EXCLUSIVE) until this transaction ends: a write under
        # way finishes first, and the backfill (READ COMMITTED, after it) counts it; a later one
        # waits and meets the triggers. SQLite's writers take turns anyway.
        _make_triggers(connection, new + earlier, recorded, backfill=new)
        return
    if not earlier:
        return
    if connection.dialect.name != "postgresql":  # the schema step holds SQLite's write lock already
        _make_triggers(connection, earlier, recorded, backfill=[])
        return
    try:
        with connection.begin_nested():  # a lock not had in time rolls back to here, and only this
            connection.exec_driver_sql(f"SET LOCAL lock_timeout = {int(REPLACE_LOCK_TIMEOUT_MS)}")
            _make_triggers(connection, earlier, recorded, backfill=[])
            connection.exec_driver_sql("SET LOCAL lock_timeout = 0")  # as create_tables has it
    except sa.exc.OperationalError as exc:
        if getattr(exc.orig, "sqlstate", None) != "55P03":  # lock_not_available
            raise
        log.warning("triggers of an earlier generation kept: events was not free to replace them in time;"
                    " the next start tries again",
                    extra={"tables": [kept.model.__tablename__ for kept in earlier],
                           "waited_ms": REPLACE_LOCK_TIMEOUT_MS})


def _make_triggers(connection: sa.Connection, tables: list[_KeptTable], recorded: dict[str, int], *,
                   backfill: list[_KeptTable]) -> None:
    """Make the triggers of `tables`, backfill those of `backfill`, and record their generations.
    Every drop comes before every CREATE: on PostgreSQL a DROP TRIGGER locks `events` against
    reads too (ACCESS EXCLUSIVE), and taking it after a CREATE's lock would be an upgrade, which
    can deadlock with a transaction that read `events` and then writes it."""
    postgres = connection.dialect.name == "postgresql"
    quote = connection.dialect.identifier_preparer.quote
    triggers, functions = trigger_names(connection), trigger_functions(connection) if postgres else []
    for kept in tables:
        # SQLite drops them all (it has no CREATE OR REPLACE TRIGGER); PostgreSQL only the names
        # the statements will not replace in place, and the functions no trigger calls then.
        for trigger in triggers:
            if kept.owns(trigger) and trigger not in kept.made("TRIGGER", postgres):
                connection.exec_driver_sql(f"DROP TRIGGER IF EXISTS {quote(trigger)}{' ON events' if postgres else ''}")
        for function in functions:
            if kept.owns(function) and function not in kept.made("FUNCTION", postgres):
                connection.exec_driver_sql(f"DROP FUNCTION IF EXISTS {quote(function)}()")
    generations = TriggerGeneration.__table__  # type: ignore[attr-defined]
    for kept in tables:
        name = kept.model.__tablename__
        for statement in kept.statements(postgres):
            connection.exec_driver_sql(statement)
        if kept in backfill or kept.recount:
            if kept not in backfill:
                connection.exec_driver_sql(f"DELETE FROM {quote(name)}")
            connection.exec_driver_sql(kept.postgres_backfill if postgres else kept.sqlite_backfill)
        if kept not in backfill:
            log.info("triggers replaced", extra={"table": name, "generation": kept.generation,
                                                 "replaced_generation": recorded.get(name, 0),
                                                 "counted_again": kept.recount})
        connection.execute(generations.delete().where(generations.c.kept_table == name))
        connection.execute(generations.insert().values(kept_table=name, generation=kept.generation))
