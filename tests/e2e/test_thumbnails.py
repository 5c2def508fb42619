"""Server-made thumbnails end to end: a real JPEG uploaded over REST without a thumbnail gets one
from the running server's background thumbnailer; a broken image leaves its event intact."""

from __future__ import annotations

import io
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image

from gallery_server.local_stack import stop_stack

from ..unit.test_thumbnails import jpeg_with_exif
from .conftest import start_stack
from .test_downloads import content_url, multipart_upload


@pytest.fixture(scope="module")
def http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """A stack of its own, making thumbnails (the shared one does not)."""
    root = tmp_path_factory.mktemp("thumbs")
    stack = start_stack(root / "data", root / "gallery.log", extra_env={"GALLERY_MAKE_THUMBNAILS": "true"})
    try:
        with httpx.Client(base_url=stack.base_url, timeout=60) as client:
            yield client
    finally:
        stop_stack(stack)
    assert stack.process.returncode == 0, stack.log()


def wait_for(http: httpx.Client, device: str, headers: dict[str, str], event_id: str, *,
              seconds: float = 15) -> dict[str, object]:
    """Poll the listing until the event's thumbnail work is over; returns its listing entry."""
    deadline = time.monotonic() + seconds
    while True:
        r = http.get(f"/api/gallery/{device}/events", headers=headers)
        assert r.status_code == 200, r.text
        entry = next(e for e in r.json() if e["id"] == event_id)
        if entry["has_thumbnail"] or time.monotonic() > deadline:
            return dict(entry)
        time.sleep(0.1)


def test_uploaded_jpeg_gets_a_thumbnail(http, auth_headers):
    device, headers = f"th-{uuid.uuid4().hex[:10]}", auth_headers()
    photo = jpeg_with_exif((1200, 900), orientation=1)
    event_id = multipart_upload(http, device, headers, "photo.jpg", photo, len(photo))

    assert wait_for(http, device, headers, event_id)["has_thumbnail"] is True
    r = http.get(content_url(device, event_id, "thumbnail"), headers=headers)
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/jpeg"
    im = Image.open(io.BytesIO(r.content))
    assert (im.format, im.size) == ("JPEG", (320, 240))
    event = http.get(f"/api/gallery/{device}/events/{event_id}", headers=headers).json()
    assert event["metadata"]["media"] == {"width": 1200, "height": 900, "captured_at": "2024-05-01T12:34:56+02:00"}


def test_truncated_image_keeps_its_event(http, auth_headers):
    device, headers = f"th-{uuid.uuid4().hex[:10]}", auth_headers()
    photo = jpeg_with_exif((400, 300), orientation=1)
    good_id = multipart_upload(http, device, headers, "good.jpg", photo, len(photo))
    broken = jpeg_with_exif()[:1500]  # newer: usually taken first
    bad_id = multipart_upload(http, device, headers, "broken.jpg", broken, len(broken))

    assert wait_for(http, device, headers, good_id)["has_thumbnail"] is True
    entry = wait_for(http, device, headers, bad_id, seconds=0)
    assert entry["has_thumbnail"] is False
    r = http.get(content_url(device, bad_id), headers=headers)
    assert (r.status_code, r.content) == (200, broken)
    assert http.get(content_url(device, bad_id, "thumbnail"), headers=headers).status_code == 404


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")
def test_uploaded_video_gets_a_thumbnail(http, auth_headers, tmp_path):
    device, headers = f"th-{uuid.uuid4().hex[:10]}", auth_headers()
    clip = tmp_path / "clip.mp4"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi",
                    "-i", "testsrc=duration=1.5:size=320x240:rate=10", "-c:v", "mpeg4",
                    "-pix_fmt", "yuv420p", str(clip)], check=True, timeout=30)
    data = clip.read_bytes()
    event_id = multipart_upload(http, device, headers, "clip.mp4", data, len(data))

    assert wait_for(http, device, headers, event_id)["has_thumbnail"] is True
    r = http.get(content_url(device, event_id, "thumbnail"), headers=headers)
    assert (r.status_code, r.headers["content-type"]) == (200, "image/jpeg")
    assert Image.open(io.BytesIO(r.content)).size == (320, 240)
    media = http.get(f"/api/gallery/{device}/events/{event_id}", headers=headers).json()["metadata"]["media"]
    assert (media["width"], media["height"]) == (320, 240)
    assert media["duration"] == pytest.approx(1.5, abs=0.2)
