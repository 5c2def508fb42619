"""A device's events, a page at a time: the listing's selects, built once per combination of
filters, and the page read as rows or printed as the REST listing's JSON by the database itself
(listing_json). Keyset pages (paging.py) seek the (device, created, id) index, so a deep page costs
as the first. Gallery.list_page authorizes; this module reads.

Pages read lately are kept (PageCache) with the device's listing version they were read at
(models.ListingVersion): a page asked for again costs one lookup of that version, not the page's
rows, and is served only while the version is the same, on whichever replica wrote. The version
is also the page's entity-tag (etag): a client that names it in If-None-Match while it is current
is told its copy is (ListingAnswer.page None, HTTP 304), whether or not this replica kept the page.
"""

from __future__ import annotations

import collections
import datetime
import functools
import hashlib
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, Literal, NamedTuple, TypeVar

import cachetools
import sqlalchemy as sa

from . import listing_json, models, paging
from .db import Database
from .downloads import PRECONDITION_FAILED_REASON, entity_tags, none_match
from .errors import FailedPrecondition
from .listing_json import LISTED_COLUMNS
from .models import Event, ListingVersion, TriggerGeneration

log = logging.getLogger(__name__)

# A listed event: a row of LISTED_COLUMNS (what a listing shows) with their names, read-only.
ListedEvent = collections.namedtuple("ListedEvent", LISTED_COLUMNS)  # type: ignore[misc]

_VERSIONS = ListingVersion.__table__.c  # type: ignore[attr-defined]
# The device's listing version (no row: 0), alone and as a column of the pages the database prints.
_VERSION = sa.select(_VERSIONS.version).where(_VERSIONS.device == sa.bindparam("device"))
_VERSION_COLUMN = _VERSION.scalar_subquery()
_GENERATIONS = TriggerGeneration.__table__.c  # type: ignore[attr-defined]
# The generation of the triggers that draw the versions (Listing.versions_current).
_GENERATION = sa.select(_GENERATIONS.generation).where(_GENERATIONS.kept_table == ListingVersion.__tablename__)
# How often a listing looks again at which release's triggers draw the versions (Listing.versions_current).
GENERATION_LOOK_SECONDS = 30.0
# What a kept page costs beyond its bytes: its key (the query), the entry, the cache's own links.
_ENTRY_BYTES = 1024
# What an entity-tag stands for beyond its device's version and its query: the columns a page
# shows (a column added to the listing, which adds nothing to the versions, gives every page a new
# tag by itself), and a number to raise when a release prints the same rows differently or selects
# other rows for the same query, so that no client keeps a copy of the old answer as current.
_TAG_FORM = (1, LISTED_COLUMNS)
Page = TypeVar("Page")
Printed = Literal["json", "rows"]  # a page as the REST listing's JSON, or as rows (ListedEvent)


class ListingAnswer(NamedTuple, Generic[Page]):
    """A listing request's answer: the page, or None when If-None-Match named its entity-tag (the
    client's copy is current); the next page's token ("" after the last page, and with no page);
    the page's entity-tag (etag; "" while the listing versions are not this release's: Listing)."""

    page: Page | None
    next_page_token: str
    etag: str


@functools.lru_cache(maxsize=4096)
def _query_tag(kind: Printed, query: paging.ListQuery) -> str:
    """The part of an entity-tag that names the page asked for: two pages never share a tag,
    even when a client sends one page's tag with another's request."""
    return hashlib.blake2b(repr((_TAG_FORM, kind, query)).encode(), digest_size=8).hexdigest()


def _opaque_tag(kind: Printed, query: paging.ListQuery, version: int) -> str:
    return f"{version & 0xFFFF_FFFF_FFFF_FFFF:016x}-{_query_tag(kind, query)}"


def etag(kind: Printed, query: paging.ListQuery, version: int) -> str:
    """The weak entity-tag of the page of `query`, printed as `kind`, at this listing version of
    its device: `W/"<version>-<query>"` in hex. Weak, since the same page may be printed by the
    database or by Python (listing_json), whose bytes may differ; it holds the same events."""
    return f'W/"{_opaque_tag(kind, query, version)}"'


class PageCache:
    """Pages of listings read lately, at most `max_bytes` of them, the least recently asked for
    going first; each kept with the listing version of its device it was read at, and served only
    while the version read now is that one.

    The version comes from the page's own statement where the database prints the page (one
    snapshot: a page read once costs no more than before), or else is read just before the page:
    a write committed between the two leaves the page newer than its version, which that write
    replaced, so it is never served. Each change draws a random version (models.ListingVersion):
    one comes back by a chance of about 1 in 2^52, so a page served is what the database would
    answer."""

    def __init__(self, db: Database, max_bytes: int) -> None:
        self.db = db
        self._pages: cachetools.LRUCache[tuple[str, paging.ListQuery], tuple[int, Any]] = cachetools.LRUCache(
            max_bytes, getsizeof=_entry_size
        )
        self._lock = threading.Lock()  # LRUCache's reads move entries too; and the counts below
        # Pages answered, since the start: as kept, and as read from the database (metrics).
        self.served_kept = 0
        self.served_read = 0

    @property
    def keeps(self) -> bool:
        return bool(self._pages.maxsize)

    @property
    def max_bytes(self) -> int:
        return int(self._pages.maxsize)

    @property
    def kept_bytes(self) -> int:
        with self._lock:
            return int(self._pages.currsize)

    def clear(self) -> None:
        with self._lock:
            self._pages.clear()

    def version(self, device: str) -> int:
        rows = self.db.read_rows(_VERSION, {"device": device})
        return int(rows[0][0]) if rows else 0

    def get(
        self, kind: str, query: paging.ListQuery, read: Callable[[int | None], tuple[Page, int]], *,
        version: int | None = None, keep: bool = True,
    ) -> tuple[Page, int]:
        """The page of `query` (`kind`: how it is printed), kept or else read, and the listing
        version it was read at. `version`: the device's, if the caller has just read it;
        `read(version)` answers the page and the version it was read at. `keep`: False reads
        the page and keeps it not (the versions are not to be trusted: Listing.versions_current)."""
        key = (kind, query)
        keeps = self.keeps and keep
        if keeps:
            with self._lock:
                kept = self._pages.get(key)
            if kept is not None:
                if version is None:
                    version = self.version(query.device)
                if kept[0] == version:
                    with self._lock:
                        self.served_kept += 1
                    return kept[1], version  # type: ignore[no-any-return]
        page, version = read(version)
        with self._lock:
            self.served_read += 1
            if keeps:
                try:
                    self._pages[key] = (version, page)
                except ValueError:  # larger than the whole cache: served, not kept
                    pass
        return page, version


def _entry_size(entry: tuple[int, tuple[bytes | list[ListedEvent], str]]) -> int:
    """Bytes of a kept page: the REST JSON's own length, or each row's fields as Python holds them."""
    page, token = entry[1]
    if isinstance(page, bytes):
        held = len(page)
    else:
        held = sum(sys.getsizeof(row) + sum(map(sys.getsizeof, row)) for row in page)
    return _ENTRY_BYTES + held + len(token)


@functools.cache
def _listing_statement(
    *, by_type: bool, since: bool, until: bool, after: bool, newest_first: bool
) -> sa.Select[Any]:
    """The listing's select for one combination of filters (at most 32 of them).

    Core rows of the listed columns, not ORM objects: on a shallow page building Event objects
    cost ~10x the query itself (measured 2026-11-28). Rows answer the same attributes."""
    c = Event.__table__.c  # type: ignore[attr-defined]
    created, event_id = c.created, c.id
    statement = sa.select(*(c[name] for name in LISTED_COLUMNS)).where(
        c.device == sa.bindparam("device")
    )
    if by_type:
        statement = statement.where(c.media_type == sa.bindparam("media_type"))
    if since:
        statement = statement.where(created >= sa.bindparam("since", type_=created.type))
    if until:
        statement = statement.where(created < sa.bindparam("until", type_=created.type))
    if after:
        # A row-value comparison: SQLite and PostgreSQL both seek the (device, created, id) index to
        # the position, so a deep page costs as the first. (The equivalent OR of two conditions
        # made SQLite walk every newer row: 1.2 s at depth 500,000 in BENCHMARKS.md.)
        position = sa.tuple_(created, event_id)
        last = sa.tuple_(
            sa.bindparam("after_created", type_=created.type),
            sa.bindparam("after_id", type_=event_id.type),
        )
        statement = statement.where(position < last if newest_first else position > last)
    order = (created.desc(), event_id.desc()) if newest_first else (created, event_id)
    return (
        statement.order_by(*order)
        .offset(sa.bindparam("offset", type_=sa.Integer))
        .limit(sa.bindparam("limit", type_=sa.Integer))
    )


@functools.cache
def _sqlite_json_statement(page: sa.Select[Any], newest_first: bool) -> sa.Select[Any]:
    """One row for a whole page on SQLite: its JSON (listing_json.sqlite_array), the number of
    events, whether every `created` had the stored shape, "created id" of the last event (the
    least pair newest first, the greatest oldest first: `created` has a fixed width), and the
    device's listing version (NULL: 0)."""
    pages = page.add_columns(
        sa.literal_column(listing_json.sqlite_created).label(listing_json.CREATED_RFC3339)
    ).subquery("page")
    last = "min" if newest_first else "max"
    return sa.select(
        sa.literal_column(listing_json.sqlite_array),
        sa.literal_column("count(*)"),
        sa.literal_column(listing_json.sqlite_regular),
        sa.literal_column(f"{last}(created || ' ' || id)"),
        _VERSION_COLUMN,
    ).select_from(pages)


@functools.cache
def _postgres_json_statement(page: sa.Select[Any], newest_first: bool) -> sa.Select[Any]:
    """One row for a whole page on PostgreSQL: its JSON (listing_json.postgres_array; NULL for an
    empty page), the number of events, whether every `created` is one Python can hold, the last
    event's `created` and id (each aggregate in the page's order: PostgreSQL 16 sorts once), and
    the device's listing version (NULL: 0)."""
    created = Event.__table__.c.created  # type: ignore[attr-defined]
    pages = page.add_columns(
        sa.literal_column(listing_json.postgres_created).label(listing_json.CREATED_RFC3339)
    ).subquery("page")
    order = "created DESC, id DESC" if newest_first else "created, id"
    return sa.select(
        sa.literal_column(listing_json.postgres_array(order)),
        sa.literal_column("count(*)"),
        sa.literal_column(listing_json.postgres_regular),
        sa.literal_column(f"(array_agg(created ORDER BY {order}))[count(*)]", type_=created.type),
        sa.literal_column(f"(array_agg(id ORDER BY {order}))[count(*)]"),
        _VERSION_COLUMN,
    ).select_from(pages)


def _sqlite_position(last: str | None) -> tuple[datetime.datetime, str] | None:
    """(created, id) from _sqlite_json_statement's "created id" (created has a fixed width)."""
    if not last:
        return None
    width = listing_json.SQLITE_STORED_LENGTH
    return datetime.datetime.fromisoformat(last[:width]).replace(tzinfo=datetime.UTC), last[width + 1:]


def _next_page_token(
    query: paging.ListQuery, last: tuple[datetime.datetime, str] | None, count: int
) -> str:
    """The token after a page of `count` events whose last is at `last` (created, id)."""
    return paging.next_page_token(query, last, full=count == query.limit)


class Listing:
    """Pages of events on one database."""

    def __init__(self, db: Database, *, cache_bytes: int = 0) -> None:
        """`cache_bytes`: how much of the pages read lately to keep (PageCache); 0 keeps none."""
        self.db = db
        self.kept = PageCache(db, cache_bytes)
        self._versions_current = False  # until looked at, by the first answer (versions_current)
        self._look_at = 0.0  # when to look again (time.monotonic; 0: never looked)
        self._looking = threading.Lock()  # answers come at once: one looks, and one warns
        # Requests answered 304, since the start: If-None-Match named the page's tag (metrics).
        self.not_modified = 0
        self._count_lock = threading.Lock()

    def versions_current(self) -> bool:
        """Whether the database's listing versions are drawn by this release's triggers, looked at
        by the first listing (after the start's schema step) and again every GENERATION_LOOK_SECONDS.
        Pages are kept, tagged and answered 304 by a version only then: triggers a start kept (it
        could not replace them in time: models.REPLACE_LOCK_TIMEOUT_MS) or a newer release's may not
        name a column this release lists, and a change of it would leave a page kept, or a client's
        copy, current for as long as they stay. Until the next look finds this release's (another
        replica's start replaced them), this process reads every page and answers it without an
        ETag: one given now could pass for current later, at a version such a change left as it
        was. Each change of the answer drops the pages kept: those kept before triggers that may
        have missed a change are not to be served after them."""
        if time.monotonic() < self._look_at:
            return self._versions_current
        with self._looking:
            if time.monotonic() >= self._look_at:  # else another answer has just looked
                rows = self.db.read_rows(_GENERATION, {})
                current = bool(rows) and rows[0][0] == models.generation_of(ListingVersion)
                if not current and (self._versions_current or not self._look_at):
                    log.warning("listing versions are drawn by another release's triggers: pages are neither"
                                " kept nor tagged until they are this release's (looked at every %g s)",
                                GENERATION_LOOK_SECONDS)
                elif current and not self._versions_current and self._look_at:
                    log.info("listing versions are drawn by this release's triggers again: pages are kept and tagged")
                if current != self._versions_current:
                    self.kept.clear()
                self._versions_current = current
                self._look_at = time.monotonic() + GENERATION_LOOK_SECONDS
        return self._versions_current

    def page(self, device: str, **request: Any) -> tuple[list[ListedEvent], str]:
        """One page of a device's events, and the token of the next page ("" after the last).

        The events are read-only rows with the attributes of LISTED_COLUMNS (what a listing shows).
        `request`: media_type, since, until, order, limit, offset, page_token (paging.build)."""
        events, next_page_token, _ = self.answer("rows", device, **request)
        return events, next_page_token  # type: ignore[return-value]

    def page_json(self, device: str, **request: Any) -> tuple[bytes, str]:
        """The same page as page(), as the REST listing's JSON (listing_json), and its token."""
        page, next_page_token, _ = self.answer("json", device, **request)
        return page, next_page_token  # type: ignore[return-value]

    def answer(
        self, printed: Printed, device: str, *, if_none_match: str = "", if_match: str | None = None, **request: Any
    ) -> ListingAnswer[Any]:
        """A listing request's answer (ListingAnswer): the page as page() ("rows") or page_json()
        ("json") answer it, unless `if_none_match` (an If-None-Match header) names its entity-tag
        at the device's version now: the client holds that page.

        `if_match` (an If-Match header; None: none) is evaluated first (RFC 9110 13.2.2) and holds
        for `*` alone: it compares strongly, and a listing's tags are weak (etag), so no list of
        tags can hold; PRECONDITION_FAILED (412) otherwise."""
        query, statement, parameters = self._prepare(device, **request)
        if if_match is not None and entity_tags(if_match) != [(False, None)]:
            raise FailedPrecondition(
                PRECONDITION_FAILED_REASON,
                "If-Match holds only as `*` for a listing: its ETags are weak, and If-Match compares strongly"
                " (RFC 9110 13.1.1); If-None-Match takes them",
                field="if_match",
            )
        version = None
        trusted = self.versions_current()
        if if_none_match and trusted:
            version = self.kept.version(device)
            if none_match(if_none_match, _opaque_tag(printed, query, version)):
                with self._count_lock:
                    self.not_modified += 1
                return ListingAnswer(None, "", etag(printed, query, version))
        read = self._read_page_json if printed == "json" else self._read_page_rows
        (body, next_page_token), version = self.kept.get(
            printed, query, functools.partial(read, query, statement, parameters), version=version, keep=trusted
        )
        if printed == "rows":
            body = list(body)  # the kept list stays as read, whatever the caller does
        return ListingAnswer(body, next_page_token, etag(printed, query, version) if trusted else "")

    def _read_page_rows(
        self, query: paging.ListQuery, statement: sa.Select[Any], parameters: dict[str, Any], version: int | None
    ) -> tuple[tuple[list[ListedEvent], str], int]:
        """page()'s answer, and the device's listing version it was read at (PageCache): `version`
        if the caller has just read it, else read now; before the page either way, so a write
        committed in between leaves the page newer than its version, never older."""
        if version is None:
            version = self.kept.version(query.device)
        return self._read_page(query, statement, parameters), version

    def _read_page_json(
        self, query: paging.ListQuery, statement: sa.Select[Any], parameters: dict[str, Any], version: int | None
    ) -> tuple[tuple[bytes, str], int]:
        """page_json()'s answer, and the device's listing version it was read at (PageCache): from
        the page's own statement where the database prints it, else as _read_page_rows reads it."""
        if self.db.engine.dialect.name == "postgresql":
            [(text, count, regular, last_created, last_id, version)] = self.db.read_rows(
                _postgres_json_statement(statement, query.newest_first), parameters
            )
            if regular:  # else a time only PostgreSQL holds: the Python printer refuses it below
                last = (last_created, last_id) if count else None
                return (listing_json.finish(text or "[]"), _next_page_token(query, last, count)), int(version or 0)
        elif self._sqlite_prints_json:
            [(text, count, regular, last, version)] = self.db.read_rows(
                _sqlite_json_statement(statement, query.newest_first), parameters
            )
            if regular or not count:  # else a row SQLite did not write itself: printed below
                page = listing_json.finish(text), _next_page_token(query, _sqlite_position(last), count)
                return page, int(version or 0)
        (events, next_page_token), version = self._read_page_rows(query, statement, parameters, version)
        return (listing_json.listing(events), next_page_token), version

    def _read_page(
        self, query: paging.ListQuery, statement: sa.Select[Any], parameters: dict[str, Any]
    ) -> tuple[list[ListedEvent], str]:
        """The rows of a page (_prepare's query, select and parameters) and the next page's token."""
        events = [ListedEvent._make(row) for row in self.db.read_rows(statement, parameters)]
        last = (events[-1].created, events[-1].id) if events else None
        return events, _next_page_token(query, last, len(events))

    @functools.cached_property
    def _sqlite_prints_json(self) -> bool:
        """SQLite with its JSON functions (built in since 3.38; a build may leave them out)."""
        if self.db.engine.dialect.name != "sqlite":
            return False
        try:
            with self.db.read() as connection:
                connection.exec_driver_sql("SELECT json_group_array(json_object('a', 1))").one()
        except sa.exc.OperationalError:
            return False
        return True

    def _prepare(
        self, device: str, **request: Any
    ) -> tuple[paging.ListQuery, sa.Select[Any], dict[str, Any]]:
        """Validate a listing request (paging.build's arguments): its query, select and parameters."""
        query = paging.build(device=device, **request)
        statement = _listing_statement(
            by_type=bool(query.media_type), since=query.since is not None,
            until=query.until is not None, after=query.after is not None,
            newest_first=query.newest_first,
        )
        parameters = {
            "device": device, "media_type": query.media_type, "since": query.since,
            "until": query.until, "offset": query.offset, "limit": query.limit,
            "after_created": query.after[0] if query.after else None,
            "after_id": query.after[1] if query.after else None,
        }
        return query, statement, parameters
