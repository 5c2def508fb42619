"""Server-made thumbnails (thumbnails.py) on both databases, with real image and video files."""

from __future__ import annotations

import dataclasses
import datetime
import io
import json
import os
import pathlib
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib

import pytest
import sqlalchemy as sa
from PIL import Image

from gallery_server import auth, thumbnails
from gallery_server.errors import Exhausted
from gallery_server.incoming import IncomingImporter
from gallery_server.models import Event
from gallery_server.rpc.servicer import event_message
from gallery_server.service import Gallery
from gallery_server.thumbnails import Thumbnailer

from .test_service import store

ffprobe_missing = pytest.mark.skipif(shutil.which("ffprobe") is None, reason="ffprobe is not installed")


@pytest.fixture
def ffmpeg(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> str:
    """An ffmpeg on PATH, as the server finds it: the machine's, or else the real ffmpeg binary the
    imageio-ffmpeg package ships (a test dependency), so that the video path runs everywhere."""
    found = shutil.which("ffmpeg")
    if found is not None:
        return found
    import imageio_ffmpeg

    bin_dir = tmp_path_factory.mktemp("bin")
    (bin_dir / "ffmpeg").symlink_to(imageio_ffmpeg.get_ffmpeg_exe())
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return str(bin_dir / "ffmpeg")


def video_clip(ffmpeg: str, path: pathlib.Path, seconds: float = 2) -> pathlib.Path:
    """A real MP4 of `seconds` at 640x360, written without an extension as stored media is."""
    subprocess.run([ffmpeg, "-nostdin", "-v", "error", "-f", "lavfi",
                    "-i", f"testsrc=duration={seconds}:size=640x360:rate=10",
                    "-c:v", "mpeg4", "-pix_fmt", "yuv420p", "-f", "mp4", str(path)], check=True, timeout=30)
    return path


def jpeg_with_exif(size: tuple[int, int] = (800, 600), orientation: int = 6) -> bytes:
    im = Image.new("RGB", size, (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif.get_ifd(0x8769)[36867] = "2024:05:01 12:34:56"
    exif.get_ifd(0x8769)[36881] = "+02:00"
    out = io.BytesIO()
    im.save(out, "JPEG", exif=exif, quality=90)
    return out.getvalue()


def png(size: tuple[int, int] = (640, 400), mode: str = "RGBA") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, (10, 200, 10, 128) if mode == "RGBA" else (10, 200, 10)).save(out, "PNG")
    return out.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A small valid PNG whose header claims width x height (a decompression bomb's shape)."""
    data = bytearray(png((8, 8), "RGB"))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def row(gallery: Gallery, event_id: str) -> Event | None:
    with gallery.db.session() as session:
        return session.get(Event, event_id)


def thumb_of(gallery: Gallery, event: Event) -> Image.Image:
    data = gallery.storage.thumbnail_path(event.device, event.id).read_bytes()
    im = Image.open(io.BytesIO(data))
    assert im.format == "JPEG"
    assert max(im.size) <= thumbnails.THUMBNAIL_MAX_SIDE
    return im


def backdate(gallery: Gallery, event_id: str, minutes: int) -> None:
    with gallery.db.session() as session:
        session.exec(sa.update(Event).where(Event.id == event_id).values(  # type: ignore[call-overload, arg-type]
            created=datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=minutes)))
        session.commit()


def test_jpeg_gets_thumbnail_and_media_info(gallery: Gallery, principal: auth.Principal) -> None:
    device_meta = json.dumps({"camera": "front", "width": 1})
    event = store(gallery, principal, data=jpeg_with_exif(), name="a.jpg", metadata_json=device_meta)
    assert (event.has_thumbnail, event.thumbnail_state) == (False, "pending")

    assert Thumbnailer(gallery).work_once() == [event.id]

    done = row(gallery, event.id)
    assert done is not None
    assert (done.has_thumbnail, done.thumbnail_state) == (True, "generated")
    assert thumb_of(gallery, done).size == (240, 320)  # orientation 6: the 800x600 photo stands up
    assert json.loads(done.metadata_json) == json.loads(device_meta)  # the device's own is untouched
    metadata = dict(event_message(done, with_metadata=True).metadata)
    assert metadata["camera"] == "front" and metadata["width"] == 1
    assert dict(metadata["media"]) == {"width": 600, "height": 800, "captured_at": "2024-05-01T12:34:56+02:00"}


def test_png_gets_thumbnail(gallery: Gallery, principal: auth.Principal) -> None:
    event = store(gallery, principal, data=png(), name="a.png")
    Thumbnailer(gallery).work_once()
    done = row(gallery, event.id)
    assert done is not None and done.has_thumbnail
    assert thumb_of(gallery, done).size == (320, 200)
    assert json.loads(done.media_info_json) == {"width": 640, "height": 400}


def test_device_media_key_wins(gallery: Gallery, principal: auth.Principal) -> None:
    event = store(gallery, principal, data=png(), metadata_json='{"media": {"width": 7}}')
    Thumbnailer(gallery).work_once()
    done = row(gallery, event.id)
    assert done is not None and done.media_info_json
    assert dict(event_message(done, with_metadata=True).metadata["media"]) == {"width": 7}


BAD_FILES = {
    "bomb": png_claiming(100_000, 100_000),  # beyond Pillow's own limit
    "bomb-warning": png_claiming(10_000, 10_000),  # over Pillow's warning threshold
    "over-limit": png_claiming(9_000, 8_000),  # over ours (64 MP) only
    "truncated": jpeg_with_exif()[:2000],
    "garbage": b"GIF89a" + b"\x00" * 40,  # not a decodable image
    "not-allowed": b"P6\n4 4\n255\n" + b"\x00" * 48,  # a valid PPM: not an allowed format
}


def test_bad_files_fail_alone(gallery: Gallery, principal: auth.Principal) -> None:
    good = store(gallery, principal, data=png(), name="good.png")
    backdate(gallery, good.id, 1)  # every bad one is newer: processed first
    bad = {name: store(gallery, principal, data=data, name=f"{name}.png", media_type="image")
           for name, data in BAD_FILES.items()}

    processed = Thumbnailer(gallery).work_once()
    assert processed[-1] == good.id and sorted(processed[:-1]) == sorted(e.id for e in bad.values())

    for name, event in bad.items():
        failed = row(gallery, event.id)
        assert failed is not None, name
        assert (failed.has_thumbnail, failed.thumbnail_state, failed.size) == (False, "failed", len(BAD_FILES[name]))
        assert gallery.storage.media_path("cam1", event.id).read_bytes() == BAD_FILES[name]
        assert not gallery.storage.thumbnail_path("cam1", event.id).exists()
    ok = row(gallery, good.id)
    assert ok is not None and ok.has_thumbnail


def test_a_thumbnail_over_its_limit_fails_its_event_alone(gallery: Gallery, principal: auth.Principal) -> None:
    """GALLERY_MAX_THUMBNAIL_BYTES may be set below what a 320-pixel JPEG takes: that event fails,
    the queue moves on (the staged write's TooLarge ended the pass, and the event was claimed three
    times before it failed as "interrupted")."""
    small = Gallery(dataclasses.replace(gallery.settings, max_thumbnail_bytes=100), gallery.db, gallery.storage)
    first = store(small, principal, data=png(), name="first.png")
    backdate(small, first.id, 1)
    second = store(small, principal, data=png(), name="second.png")
    assert Thumbnailer(small).work_once() == [second.id, first.id]
    for event in (first, second):
        failed = row(small, event.id)
        assert failed is not None and (failed.has_thumbnail, failed.thumbnail_state, failed.thumbnail_attempts) == (
            False, "failed", 1)
        assert json.loads(failed.media_info_json) == {"width": 640, "height": 400}  # what was learnt stays
    assert list(small.storage.staging_root.iterdir()) == []


def test_a_disk_at_its_headroom_puts_the_claim_back(
    gallery: Gallery, principal: auth.Principal, monkeypatch: pytest.MonkeyPatch,
) -> None:
    event = store(gallery, principal, data=png(), name="p.png")

    def no_room(**kw):  # type: ignore[no-untyped-def]
        raise Exhausted("INSUFFICIENT_STORAGE", "the disk is down to its headroom")

    monkeypatch.setattr(gallery.storage, "stage", no_room)
    with pytest.raises(Exhausted):  # the pass ends: the background loop waits before the next
        Thumbnailer(gallery).work_once()
    waiting = row(gallery, event.id)
    assert waiting is not None and (waiting.thumbnail_state, waiting.thumbnail_attempts) == ("pending", 0)
    monkeypatch.undo()
    assert Thumbnailer(gallery).work_once() == [event.id]
    assert row(gallery, event.id).thumbnail_state == "generated"  # type: ignore[union-attr]


def test_an_image_decoded_whole_is_refused_past_its_memory_before_decoding(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A PNG of 30 megapixels (120 MiB decoded, a few hundred KB on disk) gets no thumbnail: its
    header alone says so, and nothing is decoded."""
    path = tmp_path / "wide.png"
    path.write_bytes(png_claiming(6_000, 5_000))
    with pytest.raises(ValueError, match=r"6000x5000 RGB takes 114 MiB decoded, more than 96 MiB"):
        thumbnails.make_image(path)


# The process's peak resident memory in KiB: VmHWM, its own since exec (ru_maxrss would keep the
# forking pytest's).
PEAK_MEMORY = """
import re, sys
from gallery_server import thumbnails
def peak():
    with open("/proc/self/status") as status:
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", status.read())[1])
before = peak()
made = thumbnails.make_image(sys.argv[1])
print(made.info["width"], made.info["height"], peak() - before)
"""


def test_a_turned_image_is_made_small_before_it_is_turned(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The server's peak while it makes a thumbnail is the decoded image and little more: turned
    upright first, a 16-megapixel photo was copied whole once more (61 MiB). In a process of its
    own, whose peak resident memory is the measure."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: shown the other way
    path = tmp_path / "turned.png"
    Image.new("RGB", (4_000, 4_000), (10, 200, 10)).save(path, "PNG", exif=exif)
    decoded_kib = 4_000 * 4_000 * 4 // 1024
    result = subprocess.run([sys.executable, "-c", PEAK_MEMORY, str(path)], capture_output=True, text=True,
                            timeout=120, check=True)
    width, height, grew_kib = map(int, result.stdout.split())
    assert (width, height) == (4_000, 4_000)
    assert decoded_kib * 0.9 < grew_kib < decoded_kib * 1.4, (grew_kib, decoded_kib)


def test_newest_first(gallery: Gallery, principal: auth.Principal) -> None:
    events = [store(gallery, principal, data=png((40, 40)), name=f"{i}.png") for i in range(3)]
    for age, event in enumerate(reversed(events)):
        backdate(gallery, event.id, age * 10)
    worker = Thumbnailer(gallery)
    assert thumbnails.backlog(gallery.db) == 3  # the queue's length, for the admin status and metrics
    assert worker.work_once(limit=1) == [events[2].id]
    newer = store(gallery, principal, data=png((40, 40)), name="new.png")
    assert thumbnails.backlog(gallery.db) == 3
    assert worker.work_once() == [newer.id, events[1].id, events[0].id]
    assert worker.work_once() == []
    assert thumbnails.backlog(gallery.db) == 0


def test_replicas_process_each_event_once(gallery: Gallery, principal: auth.Principal) -> None:
    ids = {store(gallery, principal, data=png((60, 60)), name=f"{i}.png").id for i in range(8)}
    workers = [Thumbnailer(gallery) for _ in range(3)]
    results: list[list[str]] = [[] for _ in workers]
    barrier = threading.Barrier(len(workers))

    def run(i: int) -> None:
        barrier.wait()
        results[i] = workers[i].work_once()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(workers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = [event_id for r in results for event_id in r]
    assert sorted(done) == sorted(ids)  # each exactly once
    assert all(row(gallery, i).thumbnail_attempts == 1 for i in ids)  # type: ignore[union-attr]


def test_deleted_while_working_leaves_no_thumbnail(
    gallery: Gallery, principal: auth.Principal, monkeypatch: pytest.MonkeyPatch
) -> None:
    event = store(gallery, principal, data=png(), name="a.png")
    real = thumbnails.make

    def make_then_delete(media_type, path):  # type: ignore[no-untyped-def]
        made = real(media_type, path)
        gallery.delete_event(principal, "cam1", event.id)
        return made

    monkeypatch.setattr(thumbnails, "make", make_then_delete)
    assert Thumbnailer(gallery).work_once() == [event.id]
    assert row(gallery, event.id) is None
    assert not gallery.storage.thumbnail_path("cam1", event.id).exists()
    assert list(gallery.storage.staging_root.iterdir()) == []


def test_device_thumbnail_is_not_touched(gallery: Gallery, principal: auth.Principal) -> None:
    event = store(gallery, principal, data=png(), name="a.png", thumbnail=b"device thumb")
    store(gallery, principal, data=b"%PDF-1.7\n" + b"x" * 50, name="doc.pdf")
    assert event.thumbnail_state == ""
    assert Thumbnailer(gallery).work_once() == []
    assert gallery.storage.thumbnail_path("cam1", event.id).read_bytes() == b"device thumb"


def test_stale_claim_is_retried_then_given_up(gallery: Gallery, principal: auth.Principal) -> None:
    event = store(gallery, principal, data=png(), name="a.png")
    long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)

    def crash_claim(attempts: int) -> None:  # a worker that died holding the claim
        with gallery.db.session() as session:
            session.exec(sa.update(Event).where(Event.id == event.id).values(  # type: ignore[call-overload, arg-type]
                thumbnail_state="working", thumbnail_attempts=attempts, thumbnail_claimed_at=long_ago))
            session.commit()

    crash_claim(1)
    assert thumbnails.backlog(gallery.db) == 1  # claimed, not finished: still waiting
    assert Thumbnailer(gallery).work_once() == [event.id]
    assert thumbnails.backlog(gallery.db) == 0
    assert row(gallery, event.id).thumbnail_state == "generated"  # type: ignore[union-attr]
    crash_claim(thumbnails.MAX_ATTEMPTS)
    assert Thumbnailer(gallery).work_once() == []
    assert row(gallery, event.id).thumbnail_state == "failed"  # type: ignore[union-attr]
    assert thumbnails.backlog(gallery.db) == 0


def test_video_without_ffmpeg_is_skipped(
    gallery: Gallery, principal: auth.Principal, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(thumbnails.shutil, "which", lambda name: None)
    event = store(gallery, principal, data=b"\x00" * 100, name="clip.mp4", media_type="video")
    assert Thumbnailer(gallery).work_once() == [event.id]
    assert row(gallery, event.id).thumbnail_state == "skipped"  # type: ignore[union-attr]


def test_video_thumbnail(ffmpeg: str, tmp_path: pathlib.Path) -> None:
    """The video path on its own (the queue around it is the images' one; e2e runs it whole)."""
    made = thumbnails.make("video", video_clip(ffmpeg, tmp_path / "clip"))  # ffmpeg goes by the content
    im = Image.open(io.BytesIO(made.jpeg))
    assert (im.format, im.size) == ("JPEG", (320, 180))


@ffprobe_missing
def test_video_dimensions_and_duration(ffmpeg: str, tmp_path: pathlib.Path) -> None:
    made = thumbnails.make("video", video_clip(ffmpeg, tmp_path / "clip"))
    assert (made.info["width"], made.info["height"]) == (640, 360)
    assert made.info["duration"] == pytest.approx(2.0, abs=0.2)


def test_a_video_that_names_another_file_gets_no_thumbnail_of_it(ffmpeg: str, tmp_path: pathlib.Path) -> None:
    """A device's "video" that is ffmpeg's concat list naming a file beside it (another event of
    the device's folder): ffmpeg would render that file into the thumbnail (HLS playlists it
    refuses itself without an .m3u8 name, in ffmpeg 9.0); the server lets it read stored files
    only as the containers cameras write, so nothing is made."""
    video_clip(ffmpeg, tmp_path / "evt_other")
    assert thumbnails.make("video", tmp_path / "evt_other").jpeg  # the named file makes one itself
    upload = tmp_path / "evt_upload"
    upload.write_text("ffconcat version 1.0\nfile evt_other\n")
    with pytest.raises(ValueError, match="no video frame"):
        thumbnails.make("video", upload)


# -- the device's own thumbnail wins --------------------------------------------------------------


def test_signed_thumbnail_after_media_replaces_the_servers(signed, principal: auth.Principal) -> None:  # type: ignore[no-untyped-def]
    from .test_signed_urls import put, targets

    gallery = signed.gallery
    media, thumb = targets(signed, principal, filename="a.png")
    event_id = put(signed, media, png())
    assert row(gallery, event_id).thumbnail_state == "pending"  # type: ignore[union-attr]
    Thumbnailer(gallery).work_once()
    assert row(gallery, event_id).thumbnail_state == "generated"  # type: ignore[union-attr]
    put(signed, thumb, b"device thumb")
    done = row(gallery, event_id)
    assert done is not None and (done.has_thumbnail, done.thumbnail_state) == (True, "")
    assert gallery.storage.thumbnail_path("cam1", event_id).read_bytes() == b"device thumb"
    assert Thumbnailer(gallery).work_once() == []


def test_signed_thumbnail_before_media_is_kept(signed, principal: auth.Principal) -> None:  # type: ignore[no-untyped-def]
    from .test_signed_urls import put, targets

    media, thumb = targets(signed, principal, filename="a.png")
    put(signed, thumb, b"device thumb")
    event_id = put(signed, media, png())
    assert row(signed.gallery, event_id).thumbnail_state == ""  # type: ignore[union-attr]
    assert Thumbnailer(signed.gallery).work_once() == []


def test_a_device_thumbnail_arriving_while_the_server_makes_one_wins(  # type: ignore[no-untyped-def]
    signed, principal: auth.Principal, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The device's PUT lands while the server decodes the photo (or ffmpeg runs, up to 30 s):
    the server's thumbnail, made from then on, must not replace the device's on disk."""
    from .test_signed_urls import put, targets

    gallery = signed.gallery
    media, thumb = targets(signed, principal, filename="a.png")
    event_id = put(signed, media, png())
    real = thumbnails.make

    def make_while_the_device_sends(media_type, path):  # type: ignore[no-untyped-def]
        made = real(media_type, path)
        put(signed, thumb, b"device thumb")
        return made

    monkeypatch.setattr(thumbnails, "make", make_while_the_device_sends)
    assert Thumbnailer(gallery).work_once() == [event_id]
    done = row(gallery, event_id)
    assert done is not None and (done.has_thumbnail, done.thumbnail_state) == (True, "")
    assert gallery.storage.thumbnail_path("cam1", event_id).read_bytes() == b"device thumb"
    assert list(gallery.storage.staging_root.iterdir()) == []


def test_a_thumbnail_put_during_an_outage_leaves_the_events_thumbnail(  # type: ignore[no-untyped-def]
    closed_database, principal: auth.Principal, tmp_path,
) -> None:
    """PostgreSQL refuses connections as the device's thumbnail PUT completes: the answer is 503
    and the thumbnail the event has (the server's) stays, bytes and row."""
    from gallery_server.errors import DatabaseUnavailable
    from gallery_server.signed_urls import SignedUploads
    from gallery_server.storage import Storage

    from ..conftest import make_settings
    from .test_signed_urls import put, targets

    db, closed = closed_database
    gallery = Gallery(make_settings(tmp_path, db.engine.url.render_as_string(hide_password=False)), db,
                      Storage(tmp_path))
    signed = SignedUploads(gallery)
    media, thumb = targets(signed, principal, filename="a.png")
    event_id = put(signed, media, png())
    assert Thumbnailer(gallery).work_once() == [event_id]
    path = gallery.storage.thumbnail_path("cam1", event_id)
    servers = path.read_bytes()
    signed.require_unused(thumb)
    with gallery.open_upload("cam1") as upload:
        upload.write_media(b"device thumb")
        with closed, pytest.raises(DatabaseUnavailable):
            signed.complete(thumb, upload)
    assert path.read_bytes() == servers
    done = row(gallery, event_id)
    assert done is not None and (done.has_thumbnail, done.thumbnail_state) == (True, "generated")


def test_late_incoming_thumbnail_replaces_the_servers(gallery: Gallery) -> None:
    importer = IncomingImporter(gallery)
    inbox, thumbs = gallery.storage.device_paths("cam1")
    (inbox / "a.png").write_bytes(png())
    [event_id] = importer.scan_once(now=0) + importer.scan_once(now=10)
    assert Thumbnailer(gallery).work_once() == [event_id]
    (thumbs / "a.jpg").write_bytes(b"device thumb")
    importer.scan_once(now=20)
    importer.scan_once(now=30)
    done = row(gallery, event_id)
    assert done is not None and (done.has_thumbnail, done.thumbnail_state) == (True, "")
    assert gallery.storage.thumbnail_path("cam1", event_id).read_bytes() == b"device thumb"
    assert list(thumbs.iterdir()) == []


def test_a_late_incoming_thumbnail_arriving_while_the_server_makes_one_wins(
    gallery: Gallery, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The drop folder's thumbnail is being attached (its file placed, its row not yet updated)
    just as the server finishes its own: the server's must not replace it on disk, whichever
    commits first. The importer pauses after placing the file; the thumbnailer finishes then."""
    from gallery_server import incoming

    importer = IncomingImporter(gallery)
    inbox, thumbs = gallery.storage.device_paths("cam1")
    (inbox / "a.png").write_bytes(png())
    [event_id] = importer.scan_once(now=0) + importer.scan_once(now=10)
    placed, real_place, real_make = threading.Event(), incoming._place, thumbnails.make

    def place_then_pause(storage, taken, destination):  # type: ignore[no-untyped-def]
        real_place(storage, taken, destination)
        if destination.name.endswith(".thumb"):
            placed.set()
            time.sleep(1)  # the thumbnailer finishes meanwhile, or waits for this row's lock

    def attach():  # type: ignore[no-untyped-def]
        (thumbs / "a.jpg").write_bytes(b"device thumb")
        importer.scan_once(now=20)
        importer.scan_once(now=30)

    def make_while_the_thumbnail_drops(media_type, path):  # type: ignore[no-untyped-def]
        made = real_make(media_type, path)
        attaching.start()
        assert placed.wait(timeout=30)
        return made

    monkeypatch.setattr(incoming, "_place", place_then_pause)
    monkeypatch.setattr(thumbnails, "make", make_while_the_thumbnail_drops)
    attaching = threading.Thread(target=attach)
    assert Thumbnailer(gallery).work_once() == [event_id]
    attaching.join(timeout=60)
    done = row(gallery, event_id)
    assert done is not None and (done.has_thumbnail, done.thumbnail_state) == (True, "")
    assert gallery.storage.thumbnail_path("cam1", event_id).read_bytes() == b"device thumb"
    assert list(thumbs.iterdir()) == []
