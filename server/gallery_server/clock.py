"""Time as the domain modules read and write it: now in UTC, stored moments made UTC-aware, and
the reconciler's RFC 3339 text. Modules import the names (`from .clock import utcnow`), so a test
sets one module's clock by monkeypatching that module's `utcnow`."""

from __future__ import annotations

import datetime


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def aware(moment: datetime.datetime) -> datetime.datetime:
    """A stored moment as UTC: SQLite gives back naive datetimes, PostgreSQL aware ones."""
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.UTC)


def rfc3339(moment: datetime.datetime) -> str:
    """An aware moment as RFC 3339 in UTC, a fraction always in six digits (the reconciler's
    status). Not listing_json.timestamp, which prints whole milliseconds in three, as protobuf
    prints a Timestamp, and takes a naive moment as UTC."""
    return moment.astimezone(datetime.UTC).isoformat().replace("+00:00", "Z")
