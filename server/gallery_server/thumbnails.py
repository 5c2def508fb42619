"""Thumbnails the server makes, in the background, for images and videos that arrive without one.

What a thumbnail is: a JPEG (quality 85) at most THUMBNAIL_MAX_SIDE (320) pixels on its long side,
never larger than the original, upright (EXIF orientation applied), transparency flattened on
white, the first frame of an animation. Images are decoded with Pillow, only in the formats of
IMAGE_FORMATS and up to MAX_PIXELS (64 megapixels, checked from the header before anything is
decoded), and, in a format Pillow cannot decode at a fraction of its size (all but JPEG), up to
MAX_DECODED_BYTES decoded (a 270 KB PNG of 64 megapixels took 860 MB of the server's memory);
videos with ffmpeg (a frame at 1 s, or the first frame of a shorter clip) when `ffmpeg` is on
PATH. The same pass reads what is cheap to know (EXIF capture time and dimensions; with
`ffprobe`, a video's duration and dimensions) into `Event.media_info_json`.

The queue is the events table: `Event.thumbnail_state` goes pending -> working -> generated, or
failed (the file could not be read, is not in an allowed format, or is too large), or skipped (a
video without ffmpeg: installing ffmpeg later does not revisit those). Work is taken newest first, one event at a
time, so a new upload overtakes an old backlog. Several replicas share the queue without locks:
an event is claimed by a conditional UPDATE (pending, or working under a claim older than
LEASE_SECONDS, i.e. a worker that died) that only one of them can win, and each claim counts an
attempt; an event claimed MAX_ATTEMPTS times without finishing (a file that kills its worker)
is marked failed. An exception on one file (its decoding, a thumbnail over
GALLERY_MAX_THUMBNAIL_BYTES) marks that file failed and the queue moves on; a disk down to its
headroom puts the claim back, uncounted, and ends the pass.

The thumbnail is written and synced in staging; then the row is updated under the same claim and,
only if that matched, the file is renamed into place before the commit, while the UPDATE holds the
event's row. If it matches no row, the event was deleted meanwhile or the device's own thumbnail
arrived (it wins: its writers move their file under the same row lock), and the made one is
dropped.
Nothing here runs in the upload path: an upload never waits for, or fails because of, this.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import json
import logging
import shutil
import subprocess
import warnings
from typing import Any

import sqlalchemy as sa
from PIL import Image, ImageOps
from sqlmodel import col, select

from .background import BackgroundLoop
from .clock import utcnow
from .db import Database
from .errors import Exhausted
from .models import Event
from .service import Gallery
from .storage import StagedFile

log = logging.getLogger(__name__)

THUMBNAIL_MAX_SIDE = 320
THUMBNAIL_QUALITY = 85
MAX_PIXELS = 64_000_000
# What one image may take decoded, in the formats decoded whole (JPEG is decoded at an eighth):
# the thumbnailer's peak above what the server holds (one image at a time per replica). 25
# megapixels in colour (Pillow keeps RGB in 4 bytes a pixel), a 24-megapixel camera's export.
MAX_DECODED_BYTES = 96 * 2**20
_DRAFT_FORMATS = ("JPEG", "MPO")  # MPO: a phone's JPEG with extra pictures
IMAGE_FORMATS = frozenset({"JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"})
FFMPEG_TIMEOUT_SECONDS = 30
# ffmpeg and ffprobe read a stored video only as a file of a container a camera writes (the
# demuxers' names: mov is MP4/MOV/3GP, matroska is MKV/WebM). Left to guess, ffmpeg takes a text
# file for a playlist (concat, HLS) and opens the files or URLs it names, so a device's upload could
# have the server read another file into its thumbnail, or fetch a URL; ffmpeg 9 refuses absolute
# paths in a concat list but still reads a relative one (another event's file, measured).
_SAFE_INPUT = ("-protocol_whitelist", "file", "-format_whitelist",
               "mov,matroska,avi,mpegts,flv,asf,ogg,mpeg,h264,hevc,m4v,dv,mxf,rm,yuv4mpegpipe")
LEASE_SECONDS = 300
MAX_ATTEMPTS = 3
POLL_SECONDS = 0.5

_EXIF_IFD = 0x8769
_DATETIME_ORIGINAL = 36867
_OFFSET_TIME_ORIGINAL = 36881
_DATETIME = 306


def backlog(db: Database) -> int:
    """Stored events waiting for a thumbnail (pending, or claimed by a worker that has not finished):
    the queue's length, a range of its index (only stored events are ever queued: an announced
    one's state is empty until its upload stores it)."""
    with db.read() as connection:
        return int(connection.execute(
            sa.select(sa.func.count()).select_from(Event)
            .where(col(Event.thumbnail_state).in_(("pending", "working")))
        ).scalar_one())


class Unsupported(Exception):
    """Nothing to be done for this file here (a format not allowed, no ffmpeg): skipped, not failed."""


@dataclasses.dataclass
class Made:
    jpeg: bytes
    info: dict[str, Any]


class Thumbnailer(BackgroundLoop):
    """Makes missing thumbnails. work_once() is one pass; start() loops it on a daemon thread.

    Stopping lets the file in hand finish; a claim left behind is retried after LEASE_SECONDS."""

    thread_name = "thumbnailer"

    def __init__(self, gallery: Gallery, *, poll_seconds: float = POLL_SECONDS) -> None:
        super().__init__(poll_seconds)
        self.gallery = gallery
        self.storage = gallery.storage

    def run_pass(self) -> bool:
        return bool(self.work_once(limit=20))

    # -- the queue ----------------------------------------------------------------------------

    def work_once(self, limit: int = 20) -> list[str]:
        """Claim and process up to `limit` events, newest first; returns the ids processed."""
        processed: list[str] = []
        while len(processed) < limit and not self._stopping.is_set():
            claimed = self._claim_next()
            if claimed is None:
                break
            event, attempt = claimed
            self._process(event, attempt)
            processed.append(event.id)
        return processed

    def _claimable(self, now: datetime.datetime) -> sa.ColumnElement[bool]:
        stale = now - datetime.timedelta(seconds=LEASE_SECONDS)
        return sa.or_(
            col(Event.thumbnail_state) == "pending",
            sa.and_(col(Event.thumbnail_state) == "working", col(Event.thumbnail_claimed_at) < stale),
        )

    def _claim_next(self) -> tuple[Event, int] | None:
        """The newest claimable event, claimed; None when there is none. A lost race re-reads."""
        while True:
            now = utcnow()
            query = (
                select(Event)
                .where(self._claimable(now), col(Event.state) == "stored")
                .order_by(col(Event.created).desc(), col(Event.id).desc())
                .limit(1)
            )
            with self.gallery.db.session() as session:
                event = session.exec(query).first()
            if event is None:
                return None
            attempt = event.thumbnail_attempts + 1
            given_up = attempt > MAX_ATTEMPTS
            # A transaction of its own that writes first (SQLite cannot upgrade a read snapshot),
            # and whose WHERE re-checks what the read saw: of concurrent claims only one matches.
            with self.gallery.db.session() as session:
                won = session.exec(  # type: ignore[call-overload]
                    sa.update(Event)
                    .where(col(Event.id) == event.id, col(Event.thumbnail_attempts) == event.thumbnail_attempts,
                           self._claimable(now))
                    .values(
                        thumbnail_state="failed" if given_up else "working",
                        thumbnail_attempts=attempt,
                        thumbnail_claimed_at=now,
                    )
                ).rowcount
                session.commit()
            if won and given_up:
                log.warning("thumbnail given up after repeated interrupted attempts",
                            extra={"device": event.device, "event_id": event.id, "attempts": attempt - 1})
                continue
            if won:
                return event, attempt
            # Another replica took it (or it changed): look again.

    def _process(self, event: Event, attempt: int) -> None:
        path = self.storage.media_path(event.device, event.id)
        try:
            made = make(event.media_type, path)
        except Unsupported as exc:
            log.info("no thumbnail made", extra={"device": event.device, "event_id": event.id, "reason": str(exc)})
            self._finish(event, attempt, "skipped", {})
            return
        except Exception as exc:
            log.warning("thumbnail failed", extra={"device": event.device, "event_id": event.id,
                                                   "error": f"{type(exc).__name__}: {exc}"})
            self._finish(event, attempt, "failed", {})
            return
        limit = self.gallery.settings.max_thumbnail_bytes
        if len(made.jpeg) > limit:  # a limit set below what a 320-pixel JPEG takes: this file's lot
            too_large = f"{len(made.jpeg)} bytes, over GALLERY_MAX_THUMBNAIL_BYTES"
            log.warning("thumbnail failed", extra={"device": event.device, "event_id": event.id, "error": too_large})
            self._finish(event, attempt, "failed", made.info)
            return
        try:
            staged = self.storage.stage(max_bytes=limit, what="thumbnail")
            try:
                staged.write(made.jpeg)
                staged.sync()
                if self._finish(event, attempt, "generated", made.info, thumbnail=staged):
                    log.info("thumbnail made",
                             extra={"device": event.device, "event_id": event.id, "size": len(made.jpeg)})
            finally:
                staged.discard()  # removes the file unless it was moved into place
        except Exhausted:
            # The disk down to its headroom: no fault of this file's. Its claim goes back, its
            # attempt uncounted, and the pass ends (the loop waits before the next).
            self._unclaim(event, attempt)
            raise

    def _unclaim(self, event: Event, attempt: int) -> None:
        with self.gallery.db.session() as session:
            session.exec(  # type: ignore[call-overload]
                sa.update(Event)
                .where(col(Event.id) == event.id, col(Event.thumbnail_state) == "working",
                       col(Event.thumbnail_attempts) == attempt)
                .values(thumbnail_state="pending", thumbnail_attempts=attempt - 1, thumbnail_claimed_at=None)
            )
            self.gallery.db.commit(session)

    def _finish(self, event: Event, attempt: int, state: str, info: dict[str, Any], *,
                thumbnail: StagedFile | None = None) -> bool:
        """Record the outcome under our claim; False if the claim no longer holds (the event was
        deleted, or its device sent a thumbnail meanwhile). A made thumbnail is moved into place
        only under the claim, while the UPDATE holds the row's lock: a device's thumbnail, which
        signed_urls.py moves under that lock too, is never overwritten."""
        values: dict[str, Any] = {"thumbnail_state": state, "thumbnail_claimed_at": None}
        if info:
            values["media_info_json"] = json.dumps(info, separators=(",", ":"), sort_keys=True)
        if thumbnail is not None:
            values["has_thumbnail"] = True
        with self.gallery.db.session() as session:
            updated = session.exec(  # type: ignore[call-overload]
                sa.update(Event)
                .where(col(Event.id) == event.id, col(Event.thumbnail_state) == "working",
                       col(Event.thumbnail_attempts) == attempt)
                .values(**values)
            ).rowcount
            if updated and thumbnail is not None:
                # If the COMMIT then fails, the file stays: no other thumbnail was there (the
                # event's is being made), and a retry of the claim replaces it.
                thumbnail.move(self.storage.thumbnail_path(event.device, event.id))
            self.gallery.db.commit(session)
        return bool(updated)


# -- making one ---------------------------------------------------------------------------------


def make(media_type: str, path: Any) -> Made:
    if media_type == "image":
        return make_image(path)
    if media_type == "video":
        return make_video(path)
    raise Unsupported(f"no thumbnails for {media_type}")


def make_image(path: Any) -> Made:
    """A thumbnail and the cheap facts of an image file; raises on anything unreadable."""
    with warnings.catch_warnings():
        # Pillow's own bomb check (at its larger default limit) is an error here, not a warning.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path, formats=sorted(IMAGE_FORMATS)) as im:
            width, height = im.size
            if width * height > MAX_PIXELS:
                raise ValueError(f"{width}x{height} is more than {MAX_PIXELS} pixels")
            # Before getexif(), which decodes a PNG whole (its EXIF may follow the pixels).
            if im.format not in _DRAFT_FORMATS and (decoded := _decoded_bytes(im)) > MAX_DECODED_BYTES:
                raise ValueError(f"{width}x{height} {im.mode} takes {decoded >> 20} MiB decoded, "
                                 f"more than {MAX_DECODED_BYTES >> 20} MiB")
            info: dict[str, Any] = {}
            exif = im.getexif()
            captured = _captured_at(exif)
            if captured:
                info["captured_at"] = captured
            if exif.get(0x0112) in (5, 6, 7, 8):  # rotated by 90 degrees: shown the other way
                width, height = height, width
            info["width"], info["height"] = width, height
            if im.format in _DRAFT_FORMATS:
                im.draft("RGB", (THUMBNAIL_MAX_SIDE * 2, THUMBNAIL_MAX_SIDE * 2))  # decode at a fraction
            im.load()
            return Made(_to_jpeg(im), info)


def _decoded_bytes(im: Image.Image) -> int:
    """What Pillow allocates to decode the image whole: 1, 2 or 4 bytes a pixel by mode."""
    per_pixel = 1 if im.mode in ("1", "L", "P") else 2 if im.mode.startswith("I;16") else 4
    return im.width * im.height * per_pixel


def _to_jpeg(im: Image.Image) -> bytes:
    # Made small first, in place: turned upright afterwards, the full-size image is never copied.
    im.thumbnail((THUMBNAIL_MAX_SIDE, THUMBNAIL_MAX_SIDE), Image.Resampling.LANCZOS)
    im = ImageOps.exif_transpose(im)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        im = flat
    elif im.mode != "RGB":
        im = im.convert("RGB")
    out = io.BytesIO()
    im.save(out, "JPEG", quality=THUMBNAIL_QUALITY, optimize=True)
    return out.getvalue()


def _captured_at(exif: Image.Exif) -> str:
    """EXIF DateTimeOriginal (else DateTime) as `YYYY-MM-DDTHH:MM:SS`, plus the UTC offset when the
    file records one (OffsetTimeOriginal); EXIF itself has no zone, so without it this is the
    camera's local time. "" when absent or malformed."""
    sub = exif.get_ifd(_EXIF_IFD)
    raw = sub.get(_DATETIME_ORIGINAL) or exif.get(_DATETIME)
    if not isinstance(raw, str):
        return ""
    try:
        moment = datetime.datetime.strptime(raw.strip("\0 "), "%Y:%m:%d %H:%M:%S")
    except ValueError:
        return ""
    text = moment.isoformat()
    offset = sub.get(_OFFSET_TIME_ORIGINAL)
    if isinstance(offset, str):
        offset = offset.strip("\0 ")
        try:
            datetime.datetime.fromisoformat(text + offset)
        except ValueError:
            return text
        text += "Z" if offset in ("+00:00", "Z") else offset
    return text


def make_video(path: Any) -> Made:
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise Unsupported("ffmpeg is not installed")
    info = _probe(path)
    frame = b""
    for seek in (["-ss", "1"], []):  # a frame at 1 s; a clip shorter than that: its first frame
        frame = _run([ffmpeg, "-nostdin", "-v", "error", *_SAFE_INPUT, *seek, "-i", str(path), "-frames:v", "1",
                      "-vf", f"scale={THUMBNAIL_MAX_SIDE * 2}:{THUMBNAIL_MAX_SIDE * 2}"
                             ":force_original_aspect_ratio=decrease",
                      "-f", "image2pipe", "-c:v", "png", "-"])
        if frame:
            break
    if not frame:
        raise ValueError("ffmpeg found no video frame")
    with Image.open(io.BytesIO(frame), formats=["PNG"]) as im:
        im.load()
        return Made(_to_jpeg(im), info)


def _probe(path: Any) -> dict[str, Any]:
    ffprobe = shutil.which("ffprobe")
    if ffprobe is None:
        return {}
    try:
        out = _run([ffprobe, "-v", "error", *_SAFE_INPUT, "-print_format", "json", "-show_format", "-show_streams",
                    str(path)])
        probed = json.loads(out or b"{}")
    except (ValueError, subprocess.SubprocessError):
        return {}
    info: dict[str, Any] = {}
    try:
        info["duration"] = round(float(probed.get("format", {}).get("duration")), 3)
    except (TypeError, ValueError):
        pass
    for stream in probed.get("streams", []):
        if stream.get("codec_type") == "video" and stream.get("width") and stream.get("height"):
            info["width"], info["height"] = int(stream["width"]), int(stream["height"])
            break
    return info


def _run(argv: list[str]) -> bytes:
    """stdout of a tool, b"" if it failed; a tool that hangs is killed after the timeout."""
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                            timeout=FFMPEG_TIMEOUT_SECONDS, check=False)
    if result.returncode != 0:
        log.debug("tool failed", extra={"tool": argv[0], "stderr": result.stderr[-500:].decode(errors="replace")})
        return b""
    return result.stdout
