"""Pre-signed upload URLs: stateless HMAC tokens plus a grant row that makes each usable once.

A token is `<payload>.<signature>`, both base64url: the payload is the JSON list
[version, device, event_id, purpose, expires_unix, filename, [budget, granted]] and the signature
an HMAC-SHA256 of the payload under a key derived from the JWT secret (so one secret serves both,
for different purposes). A PUT is authorized by its token alone; no bearer token is needed. The
last item names the bearer token that asked for the URL (a digest, uploads.Uploader, masked per
event), whose part of the uploads in flight the PUT takes; version 1, without it, is still taken
until it expires.

Resumable media PUTs (`Content-Range: bytes a-b/total`, GCS-style): each PUT appends one chunk to
a resumable session (resumable.py, upload id `url.<event_id>`, which no native id can be) at its
committed size; the chunk that completes the file stores the event under the URL's event id, in
the transaction that marks the grant `done`, so a URL still completes exactly one event.

No PUT takes the URL while it streams: a whole (single-shot) PUT and a chunk alike move the grant
`open` -> `done` in the transaction that stores the event, whose row lock orders PUTs completing
at once: the first stores, the others are refused (URL_ALREADY_USED, or for a chunk its URL's
event). A PUT that fails, however it fails (a server killed mid-PUT, a database that went away
at its end), leaves the URL as it was, to be retried until it expires.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import datetime
import hashlib
import hmac
import json
import logging
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator

import sqlalchemy as sa
from sqlmodel import Session, col

from . import validation
from .auth import WRITE, Principal
from .clock import aware, utcnow
from .downloads import ContentRange, parse_content_range
from .errors import (
    Conflict,
    Exhausted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from .models import GRANT_UNUSED, Event, UploadGrant, UploadSessionRow
from .resumable import ResumableUploads, SessionWriter
from .service import Gallery, event_not_found
from .storage import upload_too_large
from .uploads import Upload, Uploader

log = logging.getLogger(__name__)

MEDIA = "media"
THUMBNAIL = "thumbnail"
_VERSION = 2
# The session of a pre-signed URL: "." keeps it apart from native upload ids ([A-Za-z0-9_-]).
SESSION_PREFIX = "url."
# The reason of a form sent as a PUT's body: 415 through Envoy (rpc/status.py).
MULTIPART_PUT = "MULTIPART_PUT"


@dataclasses.dataclass(frozen=True)
class SignedUploadState:
    """Where the upload behind a pre-signed URL stands."""

    event_id: str
    committed_size: int
    size: int  # the total the Content-Range PUTs declared; 0 before the first
    complete: bool
    expires_at: datetime.datetime


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
    # Whose part of the uploads in flight its PUTs take; None: a URL of version 1.
    uploader: Uploader | None = dataclasses.field(default=None, compare=False)


class SignedUploads:
    def __init__(self, gallery: Gallery, uploads: ResumableUploads | None = None) -> None:
        self.gallery = gallery
        # The sessions of Content-Range PUTs: the servicer's own, shared (it uses this one).
        self.uploads = uploads or ResumableUploads(gallery)
        self._key = hmac.new(
            gallery.settings.key_secret, b"gallery signed upload URLs v1", hashlib.sha256
        ).digest()

    def create_urls(
        self, principal: Principal, device: str, filename: str, *, thumbnail: bool, issue: bool = True
    ) -> UploadUrls:
        """A media URL (and a thumbnail URL) for one new event. `issue` False: checked and signed
        alike, but not recorded, so that they are refused if used (the answer to a HEAD)."""
        principal.require(validation.device_id(device), WRITE)
        filename = validation.display_name(filename, "filename")
        event_id = validation.new_event_id()
        expires = int(time.time()) + self.gallery.settings.upload_url_ttl
        expires_at = datetime.datetime.fromtimestamp(expires, datetime.UTC)
        self._require_room_for_a_url(device)
        if issue:
            with self.gallery.db.session() as session:
                session.add(UploadGrant(
                    event_id=event_id, device=device, filename=filename, expires_at=expires_at,
                    thumbnail_state="open" if thumbnail else "none",
                ))
                session.commit()

        uploader = Uploader.of(principal)

        def url(purpose: str) -> str:
            token = self._sign([_VERSION, device, event_id, purpose, expires, filename,
                                [self._masked(uploader.key, event_id), uploader.granted]])
            base = self.gallery.settings.public_url
            return f"{base}/api/gallery/{urllib.parse.quote(device, safe=':')}/upload/{token}"

        return UploadUrls(
            event_id=event_id,
            media_url=url(MEDIA),
            thumbnail_url=url(THUMBNAIL) if thumbnail else None,
            expires_at=expires_at,
        )

    def _require_room_for_a_url(self, device: str) -> None:
        """Each URL is a row kept until a day past its expiry if it is never used: a device's
        clients may hold GALLERY_MAX_UPLOAD_URLS_PER_DEVICE unused ones at once (counted apart
        from the INSERT, so a burst may pass the limit by a few)."""
        limit = self.gallery.settings.max_upload_urls_per_device
        unused = sa.select(UploadGrant.event_id).where(
            UploadGrant.device == device, col(UploadGrant.media_state).in_(GRANT_UNUSED),
            UploadGrant.expires_at > utcnow(),
        )
        if self.gallery.db.count_at_most(unused, limit) >= limit:
            raise Exhausted(
                "TOO_MANY_UPLOAD_URLS",
                f"device {device} has {limit} upload URLs not used yet: use or let some expire first",
                device=device, limit=str(limit),
            )

    def verify(self, device: str, token: str, *, allow_expired: bool = False) -> SignedTarget:
        """Check signature, expiry and device binding; every failure is the same 403 family.
        `allow_expired`: for reading the upload's state, which stays readable after expiry."""
        payload_b64, _, signature_b64 = token.partition(".")
        try:
            signature = _b64decode(signature_b64)
            expected = hmac.new(self._key, payload_b64.encode("ascii"), hashlib.sha256).digest()
            if not hmac.compare_digest(signature, expected):
                raise ValueError("bad signature")
            version, signed_device, event_id, purpose, expires, filename, *budget = json.loads(
                _b64decode(payload_b64)
            )
            # Only this server signs payloads; their types are checked all the same (a key shared
            # with a tool that signs its own must not turn into a 500).
            if (purpose not in (MEDIA, THUMBNAIL) or type(expires) is not int
                    or not isinstance(event_id, str) or not isinstance(filename, str)):
                raise ValueError("not a payload of this server's")
            uploader = _uploader(version, budget, (device, event_id))
            if uploader is not None:
                uploader = dataclasses.replace(uploader, key=self._masked(uploader.key, event_id))
        except (ValueError, TypeError, UnicodeError, binascii.Error):
            raise PermissionDenied("URL_SIGNATURE_INVALID", "upload URL is not valid") from None
        if signed_device != device:
            raise PermissionDenied(
                "URL_DEVICE_MISMATCH", "upload URL was issued for another device"
            )
        if time.time() > expires and not allow_expired:
            raise PermissionDenied("URL_EXPIRED", "upload URL has expired")
        return SignedTarget(device, event_id, purpose, filename, uploader)

    def _masked(self, key: str, event_id: str) -> str:
        """A token's budget key (hex) XOR a pad of the URL's event, which unmasks it again: the
        URLs one token asked for do not show that they are one token's to whoever holds them."""
        pad = hmac.new(self._key, b"upload budget\0" + event_id.encode(), hashlib.sha256).digest()
        return bytes(a ^ b for a, b in zip(bytes.fromhex(key), pad, strict=False)).hex()

    # -- the PUT ------------------------------------------------------------------------------

    def require_unused(self, target: SignedTarget) -> None:
        """Refuse a whole PUT of a URL that is used already before it sends a byte (completion
        checks again, in its transaction: another PUT may complete the URL meanwhile)."""
        grant = self.grant(target)
        if (grant.media_state if target.purpose == MEDIA else grant.thumbnail_state) not in GRANT_UNUSED:
            raise _already_used(target)

    def complete(self, target: SignedTarget, upload: Upload) -> str:
        """Store a fully received PUT; returns the event id it belongs to."""
        if target.purpose == MEDIA:
            upload.fields.name = target.filename

            def mark_used(session: Session, event: Event) -> None:
                # Locks the grant row first, so a concurrent thumbnail PUT is ordered against us.
                if not self._use(target, session):
                    raise _already_used(target)
                self._take_thumbnail_sent_first(target, session, event)

            self.gallery.store(upload, event_id=target.event_id, before_insert=mark_used)
            self._drop_chunks(target)
            return target.event_id
        return self._attach_thumbnail(target, upload)

    # -- resumable PUTs and their status ---------------------------------------------------------

    def status(self, device: str, token: str) -> SignedUploadState:
        """The upload's state, read only: an unauthenticated GET or HEAD changes nothing."""
        return self.state_of(self.verify(device, token, allow_expired=True))

    def state_of(self, target: SignedTarget) -> SignedUploadState:
        grant = self.grant(target)
        done_state = grant.media_state if target.purpose == MEDIA else grant.thumbnail_state
        expires_at = aware(grant.expires_at)
        # Once the media stored the event, the pair's status follows it: NOT_FOUND once it is
        # deleted, for the thumbnail URL too. A thumbnail PUT before its media finds no event yet.
        stored = self._stored(target) if grant.media_state == "done" else None
        if done_state == "done":
            size = int(stored.size) if stored is not None and target.purpose == MEDIA else 0
            return SignedUploadState(target.event_id, size, size, True, expires_at)
        committed = size = 0
        if target.purpose == MEDIA:
            # None: no session yet, or expired (its bytes are going).
            state = self.uploads.peek(target.device, _session_id(target))
            if state is not None:
                committed, size = state.committed_size, state.declared_size or 0
        return SignedUploadState(target.event_id, committed, size, False, expires_at)

    def check_put(
        self, target: SignedTarget, content_range: str, content_length: int | None
    ) -> ContentRange | None:
        """Refuse a PUT by what its headers alone tell, before its body is waited for (each PUT
        waiting holds a place of its token's uploads): a used URL (a whole PUT's; a range PUT of
        one answers its event), a missing or too large Content-Length, a malformed Content-Range,
        a thumbnail URL's range PUT. Returns the parsed Content-Range, None for a whole PUT."""
        if content_range:
            parsed = parse_content_range(content_range)
            self._check_range(target, parsed, content_length)
            return parsed
        if content_length is None:
            raise InvalidArgument(
                "LENGTH_REQUIRED", "a PUT upload needs a Content-Length header",
                field="content_length",
            )
        self.require_unused(target)
        settings = self.gallery.settings
        thumbnail = target.purpose == THUMBNAIL
        limit = settings.max_thumbnail_bytes if thumbnail else settings.max_upload_bytes
        if content_length > limit:
            raise upload_too_large("thumbnail" if thumbnail else "event", limit, field="size")
        return None

    @staticmethod
    def check_body_type(content_type: str) -> None:
        """Refuse a form as a PUT's body: a PUT stores its body as the file, so `curl -F` or a
        browser's FormData stored the form, boundaries and all, as the media (contract probe,
        2026-12-01). Before any byte is written: the URL stays unused for the retry."""
        if content_type.split(";", 1)[0].strip().lower() == "multipart/form-data":
            raise InvalidArgument(
                MULTIPART_PUT,
                "a PUT's body is the file itself, not a form: send the bytes (curl --upload-file FILE), "
                "or POST the form to /api/gallery/{device}/upload",
                field="content_type",
            )

    def _check_range(self, target: SignedTarget, content_range: ContentRange, content_length: int | None) -> None:
        if target.purpose != MEDIA:
            raise InvalidArgument(
                "RESUMABLE_MEDIA_ONLY",
                "Content-Range PUTs are for media URLs; PUT a thumbnail whole",
                field="content_range",
            )
        expected = content_range.length
        if content_length is not None and content_length != expected:
            raise InvalidArgument(
                "INVALID_CONTENT_RANGE",
                f"Content-Length {content_length} does not match the Content-Range ({expected} bytes)",
                field="content_range", content_length=str(content_length), expected=str(expected),
            )
        if content_length is None and expected:
            raise InvalidArgument(
                "LENGTH_REQUIRED", "a PUT upload needs a Content-Length header",
                field="content_length",
            )
        limit = self.gallery.settings.max_upload_bytes
        if content_range.total > limit:
            raise upload_too_large("event", limit, field="content_range")

    def open_range(
        self, target: SignedTarget, content_range: ContentRange, content_length: int | None
    ) -> RangePut:
        """The writer of one Content-Range PUT (the caller feeds it the body, then finish()es and
        close()s it). When the URL's event is stored already, `done` says so and nothing is
        written."""
        self._check_range(target, content_range, content_length)
        grant = self.grant(target)
        if grant.media_state == "done":
            self._drop_chunks(target)
            return self._stored_before(target, content_range)
        uploads = self.uploads
        session_id = _session_id(target)
        if (content_range.first is None and content_range.total
                and uploads.peek(target.device, session_id) is None):
            # `bytes */total` asks where to resume: with no session there is nothing to open
            # (`bytes */0` is the whole of an empty file: it completes the upload).
            return RangePut(self, target, content_range, None)
        try:
            uploads.open_session(
                target.device, session_id, name=target.filename, size=content_range.total,
                not_after=aware(grant.expires_at),
            )
        except FailedPrecondition as exc:
            if exc.reason != "UPLOAD_ID_IN_USE":
                raise
            raise InvalidArgument(
                "INVALID_CONTENT_RANGE",
                f"the total size {content_range.total} differs from the one this upload started with"
                f" ({exc.metadata.get('declared_size', '')})",
                field="content_range", total=str(content_range.total),
            ) from None
        try:
            with range_conflicts():
                # A silent PUT of the URL holding the session (its connection dropped) is
                # replaced as the lock is waited for (UploadSlots.replace_silent).
                writer = uploads.writer(
                    target.device, session_id, content_range.first,
                    while_busy=self._replace_silent(target),
                )
        except NotFound:
            # A whole PUT completed the URL since the grant was read, and dropped this session
            # (_drop_chunks): the answer is its event.
            if self.grant(target).media_state != "done":
                raise
            return self._stored_before(target, content_range)
        return RangePut(self, target, content_range, writer)

    def _replace_silent(self, target: SignedTarget) -> Callable[[], object] | None:
        url = target.uploader.url if target.uploader is not None else None
        if url is None:  # a URL of version 1: its PUTs are counted by no one
            return None
        slots = self.gallery.slots
        return lambda: slots.replace_silent(url)

    def _stored_before(self, target: SignedTarget, content_range: ContentRange) -> RangePut:
        """A chunk PUT to a URL whose event was stored: a retry of the last one, whose answer got
        lost, is answered that event."""
        self._stored(target)
        return RangePut(self, target, content_range, None, done=True)

    def _stored(self, target: SignedTarget) -> Event:
        """The event a used URL stored; NOT_FOUND once it was deleted, as a native session's is
        (its status and its chunk PUTs would otherwise tell a client its upload is stored)."""
        with self.gallery.db.session() as session:
            event = session.get(Event, target.event_id)
        if event is None:
            raise NotFound(
                "UPLOAD_EVENT_DELETED",
                f"this URL's upload was stored as event {target.event_id}, which has been deleted since;"
                " ask a new upload URL to upload it again",
                device=target.device, event_id=target.event_id,
            )
        return event

    def finish_media(self, target: SignedTarget, session: Session, event: Event) -> None:
        """In the event's transaction: mark the URL of a range upload used (a whole PUT that
        completed it first wins: UPLOAD_BUSY, which RangePut.finish answers with its event)."""
        if not self._use(target, session):
            raise _completed_by_another(target)
        self._take_thumbnail_sent_first(target, session, event)

    def _take_thumbnail_sent_first(self, target: SignedTarget, session: Session, event: Event) -> None:
        """The media's event, before its insert under the grant's lock, takes the thumbnail its
        URL stored before the media came (in place already), and its size for the quota."""
        grant = session.get(UploadGrant, target.event_id)
        if grant is not None and grant.thumbnail_state == "done":
            event.has_thumbnail = True
            grant.thumbnail_bytes = None  # the event counts it now (quota.py: the grants' index)
            session.add(grant)
            thumbnail = self.gallery.storage.thumbnail_path(target.device, target.event_id)
            try:
                event.thumbnail_size = thumbnail.stat().st_size
            except FileNotFoundError:  # removed by hand: the event's reads answer that
                event.thumbnail_size = None

    def _drop_chunks(self, target: SignedTarget) -> None:
        """The URL is used: the session of chunks sent to it, if any, can never be stored. Removed
        now unless a chunk PUT holds it (whose finish removes it: RangePut.finish); best effort,
        since the sweeper removes it when the URL expires."""
        try:
            with self.gallery.db.session() as session:
                row = session.get(UploadSessionRow, (target.device, _session_id(target)))
            if row is not None and not row.event_id:
                self.uploads.remove(row)
        except Exception:  # noqa: BLE001 - the PUT's answer stands; the sweeper is the second line
            log.warning("the chunks of a used URL stay until it expires", exc_info=True,
                        extra={"device": target.device, "event_id": target.event_id})

    def grant(self, target: SignedTarget) -> UploadGrant:
        with self.gallery.db.session() as session:
            grant = session.get(UploadGrant, target.event_id)
        if grant is None or grant.device != target.device:
            raise PermissionDenied("URL_SIGNATURE_INVALID", "upload URL is not valid")
        return grant

    def _attach_thumbnail(self, target: SignedTarget, upload: Upload) -> str:
        """Put a PUT thumbnail in place. Its file moves only once the UPDATEs hold the grant's and
        the event's rows: a thumbnail the server is making (thumbnails.py) waits for them and then
        finds its claim gone, and a failure before the move (the database unreachable, the event
        deleted) leaves the event's thumbnail as it was."""
        thumbnail = upload.media  # the thumbnail arrives as the raw body
        if not thumbnail.size:  # no image: the URL stays unused, for a PUT with the thumbnail
            raise InvalidArgument(
                "THUMBNAIL_MISSING", "the thumbnail PUT has an empty body", field="body",
            )
        thumbnail.sync()
        with self.gallery.db.session() as session:
            if not self._use(target, session):
                raise _already_used(target)
            attached = session.exec(  # type: ignore[call-overload]
                sa.update(Event)
                .where(col(Event.id) == target.event_id)
                # The device's thumbnail replaces one the server made or is making.
                .values(has_thumbnail=True, thumbnail_state="", thumbnail_size=thumbnail.size)
            ).rowcount
            grant = session.get(UploadGrant, target.event_id)
            if not attached and grant is not None and grant.media_state == "done":
                # The media arrived and its event was deleted since: nothing to attach to.
                raise event_not_found(target.device, target.event_id)
            if not attached and grant is not None:
                # Before its media: on the disk, and counted by the grant until the media's event
                # counts it (URLs whose media never came held thumbnails no quota saw).
                grant.thumbnail_bytes = thumbnail.size
                session.add(grant)
            # Before any file moves: a refusal leaves the event's thumbnail as it was.
            self.gallery.quota.check_stored(session, target.device, thumbnail.size, lock=not attached)
            # From here on the file stays, whatever the COMMIT does: what it replaced is gone
            # either way, and it is this event's thumbnail as its device sent it (a retry of
            # the URL, which stays unused if the COMMIT failed, replaces it again).
            thumbnail.move(self.gallery.storage.thumbnail_path(target.device, target.event_id))
            self.gallery.db.commit(session)
        return target.event_id

    def _use(self, target: SignedTarget, session: Session) -> bool:
        """Mark the URL used in `session` (the grant's row lock is held until it ends); False if
        it is used already, or is a thumbnail URL that was never issued."""
        column = UploadGrant.media_state if target.purpose == MEDIA else UploadGrant.thumbnail_state
        return bool(session.exec(  # type: ignore[call-overload]
            sa.update(UploadGrant)
            .where(col(UploadGrant.event_id) == target.event_id, col(column).in_(GRANT_UNUSED))
            .values({column.key: "done"})  # type: ignore[attr-defined]
        ).rowcount)

    def _sign(self, payload: list[object]) -> str:
        body = _b64encode(json.dumps(payload, separators=(",", ":")).encode())
        signature = hmac.new(self._key, body.encode("ascii"), hashlib.sha256).digest()
        return f"{body}.{_b64encode(signature)}"


def _uploader(version: object, budget: list[object], url: tuple[str, str]) -> Uploader | None:
    """Whose PUTs the URL's are, from the payload's last item, by its version; ValueError if it is
    not what that version has. Version 1 (URLs issued before 2026-12-01, until they expire) names
    no token."""
    if version == 1 and not budget:
        return None
    if version == _VERSION and len(budget) == 1 and isinstance(budget[0], list) and len(budget[0]) == 2:
        key, granted = budget[0]
        if isinstance(key, str) and (granted is None or (type(granted) is int and granted > 0)):
            return Uploader(key, granted, url=url)
    raise ValueError("not a payload of a known version")


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    """Strict: only the canonical spelling decodes. The last character of unpadded base64 has
    spare bits, so without this one URL would have several spellings that all verify."""
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64encode(data) != text:
        raise ValueError("not canonical base64url")
    return data


class RangePut:
    """One Content-Range PUT of a media URL: appends its body to the URL's session. Without a
    writer it writes nothing: the URL was stored before (`done`), or the PUT is a `bytes */total`
    query of a URL with no session yet."""

    def __init__(self, signed: SignedUploads, target: SignedTarget, content_range: ContentRange,
                 writer: SessionWriter | None, *, done: bool = False) -> None:
        self._signed = signed
        self._target = target
        self._range = content_range
        self._writer = writer
        self._done = done
        self.received = 0

    @property
    def done(self) -> str:
        """The URL's event id when it was stored before this PUT ("" otherwise)."""
        if self._done:
            return self._target.event_id
        if self._writer is None or self._writer.done is None:
            return ""
        return self._writer.done.event_id

    def write_all(self, pieces: Iterable[bytes | memoryview]) -> None:
        for data in pieces:
            if self._writer is None:
                if data:  # cannot happen: the Content-Length of a query is 0
                    raise InvalidArgument(
                        "INVALID_CONTENT_RANGE", "`bytes */total` carries no body",
                        field="content_range",
                    )
                continue
            self._writer.write(data)
            self.received += len(data)
            del data  # not held while the next piece is awaited

    def finish(self) -> SignedUploadState:
        """Commit this PUT's bytes; store the event if they complete the file.

        A whole PUT of the URL may complete it meanwhile: its event is then the answer, and this
        session, whose bytes can never be stored under the URL, is removed."""
        writer = self._writer
        target = self._target
        signed = self._signed
        if writer is None:
            return signed.state_of(target)
        writer.commit()
        total = self._range.total
        if writer.offset == total:

            def mark_used(session: Session, event: Event) -> None:
                signed.finish_media(target, session, event)

            try:
                with range_conflicts():
                    writer.finish(event_id=target.event_id, before_insert=mark_used)
            except Conflict as exc:
                if exc.reason != "UPLOAD_BUSY":
                    raise
                state = signed.state_of(target)
                if not state.complete:
                    raise
                writer.discard()
                return state
        state = writer.state()
        return SignedUploadState(
            target.event_id, state.committed_size, total, bool(state.event_id),
            aware(signed.grant(target).expires_at),
        )

    def close(self) -> None:
        """Every piece received was whole: commit them even when the PUT was cut short."""
        if self._writer is not None:
            self._writer.commit_quietly()
            self._writer.close()


@contextlib.contextmanager
def range_conflicts() -> Iterator[None]:
    """The one place where a session's WRONG_OFFSET and UPLOAD_BUSY (FAILED_PRECONDITION, as
    ByteStream answers native writes) become Conflict: REST range uploads answer a PUT that does
    not fit the upload's current state with 409, and the client re-reads the state."""
    try:
        yield
    except FailedPrecondition as exc:
        if exc.reason not in ("WRONG_OFFSET", "UPLOAD_BUSY"):
            raise
        raise Conflict(exc.reason, exc.message, field=exc.field, **exc.metadata) from None


def _already_used(target: SignedTarget) -> PermissionDenied:
    return PermissionDenied(
        "URL_ALREADY_USED", "upload URL has already been used", event_id=target.event_id,
    )


def _completed_by_another(target: SignedTarget) -> Conflict:
    return Conflict(
        "UPLOAD_BUSY", "another PUT of this URL has completed it", event_id=target.event_id,
    )


def _session_id(target: SignedTarget) -> str:
    return SESSION_PREFIX + target.event_id
