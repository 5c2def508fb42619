"""How a listing is asked for: filters, order, and opaque page tokens for keyset pagination.

`offset` pages (the documented contract) skip rows, so they cost more the deeper they go and
shift when events arrive. A page token instead names the last event returned, and the next page
starts strictly after it in the listing order: pages stay stable across inserts and deletes and
cost the same at any depth. The token also records the device, filters and order it belongs to,
so it cannot be replayed against another listing. It is a position, not a secret (unsigned): a
client can forge one, and learns nothing by it that the listing would not show it.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import json
import re

from . import validation
from .clock import aware
from .errors import InvalidArgument

ORDERS = ("newest", "oldest")
MAX_TOKEN_CHARS = 1024
# A time's UTC offset whose `+` a query read as a space: `T10:00:00 01:00` (or ` 01`, ` 0100`, ` 01:00:00`).
_PLUS_READ_AS_SPACE = re.compile(r"(?<=\d) (\d\d(?::?\d\d){0,2}(?:\.\d+)?)$")
# The fraction of a second in an RFC 3339 time.
_FRACTION = re.compile(r"[.,](\d+)")
_VERSION = 2  # 2: the device is part of the fingerprint (a version-1 token is INVALID_PAGE_TOKEN)


@dataclasses.dataclass(frozen=True)
class ListQuery:
    device: str = ""
    media_type: str = ""
    since: datetime.datetime | None = None  # inclusive
    until: datetime.datetime | None = None  # exclusive
    order: str = "newest"
    limit: int = validation.DEFAULT_LIMIT
    offset: int = 0
    after: tuple[datetime.datetime, str] | None = None  # (created, id) of the previous page's last

    @property
    def newest_first(self) -> bool:
        return self.order == "newest"


def build(
    *,
    device: str = "",
    media_type: str = "",
    since: str = "",
    until: str = "",
    order: str = "",
    limit: int | None = None,
    offset: int | None = None,
    page_token: str = "",
) -> ListQuery:
    """Validate a listing request into a ListQuery (every bad value is a 400)."""
    if media_type:
        validation.media_type(media_type)
    order = order or "newest"
    if order not in ORDERS:
        raise InvalidArgument("INVALID_ORDER", "order must be newest or oldest", field="order")
    limit, offset = validation.page(limit, offset)
    query = ListQuery(
        device=device,
        media_type=media_type,
        since=_instant(since, "since"),
        until=_instant(until, "until"),
        order=order,
        limit=limit,
        offset=offset,
    )
    if query.since and query.until and query.since >= query.until:
        raise InvalidArgument("INVALID_TIME_WINDOW", "since must be before until", field="since")
    if not page_token:
        return query
    if offset:
        raise InvalidArgument(
            "PAGE_TOKEN_WITH_OFFSET", "use either offset or page_token, not both", field="offset"
        )
    return dataclasses.replace(query, after=_decode(page_token, query))


def next_page_token(query: ListQuery, page_last: tuple[datetime.datetime, str] | None, full: bool) -> str:
    """The token for the page after this one; empty when this page was the last."""
    if not full or page_last is None:
        return ""
    created, event_id = page_last
    payload = [_VERSION, *_fingerprint(query), _iso(created), event_id]
    return base64.urlsafe_b64encode(json.dumps(payload, separators=(",", ":")).encode()).decode().rstrip("=")


def _fingerprint(query: ListQuery) -> list[str]:
    return [query.device, query.order, query.media_type, _iso(query.since), _iso(query.until)]


def _decode(token: str, query: ListQuery) -> tuple[datetime.datetime, str]:
    if len(token) > MAX_TOKEN_CHARS:
        raise InvalidArgument(
            "INVALID_PAGE_TOKEN", "page_token is not valid (altered, or made by an older version):"
            " start the listing again", field="page_token",
        )
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        version, *fingerprint, created, event_id = json.loads(raw)
        moment = datetime.datetime.fromisoformat(created)
        valid = version == _VERSION and moment.tzinfo is not None
        # In UTC, as the database compares it: year 1 or 9999 shifted by a zone is out of range.
        after = (moment.astimezone(datetime.UTC) if valid else moment, validation.event_id(event_id))
    except (ValueError, TypeError, OverflowError, binascii.Error, RecursionError, InvalidArgument):
        valid = False
    if not valid:
        raise InvalidArgument(
            "INVALID_PAGE_TOKEN", "page_token is not valid (altered, or made by an older version):"
            " start the listing again", field="page_token",
        )
    if fingerprint != _fingerprint(query):
        raise InvalidArgument(
            "PAGE_TOKEN_MISMATCH",
            "page_token belongs to a listing of another device, or with other filters or order",
            field="page_token",
        )
    return after


def _instant(value: str, field: str) -> datetime.datetime | None:
    if not value:
        return None
    # A query's `+` is a space (Envoy reads queries as forms do), so `since=...T10:00:00+01:00`
    # typed as is arrives as `T10:00:00 01:00`: a space can stand nowhere else in that place.
    value = _PLUS_READ_AS_SPACE.sub(r"+\1", value)
    try:
        moment = datetime.datetime.fromisoformat(value.replace("z", "Z"))
        moment = moment.astimezone(datetime.UTC) if moment.tzinfo else None
        if moment and (fraction := _FRACTION.search(value)) and fraction.group(1)[6:].strip("0"):
            # Between two microseconds (Python drops the digits past 6): events are stored to
            # the microsecond, so the bound is the next one, for `since` (inclusive) as for
            # `until` (exclusive), not the one before, which took in an event before `since`.
            moment += datetime.timedelta(microseconds=1)
    except (ValueError, OverflowError):  # OverflowError: year 1 or 9999 shifted out of range
        moment = None
    if moment is None:
        raise InvalidArgument(
            "INVALID_TIME", f"{field} must be an RFC 3339 time with a zone, e.g. 2024-03-20T10:00:00Z",
            field=field,
        )
    return moment


def _iso(moment: datetime.datetime | None) -> str:
    if moment is None:
        return ""
    return aware(moment).astimezone(datetime.UTC).isoformat()
