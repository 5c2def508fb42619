"""Every table of the gallery, in one place."""

from __future__ import annotations

import datetime

import sqlalchemy as sa
from sqlmodel import Field, SQLModel


class Event(SQLModel, table=True):
    """One stored media file of a device. A row exists only once its file is complete on disk."""

    __tablename__ = "events"
    __table_args__ = (
        # Serves the listing (newest first, id as tie-break) and the per-device stats.
        sa.Index("ix_events_device_created", "device", "created", "id"),
        sa.Index("ix_events_device_type_created", "device", "media_type", "created", "id"),
    )

    id: str = Field(primary_key=True, max_length=64)
    device: str = Field(max_length=128)
    name: str = Field(max_length=1024)
    media_type: str = Field(max_length=16)
    mime_type: str = Field(max_length=128)
    size: int = Field(sa_type=sa.BigInteger)
    sha256: str = Field(max_length=64)
    has_thumbnail: bool = False
    # The uploader's metadata object, kept as the JSON text it was validated as.
    metadata_json: str = Field(default="{}", sa_type=sa.Text)
    # UTC; rendered as RFC 3339 UTC.
    created: datetime.datetime


class UploadGrant(SQLModel, table=True):
    """The single-use state of one pair of pre-signed URLs (media, optional thumbnail).

    The URLs themselves are stateless HMAC tokens; this row is what makes each usable once and
    lets the media and thumbnail PUTs meet at one event id whichever arrives first.
    States: `open` -> `uploading` -> `done`; a failed PUT returns `uploading` to `open` so the
    client can retry; `none` marks a thumbnail URL that was never issued.
    """

    __tablename__ = "upload_grants"

    event_id: str = Field(primary_key=True, max_length=64)
    device: str = Field(max_length=128)
    filename: str = Field(max_length=1024)
    expires_at: datetime.datetime
    media_state: str = Field(default="open", max_length=16)
    thumbnail_state: str = Field(default="none", max_length=16)
