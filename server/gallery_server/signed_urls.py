"""Pre-signed upload URLs: stateless HMAC tokens plus a grant row that makes each usable once.

A token is `<payload>.<signature>`, both base64url: the payload is the JSON list
[version, device, event_id, purpose, expires_unix, filename] and the signature an HMAC-SHA256 of
the payload under a key derived from the JWT secret (so one secret serves both, for different
purposes). A PUT is authorized by its token alone; no bearer token is needed.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import hashlib
import hmac
import json
import time
import urllib.parse

import sqlalchemy as sa
from sqlmodel import Session, col

from . import validation
from .auth import WRITE, Principal
from .errors import NotFound, PermissionDenied
from .models import Event, UploadGrant
from .service import Gallery
from .uploads import Upload

MEDIA = "media"
THUMBNAIL = "thumbnail"
_VERSION = 1


@dataclasses.dataclass(frozen=True)
class UploadUrls:
    event_id: str
    media_url: str
    thumbnail_url: str | None
    expires_at: datetime.datetime


@dataclasses.dataclass(frozen=True)
class SignedTarget:
    """What a verified token allows: one PUT of `purpose` for `event_id` of `device`."""

    device: str
    event_id: str
    purpose: str
    filename: str


class SignedUploads:
    def __init__(self, gallery: Gallery) -> None:
        self.gallery = gallery
        self._key = hmac.new(
            gallery.settings.jwt_secret.encode(), b"gallery signed upload URLs v1", hashlib.sha256
        ).digest()

    def create_urls(
        self, principal: Principal, device: str, filename: str, *, thumbnail: bool
    ) -> UploadUrls:
        principal.require(validation.device_id(device), WRITE)
        filename = validation.display_name(filename, "filename")
        event_id = validation.new_event_id()
        expires = int(time.time()) + self.gallery.settings.upload_url_ttl
        expires_at = datetime.datetime.fromtimestamp(expires, datetime.UTC)
        with self.gallery.db.session() as session:
            session.add(UploadGrant(
                event_id=event_id, device=device, filename=filename, expires_at=expires_at,
                thumbnail_state="open" if thumbnail else "none",
            ))
            session.commit()

        def url(purpose: str) -> str:
            token = self._sign([_VERSION, device, event_id, purpose, expires, filename])
            base = self.gallery.settings.public_url
            return f"{base}/api/gallery/{urllib.parse.quote(device)}/upload/{token}"

        return UploadUrls(
            event_id=event_id,
            media_url=url(MEDIA),
            thumbnail_url=url(THUMBNAIL) if thumbnail else None,
            expires_at=expires_at,
        )

    def verify(self, device: str, token: str) -> SignedTarget:
        """Check signature, expiry and device binding; every failure is the same 403 family."""
        payload_b64, _, signature_b64 = token.partition(".")
        try:
            signature = _b64decode(signature_b64)
            expected = hmac.new(self._key, payload_b64.encode("ascii"), hashlib.sha256).digest()
            if not hmac.compare_digest(signature, expected):
                raise ValueError("bad signature")
            version, signed_device, event_id, purpose, expires, filename = json.loads(
                _b64decode(payload_b64)
            )
        except (ValueError, TypeError, UnicodeError, binascii.Error):
            raise PermissionDenied("URL_SIGNATURE_INVALID", "upload URL is not valid") from None
        if version != _VERSION or purpose not in (MEDIA, THUMBNAIL):
            raise PermissionDenied("URL_SIGNATURE_INVALID", "upload URL is not valid")
        if signed_device != device:
            raise PermissionDenied(
                "URL_DEVICE_MISMATCH", "upload URL was issued for another device"
            )
        if time.time() > expires:
            raise PermissionDenied("URL_EXPIRED", "upload URL has expired")
        return SignedTarget(device, event_id, purpose, filename)

    # -- the PUT ------------------------------------------------------------------------------

    def claim(self, target: SignedTarget) -> None:
        """Take the URL for this PUT; a used or busy URL is refused."""
        if not self._move(target, "open", "uploading"):
            raise PermissionDenied(
                "URL_ALREADY_USED", "upload URL has already been used",
                event_id=target.event_id,
            )

    def release(self, target: SignedTarget) -> None:
        """A PUT that failed gives its URL back, so the client can retry until it expires."""
        self._move(target, "uploading", "open")

    def complete(self, target: SignedTarget, upload: Upload) -> str:
        """Store a fully received PUT; returns the event id it belongs to."""
        if target.purpose == MEDIA:
            upload.fields.name = target.filename

            def mark_used(session: Session, event: Event) -> None:
                # Locks the grant row first, so a concurrent thumbnail PUT is ordered against us.
                self._move(target, "uploading", "done", session=session)
                grant = session.get(UploadGrant, target.event_id)
                if grant is not None and grant.thumbnail_state == "done":
                    event.has_thumbnail = True

            self.gallery.store(upload, event_id=target.event_id, before_insert=mark_used)
            return target.event_id
        return self._attach_thumbnail(target, upload)

    def _attach_thumbnail(self, target: SignedTarget, upload: Upload) -> str:
        storage = self.gallery.storage
        path = storage.thumbnail_path(target.device, target.event_id)
        # The thumbnail arrives as the raw body, so it is the "media" of this upload.
        upload.media.commit(path)
        try:
            with self.gallery.db.session() as session:
                self._move(target, "uploading", "done", session=session)
                attached = session.exec(  # type: ignore[call-overload]
                    sa.update(Event)
                    .where(col(Event.id) == target.event_id)
                    # The device's thumbnail replaces one the server made or is making.
                    .values(has_thumbnail=True, thumbnail_state="")
                ).rowcount
                grant = session.get(UploadGrant, target.event_id)
                if not attached and grant is not None and grant.media_state == "done":
                    # The media arrived and its event was deleted since: nothing to attach to.
                    raise NotFound(
                        "EVENT_NOT_FOUND", f"event {target.event_id} no longer exists",
                        event_id=target.event_id,
                    )
                session.commit()
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return target.event_id

    def _move(
        self, target: SignedTarget, old: str, new: str, *, session: Session | None = None
    ) -> bool:
        column = UploadGrant.media_state if target.purpose == MEDIA else UploadGrant.thumbnail_state
        statement = (
            sa.update(UploadGrant)
            .where(col(UploadGrant.event_id) == target.event_id, col(column) == old)
            .values({column.key: new})  # type: ignore[attr-defined]
        )
        if session is not None:
            return bool(session.exec(statement).rowcount)  # type: ignore[call-overload]
        with self.gallery.db.session() as own:
            moved = bool(own.exec(statement).rowcount)  # type: ignore[call-overload]
            own.commit()
        return moved

    def _sign(self, payload: list[object]) -> str:
        body = _b64encode(json.dumps(payload, separators=(",", ":")).encode())
        signature = hmac.new(self._key, body.encode("ascii"), hashlib.sha256).digest()
        return f"{body}.{_b64encode(signature)}"


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
